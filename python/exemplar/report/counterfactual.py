"""The report's counterfactual section (docs/design.md §10): each method's
LDS or leave-one-out correlation with its interval, and a scatter (inline
SVG, no image library) of what one method predicted against what retraining
did, for one test example."""
from __future__ import annotations

import html

import torch

from .display import method_name, test_name

WIDTH, HEIGHT, MARGIN = 420, 300, 48
WHAT = {"lds": ("LDS", "the summed scores of the subset's training examples", "the retrained model's {target}"),
        "leave_one_out": ("leave-one-out correlation", "the score of the removed training example",
                          "the change in {target} that keeping it made")}


def section(evaluation, test_names=None, scatter_method: str | None = None, scatter_test: int | None = None) -> str:
    """HTML of an analysis.counterfactual.Evaluation: the table and one scatter."""
    name, x_label, y_label = WHAT[evaluation.kind]
    meta = evaluation.meta
    target = {"log_prob": "log p of the label", "margin": "margin log(p/(1-p))", "prob": "p of the label"}.get(
        meta.get("target"), str(meta.get("target")))
    T, M = evaluation.actual.shape
    level = round(100 * evaluation.confidence)
    what = (f"{M} retrains on random subsets of {meta.get('fraction')} of the training set (seed {meta.get('seed')})"
            if evaluation.kind == "lds" else f"{M} retrains, each without one training example")
    rows = [f"<h2 id='counterfactual'>Counterfactual check: {name}</h2><p class='legend'>Would retraining really "
            f"change the predictions the way the scores say? {html.escape(what)}; output: {html.escape(target)}. "
            + ("LDS is the mean over the tests of the Spearman correlation, across retrains, between a method's "
               "prediction (the summed scores of each subset) and the retrained output (Park et al. 2023). "
               if evaluation.kind == "lds" else "The Pearson correlation over every (test, removed example) pair "
               "between the score and the effect of keeping the example. ")
            + f"Intervals: {level} % bootstrap over test examples. θ-RelatIF and ℓ-RelatIF rank training examples "
            "for a test rather than predict retraining, so a lower value than IF's is expected of them.</p>"
            f"<table class='evaluation'><tr><th>method</th><th>{name}</th><th>{level} % interval</th>"
            "<th>tests</th></tr>"]
    for c in evaluation.methods.values():
        used = T - sum(c.left_out.values())
        why = "; ".join(f"{n} {html.escape(r)}" for r, n in c.left_out.items())
        rows.append(f"<tr><td>{html.escape(method_name(c.method))}</td><td>{c.value:.3f}</td>"
                    f"<td>[{c.low:.3f}, {c.high:.3f}]</td><td>{used} of {T}{' (left out: ' + why + ')' if why else ''}"
                    "</td></tr>")
    rows.append("</table>")
    chosen = evaluation.methods[scatter_method or next(iter(evaluation.methods))]
    t = _median_test(chosen.per_test) if scatter_test is None else scatter_test
    rows.append(f"<figure>{scatter(chosen.predicted[t], evaluation.actual[t])}<figcaption>"
                f"{html.escape(test_name(t, test_names))}, {html.escape(method_name(chosen.method))}: one point per "
                f"retrain; x: {html.escape(x_label)}; y: {html.escape(y_label.format(target=target))}; "
                f"correlation {float(chosen.per_test[t]):.3f} (the test with the median correlation)</figcaption>"
                "</figure>")
    return "".join(rows)


def _median_test(per_test: torch.Tensor) -> int:
    defined = torch.nonzero(~torch.isnan(per_test)).flatten()
    order = defined[per_test[defined].argsort()]
    return int(order[len(order) // 2])


def scatter(x: torch.Tensor, y: torch.Tensor) -> str:
    """An SVG scatter plot of y against x with their ranges on the axes."""
    x, y = x.double().cpu(), y.double().cpu()

    def scale(v, lo_px, hi_px):
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo if hi > lo else 1.0
        return lo_px + (v - lo) / span * (hi_px - lo_px), lo, hi

    px, x0, x1 = scale(x, MARGIN + 8, WIDTH - 16)  # inset: no point drawn on an axis
    py, y0, y1 = scale(y, HEIGHT - MARGIN - 8, 16)
    dots = "".join(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='3'/>" for a, b in zip(px.tolist(), py.tolist()))
    axes = (f"<line x1='{MARGIN}' y1='{HEIGHT - MARGIN}' x2='{WIDTH - 12}' y2='{HEIGHT - MARGIN}'/>"
            f"<line x1='{MARGIN}' y1='{HEIGHT - MARGIN}' x2='{MARGIN}' y2='12'/>")
    ticks = (f"<text x='{MARGIN + 8}' y='{HEIGHT - MARGIN + 16}' text-anchor='middle'>{x0:.3g}</text>"
             f"<text x='{WIDTH - 16}' y='{HEIGHT - MARGIN + 16}' text-anchor='middle'>{x1:.3g}</text>"
             f"<text x='{WIDTH / 2}' y='{HEIGHT - 8}' text-anchor='middle'>predicted</text>"
             f"<text x='{MARGIN - 4}' y='{HEIGHT - MARGIN - 4}' text-anchor='end'>{y0:.3g}</text>"
             f"<text x='{MARGIN - 4}' y='20' text-anchor='end'>{y1:.3g}</text>"
             f"<text x='14' y='{HEIGHT / 2}' transform='rotate(-90 14 {HEIGHT / 2})' "
             "text-anchor='middle'>actual</text>")
    return (f"<svg class='scatter' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
            f"font-size='11' stroke='#444'><g>{axes}</g><g stroke='none' fill='#222'>{ticks}</g>"
            f"<g fill='#1f5fa8' fill-opacity='0.7' stroke='none'>{dots}</g></svg>")
