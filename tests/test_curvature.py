"""Exact curvature at the speed limit: the Cholesky path against the
eigendecomposition and reference.py, the residual basis, and the cost
estimate that refuses a head too large before anything is allocated."""
import pytest
import torch

import exemplar
from exemplar import curvature as curv
from exemplar import reference as ref

from helpers import make_data


@pytest.mark.parametrize("C", [2, 3, 10])
def test_residual_basis_is_orthonormal_and_orthogonal_to_ones(C):
    E = curv.residual_basis(C)
    assert E.shape == (C, C - 1) and E.dtype == torch.float64
    torch.testing.assert_close(E.T @ E, torch.eye(C - 1, dtype=torch.float64), rtol=0, atol=1e-15)
    assert float((torch.ones(C, dtype=torch.float64) @ E).abs().max()) <= 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cholesky_path_agrees_with_the_eigendecomposition(dtype, device):
    train = make_data(57, 4, 6, dtype=dtype, seed=3, device=device)
    test = make_data(5, 4, 6, dtype=dtype, seed=4, labels=False, device=device)
    attr = exemplar.Attributor(train, curvature="exact", damping=0.02)
    assert isinstance(attr.curvature, curv.ExactCholesky)
    # The same Attributor with the explicit inverse, as files saved before the Cholesky path hold it.
    tensors, config = attr.state_dict()
    H = exemplar.ops.exact_hessian(attr.phi.double(), train.logits.double()).cpu()
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    hinv = curv.project_out_null(torch.linalg.inv(H + 0.02 * eye), 4, 7).to(dtype).to(device)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("curvature.", "cache."))}
    explicit = exemplar.Attributor.from_state({**tensors, "curvature.hinv": hinv}, dict(config, curvature_kind="Exact"))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for method in ("if", "theta_relatif", "l_relatif"):
        want = explicit.scores(test, method)
        got = attr.scores(test, method)
        assert float((got - want).abs().max() / want.abs().max()) <= tol, method
        torch.testing.assert_close(attr.self_influence(method), explicit.self_influence(method), rtol=tol, atol=0)


@pytest.mark.parametrize("N", [7, 400])  # both ways to the norms: triangular solves, and the inverse once N > 4 (C-1) Dp
def test_both_norm_paths_match_reference(N):
    train = make_data(N, 3, 4, seed=5)
    attr = exemplar.Attributor(train, curvature="exact", damping=0.05)
    kw = dict(curvature="exact", damping=0.05, bias=True)
    for method in ("theta_relatif", "l_relatif"):
        want = ref.self_influence(train.features, train.logits, train.labels, method, **kw)
        torch.testing.assert_close(attr.self_influence(method), want, rtol=1e-9, atol=0)


def test_exact_cost_counts_blocks_factorisation_and_norms():
    cost = curv.exact_cost(C=10, Dp=513, N=10_000)
    n = 10 * 513
    assert cost["bytes"] == curv.EXACT_MATRICES * 8 * n * n
    assert cost["fit_s"] == pytest.approx((10_000 * 513**2 * 10 * 11 + n**3 / 3) / curv.EXACT_GFLOPS / 1e9)
    assert cost["norms_s"] > cost["fit_s"] > 0


def test_a_head_too_large_is_refused_with_its_cost_and_the_alternative(monkeypatch):
    monkeypatch.setattr(curv, "available_bytes", lambda device: 8 * 10**9)
    train = make_data(30, 10, 1600, dtype=torch.float32, seed=1)  # C*Dp = 16010: 8.2 GB of matrices
    with pytest.raises(MemoryError, match=r"C\*Dp = 16010 needs about 8\.2 GB .* more than the 8\.0 GB available "
                                          r"on cpu, and about \d+ s to fit \(\+\d+ s for RelatIF normalisers\) "
                                          r"at N = 30; use curvature='ekfac'"):
        exemplar.Attributor(train, curvature="exact")
    assert curv.exact_cost(10, 1501, 30)["bytes"] < 8e9 < curv.exact_cost(10, 1601, 30)["bytes"]
