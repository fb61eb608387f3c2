"""k nearest neighbours on the last layer's features."""
from __future__ import annotations

import torch

from ..ops import Query, Rank1, TrainOperands
from .base import Method, register


@register
class Knn(Method):
    """-|f_t - f_i|^2 on the raw features = [2 f_t, -1] . [f_i, |f_i|^2] - |f_t|^2:
    a rank-1 dot product plus a per-test offset."""
    name = "knn"
    family = "distance"
    needs_head = True

    def operands(self, ctx, rows):
        f = rows.features
        phi = torch.cat([f, f.square().sum(1, keepdim=True)], 1)
        return TrainOperands(torch.ones_like(f[:, :1]), phi, torch.ones_like(f[:, 0]))

    def query(self, ctx, test):
        f = test.features
        ones = torch.ones_like(f[:, :1])
        return Query(Rank1(ones, torch.cat([2 * f, -ones], 1)), -f.square().sum(1))

    def self_influence(self, ctx, rows):
        return torch.zeros_like(rows.features[:, 0])
