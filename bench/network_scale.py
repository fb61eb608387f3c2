"""Whole-network attribution at scale: a ~10M-parameter MLP and 100,000
training examples collected to a gradient store (Kronecker-projected to at
most `--projection` per side), EK-FAC fitted, then top-10 for 1,000 tests;
each phase timed, the process's peak RSS and the store's size reported.

    .venv/bin/python bench/network_scale.py --store /tmp/scale-store    # the issue's size (tens of minutes)
    .venv/bin/python bench/network_scale.py --store DIR --smoke           # tiny: CI's check that it runs

The data are synthetic (Gaussian inputs, labels from a random teacher
network) and the model is trained for one epoch of Adam: the point is the
cost of collection, fit and query at this size, not the attribution's
quality (bench/network.py measures that against retraining). The queries
run exact (NetworkExplainer's default) and again with precision="auto" (the
bf16 screen where it applies), in the same process. A second
NetworkExplainer on the same store answers without running the model on the
training set beyond the probe's first batch (gradients from the shards,
curvature from the fit cache): its time is the "reuse" row."""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import exemplar


def model_of(widths) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


PEAKS = {}  # phase -> the process's peak RSS (MB) when it ended


def timed(fn, phase=None):
    """(seconds, fn()); records the peak RSS after it under `phase`."""
    start = time.monotonic()
    out = fn()
    if phase:
        PEAKS[phase] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return time.monotonic() - start, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the gradient store's folder (replaced)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--projection", type=int, default=64)
    parser.add_argument("--fisher", default="sampled")
    parser.add_argument("--n", type=int, default=100_000, help="training examples (peak memory against N)")
    args = parser.parse_args(argv)
    N, T, widths, batch = (2000, 50, (64, 96, 64, 10), 500) if args.smoke else \
        (args.n, 1000, (1024, 2560, 2048, 1024, 10), 1000)
    torch.manual_seed(0)
    X = torch.randn(N + T, widths[0])
    teacher = model_of(widths)
    with torch.no_grad():  # a random teacher's labels, in chunks (the whole set at once would set the peak RSS)
        y = torch.cat([teacher(X[i:i + 4096]).argmax(1) for i in range(0, len(X), 4096)])
    model = model_of(widths)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.monotonic()
    for i in range(0, N, 256):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i:i + 256]), y[i:i + 256]).backward()
        opt.step()
    model.eval()
    train_s = time.monotonic() - start
    PEAKS["data and model trained"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    loader = [(X[i:i + batch], y[i:i + batch]) for i in range(0, N, batch)]
    tests = [(X[N + i:N + i + batch], y[N + i:N + i + batch]) for i in range(0, T, batch)]
    shutil.rmtree(args.store, ignore_errors=True)
    kw = dict(curvature="ekfac", fisher=args.fisher, projection=args.projection, store=args.store,
              damping=1e-3, progress=not args.smoke)
    fit_s, explainer = timed(lambda: exemplar.NetworkExplainer(model, loader, **kw), "collected and fitted")
    query_s, top = timed(lambda: explainer.topk(tests, 10, "if"), "queried")
    auto_s, screened = timed(lambda: explainer.topk(tests, 10, "if", precision="auto"))  # the bf16 screen
    reuse_s, again = timed(lambda: exemplar.NetworkExplainer(model, loader, **kw))
    requery_s, same = timed(lambda: again.topk(tests, 10, "if"))
    row = {"parameters": params, "N": N, "T": T, "projection": args.projection, "fisher": args.fisher,
           "gradient_entries_per_example": sum(layer.width for layer in explainer.layers),
           "train_model_s": round(train_s, 1), "collect_and_fit_s": round(fit_s, 1),
           "query_top10_s": round(query_s, 1), "query_top10_auto_precision_s": round(auto_s, 1),
           "auto_same_top10": round(float((screened.indices == top.indices).double().mean()), 4),
           "reuse_store_s": round(reuse_s, 1), "requery_s": round(requery_s, 1),
           "same_answer_on_reuse": bool(torch.equal(top.indices, same.indices)),
           "store_mb": round(sum(f.stat().st_size for f in Path(args.store).rglob("*") if f.is_file()) / 2**20, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "peak_rss_mb_after": PEAKS,
           "threads": torch.get_num_threads()}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
