"""Curvature at the extremes: damping 0 on a confident fit, features whose
squares overflow, and feature scales from 1e-8 to 1e12 against the float64
reference."""
import math

import pytest
import torch
from torch import nn

import exemplar
from exemplar.testing import reference as ref
from helpers import make_data

NAN, INF = math.nan, math.inf


def confident_training_set(margin, n=200, seed=0):
    """float32 last-layer data fitted with a margin of `margin` nats on every
    example: the curvature is ~exp(-margin), its pseudo-inverse ~exp(margin)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 5, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    logits = margin * nn.functional.one_hot(labels, 3).float()
    return exemplar.LastLayerData(features, logits, labels)


@pytest.mark.parametrize("margin", [5, 20, 60, 90])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "exact"])
@pytest.mark.parametrize("method", ["if", "theta_relatif", "l_relatif"])
def test_damping_zero_on_a_confident_fit_gives_numbers_or_says_why(curvature, method, margin):
    """A curvature of ~exp(-margin) is float64 rounding noise past a margin of
    ~28, and its pseudo-inverse then meaningless (and beyond float32 past ~88):
    refused by name, never NaN or all-zero scores; below it, numbers."""
    train = confident_training_set(margin)
    if margin > 28:
        with pytest.raises(ValueError, match=r"damping=0.*Use damping > 0"):
            exemplar.Attributor(train, curvature=curvature, damping=0.0)
        return
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.0)
    test = exemplar.LastLayerData(train.features[:7], train.logits[:7])
    values, indices = attr.topk(test, 5, method)
    assert bool((indices >= 0).all()) and not bool(values.isnan().any())
    assert not bool(attr.scores(test, method).isnan().any())
    assert not bool(attr.self_influence(method).isnan().any())
    assert bool((attr.scores(test, method) != 0).any())


@pytest.mark.parametrize("method", ["knn", "grad_dot", "grad_cos"])
def test_features_whose_squares_overflow_are_refused(method):
    train = make_data(10, 3, 4, dtype=torch.float32, seed=1)
    huge = exemplar.LastLayerData(train.features * 3e19, train.logits, train.labels)
    with pytest.raises(ValueError, match=r"features are too large for torch.float32.*float64"):
        exemplar.Attributor(huge, curvature="identity")
    attr = exemplar.Attributor(train, curvature="identity")
    with pytest.raises(ValueError, match=r"test.features are too large for torch.float32"):
        attr.topk(exemplar.LastLayerData(huge.features[:2], huge.logits[:2]), 3, method)


# ---------------------------------------------------------------- 6. scale


SCALES = [1e-8, 1e-4, 1.0, 1e4, 1e8, 1e10, 1e11, 1e12]


CURVATURE_SETTINGS = [("exact", "eigenbasis"), ("kfac", "eigenbasis"), ("kfac", "factored"),
                      ("ekfac", "eigenbasis"), ("identity", "eigenbasis")]


def scaled_problem(s, dtype, damping, curvature, kfac_damping):
    base = make_data(60, 3, 5, dtype=torch.float64, seed=3)
    test0 = make_data(4, 3, 5, dtype=torch.float64, seed=4, labels=False)
    train = exemplar.LastLayerData((base.features * s).to(dtype), base.logits.to(dtype), base.labels)
    test = exemplar.LastLayerData((test0.features * s).to(dtype), test0.logits.to(dtype))
    attr = exemplar.Attributor(train, curvature=curvature, damping=damping, bias=False, kfac_damping=kfac_damping)
    return train, test, attr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_SETTINGS)
def test_feature_scale_against_reference(curvature, kfac_damping, dtype):
    """Features times s, no bias column, damping 1e-3 * s^2: the same problem at
    every scale (IF unchanged, theta-RelatIF times s), well conditioned, so
    reference.py's explicit inverse is the truth at every s."""
    for s in SCALES:
        damping = 1e-3 * s * s
        train, test, attr = scaled_problem(s, dtype, damping, curvature, kfac_damping)
        for method in ("if", "theta_relatif", "l_relatif"):
            want = ref.scores(train.features.double(), train.logits.double(), train.labels,
                              test.features.double(), test.logits.double(), test.explained_labels(), method,
                              curvature, damping, False, kfac_damping)
            got = attr.scores(test, method).double()
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= (1e-4 if dtype == torch.float32 else 1e-9), (s, method, err)
            values, indices = attr.topk(test, 5, method)
            assert torch.equal(values, attr.scores(test, method).gather(1, indices))
            own = attr.self_influence(method).double()
            want_own = ref.self_influence(train.features.double(), train.logits.double(), train.labels, method,
                                          curvature=curvature, damping=damping, bias=False,
                                          kfac_damping=kfac_damping)
            assert float((own - want_own).abs().max() / want_own.abs().max()) <= \
                (1e-4 if dtype == torch.float32 else 1e-9), (s, method)


@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_SETTINGS[1:4])
def test_feature_scale_fixed_damping_float32(curvature, kfac_damping):
    """A fixed damping of 1e-3 whatever the scale: K-FAC and EK-FAC work in
    their eigenbasis, so float32 must agree with float64 at every s (float32
    once lost every score from s=1e4 to rounding on the softmax's null
    direction, and from s=1e12 to underflow). The explicit float64 inverse of
    reference.py is itself ill-conditioned here (cond ~ s^2 / damping), so it
    is the truth only up to s=1."""
    for s in SCALES:
        got, want = ([scaled_problem(s, dtype, 1e-3, curvature, kfac_damping)[2].scores(
            scaled_problem(s, dtype, 1e-3, curvature, kfac_damping)[1], m).double()
            for m in ("if", "theta_relatif", "l_relatif")] for dtype in (torch.float32, torch.float64))
        for method, a, b in zip(("if", "theta_relatif", "l_relatif"), got, want):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-4, (s, method)
            if s <= 1:
                train, test, _ = scaled_problem(s, torch.float64, 1e-3, curvature, kfac_damping)
                truth = ref.scores(train.features, train.logits, train.labels, test.features, test.logits,
                                   test.explained_labels(), method, curvature, 1e-3, False, kfac_damping)
                assert float((b - truth).abs().max() / truth.abs().max()) <= 1e-9, (s, method)
