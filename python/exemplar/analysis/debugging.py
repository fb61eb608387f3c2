"""Data debugging (Koh & Liang §5.4; Sui et al. §4.2): rank training points for
label inspection by self-influence or |self-contribution|, and measure on a
deliberately corrupted training set how many flipped labels each ranking finds
for a given inspection budget, and how much retraining after the fixes recovers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import methods
from ..data import LastLayerData, check_labels_in_range
from ..engine import Attributor
from ..progress import Progress

DEBUG_METHODS = ("if", "rps_l2", "rps_lje", "random")


def inspection_order(attributor: Attributor, method: str = "if") -> torch.Tensor:
    """Training examples in the order to check their labels.

    Arguments:
        attributor: the Attributor over the training set.
        method: an influence method (by self-influence) or a representer one
            (by |self-contribution| |alpha_i K(x_i, x_i)|); not kNN.

    Returns:
        (N,) training indices, most suspicious first."""
    _check_ranked(method)
    return suspicion_order(attributor.self_influence(method), method)


def suspicion_order(self_influence: torch.Tensor, method: str) -> torch.Tensor:
    """inspection_order from self-influence scores (N,) already computed by `method`."""
    _check_ranked(method)
    score = self_influence.abs() if methods.get(method).family == "representer" else self_influence
    return torch.sort(score, descending=True, stable=True).indices


def _check_ranked(method: str) -> None:
    ranked = methods.names("influence") + methods.names("representer")
    if method not in ranked:
        raise ValueError(f"method must be one of {ranked}, got {method!r}")


def flip_labels(labels: torch.Tensor, num_classes: int, fraction: float, seed: int = 0):
    """Flips a fraction of labels to another class, for label-debugging experiments.

    Arguments:
        labels: (N,) integer labels in [0, num_classes).
        num_classes: C >= 2.
        fraction: in [0, 1]: round(fraction * N) labels, chosen uniformly,
            each moved to a uniformly chosen different class.
        seed: the generator's seed.

    Returns:
        (noisy labels (N,), flipped mask (N,) bool)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    check_labels_in_range(labels, num_classes, bound="num_classes")
    g = torch.Generator().manual_seed(seed)
    N = labels.shape[0]
    picked = torch.randperm(N, generator=g)[:round(fraction * N)]
    noisy = labels.clone().cpu()
    noisy[picked] = (noisy[picked] + torch.randint(1, num_classes, (len(picked),), generator=g)) % num_classes
    flipped = torch.zeros(N, dtype=torch.bool)
    flipped[picked] = True
    return noisy.to(labels.device), flipped.to(labels.device)


def found_fraction(order: torch.Tensor, flipped: torch.Tensor, checked) -> list[float]:
    """Fraction of all flipped labels among the first `c * N` of `order`, per c in checked."""
    hits = torch.cumsum(flipped[order].double(), 0)
    total = max(int(flipped.sum()), 1)
    N = order.shape[0]
    return [float(hits[round(c * N) - 1]) / total if round(c * N) > 0 else 0.0 for c in checked]


@dataclass
class Fit:
    """What the user's retrain callback returns: the last layer's data on the
    training set (labels as trained on), the layer, and the test accuracy."""
    train: LastLayerData
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor | None  # (C,)
    test_accuracy: float | None = None


@dataclass
class DebugReport:
    fraction_flipped: float
    checked: list[float]
    found: dict[str, list[float]]
    accuracy_checked: list[float] = field(default_factory=list)
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    accuracy_clean: float | None = None
    accuracy_noisy: float | None = None

    def to_markdown(self) -> str:
        """The report as a Markdown table, one row per fraction checked."""
        methods = list(self.found)
        lines = [f"Flipped {self.fraction_flipped:.0%} of the training labels.", "",
                 "| fraction checked | " + " | ".join(f"found ({m})" for m in methods) + " |",
                 "|---|" + "---|" * len(methods)]
        for i, c in enumerate(self.checked):
            lines.append(f"| {c:.2f} | " + " | ".join(f"{self.found[m][i]:.3f}" for m in methods) + " |")
        if self.accuracy:
            lines += ["", f"Test accuracy: clean labels {self.accuracy_clean:.4f}, "
                          f"flipped labels {self.accuracy_noisy:.4f}; after fixing the checked ones:", "",
                      "| fraction checked | " + " | ".join(f"accuracy ({m})" for m in self.accuracy) + " |",
                      "|---|" + "---|" * len(self.accuracy)]
            for i, c in enumerate(self.accuracy_checked):
                lines.append(f"| {c:.2f} | " + " | ".join(f"{self.accuracy[m][i]:.4f}" for m in self.accuracy) + " |")
        return "\n".join(lines)


def debug_labels(retrain: Callable[[torch.Tensor], Fit], labels: torch.Tensor, num_classes: int,
                 fraction: float = 0.2, methods=DEBUG_METHODS,
                 checked=tuple(i / 20 for i in range(11)), accuracy_checked=(),
                 seed: int = 0, progress: bool | None = None, **attributor_kwargs) -> DebugReport:
    """How fast each method finds flipped labels (Sui et al. Fig. 4).

    Arguments:
        retrain: labels (N,) -> Fit: the last layer refitted on those labels.
        labels: (N,) the clean training labels.
        num_classes: C.
        fraction: of the labels to flip.
        methods: rankings to compare (influence and representer methods, "random").
        checked: fractions of the training set checked, in inspection order.
        accuracy_checked: fractions at which the flipped labels found are
            fixed, the layer retrained and the test accuracy recorded.
        seed: for the flips and the random ranking.
        progress: a progress line per retrain.
        attributor_kwargs: passed to the Attributor.

    Returns:
        A DebugReport: the fraction of flipped labels found per fraction
        checked, per method (to_markdown() prints it)."""
    unknown = [m for m in methods if m not in DEBUG_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {DEBUG_METHODS}, got {unknown}")
    noisy, flipped = flip_labels(labels, num_classes, fraction, seed)
    steps = 2 + len(methods) * len(accuracy_checked)
    bar = Progress("debug_labels retrains", steps, progress)
    clean_fit = retrain(labels)
    bar.update()
    fit = retrain(noisy)
    bar.update()
    train = LastLayerData(fit.train.features, fit.train.logits, noisy.to(fit.train.features.device))
    attr = Attributor(train, weight=fit.weight, bias=False if fit.bias is None else fit.bias,
                      **attributor_kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    orders = {m: torch.randperm(len(train), generator=g).to(labels.device) if m == "random"
              else inspection_order(attr, m) for m in methods}
    report = DebugReport(fraction, list(checked), {m: found_fraction(o, flipped, checked) for m, o in orders.items()},
                         accuracy_checked=list(accuracy_checked),
                         accuracy_clean=clean_fit.test_accuracy, accuracy_noisy=fit.test_accuracy)
    for m, order in orders.items() if accuracy_checked else ():
        report.accuracy[m] = []
        for c in accuracy_checked:
            fixed = noisy.clone()
            seen = order[:round(c * len(order))]
            fixed[seen] = labels[seen]  # inspecting a point reveals its true label
            report.accuracy[m].append(retrain(fixed).test_accuracy)
            bar.update()
    bar.close()
    return report
