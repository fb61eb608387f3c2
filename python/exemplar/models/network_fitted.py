"""What a NetworkExplainer fits and how its methods see it (docs/design.md
§11): the network is one head with C = 1 whose training row i is r_i = 1
and phi_i = every layer's per-example gradient flattened and joined, and
whose curvature is block-diagonal over the layers (curvature.LayerBlocks),
each block fitted by the registered curvature's `fit_layers`. So the
methods of the one registry (methods/) run unchanged; those that read the
last layer itself (needs_head) are refused. Fits and per-example values
are kept in the gradient store's fits/<tag>/ cache when there is one."""
from __future__ import annotations

import json

import torch

from .. import curvature as curv
from .. import methods
from ..engine.fitted import ColumnContext
from ..storage.fitcache import StoreColumns
from ..storage.manifest import StoreError
from ..storage.memory import MemoryColumns
from ..storage.saved import digest


def network_method(name):
    """The registered method `name`, refused when it needs a trained head."""
    m = methods.get(name)
    if m.needs_head:
        raise ValueError(f"method={name!r} reads a trained last layer (its features, logits or weights), which a "
                         "whole network's gradients are not: explain through the model's head with "
                         "exemplar.Explainer (or an Attributor on its features), or pick one of "
                         f"{tuple(n for n in methods.names() if not methods.get(n).needs_head)}")
    return m


class FisherSums(curv.LayerStatistics):
    """LayerStatistics over a network's training set: each call of `sums` is
    one model pass, passes() yielding per batch the Fisher's label choices
    [(weights or None, [per layer (delta, a)])], summed over the ranks by reduce."""

    def __init__(self, layers, N: int, passes, reduce):
        self.shapes = [(layer.k_out, layer.k_in) for layer in layers]
        self.names = [layer.name for layer in layers]
        self.N, self.run_passes, self.reduce = N, passes, reduce

    def sums(self, fn):
        totals = None
        for choices in self.run_passes():
            parts = [tuple(x.double().cpu() for x in fn(j, [(w, c[j][0].double(), c[j][1].double())
                                                             for w, c in choices]))
                     for j in range(len(self.shapes))]
            totals = parts if totals is None else [tuple(a.add_(b) for a, b in zip(t, p))
                                                   for t, p in zip(totals, parts)]
        self.reduce(tuple(x for part in totals for x in part))
        return totals


class StoreFits:
    """What a network's fits on a store depend on (the settings, the store's
    content): `meta`, recorded and checked, and `tag`, their folder's name."""

    def __init__(self, meta: dict):
        self.meta = json.loads(json.dumps(meta))
        self.tag = digest(json.dumps(self.meta, sort_keys=True))[:16]


class NetworkFitted(ColumnContext):
    """A NetworkExplainer's fitted state (the block-diagonal curvature,
    methods' fits, per-example values) and the Context its methods see."""
    theta = None  # no single trained layer
    num_classes = 1

    def __init__(self, settings, train, layers):
        self.settings, self.dtype, self.num_train = settings, train.dtype, len(train)
        self.layer_shapes = [(layer.k_out, layer.k_in) for layer in layers]
        self.cache: dict[str, torch.Tensor] = {}
        self.extra_curvatures: dict = {}  # methods refitting the curvature elsewhere need a head
        self.curvature: curv.LayerBlocks | None = None
        if train.store is None:
            self.columns = MemoryColumns(train.sizes)
        else:
            self.columns = StoreColumns(train.store, StoreFits({"settings": settings.to_dict(),
                                                                "train": train.fingerprint()}))

    def fit(self, statistics: FisherSums, all_true) -> None:
        """The curvature from the fit cache (checked like user input) when
        every rank holds it, else fitted now by the registered curvature's fit_layers."""
        loaded = self.columns.load_fitted()
        if all_true(loaded is not None):
            tensors, kinds = loaded
            try:
                self.curvature = curv.LayerBlocks.restored(
                    {k: v for k, v in tensors.items() if not k.startswith("cache.")}, kinds, self.layer_shapes)
            except (TypeError, ValueError) as err:
                raise StoreError(f"fit cache file {self.columns.where} {err}: it was damaged or replaced; delete "
                                 "it to recompute") from None
            self.cache = {k[len("cache."):]: v for k, v in tensors.items() if k.startswith("cache.")}
            return
        blocks = curv.get(self.settings.curvature).fit_layers(statistics, self.settings)
        self.curvature = curv.LayerBlocks(blocks, self.layer_shapes)
        self.save()

    def save(self) -> None:
        """Hands the curvature and whole-set fits to the Columns (a store keeps them in fits/<tag>/)."""
        tensors, kinds = self.curvature.saved()
        self.columns.save_fitted({**tensors, **{f"cache.{k}": v for k, v in self.cache.items()}}, kinds)

    # ---------------------------------------------------------------- Context

    def test_factors(self, test):
        """(1 (T, 1), g_t (T, P)): a TestGradients' layers flattened and joined."""
        phi = torch.cat([g.flatten(1) for g in test.gradients], 1)
        return torch.ones(len(phi), 1, dtype=phi.dtype), phi

    def _no_head(self, what: str):
        raise ValueError(f"{what} needs a trained last layer; a whole network has none")

    def augment(self, features, out=None):
        """Refused: a network has no head's features (needs_head methods use it)."""
        self._no_head("augment")

    def means(self, label, logits_of=None):
        """Refused: a network has no head's logits to take means over."""
        self._no_head("means")

    def curvature_at(self, key, logits_of):
        """Refused: a network has no head's logits to refit the curvature at."""
        self._no_head("curvature_at")
