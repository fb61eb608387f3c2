"""The ops one by one, on every device (the `device` fixture: CPU, and CUDA
when present): against float64 formulas and reference.py, tiling edge cases,
top-k against dense, and torch.library.opcheck for every op."""
import pytest
import torch

from exemplar import ops
from exemplar.testing import reference as ref
from helpers import PATH_SIZES, PATHS, check_topk_near, general_operands, make_data, opcheck_cases, randn

# Relative tolerance against float64 truth. The CUDA float32 kernels sum in a
# different order than the CPU's BLAS, so they get the looser bound.
TOL = {("cpu", torch.float64): 1e-12, ("cpu", torch.float32): 1e-5,
       ("cuda", torch.float64): 1e-12, ("cuda", torch.float32): 1e-4}


def on(device, *tensors):
    return [t.to(device) for t in tensors]



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path,size", PATH_SIZES, ids=str)
def test_dense_scores(path, size, dtype, device):
    make, truth, dense, _, _ = PATHS[path]
    args = make(*size, dtype=dtype)
    got, want = dense(*on(device, *args)), truth(*args)
    assert got.device.type == device and got.dtype == dtype
    assert float((got.double().cpu() - want).abs().max() / want.abs().max()) <= TOL[device, dtype]


def check_topk(dense, values, indices, k, largest):
    assert values.shape == indices.shape == (dense.shape[0], k)
    assert indices.dtype == torch.int64
    assert torch.equal(values, torch.topk(dense, k, dim=1, largest=largest).values)
    assert torch.equal(torch.gather(dense, 1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("path,size", PATH_SIZES, ids=str)
def test_topk_matches_dense(path, size, largest, device, kernel):
    if path == "rank_m" and kernel == "fused":
        pytest.skip("the fused kernel is rank 1")
    make, truth_of, dense_op, topk_op, _ = PATHS[path]
    N = size[1]
    args = make(*size, dtype=torch.float32, seed=3)
    dense = dense_op(*on(device, *args))
    for k in sorted({1, min(7, N), N}):
        values, indices = topk_op(*on(device, *args), k, largest, kernel=kernel)
        if kernel != "fused":  # the dense op and the top-k share tiles: bit-identical
            check_topk(dense, values, indices, k, largest)
        else:
            check_topk_near(values, indices, truth_of(*args), k, largest)


def test_topk_ties_prefer_lower_index(device):
    R = torch.ones(6, 1, dtype=torch.float64, device=device)
    Phi = torch.ones(6, 1, dtype=torch.float64, device=device)
    a = torch.ones(2, 1, dtype=torch.float64, device=device)
    values, indices = ops.topk_rank1(a, a, R, Phi, torch.ones(6, dtype=torch.float64, device=device), 3, True)
    assert indices.tolist() == [[0, 1, 2], [0, 1, 2]] and bool((values == 1).all())


@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_residuals_and_curvature_statistics(dtype, C, device):
    data = make_data(45, C, 6, dtype=dtype, seed=11)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    phi = ref.augment(data.features, True).to(dtype)
    phi_d, logits_d, labels_d = on(device, phi, data.logits, data.labels)
    R = ops.residuals(logits_d, labels_d).cpu()
    want_R = torch.softmax(data.logits.double(), 1) - torch.nn.functional.one_hot(data.labels, C)
    assert R.dtype == dtype and float((R.double() - want_R).abs().max()) <= tol
    A, G = (x.cpu() for x in ops.kfac_factors(phi_d, logits_d))
    want_A, want_G = ref.kfac_factors(data.features, data.logits, True)
    assert A.dtype == G.dtype == torch.float64  # statistics accumulate in float64
    assert float((A - want_A).abs().max()) <= tol and float((G - want_G).abs().max()) <= tol
    H = ops.exact_hessian(phi_d, logits_d).cpu()
    assert float((H - ref.exact_hessian(data.features, data.logits, True)).abs().max()) <= tol
    _, QA = torch.linalg.eigh(want_A)
    _, QG = torch.linalg.eigh(want_G)
    lam = ops.ekfac_eigenvalues(phi_d, logits_d, *on(device, QA, QG)).cpu()
    lams = ref.output_hessians(data.logits)
    want_lam = sum(torch.outer(torch.diag(QG.T @ L @ QG), (QA.T @ f) ** 2)
                   for L, f in zip(lams, phi.double())) / 45
    assert float((lam - want_lam).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_norm_ops(dtype, device):
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
    chol = torch.linalg.cholesky(torch.linalg.inv(Hinv))  # H = chol chol^T
    R, Phi, QG, QA, w, Hinv, chol = on(device, R, Phi, QG, QA, w, Hinv, chol)
    quad_alone = ops.cholesky_quad_norms(R, Phi, chol)
    assert quad_alone.dtype == dtype and quad_alone.device.type == device
    assert float(((quad_alone.cpu().double() - want_quad) / want_quad).abs().max()) <= tol
    for sq, quad in (ops.eigenbasis_norms(R, Phi, QG, QA, w), ops.dense_norms(R, Phi, Hinv),
                     ops.cholesky_norms(R, Phi, chol)):
        assert sq.dtype == dtype and sq.device.type == device
        sq, quad = sq.cpu(), quad.cpu()
        assert float(((sq.double() - want_sq) / want_sq).abs().max()) <= tol
        assert float(((quad.double() - want_quad) / want_quad).abs().max()) <= tol


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case, device):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def test_topk_under_torch_compile(device):
    S, R, Phi, inv = on(device, *general_operands(3, 40, 2, 4, seed=7))
    compiled = torch.compile(lambda *a: ops.topk(*a, 5, True), fullgraph=True, backend="eager")
    values, indices = compiled(S, R, Phi, inv)
    want = ops.topk(S, R, Phi, inv, 5, True)
    assert torch.equal(values, want[0]) and torch.equal(indices, want[1])
