"""The main job, on a bundled data set: logistic regression on scikit-learn's
8x8 digits; for the test images the model finds hardest, the training images
that most support and most oppose its prediction by influence (IF) and by
theta-RelatIF, side by side, plus the training images most likely to be
mislabelled. Saves a PNG grid and a self-contained HTML report.

    python -m exemplar.demo [--tests 4] [--k 3] [--weight-decay 1e-3] [--out exemplar-demo]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import exemplar
from exemplar.report.display import SCORE_UNITS
from exemplar.testing.linear import fit_softmax_regression

N_TRAIN = 1200
METHODS = {"IF": "if", "θ-RelatIF": "theta_relatif"}


def main(argv=None) -> None:
    """Runs the demo (python -m exemplar.demo --help for its options)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=4, help="test images to explain (the hardest first)")
    parser.add_argument("--k", type=int, default=3, help="proponents and opponents per method")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--out", default="exemplar-demo", help="folder for demo.png and report.html")
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    Xtr, ytr, Xte, yte = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    ones = torch.ones(len(X), 1, dtype=torch.float64)
    start = time.perf_counter()
    theta = fit_softmax_regression(torch.cat([Xtr, ones[:N_TRAIN]], 1), ytr, 10, args.weight_decay)
    logits_tr = torch.cat([Xtr, ones[:N_TRAIN]], 1) @ theta.T
    logits_te = torch.cat([Xte, ones[N_TRAIN:]], 1) @ theta.T
    accuracy = float((logits_te.argmax(1) == yte).double().mean())
    print(f"scikit-learn digits: {N_TRAIN} training / {len(Xte)} test images, 8x8. Logistic regression "
          f"(weight decay {args.weight_decay}): test accuracy {accuracy:.3f}, fitted in "
          f"{time.perf_counter() - start:.2f}s.")

    train = exemplar.LastLayerData(Xtr, logits_tr, ytr)
    attr = exemplar.Attributor(train, curvature="exact", damping=args.weight_decay)
    # The hardest cases first: mistakes, then the least confident.
    confidence = torch.softmax(logits_te, 1).gather(1, yte[:, None]).squeeze(1)
    chosen = torch.argsort(confidence, stable=True)[: args.tests]
    test = exemplar.LastLayerData(Xte[chosen], logits_te[chosen])  # labels=None: explain the prediction
    start = time.perf_counter()
    explanations = {name: attr.explain(test, args.k, method, opponents=args.k) for name, method in METHODS.items()}
    suspects = attr.self_influence("if")
    print(f"Explained {len(chosen)} predictions with IF and θ-RelatIF (exact curvature, damping "
          f"{args.weight_decay}; {args.k} proponents and {args.k} opponents each) and ranked the training "
          f"set by self-influence in {time.perf_counter() - start:.3f}s.\n")
    print("Test images are named by their position in the test split (0 to "
          f"{len(Xte) - 1}), training images by their row in the training split (#0 to #{N_TRAIN - 1}). "
          "p is the model's probability of the class it predicted. Scores:")
    for name, method in METHODS.items():
        print(f"  {name}: {SCORE_UNITS[method]}.")
    print("IF favours high-loss, rarely-seen training images; θ-RelatIF divides out each image's global "
          "influence and favours those that matter for this test image in particular (Barshan et al. 2020).\n")
    names = [f"test #{t}" for t in chosen.tolist()]
    first = explanations["IF"]
    for row, name in enumerate(names):
        t = int(chosen[row])
        print(f"{name}: true {int(yte[t])}, predicted {int(first.predictions[row])} with "
              f"p={float(first.probabilities[row]):.3f}")
        for heading, e in explanations.items():
            for kind, indices, scores in (("supports", e.indices[row], e.scores[row]),
                                          ("opposes", e.opponents.indices[row], e.opponents.values[row])):
                shown = ", ".join(f"#{i} (label {int(ytr[i])}, {s:+.3g})"
                                  for i, s in zip(indices.tolist(), scores.tolist()))
                print(f"  {heading:>9} {kind}: {shown}")
    top = exemplar.analysis.debugging.suspicion_order(suspects, "if")[:5].tolist()
    print("\nTraining images most worth a label check (largest IF self-influence): "
          + ", ".join(f"#{i} (label {int(ytr[i])})" for i in top))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = exemplar.plot.grid(explanations, Xte[chosen], Xtr, train_labels=ytr, test_labels=yte[chosen],
                                test_names=names, image_shape=(8, 8), path=out / "demo.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    exemplar.report(out / "report.html", explanations, Xte[chosen], Xtr, train_labels=ytr,
                    test_labels=yte[chosen], test_names=names, self_influence=suspects, image_shape=(8, 8),
                    title="exemplar demo: scikit-learn digits, logistic regression")
    print(f"\nWrote {(out / 'demo.png').resolve()} (the grid: each row a test image and its proponents, "
          f"then opponents)\nand {(out / 'report.html').resolve()} (open it in a browser: both methods side "
          "by side, and a page of self-influence suspects).")


if __name__ == "__main__":
    main()
