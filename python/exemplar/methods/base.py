"""What a method is (docs/design.md §1, §4): the Method base class, the
registry `@register` adds to, and the Context protocol through which a
method sees the engine. Methods never import the engine.

Every method reduces to the fused score op: a training side
`TrainOperands(r, phi, inv_norm)` for each block of training rows and a test
side `Query(gradient, offset)`, so that

    score(t, i) = <S_t, r_i phi_i^T> * inv_norm_i + offset_t.

A method sees the training set one block at a time (`Rows`), reads the
fitted state (`ctx.curvature`, `ctx.theta`, `ctx.settings`, `ctx.num_train`)
and keeps what it fits in `ctx.per_example(...)` (per-example values such as
normalisers) or `ctx.cached(...)` (fits on the whole set), so saved state
and stores carry them."""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from ..curvature import Curvature, Statistics
from ..data import LastLayerData
from ..ops import Query, TrainOperands


class Rows(Protocol):
    """One block of training rows: the stored features (b, D), logits (b, C)
    and labels (b,), phi (b, Dp) (the features with the bias column) and
    r (b, C) (softmax(logits) - onehot(labels)); rows [start, start + b) of
    the training set, block `index` (None: the whole set)."""
    index: int | None
    start: int
    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    phi: torch.Tensor
    r: torch.Tensor

    def __len__(self) -> int: ...


class Context(Protocol):
    """What a method may ask of the engine (engine.fitted.Fitted implements it)."""
    settings: object  # engine.Settings: damping, rps_lambda, lje_step, ...
    curvature: Curvature
    theta: torch.Tensor | None  # (C, Dp) float64: the trained layer [W | b]
    num_train: int
    num_classes: int
    dtype: torch.dtype

    def augment(self, features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, Dp): features with the bias column when the layer has a bias."""

    def test_factors(self, test) -> tuple[torch.Tensor, torch.Tensor]:
        """(r (T, C'), phi (T, Dp')): each test's loss gradient for its explained
        class, r phi^T (a whole network's: r = 1, phi its layers' gradients)."""

    def per_example(self, key, rows: Rows, compute):
        """(b,) values saved under `key`, computed by compute(rows) once per block."""

    def cached(self, key, compute):
        """A whole-set fit saved under `key`, computed by compute() once."""

    def means(self, label: str, logits_of=None) -> Statistics:
        """Means over the training set (logits_of(rows) replacing the logits)."""

    def curvature_at(self, key: str, logits_of) -> Curvature:
        """The curvature of these settings at other logits, fitted once under `key`."""

    def curvature_norms(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (b,)."""

    def curvature_quad_norms(self, rows: Rows) -> torch.Tensor:
        """g_i^T H^-1 g_i, (b,)."""

    def gradient_sq_norms(self, rows: Rows) -> torch.Tensor:
        """|g_i|^2, (b,)."""


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x where x > 0, else 0."""
    # A zero-gradient example (a perfectly fit one) scores 0 under every method.
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


class Method:
    """One attribution method. `family` is "influence" (score = loss change,
    self-influence ranks by value), "representer" (score = a logit
    contribution, rank self-influence by magnitude) or "distance" (no
    self-influence). `saved` maps each tensor the method caches to its shape
    in N, C, D, Dp, "D+1", optionally followed by a dtype (default: the
    training features'); ("N",) ones are per-example values (ctx.per_example).
    `curvatures` names the extra curvatures it fits, so saved state is checked.
    `needs_head`: it reads the last layer itself (its features, logits or
    weights, ctx.means, ctx.curvature_at), so a whole network (where a
    training row is only its gradient) refuses it.

    operands(ctx, rows) gives the training side for one block of rows,
    query(ctx, test) the test side, self_influence(ctx, rows) (b,) values."""
    name: ClassVar[str]
    family: ClassVar[str] = "influence"
    saved: ClassVar[dict[str, tuple]] = {}
    curvatures: ClassVar[tuple[str, ...]] = ()
    needs_head: ClassVar[bool] = False

    def inv_norm(self, ctx: Context, rows: Rows) -> torch.Tensor:
        """(b,) the factor each training row's score is multiplied by (1 for
        unnormalised methods; 1/|H^-1 g_i| for theta-RelatIF, ...)."""
        return torch.ones_like(rows.phi[:, 0])

    def operands(self, ctx: Context, rows: Rows) -> TrainOperands:
        """TrainOperands(r (b, C'), phi (b, Dp'), inv_norm (b,)) of one block of rows."""
        return TrainOperands(rows.r, rows.phi, self.inv_norm(ctx, rows))

    def query(self, ctx: Context, test: LastLayerData) -> Query:
        """Query(gradient, offset): the test side for a (checked) test set."""
        raise NotImplementedError

    def self_influence(self, ctx: Context, rows: Rows) -> torch.Tensor:
        """(b,) score(i, i) of each row of the block for its own label."""
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes `cls.name` a method every API accepts."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Removes a registered method."""
    del _REGISTRY[name]


def names(family: str | None = None) -> tuple[str, ...]:
    """The registered methods' names (of one family when given), in registration order."""
    return tuple(n for n, m in _REGISTRY.items() if family is None or m.family == family)


def get(name) -> Method:
    """The method registered as `name`; the error lists the registered ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def test_residuals(ctx: Context, test) -> tuple[torch.Tensor, torch.Tensor]:
    """(r (T, C'), phi (T, Dp')): the factored loss gradients of the explained
    classes, as the engine behind `ctx` holds them (Context.test_factors)."""
    return ctx.test_factors(test)
