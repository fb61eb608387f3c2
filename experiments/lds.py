"""LDS and leave-one-out for every method and curvature, on real data, with
the library's own yardsticks (exemplar.retrain_head / retrain_model, lds,
leave_one_out): the numbers of docs/design.md §6 "choosing a method".

Heads: the last layer retrained on fixed features, weight decay 1e-3 (the
head explained is the one refit with that weight decay on every row, so
exact curvature with damping = 1e-3 is its Hessian): scikit-learn digits
logistic regression; the Fashion-MNIST 16C-32C-64C-F ConvNet head (trained
1 epoch, all 60,000 images); the IMDB 2-layer BERT head (examples/imdb_text.py,
3 epochs on 6,000 reviews). Whole model: an MLP 64-64-10 on digits trained
end to end, each subset retrained fully from the trained weights
(full-batch L-BFGS), against which last-layer attribution is judged."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import exemplar

from . import datasets, nets
from .common import WEIGHT_DECAY, Results, table, with_bias

CURVATURES = {"exact": dict(curvature="exact"), "kfac": dict(curvature="kfac"),
              "kfac (factored)": dict(curvature="kfac", kfac_damping="factored"),
              "ekfac": dict(curvature="ekfac"), "identity": dict(curvature="identity")}
CURVED = ("if", "theta_relatif", "l_relatif", "rps_lje")  # scores depend on the curvature
FLAT = ("grad_dot", "grad_cos", "rps_l2", "knn")


def refit_head(train: exemplar.LastLayerData, test: exemplar.LastLayerData, weight, bias):
    """The head refit with WEIGHT_DECAY on every row, and train/test data with its logits."""
    one = exemplar.retrain_head(train, test, WEIGHT_DECAY, weight=weight, bias=bias,
                                subsets=torch.ones(1, len(train), dtype=torch.bool))
    theta = one.layer
    logits = lambda d: with_bias(d.features) @ theta.T
    return (theta, exemplar.LastLayerData(train.features, logits(train), train.labels),
            exemplar.LastLayerData(test.features, logits(test), test.labels))


def head_rows(key: str, name: str, train, test, theta, results: Results, subsets: int, removals: int) -> dict:
    """LDS (and leave-one-out) per method x curvature against head retraining; summary keys start with key."""
    W, b = theta[:, :-1], theta[:, -1]
    start = time.monotonic()
    truth = exemplar.retrain_head(train, test, WEIGHT_DECAY, weight=W, bias=b, subsets=subsets)
    truth_s = time.monotonic() - start
    start = time.monotonic()
    loo = exemplar.retrain_head(train, test, WEIGHT_DECAY, weight=W, bias=b, remove=removals) if removals else None
    loo_s = time.monotonic() - start
    lds, loo_r, seconds = {}, {}, {}
    for label, kw in CURVATURES.items():
        start = time.monotonic()
        attr = exemplar.Attributor(train, damping=WEIGHT_DECAY, weight=W, bias=b, **kw)
        methods = CURVED + (FLAT if label == "exact" else ())
        for m, c in exemplar.lds(attr, test, truth, methods).methods.items():
            lds[m, label] = c
        if loo is not None and label in ("exact", "ekfac"):
            for m, c in exemplar.leave_one_out(attr, test, loo, methods).methods.items():
                loo_r[m, label] = c
        seconds[label] = time.monotonic() - start
    rows = []
    for m in CURVED + FLAT:
        cells = [f"{lds[m, c].value:.3f} [{lds[m, c].low:.3f}, {lds[m, c].high:.3f}]" if (m, c) in lds else ""
                 for c in CURVATURES]
        rows.append([m, *cells])
    results.add(f"### {name}: LDS against head retraining\n\nN = {len(train)}, D = {train.num_features}, "
                f"C = {train.num_classes}, T = {len(test)} tests (log p of the true label), M = {subsets} random "
                f"halves, weight decay = damping = {WEIGHT_DECAY}. Ground truth: {truth.summary()}, "
                f"{truth_s:.1f} s ({truth.meta['passes']} passes over the training set). Mean per-test Spearman "
                "with a 95 % bootstrap interval over tests; methods that do not depend on the curvature are in "
                "the exact column.\n\n" + table(["method", *CURVATURES], rows)
                + "\n\nScoring time per curvature (fit + every method's LDS): "
                + ", ".join(f"{c} {s:.1f} s" for c, s in seconds.items()))
    summary = {f"{key}/lds/{m}/{c}": r.value for (m, c), r in lds.items()}
    if loo is not None:
        rows = [[m, *(f"{loo_r[m, c].value:.3f} / {loo_r[m, c].spearman:.3f}" if (m, c) in loo_r else ""
                      for c in ("exact", "ekfac"))] for m in CURVED + FLAT]
        results.add(f"Leave-one-out ({loo.summary()}, {loo_s:.1f} s): Pearson / Spearman over all "
                    "(test, removed row) pairs between the score and the effect of keeping the row.\n\n"
                    + table(["method", "exact", "ekfac"], rows))
        summary.update({f"{key}/loo/{m}/{c}": r.value for (m, c), r in loo_r.items()})
    summary[f"{key}/truth_s"] = truth_s
    return summary


def digits_lr(quick: bool, results: Results) -> dict:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    train0 = exemplar.LastLayerData(X[:1200], torch.zeros(1200, 10, dtype=X.dtype), y[:1200])
    test0 = exemplar.LastLayerData(X[1200:], torch.zeros(len(y) - 1200, 10, dtype=X.dtype), y[1200:])
    theta, train, test = refit_head(train0, test0, None, True)
    return head_rows("digits", "scikit-learn digits, logistic regression", train, test, theta, results, 100, 100)


def fashion_features(tests: int = 1000):
    """(last-layer hook, train data, test data) of the 16C-32C-64C-F ConvNet trained
    1 epoch on all 60,000 Fashion-MNIST training images; float64, with labels."""
    X, y, X2, y2 = datasets.fashion_mnist()
    torch.manual_seed(0)
    images = X.float().view(-1, 1, 28, 28)
    model = nets.train(nets.conv_net(), images, y, 1, seed=0)
    hook, train = nets.last_layer(model, images, y)
    return hook, train, nets.last_layer(model, X2[:tests].float().view(-1, 1, 28, 28), y2[:tests])[1]


def fashion_head(quick: bool, results: Results) -> dict:
    hook, train0, test0 = fashion_features()
    theta, train, test = refit_head(train0, test0, hook.weight.double(), hook.bias.double())
    return head_rows("fashion", "Fashion-MNIST ConvNet head", train, test, theta, results, 100, 0)


def imdb_head(quick: bool, results: Results) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import imdb_text

    texts, labels, test_texts, test_labels = imdb_text.load_reviews(6000, 1000)
    tokenizer = imdb_text.Tokenizer(texts, 20000, 192)
    train_set = imdb_text.Reviews(tokenizer(texts), labels)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = imdb_text.train_model(loader, len(tokenizer.ids) + 3, 192, 3)
    hook = exemplar.LastLayer(model)
    collected = hook.collect(torch.utils.data.DataLoader(train_set, batch_size=128), progress=False)
    test_batch = {**tokenizer(test_texts), "labels": test_labels}
    tested = hook.collect([test_batch], progress=False)
    as64 = lambda d: exemplar.LastLayerData(d.features.double(), d.logits.double(), d.labels)
    theta, train, test = refit_head(as64(collected), as64(tested), hook.weight.double(), hook.bias.double())
    return head_rows("imdb", "IMDB BERT head", train, test, theta, results, 100, 0)


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10)).double()


def fit_whole(model: nn.Module, X, y, iterations: int) -> nn.Module:
    """Full-batch L-BFGS on mean cross-entropy + WEIGHT_DECAY/2 |params|^2: deterministic."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, max_iter=iterations, tolerance_grad=1e-9, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) + 0.5 * WEIGHT_DECAY * sum(p.square().sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    return model


