"""A whole network's curvature as one (docs/design.md §11): block-diagonal
over its layers, each block a curvature form fitted by `fit_layers`. The
network is seen as a head with C = 1: a training row is r_i = 1 and phi_i =
every layer's per-example gradient flattened and joined, so every method's
score, normaliser and self-influence is the last layer's formula."""
from __future__ import annotations

import torch

from ..ops import Rank1
from .base import Curvature, form, shape_and_dtype


class LayerBlocks(Curvature):
    """H^-1 = diag(H_1^-1, ..., H_L^-1) over flattened layer gradients; each
    block is applied to its layer's (k_out, k_in) gradient by its solve."""

    def __init__(self, blocks: list[Curvature], layer_shapes: list[tuple[int, int]]):
        self.blocks, self.layer_shapes = blocks, layer_shapes

    def _split(self, phi: torch.Tensor) -> list[torch.Tensor]:
        """phi (n, P) -> per layer (n, k_out, k_in) views."""
        widths = [o * i for o, i in self.layer_shapes]
        return [part.view(len(phi), *shape) for part, shape in zip(phi.split(widths, 1), self.layer_shapes)]

    def precondition(self, r, phi):
        solved = torch.cat([block.solve(g).flatten(1) for block, g in zip(self.blocks, self._split(phi))], 1)
        return Rank1(r, solved.to(phi.dtype))

    def norms(self, R, Phi, N=None):
        theta, quad = 0, 0
        for block, g in zip(self.blocks, self._split(Phi)):
            t, q = block.matrix_norms(g)
            theta, quad = theta + t, quad + q
        scale = R.double().square().sum(1)  # |r|^2: r = 1 for a network's rows
        return (theta * scale).to(R.dtype), (quad * scale).to(R.dtype)

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, kinds): every block's tensors as `layer{j}.{name}` and its
        form's name as kinds[`layer{j}`], what a fit cache keeps."""
        tensors = {f"layer{j}.{k}": v.contiguous() for j, b in enumerate(self.blocks) for k, v in b.state().items()}
        return tensors, {f"layer{j}": type(b).__name__ for j, b in enumerate(self.blocks)}

    @classmethod
    def restored(cls, tensors: dict[str, torch.Tensor], kinds: dict[str, str],
                 layer_shapes: list[tuple[int, int]]) -> "LayerBlocks":
        """What `saved` gave, checked like user input against the layers'
        (k_out, k_in): every form known, every tensor present, of its shape,
        float64 unless the form says otherwise, and finite."""
        if set(kinds) != {f"layer{j}" for j in range(len(layer_shapes))}:
            raise ValueError(f"holds curvatures of layers {sorted(kinds)}, expected {len(layer_shapes)} layers")
        expected = {}
        for j, shape in enumerate(layer_shapes):
            for name, spec in form(kinds[f"layer{j}"]).shapes(*shape).items():
                expected[f"layer{j}.{name}"] = shape_and_dtype(spec, torch.float64)
        if set(tensors) != set(expected):
            raise ValueError(f"holds tensors {sorted(set(tensors) ^ set(expected))} it should not, or lacks them")
        for key, (dims, dtype) in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(dims) or t.dtype != dtype or not bool(torch.isfinite(t).all()):
                raise ValueError(f"holds {key} as {tuple(t.shape)} {t.dtype}, expected finite {dims} {dtype}")
        blocks = [form(kinds[f"layer{j}"])(**{k.split(".", 1)[1]: v for k, v in tensors.items()
                                             if k.split(".", 1)[0] == f"layer{j}"})
                  for j in range(len(layer_shapes))]
        return cls(blocks, layer_shapes)
