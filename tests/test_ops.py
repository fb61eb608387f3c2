"""The ops one by one: against float64 formulas and reference.py, tiling edge
cases, top-k against dense, and torch.library.opcheck for every op."""
import pytest
import torch

from exemplar import ops
from exemplar import reference as ref

from conftest import make_data


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def general_operands(T, N, C, Dp, dtype=torch.float64, seed=0):
    return (randn(T, C, Dp, dtype=dtype, seed=seed), randn(N, C, dtype=dtype, seed=seed + 1),
            randn(N, Dp, dtype=dtype, seed=seed + 2),
            randn(N, dtype=dtype, seed=seed + 3).abs() + 0.1)


def rank1_operands(T, N, C, Dp, dtype=torch.float64, seed=0):
    return (randn(T, C, dtype=dtype, seed=seed), randn(T, Dp, dtype=dtype, seed=seed + 4),
            *general_operands(T, N, C, Dp, dtype, seed)[1:])


def general_truth(S, R, Phi, inv):
    return torch.einsum("tcd,ic,id->ti", S.double(), R.double(), Phi.double()) * inv.double()


def rank1_truth(a, b, R, Phi, inv):
    a, b, R, Phi, inv = (x.double() for x in (a, b, R, Phi, inv))
    return (a @ R.T) * (b @ Phi.T) * inv


# Sizes that cross train tiles (C*Dp = 5130 -> 204 rows, C+Dp = 523 -> 2004
# rows) and the 1024-row test blocks, plus the degenerate N=1.
GENERAL_SIZES = [(1, 1, 2, 1), (3, 500, 10, 513), (1100, 70, 3, 5)]
RANK1_SIZES = [(1, 1, 2, 1), (5, 4500, 10, 513), (1030, 33, 2, 3)]


# path -> (operands, float64 truth, dense op, top-k op, sizes)
PATHS = {
    "general": (general_operands, general_truth, ops.scores, ops.topk, GENERAL_SIZES),
    "rank1": (rank1_operands, rank1_truth, ops.scores_rank1, ops.topk_rank1, RANK1_SIZES),
}
PATH_SIZES = [(path, size) for path, spec in PATHS.items() for size in spec[4]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path,size", PATH_SIZES, ids=str)
def test_dense_scores(path, size, dtype):
    make, truth, dense, _, _ = PATHS[path]
    args = make(*size, dtype=dtype)
    got, want = dense(*args), truth(*args)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got.double() - want).abs().max() / want.abs().max()) <= tol


