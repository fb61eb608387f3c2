"""The training side of whole-network attribution (docs/design.md §11): each
layer's per-example gradients for the whole training set, collected once by
a pass over the loader and held in memory or in a GradientStore
(storage/gradients.py), and read back as row blocks."""
from __future__ import annotations

import functools
import json

import torch

from ..progress import Progress
from ..storage.blocks import block_rows
from ..storage.gradients import DEFAULT_SHARD_ROWS, GradientStore, GradientStoreWriter, finish, prepare
from ..storage.saved import digest
from .hooks import _batch_rows, _fixed_order, _split_batch


class LayerGradients:
    """One layer's per-example gradients for a block of rows: the factors
    (delta (n, k_out), a (n, k_in)) or the dense (n, k_out, k_in)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(k_out, k_in)."""
        return (self.tensors[0].shape[1], self.tensors[-1].shape[-1])

    def rows(self) -> torch.Tensor:
        """(n, k_out k_in) flattened gradients."""
        if len(self.tensors) == 2:
            d, a = self.tensors
            return (d.unsqueeze(2) * a.unsqueeze(1)).flatten(1)
        return self.tensors[0].flatten(1)

    def matrices(self) -> torch.Tensor:
        """(n, k_out, k_in) gradients."""
        return self.rows().view(len(self), *self.shape)

    def slice(self, start: int, stop: int) -> "LayerGradients":
        """Rows [start, stop) (views)."""
        return LayerGradients(tuple(x[start:stop] for x in self.tensors))

    def named(self, j: int) -> dict[str, torch.Tensor]:
        """The tensors as a gradient store's shard names them."""
        if len(self.tensors) == 2:
            return {f"{j}.delta": self.tensors[0], f"{j}.a": self.tensors[1]}
        return {f"{j}.g": self.tensors[0]}


class NetworkRows:
    """One block of a network's training rows as methods see them
    (methods.Rows): phi (b, P), the layers' gradients flattened and joined,
    and r (b, 1) ones; `positions` are the rows' places in the training set."""
    features = logits = labels = None  # a network has no head: needs_head methods are refused

    def __init__(self, index: int, positions: torch.Tensor, grads: list[LayerGradients], dtype: torch.dtype):
        self.index, self.positions, self.grads, self.dtype = index, positions, grads, dtype

    def __len__(self) -> int:
        return len(self.positions)

    def positions_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the block (indices within it) as rows of the training set."""
        return self.positions[indices]

    @functools.cached_property
    def phi(self) -> torch.Tensor:
        """(b, P): every layer's per-example gradient, flattened and joined."""
        return torch.cat([g.rows() for g in self.grads], 1).to(self.dtype)

    @functools.cached_property
    def r(self) -> torch.Tensor:
        """(b, 1) ones: a network's row is its gradient alone."""
        return torch.ones(len(self), 1, dtype=self.dtype)


class TrainingGradients:
    """The training set's per-layer gradients this process holds, as the
    engine's Passes read them (a storage.TrainingSet whose blocks are
    NetworkRows): in memory (`rows`, the training rows' positions, and one
    LayerGradients per layer for them; with distributed=True a rank holds its
    own batches' rows, blocks of block_rows(width) of them) or a GradientStore
    (every shard a block, rank r reading shards r, r + world, ...).

    Attributes:
        num_train: N, the rows of the whole training set; width: gradient
        entries per row; dtype: what rows are scored in."""
    device = torch.device("cpu")

    def __init__(self, num_train: int, width: int, dtype: torch.dtype, rows: torch.Tensor | None = None,
                 layers: list[LayerGradients] | None = None, store: GradientStore | None = None):
        self.num_train, self.width, self.dtype = num_train, width, dtype
        self.rows, self.layers, self.store = rows, layers, store
        if store is None:
            step = block_rows(width)
            self.starts = list(range(0, len(rows), step))
            self.sizes = [min(step, len(rows) - s) for s in self.starts]
            self.held = range(len(self.sizes))  # every block in memory is this process's own
        else:
            self.sizes, self.held = store.sizes, None
        self.max_rows = max(self.sizes)

    def __len__(self) -> int:
        return self.num_train

    def fingerprint(self) -> str | None:
        """The store's content fingerprint (None in memory)."""
        return None if self.store is None else self.store.fingerprint()

    def blocks(self) -> "GradientBlocks":
        """The rows as blocks (storage.Blocks)."""
        return GradientBlocks(self)

    def read(self, indices):
        """Yields NetworkRows of the blocks numbered `indices`."""
        for i in indices:
            if self.store is None:
                start, stop = self.starts[i], self.starts[i] + self.sizes[i]
                yield NetworkRows(i, self.rows[start:stop], [g.slice(start, stop) for g in self.layers], self.dtype)
                continue
            tensors = self.store.shard(i)
            yield NetworkRows(i, tensors["positions"], [
                LayerGradients(tuple(tensors[f"{j}.{k}"] for k in (("delta", "a") if layer["factored"] else ("g",))))
                for j, layer in enumerate(self.store.layers)], self.dtype)


