"""The bf16 screen against the exact path on the last-layer features our
reproductions explain, in one process (bench/screen_cpu.py's measurement):

* Fashion-MNIST ConvNet head: experiments/nets.py's 16C-32C-64C-F (D = 576,
  C = 10) trained 1 epoch on all 60,000 training images; T = 1,000 test images.
* IMDB BERT head: examples/imdb_text.py's 2-layer BERT (hidden 64, C = 2)
  trained 3 epochs on 6,000 reviews (192 tokens); T = 1,000 test reviews.

θ-RelatIF with K-FAC, k = 10, general (eigenbasis damping) and rank-1
(factored damping) paths, float32 features as the hooks collect them.

    apt-get install dataset-fashion-mnist
    cd bench && FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist ../.venv/bin/python screen_real.py

Prints one JSON line per measurement and a Markdown table (bench/RESULTS.md,
"Screens on the CPU")."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import exemplar
from screen_cpu import measure, prepared, print_table

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def fashion_head(epochs: int = 1, tests: int = 1000):
    from experiments import datasets, nets

    X, y, X2, _ = datasets.fashion_mnist()
    torch.manual_seed(0)
    images = X.float().view(-1, 1, 28, 28)
    model = nets.train(nets.conv_net(), images, y, epochs, seed=0)
    hook = exemplar.LastLayer(model)
    train = hook.collect([(images[i:i + 1024], y[i:i + 1024]) for i in range(0, len(y), 1024)], progress=False)
    test = hook.collect([X2[:tests].float().view(-1, 1, 28, 28)], progress=False)
    return train, test


def imdb_head(n_train: int = 6000, tests: int = 1000, epochs: int = 3, length: int = 192):
    import imdb_text

    train_texts, train_labels, test_texts, _ = imdb_text.load_reviews(n_train, tests)
    tokenizer = imdb_text.Tokenizer(train_texts, 20000, length)
    train_set = imdb_text.Reviews(tokenizer(train_texts), train_labels)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True)
    model = imdb_text.train_model(loader, len(tokenizer.ids) + 3, length, epochs)
    hook = exemplar.LastLayer(model)
    train = hook.collect(torch.utils.data.DataLoader(train_set, batch_size=128), progress=False)
    test = hook.collect([tokenizer(test_texts)], progress=False)
    return train, test


WORKLOADS = {"fashion": ("Fashion-MNIST ConvNet head", fashion_head), "imdb": ("IMDB BERT head", imdb_head)}


def main() -> None:
    chosen = sys.argv[1:] or list(WORKLOADS)  # e.g. screen_real.py imdb
    rows = []
    for name, make in (WORKLOADS[w] for w in chosen):
        start = time.perf_counter()
        train, test = make()
        print(json.dumps({"workload": name, "N": len(train.features), "T": len(test.features),
                          "D": train.features.shape[1], "C": train.logits.shape[1],
                          "dtype": str(train.features.dtype), "features_s": time.perf_counter() - start}), flush=True)
        train = exemplar.LastLayerData(train.features.float(), train.logits.float(), train.labels)
        test = exemplar.LastLayerData(test.features.float(), test.logits.float())
        for path, kfac_damping in (("general", "eigenbasis"), ("rank1", "factored")):
            result = measure(path, *prepared(train, test, kfac_damping), 10, 2)
            rows.append({"workload": name, **result})
    print_table(rows)


if __name__ == "__main__":
    main()
