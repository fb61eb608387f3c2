"""The field's counterfactual yardsticks for any Attributor and method
(docs/design.md §10), against a retraining.Retraining:

* `lds`, the linear datamodeling score (Park et al. 2023): per test, the
  Spearman correlation over retrains j between the attribution's prediction
  sum_{i in S_j} score(t, i) and the retrained model's output; LDS is its
  mean over tests.
* `leave_one_out`: the Pearson correlation over (test, removed row) pairs
  between score(t, i) and the effect of keeping row i, the full model's
  output minus the output retrained without it.

Both come with a percentile bootstrap interval over test examples. Tests on
which a correlation is undefined (constant predictions or outputs) are left
out and counted by reason, never averaged in as NaN."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import methods as registry
from .. import storage
from ..data import LastLayerData
from ..storage.saved import digest
from .retraining import Retraining

BOOTSTRAP = 1000  # resamples of the test set for the interval
# Methods that score without the trained layer; the representer methods need it.
WITHOUT_LAYER = ("if", "theta_relatif", "l_relatif", "grad_dot", "grad_cos", "knn")
WITH_LAYER = ("rps_l2", "rps_lje")


@dataclass
class Correlation:
    """One method's agreement with retraining.

    Attributes:
        method: the method's name.
        value: LDS (mean over tests of the per-test Spearman correlation), or
            for leave-one-out the Pearson correlation over all pairs.
        low, high: the bootstrap interval over tests at the Evaluation's confidence.
        per_test: (T,) float64, each test's correlation (NaN where left out).
        predicted: (T, M) float64, what the method predicts per test and retrain.
        left_out: reason -> number of tests left out for it.
        spearman: leave-one-out only, the Spearman correlation over all pairs."""
    method: str
    value: float
    low: float
    high: float
    per_test: torch.Tensor
    predicted: torch.Tensor
    left_out: dict[str, int] = field(default_factory=dict)
    spearman: float | None = None


@dataclass
class Evaluation:
    """Methods measured against one Retraining.

    Attributes:
        kind: "lds" or "leave_one_out".
        methods: method name -> Correlation.
        actual: (T, M) float64: the retrained outputs (LDS) or the effects of
            keeping each removed row (leave-one-out), for the retrains used.
        retrains: (M,) which of the Retraining's retrains were used.
        confidence: the interval's coverage.
        meta: the Retraining's parameters, the Attributor's settings, the
            bootstrap's resamples and seed."""
    kind: str
    methods: dict[str, Correlation]
    actual: torch.Tensor
    retrains: torch.Tensor
    confidence: float
    meta: dict

    def to_pandas(self):
        """A DataFrame, one row per method: method, value, low, high, tests, tests_left_out."""
        import pandas

        T = self.actual.shape[0]
        return pandas.DataFrame([{"method": c.method, self.kind: c.value, "low": c.low, "high": c.high,
                                  "tests": T - sum(c.left_out.values()), "tests_left_out": sum(c.left_out.values())}
                                 for c in self.methods.values()])

    def to_markdown(self) -> str:
        """A Markdown table: method, value and interval, tests used."""
        level = f"{round(100 * self.confidence)} %"
        lines = [f"| method | {self.kind} | {level} interval | tests |", "|---|---|---|---|"]
        T = self.actual.shape[0]
        for c in self.methods.values():
            lines.append(f"| {c.method} | {c.value:.3f} | [{c.low:.3f}, {c.high:.3f}] | "
                         f"{T - sum(c.left_out.values())} of {T} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks within each row of x (R, M), ties sharing their mean rank, float64."""
    R, M = x.shape
    s, order = x.sort(dim=1)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    group = (starts.long().cumsum(1) - 1 + M * torch.arange(R).unsqueeze(1)).flatten()
    position = torch.arange(M, dtype=torch.float64).repeat(R)
    mean = torch.zeros(R * M, dtype=torch.float64).scatter_reduce(0, group, position, "mean", include_self=False)
    return torch.empty(R, M, dtype=torch.float64).scatter_(1, order, mean[group].view(R, M))


def pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair, (R,); NaN where a row is constant."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    scale = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(scale > 0, (x * y).sum(1) / scale.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.full_like(scale, float("nan")))


def _resample_counts(T: int, bootstrap: int, seed: int) -> torch.Tensor:
    """(bootstrap, T) float64: how often each test is drawn in each resample."""
    draws = torch.randint(0, T, (bootstrap, T), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(bootstrap, T, dtype=torch.float64).scatter_add_(1, draws, torch.ones(bootstrap, T,
                                                                                              dtype=torch.float64))


def _interval(values: torch.Tensor, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    q = torch.quantile(values[torch.isfinite(values)], torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _pooled_pearson(sums: torch.Tensor) -> torch.Tensor:
    """Pearson from (..., 6) sums n, Sx, Sy, Sxx, Syy, Sxy."""
    n, sx, sy, sxx, syy, sxy = sums.unbind(-1)
    cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
    return cov / (vx * vy).sqrt()


def _check(attr, test, truth: Retraining, kind: str, methods, confidence: float, bootstrap: int):
    """The checked test set, the retrains to use and the method names."""
    if not isinstance(truth, Retraining):
        raise TypeError(f"truth must be an exemplar Retraining (retrain_head / retrain_model), "
                        f"got {type(truth).__name__}")
    if truth.kind != kind:
        use = "lds" if truth.kind == "subsets" else "leave_one_out"
        raise ValueError(f"truth holds retrains of kind {truth.kind!r}, not {kind!r}: use exemplar.{use} for it")
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 10:
        raise ValueError(f"bootstrap must be an integer >= 10, got {bootstrap!r}")
    test = attr.check_test(test)
    M, N = truth.masks.shape
    if N != attr.num_train:
        raise ValueError(f"truth was retrained on N={N} training rows, the Attributor has N={attr.num_train}")
    if truth.outputs.shape != (M, len(test)):
        raise ValueError(f"truth.outputs has shape {tuple(truth.outputs.shape)}, expected (M, T) = ({M}, {len(test)}) "
                         "for this test set")
    train, held = truth.meta.get("train"), truth.meta.get("test")
    if not isinstance(test, LastLayerData):  # a NetworkExplainer's test gradients
        if train is not None or held is not None:
            raise ValueError("truth retrained a last layer on fixed features (retrain_head); a whole network is "
                             "judged against retraining the whole model (retrain_model)")
        if methods is None:  # the built-in ones a network runs: those not reading a trained head
            methods = tuple(name for name in WITHOUT_LAYER if not registry.get(name).needs_head)
    if train is not None and train != storage.training_set(attr.train, attr.settings.bias).fingerprint():
        raise ValueError("truth was retrained on another training set than the Attributor's (content fingerprints "
                         "differ); retrain on this one")
    if held is not None and held != digest(test.features, test.logits, test.labels)[:16]:
        raise ValueError("truth was measured on another test set (or other labels) than this one (digests differ)")
    if methods is None:
        methods = WITHOUT_LAYER + (WITH_LAYER if attr.theta is not None else ())
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise ValueError("methods must name at least one method")
    used = truth.usable
    if len(used) < 3:
        raise ValueError(f"only {len(used)} of {M} retrains are usable ({truth.summary()}): a correlation needs "
                         "at least 3")
    return test, used, methods


def _left_out(per_test: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, int]:
    """Why tests have no correlation, by reason."""
    reasons = {}
    undefined = torch.isnan(per_test)
    for reason, rows in (("non-finite scores", ~torch.isfinite(predicted).all(1)),
                         ("constant prediction", predicted.amax(1) == predicted.amin(1)),
                         ("constant retrained output", actual.amax(1) == actual.amin(1))):
        count = int((undefined & rows).sum())
        undefined &= ~rows
        if count:
            reasons[reason] = count
    return reasons


def lds(attr, test, truth: Retraining, methods=None, confidence: float = 0.95, bootstrap: int = BOOTSTRAP,
        seed: int = 0) -> Evaluation:
    """The linear datamodeling score of each method, against retraining.

    Arguments:
        attr: the Attributor (or NetworkExplainer) whose scores are judged.
        test: the test set truth was measured on (a LastLayerData; for a
            NetworkExplainer its loader or check_test's result).
        truth: a Retraining of kind "subsets" (retrain_head, retrain_model).
        methods: names (default: every built-in method the Attributor can
            run; the representer methods need its layer).
        confidence: the bootstrap interval's coverage.
        bootstrap: resamples of the tests; seed seeds them.

    Returns:
        Evaluation: per method its LDS, interval, per-test Spearman and
        predictions. Retrains truth excludes are never used."""
    test, used, methods = _check(attr, test, truth, "subsets", methods, confidence, bootstrap)
    actual = truth.outputs[used].T.contiguous()  # (T, M)
    counts = _resample_counts(len(test), bootstrap, seed)
    out = {}
    for method in methods:
        predicted = attr.subset_scores(test, truth.masks[used], method).cpu()
        finite = torch.isfinite(predicted).all(1)
        per_test = pearson_rows(average_ranks(predicted.nan_to_num()), average_ranks(actual))
        per_test[~finite] = float("nan")
        ok = ~torch.isnan(per_test)
        if not bool(ok.any()):
            raise ValueError(f"{method}: no test has a defined correlation ({_left_out(per_test, predicted, actual)})")
        values, weights = per_test[ok], counts[:, ok]
        means = (weights @ values) / weights.sum(1)
        out[method] = Correlation(method, float(values.mean()), *_interval(means, confidence), per_test, predicted,
                                  _left_out(per_test, predicted, actual))
    return Evaluation("lds", out, actual, used, confidence,
                      {**truth.meta, "settings": attr.settings.to_dict(), "bootstrap": bootstrap, "seed": seed})


def leave_one_out(attr, test, truth: Retraining, methods=None, confidence: float = 0.95,
                  bootstrap: int = BOOTSTRAP, seed: int = 0) -> Evaluation:
    """How well each method's scores predict leave-one-out retraining.

    Arguments:
        attr, test, methods, confidence, bootstrap, seed: as for lds.
        truth: a Retraining of kind "removals" (retrain_head(..., remove=)).

    Returns:
        Evaluation: per method the Pearson (value) and Spearman correlations
        over all (test, removed row) pairs between score(t, i) and the
        effect of keeping row i (truth.base - the output retrained without
        it; for IF about score / N), with per-test Pearson correlations."""
    test, used, methods = _check(attr, test, truth, "removals", methods, confidence, bootstrap)
    if truth.base is None:
        raise ValueError("truth has no base outputs (the model trained on every row): leave-one-out needs them")
    N = attr.num_train
    removed = truth.removed[used]
    single = torch.zeros(len(used), N, dtype=torch.bool)
    single[torch.arange(len(used)), removed] = True
    effect = (truth.base.unsqueeze(1) - truth.outputs[used].T).contiguous()  # (T, M)
    counts = _resample_counts(len(test), bootstrap, seed)
    out = {}
    for method in methods:
        scores = attr.subset_scores(test, single, method).cpu()  # (T, M): score(t, removed_j)
        finite = torch.isfinite(scores).all(1)
        if not bool(finite.any()):
            raise ValueError(f"{method}: every test has non-finite scores")
        x, y = scores[finite], effect[finite]
        per_test = torch.full((len(test),), float("nan"), dtype=torch.float64)
        per_test[finite] = pearson_rows(x, y)
        sums = torch.stack([torch.full((len(x),), float(x.shape[1]), dtype=torch.float64), x.sum(1), y.sum(1),
                            (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)], 1)  # per test
        value = float(_pooled_pearson(sums.sum(0)))
        if value != value:
            raise ValueError(f"{method}: the scores or the effects are the same for every pair; no correlation")
        spearman = float(pearson_rows(average_ranks(x.reshape(1, -1)), average_ranks(y.reshape(1, -1)))[0])
        resampled = _pooled_pearson(counts[:, finite] @ sums)
        out[method] = Correlation(method, value, *_interval(resampled, confidence), per_test, scores,
                                  _left_out(per_test, scores, effect), spearman)
    return Evaluation("leave_one_out", out, effect, used, confidence,
                      {**truth.meta, "settings": attr.settings.to_dict(), "bootstrap": bootstrap, "seed": seed})