class WholeModel(NamedTuple):
    """The digits MLP trained end to end and its data (float64)."""
    model: nn.Module
    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor


def whole_model_setup() -> WholeModel:
    """An MLP 64-64-10 (tanh) on scikit-learn's digits (1,200 train, 597 test), trained by
    full-batch L-BFGS with WEIGHT_DECAY on every parameter: deterministic."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)
    torch.manual_seed(0)
    return WholeModel(fit_whole(mlp(), X[:1200], y[:1200], 2000), X[:1200], y[:1200], X[1200:], y[1200:])


def whole_model_truth(setup: WholeModel, iterations: int, subsets: int, out=None) -> exemplar.Retraining:
    """Each random half retrained fully from the trained weights (full-batch L-BFGS, `iterations`
    steps); outputs log p of the test's true label. out: a job folder (resumable)."""
    trained = {k: v.clone() for k, v in setup.model.state_dict().items()}

    def retrain(mask):
        net = mlp()
        net.load_state_dict(trained)
        fit_whole(net, setup.Xtr[mask], setup.ytr[mask], iterations)
        with torch.no_grad():
            return torch.log_softmax(net(setup.Xte), 1).gather(1, setup.yte.view(-1, 1)).squeeze(1)

    return exemplar.retrain_model(retrain, len(setup.ytr), len(setup.yte), subsets=subsets, out=out)


