"""Property-based tests (hypothesis, bounded for CI): every score op against
reference formulas over random shapes, dtypes and `largest`, with ties and
special values, and the top-k contract as properties."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import exemplar  # noqa: E402
from exemplar import ops  # noqa: E402
from exemplar.testing import reference as ref  # noqa: E402
from helpers import policy_order  # noqa: E402

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def operands(draw, special=False):
    """(path, args, truth (T, N) float64) with small-integer entries, so scores
    are exact in both dtypes and ties are common; `special` puts NaN and
    +-inf into inv_norm."""
    T, N = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    C, Dp = draw(st.integers(2, 4)), draw(st.integers(1, 5))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ints = lambda *shape: torch.randint(-2, 3, shape, generator=g).double()  # noqa: E731
    R, Phi = ints(N, C), ints(N, Dp)
    inv = torch.randint(0, 3, (N,), generator=g).double()
    if special:
        pick = torch.randint(0, 4, (N,), generator=g)
        inv = torch.where(pick == 1, torch.full_like(inv, math.nan), inv)
        inv = torch.where(pick == 2, torch.full_like(inv, math.inf), inv)
        inv = torch.where(pick == 3, torch.full_like(inv, -math.inf), inv)
    if draw(st.booleans()):
        S = ints(T, C, Dp)
        truth = torch.einsum("tcd,ic,id->ti", S, R, Phi) * inv
        path, args = "general", [S, R, Phi, inv]
    else:
        a, b = ints(T, C), ints(T, Dp)
        truth = (a @ R.T) * (b @ Phi.T) * inv
        path, args = "rank1", [a, b, R, Phi, inv]
    return path, [x.to(dtype) for x in args], truth


def run(path, args, k=None, largest=True):
    if k is None:
        return (ops.scores if path == "general" else ops.scores_rank1)(*args)
    return (ops.topk if path == "general" else ops.topk_rank1)(*args, k, largest)


@BOUNDED
@given(operands())
def test_dense_scores_are_exact_on_integers(case):
    path, args, truth = case
    # Products of small integers and their sums are exact in float32 as well.
    torch.testing.assert_close(run(path, args).double(), truth, rtol=0, atol=0)


@BOUNDED
@given(st.booleans().flatmap(lambda special: operands(special=special)), st.booleans(), st.data())
def test_topk_contract(case, largest, data):
    path, args, _ = case
    dense = run(path, args)
    N = dense.shape[1]
    k = data.draw(st.integers(1, N))
    values, indices = run(path, args, k, largest)
    assert values.shape == indices.shape == (dense.shape[0], k)
    assert bool(((indices >= 0) & (indices < N)).all())
    assert all(len(set(row)) == k for row in indices.tolist())
    torch.testing.assert_close(dense.gather(1, indices), values, equal_nan=True, rtol=0, atol=0)
    for t in range(dense.shape[0]):
        assert indices[t].tolist() == policy_order(dense[t].tolist(), largest)[:k]
    if k < N:  # top-k(k) is a prefix of top-k(k + 1)
        assert torch.equal(run(path, args, k + 1, largest)[1][:, :k], indices)


@BOUNDED
@given(st.integers(1, 12), st.integers(0, 3), st.integers(2, 4), st.integers(1, 4), DTYPES,
       st.sampled_from(["exact", "kfac", "ekfac", "identity"]), st.sampled_from(["if", "theta_relatif",
                                                                                  "l_relatif", "grad_dot",
                                                                                  "grad_cos"]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_methods_against_reference(N, extra_tests, C, D, dtype, curvature, method, bias, seed):
    g = torch.Generator().manual_seed(seed)
    feats, logits = torch.randn(N + 1 + extra_tests, D, generator=g, dtype=torch.float64), \
        2 * torch.randn(N + 1 + extra_tests, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    train = exemplar.LastLayerData(feats[:N].to(dtype), logits[:N].to(dtype), labels)
    test = exemplar.LastLayerData(feats[N:].to(dtype), logits[N:].to(dtype))
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.1, bias=bias)
    want = ref.scores(feats[:N], logits[:N], labels, feats[N:], logits[N:], test.explained_labels(), method,
                      curvature, 0.1, bias)
    got = attr.scores(test, method).double()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))
    k = N if seed % 2 else 1
    values, indices = attr.topk(test, k, method)
    torch.testing.assert_close(values.double(), got.gather(1, indices), rtol=1e-6, atol=1e-12)
    own = attr.self_influence(method).double()
    want_self = ref.self_influence(feats[:N], logits[:N], labels, method, curvature=curvature, damping=0.1,
                                   bias=bias)
    assert float((own - want_self).abs().max()) <= tol * max(1.0, float(want_self.abs().max()))


@BOUNDED
@given(st.integers(1, 9), st.integers(2, 4), st.integers(0, 4), DTYPES, st.integers(0, 2**31 - 1))
def test_statistics_ops_against_reference(N, C, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(N, D, generator=g, dtype=torch.float64)
    logits = 3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    phi = ref.augment(feats, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    R = ops.residuals(logits.to(dtype), labels)
    want_R = torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels, C)
    assert float((R.double() - want_R).abs().max()) <= tol
    A, G = ops.kfac_factors(phi.to(dtype), logits.to(dtype))
    want_A, want_G = ref.kfac_factors(feats.to(dtype), logits.to(dtype), True)
    assert float((A - want_A).abs().max()) <= tol * max(1.0, float(want_A.abs().max()))
    assert float((G - want_G).abs().max()) <= tol
    H = ops.exact_hessian(phi.to(dtype), logits.to(dtype))
    want_H = ref.exact_hessian(feats.to(dtype), logits.to(dtype), True)
    assert float((H - want_H).abs().max()) <= tol * max(1.0, float(want_H.abs().max()))
