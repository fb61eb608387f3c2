"""Whole-network capture (docs/design.md §11): the per-example gradient of
every chosen nn.Linear / nn.Conv2d layer, from one forward pass and one
gradient pass per batch.

A layer's weight [W | b] is an (out, in') matrix (a convolution's kernel
flattened to out x (in_channels kh kw), in' = in + 1 with a bias); for one
example it sees inputs a_p and receives output gradients delta_p at P
positions (one for a vector input, tokens for a sequence, pixels for an
image), and its per-example gradient is sum_p delta_p a~_p^T.

The unit attributed is a parameter, not a module: modules sharing one weight
(tied weights, or one module called several times) are one Layer whose
positions are all their calls', so its gradient is the sum over the uses,
the shared parameter's true gradient; each trainable bias among them is a
column of its own (1 in its module's calls, 0 in the others'). Only
trainable parameters (requires_grad) are attributed: a frozen bias has no
column, a frozen weight no input columns. With a
projection (P_out (k_out, out), P_in (k_in, in')) it is kept as
sum_p (P_out delta_p)(P_in a~_p)^T (LoGra's Kronecker-factored projection).
A layer that sees one position per example keeps the factors
(delta~, a~) exactly as the last layer keeps (r, phi); one that sees several
keeps the dense (k_out, k_in) sum."""
from __future__ import annotations

import math
import warnings
import zlib

import torch
from torch import nn
from torch.nn import functional as F

from ..data import integer_labels
from .hooks import _batch_rows, _split_batch, _to, eval_mode, submodule

SUPPORTED = (nn.Linear, nn.Conv2d)
# The two-logit form of a single-logit (sigmoid) classifier: softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)], so
# cross-entropy over it is binary cross-entropy with label 1 the positive class.
TWO_LOGITS = "output=lambda z: torch.cat([torch.zeros_like(z), z], 1)"


def _projection(k: int | None, dim: int, seed: int, dtype) -> torch.Tensor | None:
    """A (k, dim) Gaussian projection scaled by 1/sqrt(k) (inner products kept in
    expectation), seeded; None (the side kept exact) when k is None or k >= dim."""
    if k is None or k >= dim:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, dim, generator=g, dtype=torch.float64) / math.sqrt(k)).to(dtype)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside wrappers that run it unchanged: nn.DataParallel and
    DistributedDataParallel (.module) and torch.compile's OptimizedModule
    (._orig_mod), whose layers' outputs inside the compiled graph autograd
    could not reach from the loss. The parameters are the same tensors."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_dtype(model: nn.Module) -> torch.dtype:
    """The dtype gradients are captured, stored and scored in: the model's,
    at least float32 (a float16 / bfloat16 model's are promoted after its
    own forward and backward, which run in its dtype)."""
    return torch.promote_types(next(iter(model.parameters())).dtype, torch.float32)


def _trainable(p) -> bool:
    return p is not None and p.requires_grad


