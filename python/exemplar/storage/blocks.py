"""The storage protocol (docs/design.md §3, §4): a training set is a sequence
of row blocks — views of in-memory tensors (memory.py) or the shards of an
on-disk store (store.py) — with columns of per-example values and the fits
kept beside them. The engine sees only these protocols, so a third backend
is one class implementing TrainingSet."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..data import LastLayerData

# Rows per block of an in-memory training set: about 16M elements of phi (64 MB
# in float32), the size of the reusable buffer the bias column is appended in.
BLOCK_ELEMENTS = 1 << 24


def block_rows(Dp: int) -> int:
    """Rows per in-memory block for Dp feature columns."""
    return max(4096, BLOCK_ELEMENTS // max(Dp, 1))


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


class Blocks(Protocol):
    """A training set's blocks: their sizes and first rows, and a reader."""
    sizes: list[int]
    starts: list[int]
    max_rows: int

    def __len__(self) -> int: ...

    def read(self, indices) -> Iterator[Block]:
        """Yields the blocks numbered `indices`, in that order."""


class Columns(Protocol):
    """Per-example values (normalisers) kept per block, and the whole-set
    fits (curvatures, refits) of one Attributor's settings; `where` names
    where the fits are kept, for messages."""
    where: str

    def get(self, keys: tuple[str, ...], index: int) -> tuple[torch.Tensor, ...] | None:
        """The values of every key for block `index`, or None when any is missing."""

    def put(self, keys: tuple[str, ...], index: int, values) -> None:
        """Keeps one (b,) value per key for block `index`."""

    def whole(self) -> dict[str, torch.Tensor]:
        """The columns held for every block, each joined to (N,)."""

    def put_whole(self, key: str, value: torch.Tensor) -> None:
        """Keeps an (N,) column, split into the blocks."""

    def save_fitted(self, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
        """Keeps the whole-set fits: tensors by key, curvature kinds by name."""

    def load_fitted(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """What save_fitted was last given, or None."""


class TrainingSet(Protocol):
    """What the engine needs of a training set, whatever holds it."""
    num_features: int
    num_classes: int
    dtype: torch.dtype
    device: torch.device

    def __len__(self) -> int: ...

    @property
    def source(self):
        """What the user passed: a LastLayerData or a Store (Attributor.train)."""

    def blocks(self) -> Blocks:
        """The rows as blocks."""

    def columns(self, identity) -> Columns:
        """Per-example values and fits of one fit `identity` (an object with
        .tag, a short name, and .meta, a JSON-able dict of what the fits
        depend on)."""

    def fingerprint(self) -> str:
        """Names the training set's content (features, logits, labels), wherever it is held."""

    def describe(self) -> str:
        """The training set in a few words, for messages."""

    def check_magnitude(self) -> None:
        """Refuses features whose squared norms the dtype cannot hold."""

    def whole(self, purpose: str) -> LastLayerData:
        """The whole set in memory for `purpose`, or a ValueError saying why not."""
