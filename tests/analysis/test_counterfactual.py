"""Counterfactual truth built in (docs/design.md §10): the batched head refit
against independent fits, LDS against a naive reference (a loop of full
retrains and scipy's Spearman), leave-one-out against actual single
removals, the whole-model callback's job folder, and bad input."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save
from scipy import optimize, stats

import exemplar
from exemplar.analysis import counterfactual, refit
from exemplar.engine.distributed import ProcessGroup
from exemplar.engine.passes import Passes
from exemplar.storage import StoreError
from exemplar.testing.linear import fit_softmax_regression
from helpers import make_layer_data

LAMBDA = 0.05


def fitted_data(n=40, c=3, d=3, seed=0, t=7):
    """Train and test LastLayerData of random features and labels, with the
    logits of the layer fitted to them with weight decay LAMBDA, and that layer."""
    data = make_layer_data(n + t, c, d, seed=seed)[0]
    theta = fit_softmax_regression(with_bias(data.features[:n]), data.labels[:n], c, LAMBDA, tol=1e-13)
    logits = with_bias(data.features) @ theta.T
    train = exemplar.LastLayerData(data.features[:n], logits[:n], data.labels[:n])
    test = exemplar.LastLayerData(data.features[n:], logits[n:], data.labels[n:])
    return train, test, theta[:, :-1], theta[:, -1]


def with_bias(X):
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)


def log_p(theta, test):
    return torch.log_softmax(with_bias(test.features) @ theta.T, 1).gather(1, test.labels.view(-1, 1)).squeeze(1)


def lbfgs_fit(phi, labels, C, lam, divisor):
    """One plain scipy L-BFGS fit of one subset, to a gradient of ~1e-13."""
    Dp = phi.shape[1]
    X, y = phi.numpy(), labels.numpy()

    def f(x):
        theta = x.reshape(C, Dp)
        z = X @ theta.T
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).sum() / divisor + 0.5 * lam * (theta**2).sum()
        p[np.arange(len(y)), y] -= 1
        return loss, ((p.T @ X) / divisor + lam * theta).ravel()

    result = optimize.minimize(f, np.zeros(C * Dp), jac=True, method="L-BFGS-B",
                               options={"gtol": 1e-13, "ftol": 0, "maxiter": 10000, "maxcor": 30})
    return torch.tensor(result.x).view(C, Dp)


def test_batched_refit_equals_independent_lbfgs_fits():
    train, _, W, b = fitted_data()
    N, C = len(train), train.num_classes
    passes = Passes(exemplar.storage.training_set(train, True), True, ProcessGroup.single(), False)
    masks = counterfactual_masks = exemplar.analysis.retraining.random_subsets(N, 6, 0.5, seed=3)
    masks[5] = True  # one subset of every row, divided by N
    divisors = masks.sum(1).double()
    objectives = refit.SubsetObjectives(passes, masks, divisors, LAMBDA)
    start = torch.cat([W, b.view(-1, 1)], 1).expand(6, C, W.shape[1] + 1)
    solve = lambda V: V  # no preconditioner: the solver must not depend on it
    thetas, norms, _ = refit.newton(objectives, start, torch.arange(6), solve, 1e-13, 50)
    assert bool((norms <= 1e-13).all())
    phi = with_bias(train.features)
    for j in range(6):
        m = counterfactual_masks[j]
        reference = lbfgs_fit(phi[m], train.labels[m], C, LAMBDA, float(m.sum()))
        assert float((thetas[j] - reference).abs().max()) < 1e-8, j


def test_retrain_head_equals_newton_fits_on_each_subset():
    train, test, W, b = fitted_data(n=60)
    truth = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=5, batch=2)
    phi = with_bias(train.features)
    full = fit_softmax_regression(phi, train.labels, 3, LAMBDA, tol=1e-13)
    assert torch.allclose(truth.layer, full - full.mean(0), atol=1e-9)
    assert torch.allclose(truth.base, log_p(full, test), atol=1e-10)
    for j in range(5):
        m = truth.masks[j]
        assert int(m.sum()) == 30
        theta = fit_softmax_regression(phi[m], train.labels[m], 3, LAMBDA, tol=1e-13)
        assert torch.allclose(truth.outputs[j], log_p(theta, test), atol=1e-9)
    assert truth.excluded == {} and len(truth.usable) == 5


def naive_lds(train, test, masks, scores):
    """A loop of full retrains (Newton, one subset at a time) and scipy's Spearman."""
    phi = with_bias(train.features)
    outputs = []
    for m in masks:
        theta = fit_softmax_regression(phi[m], train.labels[m], train.num_classes, LAMBDA, tol=1e-13)
        outputs.append(log_p(theta, test))
    outputs = torch.stack(outputs)  # (M, T)
    predicted = scores @ masks.double().T  # (T, M)
    rho = [stats.spearmanr(predicted[t].numpy(), outputs[:, t].numpy())[0] for t in range(len(test))]
    return float(np.mean(rho)), outputs


