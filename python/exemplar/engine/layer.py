"""The trained layer an Attributor is given (weight and bias), checked
against the training set it claims to have produced."""
from __future__ import annotations

import contextlib

import torch

from .passes import Passes


def theta_from_layer(weight, bias, passes: Passes) -> torch.Tensor | None:
    """theta = [W | b] (C, Dp) float64, or None without a weight; refuses a
    layer whose shapes, device or values do not match the first block's logits."""
    vector = bias if isinstance(bias, torch.Tensor) else None
    if weight is None:
        if vector is not None:
            raise ValueError("bias is a tensor but weight is None: pass the layer's weight (C, D) too")
        return None
    train = passes.train
    C, D = train.num_classes, train.num_features
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C, D):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a tensor of shape (C, D) = ({C}, {D}), got {got}")
    if weight.device != train.device:
        raise ValueError(f"weight is on {weight.device} but train is on {train.device}")
    if bias is True and vector is None:
        raise ValueError("bias=True with a weight: pass the layer's bias vector (C,) as bias=")
    if vector is not None and (vector.dim() != 1 or vector.shape[0] != C):
        raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(vector.shape)}")
    weight = weight.detach()
    theta = weight.double() if vector is None else torch.cat([weight.double(),
                                                              vector.detach().double().view(C, 1)], 1)
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("weight and bias must be finite")
    # The first block is enough to catch a wrong layer; the pass is closed at
    # once, so no store reader is left prefetching in the background.
    with contextlib.closing(passes.rows([0], None, reuse=False)) as first:
        rows = next(first)
    err = float((rows.phi.double() @ theta.T - rows.logits.double()).abs().max())
    scale = 1.0 + float(rows.logits.abs().max())
    tol = 1e-3 * scale  # catches a wrong layer, not float32 rounding of logits cast to float64
    if err > tol:
        raise ValueError(f"weight and bias do not reproduce train.logits: max |phi W^T + b - logits| "
                         f"= {err:.3g} > {tol:.3g}; pass the layer that produced the logits")
    return theta
