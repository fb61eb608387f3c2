"""Whole-network capture (docs/design.md §11): the per-example gradient of
every chosen nn.Linear / nn.Conv2d layer, from one forward pass and one
gradient pass per batch.

A layer's weight [W | b] is an (out, in') matrix (a convolution's kernel
flattened to out x (in_channels kh kw), in' = in + 1 with a bias); for one
example it sees inputs a_p and receives output gradients delta_p at P
positions (one for a vector input, tokens for a sequence, pixels for an
image), and its per-example gradient is sum_p delta_p a~_p^T. With a
projection (P_out (k_out, out), P_in (k_in, in')) it is kept as
sum_p (P_out delta_p)(P_in a~_p)^T (LoGra's Kronecker-factored projection).
A layer that sees one position per example keeps the factors
(delta~, a~) exactly as the last layer keeps (r, phi); one that sees several
keeps the dense (k_out, k_in) sum."""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.nn import functional as F

from ..data import integer_labels
from .hooks import _batch_rows, _split_batch, _to, submodule

SUPPORTED = (nn.Linear, nn.Conv2d)
# Modules whose training-mode output for one example depends on the rest of
# the batch (BatchNorm's batch statistics) or on chance (dropout): a
# per-example gradient taken under batching would then be wrong.
BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _projection(k: int | None, dim: int, seed: int, dtype) -> torch.Tensor | None:
    """A (k, dim) Gaussian projection scaled by 1/sqrt(k) (inner products kept in
    expectation), seeded; None (the side kept exact) when k is None or k >= dim."""
    if k is None or k >= dim:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, dim, generator=g, dtype=torch.float64) / math.sqrt(k)).to(dtype)


class Layer:
    """One attributed layer: its name, module and the projections of its sides.

    Attributes:
        out_dim, in_dim: the sides of [W | b] (in_dim counts the bias column).
        p_out, p_in: (k_out, out_dim), (k_in, in_dim) projections, or None (exact).
        k_out, k_in: the kept sides' sizes.
        factored: True when every example gave one position (the factors
            are kept), False for several (the dense sum); None before the
            first batch."""

    def __init__(self, name: str, module: nn.Module, projection: int | None, seed: int, dtype: torch.dtype):
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"layer {name!r}: Conv2d with groups={module.groups}, padding_mode="
                                 f"{module.padding_mode!r}, padding={module.padding!r} is not supported (groups=1, "
                                 "zero padding given as integers); leave it out with layers=")
            out_dim, fan_in = module.out_channels, module.in_channels * math.prod(module.kernel_size)
        else:
            out_dim, fan_in = module.out_features, module.in_features
        self.name, self.module = name, module
        self.bias = module.bias is not None
        self.out_dim, self.in_dim = out_dim, fan_in + self.bias
        # Each side's seed is fixed by the layer's name, so a layer's projection does not depend on the others.
        base = seed * 1_000_003 + zlib.crc32(name.encode())
        self.p_out = _projection(projection, self.out_dim, 2 * base, dtype)
        self.p_in = _projection(projection, self.in_dim, 2 * base + 1, dtype)
        self.k_out = self.out_dim if self.p_out is None else self.p_out.shape[0]
        self.k_in = self.in_dim if self.p_in is None else self.p_in.shape[0]
        self.factored: bool | None = None

    @property
    def width(self) -> int:
        """Entries of one example's (projected) gradient, k_out k_in."""
        return self.k_out * self.k_in

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, k_in): the layer's input at each position, with the bias column, projected."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            a = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
        return a if self.p_in is None else a @ self.p_in.T

    def output_gradients(self, g: torch.Tensor) -> torch.Tensor:
        """(B, P, k_out): the gradient at the layer's output at each position, projected."""
        if isinstance(self.module, nn.Conv2d):
            d = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
        else:
            d = g.reshape(g.shape[0], -1, g.shape[-1])
        return d if self.p_out is None else d @ self.p_out.T

    def gradient(self, d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One example block's gradients: (delta (B, k_out), a (B, k_in)) when
        factored, else ((B, k_out, k_in) = sum_p delta_p a_p^T,)."""
        positions = a.shape[1]
        if self.factored is None:
            self.factored = positions == 1
        elif self.factored != (positions == 1):
            raise ValueError(f"layer {self.name!r} saw {positions} positions per example in this batch and "
                             f"{'one' if self.factored else 'several'} before: every batch must have the same shape")
        if self.factored:
            return d[:, 0], a[:, 0]
        return (d.transpose(1, 2) @ a,)

    def describe(self) -> dict:
        """What the layer's gradients are, for fingerprints and messages."""
        return {"name": self.name, "kind": type(self.module).__name__, "out": self.out_dim, "in": self.in_dim,
                "k_out": self.k_out, "k_in": self.k_in}


def choose_layers(model: nn.Module, layers, projection: int | None, seed: int) -> list[Layer]:
    """The attributed layers: every nn.Linear / nn.Conv2d whose weight is trained
    (layers=None), or those named (names or modules), in the model's order."""
    names = {module: name for name, module in model.named_modules()}
    if layers is None:
        chosen = [m for m in names if isinstance(m, SUPPORTED) and m.weight.requires_grad]
        if not chosen:
            raise ValueError(f"model {type(model).__name__} has no trainable nn.Linear or nn.Conv2d to attribute "
                             "through")
    else:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        chosen = []
        for layer in layers:
            module = submodule(model, names, layer, "layers:")
            if not isinstance(module, SUPPORTED):
                raise ValueError(f"layers: {names[module]!r} is {type(module).__name__}; exemplar attributes "
                                 "through nn.Linear and nn.Conv2d layers")
            if not module.weight.requires_grad:
                raise ValueError(f"layers: {names[module]!r} is frozen (weight.requires_grad is False)")
            chosen.append(module)
        if not chosen or len(set(chosen)) != len(chosen):
            raise ValueError("layers must name at least one layer, each once")
        chosen.sort(key=list(names).index)
    if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int) or projection < 1):
        raise ValueError(f"projection must be None (exact gradients) or an integer >= 1, got {projection!r}")
    dtype = next(iter(model.parameters())).dtype
    return [Layer(names[m], m, projection, seed, dtype) for m in chosen]


