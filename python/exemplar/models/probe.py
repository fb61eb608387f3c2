"""The first training batch, run before anything is collected (docs/design.md
§11): which chosen layers a gradient reaches, and whether each example's
gradients are its own. Hooks see a batch, so a per-example gradient taken
from them is right only when an example's output does not depend on the
other examples in its batch (no batch statistics, no batch mean, no
attention across the batch), nor on chance (dropout that eval() does not
switch off), and every layer's rows are the batch's examples. One check
catches all of these: the batch whole and in two halves must give each
example the same logits and, at every layer, the same inputs and output
gradients (to the square root of the dtype's epsilon). It costs one more
pass over the first batch, forward and backward."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .hooks import _batch_rows, _split_batch
from .layers import Capture


def rows_of(batch, start: int, stop: int, rows: int):
    """The batch's examples [start, stop): every tensor in it whose leading
    dimension is the batch's `rows`, and every list of `rows` values, sliced;
    everything else as it is."""
    def cut(x):  # a tensor, or a list of per-example values (labels, texts), of the batch's rows
        per_example = x.dim() > 0 and x.shape[0] == rows if isinstance(x, torch.Tensor) else \
            isinstance(x, list) and len(x) == rows
        return x[start:stop] if per_example else x
    if isinstance(batch, Mapping):
        return {key: cut(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(x) for x in batch)
    return cut(batch)


def probe(capture: Capture, loader, explicit: bool) -> tuple[Capture, str | None]:
    """Runs the loader's first batch through the capture's layers: layers no
    gradient reaches are refused when named (explicit) or left out; then the
    per-example check. Returns the Capture of the layers kept and what was
    left out and why (None: nothing), for the caller to warn."""
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("train_loader yielded no batches")
    args, kwargs, y = _split_batch(batch)
    if y is None:
        raise ValueError("train_loader must yield (inputs..., labels): batch 0 has no labels")
    rows = _batch_rows((*args, *kwargs.values()), y)
    logits, labels, calls = capture.forward(batch, 0)
    silent = {layer.name: "did not run in the model's forward pass: it never ran as a module (its weight is "
                          "used inside another module's forward, as nn.MultiheadAttention uses out_proj's)"
              if not calls[layer.name] else
              "receives no gradient (it runs under torch.no_grad() or its output is detached)"
              for layer in capture.layers if all(a is None for _, a, _ in calls[layer.name])}
    live = Capture(capture.model, [layer for layer in capture.layers if layer.name not in silent], capture.output)
    empirical = lambda logits, labels: [(labels, None)]  # noqa: E731
    captured, unreached = [], []
    if live.layers:
        [(_, _, captured)], unreached = live.gradients(logits, labels, calls, empirical, 0)
    silent.update({name: "receives no gradient: autograd finds no path from the loss to its output (an output "
                         "the loss does not use, or a layer inside a torch.compile'd submodule, whose inner "
                         "outputs autograd cannot reach: pass the model uncompiled)" for name in unreached})
    if silent and explicit:
        name, why = next(iter(silent.items()))
        raise ValueError(f"layer {name!r} {why}; leave it out of layers=")
    kept = [(layer, c) for layer, c in zip(live.layers, captured) if layer.name not in silent]
    if not kept:
        raise ValueError("no chosen layer receives a gradient in the model's forward pass: " + "; ".join(
            f"{name!r} {why}" for name, why in silent.items()))
    left_out = None if not silent else "left out of the attributed layers: " + "; ".join(
        f"{name!r} {why}" for name, why in silent.items()) + ": their parameters are not attributed"
    capture = Capture(capture.model, [layer for layer, _ in kept], capture.output)
    whole = (logits.detach(), [c for _, c in kept])
    if rows > 1:
        halves = [capture.run(rows_of(batch, a, b, rows), 0, empirical) for a, b in ((0, rows // 2),
                                                                                    (rows // 2, rows))]
        split = (torch.cat([h[0] for h in halves]),
                 [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*(h[2][0][2] for h in halves))])
    else:
        split = _again(capture, batch, empirical)
    names = [layer.name for layer in capture.layers]
    tolerance = torch.finfo(next(iter(capture.model.parameters())).dtype).eps ** 0.5  # the model's own rounding
    worst = _difference(whole, split, names, tolerance)
    if worst is not None:
        changing = _difference(whole, _again(capture, batch, empirical), names, tolerance)
        if changing is not None:
            raise ValueError(f"the model's output changes from one run to the next on the same batch ({changing}): "
                             "it draws random numbers that eval() does not switch off (F.dropout(..., "
                             "training=True), scaled_dot_product_attention(dropout_p > 0), noise), so no "
                             "per-example gradient is reproducible; make the forward deterministic in eval mode")
        raise ValueError(f"the model's output for an example depends on the other examples in its batch (batch 0 "
                         f"whole and in two halves: {worst}): batch statistics, a batch mean or attention across "
                         "the batch make per-example gradients taken under batching wrong; compute such "
                         "statistics from each example alone, or over fixed buffers")
    return capture, left_out


def _again(capture: Capture, batch, empirical):
    logits, _, [(_, _, captured)] = capture.run(batch, 0, empirical)
    return logits, captured


def _difference(first, second, names: list[str], tolerance: float) -> str | None:
    """What differs between two runs' (logits, per layer (delta, a)) by more
    than `tolerance` relative, in words; None when nothing does."""
    (z1, layers1), (z2, layers2) = first, second
    pairs = [("the logits", z1, z2)] + [
        (f"layer {name!r}'s {what}", x1, x2) for name, l1, l2 in zip(names, layers1, layers2)
        for what, x1, x2 in (("output gradients", l1[0], l2[0]), ("inputs", l1[1], l2[1]))]
    for what, x1, x2 in pairs:
        if x1.shape != x2.shape:
            return f"{what} have shapes {tuple(x1.shape)} and {tuple(x2.shape)}"
        scale = float(x1.double().norm())
        gap = float((x1.double() - x2.double()).norm())
        if not gap <= tolerance * scale + torch.finfo(x1.dtype).tiny:
            return f"{what} differ by {gap / max(scale, torch.finfo(torch.float64).tiny):.2g} relative"
    return None
