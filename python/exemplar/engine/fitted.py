"""What is fitted on a training set for one Settings and layer — the damped
curvature, methods' extra curvatures, whole-set fits (RPS refits) and
per-example columns (normalisers) — and the Context (methods.Context)
through which methods read and extend it. Fits are kept in the training
set's Columns, so a store keeps them beside its shards."""
from __future__ import annotations

import functools
import json

import torch

from .. import curvature as curv
from .. import ops
from ..storage import Block, Columns, StoreError, TrainingSet
from ..storage.saved import digest
from . import state
from .distributed import ProcessGroup
from .passes import Means, Passes, Rows, augment
from .settings import Settings


class FitIdentity:
    """What an Attributor's fits depend on: its settings, the training set's
    content and the layer. `meta` is recorded beside fits on disk and must
    match exactly for them to be reused; `tag` names their folder."""

    def __init__(self, settings: Settings, train: TrainingSet, theta: torch.Tensor | None):
        self.settings, self.train, self.theta = settings, train, theta

    @functools.cached_property
    def layer(self) -> str | None:
        """A digest of the layer [W | b] (None without one)."""
        return None if self.theta is None else digest(self.theta)[:16]

    @functools.cached_property
    def meta(self) -> dict:
        return {"settings": self.settings.to_dict(), "train": self.train.fingerprint(), "layer": self.layer}

    @functools.cached_property
    def tag(self) -> str:
        return digest(json.dumps(self.meta, sort_keys=True))[:16]


