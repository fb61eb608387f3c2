"""Helpers shared by the tests: random data (never zeros), operands of the
score ops with their float64 truth, opcheck cases and the documented top-k
order. Import with `from helpers import ...` (pytest puts tests/ on the path)."""
import math

import torch
from torch import nn

import exemplar
from exemplar import ops


def model_inputs(n, d=7, c=3, seed=0, shape=None):
    """(x (n, d) or (n, *shape) float64, labels (n,) in [0, c)): a model's training examples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *(shape or (d,)), generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (n,), generator=g)


def batches(x, y, size=5):
    """(x, y) in a list of (inputs, labels) batches of `size` rows, in order."""
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def make_data(n, c, d, dtype=torch.float64, seed=0, labels=True, device="cpu"):
    """Random last-layer data with logits of realistic spread; never zeros."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g) if labels else None
    features, logits = features.to(device, dtype), logits.to(device, dtype)
    return exemplar.LastLayerData(features, logits, None if y is None else y.to(device))


def make_layer_data(n, c, d, dtype=torch.float64, seed=0, labels=True):
    """(data, weight (C, D), bias (C,)): features through a random linear layer,
    so the logits are exactly what the layer outputs (RPS-LJE needs the layer)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    bias = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    logits = features @ weight.T + bias
    y = torch.randint(0, c, (n,), generator=g) if labels else None
    data = exemplar.LastLayerData(features.to(dtype), logits.to(dtype), y)
    return data, weight.to(dtype), bias.to(dtype)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def general_operands(T, N, C, Dp, dtype=torch.float64, seed=0):
    return (randn(T, C, Dp, dtype=dtype, seed=seed), randn(N, C, dtype=dtype, seed=seed + 1),
            randn(N, Dp, dtype=dtype, seed=seed + 2),
            randn(N, dtype=dtype, seed=seed + 3).abs() + 0.1)


def rank1_operands(T, N, C, Dp, dtype=torch.float64, seed=0):
    return (randn(T, C, dtype=dtype, seed=seed), randn(T, Dp, dtype=dtype, seed=seed + 4),
            *general_operands(T, N, C, Dp, dtype, seed)[1:])


def rank_m_operands(T, N, C, Dp, dtype=torch.float64, seed=0, m=3):
    return (randn(T, m, C, dtype=dtype, seed=seed), randn(T, m, Dp, dtype=dtype, seed=seed + 4),
            *general_operands(T, N, C, Dp, dtype, seed)[1:])


def rank_m_truth(a, b, R, Phi, inv):
    a, b, R, Phi, inv = (x.double() for x in (a, b, R, Phi, inv))
    return torch.einsum("tjc,ic,tjd,id->ti", a, R, b, Phi) * inv


def general_truth(S, R, Phi, inv):
    return torch.einsum("tcd,ic,id->ti", S.double(), R.double(), Phi.double()) * inv.double()


def rank1_truth(a, b, R, Phi, inv):
    a, b, R, Phi, inv = (x.double() for x in (a, b, R, Phi, inv))
    return (a @ R.T) * (b @ Phi.T) * inv


# Sizes that cross the CPU's train tiles and 1024-row test blocks, plus the
# degenerate N=1, on both general-path scorers (csrc/tiles.h): the gradient
# tile (C*Dp = 5130 -> 817 rows; many tests on a narrow head, 4096 rows) and
# the Phi GEMM for few tests on a wide head (C+Dp = 523 -> 4096 rows).
GENERAL_SIZES = [(1, 1, 2, 1), (3, 1700, 10, 513), (2, 4500, 10, 513), (1100, 70, 3, 5), (1100, 4200, 2, 3)]
RANK1_SIZES = [(1, 1, 2, 1), (5, 4500, 10, 513), (1030, 33, 2, 3)]


# path -> (operands, float64 truth, dense op, top-k op, sizes)
# A rank-m test side goes through the rank-1 ops with alpha (T, m, C).
RANK_M_SIZES = [(1, 1, 2, 1), (7, 4500, 10, 513), (1100, 33, 2, 3)]
PATHS = {
    "general": (general_operands, general_truth, ops.scores, ops.topk, GENERAL_SIZES),
    "rank1": (rank1_operands, rank1_truth, ops.scores_rank1, ops.topk_rank1, RANK1_SIZES),
    "rank_m": (rank_m_operands, rank_m_truth, ops.scores_rank1, ops.topk_rank1, RANK_M_SIZES),
}
PATH_SIZES = [(path, size) for path, spec in PATHS.items() for size in spec[4]]


def check_topk_near(values, indices, truth, k, largest, tol=1e-4):
    """values/indices on any device against float64 (T, N) truth on the CPU, to a
    relative tolerance; an index may differ from the truth's only at a near-tie."""
    values, indices = values.cpu().double(), indices.cpu()
    want = torch.topk(truth, k, dim=1, largest=largest).values
    scale = truth.abs().max()
    assert float((values - want).abs().max() / scale) <= tol
    assert float((torch.gather(truth, 1, indices) - values).abs().max() / scale) <= tol
    assert all(len(set(row.tolist())) == k for row in indices)
    # A returned index can differ from the float64 top-k only at a near-tie.
    kth = want[:, -1:]
    outside = ~torch.isin(indices, torch.topk(truth, k, dim=1, largest=largest).indices)
    assert bool(((torch.gather(truth, 1, indices) - kth).abs()[outside] <= tol * scale).all())


