"""Model hooks: what a classifier's final linear layer sees and says, collected
over a DataLoader with forward hooks (eval mode, no grad, on the model's device)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..data import integer_labels, join
from ..progress import Progress
from ..storage.saved import digest
from ..storage.store import DEFAULT_SHARD_ROWS, StoreWriter

LABEL_KEYS = ("labels", "label")


def _split_batch(batch):
    """(positional inputs, keyword inputs, labels or None). A batch is a tensor;
    a tuple/list whose last element holds the labels and whose other elements
    are the model's inputs; or a dict (a tokenizer's output) whose "labels"
    (or "label") entry holds the labels and whose other entries are passed to
    the model as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        labels = [key for key in LABEL_KEYS if key in batch]
        kwargs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
        if not kwargs:
            raise ValueError(f"a dict batch needs model inputs besides its labels, got keys {list(batch)}")
        return (), kwargs, batch[labels[0]] if labels else None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), {}, batch[-1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return tuple(batch), {}, None
    raise TypeError("each batch must be a tensor of inputs, a tuple (inputs..., labels) or a dict of "
                    f"keyword inputs (with 'labels'), got {type(batch).__name__}")


@contextmanager
def eval_mode(model: nn.Module):
    """Every module of `model` in eval mode inside, each module's own mode
    restored after (also on an error): attribution explains the deterministic
    model, with dropout off and normalisation by its running statistics."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


class LastLayer:
    """Finds the classifier's final nn.Linear (or the one named or passed as
    `layer`) and collects its inputs (features) and outputs (logits).

    Arguments:
        model: the classifier (an nn.Module).
        layer: a module name such as "classifier", the module itself, or
            None for the last nn.Linear to run.
        output: where the logits are in a structured output: an index, a key
            or attribute name, or a callable taking the output (None: found).

    Batches: a tensor of inputs; a tuple (inputs..., labels); or a dict such
    as a Hugging Face tokenizer's output, passed to the model as keyword
    arguments, with its "labels" entry taken as the labels (and not passed).

    When the layer is found automatically, the first batch checks that the
    model's output is that layer's output. A model that returns a dict,
    ModelOutput, named tuple or tuple has its logits found in it (the element
    equal to the layer's output; "logits" when several are); where that
    cannot be decided, the error names the argument to pass: `output` (an
    index, a key or attribute name, or a callable taking the output) and/or
    `layer` (a module name such as "classifier", or the module).

        hook = exemplar.LastLayer(model)           # transformers: finds "classifier", output "logits"
        train = hook.collect(train_loader)        # LastLayerData
        hook.weight, hook.bias                    # (C, D), (C,) or None
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, output=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (output is None or callable(output) or isinstance(output, (str, int))) or isinstance(output, bool):
            raise TypeError(f"output must be None, a key, an index or a callable, got {output!r}")
        self.model = model
        self.output = output
        names = {module: name for name, module in model.named_modules()}
        self._found = layer is None  # found by us, so check on the first batch that it is the last
        if layer is None:
            linears = [m for m in names if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"model {type(model).__name__} has no nn.Linear: exemplar explains "
                                 "classifiers whose last layer is linear; pass layer= if it is wrapped")
            layer = linears[-1]
        layer = submodule(model, names, layer, "layer")
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer {names[layer]!r} is {type(layer).__name__}, not nn.Linear: "
                             "the explained layer must be linear")
        self.layer: nn.Linear = layer
        self.name = names[layer]

    @property
    def weight(self) -> torch.Tensor:
        """(C, D), detached."""
        return self.layer.weight.detach()

    @property
    def bias(self) -> torch.Tensor | None:
        """(C,) detached, or None when the layer has no bias."""
        return None if self.layer.bias is None else self.layer.bias.detach()

    @property
    def device(self) -> torch.device:
        """The layer's (and so the collected tensors') device; batches are moved there."""
        return self.layer.weight.device

    def _select_output(self, model_output):
        """The logits within the model's output: the output itself, or the
        element named by `output` (a key, an index, or a callable)."""
        if self.output is None:
            return model_output
        if callable(self.output):
            return self.output(model_output)
        if isinstance(self.output, str) and not isinstance(model_output, Mapping):
            return getattr(model_output, self.output)
        return model_output[self.output]

    def _check_is_output(self, model_output, layer_output, args, kwargs) -> None:
        """The found layer's output must be the model's logits. A model that
        returns a dict, ModelOutput or tuple has its logits picked out here:
        the one element equal to the layer's output (the "logits" entry when
        several are). Otherwise say what the model returned and which
        argument picks the right thing."""
        if not bool(torch.isfinite(layer_output).all()):
            raise ValueError(f"the model's output contains NaN or inf (layer {self.name!r} produced "
                             "non-finite values on the first batch); check the inputs and the model")
        if self.output is None and not isinstance(model_output, torch.Tensor):
            what, items = _elements(model_output)
            match = [key for key, value in items if _same(value, layer_output)]
            if len(match) == 1 or "logits" in match:
                self.output = "logits" if "logits" in match else match[0]
                return
            raise ValueError(_no_logits_message(what, match, self.name))
        if _same(self._select_output(model_output), layer_output):
            return
        order = []
        leaves = [(n, m) for n, m in self.model.named_modules() if not list(m.children())]
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, type(mod).__name__)))
                   for n, m in leaves]
        try:
            self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        picked = "" if self.output is None else f" (output={self.output!r})"
        if order and order[-1][0] == self.name:
            raise ValueError(f"{self.name!r} is the last module to run, but the model's forward changes its "
                             f"output afterwards{picked} (a function such as softmax applied in forward), so "
                             f"the model's output is not the layer's logits. Pass layer={self.name!r} to "
                             "explain that layer's outputs as the logits anyway")
        last = f"{order[-1][1]} {order[-1][0]!r}" if order else "not a module"
        raise ValueError(f"the model's output{picked} is not the output of its last nn.Linear {self.name!r}: "
                         f"the last module to run is {last}, so the model's last layer is not "
                         "nn.Linear. Pass layer= (a name or module) to explain a linear layer anyway, "
                         f"e.g. LastLayer(model, layer={self.name!r})")

    def collect(self, loader, progress: bool | None = None, store=None, shard_rows: int = DEFAULT_SHARD_ROWS,
                overwrite: bool = False):
        """Runs the model over `loader` and returns the layer's inputs and
        outputs with the loader's labels.

        Arguments:
            loader: batches of inputs, (inputs..., labels), or dicts of keyword
                inputs with "labels", in a fixed order.
            progress: a progress line (None shows it only on a terminal).
            store: a path: write an exemplar.Store shard by shard instead
                (`shard_rows` rows each, one shard in memory). Rerun with the
                same arguments after an interrupt, it continues from the last
                complete shard without rerunning the model on the rows
                before it. The store records the digests of the model's
                parameters and buffers, of the layer and of the loader's
                order: a store another model, layer or order wrote is
                refused and left as it is.
            shard_rows: rows per shard.
            overwrite: replace a store that another model or loader wrote.

        Returns:
            A LastLayerData, or with store= the complete exemplar.Store."""
        order = _fixed_order(loader)
        if store is None:
            return join([batch for _, batch in self._batches(loader, progress)], "loader")
        writer = None
        # skip reads `writer` late on purpose: the batches it skips are decided once it exists
        for start, (x, z, y) in self._batches(loader, progress, skip=lambda: writer):  # noqa: B023
            if y is None:
                raise ValueError("a store holds training data: the loader's batches need labels")
            if writer is None:
                writer = StoreWriter(store, x.shape[1], z.shape[1], x.dtype, shard_rows, {
                    "layer": self.name, "loader": type(loader).__name__,
                    "dataset": type(getattr(loader, "dataset", None)).__name__,
                    "order": "sampler" if order is not None else "loader",
                    "order_digest": None if order is None else digest(json.dumps(list(map(int, order))))[:16],
                    "model": model_digest(self.model),
                    "layer_parameters": digest(self.weight, self.bias)[:16]}, overwrite)
                if writer.complete:
                    return writer.finish()
            n = x.shape[0]
            if start + n <= writer.rows_done:  # resuming: rows already in the store
                continue
            index = torch.arange(start, start + n) if order is None else torch.as_tensor(order[start:start + n])
            keep = max(writer.rows_done - start, 0)
            writer.add(x[keep:], z[keep:], y[keep:], index[keep:])
        if writer is None:
            raise ValueError("loader yielded no batches")
        return writer.finish()

    def _batches(self, loader, progress, skip=None):
        """Yields (first row's position, (features, logits, labels or None)) per
        batch. Once skip() returns a store writer, batches wholly before its
        rows_done are passed over without running the model."""
        captured = {}

        def hook(module, inputs, output):
            captured["x"], captured["z"] = inputs[0], output

        handle = self.layer.register_forward_hook(hook)
        bar = Progress(f"collect {self.name}", len(loader) if hasattr(loader, "__len__") else None, progress)
        start, first = 0, True
        try:
            with torch.no_grad(), eval_mode(self.model):
                for i, batch in enumerate(loader):
                    args, kwargs, y = _split_batch(batch)
                    writer = skip() if skip is not None else None
                    n = _batch_rows((*args, *kwargs.values()), y)
                    if writer is not None and n is not None and start + n <= writer.rows_done:
                        start += n
                        bar.update()
                        continue
                    args = tuple(_to(x, self.device) for x in args)
                    kwargs = {key: _to(x, self.device) for key, x in kwargs.items()}
                    out = self.model(*args, **kwargs)
                    if "x" not in captured:
                        raise ValueError(f"layer {self.name!r} did not run in the model's forward")
                    if self._found and first:
                        self._check_is_output(out, captured["z"], args, kwargs)
                    first = False
                    x, z = captured.pop("x").detach(), captured.pop("z").detach()
                    if x.dim() != 2:
                        raise ValueError(f"layer {self.name!r} saw input of shape {tuple(x.shape)}; "
                                         "exemplar explains one prediction per example, so it must "
                                         "see (batch, D)")
                    labels = None if y is None else integer_labels(y, f" in batch {i}").to(self.device)
                    yield start, (x, z, labels)
                    start += x.shape[0]
                    bar.update()
        finally:
            handle.remove()
            bar.close()


