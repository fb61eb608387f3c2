"""The training side of whole-network attribution (docs/design.md §11): each
layer's per-example gradients for the whole training set, collected once by
a pass over the loader and held in memory or in a GradientStore
(storage/gradients.py), and read back as row blocks."""
from __future__ import annotations

import json

import torch

from ..progress import Progress
from ..storage.blocks import block_rows
from ..storage.gradients import DEFAULT_SHARD_ROWS, GradientStore, GradientStoreWriter
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


class TrainingGradients:
    """The training set's per-layer gradients this process holds: in memory
    (`rows`, the training rows' positions, and one LayerGradients per layer
    for them; with distributed=True a rank holds its own batches' rows) or
    in a GradientStore.

    Attributes:
        num_train: N, the rows of the whole training set."""

    def __init__(self, num_train: int, rows: torch.Tensor | None = None, layers: list[LayerGradients] | None = None,
                 store: GradientStore | None = None):
        self.num_train, self.rows, self.layers, self.store = num_train, rows, layers, store

    def __len__(self) -> int:
        return self.num_train

    def fingerprint(self) -> str | None:
        """The store's content fingerprint (None in memory)."""
        return None if self.store is None else self.store.fingerprint()

    def blocks(self, width: int):
        """Yields (rows (n,) int64: the block's positions in the training set,
        [LayerGradients per layer]) block by block: a store's shards; in
        memory, blocks of block_rows(width) rows."""
        if self.store is None:
            step = block_rows(width)
            for start in range(0, len(self.rows), step):
                yield self.rows[start:start + step], [g.slice(start, start + step) for g in self.layers]
            return
        start = 0
        for i, rows in enumerate(self.store.sizes):
            tensors = self.store.shard(i)
            yield torch.arange(start, start + rows), [
                LayerGradients(tuple(tensors[f"{j}.{k}"] for k in (("delta", "a") if layer["factored"] else ("g",))))
                for j, layer in enumerate(self.store.layers)]
            start += rows


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


def collect(explainer, loader, store=None, shard_rows: int = DEFAULT_SHARD_ROWS,
            overwrite: bool = False) -> TrainingGradients:
    """Runs the model over the training loader for each example's per-layer
    gradients under its label, into memory or into the store at `store`
    (continuing a partial one the same model, layers and data began; a
    complete one is read, not recomputed). With explainer.group over several
    ranks each rank runs the model on its own batches (index % world == rank)."""
    layers, group = explainer.layers, explainer.group
    order = _fixed_order(loader)
    writer = None
    if store is not None and group.world > 1:
        raise ValueError("store= with distributed=True is not supported yet: collect the store in one process, "
                         "or drop store= (each rank then holds its own batches' gradients in memory)")
    if store is not None:
        source = {"model": explainer.model_digest, "layers": [layer.describe() for layer in layers],
                  "seed": explainer.settings.seed, "data": data_digest(loader)[0],
                  "order": None if order is None else digest(json.dumps(list(map(int, order))))[:16]}
        writer = GradientStoreWriter(store, source, explainer.dtype, shard_rows, overwrite)
        for layer, recorded in zip(layers, writer.layers):
            layer.factored = recorded["factored"]
        if writer.complete:
            complete = GradientStore(store)
            return TrainingGradients(len(complete), store=complete)
    parts, owned = [[] for _ in layers], []
    start = 0
    bar = Progress("network: training gradients", len(loader) if hasattr(loader, "__len__") else None,
                   explainer.progress)
    for index, batch in enumerate(loader):
        args, kwargs, y = _split_batch(batch)
        n = _batch_rows((*args, *kwargs.values()), y)
        if writer is not None and n is not None and start + n <= writer.rows_done:
            start += n  # already in the store: the model is not run again
            continue
        if index % group.world != group.rank:  # another rank's batch
            if n is None:
                raise ValueError(f"batch {index} has no labels or input tensor to count its rows by; "
                                 "distributed=True needs them")
            start += n
            continue
        _, labels, [(_, _, captured)] = explainer.capture.run(batch, index,
                                                              lambda logits, y, i=index: [(_labels(y, i), None)])
        grads = [LayerGradients(tuple(x.cpu() for x in layer.gradient(d, a)))
                 for layer, (d, a) in zip(layers, captured)]
        if writer is None:
            for j, g in enumerate(grads):
                parts[j].append(g)
            owned.append(torch.arange(start, start + len(labels)))
        else:
            keep = max(writer.rows_done - start, 0)
            tensors = {"labels": labels[keep:].cpu()}
            for j, g in enumerate(grads):
                tensors.update({k: v[keep:] for k, v in g.named(j).items()})
            writer.add(tensors, [{"k_out": layer.k_out, "k_in": layer.k_in, "factored": layer.factored}
                                 for layer in layers])
        start += len(labels)
        bar.update()
    bar.close()
    if start == 0:
        raise ValueError("train_loader yielded no batches")
    if writer is not None:
        finished = writer.finish()
        return TrainingGradients(len(finished), store=finished)
    return TrainingGradients(start, torch.cat(owned), [LayerGradients(tuple(torch.cat(x) for x in zip(
        *(g.tensors for g in p)))) for p in parts])


def _labels(y, index: int):
    if y is None:
        raise ValueError(f"train_loader must yield (inputs..., labels): batch {index} has no labels")
    return y