def opcheck_cases(device="cpu"):
    f64 = dict(dtype=torch.float64)
    data = make_data(19, 3, 4, device=device, seed=12)
    phi = torch.cat([data.features, torch.ones(19, 1, device=device, **f64)], 1)
    QA = torch.linalg.qr(randn(5, 5, seed=1))[0].to(device)
    QG = torch.linalg.qr(randn(3, 3, seed=2))[0].to(device)
    w = (randn(3, 5, seed=3).abs() + 0.1).to(device)
    S, R, Phi, inv = (x.to(device) for x in general_operands(4, 19, 3, 5, seed=4))
    a, b = (x.to(device) for x in rank1_operands(4, 19, 3, 5, seed=4)[:2])
    a3, b3 = (x.to(device) for x in rank_m_operands(4, 19, 3, 5, seed=4)[:2])
    hinv = torch.eye(15, device=device, **f64)
    ex = torch.ops.exemplar
    return [
        (ex.residuals, (data.logits, data.labels)),
        (ex.kfac_factors, (phi, data.logits)),
        (ex.ekfac_eigenvalues, (phi, data.logits, QA, QG)),
        (ex.exact_hessian, (phi, data.logits)),
        (ex.eigenbasis_norms, (R, Phi, QG, QA, w)),
        (ex.dense_norms, (R, Phi, hinv)),
        (ex.cholesky_norms, (R, Phi, hinv)),  # the identity is its own Cholesky factor
        (ex.cholesky_quad_norms, (R, Phi, hinv)),
        (ex.scores, (S, R, Phi, inv)),
        (ex.scores_rank1, (a, b, R, Phi, inv)),
        (ex.topk, (S, R, Phi, inv, 3, True)),
        (ex.topk, (S, R, Phi, inv, 19, False)),
        (ex.topk_rank1, (a, b, R, Phi, inv, 2, True)),
        (ex.streamed_topk, (S, R, Phi, inv, 3, True)),
        (ex.streamed_topk_rank1, (a, b, R, Phi, inv, 19, False)),
        (ex.scores_rank1, (a3, b3, R, Phi, inv)),
        (ex.topk_rank1, (a3, b3, R, Phi, inv, 4, True)),
        (ex.screened_topk, (S, R, Phi, inv, 3, True)),
        (ex.screened_topk, (S.float(), R.float(), Phi.float(), inv.float(), 19, False)),
        (ex.screened_topk_rank1, (a, b, R, Phi, inv, 2, True)),
        (ex.screened_topk_rank1, (a3, b3, R, Phi, inv, 4, False)),
    ]


def policy_order(scores, largest):
    """The documented order: better score first, NaN after every number, ties
    (and NaNs) by ascending index."""
    def key(i):
        v = scores[i]
        return (math.isnan(v), 0.0 if math.isnan(v) else (-v if largest else v), i)
    return sorted(range(len(scores)), key=key)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b (T, k) training indices, distinct per row -> the fraction of a's
    entries that b's row also holds."""
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum()) / a.numel()


def tiny_model():
    """A seeded 4-6-3 ReLU MLP (float32)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def tensor_dataset(n=40, seed=0):
    """n random (x (4,), label in [0, 3)) examples."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
