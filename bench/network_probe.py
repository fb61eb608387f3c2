"""What NetworkExplainer's probe costs (models/probe.py: the first training
batch run whole and in two halves before collection, docs/design.md §11):
the probe alone, one gradient pass over one batch (forward and backward,
what a training step costs without the update), and the whole construction
(probe, collection, EK-FAC with the sampled Fisher, projection 32), in one
process, each the median of `--repeats` runs.

    .venv/bin/python bench/network_probe.py            # the ConvNet of issue 37 on 10,000 28x28 images
    .venv/bin/python bench/network_probe.py --smoke    # tiny: CI's check that it runs

Synthetic images (Gaussian) and random labels: the probe's cost depends on
the model and the batch, not on what the data mean."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import exemplar
from exemplar.models.layers import Capture, choose_layers
from exemplar.models.probe import probe


def convnet() -> nn.Sequential:
    """Conv 16 -> Conv 32 -> Linear 64 -> 10 (106k parameters), as issue 37's Fashion-MNIST run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.repeats = 64, 16, 1
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.n, 1, 28, 28, generator=g), torch.randint(0, 10, (args.n,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
    model = convnet()
    first_x, first_y = next(iter(loader))

    def gradient_pass():
        F.cross_entropy(model(first_x), first_y, reduction="sum").backward()
        model.zero_grad()

    capture = Capture(model, choose_layers(model, None, 32, 0))
    row = {"model": "ConvNet (Conv16, Conv32, Linear64, Linear10)", "N": args.n, "batch": args.batch,
           "threads": torch.get_num_threads(),
           "gradient_pass_s": median_seconds(gradient_pass, args.repeats),
           "probe_s": median_seconds(lambda: probe(capture, loader, False), args.repeats),
           "construction_s": median_seconds(lambda: exemplar.NetworkExplainer(
               model, loader, curvature="ekfac", fisher="sampled", projection=32, progress=False), args.repeats)}
    row["probe_in_gradient_passes"] = row["probe_s"] / row["gradient_pass_s"]
    row["probe_share_of_construction"] = row["probe_s"] / row["construction_s"]
    print(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