@pytest.mark.parametrize("curvature", ["exact", "ekfac"])
def test_lds_equals_a_naive_reference(curvature):
    train, test, W, b = fitted_data(n=50, t=6)
    phi = with_bias(train.features)
    theta = fit_softmax_regression(phi, train.labels, 3, LAMBDA, tol=1e-13)
    train = exemplar.LastLayerData(train.features, phi @ theta.T, train.labels)
    test = exemplar.LastLayerData(test.features, with_bias(test.features) @ theta.T, test.labels)
    attr = exemplar.Attributor(train, curvature=curvature, damping=LAMBDA, weight=theta[:, :-1], bias=theta[:, -1])
    truth = exemplar.retrain_head(train, test, LAMBDA, weight=theta[:, :-1], bias=theta[:, -1], subsets=12,
                                  tol=1e-12)
    result = exemplar.lds(attr, test, truth, methods=("if", "grad_dot"))
    for method in ("if", "grad_dot"):
        expected, outputs = naive_lds(train, test, truth.masks, attr.scores(test, method))
        assert torch.allclose(truth.outputs, outputs, atol=1e-9)
        c = result.methods[method]
        assert c.value == pytest.approx(expected, abs=1e-12)
        assert c.low <= c.value <= c.high and c.left_out == {}
    assert result.methods["if"].value > 0.5  # IF with the objective's own Hessian predicts retraining


def test_leave_one_out_matches_actual_single_removals():
    train, test, W, b = fitted_data(n=50, t=6)
    phi = with_bias(train.features)
    theta = fit_softmax_regression(phi, train.labels, 3, LAMBDA, tol=1e-13)
    train = exemplar.LastLayerData(train.features, phi @ theta.T, train.labels)
    test = exemplar.LastLayerData(test.features, with_bias(test.features) @ theta.T, test.labels)
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA, weight=theta[:, :-1], bias=theta[:, -1])
    rows = [3, 17, 0, 49, 22]
    truth = exemplar.retrain_head(train, test, LAMBDA, weight=theta[:, :-1], bias=theta[:, -1], remove=rows,
                                  tol=1e-12)
    assert truth.removed.tolist() == rows
    effects = []
    for j, i in enumerate(rows):
        keep = torch.arange(50) != i
        refit_i = fit_softmax_regression(phi[keep], train.labels[keep], 3, LAMBDA, n_total=50, init=theta, tol=1e-13)
        assert torch.allclose(truth.outputs[j], log_p(refit_i, test), atol=1e-9)
        effects.append(log_p(theta, test) - log_p(refit_i, test))
    effects = torch.stack(effects, 1)  # (T, 5)
    scores = attr.scores(test, "if")[:, rows]
    result = exemplar.leave_one_out(attr, test, truth, methods=("if",)).methods["if"]
    assert result.value == pytest.approx(stats.pearsonr(scores.flatten(), effects.flatten())[0], abs=1e-9)
    assert result.spearman == pytest.approx(stats.spearmanr(scores.flatten(), effects.flatten())[0], abs=1e-9)
    assert torch.allclose(result.predicted, scores)
    assert result.value > 0.99  # IF / N is the first-order effect of a removal