class Layer:
    """One attributed weight: the modules using it (one, or several tied) and the
    trainable parameters among theirs, with the projections of its sides.

    Attributes:
        name: the first module's name; modules: the modules sharing the weight.
        parameters: the attributed parameters' names (the weight when it
            trains, then each trainable bias), in column order.
        out_dim, in_dim: the sides of [W | b...] (in_dim counts the bias columns).
        p_out, p_in: (k_out, out_dim), (k_in, in_dim) projections, or None (exact).
        k_out, k_in: the kept sides' sizes.
        factored: True when every example gave one position (the factors
            are kept), False for several (the dense sum); None before the
            first batch."""

    def __init__(self, modules: list[nn.Module], names: dict, parameter_names: dict, projection: int | None,
                 seed: int, dtype: torch.dtype):
        first = modules[0]
        name = names[first]
        for m in modules:
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise ValueError(f"layer {names[m]!r}: Conv2d with groups={m.groups}, padding_mode="
                                 f"{m.padding_mode!r}, padding={m.padding!r} is not supported (groups=1, "
                                 "zero padding given as integers); leave it out with layers=")
        if isinstance(first, nn.Conv2d):
            out_dim, fan_in = first.out_channels, first.in_channels * math.prod(first.kernel_size)
        else:
            out_dim, fan_in = first.out_features, first.in_features
        self.name, self.modules, self.kind, self.dtype = name, modules, type(first).__name__, dtype
        self.weight = _trainable(first.weight)
        biases = list({id(m.bias): m.bias for m in modules if _trainable(m.bias)}.values())
        self.bias_column = {m: next((j for j, b in enumerate(biases) if b is m.bias), None) for m in modules}
        self.fan_in = fan_in if self.weight else 0
        self.parameters = ([parameter_names[first.weight]] if self.weight else []) + \
            [parameter_names[b] for b in biases]
        self.out_dim, self.in_dim = out_dim, self.fan_in + len(biases)
        # Each side's seed is fixed by the layer's name, so a layer's projection does not depend on the others.
        base = seed * 1_000_003 + zlib.crc32(name.encode())
        self.p_out = _projection(projection, self.out_dim, 2 * base, dtype)
        self.p_in = _projection(projection, self.in_dim, 2 * base + 1, dtype)
        self.k_out = self.out_dim if self.p_out is None else self.p_out.shape[0]
        self.k_in = self.in_dim if self.p_in is None else self.p_in.shape[0]
        self.factored: bool | None = None
        self.standard = self.parameters == [f"{name}.weight"] + ([f"{name}.bias"] if first.bias is not None else [])

    @property
    def width(self) -> int:
        """Entries of one example's (projected) gradient, k_out k_in."""
        return self.k_out * self.k_in

    def inputs(self, module: nn.Module, x: torch.Tensor, positions: int) -> torch.Tensor:
        """(B, P, k_in): what one call of `module` saw at each of its P positions:
        the input columns (when the weight trains) and the bias columns, projected."""
        parts = []
        if self.weight:
            if isinstance(module, nn.Conv2d):
                parts.append(F.unfold(x, module.kernel_size, module.dilation, module.padding,
                                      module.stride).transpose(1, 2))
            else:
                parts.append(x.reshape(x.shape[0], -1, x.shape[-1]))
        if self.in_dim > self.fan_in:
            bias_columns = x.new_zeros(x.shape[0], positions, self.in_dim - self.fan_in)
            if self.bias_column[module] is not None:
                bias_columns[:, :, self.bias_column[module]] = 1
            parts.append(bias_columns)
        a = torch.cat(parts, 2).to(self.dtype)
        return a if self.p_in is None else a @ self.p_in.T

    def output_gradients(self, g: torch.Tensor) -> torch.Tensor:
        """(B, P, k_out): the gradient at one call's output at each position, projected."""
        if self.kind == "Conv2d":
            d = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
        else:
            d = g.reshape(g.shape[0], -1, g.shape[-1])
        d = d.to(self.dtype)
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
        out = {"name": self.name, "kind": self.kind, "out": self.out_dim, "in": self.in_dim,
               "k_out": self.k_out, "k_in": self.k_in}
        if not self.standard:  # tied, frozen or bias-only: say which parameters
            out["parameters"] = self.parameters
        return out


