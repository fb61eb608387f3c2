"""Curvature per layer for whole-network attribution (docs/design.md §11):
block-diagonal over layers, each block the Fisher of the per-example loss
in that layer's (projected) gradient space, fitted in float64 from the
label choices of NetworkExplainer's `fisher` (weights p_c for the expected
Fisher, which for cross-entropy is the Gauss-Newton matrix):

* KroneckerLayer: K-FAC, G x A with A = E[a a^T] over positions and
  G = E[sum_p delta delta^T], damped in their eigenbasis; EK-FAC refits
  the eigenvalues in that basis (a second pass).
* ExactLayer: the layer's whole (k_out k_in)-square Fisher, damped and
  factorised (Cholesky); for layers small enough (EXACT_MAX_WIDTH)."""
from __future__ import annotations

import torch

from ..curvature.base import inverse_damped
from ..curvature.kfac import Eigenbasis

# Widest layer gradient (k_out k_in) ExactLayer takes: its float64 square is 2 GiB.
EXACT_MAX_WIDTH = 16384
# Elements of a batch's per-example second moments the factored fast paths may hold.
MOMENT_ELEMENTS = 1 << 25


def _weighted(x: torch.Tensor, weights) -> torch.Tensor:
    """x (B, ...) float64 scaled per example by weights (B,) (None: 1)."""
    x = x.double()
    return x if weights is None else x * weights.view(-1, *([1] * (x.dim() - 1))).to(x.device)


def _layer_choices(choices, j: int):
    """[(weights, delta (B, P, k_out) float64, a (B, P, k_in) float64)] of layer j for one batch."""
    return [(w, captured[j][0].double(), captured[j][1].double()) for w, captured in choices]


def _gradients(choices) -> list[tuple]:
    """[(weights, g (B, k_out, k_in))]: each choice's per-example gradients sum_p delta_p a_p^T."""
    return [(w, d.transpose(1, 2) @ a) for w, d, a in choices]


def _saved(tensors: dict, key: str, shape: tuple) -> torch.Tensor:
    """A fit cache's tensor, checked (shape, float64, finite) like user input."""
    t = tensors.get(key)
    if t is None or tuple(t.shape) != shape or t.dtype != torch.float64 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"the store's fit holds {key} as "
                         f"{None if t is None else (tuple(t.shape), t.dtype)}, expected finite float64 {shape}; "
                         "delete the store's fits/ folder to recompute")
    return t