def test_subset_scores_sum_the_scores_over_each_subset():
    train, test, W, b = fitted_data()
    attr = exemplar.Attributor(train, curvature="kfac", damping=LAMBDA)
    masks = exemplar.analysis.retraining.random_subsets(len(train), 4, 0.3, seed=1)
    for method in ("if", "theta_relatif", "knn"):
        expected = attr.scores(test, method).double() @ masks.double().T
        assert torch.allclose(attr.subset_scores(test, masks, method), expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"subsets must be an \(M, N=40\) bool tensor"):
        attr.subset_scores(test, masks.double(), "if")


def test_average_ranks_match_scipy_with_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for row, ranks in zip(x, counterfactual.average_ranks(x)):
        assert torch.allclose(ranks + 1, torch.tensor(stats.rankdata(row.numpy()), dtype=torch.float64))


def test_retrain_head_on_a_store_equals_in_memory(tmp_path):
    train, test, W, b = fitted_data(n=70)
    store = exemplar.storage.write_store(train, tmp_path / "store", shard_rows=16)
    memory = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=4)
    on_disk = exemplar.retrain_head(store, test, LAMBDA, weight=W, bias=b, subsets=4)
    assert torch.allclose(memory.outputs, on_disk.outputs, atol=1e-10)
    attr = exemplar.Attributor(store, curvature="exact", damping=LAMBDA)
    assert exemplar.lds(attr, test, on_disk, methods="if").methods["if"].value == pytest.approx(
        exemplar.lds(exemplar.Attributor(train, curvature="exact", damping=LAMBDA), test, memory,
                     methods="if").methods["if"].value, abs=1e-9)


def test_retrain_head_job_folder_resumes_and_refuses_another_job(tmp_path, monkeypatch):
    train, test, W, b = fitted_data(n=60)
    first = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    assert sorted(p.name for p in (tmp_path / "job").iterdir())[-1] == "job.json"
    calls = []
    monkeypatch.setattr(refit.SubsetObjectives, "value_grad", lambda *a: calls.append(1))
    again = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    assert calls == [] and torch.equal(first.outputs, again.outputs) and torch.equal(first.layer, again.layer)
    block = tmp_path / "job" / "block-00000.safetensors"
    saved = block.read_bytes()
    exemplar.storage.saved.write_atomic(block, save({"theta": torch.full((3, 4), float("nan"), dtype=torch.float64),
                                                     "gradient_norm": torch.zeros(1, dtype=torch.float64)}))
    with pytest.raises(StoreError, match="refit layer in block 0 is not finite"):
        exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    exemplar.storage.saved.write_atomic(block, save({"theta": torch.zeros(3, 4, dtype=torch.float64)}))
    with pytest.raises(StoreError, match="block-00000.safetensors holds"):
        exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    block.write_bytes(saved)
    with pytest.raises(StoreError, match="holds another job: weight_decay"):
        exemplar.retrain_head(train, test, 0.1, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")


def test_retrain_head_job_recomputes_a_lost_block_as_an_uninterrupted_run_would(tmp_path):
    train, test, W, b = fitted_data(n=60)
    first = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    block = tmp_path / "job" / "block-00002.safetensors"
    block.write_bytes(block.read_bytes()[:100])  # truncated
    with pytest.raises(StoreError, match="block-00002.safetensors is not a readable result block"):
        exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    block.unlink()  # lost: recomputed from the refit read back, with the same preconditioner
    again = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6, batch=2, out=tmp_path / "job")
    assert torch.equal(again.outputs, first.outputs)


