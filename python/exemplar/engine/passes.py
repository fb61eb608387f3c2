"""Passes over a training set's blocks (docs/design.md §3): every pass of an
Attributor — curvature statistics, normalisers, scores, top-k — reads the
blocks this rank owns one at a time, appends the bias column into one reused
buffer, and sums or merges across ranks, so what it holds is one block and
the per-test results, whatever N is."""
from __future__ import annotations

import functools
import threading

import torch

from .. import ops
from ..curvature import Statistics
from ..progress import Progress
from ..storage import Block, TrainingSet
from .distributed import ProcessGroup


def augment(features: torch.Tensor, bias: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """features (n, D) -> phi (n, Dp): with the constant-1 bias column when
    `bias`, written into `out` (rows >= n, Dp) when given."""
    if not bias:
        return features.contiguous()
    n, D = features.shape
    phi = torch.empty(n, D + 1, dtype=features.dtype, device=features.device) if out is None else out[:n]
    phi[:, :D] = features
    phi[:, D] = 1
    return phi


class Rows:
    """One block of training rows as methods see it (methods.Rows): the stored
    features, logits and labels, and phi and r computed from them on first use."""

    def __init__(self, block: Block, bias: bool, buffer: torch.Tensor | None):
        self._bias, self._buffer = bias, buffer
        self.index, self.start = block.index, block.start  # index None: the whole training set
        self.features, self.logits, self.labels = block.features, block.logits, block.labels

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def positions(self) -> slice:
        """The block's rows in the training set."""
        return slice(self.start, self.start + len(self))

    def positions_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the block (indices within it) as rows of the training set."""
        return indices + self.start

    @functools.cached_property
    def phi(self) -> torch.Tensor:
        """(b, Dp): the features with the bias column, in a buffer reused by the next block."""
        return augment(self.features, self._bias, self._buffer)

    @functools.cached_property
    def r(self) -> torch.Tensor:
        """(b, C): softmax(logits) - onehot(labels)."""
        return ops.residuals(self.logits, self.labels)


class Passes:
    """Reads a training set's blocks for one rank of `group`, with a progress
    line per pass (progress: None shows it only on a terminal). Every block
    is read as rows_of(block, buffer): by default a last layer's Rows (with
    the bias column appended into `buffer`); a source whose blocks are
    already rows (a whole network's, models/network_data.py) passes its own.
    A rank reads blocks rank, rank + world, ..., unless the blocks say which
    this process holds (`held`: a network's rows in memory, its own batches')."""

    def __init__(self, train: TrainingSet, bias: bool, group: ProcessGroup, progress: bool | None,
                 rows_of=None):
        self.train, self.bias, self.group, self.progress = train, bias, group, progress
        self.rows_of = rows_of or (lambda block, buffer: Rows(block, bias, buffer))
        self.blocks = train.blocks()
        self.num_blocks = len(self.blocks)
        self.held = getattr(self.blocks, "held", None)
        if self.held is None and group.world > self.num_blocks:
            raise ValueError(f"{group.world} ranks but the training set has only {self.num_blocks} "
                             "blocks (shards): each rank needs at least one; write the store with smaller shards")
        self._local = threading.local()  # each thread its own bias-column buffer

    def own(self) -> range:
        """The blocks this rank reads: all of them on one process."""
        return self.held if self.held is not None else range(self.group.rank, self.num_blocks, self.group.world)

    def rows(self, indices, label: str | None, reuse: bool = True):
        """Rows of the blocks numbered `indices`, with a progress line when `label`."""
        bar = Progress(label or "", len(indices), False if label is None else self.progress)
        local = self._local
        # A pass nested in another (a fit on first use inside a query) gets no
        # buffer: the outer pass's rows still point into it.
        reuse = reuse and self.bias and not getattr(local, "busy", False)
        if reuse:
            local.busy = True
        try:
            for block in self.blocks.read(indices):
                if reuse and getattr(local, "buffer", None) is None:
                    local.buffer = torch.empty(self.blocks.max_rows, self.train.num_features + 1,
                                               dtype=self.train.dtype, device=self.train.device)
                yield self.rows_of(block, local.buffer if reuse else None)
                bar.update()
        finally:
            bar.close()
            if reuse:
                local.busy = False

    def per_row(self, label: str, leading: tuple[int, ...], fn) -> torch.Tensor:
        """(*leading, N): fn(rows) (*leading, b) for every block, each rank filling
        its own blocks' columns and the sum over ranks joining them."""
        t = self.train
        out = torch.zeros(*leading, len(t), dtype=t.dtype, device=t.device)
        for rows in self.rows(self.own(), label):
            out[..., rows.positions] = fn(rows)
        return self.group.all_sum((out,))[0]

    def sum(self, label: str, fn) -> torch.Tensor:
        """The sum of fn(rows) over every block, this rank's blocks summed across ranks."""
        total = None
        for rows in self.rows(self.own(), label):
            part = fn(rows)
            total = part if total is None else total.add_(part)
        return self.group.all_sum((total,))[0]

    def topk(self, k: int, largest: bool, blocks, label: str | None, score_topk):
        """The top k over `blocks` of score_topk(rows, k_b) -> (values, indices
        within the block), merged block by block in the ops' order."""
        best = None
        for rows in self.rows(blocks, label):
            values, indices = score_topk(rows, min(k, len(rows)))
            part = (values, rows.positions_of(indices))
            best = part if best is None else ops.merge_topk([best, part], k, largest)
        return best

    def topk_merged(self, T: int, k: int, largest: bool, label: str | None, score_topk):
        """The top k over every training block, (T, k) each: this rank's own
        blocks (topk), then the ranks' parts gathered and merged. For equal
        shapes in the gather a rank holding fewer than k rows pads with NaN
        (ranked last) at index N (after every real row), so the merged top k,
        k <= N, holds real rows only."""
        best = self.topk(k, largest, self.own(), label, score_topk)
        if self.group.world == 1:
            return best
        N, t = len(self.train), self.train
        values, indices = best if best is not None else (
            torch.empty(T, 0, dtype=t.dtype, device=t.device), torch.empty(T, 0, dtype=torch.int64, device=t.device))
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((T, pad), float("nan"))], 1)
        indices = torch.cat([indices, indices.new_full((T, pad), N)], 1)
        return ops.merge_topk(self.group.all_gather((values, indices)), k, largest)


class Means(Statistics):
    """Means over every training row of fn(phi, logits), block by block and
    across ranks; logits_of(rows) replaces the stored logits (RPS-LJE's Theta*)."""

    def __init__(self, passes: Passes, label: str, logits_of=None):
        self.passes, self.label, self.logits_of = passes, label, logits_of
        t = passes.train
        self.N, self.C, self.Dp = len(t), t.num_classes, t.num_features + passes.bias
        self.dtype, self.device = t.dtype, t.device

    def mean(self, fn):
        return self.mean_rows(lambda rows: fn(rows.phi, rows.logits if self.logits_of is None
                                              else self.logits_of(rows)))

    def mean_rows(self, fn):
        """As mean, with fn(rows: Rows) giving the block's means."""
        total = None
        for rows in self.passes.rows(self.passes.own(), self.label):
            part = tuple(x.double() * len(rows) for x in fn(rows))
            total = part if total is None else tuple(a.add_(b) for a, b in zip(total, part))
        return tuple(x / self.N for x in self.passes.group.all_sum(total))
