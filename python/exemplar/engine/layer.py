"""What an Attributor is given beside its training set, checked against
it: the trained layer (weight and bias) and the test sets it is asked about."""
from __future__ import annotations

import contextlib

import torch

from ..data import LastLayerData, as_last_layer_data, check_magnitude, largest_sq_norm
from ..storage import TrainingSet
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


def check_test(test, train: TrainingSet) -> LastLayerData:
    """test (a LastLayerData or a DataLoader of (features, logits[, labels])
    batches) as one LastLayerData, checked against the training set: D, C,
    dtype, device and magnitude; the error names what differs."""
    test = as_last_layer_data(test)
    D = train.num_features
    if test.features.shape[1] != D:
        raise ValueError(f"test.features must have shape (T, D) with D={D} like train.features, "
                         f"got {tuple(test.features.shape)}")
    if test.num_classes != train.num_classes:
        raise ValueError(f"test.logits must have C={train.num_classes} classes like "
                         f"train.logits, got {tuple(test.logits.shape)}")
    if test.features.dtype != train.dtype:
        raise TypeError(f"test dtype {test.features.dtype} differs from train dtype {train.dtype}")
    if test.features.device != train.device:
        raise ValueError(f"test is on {test.features.device} but train is on {train.device}")
    check_magnitude("test.features", largest_sq_norm(test.features), test.features.dtype,
                    "pass float64 features or rescale them")
    return test