def submodule(model: nn.Module, names: dict, layer, argument: str) -> nn.Module:
    """The submodule `layer` names (a name such as "classifier", or the module itself);
    names: module -> name of the model's modules; argument: what the error calls it."""
    module = layer
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError as err:
            raise ValueError(f"{argument} {layer!r} is not a submodule of the model") from err
    if not isinstance(module, nn.Module) or module not in names:
        raise ValueError(f"{argument} must name a submodule of the model (a name or the module itself), got "
                         f"{layer!r}")
    return module


def model_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer of `model`, by name: a model
    trained further, or another model of the same shapes, gets another one."""
    return digest(*(x for name, t in model.state_dict(keep_vars=False).items() for x in (name, t)))[:16]


def _batch_rows(inputs, labels) -> int | None:
    """Rows in a batch without running the model: from its labels or first input."""
    for x in (labels, inputs[0] if inputs else None):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    return None


def _fixed_order(loader) -> list[int] | None:
    """Returned indices are positions in the loader's order, so that order must
    be the same on every pass: refuse shuffling samplers. Returns the dataset
    indices the sampler visits, or None when that is the dataset's own order
    (or the sampler does not yield indices)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", batch_sampler)
    if sampler is None:
        sampler = getattr(loader, "sampler", None)
    if sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler):
        return None
    if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
        return None
    order = list(iter(sampler))
    if order != list(iter(sampler)):
        raise ValueError(f"the loader's {type(sampler).__name__} visits the data in an order that changes from "
                         "one pass to the next (shuffle=True or a random sampler), so returned indices could "
                         "not be mapped back to examples; use DataLoader(dataset, shuffle=False) or a "
                         "sampler with a fixed order")
    try:
        return [int(i) for i in order]
    except (TypeError, ValueError):  # a sampler of batches or keys, not of indices
        return None


