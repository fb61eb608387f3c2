"""LastLayerData: what a classifier's last linear layer saw and said."""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def _check_float_matrix(name: str, x, shape: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"{name} must be finite, found {x[tuple(bad)].item()} at {name}{bad}")


def check_labels_in_range(labels: torch.Tensor, C: int, bound: str = "C") -> None:
    """labels (N,) integer in [0, C); the error names the first one outside."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        i = int(torch.nonzero((labels < 0) | (labels >= C))[0])
        raise ValueError(f"labels must be in [0, {bound}) = [0, {C}), got labels[{i}]={int(labels[i])}")


def largest_sq_norm(features: torch.Tensor) -> float:
    """max_i |f_i|^2 over rows (n, D), from row norms squared in float64: inf when
    it overflows even there; 0 for no rows."""
    if features.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(features, dim=1).max().double() ** 2)


def check_magnitude(name: str, largest: float, dtype: torch.dtype, remedy: str) -> None:
    """Every score multiplies features by features (kNN distances, gradient dot
    products, Gram blocks): refuse a largest squared row norm the dtype cannot hold."""
    limit = torch.finfo(dtype).max / 16
    if largest > limit:
        raise ValueError(f"{name} are too large for {dtype}: the largest squared row norm is "
                         f"{largest:.3g}, beyond {limit:.3g}, so scores would overflow; {remedy}")


def integer_labels(labels, where: str = "") -> torch.Tensor:
    """labels (an int, a sequence or a tensor of class indices) as int64; floats
    and bools are refused rather than truncated."""
    out = torch.as_tensor(labels)
    if out.dtype.is_floating_point or out.dtype.is_complex or out.dtype == torch.bool:
        raise TypeError(f"labels must be integers (class indices), got {out.dtype}{where}")
    return out.long()


@dataclass(frozen=True)
class LastLayerData:
    """What a classifier's last linear layer saw and said, checked on construction.

    Arguments:
        features: (N, D) float32 or float64, finite: the last layer's inputs.
        logits: (N, C), C >= 2, the same dtype and device: its outputs.
        labels: (N,) integers in [0, C), or None. For test data, labels name
            the class to explain; None explains each example's predicted class."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("features", "logits", "labels"):  # explained, never differentiated
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                object.__setattr__(self, name, value.detach())
        _check_float_matrix("features", self.features, "(N, D)")
        _check_float_matrix("logits", self.logits, "(N, C)")
        n = self.features.shape[0]
        if self.logits.shape[0] != n:
            raise ValueError(f"logits must have shape (N, C) with N={n} rows like features, "
                             f"got {tuple(self.logits.shape)}")
        if self.logits.dtype != self.features.dtype:
            raise TypeError(f"logits dtype {self.logits.dtype} differs from features dtype "
                            f"{self.features.dtype}")
        if self.logits.device != self.features.device:
            raise ValueError(f"logits is on {self.logits.device} but features is on "
                             f"{self.features.device}")
        if self.logits.shape[1] < 2:
            raise ValueError(f"logits must have C >= 2 classes, got shape {tuple(self.logits.shape)}")
        if self.labels is None:
            return
        labels = self.labels
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor of shape (N,) with N={n}, got {got}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.device != self.features.device:
            raise ValueError(f"labels is on {labels.device} but features is on {self.features.device}")
        check_labels_in_range(labels, self.logits.shape[1])
        object.__setattr__(self, "labels", labels.long())

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_classes(self) -> int:
        """C, the number of classes (logits columns)."""
        return self.logits.shape[1]

    @property
    def num_features(self) -> int:
        """D, the number of features."""
        return self.features.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The features' (and logits') dtype."""
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        """The tensors' device."""
        return self.features.device

    def __getitem__(self, rows: slice) -> "LastLayerData":
        """The examples in `rows` (a slice), as views."""
        if not isinstance(rows, slice):
            raise TypeError(f"LastLayerData takes a slice of rows, got {type(rows).__name__}")
        return LastLayerData(self.features[rows], self.logits[rows],
                             None if self.labels is None else self.labels[rows])

    def explained_labels(self) -> torch.Tensor:
        """The labels whose gradients are explained: the given ones, else the predictions."""
        return self.labels if self.labels is not None else self.logits.argmax(dim=1)


FIELD_NAMES = ("features", "logits", "labels")


def as_last_layer_data(data, name: str = "test") -> LastLayerData:
    """`data` as one LastLayerData: itself, or the batches of a DataLoader (or
    any iterable) joined in order, each batch a LastLayerData, a tuple
    (features, logits[, labels]) or a dict with those keys."""
    if isinstance(data, LastLayerData):
        return data
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a LastLayerData or a DataLoader (iterable) of batches "
                        f"(features, logits[, labels]), got {type(data).__name__}")
    parts = []
    for i, batch in enumerate(data):
        if isinstance(batch, LastLayerData):
            parts.append(batch)
            continue
        if isinstance(batch, dict):
            missing = [key for key in FIELD_NAMES[:2] if key not in batch]
            if missing:
                raise ValueError(f"{name} batch {i} is a dict without {missing}: dict batches need keys "
                                 f"'features' (n, D), 'logits' (n, C) and optionally 'labels' (n,)")
            batch = tuple(batch[key] for key in FIELD_NAMES if key in batch)
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError(f"{name} batch {i} must be (features (n, D), logits (n, C)[, labels (n,)]), "
                            f"got {type(batch).__name__}"
                            + (f" of {len(batch)} elements" if isinstance(batch, (tuple, list)) else ""))
        try:
            parts.append(LastLayerData(*batch))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name} batch {i}: {err}") from None
    return join([(p.features, p.logits, p.labels) for p in parts], name)


def join(parts: list[tuple], name: str) -> LastLayerData:
    """One LastLayerData of batches (features, logits, labels or None), in order."""
    if not parts:
        raise ValueError(f"{name} yielded no batches")
    if len({labels is None for *_, labels in parts}) > 1:
        raise ValueError(f"some batches had labels and some did not ({name})")
    labels = [y for *_, y in parts]
    return LastLayerData(torch.cat([x for x, _, _ in parts]), torch.cat([z for _, z, _ in parts]),
                         None if labels[0] is None else torch.cat(labels))