class Capture:
    """Runs the model on batches with hooks on the layers and returns each
    layer's per-example (projected) gradients of the per-example loss
    -log softmax(logits)_y, for one or more label choices per batch."""

    def __init__(self, model: nn.Module, layers: list[Layer], output=None):
        self.model, self.layers, self.output = model, layers, output
        self.device = next(iter(model.parameters())).device

    def check_model(self) -> None:
        """Refuses modules whose per-example gradients batching would break."""
        coupled = [name for name, m in self.model.named_modules() if isinstance(m, BATCH_COUPLED) and m.training]
        if coupled:
            raise ValueError(f"the model's {coupled[0]!r} ({type(self.model.get_submodule(coupled[0])).__name__}) "
                             "is in training mode: its output for one example then depends on the rest of the "
                             "batch or on chance, so per-example gradients would be wrong; call model.eval()")

    def logits(self, batch, index: int):
        """(logits (B, C), labels (B,) or None) of one batch, run through the model, checked."""
        args, kwargs, y = _split_batch(batch)
        if _batch_rows((*args, *kwargs.values()), y) == 0:
            raise ValueError(f"batch {index} has no rows")
        args = tuple(_to(x, self.device) for x in args)
        kwargs = {key: _to(x, self.device) for key, x in kwargs.items()}
        out = self.model(*args, **kwargs)
        logits = out if self.output is None else self.output(out)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError("the model's output must be logits (B, C) (pass output=, a callable that picks them "
                             f"from the model's output), got {type(logits).__name__}"
                             + (f" of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""))
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"the model's logits contain NaN or inf in batch {index}")
        labels = None if y is None else integer_labels(y, f" in batch {index}").to(self.device)
        if labels is not None and (labels.shape != logits.shape[:1] or int(labels.max()) >= logits.shape[1]
                                   or int(labels.min()) < 0):
            raise ValueError(f"labels in batch {index} must be ({logits.shape[0]},) class indices in [0, C = "
                             f"{logits.shape[1]}), got shape {tuple(labels.shape)}, range [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return logits, labels

    def run(self, batch, index: int, choose_labels):
        """Runs one batch. choose_labels(logits, labels) -> the label choices, a
        list of (labels (B,), weights (B,) or None). Returns (logits, labels or
        None, per choice (its labels, its weights, a list over the layers of
        (delta (B, P, k_out), a (B, P, k_in)))), detached."""
        inputs, outputs = {}, {}

        def hook(layer, args, output):
            if layer.name in outputs:
                raise ValueError(f"layer {layer.name!r} runs more than once per forward pass (shared weights); "
                                 "leave it out with layers=")
            inputs[layer.name], outputs[layer.name] = layer.inputs(args[0].detach()), output

        handles = [layer.module.register_forward_hook(lambda m, a, o, layer=layer: hook(layer, a, o))
                   for layer in self.layers]
        try:
            with torch.enable_grad():
                logits, labels = self.logits(batch, index)
        finally:
            for h in handles:
                h.remove()
        missing = [layer.name for layer in self.layers if layer.name not in outputs]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the model's forward pass")
        choices = choose_labels(logits.detach(), labels)
        tensors = [outputs[layer.name] for layer in self.layers]
        per_choice = []
        for j, (chosen, weights) in enumerate(choices):
            loss = F.cross_entropy(logits, chosen, reduction="sum")
            grads = torch.autograd.grad(loss, tensors, retain_graph=j + 1 < len(choices), allow_unused=True)
            per_choice.append((chosen, weights, [
                (layer.output_gradients(torch.zeros_like(t) if g is None else g.detach()), inputs[layer.name])
                for layer, t, g in zip(self.layers, tensors, grads)]))
        return logits.detach(), labels, per_choice