def whole_model(quick: bool, results: Results) -> dict:
    """Last-layer attribution against whole-network retraining (and head retraining) on the same subsets."""
    setup = whole_model_setup()
    model, Xtr, ytr, Xte, yte = setup
    iterations, subsets = (100, 12) if quick else (500, 100)
    hook = exemplar.LastLayer(model)
    train = hook.collect([(Xtr, ytr)], progress=False)
    test = hook.collect([(Xte, yte)], progress=False)
    W, b = hook.weight.detach(), hook.bias.detach()
    start = time.monotonic()
    whole = whole_model_truth(setup, iterations, subsets)
    whole_s = time.monotonic() - start
    head = exemplar.retrain_head(train, test, WEIGHT_DECAY, weight=W, bias=b, subsets=subsets)
    rows, summary = [], {"whole_s": whole_s}
    for label in ("exact", "ekfac", "identity"):
        attr = exemplar.Attributor(train, damping=WEIGHT_DECAY, weight=W, bias=b, **CURVATURES[label])
        methods = CURVED + (FLAT if label == "exact" else ())
        on_whole = exemplar.lds(attr, test, whole, methods).methods
        on_head = exemplar.lds(attr, test, head, methods).methods
        for m in methods:
            rows.append([f"{m} ({label})", f"{on_whole[m].value:.3f} [{on_whole[m].low:.3f}, {on_whole[m].high:.3f}]",
                         f"{on_head[m].value:.3f}"])
            summary[f"whole/{m}/{label}"], summary[f"head/{m}/{label}"] = on_whole[m].value, on_head[m].value
    results.add(f"### Whole model: MLP 64-64-10 (tanh) on digits, trained end to end\n\nN = {len(ytr)}, "
                f"T = {len(yte)} (log p of the true label), M = {subsets} random halves, each retrained from the "
                f"trained weights by full-batch L-BFGS ({iterations} iterations, weight decay {WEIGHT_DECAY} on "
                f"every parameter), {whole_s:.0f} s. Last-layer attribution (damping {WEIGHT_DECAY}) judged "
                "against the whole-model retrains, and against retraining the head alone on the same subsets.\n\n"
                + table(["method (curvature)", "LDS, whole-model retrain [95 %]", "LDS, head retrain"], rows))
    return summary


def lds_table(quick: bool, results: Results) -> dict:
    summary = digits_lr(quick, results)
    summary.update(whole_model(quick, results))
    if not quick:
        summary.update(fashion_head(quick, results))
        summary.update(imdb_head(quick, results))
    return summary