def choose_layers(model: nn.Module, layers, projection: int | None, seed: int) -> list[Layer]:
    """The attributed layers: every nn.Linear / nn.Conv2d with a trainable
    parameter (layers=None), or those named (names or modules), in the
    model's order; modules sharing a weight are one Layer, whichever of them
    is named. Warns about attributed parameters that a module of another
    kind also uses (their gradient through it is not attributed)."""
    names = {module: name for name, module in model.named_modules()}
    parameter_names = {p: name for name, p in model.named_parameters()}
    groups: dict[int, list[nn.Module]] = {}
    for m in names:
        if isinstance(m, SUPPORTED):
            groups.setdefault(id(m.weight), []).append(m)
    trains = lambda group: any(_trainable(p) for m in group for p in (m.weight, m.bias))  # noqa: E731
    if layers is None:
        chosen = [g for g in groups.values() if trains(g)]
        if not chosen:
            raise ValueError(f"model {type(model).__name__} has no nn.Linear or nn.Conv2d with a trainable "
                             "parameter to attribute through")
    else:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        chosen, named = [], []
        for layer in layers:
            module = submodule(model, names, layer, "layers:")
            if not isinstance(module, SUPPORTED):
                raise ValueError(f"layers: {names[module]!r} is {type(module).__name__}; exemplar attributes "
                                 "through nn.Linear and nn.Conv2d layers")
            group = groups[id(module.weight)]
            if not trains(group):
                raise ValueError(f"layers: {names[module]!r} is frozen (no parameter with requires_grad)")
            named.append(module)
            if group not in chosen:
                chosen.append(group)
        if not chosen or len(set(named)) != len(named):
            raise ValueError("layers must name at least one layer, each once")
        chosen.sort(key=lambda g: list(names).index(g[0]))
    _check_shared_biases(chosen, names)
    out = [Layer(g, names, parameter_names, projection, seed, capture_dtype(model)) for g in chosen]
    _warn_about_other_uses(model, out, parameter_names)
    return out


def _check_shared_biases(groups: list[list[nn.Module]], names: dict) -> None:
    """Refuses a trainable bias shared by modules that do not share their weight."""
    owner = {}
    for group in groups:
        for m in group:
            if _trainable(m.bias) and owner.setdefault(id(m.bias), group) is not group:
                raise ValueError(f"layer {names[m]!r} shares its bias with {names[owner[id(m.bias)][0]]!r} but not "
                                 "its weight: exemplar attributes a bias with the weight it is used with; leave one "
                                 "of them out with layers=")


def _warn_about_other_uses(model: nn.Module, layers: list[Layer], parameter_names: dict) -> None:
    """Warns when an attributed parameter is also a parameter of a module outside its Layer."""
    attributed = {name: layer for layer in layers for name in layer.parameters}
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            layer = attributed.get(parameter_names.get(p))
            if layer is not None and module not in layer.modules:
                warnings.warn(f"parameter {parameter_names[p]!r} is also used by {module_name!r} "
                              f"({type(module).__name__}), which exemplar does not attribute through: the scores "
                              f"hold its gradient through layer {layer.name!r} only",
                              stacklevel=4)  # choose_layers <- NetworkExplainer <- its caller


