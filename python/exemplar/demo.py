"""The main job, on a bundled data set: logistic regression on scikit-learn's
8x8 digits, then for a few test images the three most helpful training images
by influence (IF) and by theta-RelatIF, drawn side by side.

    python -m exemplar.demo [--tests 4] [--k 3] [--weight-decay 1e-3]
"""
from __future__ import annotations

import argparse
import time

import torch

import exemplar
from exemplar.linear import fit_softmax_regression

SHADES = " .:-=+*#%@"


def ascii_image(pixels: torch.Tensor) -> list[str]:
    """8x8 intensities in [0, 1] -> 8 rows of 16 characters."""
    rows = []
    for row in pixels.view(8, 8).tolist():
        rows.append("".join(SHADES[min(int(v * (len(SHADES) - 1) + 0.5), len(SHADES) - 1)] * 2 for v in row))
    return rows


def panel(images, captions) -> str:
    width = 18
    lines = ["".join(c.ljust(width + 2) for c in captions)]
    for r in range(8):
        lines.append("".join(("|" + img[r] + "|").ljust(width + 2) for img in images))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=4, help="test images to explain")
    parser.add_argument("--k", type=int, default=3, help="training images per method")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    n_train = 1200
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    bias = torch.ones(len(X), 1, dtype=torch.float64)
    start = time.perf_counter()
    theta = fit_softmax_regression(torch.cat([Xtr, bias[:n_train]], 1), ytr, 10, args.weight_decay)
    logits_tr = torch.cat([Xtr, bias[:n_train]], 1) @ theta.T
    logits_te = torch.cat([Xte, bias[n_train:]], 1) @ theta.T
    accuracy = float((logits_te.argmax(1) == yte).double().mean())
    print(f"scikit-learn digits: {n_train} train / {len(Xte)} test images, 8x8. "
          f"Logistic regression (weight decay {args.weight_decay}) test accuracy {accuracy:.3f}, "
          f"fitted in {time.perf_counter() - start:.2f}s.")

    train = exemplar.LastLayerData(Xtr, logits_tr, ytr)
    attr = exemplar.Attributor(train, curvature="exact", damping=args.weight_decay)
    probs_tr = torch.softmax(logits_tr, 1)
    # Explain the hardest cases first: mistakes, then the least confident.
    probs_te = torch.softmax(logits_te, 1)
    confidence = probs_te.gather(1, yte[:, None]).squeeze(1)
    chosen = torch.argsort(confidence)[: args.tests]
    test = exemplar.LastLayerData(Xte[chosen], logits_te[chosen])  # labels=None: explain the prediction
    start = time.perf_counter()
    results = {m: attr.topk(test, args.k, m) for m in ("if", "theta_relatif")}
    print(f"Explained {len(chosen)} predictions with IF and theta-RelatIF "
          f"(exact curvature, damping {args.weight_decay}) in {time.perf_counter() - start:.3f}s.\n"
          "Each row: the test image, then its top training images; p = the model's "
          "probability of that image's own label.\n")
    for row, t in enumerate(chosen.tolist()):
        pred = int(logits_te[t].argmax())
        print(f"test #{n_train + t}: true {int(yte[t])}, predicted {pred} with p={float(probs_te[t, pred]):.3f}")
        for method, (values, indices) in results.items():
            images, captions = [ascii_image(Xte[t])], [f"test -> {pred}"]
            for v, i in zip(values[row].tolist(), indices[row].tolist()):
                images.append(ascii_image(Xtr[i]))
                captions.append(f"#{i} y={int(ytr[i])} p={float(probs_tr[i, ytr[i]]):.2f}")
            scores = ", ".join(f"{v:.3g}" for v in values[row].tolist())
            print(f"  {method:>13}: scores {scores}")
            print(panel(images, captions))
        print()
    print("IF favours high-loss, rarely-seen training points; theta-RelatIF divides by each point's "
          "global influence |H^-1 g_i| and favours points that matter for this test image in particular.")


if __name__ == "__main__":
    main()
