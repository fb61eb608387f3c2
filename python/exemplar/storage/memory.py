"""The in-memory backend: a LastLayerData cut into blocks of views, with its
per-example columns and fits held in memory (saved state carries them)."""
from __future__ import annotations

import torch

from ..data import LastLayerData, check_magnitude, largest_sq_norm
from .blocks import Block, Blocks, Columns, TrainingSet, block_rows
from .content import content_fingerprint


class TensorBlocks(Blocks):
    """An in-memory LastLayerData cut into blocks of `rows` rows (views, no copies)."""

    def __init__(self, data: LastLayerData, rows: int):
        self.data = data
        N = len(data)
        self.starts = list(range(0, N, rows)) or [0]
        self.sizes = [min(rows, N - s) for s in self.starts]
        self.max_rows = max(self.sizes)

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, indices):
        """Yields the blocks numbered `indices`, in that order."""
        d = self.data
        for i in indices:
            s, n = self.starts[i], self.sizes[i]
            yield Block(i, s, d.features[s:s + n], d.logits[s:s + n], d.labels[s:s + n])


class MemoryColumns(Columns):
    """Per-example values of an in-memory training set, kept per block as they
    are computed, and its fits as they were last saved."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.parts: dict[str, dict[int, torch.Tensor]] = {}
        self.fitted: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
        self.where = "fitted state in memory"

    def get(self, keys, index: int):
        found = [self.parts.get(k, {}).get(index) for k in keys]
        return None if any(v is None for v in found) else tuple(found)

    def put(self, keys, index: int, values) -> None:
        for k, v in zip(keys, values):
            self.parts.setdefault(k, {})[index] = v

    def whole(self) -> dict[str, torch.Tensor]:
        n = len(self.sizes)
        return {k: torch.cat([p[i] for i in range(n)]) for k, p in self.parts.items() if len(p) == n}

    def put_whole(self, key: str, value: torch.Tensor) -> None:
        self.parts[key] = dict(enumerate(value.split(self.sizes)))

    def save_fitted(self, tensors, kinds) -> None:
        self.fitted = (tensors, kinds)

    def load_fitted(self):
        return self.fitted


class InMemory(TrainingSet):
    """A LastLayerData with labels as a TrainingSet, in blocks of about
    BLOCK_ELEMENTS entries of phi for `row_width` = Dp columns."""

    def __init__(self, data: LastLayerData, row_width: int):
        if len(data) == 0:
            raise ValueError("train is empty: the training set needs at least one example (N >= 1)")
        if data.labels is None:
            raise ValueError("train.labels is None: training examples need their labels")
        self.data = data
        self.num_features, self.num_classes = data.num_features, data.num_classes
        self.dtype, self.device = data.dtype, data.device
        self._blocks = TensorBlocks(data, block_rows(row_width))
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.data)

    @property
    def source(self) -> LastLayerData:
        return self.data

    def blocks(self) -> TensorBlocks:
        return self._blocks

    def columns(self, identity) -> MemoryColumns:
        return MemoryColumns(self._blocks.sizes)

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # one pass over the tensors, on first use
            self._fingerprint = content_fingerprint(self.data.features, self.data.logits, self.data.labels)
        return self._fingerprint

    def describe(self) -> str:
        return f"an in-memory training set (N={len(self)}, content {self.fingerprint()})"

    def check_magnitude(self) -> None:
        check_magnitude("features", largest_sq_norm(self.data.features), self.dtype,
                        "pass float64 features or rescale them")

    def whole(self, purpose: str) -> LastLayerData:
        return self.data
