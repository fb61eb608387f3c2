"""precision="tf32" | "bf16" top-k (exemplar.ops.screen): the screen's error bound
holds, the answers equal precision="exact"'s (random data, near-ties at the
cut, wide dynamic range, large D, both paths), and the screen prunes."""
import pytest
import torch

import exemplar
from exemplar import ops
from exemplar.ops import screen
from helpers import make_data

PRECISIONS = ("tf32", "bf16")


def operands(T, N, C, Dp, m=None, dtype=torch.float64, seed=0, spread=0.0):
    """Random S (T, C, Dp) or (alpha (T, m, C), beta (T, m, Dp)), R, Phi, inv_norm;
    spread > 0 scales training rows by 10^U(-spread, spread) (wide dynamic range)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    R, Phi = randn(N, C), randn(N, Dp)
    if spread:
        Phi = Phi * 10 ** ((torch.rand(N, 1, generator=g, dtype=dtype) * 2 - 1) * spread)
    inv_norm = torch.rand(N, generator=g, dtype=dtype) + 0.1
    left = randn(T, C, Dp) if m is None else (randn(T, m, C), randn(T, m, Dp))
    return left, R, Phi, inv_norm


def exact_scores(left, R, Phi, inv_norm):
    """float64 scores from the definition."""
    R, Phi, inv = R.double(), Phi.double(), inv_norm.double()
    if isinstance(left, tuple):
        alpha, beta = (x.double() for x in left)
        return torch.einsum("tmc,nc,tmd,nd->tn", alpha, R, beta, Phi) * inv
    return torch.einsum("tcd,nc,nd->tn", left.double(), R, Phi) * inv


def both_paths(left, R, Phi, inv_norm, k, largest, precision):
    if isinstance(left, tuple):
        alpha, beta = left
        return (ops.topk_rank1(alpha, beta, R, Phi, inv_norm, k, largest),
                ops.topk_rank1(alpha, beta, R, Phi, inv_norm, k, largest, precision=precision))
    return (ops.topk(left, R, Phi, inv_norm, k, largest),
            ops.topk(left, R, Phi, inv_norm, k, largest, precision=precision))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [dict(T=4, N=300, C=3, Dp=9), dict(T=3, N=200, C=2, Dp=4097),
                                   dict(T=2, N=150, C=5, Dp=33, m=3), dict(T=3, N=100, C=7, Dp=65, m=1)])
@pytest.mark.parametrize("spread", [0.0, 4.0])
def test_the_bound_holds(precision, dtype, shape, spread):
    left, R, Phi, inv_norm = operands(**shape, dtype=dtype, spread=spread, seed=1)
    alpha, beta = left if isinstance(left, tuple) else (None, left)
    s = screen.Screen(alpha, beta, R, Phi, inv_norm, precision)
    screened, bound = s.tile(0, R.shape[0])
    truth = exact_scores(left, R, Phi, inv_norm)
    if alpha is None:
        computed = ops.scores(left, R, Phi, inv_norm)
    else:
        computed = ops.scores_rank1(alpha, beta, R, Phi, inv_norm)
    for reference in (truth, computed.double()):
        excess = (screened.double() - reference).abs() - bound.double()
        assert float(excess.max()) <= 0, float(excess.max())
    # ... and it is not vacuous: well below the spread of the scores it separates
    # (the worst case grows like sqrt(D) over a typical error: bf16 at D = 4,097 is 0.6 of the spread)
    assert float(bound.double().median()) < float(truth.std()), (float(bound.median()), float(truth.std()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [None, 1, 4])
@pytest.mark.parametrize("largest", [True, False])
def test_same_answers_as_exact_on_random_and_wide_range_data(precision, dtype, m, largest):
    for spread, k, N in ((0.0, 10, 3000), (5.0, 7, 2000), (0.0, 1, 1), (0.0, 64, 64)):
        left, R, Phi, inv_norm = operands(T=6, N=N, C=4, Dp=33, m=m, dtype=dtype, spread=spread, seed=2)
        (ev, ei), (v, i) = both_paths(left, R, Phi, inv_norm, k, largest, precision)
        assert torch.equal(i, ei), (spread, k)
        # the same scores up to the input dtype's rounding of a differently ordered sum
        tol = (1e-5 if dtype == torch.float32 else 1e-12) * float(ev.abs().max())
        torch.testing.assert_close(v, ev, rtol=0, atol=tol)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_answers_at_near_ties_and_large_d(precision):
    # Near-ties: copies of one training row scaled by 1 + j * 1e-6, so the scores
    # around the cut are within 1e-6 relative of each other.
    left, R, Phi, inv_norm = operands(T=1, N=500, C=3, Dp=2049, seed=3)
    best = int(exact_scores(left, R, Phi, inv_norm)[0].argmax())
    copies = torch.arange(1, 21, dtype=torch.float64) * 1e-6 + 1
    R = torch.cat([R, R[best].expand(20, -1)])
    Phi = torch.cat([Phi, Phi[best] * copies[:, None]])
    inv_norm = torch.cat([inv_norm, inv_norm[best].expand(20)])
    for k in (5, 10, 21):
        (ev, ei), (v, i) = both_paths(left, R, Phi, inv_norm, k, True, precision)
        assert torch.equal(i, ei), k
        assert torch.equal(v, exact_scores(left, R, Phi, inv_norm)[0, ei[0]].unsqueeze(0)) or \
            torch.allclose(v, ev, rtol=1e-13, atol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_screen_prunes(precision):
    # N = 100k random training rows, k = 10: the bound leaves a small fraction to rescore.
    left, R, Phi, inv_norm = operands(T=8, N=100_000, C=10, Dp=65, dtype=torch.float32, seed=4)
    values, indices, survivors = screen.screened_topk(None, left, R, Phi, inv_norm, 10, True, precision)
    assert bool((survivors >= 10).all())
    fraction = float(survivors.double().mean()) / 100_000
    assert fraction < 0.05, fraction  # measured 0.00011 (tf32), 0.00047 (bf16): 11 and 47 rows per test
    assert torch.equal(indices, ops.topk(left, R, Phi, inv_norm, 10)[1])


def test_attributor_topk_takes_a_precision():
    train = make_data(400, 5, 12, seed=5)
    test = make_data(6, 5, 12, seed=6, labels=False)
    attr = exemplar.Attributor(train, curvature="kfac")
    for method in ("if", "theta_relatif", "grad_cos", "knn"):
        exact = attr.topk(test, 8, method)
        for precision in PRECISIONS:
            got = attr.topk(test, 8, method, precision=precision)
            assert torch.equal(got.indices, exact.indices), (method, precision)
            torch.testing.assert_close(got.values, exact.values, rtol=1e-10, atol=1e-12)


def test_precision_errors():
    left, R, Phi, inv_norm = operands(T=2, N=30, C=3, Dp=5)
    with pytest.raises(ValueError, match=r"precision must be one of \('exact', 'tf32', 'bf16'\), got 'fp8'"):
        ops.topk(left, R, Phi, inv_norm, 3, precision="fp8")
    with pytest.raises(ValueError, match="kernel must be 'default'"):
        ops.topk(left, R, Phi, inv_norm, 3, kernel="streamed", precision="bf16")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, N\] = \[1, 30\], got 31"):  # the op's check
        ops.topk(left, R, Phi, inv_norm, 31, precision="bf16")
    bad = Phi.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="screens finite operands only"):
        ops.topk(left, R, bad, inv_norm, 3, precision="tf32")
    train = make_data(40, 3, 4, seed=7)
    with pytest.raises(ValueError, match="precision must be one of"):
        exemplar.Attributor(train).topk(train, 3, precision="half")


def test_operands_beyond_the_reduced_formats_range_get_the_exact_answer():
    """Subnormal float32 training features against large test features
    (bias=False, grad-dot) made the tf32 screen's top-1 wrong: such operands
    now go to the exact path."""
    g = torch.Generator().manual_seed(3)
    train = exemplar.LastLayerData((torch.randn(30, 4, generator=g) * 5e-42).float(),
                                   torch.randn(30, 3, generator=g).float(), torch.randint(0, 3, (30,), generator=g))
    test = exemplar.LastLayerData((torch.randn(3, 4, generator=g) * 1e10).float(),
                                  torch.randn(3, 3, generator=g).float())
    attr = exemplar.Attributor(train, curvature="identity", damping=0.0, bias=False)
    want = attr.topk(test, 1, "grad_dot")
    for precision in PRECISIONS:
        got = attr.topk(test, 1, "grad_dot", precision=precision)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values), precision


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), train_exp=st.integers(-150, 120),
       test_exp=st.integers(-150, 120), precision=st.sampled_from(PRECISIONS), N=st.sampled_from([1, 7, 300]),
       D=st.sampled_from([1, 5, 130]), seed=st.integers(0, 2**16))
def test_screened_answers_equal_exact_over_the_whole_exponent_range(dtype, train_exp, test_exp, precision, N, D,
                                                                    seed):
    """Features scaled by 2^e over the float32 range (subnormals included, up to
    2^120 so randn stays finite; float64 features too): the screened top-k is
    the exact one, whatever the scale, or both refuse the same magnitudes."""
    g = torch.Generator().manual_seed(seed)
    train = exemplar.LastLayerData((torch.randn(N, D, generator=g, dtype=torch.float64) * 2.0 ** train_exp).to(dtype),
                                   torch.randn(N, 3, generator=g, dtype=torch.float64).to(dtype),
                                   torch.randint(0, 3, (N,), generator=g))
    test = exemplar.LastLayerData((torch.randn(4, D, generator=g, dtype=torch.float64) * 2.0 ** test_exp).to(dtype),
                                  torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype))
    try:
        attr = exemplar.Attributor(train, curvature="identity", damping=0.0, bias=False)
        want = attr.topk(test, N, "grad_dot")  # k = N: every row's rank must agree
    except ValueError as err:  # magnitudes the dtype cannot hold are refused by the exact path too
        assert "too large" in str(err)
        return
    got = attr.topk(test, N, "grad_dot", precision=precision)
    # Exact scores, rescored from the original operands in another summation
    # order than the kernel's; indices the same but for rounding-level ties:
    # the exact scores of the returned indices are the exact ranking's values.
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * float(want.values.abs().max())
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=tol)
    torch.testing.assert_close(attr.scores(test, "grad_dot").gather(1, got.indices), want.values, rtol=0, atol=tol)
    assert float((got.indices == want.indices).double().mean()) > 0.95
