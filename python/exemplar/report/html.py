"""exemplar.report: one self-contained HTML file to look at explanations in a
browser: per test example its input, label and prediction, and the top
proponents and opponents of one or more methods side by side; plus a page of
self-influence suspects. Images are inlined as PNG data, texts shown as text;
the file references nothing outside itself."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import torch

from ..analysis.debugging import suspicion_order
from ..storage.saved import write_atomic
from .counterfactual import section
from .display import SCORE_UNITS, Examples, by_heading, class_name, method_name, png_bytes, test_name

TEXT_LIMIT = 1200  # characters of a text shown in full; longer ones are cut with a marker

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
nav a{margin-right:1.5em} h2{margin-top:2em;border-bottom:1px solid #ccc}
.legend{font-size:.9em;color:#444;max-width:70em}
.test{border:1px solid #ddd;border-radius:6px;padding:.8em;margin:1em 0;display:flex;gap:1.2em}
.query{min-width:9em;max-width:22em;flex:0 0 auto} .methods{display:grid;gap:1.5em;flex:1}
.method h4{margin:.2em 0} .row{display:flex;gap:.5em;flex-wrap:wrap;margin-bottom:.6em}
.ex{font-size:.78em;flex:1 1 9em;max-width:15em}
.ex img,.query img,.suspects img{width:72px;image-rendering:pixelated;display:block}
.text{white-space:pre-wrap;border:1px solid #eee;background:#fafafa;padding:.3em;max-height:9em;overflow:auto}
.pos{color:#1a6b1a} .neg{color:#a01818} .kind{font-weight:600;font-size:.85em;margin:.3em 0}
figure{margin:1em 0} figcaption{font-size:.85em;color:#444;max-width:36em}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}
"""

# Sets data-broken-images on <body> once loaded, the smallest rendered width
# of the proponents' and the suspects' thumbnails, and how many points of the
# counterfactual scatter were drawn: how a headless browser test sees that
# every inlined image decoded, that none is shown too small to read, and that
# the scatter is there.
CHECK_IMAGES = ("<script>addEventListener('load',()=>{const d=document.body.dataset,"
                "w=s=>Math.min(...[...document.querySelectorAll(s)].map(i=>i.getBoundingClientRect().width));"
                "d.brokenImages=[...document.images].filter(i=>!i.complete||i.naturalWidth===0).length;"
                "d.exampleWidth=w('.ex img');d.suspectWidth=w('.suspects img');"
                "d.scatterPoints=[...document.querySelectorAll('svg.scatter circle')]"
                ".filter(c=>c.getBoundingClientRect().width>0).length})</script>")


