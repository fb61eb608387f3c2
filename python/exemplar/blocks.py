"""The training set as a sequence of row blocks: views of in-memory tensors, or
the shards of an on-disk store (store.py). Every pass of an Attributor (curvature
statistics, normalisers, scores, top-k) goes block by block, so what it holds is
one block and the per-test results, whatever N is; top-k results of the blocks
are merged in the ops' order (docs/design.md §1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import LastLayerData

# Rows per block of an in-memory training set: about 16M elements of phi (64 MB
# in float32), the size of the reusable buffer the bias column is appended in.
BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Block:
    """Training rows [start, start + len) as stored: block `index` of the set."""
    index: int
    start: int
    features: torch.Tensor  # (b, D)
    logits: torch.Tensor  # (b, C)
    labels: torch.Tensor  # (b,) int64

    def __len__(self) -> int:
        return self.features.shape[0]


class TensorBlocks:
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


def block_rows(Dp: int) -> int:
    return max(4096, BLOCK_ELEMENTS // max(Dp, 1))


def merge_topk(parts, k: int, largest: bool):
    """The top k of several (values (T, k_j), indices (T, k_j)) of disjoint
    training rows, in the ops' order: larger first (smaller with largest=False),
    NaN after every number, equal values by ascending index."""
    values = torch.cat([v for v, _ in parts], 1)
    indices = torch.cat([i for _, i in parts], 1)
    # Three stable sorts, least significant key first: index, value, is-NaN.
    keys = ((lambda v, i: i, False), (lambda v, i: v.masked_fill(v.isnan(), 0), largest),
            (lambda v, i: v.isnan().to(torch.uint8), False))
    for key, descending in keys:
        order = torch.sort(key(values, indices), dim=1, descending=descending, stable=True).indices
        values, indices = values.gather(1, order), indices.gather(1, order)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


class MemoryColumns:
    """Per-example values (normalisers) of an in-memory training set, kept per
    block as they are computed; whole (N,) columns go into saved state."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.parts: dict[str, dict[int, torch.Tensor]] = {}

    def get(self, keys, index: int):
        found = [self.parts.get(k, {}).get(index) for k in keys]
        return None if any(v is None for v in found) else tuple(found)

    def put(self, keys, index: int, values) -> None:
        for k, v in zip(keys, values):
            self.parts.setdefault(k, {})[index] = v

    def complete(self) -> dict[str, torch.Tensor]:
        """The columns computed for every block, joined (N,)."""
        n = len(self.sizes)
        return {k: torch.cat([p[i] for i in range(n)]) for k, p in self.parts.items() if len(p) == n}

    def put_whole(self, key: str, value: torch.Tensor) -> None:
        self.parts[key] = dict(enumerate(value.split(self.sizes)))

    def save_fitted(self, tensors, kinds) -> None:
        """In memory, fits live in the Attributor (state_dict saves them)."""

    def load_fitted(self):
        return None
