"""Exact curvature at the speed limit: the Cholesky path against the
eigendecomposition and reference.py, the residual basis, and the cost
estimate that refuses a head too large before anything is allocated."""
import pytest
import torch

import exemplar
from exemplar import curvature as curv
from exemplar.testing import reference as ref
from helpers import make_data, topk_overlap


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
    H = exemplar.ops.exact_hessian(attr.prepare("if").phi.double(), train.logits.double()).cpu()
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


# both ways to the norms: triangular solves, and the inverse once N > 4 (C-1) Dp
@pytest.mark.parametrize("N", [7, 400])
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
    monkeypatch.setattr(curv.exact, "available_bytes", lambda device: 8 * 10**9)
    train = make_data(30, 10, 1600, dtype=torch.float32, seed=1)  # C*Dp = 16010: 8.2 GB of matrices
    with pytest.raises(MemoryError, match=r"C\*Dp = 16010 needs about 8\.2 GB .* more than the 8\.0 GB available "
                                          r"on cpu, and about \d+ s to fit \(\+\d+ s for RelatIF normalisers\) "
                                          r"at N = 30; use curvature='ekfac'"):
        exemplar.Attributor(train, curvature="exact")
    assert curv.exact_cost(10, 1501, 30)["bytes"] < 8e9 < curv.exact_cost(10, 1601, 30)["bytes"]


# ---------------------------------------------------------------- low rank


def test_low_rank_at_full_rank_is_the_eigenbasis():
    train, test = make_data(80, 5, 7, seed=6), make_data(6, 5, 7, seed=7, labels=False)
    full = exemplar.Attributor(train, curvature="ekfac", damping=0.05)
    low = exemplar.Attributor(train, curvature="ekfac", damping=0.05, rank=5)
    assert isinstance(low.curvature, curv.LowRankEigenbasis)
    for method in ("if", "theta_relatif", "l_relatif"):
        torch.testing.assert_close(low.scores(test, method), full.scores(test, method), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(low.self_influence(method), full.self_influence(method), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("rank", [1, 2, "auto"])
def test_low_rank_scores_are_the_general_path_on_its_truncated_weights(rank):
    """Rank m through the rank-1 ops = the general path with W_m = u^T v: values
    and top-k (the approximation is only W -> W_m, never the scoring)."""
    train, test = make_data(90, 6, 8, seed=8), make_data(5, 6, 8, seed=9, labels=False)
    low = exemplar.Attributor(train, curvature="kfac", damping=0.05, rank=rank)
    c = low.curvature
    general = curv.Eigenbasis(c.qg, c.qa, c.u.T @ c.v)
    r, phi = exemplar.methods.test_residuals(low.context, test)
    S = general.precondition(r, phi).S
    train_side = low.prepare("if")
    want = exemplar.ops.scores(S, train_side.r, train_side.phi, train_side.inv_norm)
    torch.testing.assert_close(low.scores(test, "if"), want, rtol=1e-10, atol=1e-12)
    values, indices = low.topk(test, 7, "if")
    assert torch.equal(indices, torch.topk(want, 7, dim=1).indices)
    torch.testing.assert_close(values, want.gather(1, indices), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(low.total_scores(test, "if"), want.sum(0), rtol=1e-10, atol=1e-12)


def test_rank_auto_is_the_smallest_rank_within_the_tolerance():
    train = make_data(120, 8, 10, seed=10)
    w = exemplar.Attributor(train, curvature="ekfac", damping=0.01).curvature.w
    m = exemplar.Attributor(train, curvature="ekfac", damping=0.01, rank="auto").curvature.u.shape[0]
    S = torch.linalg.svdvals(w)
    tail = lambda j: float(S[j:].square().sum().sqrt())  # noqa: E731  |W - W_j|_F
    assert tail(m) <= curv.LOW_RANK_TOL * float(S.square().sum().sqrt()) < tail(m - 1)


@pytest.mark.parametrize("settings, message", [
    (dict(curvature="exact", rank=2), "rank applies to curvature='kfac' or 'ekfac'"),
    (dict(curvature="kfac", kfac_damping="factored", rank=2), "kfac_damping='eigenbasis'"),
    (dict(curvature="kfac", rank=0), r"rank must be None, 'auto' or an integer >= 1, got 0"),
    (dict(curvature="kfac", rank="yes"), r"rank must be None, 'auto' or an integer >= 1, got 'yes'"),
])
def test_rank_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        exemplar.Attributor(make_data(20, 3, 4, seed=1), **settings)


def test_low_rank_state_round_trip_and_a_mismatched_factor():
    train, test = make_data(60, 4, 5, seed=11), make_data(3, 4, 5, seed=12, labels=False)
    attr = exemplar.Attributor(train, curvature="ekfac", rank=2)
    tensors, config = attr.state_dict()
    assert torch.equal(exemplar.Attributor.from_state(tensors, config).scores(test), attr.scores(test))
    tensors["curvature.v"] = tensors["curvature.v"][:1]
    with pytest.raises(ValueError, match=r"curvature.v must have shape \(2, 6\)"):
        exemplar.Attributor.from_state(tensors, config)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_auto_keeps_the_general_paths_top10(seed):
    """The default tolerance keeps >= 0.99 of the full eigenbasis' top-10 (ReLU
    features through a random 10-class head; bench/large_head.py measures
    0.995 at C = 1000, D = 2048)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(3050, 64, generator=g, dtype=torch.float64))
    logits = features @ (torch.randn(10, 64, generator=g, dtype=torch.float64) / 8).T
    train = exemplar.LastLayerData(features[:3000], logits[:3000], logits[:3000].argmax(1))
    test = exemplar.LastLayerData(features[3000:], logits[3000:])
    full = exemplar.Attributor(train, curvature="ekfac", damping=1e-3)
    low = exemplar.Attributor(train, curvature="ekfac", damping=1e-3, rank="auto")
    assert low.curvature.u.shape[0] < 10
    for method in ("if", "theta_relatif"):
        want, got = full.topk(test, 10, method)[1], low.topk(test, 10, method)[1]
        kept = topk_overlap(want, got)
        assert kept >= 0.99, (method, kept)
