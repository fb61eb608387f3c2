"""What every curvature is (docs/design.md §2): the damped inverse
H_lambda^-1 of the last layer's Gauss-Newton Hessian in a form the kernels
consume, and the registry through which `curvature=` names one.

A curvature answers two questions: precondition a batch of test gradients
g_t = r_t phi_t^T into S_t = H_lambda^-1 g_t (ops.General, ops.Rank1 or
ops.LowRank), and give every training example's |H_lambda^-1 g_i|^2 and
g_i^T H_lambda^-1 g_i. Statistics come from the ops in float64,
decompositions are torch.linalg in float64, and the operators used for
scoring are cast to the data's dtype."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..ops import General

# With damping 0, eigen-directions whose eigenvalue falls below this fraction
# of the largest get weight 0 instead of 1/0: the inverse becomes the
# pseudo-inverse (H is singular along the softmax's redundant direction).
RCOND = 1e-10
# Curvatures whose largest eigenvalue is below this fraction of the scale of
# the terms summed into them are rounding noise (float64 eps is ~1e-16).
PSEUDO_INVERSE_FLOOR = 1e-12
# The one text for a rank= the chosen curvature cannot truncate.
RANK_APPLIES = "rank applies to curvature='kfac' or 'ekfac' with kfac_damping='eigenbasis'"


class Statistics:
    """Means over the training set for fitting a curvature: `mean(fn)` is
    (1/N) sum_i of what fn(phi (b, Dp), logits (b, C)) returns as per-block
    means (a tuple of float64 tensors), block by block and across ranks."""
    N: int
    C: int
    Dp: int
    dtype: torch.dtype
    device: torch.device

    def mean(self, fn) -> tuple[torch.Tensor, ...]:
        """(1/N) sum over the training set of fn's per-block means."""
        raise NotImplementedError


