"""How to show a training or test example: its input (an image or a text)
and its label, for exemplar.report and exemplar.plot."""
from __future__ import annotations

import struct
import zlib

import torch

from ..results import Explanation

# What each method's score means, for the report's and the demo's legends.
SCORE_UNITS = {
    "if": "influence g_t·H⁻¹g_i: raising the training example's weight in the mean training loss by ε "
          "lowers the test loss by about ε·score nats, so removing it (ε = -1/N) raises the test loss by "
          "about score/N; + supports the explained label, - opposes it",
    "theta_relatif": "influence divided by |H⁻¹g_i|, the size of the training example's own "
                     "effect on the parameters: the test gradient's component along that effect. "
                     "Comparable across examples, not across tests; favours examples that matter for "
                     "this test in particular rather than for every test",
    "l_relatif": "influence divided by √(g_i·H⁻¹g_i), the training example's self-influence",
    "grad_dot": "g_t·g_i: the first-order change in the test loss from a gradient step on the training "
                "example (no curvature)",
    "grad_cos": "cosine of the test and training loss gradients, in [-1, 1]",
    "rps_l2": "representer value: the training example's additive contribution to the explained logit",
    "rps_lje": ("representer value at the LJE-refitted layer: the training example's additive contribution "
                "to the explained logit"),
    "knn": "-|f_t - f_i|²: minus the squared distance between last-layer features (nearest first)",
}


# The names readers know, for headings and legends.
METHOD_NAMES = {"if": "IF", "theta_relatif": "θ-RelatIF", "l_relatif": "ℓ-RelatIF", "grad_dot": "grad-dot",
                "grad_cos": "grad-cos", "rps_l2": "RPS-l2", "rps_lje": "RPS-LJE", "knn": "kNN"}


def method_name(method: str) -> str:
    """The name a reader knows for a method ("θ-RelatIF" for "theta_relatif"); others as they are."""
    return METHOD_NAMES.get(method, method)


class Examples:
    """Inputs to show, by example index: a tensor or array (N, ...) of images
    ((H, W), (1|3, H, W), (H, W, 3), or flat rows with image_shape), a
    sequence of strings (texts), a callable index -> image or text, or None
    (nothing to show but the index)."""

    def __init__(self, inputs, image_shape=None):
        if inputs is not None and not (callable(inputs) or hasattr(inputs, "__getitem__")):
            raise TypeError("inputs must be a tensor/array of images, a sequence of texts, a callable "
                            f"index -> image or text, or None; got {type(inputs).__name__}")
        self.inputs, self.image_shape = inputs, image_shape

    def __getitem__(self, index: int):
        """An image as a float array (H, W) or (H, W, 3) scaled to [0, 1], a str, or None."""
        if self.inputs is None:
            return None
        item = self.inputs(index) if callable(self.inputs) else self.inputs[index]
        if item is None or isinstance(item, str):
            return item
        return as_image(item, self.image_shape)


def as_image(item, image_shape=None) -> torch.Tensor:
    """An image-like value as float (H, W) or (H, W, 3) in [0, 1] (min-max scaled
    unless it already lies in [0, 1])."""
    x = torch.as_tensor(item).detach().cpu().double()
    if image_shape is not None:
        if x.numel() != torch.Size(tuple(image_shape)).numel():
            raise ValueError(f"an input of shape {tuple(x.shape)} cannot be shown as image_shape={tuple(image_shape)}")
        x = x.reshape(tuple(image_shape))
    if x.dim() == 3 and x.shape[0] in (1, 3) and x.shape[2] not in (1, 3):
        x = x.permute(1, 2, 0)
    if x.dim() == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.dim() == 1:
        side = int(round(x.numel() ** 0.5))
        if side * side != x.numel():
            raise ValueError(f"a flat input of {x.numel()} values is not a square image; pass image_shape=")
        x = x.view(side, side)
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[2] != 3):
        raise ValueError(f"an image must be (H, W), (1|3, H, W) or (H, W, 3), got {tuple(x.shape)}")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return x


def png_bytes(image: torch.Tensor) -> bytes:
    """A PNG file of an image from as_image() (grayscale or RGB, 8 bits)."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = pixels.shape[:2]
    color = 2 if pixels.dim() == 3 else 0
    rows = pixels.reshape(height, -1)
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], 1).numpy().tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) \
        + chunk(b"IEND", b"")


def by_heading(explanations, test_names=None, test_labels=None) -> tuple[dict, int]:
    """({heading: Explanation}, T): an Explanation (headed by its method) or a
    dict of them, checked to cover the same T tests as test_names and
    test_labels (when given)."""
    if isinstance(explanations, Explanation):
        explanations = {method_name(explanations.method) if explanations.method else "scores": explanations}
    if not isinstance(explanations, dict) or not explanations \
            or not all(isinstance(e, Explanation) for e in explanations.values()):
        raise TypeError("explanations must be an Explanation or a non-empty dict {heading: Explanation}")
    T = {len(e) for e in explanations.values()}
    if len(T) != 1:
        raise ValueError(f"the explanations cover different numbers of tests: {sorted(T)}")
    T = T.pop()
    for name, given in (("test_names", test_names), ("test_labels", test_labels)):
        if given is not None and len(given) != T:
            raise ValueError(f"{name} must have T={T} entries, got {len(given)}")
    return explanations, T


def test_name(t: int, test_names=None) -> str:
    """The caption of test row t: test_names[t], or "test #t"."""
    return f"test #{t}" if test_names is None else str(test_names[t])


def class_name(label: int, class_names=None) -> str:
    """The class's readable name from class_names, or its index."""
    return str(label) if class_names is None else f"{class_names[label]}"
