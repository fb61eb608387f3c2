"""One name for a training set's content, whatever holds it: the rows'
features, logits and labels hashed (SHA-256) in chunks of CONTENT_ROWS rows
on a fixed grid, then the chunk digests with the sizes and dtype. Memory and
a store of any shard size holding the same rows get the same fingerprint, so
a truth computed on one is accepted on the other; a store's writer hashes
its rows as it writes them and records the chunks in its manifest."""
from __future__ import annotations

import json

import torch

from .manifest import CONTENT_ROWS, dtype_name
from .saved import digest


class ContentDigest:
    """Rows added in order, in pieces of any size; `chunks` holds the digests of
    the complete chunks so far (what a store's manifest records, so a resumed
    writer restarts from them and the rows of the open chunk)."""

    def __init__(self, chunks=()):
        self.chunks = list(chunks)
        self._open: list[tuple[torch.Tensor, ...]] = []
        self._open_rows = 0

    @property
    def rows(self) -> int:
        """Rows added so far."""
        return len(self.chunks) * CONTENT_ROWS + self._open_rows

    def add(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> "ContentDigest":
        """The next rows: (n, D), (n, C), (n,) int64."""
        n, start = features.shape[0], 0
        while start < n:
            take = min(CONTENT_ROWS - self._open_rows, n - start)
            self._open.append(tuple(x[start:start + take] for x in (features, logits, labels)))
            self._open_rows += take
            start += take
            if self._open_rows == CONTENT_ROWS:
                self.chunks.append(self._open_digest())
                self._open, self._open_rows = [], 0
        return self

    def _open_digest(self) -> str:
        columns = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*self._open)]
        return digest(*columns)[:16]

    def fingerprint(self, num_features: int, num_classes: int, dtype: torch.dtype) -> str:
        """16 hex digits naming every row added so far, with D, C and the dtype."""
        chunks = self.chunks + ([self._open_digest()] if self._open_rows else [])
        return digest(json.dumps({"N": self.rows, "D": num_features, "C": num_classes, "dtype": dtype_name(dtype),
                                  "chunks": chunks}))[:16]


def content_fingerprint(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """The fingerprint of rows held whole (in memory)."""
    return ContentDigest().add(features, logits, labels).fingerprint(features.shape[1], logits.shape[1],
                                                                    features.dtype)