def check_topk(dense, values, indices, k, largest):
    assert values.shape == indices.shape == (dense.shape[0], k)
    assert indices.dtype == torch.int64
    assert torch.equal(values, torch.topk(dense, k, dim=1, largest=largest).values)
    assert torch.equal(torch.gather(dense, 1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("path,size", PATH_SIZES, ids=str)
def test_topk_matches_dense(path, size, largest):
    make, _, dense_op, topk_op, _ = PATHS[path]
    N = size[1]
    args = make(*size, dtype=torch.float32, seed=3)
    dense = dense_op(*args)
    for k in sorted({1, min(7, N), N}):
        check_topk(dense, *topk_op(*args, k, largest), k, largest)


def test_topk_ties_prefer_lower_index():
    R = torch.ones(6, 1, dtype=torch.float64)
    Phi = torch.ones(6, 1, dtype=torch.float64)
    a = torch.ones(2, 1, dtype=torch.float64)
    values, indices = ops.topk_rank1(a, a, R, Phi, torch.ones(6, dtype=torch.float64), 3, True)
    assert indices.tolist() == [[0, 1, 2], [0, 1, 2]] and bool((values == 1).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_residuals_and_curvature_statistics(dtype):
    data = make_data(45, 4, 6, dtype=dtype, seed=11)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    phi = ref.augment(data.features, True).to(dtype)
    R = ops.residuals(data.logits, data.labels)
    want_R = torch.softmax(data.logits.double(), 1) - torch.nn.functional.one_hot(data.labels, 4)
    assert R.dtype == dtype and float((R.double() - want_R).abs().max()) <= tol
    A, G = ops.kfac_factors(phi, data.logits)
    want_A, want_G = ref.kfac_factors(data.features, data.logits, True)
    assert A.dtype == G.dtype == torch.float64  # statistics accumulate in float64
    assert float((A - want_A).abs().max()) <= tol and float((G - want_G).abs().max()) <= tol
    H = ops.exact_hessian(phi, data.logits)
    assert float((H - ref.exact_hessian(data.features, data.logits, True)).abs().max()) <= tol
    _, QA = torch.linalg.eigh(want_A)
    _, QG = torch.linalg.eigh(want_G)
    lam = ops.ekfac_eigenvalues(phi, data.logits, QA, QG)
    lams = ref.output_hessians(data.logits)
    want_lam = sum(torch.outer(torch.diag(QG.T @ L @ QG), (QA.T @ f) ** 2)
                   for L, f in zip(lams, phi.double())) / 45
    assert float((lam - want_lam).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_norm_ops(dtype):
    N, C, Dp = 33, 3, 5
    R, Phi = randn(N, C, dtype=dtype, seed=1), randn(N, Dp, dtype=dtype, seed=2)
    QG = torch.linalg.qr(randn(C, C, seed=3))[0]
    QA = torch.linalg.qr(randn(Dp, Dp, seed=4))[0]
    w = randn(C, Dp, seed=5).abs() + 0.1
    K = torch.kron(QG, QA)
    Hinv = K @ torch.diag(w.reshape(-1)) @ K.T
    g = (R.double().unsqueeze(2) * Phi.double().unsqueeze(1)).reshape(N, -1)
    want_sq, want_quad = (g @ Hinv).square().sum(1), ((g @ Hinv) * g).sum(1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for sq, quad in (ops.eigenbasis_norms(R, Phi, QG, QA, w), ops.dense_norms(R, Phi, Hinv)):
        assert sq.dtype == dtype
        assert float(((sq.double() - want_sq) / want_sq).abs().max()) <= tol
        assert float(((quad.double() - want_quad) / want_quad).abs().max()) <= tol


def opcheck_cases(device="cpu"):
    f64 = dict(dtype=torch.float64)
    data = make_data(19, 3, 4, device=device, seed=12)
    phi = torch.cat([data.features, torch.ones(19, 1, device=device, **f64)], 1)
    QA = torch.linalg.qr(randn(5, 5, seed=1))[0].to(device)
    QG = torch.linalg.qr(randn(3, 3, seed=2))[0].to(device)
    w = (randn(3, 5, seed=3).abs() + 0.1).to(device)
    S, R, Phi, inv = (x.to(device) for x in general_operands(4, 19, 3, 5, seed=4))
    a, b = (x.to(device) for x in rank1_operands(4, 19, 3, 5, seed=4)[:2])
    hinv = torch.eye(15, device=device, **f64)
    ex = torch.ops.exemplar
    return [
        (ex.residuals, (data.logits, data.labels)),
        (ex.kfac_factors, (phi, data.logits)),
        (ex.ekfac_eigenvalues, (phi, data.logits, QA, QG)),
        (ex.exact_hessian, (phi, data.logits)),
        (ex.eigenbasis_norms, (R, Phi, QG, QA, w)),
        (ex.dense_norms, (R, Phi, hinv)),
        (ex.scores, (S, R, Phi, inv)),
        (ex.scores_rank1, (a, b, R, Phi, inv)),
        (ex.topk, (S, R, Phi, inv, 3, True)),
        (ex.topk, (S, R, Phi, inv, 19, False)),
        (ex.topk_rank1, (a, b, R, Phi, inv, 2, True)),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_topk_under_torch_compile():
    S, R, Phi, inv = general_operands(3, 40, 2, 4, seed=7)
    compiled = torch.compile(lambda *a: ops.topk(*a, 5, True), fullgraph=True, backend="eager")
    values, indices = compiled(S, R, Phi, inv)
    want = ops.topk(S, R, Phi, inv, 5, True)
    assert torch.equal(values, want[0]) and torch.equal(indices, want[1])
