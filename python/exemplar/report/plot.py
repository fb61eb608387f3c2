"""exemplar.plot: a matplotlib grid of test images and their top training
images, one row per (test, method). Needs matplotlib (pip install matplotlib)."""
from __future__ import annotations

from .display import Examples, by_heading, class_name, test_name


def grid(explanations, test_inputs, train_inputs, *, train_labels=None, test_labels=None,
         class_names=None, test_names=None, image_shape=None, path=None, cell: float = 1.3):
    """A matplotlib grid: per test and method, the test image then its top-k
    proponents (and opponents, when the Explanation has them), each captioned
    with its training index, label and score, under a title and a legend.

    Arguments:
        explanations: an Explanation or a dict {heading: Explanation}.
        test_inputs, train_inputs: images, as for exemplar.report.
        train_labels, test_labels, class_names, test_names, image_shape: as
            for exemplar.report.
        path: also save the figure there (PNG at 150 dpi).
        cell: inches per image.

    Returns:
        The matplotlib Figure. The test caption gives its name, true label
        (when given), prediction and p, the model's probability of the
        explained label."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")  # saving needs no display
    import matplotlib.pyplot as plt

    explanations, T = by_heading(explanations, test_names, test_labels)
    tests, train = Examples(test_inputs, image_shape), Examples(train_inputs, image_shape)
    rows = []
    for t in range(T):
        for heading, e in explanations.items():
            items = [(i, s, "") for i, s in zip(e.indices[t].tolist(), e.scores[t].tolist())]
            if e.opponents is not None:
                items += [(i, s, "opp. ") for i, s in zip(e.opponents.indices[t].tolist(),
                                                            e.opponents.values[t].tolist())]
            rows.append((t, heading, e, items))
    width = 1 + max(len(items) for *_, items in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(cell * width, cell * 1.25 * len(rows)), squeeze=False)
    for r, (t, heading, e, items) in enumerate(rows):
        name = test_name(t, test_names)
        truth = "" if test_labels is None else f"label {class_name(int(test_labels[t]), class_names)}, "
        p = "" if e.probabilities is None else f" p={float(e.probabilities[t]):.2f}"
        _draw(axes[r][0], tests[t], f"{name}\n{truth}pred {class_name(int(e.predictions[t]), class_names)}{p}")
        axes[r][0].set_ylabel(heading, fontsize=8)
        for c, (i, score, kind) in enumerate(items, start=1):
            label = "" if train_labels is None else f", label {class_name(int(train_labels[i]), class_names)}"
            _draw(axes[r][c], train[i], f"{kind}#{i}{label}\nscore {score:.3g}")
        for c in range(len(items) + 1, width):
            axes[r][c].axis("off")
    methods = ", ".join(explanations)
    fig.suptitle(f"Training images behind each test prediction, by {methods}", fontsize=10)
    fig.text(0.5, 0.005, "Each row: a test image (name, true label, the model's prediction, p = its probability "
             "of the explained label), then its top proponents, most supportive first, and its opponents "
             "('opp.'), most opposing first. Under each training image: #i, its row in the training set, "
             "its label and its score. Pixels as given: 0 is black.", ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _draw(ax, image, caption: str) -> None:
    if image is None or isinstance(image, str):
        raise TypeError("exemplar.plot.grid draws images; use exemplar.report for texts")
    # Pixel values as they are (0 black), as exemplar.report's PNGs show them.
    ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7)