class KroneckerLayer(Eigenbasis):
    """(Q_G x Q_A) diag(w) (Q_G x Q_A)^T for one layer: K-FAC or EK-FAC."""

    def tensors(self, j: int) -> dict[str, torch.Tensor]:
        """What a store's fit cache keeps of layer j."""
        return {f"{j}.qg": self.qg, f"{j}.qa": self.qa, f"{j}.w": self.w}

    @classmethod
    def from_tensors(cls, tensors: dict, j: int, layer) -> "KroneckerLayer":
        """Layer j's curvature from a store's fit cache, checked against the layer's sides."""
        o, i = layer.k_out, layer.k_in
        return cls(_saved(tensors, f"{j}.qg", (o, o)), _saved(tensors, f"{j}.qa", (i, i)),
                   _saved(tensors, f"{j}.w", (o, i)))

    def norms(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (n,), for g (n, k_out, k_in)."""
        rotated = (self.qg.T @ g.double() @ self.qa).square()
        return (rotated * self.w.square()).sum((1, 2)), (rotated * self.w).sum((1, 2))

    @classmethod
    def identity(cls, layers, damping: float) -> list["KroneckerLayer"]:
        """H^-1 = I / damping per layer (I at damping 0), as curvature/identity.py: no fit."""
        eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
        scale = 1 / damping if damping > 0 else 1.0
        return [cls(eye(layer.k_out), eye(layer.k_in), torch.full((layer.k_out, layer.k_in), scale,
                                                                  dtype=torch.float64)) for layer in layers]

    @staticmethod
    def _rotated_sq_sum(choices, qg, qa) -> torch.Tensor:
        """sum_i w_i (Q_G^T g_i Q_A)^2 over one batch's choices, (k_out, k_in). One
        position per example: (Q_G^T delta)^2 (Q_A^T a)^2^T, one GEMM per choice."""
        total = 0
        for w, d, a in choices:
            if d.shape[1] == 1:
                total = total + _weighted((d[:, 0] @ qg).square(), w).T @ (a[:, 0] @ qa).square()
            else:
                total = total + _weighted((qg.T @ (d.transpose(1, 2) @ a) @ qa).square(), w).sum(0)
        return total

    @classmethod
    def fit(cls, layers, passes, N: int, damping: float, refit: bool, reduce) -> list["KroneckerLayer"]:
        """passes() yields per batch its Fisher label choices [(weights (B,) or None,
        [per layer (delta (B, P, k_out), a (B, P, k_in))])] (this rank's batches);
        reduce(tensors) sums them over the ranks in place; refit: EK-FAC's
        eigenvalues from a second pass."""
        A = [torch.zeros(layer.k_in, layer.k_in, dtype=torch.float64) for layer in layers]
        G = [torch.zeros(layer.k_out, layer.k_out, dtype=torch.float64) for layer in layers]
        positions = torch.zeros(len(layers), dtype=torch.float64)
        for choices in passes():
            for j in range(len(layers)):
                for w, d, a in _layer_choices(choices, j):
                    A[j] += torch.einsum("bpi,bpj->ij", _weighted(a, w), a).cpu()
                    G[j] += torch.einsum("bpi,bpj->ij", _weighted(d, w), d).cpu()
                    positions[j] += float(a.shape[1] * (len(a) if w is None else w.sum()))
        reduce((*A, *G, positions))
        bases = []
        for j in range(len(layers)):
            sa, qa = torch.linalg.eigh(A[j] / max(float(positions[j]), 1.0))
            sg, qg = torch.linalg.eigh(G[j] / N)
            bases.append((qg, qa, torch.outer(sg.clamp_min(0), sa.clamp_min(0))))
        if refit:
            sums = [torch.zeros_like(eig) for _, _, eig in bases]
            for choices in passes():
                for j, (qg, qa, _) in enumerate(bases):
                    sums[j] += cls._rotated_sq_sum(_layer_choices(choices, j), qg, qa).cpu()
            reduce(tuple(sums))
            bases = [(qg, qa, s / N) for (qg, qa, _), s in zip(bases, sums)]
        return [cls(qg, qa, inverse_damped(eig, damping)) for qg, qa, eig in bases]


class ExactLayer:
    """One layer's whole damped Fisher F + damping I = L L^T in its (k_out k_in)
    gradient space, kept as its Cholesky factor L (solves, never an inverse)."""

    def __init__(self, chol: torch.Tensor, shape: tuple[int, int]):
        self.chol, self.shape = chol, shape  # (W, W) lower-triangular float64, (k_out, k_in)

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """H^-1 V for V (T, k_out, k_in), float64."""
        return torch.cholesky_solve(V.double().flatten(1).T, self.chol).T.reshape(-1, *self.shape)

    def tensors(self, j: int) -> dict[str, torch.Tensor]:
        """What a store's fit cache keeps of layer j."""
        return {f"{j}.chol": self.chol}

    @classmethod
    def from_tensors(cls, tensors: dict, j: int, layer) -> "ExactLayer":
        """Layer j's curvature from a store's fit cache, checked against the layer's width."""
        chol = _saved(tensors, f"{j}.chol", (layer.width, layer.width))
        if not (bool(torch.equal(chol, chol.tril())) and bool((chol.diagonal() > 0).all())):
            raise ValueError(f"the store's fit holds {j}.chol, which is not a Cholesky factor; delete the store's "
                             "fits/ folder to recompute")
        return cls(chol, (layer.k_out, layer.k_in))

    def norms(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (n,), for g (n, k_out, k_in)."""
        flat = g.double().flatten(1)
        solved = torch.cholesky_solve(flat.T, self.chol).T
        return solved.square().sum(1), (solved * flat).sum(1)

    @staticmethod
    def _moment(choices, shape) -> torch.Tensor:
        """sum_i sum_c w_ic vec(g_ic) vec(g_ic)^T over one batch, (W, W). With one
        position per example g_ic = delta_ic a_i^T, so this is
        sum_i G_i x a_i a_i^T with G_i = sum_c w_ic delta_ic delta_ic^T: one GEMM
        of (k_out^2, B) by (B, k_in^2), C times fewer flops than per choice."""
        k_out, k_in = shape
        B = len(choices[0][1])
        if choices[0][1].shape[1] == 1 and B * (k_out ** 2 + k_in ** 2) <= MOMENT_ELEMENTS:
            a = choices[0][2][:, 0]
            G = sum(torch.einsum("bo,bp->bop", _weighted(d[:, 0], w), d[:, 0]) for w, d, _ in choices)
            moment = G.reshape(B, -1).T @ torch.einsum("bi,bj->bij", a, a).reshape(B, -1)
            return moment.view(k_out, k_out, k_in, k_in).permute(0, 2, 1, 3).reshape(k_out * k_in, -1)
        return sum((_weighted(g.flatten(1), w).T @ g.flatten(1)) for w, g in _gradients(choices))

    @classmethod
    def fit(cls, layers, passes, N: int, damping: float, refit: bool, reduce) -> list["ExactLayer"]:
        """As KroneckerLayer.fit, one pass (refit is unused): each layer's
        (1/N) sum_ic w_ic vec(g_ic) vec(g_ic)^T + damping I, inverted."""
        if not damping > 0:
            raise ValueError("curvature='exact' needs damping > 0 (each layer's Fisher is singular when the layer "
                             "has more gradient entries than training examples)")
        wide = [layer for layer in layers if layer.width > EXACT_MAX_WIDTH]
        if wide:
            raise ValueError(f"curvature='exact': layer {wide[0].name!r} has {wide[0].width} gradient entries per "
                             f"example (k_out {wide[0].k_out} x k_in {wide[0].k_in}), more than {EXACT_MAX_WIDTH} "
                             "(its Fisher would not fit); use projection= (e.g. 64) or curvature='ekfac'")
        F = [torch.zeros(layer.width, layer.width, dtype=torch.float64) for layer in layers]
        for choices in passes():
            for j, layer in enumerate(layers):
                F[j] += cls._moment(_layer_choices(choices, j), (layer.k_out, layer.k_in)).cpu()
        reduce(tuple(F))
        out = []
        for layer, f in zip(layers, F):
            damped = f / N + damping * torch.eye(layer.width, dtype=torch.float64)
            out.append(cls(torch.linalg.cholesky(damped), (layer.k_out, layer.k_in)))
        return out