def _same(value, layer_output) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == layer_output.shape \
        and torch.equal(value, layer_output)


def _elements(model_output) -> tuple[str, list]:
    """(a description of a structured model output, its (key, value) pairs)."""
    if isinstance(model_output, Mapping):  # dicts and transformers' ModelOutput
        return f"a {type(model_output).__name__} with keys {list(model_output.keys())}", list(model_output.items())
    if isinstance(model_output, tuple) and hasattr(model_output, "_fields"):
        return (f"a {type(model_output).__name__} (a named tuple with fields {list(model_output._fields)})",
                list(zip(model_output._fields, model_output)))
    if isinstance(model_output, (tuple, list)):
        return f"a {type(model_output).__name__} of {len(model_output)} elements", list(enumerate(model_output))
    return f"a {type(model_output).__name__}", []


def _no_logits_message(what: str, match: list, name: str) -> str:
    if match:
        return (f"the model returns {what}, and its elements {match} all equal the output of {name!r}; "
                f"pass output= to say which holds the logits, e.g. LastLayer(model, output={match[0]!r})")
    return (f"the model returns {what}, and none of its elements is the output of {name!r} (its last "
            "nn.Linear); pass layer= naming the linear layer that makes the logits and output= naming "
            f"them (a key, index or callable), e.g. LastLayer(model, layer={name!r}, output=\"logits\")")
