"""The identity curvature: no fit, H_lambda^-1 = I / lambda."""
from __future__ import annotations

import torch

from ..ops import Rank1
from .base import Curvature, Statistics, cast_inverse, gradient_sq_norms, register


@register
class Identity(Curvature):
    """H_lambda^-1 = I / lambda, or I when lambda = 0 (plain gradient dot products)."""
    name = "identity"

    def __init__(self, scale):
        self.scale = scale  # 0-dim tensor

    @staticmethod
    def _scale(damping: float) -> torch.Tensor:
        """1 / damping (1 at damping 0), float64."""
        return torch.tensor(1.0 / damping if damping > 0 else 1.0, dtype=torch.float64)

    @classmethod
    def fit(cls, data: Statistics, settings):
        return cls(cast_inverse(cls._scale(settings.damping), data.dtype, settings.damping).to(data.device))

    @classmethod
    def fit_layers(cls, data, settings):
        return [cls(cls._scale(settings.damping)) for _ in data.shapes]

    @staticmethod
    def shapes(C, Dp):
        return {"scale": ()}

    def precondition(self, r, phi):
        return Rank1(r * self.scale, phi)

    def solve(self, V):
        return V.double() * self.scale.double()

    def norms(self, R, Phi, N=None):
        sq = gradient_sq_norms(R, Phi)
        scale = self.scale.double()
        return (sq * scale**2).to(R.dtype), (sq * scale).to(R.dtype)
