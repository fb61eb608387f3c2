"""Model hooks: what a classifier's final linear layer sees and says, collected
over a DataLoader with forward hooks (eval mode, no grad, on the model's device)."""
from __future__ import annotations

import torch
from torch import nn

from .data import LastLayerData
from .progress import Progress


def _split_batch(batch):
    """(inputs tuple, labels or None): a batch is a tensor, or a tuple/list whose
    last element holds the labels and whose other elements are the model's inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return tuple(batch), None
    raise TypeError("each batch must be a tensor of inputs or a tuple (inputs..., labels), "
                    f"got {type(batch).__name__}")


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


class LastLayer:
    """Finds the classifier's final nn.Linear (or the one named or passed as
    `layer`) and collects its inputs (features) and outputs (logits).

        hook = exemplar.LastLayer(model)
        train = hook.collect(train_loader)        # LastLayerData
        hook.weight, hook.bias                    # (C, D), (C,) or None
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        names = {module: name for name, module in model.named_modules()}
        self._found = layer is None  # found by us, so check on the first batch that it is the last
        if layer is None:
            linears = [m for m in names if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"model {type(model).__name__} has no nn.Linear: exemplar explains "
                                 "classifiers whose last layer is linear; pass layer= if it is wrapped")
            layer = linears[-1]
        elif isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError as err:
                raise ValueError(f"layer {layer!r} is not a submodule of the model") from err
        if not isinstance(layer, nn.Module) or layer not in names:
            raise ValueError("layer must be a submodule of the model (a name or the module itself)")
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
        return self.layer.weight.device

    def _check_is_output(self, model_output, layer_output, inputs) -> None:
        if isinstance(model_output, torch.Tensor) and model_output.shape == layer_output.shape \
                and torch.equal(model_output, layer_output):
            return
        order = []
        leaves = [(n, m) for n, m in self.model.named_modules() if not list(m.children())]
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, type(mod).__name__)))
                   for n, m in leaves]
        try:
            self.model(*inputs)
        finally:
            for h in handles:
                h.remove()
        last = f"{order[-1][1]} {order[-1][0]!r}" if order else "not a module"
        raise ValueError(f"the model's output is not the output of its last nn.Linear {self.name!r}: "
                         f"the last module to run is {last}, so the model's last layer is not "
                         "nn.Linear. Pass layer= (a name or module) to explain a linear layer anyway")

    def collect(self, loader, progress: bool = True) -> LastLayerData:
        """Runs the model over `loader` (batches: inputs, or (inputs..., labels))
        and returns the layer's inputs and outputs with the loader's labels."""
        captured = {}

        def hook(module, inputs, output):
            captured["x"], captured["z"] = inputs[0], output

        features, logits, labels = [], [], []
        was_training = self.model.training
        self.model.eval()
        handle = self.layer.register_forward_hook(hook)
        bar = Progress(f"collect {self.name}", len(loader) if hasattr(loader, "__len__") else None, progress)
        try:
            with torch.no_grad():
                for batch in loader:
                    inputs, y = _split_batch(batch)
                    inputs = tuple(_to(x, self.device) for x in inputs)
                    out = self.model(*inputs)
                    if "x" not in captured:
                        raise ValueError(f"layer {self.name!r} did not run in the model's forward")
                    if self._found and not features:
                        self._check_is_output(out, captured["z"], inputs)
                    x, z = captured.pop("x"), captured.pop("z")
                    if x.dim() != 2:
                        raise ValueError(f"layer {self.name!r} saw input of shape {tuple(x.shape)}; "
                                         "exemplar explains one prediction per example, so it must "
                                         "see (batch, D)")
                    features.append(x.detach())
                    logits.append(z.detach())
                    if y is not None:
                        labels.append(_to(y, self.device).long())
                    bar.update()
        finally:
            handle.remove()
            bar.close()
            self.model.train(was_training)
        if not features:
            raise ValueError("loader yielded no batches")
        if labels and len(labels) != len(features):
            raise ValueError("some batches had labels and some did not")
        return LastLayerData(torch.cat(features), torch.cat(logits),
                             torch.cat(labels) if labels else None)