class LayerStatistics:
    """Sums over the training set for fitting the curvature of a whole
    network's layers, from the per-example output gradients of its Fisher
    (models.NetworkExplainer's `fisher`): `sums(fn)` runs one pass over the
    model and returns, per layer j, the sum over the training set (and the
    ranks) of fn(j, choices), a tuple of float64 tensors, where one batch's
    choices are [(weights (B,) float64 or None, delta (B, P, k_out),
    a (B, P, k_in))], both float64: each label choice's output gradients and
    the layer's inputs at its P positions, so that the choice's gradient is
    sum_p delta_p a_p^T, weighted (the expected Fisher's p_c) or not."""
    shapes: list[tuple[int, int]]  # (k_out, k_in) per layer
    names: list[str]  # the layers' names, for messages
    N: int

    def sums(self, fn) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the sum of fn(j, choices) over every batch."""
        raise NotImplementedError


def shape_and_dtype(spec: tuple, default: torch.dtype) -> tuple[tuple, torch.dtype]:
    """A saved tensor's spec (a form's shapes()): its dimensions, optionally
    followed by its dtype (else `default`)."""
    if spec and isinstance(spec[-1], torch.dtype):
        return spec[:-1], spec[-1]
    return spec, default


class HeadFisher(LayerStatistics):
    """A last layer's Statistics seen as one network layer's LayerStatistics:
    per block the expected Fisher's choices, every class c weighted by p_c
    with output gradient p - e_c at the one position phi (exactly the
    Gauss-Newton matrix, as the closed forms compute it)."""

    def __init__(self, data: Statistics):
        self.data, self.N = data, data.N
        self.shapes, self.names = [(data.C, data.Dp)], ["the last layer"]

    def sums(self, fn):
        def block(phi, logits):
            p = torch.softmax(logits.double(), 1)
            a = phi.double().unsqueeze(1)
            onehot = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            choices = [(p[:, c], (p - onehot[c]).unsqueeze(1), a) for c in range(p.shape[1])]
            return tuple(x / len(phi) for x in fn(0, choices))  # Statistics.mean takes each block's mean
        return [tuple(x * self.N for x in self.data.mean(block))]


def weighted(x: torch.Tensor, weights) -> torch.Tensor:
    """x (B, ...) float64 scaled per example by weights (B,) (None: 1)."""
    return x if weights is None else x * weights.view(-1, *([1] * (x.dim() - 1))).to(x.device)


_NAMES: dict[str, type["Curvature"]] = {}  # curvature= values
_FORMS: dict[str, type["Curvature"]] = {}  # what saved state may hold, by class name


class Curvature:
    """One curvature. A subclass decorated with @register is a value of
    `curvature=` (its `name`); every subclass is a form saved state may hold,
    named by its class.

    A registered class implements fit_layers, fit, or both:
        fit_layers(layer_statistics, settings) -> [Curvature per layer]: the
            curvature of each layer of a whole network, from its
            LayerStatistics, block-diagonal over the layers; without it a
            NetworkExplainer refuses the name.
        fit(statistics, settings) -> Curvature: fitted on a last layer's
            Statistics with the Settings' damping, kfac_damping and rank; it
            may return an instance of another subclass (K-FAC's factored form).
            By default fit_layers on the last layer seen as one layer
            (HeadFisher): a curvature written once serves both facades.
        forms(settings) -> names of the classes fit may return (the first is
            the one it returns); saved state is checked against them.
        check(settings): refuses settings this curvature cannot honour
            (by default, any rank=).
    Every form implements shapes(C, Dp) (its saved tensors' shapes, "m" for
    a free rank, optionally followed by a dtype), precondition(r (T, C),
    phi (T, Dp)), norms(R (b, C), Phi (b, Dp), N) -> (|H^-1 g_i|^2,
    g_i^T H^-1 g_i) each (b,), and optionally quad_norms, the second alone;
    a form fit_layers returns implements solve(V) and, optionally,
    matrix_norms(G) for general (n, k_out, k_in) gradients. Its state is its
    public attributes, the keyword arguments of __init__."""
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _FORMS[cls.__name__] = cls

    @classmethod
    def fit(cls, data: Statistics, settings) -> "Curvature":
        """The damped inverse curvature fitted on `data` with `settings`; by
        default fit_layers' on the last layer seen as one network layer
        (HeadFisher), so a curvature written once serves both facades."""
        if not fits_layers(cls):
            raise NotImplementedError(f"{cls.__name__} defines neither fit nor fit_layers")
        return cls.fit_layers(HeadFisher(data), settings)[0]

    @classmethod
    def fit_layers(cls, data: LayerStatistics, settings) -> list["Curvature"]:
        """Per layer of a whole network, this curvature fitted on `data` with
        the settings' damping."""
        raise NotImplementedError

    @classmethod
    def forms(cls, settings) -> tuple[str, ...]:
        """The class names fit may return with these settings."""
        return (cls.__name__,)

    @classmethod
    def check(cls, settings) -> None:
        """Refuses settings this curvature cannot honour."""
        if settings.rank is not None:
            raise ValueError(f"{RANK_APPLIES}, got curvature={settings.curvature!r}, "
                             f"kfac_damping={settings.kfac_damping!r}")

    @staticmethod
    def shapes(C: int, Dp: int) -> dict[str, tuple]:
        """Every saved tensor's shape (and dtype when not the data's)."""
        raise NotImplementedError

    def precondition(self, r: torch.Tensor, phi: torch.Tensor):
        """S_t = H^-1 (r_t phi_t^T) for a batch: ops.General, ops.Rank1 or
        ops.LowRank; by default General(solve(r_t phi_t^T))."""
        return General(self.solve(r.unsqueeze(2) * phi.unsqueeze(1)).to(phi.dtype))

    def norms(self, R: torch.Tensor, Phi: torch.Tensor, N: int | None = None):
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (b,); N: rows in the whole
        training set, when R and Phi are one block of it. By default
        matrix_norms of the (b, C, Dp) gradients."""
        theta, quad = self.matrix_norms(R.unsqueeze(2) * Phi.unsqueeze(1))
        return theta.to(R.dtype), quad.to(R.dtype)

    def quad_norms(self, R: torch.Tensor, Phi: torch.Tensor) -> torch.Tensor:
        """g_i^T H^-1 g_i, (b,)."""
        return self.norms(R, Phi)[1]

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """H^-1 V for general matrices V (M, C, Dp), not only rank-1 gradients,
        in float64 (a last layer's: with V's component along the softmax's
        null direction, the same row added to every class, dropped): how a
        network layer's test gradients are preconditioned. Forms without it
        raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} cannot precondition general matrices")

    def matrix_norms(self, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (n,) float64, for general
        gradients G (n, C, Dp): through solve unless a form has a faster way."""
        solved = self.solve(G)
        return solved.square().sum((1, 2)), (solved * G.double()).sum((1, 2))

    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this curvature without refitting."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def register(cls: type[Curvature]) -> type[Curvature]:
    """Class decorator: makes `cls.name` a curvature every API accepts."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered as a curvature")
    if cls.name in _NAMES:
        raise ValueError(f"curvature {cls.name!r} is already registered")
    if cls.fit.__func__ is Curvature.fit.__func__ and not fits_layers(cls):
        raise ValueError(f"{cls.__name__} needs fit_layers (a network's layers, and by default a last layer) "
                         "or fit (a last layer) to be registered as a curvature")
    _NAMES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Removes a registered curvature name (its forms stay loadable)."""
    del _NAMES[name]


def names() -> tuple[str, ...]:
    """The registered curvature names, in registration order."""
    return tuple(_NAMES)


def get(name) -> type[Curvature]:
    """The curvature class registered as `name`."""
    if not isinstance(name, str) or name not in _NAMES:
        raise ValueError(f"curvature must be one of {names()}, got {name!r}")
    return _NAMES[name]


def fits_layers(cls: type[Curvature]) -> bool:
    """Whether the curvature class defines fit_layers (can fit a whole network's layers)."""
    return cls.fit_layers.__func__ is not Curvature.fit_layers.__func__


def get_for_layers(name) -> type[Curvature]:
    """The curvature class registered as `name`, refused unless it can fit a whole network's layers."""
    cls = get(name)
    if not fits_layers(cls):
        able = tuple(n for n in names() if fits_layers(get(n)))
        raise ValueError(f"curvature={name!r} has no fit for a whole network's layers (its class defines no "
                         f"fit_layers); use one of {able}")
    return cls


def form(kind: str) -> type[Curvature]:
    """The curvature class saved state names `kind`."""
    if kind not in _FORMS:
        raise ValueError(f"unknown curvature kind {kind!r}; expected one of {tuple(_FORMS)}")
    return _FORMS[kind]


def state(curvature: Curvature) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, tensors): everything needed to rebuild `curvature` without refitting."""
    return type(curvature).__name__, curvature.state()


def from_state(kind: str, tensors: dict[str, torch.Tensor]) -> Curvature:
    """The curvature of form `kind` rebuilt from its state."""
    return form(kind)(**tensors)


def build(settings, data: Statistics) -> Curvature:
    """The damped inverse curvature of these settings, fitted on `data`; its
    tensors contiguous, as saved state holds them, so a curvature reloaded
    from a file or a store scores bit for bit the same."""
    fitted = get(settings.curvature).fit(data, settings)
    for key, value in fitted.state().items():
        setattr(fitted, key, value.contiguous())
    return fitted


def mean_sq_norm(phi: torch.Tensor) -> torch.Tensor:
    """mean |phi_i|^2 (0-dim float64), row norms so no (b, Dp) float64 copy."""
    return torch.linalg.vector_norm(phi, dim=1).double().square().mean()


def gradient_sq_norms(R: torch.Tensor, Phi: torch.Tensor) -> torch.Tensor:
    """|r_i|^2 |phi_i|^2 = |g_i|^2, (N,) float64: the product of the row norms is
    squared in float64, where it cannot under- or overflow, with no (N, D) temporary."""
    return (torch.linalg.vector_norm(R, dim=1).double() * torch.linalg.vector_norm(Phi, dim=1).double()).square()


def inverse_damped(eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    """1 / (eigenvalue + damping) of a PSD matrix's eigenvalues; negative ones
    are rounding and count as 0. Damping 0 gives the pseudo-inverse."""
    damped = eigenvalues.clamp_min(0) + damping
    if damping > 0:
        return 1.0 / damped
    floor = RCOND * float(damped.max())
    return torch.where(damped > floor, 1.0 / damped.clamp_min(floor), torch.zeros_like(damped))


def cast_inverse(x: torch.Tensor, dtype: torch.dtype, damping: float) -> torch.Tensor:
    """x (float64) in the data's dtype, refusing what that dtype cannot hold
    instead of scoring with inf and NaN."""
    out = x.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"damping={damping}: the inverse curvature (largest entry "
                         f"{float(x.abs().max()):.3g}) exceeds the range of {dtype}; the curvature is "
                         "nearly singular (a very confident fit). Use damping > 0 or float64 data")
    return out


def check_pseudo_inverse(eigenvalues: torch.Tensor, mean_sq_norm: float, damping: float) -> None:
    """With damping 0 the inverse is the pseudo-inverse of H itself, which is
    meaningless when H is below the rounding of its own sums: a training set
    fit so confidently that every p(1 - p) underflows against 1 - p."""
    if damping > 0:
        return
    scale = 0.25 * mean_sq_norm  # largest p(1-p) times mean |phi|^2
    largest = float(eigenvalues.max())
    if not largest > PSEUDO_INVERSE_FLOOR * scale:
        raise ValueError(f"damping=0: the curvature is below float64 rounding (largest eigenvalue "
                         f"{largest:.3g}, scale {scale:.3g}); the model fits the training set so "
                         "confidently that its pseudo-inverse is noise. Use damping > 0")