def report(path, explanations, test_inputs=None, train_inputs=None, *, train_labels=None,
           test_labels=None, class_names=None, test_names=None, self_influence=None,
           suspects: int = 24, self_influence_method: str = "if", image_shape=None,
           evaluation=None, title: str = "exemplar report") -> Path:
    """Writes one self-contained HTML file (images inlined, nothing fetched).

    Arguments:
        path: the .html file to write (atomically).
        explanations: an Explanation, or a dict {heading: Explanation} of
            several methods over the same tests, shown side by side (e.g.
            {"IF": e1, "θ-RelatIF": e2}); each shows its proponents and, when
            computed (opponents=m), its opponents.
        test_inputs: what to show per test: a tensor/array of images (T, ...),
            a sequence of texts, a callable index -> image or text, or None.
        train_inputs: the same per training example (N, ...).
        train_labels: (N,) the training labels shown under each example.
        test_labels: (T,) the tests' true labels, when known.
        class_names: names indexed by class.
        test_names: a caption per test (default "test #i", i its row).
        self_influence: (N,) scores by `self_influence_method` (e.g.
            attr.self_influence("if")): lists the `suspects` first in
            inspection order on a page of their own, the training examples
            most worth checking for wrong labels.
        suspects: how many suspects to list (>= 1).
        self_influence_method: the method self_influence was computed by.
        image_shape: reshapes flat rows of inputs into images.
        evaluation: an Evaluation (exemplar.lds or leave_one_out over the
            same tests): a section with each method's value and interval,
            and a scatter of one method's predictions against retraining.
        title: the page's title.

    Returns:
        The Path written."""
    explanations, T = by_heading(explanations, test_names, test_labels)
    if isinstance(suspects, bool) or not isinstance(suspects, int) or suspects < 1:
        raise ValueError(f"suspects must be an integer >= 1, got {suspects!r}")
    if evaluation is not None and evaluation.actual.shape[0] != T:
        raise ValueError(f"evaluation is over {evaluation.actual.shape[0]} tests, the explanations over {T}")
    tests, train = Examples(test_inputs, image_shape), Examples(train_inputs, image_shape)
    first = next(iter(explanations.values()))

    def label_of(i):
        return None if train_labels is None else int(train_labels[i])

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style>{CHECK_IMAGES}</head><body>",
             f"<h1>{html.escape(title)}</h1><nav><a href='#explanations'>Explanations ({T} tests)</a>"
             + ("<a href='#suspects'>Self-influence suspects</a>" if self_influence is not None else "")
             + ("<a href='#counterfactual'>Counterfactual check</a>" if evaluation is not None else "")
             + "</nav>", "<div class='legend'><p>Proponents: training examples whose scores support the "
             "test's explained label (most positive first); opponents: those that oppose it (most negative "
             "first). Each is captioned with its training index (train #i, a row of the training set), its "
             "label and its score. <i>p</i> is the model's softmax probability of the explained label. "
             "Scores:</p><ul>"]
    for heading, e in explanations.items():
        units = SCORE_UNITS.get(e.method, "see the method's documentation")
        parts.append(f"<li><b>{html.escape(heading)}</b>: {html.escape(units)}</li>")
    parts.append("</ul></div><h2 id='explanations'>Explanations</h2>")
    columns = f"grid-template-columns:repeat({len(explanations)},minmax(0,1fr))"  # methods side by side
    for t in range(T):
        name = test_name(t, test_names)
        explained, predicted = int(first.labels[t]), int(first.predictions[t])
        lines = [f"<b>{html.escape(name)}</b>"]
        if test_labels is not None:
            lines.append(f"label: {html.escape(class_name(int(test_labels[t]), class_names))}")
        lines.append(f"predicted: {html.escape(class_name(predicted, class_names))}")
        if explained != predicted:
            lines.append(f"explained: {html.escape(class_name(explained, class_names))}")
        if first.probabilities is not None:
            lines.append(f"<i>p</i> = {float(first.probabilities[t]):.3f}")
        parts.append(f"<div class='test'><div class='query'>{_show(tests[t])}{'<br>'.join(lines)}</div>"
                     f"<div class='methods' style='{columns}'>")
        for heading, e in explanations.items():
            parts.append(f"<div class='method'><h4>{html.escape(heading)}</h4>")
            rows = [("proponents", e.indices[t], e.scores[t])]
            if e.opponents is not None:
                rows.append(("opponents", e.opponents.indices[t], e.opponents.values[t]))
            for kind, indices, scores in rows:
                parts.append(f"<div class='kind'>{kind}</div><div class='row'>")
                for i, score in zip(indices.tolist(), scores.tolist()):
                    parts.append(_example(train[i], i, label_of(i), score, class_names))
                parts.append("</div>")
            parts.append("</div>")
        parts.append("</div></div>")
    if self_influence is not None:
        parts.append(_suspects(self_influence, suspects, self_influence_method, train, label_of, class_names))
    if evaluation is not None:
        parts.append(section(evaluation, test_names))
    parts.append("</body></html>")
    path = Path(path)
    write_atomic(path, "".join(parts).encode("utf-8"))
    return path


def _suspects(scores, count, method, train, label_of, class_names) -> str:
    scores = torch.as_tensor(scores).detach().cpu().double().reshape(-1)
    order = suspicion_order(scores, method)[:count]
    rows = ["<h2 id='suspects'>Self-influence suspects</h2><p class='legend'>The training examples with the "
            f"largest self-influence ({html.escape(method_name(method))}: the score of each example for its "
            "own label), "
            "most suspicious first: the model finds them hard, and mislabelled examples rank high. Check "
            "their labels first.</p><table class='suspects'><tr><th>rank</th><th>example</th><th>index</th>"
            "<th>label</th><th>self-influence</th></tr>"]
    for rank, i in enumerate(order.tolist()):
        label = label_of(i)
        rows.append(f"<tr><td>{rank + 1}</td><td>{_show(train[i])}</td><td>#{i}</td>"
                    f"<td>{'' if label is None else html.escape(class_name(label, class_names))}</td>"
                    f"<td>{float(scores[i]):.4g}</td></tr>")
    return "".join(rows) + "</table>"


def _example(item, index, label, score, class_names) -> str:
    sign = "pos" if score > 0 else "neg" if score < 0 else ""
    caption = f"train #{index}" + ("" if label is None else f", label {html.escape(class_name(label, class_names))}")
    return (f"<div class='ex'>{_show(item)}{caption}<br>score <span class='{sign}'>{score:.4g}</span></div>")


def _show(item) -> str:
    if item is None:
        return ""
    if isinstance(item, str):
        text = item if len(item) <= TEXT_LIMIT else item[:TEXT_LIMIT] + " […]"
        return f"<div class='text'>{html.escape(text)}</div>"
    data = base64.b64encode(png_bytes(item)).decode("ascii")
    return f"<img alt='' src='data:image/png;base64,{data}'>"
