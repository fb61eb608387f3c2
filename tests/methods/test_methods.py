"""Every method x curvature of the Attributor against reference.py (float64,
explicit gradients and explicit inverse curvature) on random data with odd sizes."""
import pytest
import torch

import exemplar
from exemplar.testing import reference as ref
from helpers import check_topk_near, make_data, make_layer_data

CURVATURE_CASES = [
    ("exact", "eigenbasis"),
    ("kfac", "eigenbasis"),
    ("kfac", "factored"),
    ("ekfac", "eigenbasis"),
    ("identity", "eigenbasis"),
]
SIZES = [  # (N, T, C, D)
    (1, 1, 2, 1),
    (37, 5, 3, 6),
    (61, 4, 7, 2),
]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}T{}C{}D{}".format(*s))
@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_CASES, ids=lambda x: x)
def test_scores_and_self_influence_match_reference(curvature, kfac_damping, size, dtype, device):
    N, T, C, D = size
    train = make_data(N, C, D, dtype, seed=1)
    test = make_data(T, C, D, dtype, seed=2, labels=False)
    damping = 0.05
    attr = exemplar.Attributor(make_data(N, C, D, dtype, seed=1, device=device), curvature=curvature,
                               damping=damping, kfac_damping=kfac_damping)
    test_on_device = make_data(T, C, D, dtype, seed=2, labels=False, device=device)
    kw = dict(curvature=curvature, damping=damping, bias=True, kfac_damping=kfac_damping)
    explained = test.logits.argmax(1)
    for method in exemplar.INFLUENCE_METHODS:
        want = ref.scores(train.features, train.logits, train.labels, test.features, test.logits,
                          explained, method, **kw)
        got = attr.scores(test_on_device, method).cpu()
        assert got.dtype == dtype and got.shape == (T, N)
        assert rel_err(got, want) <= TOL[dtype], (method, rel_err(got, want))
        want_self = ref.self_influence(train.features, train.logits, train.labels, method, **kw)
        got_self = attr.self_influence(method).cpu()
        assert rel_err(got_self, want_self) <= TOL[dtype], (method, "self")
        k = min(7, N)
        check_topk_near(*attr.topk(test_on_device, k, method), want, k, True, tol=TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
def test_explicit_test_labels_and_no_bias(bias):
    train = make_data(29, 4, 5, seed=3)
    test = make_data(6, 4, 5, seed=4)  # explain the given labels, not the predictions
    attr = exemplar.Attributor(train, curvature="ekfac", damping=0.1, bias=bias)
    for method in ("if", "l_relatif"):
        want = ref.scores(train.features, train.logits, train.labels, test.features, test.logits,
                          test.labels, method, curvature="ekfac", damping=0.1, bias=bias)
        assert rel_err(attr.scores(test, method), want) <= 1e-9


@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_CASES, ids=lambda x: x)
def test_self_influence_is_diagonal_of_train_scores(curvature, kfac_damping):
    train, weight, bias = make_layer_data(43, 3, 4, seed=5)
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.02, kfac_damping=kfac_damping,
                               weight=weight, bias=bias, lje_step=0.1)
    for method in exemplar.METHODS:
        dense = attr.scores(train, method)
        scale = float(dense.abs().max())  # kNN's diagonal is 0 up to rounding
        torch.testing.assert_close(attr.self_influence(method), torch.diagonal(dense),
                                   rtol=1e-12, atol=1e-12 * scale, msg=method)


@pytest.mark.parametrize("method", exemplar.METHODS)
@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_CASES, ids=lambda x: x)
@pytest.mark.parametrize("largest", [True, False])
def test_topk_equals_topk_of_dense(curvature, kfac_damping, method, largest):
    train, weight, bias = make_layer_data(53, 4, 7, dtype=torch.float32, seed=6)
    test = make_data(9, 4, 7, dtype=torch.float32, seed=7, labels=False)
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.03, kfac_damping=kfac_damping,
                               weight=weight, bias=bias)
    dense = attr.scores(test, method)
    for k in (1, 5, 53):
        values, indices = attr.topk(test, k, method, largest=largest)
        want = torch.topk(dense, k, dim=1, largest=largest).values
        assert torch.equal(values, want)  # bit-identical: same tiles, same GEMMs
        assert torch.equal(torch.gather(dense, 1, indices), values)
        assert all(len(set(row.tolist())) == k for row in indices)


def test_relatif_normalisers_are_computed_once(monkeypatch):
    train = make_data(40, 3, 5, seed=8)
    test = make_data(4, 3, 5, seed=9, labels=False)
    attr = exemplar.Attributor(train, curvature="kfac")
    calls = []
    original = attr.curvature.norms
    monkeypatch.setattr(attr.curvature, "norms", lambda *a: calls.append(1) or original(*a))
    for _ in range(3):
        attr.scores(test, "theta_relatif")
        attr.topk(test, 3, "l_relatif")
        attr.self_influence("theta_relatif")
    assert len(calls) == 1