class GradientBlocks:
    """A TrainingGradients' blocks (storage.Blocks): their sizes, which this
    process holds (None: rank r reads blocks r, r + world, ...) and a reader."""

    def __init__(self, train: TrainingGradients):
        self.sizes, self.max_rows, self.held, self.read = train.sizes, train.max_rows, train.held, train.read

    def __len__(self) -> int:
        return len(self.sizes)


def data_digest(loader) -> tuple[str, int]:
    """(a digest of every batch the loader yields (inputs and labels), in order:
    what a gradient store records of the data it was collected from, the
    number of batches)."""
    parts, batches = [], 0
    for batch in loader:
        args, kwargs, y = _split_batch(batch)
        parts += [x for x in (*args, *(kwargs[k] for k in sorted(kwargs)), y) if isinstance(x, torch.Tensor)]
        batches += 1
    return digest(*parts)[:16], batches


def _own_gradients(explainer, loader, skip: int, seen: dict):
    """Yields (positions (n,), labels (n,), [LayerGradients]) of this rank's
    batches (index % world == rank) in order, past the first `skip` of its
    rows (a batch holding some of them yields its rest; one wholly within
    them is not run); seen["rows"]: every rank's rows, when it ends."""
    group, start, own = explainer.group, 0, 0
    bar = Progress("network: training gradients", len(loader) if hasattr(loader, "__len__") else None,
                   explainer.progress)
    for index, batch in enumerate(loader):
        args, kwargs, y = _split_batch(batch)
        n = _batch_rows((*args, *kwargs.values()), y)
        if index % group.world != group.rank or (n is not None and own + n <= skip):
            if n is None:
                raise ValueError(f"batch {index} has no labels or input tensor to count its rows by; "
                                 "distributed=True needs them")
            start, own = start + n, own + n * (index % group.world == group.rank)
            continue
        _, labels, [(_, _, captured)] = explainer.capture.run(batch, index,
                                                              lambda logits, y, i=index: [(_labels(y, i), None)])
        keep = max(skip - own, 0)
        yield torch.arange(start + keep, start + len(labels)), labels[keep:].cpu(), [
            LayerGradients(tuple(x[keep:].cpu() for x in layer.gradient(d, a)))
            for layer, (d, a) in zip(explainer.layers, captured)]
        start, own = start + len(labels), own + len(labels)
        bar.update()
    bar.close()
    if start == 0:
        raise ValueError("train_loader yielded no batches")
    seen["rows"] = start


def collect(explainer, loader, store=None, shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False,
            data: str | None = None) -> TrainingGradients:
    """Runs the model over the training loader for each example's per-layer
    gradients under its label, into memory or into the store at `store`
    (continuing a partial one the same model, layers, data and ranks began; a
    complete one is read, not recomputed). With explainer.group over several
    ranks each rank runs the model on its own batches (index % world == rank)
    and holds (or writes) their rows; each step's errors are raised on every rank.
    data: the loader's data_digest when the caller has it (a store records it)."""
    layers, group = explainer.layers, explainer.group
    width = sum(layer.width for layer in layers)
    order = _fixed_order(loader)
    if store is None:
        def gather():
            seen = {}
            parts = list(_own_gradients(explainer, loader, 0, seen))
            joined = [LayerGradients(tuple(torch.cat(x) for x in zip(*(grads[j].tensors for _, _, grads in parts))))
                      for j in range(len(layers))]
            return TrainingGradients(seen["rows"], width, explainer.dtype, torch.cat([p for p, _, _ in parts]), joined)
        return group.call_together(gather)

    def begin():
        if group.rank == 0:
            source = {"model": explainer.model_digest, "layers": [layer.describe() for layer in layers],
                      "seed": explainer.settings.seed, "data": data_digest(loader)[0] if data is None else data,
                      "order": None if order is None else digest(json.dumps(list(map(int, order))))[:16]}
            prepare(store, source, explainer.dtype, shard_rows, overwrite, group.world)
    group.call_together(begin)

    def write():
        writer = GradientStoreWriter(store, group.rank)
        for layer, recorded in zip(layers, writer.layers):
            layer.factored = recorded["factored"]
        if writer.complete:
            return
        for positions, labels, grads in _own_gradients(explainer, loader, writer.rows_done, {}):
            tensors = {"labels": labels, "positions": positions}
            for j, g in enumerate(grads):
                tensors.update(g.named(j))
            # what each layer keeps (factors or the dense gradient) is decided by its first gradient
            writer.add(tensors, [{"k_out": layer.k_out, "k_in": layer.k_in, "factored": layer.factored}
                                 for layer in layers])
        writer.close()
    group.call_together(write)
    finished = group.call_together(lambda: finish(store))
    return TrainingGradients(len(finished), width, explainer.dtype, store=finished)


def _labels(y, index: int):
    if y is None:
        raise ValueError(f"train_loader must yield (inputs..., labels): batch {index} has no labels")
    return y
