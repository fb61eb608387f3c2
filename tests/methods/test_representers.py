"""RPS-l2, RPS-LJE and kNN: against reference.py, the representer decomposition,
and the LJE expansion on a trained network's last layer."""
import pytest
import torch
from torch import nn

import exemplar
from exemplar.testing import reference as ref
from helpers import make_data, make_layer_data, topk_overlap

CURVATURE_CASES = [("exact", "eigenbasis"), ("kfac", "eigenbasis"), ("kfac", "factored"),
                   ("ekfac", "eigenbasis"), ("identity", "eigenbasis")]


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_CASES, ids=lambda x: x)
@pytest.mark.parametrize("size", [(1, 2, 1), (37, 3, 6), (50, 7, 2)], ids=lambda s: "N{}C{}D{}".format(*s))
def test_rps_lje_matches_reference(curvature, kfac_damping, size):
    N, C, D = size
    train, weight, bias = make_layer_data(N, C, D, seed=11)
    test = make_data(6, C, D, seed=12, labels=False)
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.05, kfac_damping=kfac_damping,
                               weight=weight, bias=bias, lje_step=0.3)
    theta = torch.cat([weight, bias.view(-1, 1)], 1)
    want = ref.rps_lje_scores(train.features, train.labels, theta, test.features, test.logits.argmax(1),
                              0.3, curvature=curvature, damping=0.05, kfac_damping=kfac_damping)
    assert rel_err(attr.scores(test, "rps_lje"), want) <= 1e-9
    want_self = torch.diagonal(ref.rps_lje_scores(train.features, train.labels, theta, train.features,
                                                  train.labels, 0.3, curvature=curvature, damping=0.05,
                                                  kfac_damping=kfac_damping))
    assert rel_err(attr.self_influence("rps_lje"), want_self) <= 1e-9


@pytest.mark.parametrize("bias", [True, False])
def test_rps_l2_decomposes_the_refit_logits(bias):
    train, weight, b = make_layer_data(80, 4, 5, seed=13)
    test = make_data(9, 4, 5, seed=14)
    if not bias:
        train = exemplar.LastLayerData(train.features, train.features @ weight.T, train.labels)
    attr = exemplar.Attributor(train, weight=weight, bias=b if bias else False, rps_lambda=1e-3)
    scores = attr.scores(test, "rps_l2")
    theta = exemplar.methods.get("rps_l2").refit(attr.context)
    phi_t = ref.augment(test.features, bias)
    refit = (phi_t @ theta.T).gather(1, test.labels.view(-1, 1)).view(-1)
    assert rel_err(scores.sum(1), refit) <= 1e-4
    alpha = ref.rps_l2_alpha(train.features, theta, attr.train.logits, 1e-3, bias)
    assert rel_err(scores, ref.rps_l2_scores(train.features, alpha, test.features, test.labels, bias)) <= 1e-9


def test_knn_matches_reference_and_finds_the_nearest():
    train = make_data(70, 3, 9, seed=15)
    test = make_data(5, 3, 9, seed=16)
    attr = exemplar.Attributor(train)
    want = ref.knn_scores(train.features, test.features)
    assert rel_err(attr.scores(test, "knn"), want) <= 1e-9
    values, indices = attr.topk(test, 4, "knn")
    assert torch.equal(indices, torch.cdist(test.features, train.features).topk(4, largest=False).indices)
    assert rel_err(values, want.gather(1, indices)) <= 1e-9


def test_rps_lje_needs_the_layer():
    train = make_data(20, 3, 4, seed=17)
    attr = exemplar.Attributor(train)
    with pytest.raises(ValueError, match="rps_lje' needs the trained layer: pass weight="):
        attr.scores(train, "rps_lje")
    with pytest.raises(ValueError, match=r"weight must be a tensor of shape \(C, D\) = \(3, 4\)"):
        exemplar.Attributor(train, weight=torch.zeros(4, 3, dtype=torch.float64), bias=False)
    with pytest.raises(ValueError, match="do not reproduce train.logits"):
        exemplar.Attributor(train, weight=torch.zeros(3, 4, dtype=torch.float64),
                            bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias=True with a weight"):
        exemplar.Attributor(train, weight=torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rps_lambda must be a finite number > 0"):
        exemplar.Attributor(train, rps_lambda=0.0)


def trained_digits_mlp():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[:1200]), y[:1200]).backward()
        opt.step()
    hook = exemplar.LastLayer(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:1200], y[:1200]), batch_size=256)
    as64 = lambda d: exemplar.LastLayerData(d.features.double(), d.logits.double(), d.labels)
    return hook, as64(hook.collect(loader, progress=False)), as64(hook.collect([X[1200:]], progress=False))


@pytest.fixture(scope="module")
def digits_mlp():
    return trained_digits_mlp()


def test_rps_lje_contributions_sum_to_the_logits(digits_mlp):
    hook, train, held_out = digits_mlp
    attr = exemplar.Attributor(train, curvature="exact", damping=1e-3, weight=hook.weight.double(),
                               bias=hook.bias.double(), lje_step=1e-3)
    total = attr.scores(held_out, "rps_lje").sum(1)
    logit = held_out.logits.gather(1, held_out.logits.argmax(1, keepdim=True)).view(-1)
    pearson = float(torch.corrcoef(torch.stack([total, logit]))[0, 1])
    assert pearson >= 0.99, pearson  # measured 0.9994


def test_rps_lje_top3_is_stable_across_ascent_steps(digits_mlp):
    hook, train, held_out = digits_mlp
    top3 = {}
    for step in (1e-4, 1e-3, 1e-2):
        attr = exemplar.Attributor(train, curvature="exact", damping=1e-3, weight=hook.weight.double(),
                                   bias=hook.bias.double(), lje_step=step)
        top3[step] = attr.topk(held_out, 3, "rps_lje")[1]
    for a, b in ((1e-4, 1e-3), (1e-3, 1e-2), (1e-4, 1e-2)):
        overlap = topk_overlap(top3[a], top3[b])
        assert overlap >= 0.9, (a, b, overlap)  # measured 1.0 for every pair