def test_retrain_model_writes_each_subset_and_resumes_after_a_kill(tmp_path):
    train, test, W, b = fitted_data(n=60)
    phi = with_bias(train.features)
    called = []

    def retrain(mask):
        called.append(int(mask.sum()))
        if len(called) == 4 and crash:
            raise KeyboardInterrupt  # killed while training subset 3
        theta = fit_softmax_regression(phi[mask], train.labels[mask], 3, LAMBDA)
        return log_p(theta, test)

    crash = True
    with pytest.raises(KeyboardInterrupt):
        exemplar.retrain_model(retrain, 60, len(test), subsets=6, out=tmp_path / "job")
    assert len(list((tmp_path / "job").glob("block-*.safetensors"))) == 3
    crash, called[:] = False, []
    resumed = exemplar.retrain_model(retrain, 60, len(test), subsets=6, out=tmp_path / "job")
    assert len(called) == 3  # subsets 3, 4, 5 only
    whole = exemplar.retrain_model(retrain, 60, len(test), subsets=6)
    assert torch.equal(resumed.outputs, whole.outputs) and torch.equal(resumed.masks, whole.masks)
    head = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=6)
    assert torch.equal(head.masks, whole.masks)  # one seed, one draw of subsets
    assert torch.allclose(head.outputs, whole.outputs, atol=1e-8)
    with pytest.raises(StoreError, match="holds another job: fraction"):
        exemplar.retrain_model(retrain, 60, len(test), subsets=6, fraction=0.4, out=tmp_path / "job")


def test_retrain_model_passes_a_recorded_seed_to_a_two_argument_callback():
    seen = []
    truth = exemplar.retrain_model(lambda mask, seed: seen.append(seed) or torch.zeros(3), 10, 3, subsets=4)
    assert seen == truth.meta["seeds"] and len(set(seen)) == 4


def test_nan_outputs_are_excluded_and_never_averaged():
    train, test, W, b = fitted_data(n=60)
    phi = with_bias(train.features)
    count = []

    def retrain(mask):
        count.append(1)
        theta = fit_softmax_regression(phi[mask], train.labels[mask], 3, LAMBDA)
        out = log_p(theta, test)
        return out * float("nan") if len(count) in (2, 5) else out

    truth = exemplar.retrain_model(retrain, 60, len(test), subsets=8)
    assert sorted(truth.excluded) == [1, 4] and "non-finite outputs for 7 tests" in truth.excluded[1]
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA)
    result = exemplar.lds(attr, test, truth, methods="if")
    assert result.retrains.tolist() == [0, 2, 3, 5, 6, 7]
    assert math.isfinite(result.methods["if"].value)


def test_empty_classes_and_unconverged_retrains_are_recorded_and_left_out():
    train, test, W, b = fitted_data(n=60)
    masks = torch.ones(5, 60, dtype=torch.bool)
    masks[:, ::2] = False
    masks[2] = train.labels != 1  # class 1 left out
    truth = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=masks)
    assert truth.excluded == {2: "class 1 has no training row in the subset"}
    slow = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=4, max_iter=1, tol=1e-14)
    assert len(slow.excluded) == 4 and all("did not converge" in why for why in slow.excluded.values())
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA)
    with pytest.raises(ValueError, match="only 0 of 4 retrains are usable"):
        exemplar.lds(attr, test, slow)
    with pytest.raises(ValueError, match="the refit on every training row did not converge"):
        exemplar.retrain_head(train, test, LAMBDA, subsets=4, max_iter=1)  # from zero: one step is not enough


def test_constant_outputs_leave_tests_out_with_a_reason():
    train, test, W, b = fitted_data(n=60)
    truth = exemplar.retrain_model(lambda mask: torch.arange(7.0) * float(mask.sum() % 5 != 0) + mask[0], 60, 7,
                                   subsets=6)
    truth.outputs[:, 3] = 1.5  # every retrain gives test 3 the same output
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA)
    c = exemplar.lds(attr, test, truth, methods="if").methods["if"]
    assert c.left_out == {"constant retrained output": 1} and math.isnan(float(c.per_test[3]))
    assert math.isfinite(c.value)


