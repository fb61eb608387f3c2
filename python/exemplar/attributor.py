"""Attributor: scores, top-k and self-influence of training examples for a
classifier's last layer (DESIGN.md §4). Every method reduces to the fused score
op on the factored training gradients (R, Phi) with a per-example normaliser,
computed once per Attributor."""
from __future__ import annotations

import math
from functools import cached_property

import torch

from . import curvature as curv
from . import ops
from .data import LastLayerData

METHODS = ("if", "theta_relatif", "l_relatif", "grad_dot", "grad_cos")
CURVATURES = ("exact", "kfac", "ekfac", "identity")
KFAC_DAMPINGS = ("eigenbasis", "factored")


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    # A zero-gradient example (a perfectly fit one) scores 0 under every method.
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


class Attributor:
    """Explains test predictions by training examples.

    train: LastLayerData with labels. curvature: "exact" | "kfac" | "ekfac" |
    "identity". damping: lambda >= 0 added to the curvature (for "exact" and
    weight decay lambda this is the Hessian of the regularised objective).
    bias: the layer has a bias, so a constant-1 feature is appended.
    kfac_damping: "eigenbasis" adds lambda to the K-FAC eigenvalues;
    "factored" damps each factor (rank-1 fast path)."""

    def __init__(self, train: LastLayerData, curvature: str = "kfac", damping: float = 1e-3,
                 bias: bool = True, kfac_damping: str = "eigenbasis"):
        if not isinstance(train, LastLayerData):
            raise TypeError(f"train must be a LastLayerData, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train is empty: the training set needs at least one example (N >= 1)")
        if train.labels is None:
            raise ValueError("train.labels is None: training examples need their labels")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if kfac_damping not in KFAC_DAMPINGS:
            raise ValueError(f"kfac_damping must be one of {KFAC_DAMPINGS}, got {kfac_damping!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        self.train = train
        self.bias = bias
        self.curvature_name = curvature
        self.damping = float(damping)
        self.phi = self._augment(train.features)  # (N, Dp)
        self.r = ops.residuals(train.logits, train.labels)  # (N, C)
        self.curvature = curv.build(curvature, self.damping, kfac_damping, self.phi, train.logits)

    # ---------------------------------------------------------------- helpers

    def _augment(self, features: torch.Tensor) -> torch.Tensor:
        if not self.bias:
            return features.contiguous()
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
        return torch.cat([features, ones], dim=1)

    @property
    def num_train(self) -> int:
        return len(self.train)

    @cached_property
    def _curvature_norms(self):
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (N,): one pass, on first use."""
        return self.curvature.norms(self.r, self.phi)

    @cached_property
    def _grad_sq_norms(self) -> torch.Tensor:
        return self.r.square().sum(1) * self.phi.square().sum(1)

    def _inv_norm(self, method: str) -> torch.Tensor:
        if method in ("if", "grad_dot"):
            return torch.ones_like(self._grad_sq_norms)
        if method == "theta_relatif":
            return _safe_reciprocal(self._curvature_norms[0].sqrt())
        if method == "l_relatif":
            return _safe_reciprocal(self._curvature_norms[1].clamp_min(0).sqrt())
        return _safe_reciprocal(self._grad_sq_norms.sqrt())  # grad_cos

    def _check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def _test_operands(self, test: LastLayerData, method: str):
        self._check_method(method)
        if not isinstance(test, LastLayerData):
            raise TypeError(f"test must be a LastLayerData, got {type(test).__name__}")
        D = self.train.features.shape[1]
        if test.features.shape[1] != D:
            raise ValueError(f"test.features must have shape (T, D) with D={D} like train.features, "
                             f"got {tuple(test.features.shape)}")
        if test.num_classes != self.train.num_classes:
            raise ValueError(f"test.logits must have C={self.train.num_classes} classes like "
                             f"train.logits, got {tuple(test.logits.shape)}")
        if test.features.dtype != self.phi.dtype:
            raise TypeError(f"test dtype {test.features.dtype} differs from train dtype {self.phi.dtype}")
        if test.features.device != self.phi.device:
            raise ValueError(f"test is on {test.features.device} but train is on {self.phi.device}")
        r = ops.residuals(test.logits, test.explained_labels())
        phi = self._augment(test.features)
        if method == "grad_dot":
            return curv.Rank1(r, phi)
        if method == "grad_cos":
            scale = _safe_reciprocal((r.square().sum(1) * phi.square().sum(1)).sqrt())
            return curv.Rank1(r * scale.unsqueeze(1), phi)
        return self.curvature.precondition(r, phi)

    # ---------------------------------------------------------------- API

    def scores(self, test: LastLayerData, method: str = "if") -> torch.Tensor:
        """(T, N): score(t, i) of every training example for every test example.
        Positive = helpful (up-weighting i lowers the test loss)."""
        pre = self._test_operands(test, method)
        inv = self._inv_norm(method)
        if isinstance(pre, curv.Rank1):
            return ops.scores_rank1(pre.alpha, pre.beta, self.r, self.phi, inv)
        return ops.scores(pre.S, self.r, self.phi, inv)

    def topk(self, test: LastLayerData, k: int, method: str = "if", largest: bool = True):
        """(values, indices), each (T, k), best first: the k most helpful training
        examples per test example, or with largest=False the k most harmful
        (opponents). Never builds the (T, N) matrix."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise ValueError(f"k must be an integer in [1, N] = [1, {self.num_train}], got {k!r}")
        pre = self._test_operands(test, method)
        inv = self._inv_norm(method)
        if isinstance(pre, curv.Rank1):
            return ops.topk_rank1(pre.alpha, pre.beta, self.r, self.phi, inv, k, largest)
        return ops.topk(pre.S, self.r, self.phi, inv, k, largest)

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,): score(i, i) of each training example on itself under its own
        label; large values flag examples the model finds hard or mislabelled."""
        self._check_method(method)
        if method in ("grad_dot", "grad_cos"):
            return self._grad_sq_norms * self._inv_norm(method).square()
        return self._curvature_norms[1] * self._inv_norm(method)