class Capture:
    """Runs the model (in eval mode, every module's mode restored after) on
    batches with hooks on the layers' modules and returns each layer's
    per-example (projected) gradients of the per-example loss
    -log softmax(logits)_y, for one or more label choices per batch."""

    def __init__(self, model: nn.Module, layers: list[Layer], output=None):
        self.model, self.layers, self.output = model, layers, output
        self.device = next(iter(model.parameters())).device

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
        if logits.shape[1] == 1:
            raise ValueError("the model has a single logit (C = 1): exemplar explains C >= 2 class scores under "
                             "cross-entropy; for a sigmoid (binary cross-entropy) classifier pass the two-logit "
                             f"form, which gives the same loss and gradients, with label 1 the positive class: "
                             f"{TWO_LOGITS}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"the model's logits contain NaN or inf in batch {index}")
        labels = None if y is None else integer_labels(y, f" in batch {index}").to(self.device)
        if labels is not None and (labels.shape != logits.shape[:1] or int(labels.max()) >= logits.shape[1]
                                   or int(labels.min()) < 0):
            raise ValueError(f"labels in batch {index} must be ({logits.shape[0]},) class indices in [0, C = "
                             f"{logits.shape[1]}), got shape {tuple(labels.shape)}, range [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return logits, labels

    def forward(self, batch, index: int):
        """Runs one batch with the hooks: (logits, labels or None, per layer name
        the list of its modules' calls (module, input (B, P, k_in) or None when
        no gradient reaches the call's output, output)). Every attributed
        layer's input must lead with the batch's rows."""
        args, kwargs, y = _split_batch(batch)
        rows = _batch_rows((*args, *kwargs.values()), y)
        calls = {layer.name: [] for layer in self.layers}

        def hook(layer, module, args, output):
            x = args[0]
            if rows is not None and (x.dim() < 2 or x.shape[0] != rows or output.shape[0] != rows):
                raise ValueError(f"layer {layer.name!r} saw input of shape {tuple(x.shape)} in a batch of {rows} "
                                 f"examples: its rows are not the batch's examples (a time-major layer such as "
                                 "nn.TransformerEncoderLayer with batch_first=False, rows routed to experts, or "
                                 "pairs stacked into 2B rows), so per-example gradients cannot be told apart; "
                                 "every attributed layer's input must lead with the batch (B, ...): use "
                                 "batch_first=True, or leave the layer out with layers=")
            a = layer.inputs(module, x.detach(), output[0].numel() // layer.out_dim) if output.requires_grad else None
            calls[layer.name].append((module, a, output))

        handles = [m.register_forward_hook(lambda m, a, o, layer=layer: hook(layer, m, a, o))
                   for layer in self.layers for m in layer.modules]
        try:
            with torch.enable_grad(), eval_mode(self.model):
                logits, labels = self.logits(batch, index)
        finally:
            for h in handles:
                h.remove()
        return logits, labels, calls

    def gradients(self, logits, labels, calls, choose_labels, index: int):
        """The backward half of run(), on forward()'s graph. Returns (per label
        choice (its labels, its weights, per layer (delta (B, P, k_out),
        a (B, P, k_in))), the names of the layers autograd finds no path to
        from the loss: their delta is zero)."""
        live = {name: [(a, o) for _, a, o in c if a is not None] for name, c in calls.items()}
        missing = [layer.name for layer in self.layers if not live[layer.name]]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the model's forward pass (or no gradient "
                             "reaches its output)")
        finite = torch.stack([torch.isfinite(a).all() for layer in self.layers for a, _ in live[layer.name]])
        if not bool(finite.all()):  # one host sync a batch; finite logits do not mean finite inputs (tanh(inf) = 1)
            bad = next(layer.name for layer in self.layers if not all(bool(torch.isfinite(a).all())
                                                                      for a, _ in live[layer.name]))
            raise ValueError(f"layer {bad!r} saw NaN or inf in its input in batch {index}")
        choices = choose_labels(logits.detach(), labels)
        outputs = [o for layer in self.layers for _, o in live[layer.name]]
        per_choice, unreached = [], set()
        for j, (chosen, weights) in enumerate(choices):
            loss = F.cross_entropy(logits, chosen, reduction="sum")
            grads = iter(torch.autograd.grad(loss, outputs, retain_graph=j + 1 < len(choices), allow_unused=True))
            captured = []
            for layer in self.layers:
                g = [next(grads) for _ in live[layer.name]]
                if all(x is None for x in g):
                    unreached.add(layer.name)
                d = [layer.output_gradients(torch.zeros_like(o) if x is None else x.detach())
                     for (_, o), x in zip(live[layer.name], g)]
                captured.append((torch.cat(d, 1), torch.cat([a for a, _ in live[layer.name]], 1)))
            per_choice.append((chosen, weights, captured))
        return per_choice, [layer.name for layer in self.layers if layer.name in unreached]

    def run(self, batch, index: int, choose_labels):
        """Runs one batch. choose_labels(logits, labels) -> the label choices, a
        list of (labels (B,), weights (B,) or None). Returns (logits, labels or
        None, per choice (its labels, its weights, a list over the layers of
        (delta (B, P, k_out), a (B, P, k_in)))), detached; P counts the
        positions of every call of the layer's modules."""
        logits, labels, calls = self.forward(batch, index)
        return logits.detach(), labels, self.gradients(logits, labels, calls, choose_labels, index)[0]
