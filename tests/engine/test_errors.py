"""Bad input gets an error that names the argument and what was expected."""
import math

import pytest
import torch

import exemplar
from exemplar import ops
from helpers import make_data


@pytest.fixture
def train():
    return make_data(20, 3, 4, seed=1)


@pytest.fixture
def test_data():
    return make_data(5, 3, 4, seed=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["features", "logits"])
def test_non_finite_inputs(train, field, bad):
    kwargs = dict(features=train.features.clone(), logits=train.logits.clone(), labels=train.labels)
    kwargs[field][3, 1] = bad
    with pytest.raises(ValueError, match=rf"{field} must be finite.*\[3, 1\]"):
        exemplar.LastLayerData(**kwargs)


@pytest.mark.parametrize("label", [-1, 3, 100])
def test_label_out_of_range(train, label):
    labels = train.labels.clone()
    labels[7] = label
    with pytest.raises(ValueError, match=rf"labels must be in \[0, C\) = \[0, 3\), got labels\[7\]={label}"):
        exemplar.LastLayerData(train.features, train.logits, labels)
    with pytest.raises(RuntimeError, match=r"exemplar::residuals: labels must be in \[0, C\)"):
        ops.residuals(train.logits, labels)


@pytest.mark.parametrize("k", [0, -2, 21])
def test_k_out_of_range(train, test_data, k):
    attr = exemplar.Attributor(train)
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, N\] = \[1, 20\], got {k}"):
        attr.topk(test_data, k)


@pytest.mark.parametrize("k", [2.5, True, None])
def test_k_not_an_integer(train, test_data, k):
    attr = exemplar.Attributor(train)
    with pytest.raises(TypeError, match=rf"k must be an integer in \[1, N\] = \[1, 20\], got {k}"):
        attr.topk(test_data, k)


def test_k_out_of_range_at_op_level(train):
    R = torch.randn(20, 3, dtype=torch.float64)
    S, Phi = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exemplar::topk: k must be an integer in \[1, N\] = \[1, 20\], got 21"):
        ops.topk(S, R, Phi, torch.ones(20, dtype=torch.float64), 21)


def test_mismatched_n(train):
    f, z, y = train.features, train.logits, train.labels
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\) with N=20"):
        exemplar.LastLayerData(f, z[:19], y)
    with pytest.raises(ValueError, match=r"labels must be a tensor of shape \(N,\) with N=20"):
        exemplar.LastLayerData(f, z, y[:18])
    R, Phi = torch.randn(20, 3, dtype=torch.float64), torch.randn(19, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"exemplar::scores: Phi must be \(N, Dp\) with N from R=20"):
        ops.scores(torch.randn(2, 3, 5, dtype=torch.float64), R, Phi, torch.ones(20, dtype=torch.float64))