def test_truth_for_another_question_is_refused():
    train, test, W, b = fitted_data(n=60)
    truth = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=4)
    loo = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, remove=3)
    attr = exemplar.Attributor(train, curvature="exact", damping=LAMBDA)
    other_train = exemplar.LastLayerData(train.features + 1e-3, train.logits, train.labels)
    with pytest.raises(ValueError, match="another training set"):
        exemplar.lds(exemplar.Attributor(other_train, curvature="exact", damping=LAMBDA), test, truth)
    with pytest.raises(ValueError, match="another test set"):
        exemplar.lds(attr, exemplar.LastLayerData(test.features, test.logits, (test.labels + 1) % 3), truth)
    with pytest.raises(ValueError, match="expected \\(M, T\\) = \\(4, 3\\)"):
        exemplar.lds(attr, test[0:3], truth)
    with pytest.raises(ValueError, match="use exemplar.leave_one_out"):
        exemplar.lds(attr, test, loo)
    with pytest.raises(ValueError, match="use exemplar.lds"):
        exemplar.leave_one_out(attr, test, truth)
    with pytest.raises(TypeError, match="truth must be an exemplar Retraining"):
        exemplar.lds(attr, test, truth.outputs)
    with pytest.raises(ValueError, match="truth was retrained on N=60"):
        exemplar.lds(exemplar.Attributor(train[0:50], curvature="exact", damping=LAMBDA), test, truth)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_decay=0.0), "weight_decay must be a finite number > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number > 0"),
    (dict(fraction=1.0), r"fraction must be a number in \(0, 1\)"),
    (dict(fraction=0.001), "need 1 <= size < N"),
    (dict(subsets=0), r"subsets must be an integer in \[1, inf\]"),
    (dict(subsets=torch.ones(3, 59, dtype=torch.bool)), r"subsets must be a count or an \(M, N=60\) bool tensor"),
    (dict(subsets=torch.zeros(3, 60, dtype=torch.bool)), r"subsets\[0\] holds no training row"),
    (dict(remove=[1, 1]), "remove must hold distinct training rows"),
    (dict(remove=[60]), r"remove must hold distinct training rows in \[0, 60\)"),
    (dict(remove=0), r"remove must be an integer in \[1, 60\]"),
    (dict(remove=2, subsets=5), "pass either remove="),
    (dict(target="logit"), "target must be one of"),
    (dict(tol=0), "tol must be a number > 0"),
    (dict(preconditioner="cg"), "preconditioner must be"),
    (dict(weight=torch.zeros(3, 3)), "weight and bias do not reproduce train.logits"),
])
def test_retrain_head_bad_input(kwargs, message):
    train, test, W, b = fitted_data(n=60)
    args = {"weight_decay": LAMBDA, "weight": W, "bias": b, **kwargs}
    with pytest.raises(ValueError, match=message):
        exemplar.retrain_head(train, test, **args)


def test_retrain_model_bad_input():
    with pytest.raises(TypeError, match="retrain must be a callable"):
        exemplar.retrain_model("train.py", 10, 3)
    with pytest.raises(ValueError, match=r"num_tests must be an integer in \[1"):
        exemplar.retrain_model(lambda mask: torch.zeros(2), 10, 0)


def test_a_layer_that_is_not_the_minimiser_is_flagged():
    data, W, b = make_layer_data(60, 3, 3)  # a random layer, not fitted with this weight decay
    train, test = data[0:50], data[50:60]
    with pytest.warns(UserWarning, match="not the minimiser of this objective"):
        truth = exemplar.retrain_head(train, test, LAMBDA, weight=W, bias=b, subsets=3)
    assert truth.meta["layer_gap"] > 1e-2


@pytest.mark.parametrize("returned,what", [(None, r"None \(a forgotten return\?\)"), ({"a": 1.0}, "a dict"),
                                           (["a", "b", "c"], "a list"), ("abc", "a str"),
                                           (torch.zeros(3, dtype=torch.bool), r"a torch.bool tensor of shape \(3,\)"),
                                           ([1.0, 2.0], r"a torch.float32 tensor of shape \(2,\)")])
def test_retrain_model_names_the_callback_and_the_subset_when_it_returns_no_outputs(returned, what):
    with pytest.raises(ValueError, match=rf"retrain\(mask\) for subset 0 returned {what}; expected \(3,\) real"):
        exemplar.retrain_model(lambda mask: returned, 10, 3, subsets=4)