class ColumnContext:
    """What every engine's Context (methods.Context) shares, kept in its
    `columns` (storage.Columns): per-example values per block, whole-set fits
    in `cache` (kept by `save`), and the norms methods normalise by, from
    `curvature` and the rows' (r, phi)."""
    columns: Columns
    curvature: curv.Curvature
    cache: dict[str, torch.Tensor]
    dtype: torch.dtype
    num_train: int

    def save(self) -> None:
        """Keeps the whole-set fits (the curvature, `cache`) in the Columns."""
        raise NotImplementedError

    def cached(self, key: str | tuple[str, ...], compute):
        """The tensor saved under `key`, computed by `compute()` on first use and
        kept in the saved state; a tuple of keys caches a tuple of tensors
        computed together. Methods keep what they fit on the whole training
        set here (RPS refits); per-example values go in `per_example`."""
        keys = (key,) if isinstance(key, str) else key
        if any(k not in self.cache for k in keys):
            values = compute()
            self.cache.update(zip(keys, (values,) if isinstance(key, str) else values))
            self.save()
        return self.cache[key] if isinstance(key, str) else tuple(self.cache[k] for k in keys)

    def per_example(self, key: str | tuple[str, ...], rows, compute):
        """The (b,) values saved under `key` for `rows`, computed by compute(rows)
        on the block's first visit and kept (in memory and the saved state, or
        written into the store beside the shard); a tuple of keys gets a tuple."""
        single = isinstance(key, str)
        keys = (key,) if single else tuple(key)
        out = self.columns.get(keys, rows.index)
        if out is None:
            out = (compute(rows),) if single else tuple(compute(rows))
            self.columns.put(keys, rows.index, out)
        return out[0] if single else out

    def curvature_norms(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (b,), for the rows."""
        return self.per_example(("norm_sq", "norm_quad"), rows,
                                lambda r: self.curvature.norms(r.r, r.phi, self.num_train))

    def curvature_quad_norms(self, rows: Rows) -> torch.Tensor:
        """g_i^T H^-1 g_i, (b,): alone where the curvature computes it for less."""
        if self.columns.get(("norm_sq", "norm_quad"), rows.index) is not None:
            return self.curvature_norms(rows)[1]
        return self.per_example("norm_quad", rows, lambda r: self.curvature.quad_norms(r.r, r.phi))

    def gradient_sq_norms(self, rows: Rows) -> torch.Tensor:
        """|g_i|^2, (b,)."""
        return self.per_example("grad_sq", rows, lambda r: curv.gradient_sq_norms(r.r, r.phi).to(self.dtype))


class Fitted(ColumnContext):
    """The fitted state of one Attributor, and the Context its methods see."""

    def __init__(self, settings: Settings, passes: Passes, columns: Columns, theta: torch.Tensor | None):
        self.settings, self.passes, self.columns = settings, passes, columns
        self.theta = theta  # (C, Dp) float64 or None: the trained layer [W | b]
        t = passes.train
        self.num_train, self.num_classes, self.num_features = len(t), t.num_classes, t.num_features
        self.dtype, self.device = t.dtype, t.device
        self.curvature: curv.Curvature | None = None
        self.extra_curvatures: dict[str, curv.Curvature] = {}  # by name, e.g. at RPS-LJE's Theta*
        self.cache: dict[str, torch.Tensor] = {}  # what methods fit on the whole set

    def fit(self, group: ProcessGroup) -> None:
        """The curvature and every fit saved before in the Columns (checked like
        saved state), or, unless every rank holds them, the curvature fitted now."""
        loaded = self.columns.load_fitted()
        if loaded is not None:
            tensors, kinds = loaded
            try:
                state.check_fits(tensors, kinds, self.settings, self.num_train, self.num_classes,
                                 self.num_features, self.dtype)
            except ValueError as err:
                raise StoreError(f"fit cache file {self.columns.where}: {err}; it was damaged or replaced: "
                                 "delete it to recompute") from None
        if group.all_true(loaded is not None):  # ranks load together or fit together: no rank waits alone
            self.restore(*loaded)
        else:
            self.curvature = curv.build(self.settings, Means(self.passes, "curvature"))
            self.save()

    # ---------------------------------------------------------------- state

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, curvature kinds) of what is fitted on the whole set."""
        tensors, kinds = {}, {}
        for name, curvature in {"curvature": self.curvature, **self.extra_curvatures}.items():
            kinds[name], values = curv.state(curvature)
            tensors.update({f"{name}.{k}": v for k, v in values.items()})
        tensors.update({f"cache.{k}": v for k, v in self.cache.items()})
        return tensors, kinds

    def restore(self, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
        """Takes what state() gave (curvatures by kind, whole-set fits), on this device."""
        def group(prefix):
            return {k[len(prefix):]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)}
        self.curvature = curv.from_state(kinds["curvature"], group("curvature."))
        self.extra_curvatures = {n: curv.from_state(k, group(f"{n}.")) for n, k in kinds.items()
                                 if n != "curvature"}
        self.cache = group("cache.")

    def save(self) -> None:
        """Hands state() to the Columns (a store writes it beside its shards)."""
        self.columns.save_fitted(*self.state())

    # ---------------------------------------------------------------- Context

    def augment(self, features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """features (n, D) -> phi (n, Dp): with the constant-1 bias column when the
        layer has a bias, written into `out` (rows >= n, Dp) when given."""
        return augment(features, self.settings.bias, out)

    def test_factors(self, test) -> tuple[torch.Tensor, torch.Tensor]:
        """(r (T, C), phi (T, Dp)): softmax - onehot of each test's explained class, and its features."""
        return ops.residuals(test.logits, test.explained_labels()), self.augment(test.features)

    def whole_rows(self, purpose: str) -> Rows:
        """The whole in-memory training set as one Rows (prepare's operands)."""
        t = self.passes.train.whole(purpose)
        return Rows(Block(None, 0, t.features, t.logits, t.labels), self.settings.bias, None)

    def per_example(self, key: str | tuple[str, ...], rows: Rows, compute):
        if rows.index is not None:
            return super().per_example(key, rows, compute)
        # the whole set: block by block, then joined
        parts = [super(Fitted, self).per_example(key, r, compute)
                 for r in self.passes.rows(range(self.passes.num_blocks), None, reuse=False)]
        if isinstance(key, str):
            return torch.cat(parts)
        return tuple(torch.cat(column) for column in zip(*parts))

    def means(self, label: str, logits_of=None) -> curv.Statistics:
        """Means over the training set for fitting (curvature.Statistics)."""
        return Means(self.passes, label, logits_of)

    def curvature_at(self, key: str, logits_of) -> curv.Curvature:
        """The damped curvature with these settings at other logits of the same
        features, logits_of(rows) (b, C), fitted once under `key`."""
        if key not in self.extra_curvatures:
            self.extra_curvatures[key] = curv.build(self.settings, Means(self.passes, key, logits_of))
            self.save()
        return self.extra_curvatures[key]