def test_feature_dim_mismatch(train):
    attr = exemplar.Attributor(train)
    other = make_data(5, 3, 6, seed=3)
    with pytest.raises(ValueError, match=r"test.features must have shape \(T, D\) with D=4"):
        attr.scores(other)
    S = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"exemplar::topk: S must be \(T, C, Dp\) with Dp from Phi=5"):
        operands = attr.prepare("if")
        ops.topk(S, operands.r, operands.phi, torch.ones(20, dtype=torch.float64), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_unsupported_dtype(train, dtype):
    with pytest.raises(TypeError, match=rf"features must be float32 or float64, got {dtype}"):
        exemplar.LastLayerData(train.features.to(dtype), train.logits, train.labels)
    R = torch.randn(20, 3).to(dtype)
    with pytest.raises(RuntimeError, match="exemplar::scores_rank1: R must be float32 or float64"):
        ops.scores_rank1(torch.randn(2, 3).to(dtype), torch.randn(2, 5).to(dtype), R,
                         torch.randn(20, 5).to(dtype), torch.ones(20).to(dtype))


def test_mixed_dtypes(train, test_data):
    with pytest.raises(TypeError, match="logits dtype torch.float32 differs from features dtype torch.float64"):
        exemplar.LastLayerData(train.features, train.logits.float(), train.labels)
    attr = exemplar.Attributor(train)
    t32 = exemplar.LastLayerData(test_data.features.float(), test_data.logits.float())
    with pytest.raises(TypeError, match="test dtype torch.float32 differs from train dtype torch.float64"):
        attr.scores(t32)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        exemplar.LastLayerData(train.features, train.logits, train.labels.double())


def test_unknown_method_and_curvature(train, test_data):
    with pytest.raises(ValueError, match=r"curvature must be one of .*got 'fisher'"):
        exemplar.Attributor(train, curvature="fisher")
    with pytest.raises(ValueError, match=r"kfac_damping must be one of .*got 'both'"):
        exemplar.Attributor(train, kfac_damping="both")
    attr = exemplar.Attributor(train)
    for call in (lambda: attr.scores(test_data, "tracin"), lambda: attr.topk(test_data, 2, "tracin"),
                 lambda: attr.self_influence("tracin")):
        with pytest.raises(ValueError, match=r"method must be one of .*got 'tracin'"):
            call()


@pytest.mark.parametrize("damping", [-1e-3, math.nan, math.inf, "0.1", None])
def test_bad_damping(train, damping):
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        exemplar.Attributor(train, damping=damping)


def test_empty_training_set():
    empty = exemplar.LastLayerData(torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"train is empty: the training set needs at least one example"):
        exemplar.Attributor(empty)
    with pytest.raises(RuntimeError, match="exemplar::kfac_factors: the training set is empty"):
        ops.kfac_factors(torch.zeros(0, 5), torch.zeros(0, 3))


def test_train_without_labels(train):
    with pytest.raises(ValueError, match="train.labels is None"):
        exemplar.Attributor(exemplar.LastLayerData(train.features, train.logits))


def test_wrong_shapes_and_classes(train):
    with pytest.raises(ValueError, match=r"features must have shape \(N, D\), got \(20,\)"):
        exemplar.LastLayerData(train.features[:, 0], train.logits, train.labels)
    with pytest.raises(ValueError, match=r"logits must have C >= 2 classes"):
        exemplar.LastLayerData(train.features, train.logits[:, :1], torch.zeros(20, dtype=torch.long))
    attr = exemplar.Attributor(train)
    four = make_data(5, 4, 4, seed=5)
    with pytest.raises(ValueError, match=r"test.logits must have C=3 classes"):
        attr.scores(four)


def test_cholesky_norm_ops_check_their_factor():
    R, Phi = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    for op, name in ((ops.cholesky_norms, "cholesky_norms"), (ops.cholesky_quad_norms, "cholesky_quad_norms")):
        with pytest.raises(RuntimeError, match=rf"exemplar::{name}: chol must be \(C\*Dp, C\*Dp\) = \(12, 12\), "
                                               r"got shape \[11, 12\]"):
            op(R, Phi, torch.eye(12, dtype=torch.float64)[:11])
        with pytest.raises(RuntimeError, match=rf"exemplar::{name}: chol must be float32 or float64, got Long"):
            op(R, Phi, torch.eye(12, dtype=torch.long))
        with pytest.raises(RuntimeError, match=rf"exemplar::{name}: Phi must be \(N, Dp\) with N from R=6"):
            op(R, Phi[:5], torch.eye(12, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["default", "streamed"])
def test_top_k_kernels_check_k_alike(kernel):
    S, R = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    Phi, inv = torch.randn(20, 5, dtype=torch.float64), torch.ones(20, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exemplar::topk: k must be an integer in \[1, N\] = \[1, 20\], got 21"):
        ops.topk(S, R, Phi, inv, 21, kernel=kernel)
    with pytest.raises(ValueError, match=r"kernel must be one of \('default', 'streamed', 'fused'\), got 'heap'"):
        ops.topk(S, R, Phi, inv, 3, kernel="heap")
    with pytest.raises(ValueError, match=r"kernel='fused' is the CUDA kernel: it needs CUDA tensors"):
        ops.topk(S, R, Phi, inv, 3, kernel="fused")


def test_rank_m_factors_must_agree():
    R, Phi = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    inv = torch.ones(9, dtype=torch.float64)
    alpha = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"exemplar::topk_rank1: beta must be \(T, m, Dp\) with m from alpha=5, "
                                           r"got shape \[2, 4, 4\]"):
        ops.topk_rank1(alpha, torch.randn(2, 4, 4, dtype=torch.float64), R, Phi, inv, 3)
    with pytest.raises(RuntimeError, match=r"exemplar::scores_rank1: beta must be \(T, m, Dp\), a 3-d tensor"):
        ops.scores_rank1(alpha, torch.randn(2, 4, dtype=torch.float64), R, Phi, inv)
    with pytest.raises(RuntimeError, match=r"alpha must be \(T, C\) or \(T, m, C\), got shape \[2\]"):
        ops.scores_rank1(alpha[:, 0, 0], torch.randn(2, 4, dtype=torch.float64), R, Phi, inv)
