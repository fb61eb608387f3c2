"""precision="bf16" | "auto" top-k (exemplar::screened_topk, csrc/screen.h):
the answers equal precision="exact"'s (random data, near-ties at the cut, wide
dynamic range, the whole exponent range of float32 and float64, D up to
4,097, N = 1, k = N, both paths), the screen prunes, operands the bound is not
for take the exact path, bad input gets the op's message, and "auto" screens
only where it was measured faster."""
import pytest
import torch

import exemplar
from exemplar import ops
from exemplar.ops import precision as precisions
from exemplar.testing import reference as ref
from helpers import check_topk_near, make_data


def operands(T, N, C, Dp, m=None, dtype=torch.float64, seed=0, spread=0.0):
    """Random S (T, C, Dp) or (alpha (T[, m], C), beta (T[, m], Dp)), R, Phi, inv_norm;
    m=0 is rank 1; spread > 0 scales training rows by 10^U(-spread, spread)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    R, Phi = randn(N, C), randn(N, Dp)
    if spread:
        Phi = Phi * 10 ** ((torch.rand(N, 1, generator=g, dtype=dtype) * 2 - 1) * spread)
    inv_norm = torch.rand(N, generator=g, dtype=dtype) + 0.1
    if m is None:
        left = (randn(T, C, Dp),)
    elif m == 0:
        left = (randn(T, C), randn(T, Dp))
    else:
        left = (randn(T, m, C), randn(T, m, Dp))
    return left, R, Phi, inv_norm


def truth(left, R, Phi, inv_norm):
    """float64 scores from the definition."""
    R, Phi, inv = R.double(), Phi.double(), inv_norm.double()
    if len(left) == 1:
        return torch.einsum("tcd,nc,nd->tn", left[0].double(), R, Phi) * inv
    alpha, beta = (x.double() for x in left)
    if alpha.dim() == 2:
        alpha, beta = alpha.unsqueeze(1), beta.unsqueeze(1)
    return torch.einsum("tmc,nc,tmd,nd->tn", alpha, R, beta, Phi) * inv


def both(left, R, Phi, inv_norm, k, largest):
    """(exact (values, indices), screened (values, indices, survivors))."""
    if len(left) == 1:
        return ops.topk(*left, R, Phi, inv_norm, k, largest, precision="exact"), \
            ops.screened_topk(*left, R, Phi, inv_norm, k, largest)
    return ops.topk_rank1(*left, R, Phi, inv_norm, k, largest, precision="exact"), \
        ops.screened_topk_rank1(*left, R, Phi, inv_norm, k, largest)


def assert_same(exact, got, dtype):
    (ev, ei), (v, i) = exact, got[:2]
    assert torch.equal(i, ei)
    # exact scores both, summed in different orders: equal to the dtype's rounding
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * max(float(ev.abs().max()), 1e-300)
    torch.testing.assert_close(v, ev, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [None, 0, 1, 4])
@pytest.mark.parametrize("largest", [True, False])
def test_same_answers_as_exact(dtype, m, largest):
    for spread, k, N, Dp in ((0.0, 10, 3000, 33), (5.0, 7, 2000, 33), (0.0, 1, 1, 5), (0.0, 64, 64, 9),
                             (0.0, 5, 300, 4097)):
        left, R, Phi, inv_norm = operands(T=6, N=N, C=4, Dp=Dp, m=m, dtype=dtype, spread=spread, seed=2)
        exact, got = both(left, R, Phi, inv_norm, k, largest)
        assert_same(exact, got, dtype)
        assert bool((got[2] >= k).all()) and bool((got[2] <= N).all())


@pytest.mark.parametrize("m", [None, 0])
def test_rows_below_the_float32_filters_range(m):
    # The CPU screen first rules pairs out with a float32 over-estimate of the
    # bound, which holds while the tile's row scales are above 2^-100 of the
    # largest; tiles holding rows 2^-300 down go to the float64 bounds. Here the
    # tiny rows are also the answer: every other row scores below zero.
    left, R, Phi, inv_norm = operands(T=1, N=3000, C=3, Dp=17, m=m, seed=11)
    tiny = torch.arange(0, 3000, 7)
    Phi[tiny] *= 2.0 ** -300
    scores = truth(left, R, Phi, inv_norm)[0]
    flip = scores > 0
    flip[tiny] = scores[tiny] < 0
    R[flip] = -R[flip]
    assert bool((truth(left, R, Phi, inv_norm)[0][tiny] > 0).all())
    for k, largest in ((5, True), (30, True), (5, False)):
        exact, got = both(left, R, Phi, inv_norm, k, largest)
        assert_same(exact, got, torch.float64)
        if largest:
            assert set(got[1][0].tolist()) <= set(tiny.tolist())


def test_same_answers_at_near_ties():
    # Copies of the best training row scaled by 1 + j * 1e-6: the scores around
    # the cut are within 1e-6 relative of each other, far inside the bound.
    left, R, Phi, inv_norm = operands(T=1, N=500, C=3, Dp=2049, seed=3)
    best = int(truth(left, R, Phi, inv_norm)[0].argmax())
    copies = torch.arange(1, 21, dtype=torch.float64) * 1e-6 + 1
    R = torch.cat([R, R[best].expand(20, -1)])
    Phi = torch.cat([Phi, Phi[best] * copies[:, None]])
    inv_norm = torch.cat([inv_norm, inv_norm[best].expand(20)])
    for k in (5, 10, 21):
        exact, got = both(left, R, Phi, inv_norm, k, True)
        assert_same(exact, got, torch.float64)


def test_the_screen_prunes():
    # N = 100k random training rows, k = 10: the bound leaves a small fraction to rescore.
    left, R, Phi, inv_norm = operands(T=8, N=100_000, C=10, Dp=65, dtype=torch.float32, seed=4)
    exact, got = both(left, R, Phi, inv_norm, 10, True)
    assert_same(exact, got, torch.float32)
    fraction = float(got[2].double().mean()) / 100_000
    assert fraction < 0.01, fraction  # measured 0.0006 (about 60 rows per test)


def test_operands_the_bound_is_not_for_take_the_exact_path():
    left, R, Phi, inv_norm = operands(T=3, N=40, C=3, Dp=5, seed=5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        Phi_bad = Phi.clone()
        Phi_bad[7, 2] = bad
        exact, got = both(left, R, Phi_bad, inv_norm, 5, True)
        assert torch.equal(got[1], exact[1]) and torch.equal(got[0].isnan(), exact[0].isnan())
        assert bool((got[2] == 40).all())  # survivors = N: the exact path answered
    # training rows whose scales span more than float64 holds (2^-600 next to 2^600)
    Phi_wide = Phi.clone()
    Phi_wide[0] *= 2.0 ** 600
    Phi_wide[1] *= 2.0 ** -600
    exact, got = both(left, R, Phi_wide, inv_norm, 5, True)
    assert torch.equal(got[1], exact[1]) and bool((got[2] == 40).all())


def test_hostile_shapes_and_layouts():
    # no tests; non-contiguous operands; every training row the same (all tied:
    # past candidate_capacity the op answers on the exact path, survivors = N)
    (S,), R, Phi, inv_norm = operands(T=3, N=50, C=3, Dp=6, dtype=torch.float32, seed=8)
    values, indices, survivors = ops.screened_topk(S[:0], R, Phi, inv_norm, 4)
    assert values.shape == (0, 4) and indices.shape == (0, 4) and survivors.shape == (0,)
    St, Rt, Pt = S.transpose(1, 2).contiguous().transpose(1, 2), R.t().contiguous().t(), Phi.t().contiguous().t()
    assert not (St.is_contiguous() or Rt.is_contiguous() or Pt.is_contiguous())
    assert_same(ops.topk(S, R, Phi, inv_norm, 4, precision="exact"), ops.screened_topk(St, Rt, Pt, inv_norm, 4),
                torch.float32)
    N = 10_000
    (S,), R, Phi, inv_norm = operands(T=2, N=1, C=3, Dp=6, dtype=torch.float32, seed=9)
    R, Phi, inv_norm = R.expand(N, -1).contiguous(), Phi.expand(N, -1).contiguous(), inv_norm.expand(N).contiguous()
    exact, got = both((S,), R, Phi, inv_norm, 5, True)
    assert torch.equal(got[1], exact[1]) and torch.equal(got[1][0], torch.arange(5))  # ties by index
    assert bool((got[2] == N).all())


def test_the_issues_two_silent_failures():
    """float64 features of norm ~1e19 returned no indices from the old screen,
    and subnormal float32 training features against test features at 1e10
    (bias=False, grad-dot) its wrong top-1: both exact now, on the screen."""
    g = torch.Generator().manual_seed(6)
    train = exemplar.LastLayerData(torch.randn(50, 6, generator=g, dtype=torch.float64) * 1e19,
                                   torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,)))
    test = exemplar.LastLayerData(torch.randn(4, 6, generator=g, dtype=torch.float64) * 1e19,
                                  torch.randn(4, 3, generator=g, dtype=torch.float64))
    attr = exemplar.Attributor(train, curvature="identity", damping=0.0)
    want = attr.topk(test, 5, "grad_dot", precision="exact")
    got = attr.topk(test, 5, "grad_dot", precision="bf16")
    assert got.indices.shape == (4, 5) and torch.equal(got.indices, want.indices)
    train = exemplar.LastLayerData((torch.randn(30, 4, generator=g) * 5e-42).float(),
                                   torch.randn(30, 3, generator=g).float(), torch.randint(0, 3, (30,), generator=g))
    test = exemplar.LastLayerData((torch.randn(3, 4, generator=g) * 1e10).float(),
                                  torch.randn(3, 3, generator=g).float())
    attr = exemplar.Attributor(train, curvature="identity", damping=0.0, bias=False)
    wide = exemplar.Attributor(exemplar.LastLayerData(train.features.double(), train.logits.double(), train.labels),
                               curvature="identity", damping=0.0, bias=False)
    reference = wide.scores(exemplar.LastLayerData(test.features.double(), test.logits.double()), "grad_dot")
    got = attr.topk(test, 1, "grad_dot", precision="bf16")
    assert torch.equal(got.indices[:, 0], reference.argmax(1))


@pytest.mark.parametrize("curvature,kfac_damping", [("exact", "eigenbasis"), ("kfac", "eigenbasis"),
                                                    ("kfac", "factored")])
def test_screened_topk_equals_the_reference(curvature, kfac_damping):
    # Both screened ops (general and rank-1 path) through the Attributor against
    # testing/reference.py's float64 scores from explicit gradients and inverses.
    train = make_data(300, 4, 7, seed=11)
    test = make_data(5, 4, 7, seed=12)
    attr = exemplar.Attributor(train, curvature=curvature, damping=1e-2, kfac_damping=kfac_damping)
    for method in ("if", "theta_relatif"):
        got = attr.topk(test, 9, method, precision="bf16")
        want = ref.scores(train.features, train.logits, train.labels, test.features, test.logits, test.labels,
                          method, curvature, 1e-2, True, kfac_damping)
        check_topk_near(got.values, got.indices, want, 9, True, tol=1e-10)


def test_attributor_topk_takes_a_precision():
    train = make_data(400, 5, 12, seed=5)
    test = make_data(6, 5, 12, seed=6, labels=False)
    attr = exemplar.Attributor(train, curvature="kfac")
    for method in ("if", "theta_relatif", "grad_cos", "knn"):
        exact = attr.topk(test, 8, method, precision="exact")
        for precision in ("bf16", "auto"):
            got = attr.topk(test, 8, method, precision=precision)
            assert torch.equal(got.indices, exact.indices), (method, precision)
            torch.testing.assert_close(got.values, exact.values, rtol=1e-10, atol=1e-12)


def test_bad_input():
    (S,), R, Phi, inv_norm = operands(T=2, N=30, C=3, Dp=5)
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'exact', 'bf16'\), got 'tf32'"):
        ops.topk(S, R, Phi, inv_norm, 3, precision="tf32")
    with pytest.raises(ValueError, match="kernel must be 'default'"):
        ops.topk(S, R, Phi, inv_norm, 3, kernel="streamed", precision="bf16")
    with pytest.raises(ValueError, match=r"exemplar::screened_topk: k must be an integer in \[1, N\] = \[1, 30\]"):
        ops.screened_topk(S, R, Phi, inv_norm, 31)
    with pytest.raises(RuntimeError, match=r"exemplar::screened_topk: S must be \(T, C, Dp\) with C from R=3"):
        ops.screened_topk(S[:, :2], R, Phi, inv_norm, 3)
    with pytest.raises(RuntimeError, match=r"exemplar::screened_topk_rank1: beta must be \(T, Dp\) with Dp from Phi=5"):
        ops.screened_topk_rank1(S[:, :, 0], S[:, 0, :4], R, Phi, inv_norm, 3)
    with pytest.raises(RuntimeError, match=r"exemplar::screened_topk: R must be float32 or float64, got BFloat16"):
        ops.screened_topk(S.bfloat16(), R.bfloat16(), Phi.bfloat16(), inv_norm.bfloat16(), 3)
    with pytest.raises(RuntimeError, match=r"exemplar::screened_topk: inv_norm has dtype Float but R has Double"):
        ops.screened_topk(S, R, Phi, inv_norm.float(), 3)
    train = make_data(40, 3, 4, seed=7)
    with pytest.raises(ValueError, match="precision must be one of"):
        exemplar.Attributor(train).topk(train, 3, precision="half")


def test_auto_screens_only_where_measured_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precisions, "CPU_HAS_BF16_MATMUL", True)
    assert precisions.resolve("auto", True, 1000, 100_000, 5130, 10, cpu) == "bf16"
    assert precisions.resolve("auto", False, 1000, 100_000, 513, 10, cpu) == "bf16"
    for args in ((False, 1000, 100_000, 65, 10), (True, 100, 100_000, 5130, 10), (True, 1000, 1000, 5130, 10),
                 (True, 1000, 100_000, 130, 10), (True, 1000, 100_000, 5130, 500), (False, 100, 100_000, 513, 10)):
        assert precisions.resolve("auto", *args, cpu) == "exact", args
    assert precisions.resolve("auto", True, 1000, 100_000, 5130, 10, torch.device("cuda")) == "exact"
    assert precisions.resolve("bf16", False, 1, 1, 1, 1, cpu) == "bf16"
    monkeypatch.setattr(precisions, "CPU_HAS_BF16_MATMUL", False)
    assert precisions.resolve("auto", True, 1000, 100_000, 5130, 10, cpu) == "exact"


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), train_exp=st.integers(-1000, 1000),
       test_exp=st.integers(-1000, 1000), inv_exp=st.integers(-1000, 1000), path=st.sampled_from([None, 0, 3]),
       N=st.sampled_from([1, 7, 300]), D=st.sampled_from([1, 5, 130, 4097]), near_tie=st.booleans(),
       seed=st.integers(0, 2**16))
def test_screened_answers_equal_exact_over_the_whole_exponent_range(dtype, train_exp, test_exp, inv_exp, path, N, D,
                                                                    near_tie, seed):
    """Operands scaled by 2^e over the dtype's whole exponent range (float32:
    clamped to its range, subnormals included; float64 up to 2^+-1000), with
    or without near-ties at the cut, k = N: the screen's top-k is the exact
    one whenever the exact path's scores are finite and normal, and its values
    the exact scores."""
    limit = 125 if dtype == torch.float32 else 1000
    e_train, e_test, e_inv = (max(-limit - 20, min(limit, e)) for e in (train_exp, test_exp, inv_exp))
    left, R, Phi, inv_norm = operands(T=3, N=N, C=3, Dp=D, m=path, dtype=torch.float64, seed=seed)
    if near_tie and N > 1:
        Phi[1] = Phi[0] * (1 + 1e-6)
        R[1], inv_norm[1] = R[0], inv_norm[0]
    Phi, inv_norm = Phi * 2.0 ** e_train, inv_norm * 2.0 ** e_inv
    left = tuple(x * 2.0 ** e_test for x in left)
    left, R, Phi, inv_norm = tuple(x.to(dtype) for x in left), R.to(dtype), Phi.to(dtype), inv_norm.to(dtype)
    exact, got = both(left, R, Phi, inv_norm, N, True)
    values = exact[0]
    if not bool(torch.isfinite(values).all()) or float(values.abs().max()) < 1e6 * torch.finfo(dtype).tiny:
        return  # the exact path itself overflowed or lost the scores to underflow: nothing to match
    reference = truth(left, R, Phi, inv_norm)
    scale = float(values.abs().max())
    tiny = torch.finfo(dtype).tiny
    if any(bool(((x != 0) & (x.abs() < tiny)).any()) for x in (*left, R, Phi, inv_norm)):
        # Subnormal operands: the exact path's float sums lose digits of their own,
        # so only the picks' true scores can be compared, to that loss.
        if bool(torch.isfinite(reference).all()):
            torch.testing.assert_close(reference.gather(1, got[1]), reference.gather(1, exact[1]), rtol=0,
                                       atol=0.05 * scale)
        return
    # Exact scores both, summed in other orders: the same values, and the same
    # indices but where near-ties are within that rounding of each other.
    tol = (1e-4 if dtype == torch.float32 else 1e-11) * scale
    torch.testing.assert_close(got[0], values, rtol=0, atol=tol)
    if bool(torch.isfinite(reference).all()):  # (the einsum's own intermediates may overflow)
        torch.testing.assert_close(reference.gather(1, got[1]), reference.gather(1, exact[1]), rtol=0, atol=tol)
    assert float((got[1] == exact[1]).double().mean()) >= (0.6 if near_tie else 0.9)
