"""NetworkExplainer: attribution through every chosen layer of a model
(docs/design.md §11): per-example gradients of each nn.Linear / nn.Conv2d
(layers.py), block-diagonal curvature per layer, and scores summed over the
layers, streamed through the same top-k op as the last layer."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from .. import curvature as curv
from ..engine.answers import Answers
from ..engine.distributed import ProcessGroup
from ..engine.passes import Passes
from ..engine.settings import Settings
from ..ops.order import check_k
from ..progress import Progress
from ..results import Explanation, TopK
from ..storage.gradients import DEFAULT_SHARD_ROWS
from ..storage.saved import digest
from .hooks import model_digest
from .layers import Capture, capture_dtype, choose_layers, unwrapped
from .network_data import collect, data_digest
from .network_fitted import FisherSums, NetworkFitted, network_method
from .probe import probe


@dataclass
class TestGradients:
    """A test set run through the network once (NetworkExplainer.check_test):
    per layer (T, k_out, k_in) gradients of each test's loss for its
    explained class, the logits (T, C), the explained labels (T,) and a
    digest of what they came from (the model, the layers, their projections)."""
    gradients: list[torch.Tensor]
    logits: torch.Tensor
    explained: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.explained)

    def explained_labels(self) -> torch.Tensor:
        """(T,) the class each test is explained for (as LastLayerData's)."""
        return self.explained


class NetworkExplainer(Answers):
    """Explains a model's predictions through the chosen layers of the whole
    network: per-example gradients of every nn.Linear / nn.Conv2d layer
    (exact, or Kronecker-projected to at most `projection` per side),
    block-diagonal K-FAC / EK-FAC curvature per layer, scores summed over the
    layers and streamed through exemplar's top-k op.

    Arguments:
        model: the classifier; its output (or output(model's output)) is the
            logits (B, C), C >= 2 (a single sigmoid logit: see layers.TWO_LOGITS).
            Every pass runs it in eval mode (dropout off, BatchNorm on its
            running statistics), each module's own mode restored after.
        train_loader: (inputs..., labels) batches in a fixed order; indices
            are positions in that order. Its first batch is run whole and in
            two halves first (probe.py): a model whose output for an example
            depends on the rest of its batch or on chance is refused.
        layers: names or modules of the layers (None: every nn.Linear and
            nn.Conv2d with a trainable parameter, less those no gradient
            reaches in the first batch, which are named in a warning). Only
            trainable parameters are attributed; modules sharing a weight are
            one layer, its gradient summed over their uses.
        curvature: per layer, "exact" (the layer's whole Fisher, for layers of at
            most curvature.EXACT_MAX_WIDTH gradient entries: the most
            faithful), "ekfac" (K-FAC's eigenbasis, eigenvalues refitted in it),
            "kfac", "identity" (I / damping; no fit), or a name added with
            exemplar.curvature.register whose class defines fit_layers;
            block-diagonal over the layers.
        damping: lambda added to every layer's curvature eigenvalues (the
            weight decay the model was trained with is the natural choice).
        fisher: the output gradients the curvature is fitted from: "expected"
            (every class c weighted by p_c: the exact Fisher, which for
            cross-entropy is the Gauss-Newton matrix; C gradient passes per
            batch), "sampled" (one label drawn from the model's softmax per
            example, seeded: the Fisher in expectation; kronfluence's default)
            or "empirical" (the training labels).
        projection: None keeps exact per-layer gradients; an integer k
            projects each side of a layer wider than k to k (seeded Gaussian).
        method: explain()'s default method: any registered method (exemplar.METHODS)
            but those that read a trained last layer (representer points, kNN).
        output: a callable picking the logits from the model's output.
        seed: seeds the projections and the sampled labels.
        store: a folder: the training gradients go to a sharded gradient store
            there (storage/gradients.py) instead of memory, recording the
            model's digest, the layers and projections and a digest of the
            loader's data; rerun after an interrupt it continues from its last
            complete shard, and a complete one is read with no model pass
            beyond the probe's (the curvature too, from its fit cache).
            A store another model, data, projection or seed wrote is refused.
        shard_rows: rows per shard; overwrite: replace a store another source wrote.
        distributed: run on every rank of the default torch.distributed process
            group, each given the same model and loader: rank r runs the model
            on batches r, r + world, ... and holds their gradients; curvature
            statistics are summed (float64) and top-k parts gathered and
            merged, so every rank gets the one-process answer. Ranks given
            different settings, models or data are refused alike.
        progress: progress lines for the passes (None: only on a terminal).

    Memory: the test set's per-layer gradients (T x the gradient entries per
    example) and one block of training rows (one shard with a store)."""

    def __init__(self, model: nn.Module, train_loader, *, layers=None, curvature: str = "ekfac",
                 damping: float = 1e-3, fisher: str = "expected", projection: int | None = None,
                 method: str = "theta_relatif", output=None, seed: int = 0, store=None,
                 shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False, distributed: bool = False,
                 progress: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # checked before any pass; the layers are added once the probe has chosen them
        settings = Settings(curvature=curvature, damping=damping, fisher=fisher, projection=projection, seed=seed,
                            layers=())
        if output is not None and not callable(output):
            raise TypeError(f"output must be None or a callable taking the model's output, got {output!r}")
        self.method = network_method(method).name
        model = unwrapped(model)
        self.model, self.progress = model, progress
        self.group = ProcessGroup.default() if distributed else ProcessGroup.single()
        chosen = Capture(model, choose_layers(model, layers, projection, seed), output)
        self.capture, left_out = self.group.call_together(lambda: probe(chosen, train_loader, layers is not None))
        if left_out:
            warnings.warn(left_out, stacklevel=2)
        self.layers = self.capture.layers
        self.settings = replace(settings, layers=tuple(layer.describe() for layer in self.layers))
        self.dtype = capture_dtype(model)
        self.model_digest = model_digest(model)
        data = None  # the loader's digest, read once: for the ranks' agreement and a store's record
        if self.group.distributed:
            data, batches = self.group.call_together(lambda: data_digest(train_loader))
            self.group.agree("NetworkExplainer settings, models or training data",
                             {**self.settings.to_dict(), "model": self.model_digest, "data": data})
            if batches < self.group.world:
                raise ValueError(f"train_loader has {batches} batch{'es' * (batches != 1)} for "
                                 f"{self.group.world} ranks (distributed=True gives each rank whole batches): "
                                 "use smaller batches or fewer ranks")
        self.train = collect(self, train_loader, store, shard_rows, overwrite, data)
        self.num_train = len(self.train)
        fitted = NetworkFitted(self.settings, self.train, self.layers)
        fitted.fit(FisherSums(self.layers, self.num_train, lambda: self._curvature_passes(train_loader),
                              self.group.all_sum), self.group.all_true)
        self._engine(Passes(self.train, False, self.group, progress, rows_of=lambda block, buffer: block), fitted,
                     self.group)

    @property
    def curvature(self) -> curv.LayerBlocks:
        """The fitted block-diagonal curvature (one curvature form per layer)."""
        return self.context.curvature

    # ---- fitting -------------------------------------------------------------------------------------------------

    def _fisher(self, index: int):
        """fisher(logits, labels) -> the curvature's label choices for batch
        `index`: a list of (labels (B,), weights (B,) float64 or None)."""
        kind, seed = self.settings.fisher, self.settings.seed

        def choose(logits, labels):
            if kind == "empirical":
                return [(labels, None)]
            probs = torch.softmax(logits.double(), 1)
            if kind == "expected":
                return [(torch.full_like(labels, c), probs[:, c]) for c in range(logits.shape[1])]
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            return [(torch.multinomial(probs.cpu(), 1, generator=g).squeeze(1).to(logits.device), None)]
        return choose

    def _curvature_passes(self, loader):
        """Yields per batch the Fisher's label choices [(weights (B,) or None,
        [per layer (delta (B, P, k_out), a (B, P, k_in))])]: one model pass
        over this rank's batches, its errors raised on every rank."""
        def local():
            bar = Progress("network: curvature", len(loader) if hasattr(loader, "__len__") else None, self.progress)
            for index, batch in enumerate(loader):
                if index % self.group.world != self.group.rank:  # another rank's batch
                    continue
                _, _, per_choice = self.capture.run(batch, index, self._fisher(index))
                yield [(weights, captured) for _, weights, captured in per_choice]
                bar.update()
            bar.close()
        return self.group.together(local())

    # ---- the two sides of a score ---------------------------------------------------------------------------------

    theta = None  # no single trained layer: the representer methods do not apply

    def _check_model(self) -> None:
        if model_digest(self.model) != self.model_digest:
            raise ValueError("the model's parameters or buffers changed since this NetworkExplainer was fitted; "
                             "build a new one for the changed model")

    def _source(self) -> str:
        """What test gradients depend on: the model, the layers and their projections (sizes and seed)."""
        return digest(self.model_digest, json.dumps([self.settings.layers, self.settings.projection,
                                                     self.settings.seed], sort_keys=True))[:16]

    def check_test(self, test) -> TestGradients:
        """test (a loader of (inputs...[, labels]) batches, or a TestGradients
        this explainer made) run through the network: each test's per-layer
        gradient for its explained class (its label when the batches have
        labels, else the prediction)."""
        self._check_model()
        if isinstance(test, TestGradients):
            if test.source != self._source():
                raise ValueError("test holds gradients of another model, other layers or other projections than "
                                 "this NetworkExplainer's; pass the test loader")
            return test
        grads, logits, explained = [[] for _ in self.layers], [], []
        bar = Progress("network: test gradients", len(test) if hasattr(test, "__len__") else None, self.progress)
        for index, batch in enumerate(test):
            z, _, [(chosen, _, captured)] = self.capture.run(
                batch, index, lambda z, y: [(z.argmax(1) if y is None else y, None)])
            explained.append(chosen.cpu())
            logits.append(z.cpu())
            for j, (d, a) in enumerate(captured):
                grads[j].append((d.transpose(1, 2) @ a).cpu())
            bar.update()
        bar.close()
        if not logits:
            raise ValueError("test yielded no batches")
        return TestGradients([torch.cat(g) for g in grads], torch.cat(logits), torch.cat(explained),
                             self._source())

    def _method(self, name):
        return network_method(name)

    def _test_digest(self, test: TestGradients) -> str:
        return digest(test.logits, test.explained)[:16]

    def topk(self, test, k: int, method: str | None = None, largest: bool = True,
             precision: str = "exact") -> TopK:
        """The k training examples with the largest (or smallest) summed scores
        per test, (T, k) each, best first; never the (T, N) matrix.
        precision: "exact" by default; "bf16" / "auto" as for Attributor.topk.
        The bf16 screen's bound grows with the depth of the flattened
        gradients, and at 12,930 entries per example it measured 3.9x slower
        than "exact" (bench/network_scoring.py), so it is not the default here."""
        method = method or self.method
        check_k(k, self.num_train)
        m, tested = network_method(method), self.check_test(test)
        self._agree("topk", method, tested, k=k, largest=largest, precision=precision)
        return TopK(*self._best(tested, k, m, largest, precision))

    def explain(self, test, k: int = 5, method: str | None = None, opponents: int = 0) -> Explanation:
        """Per test: the k proponents (and `opponents` most opposing examples)."""
        return self._explain(test, k, method or self.method, opponents, "exact")

    def scores(self, test, method: str | None = None) -> torch.Tensor:
        """(T, N) every score (for small sets; topk streams)."""
        return self._scores(test, method or self.method)

    def total_scores(self, test, method: str | None = None) -> torch.Tensor:
        """(N,): sum over the test set of score(t, i), in one pass."""
        return self._total_scores(test, method or self.method)

    def subset_scores(self, test, subsets: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """(T, M) float64: sum over each subset's rows of the scores, subsets
        (M, N) bool; what exemplar.lds predicts retraining with."""
        return self._subset_scores(test, subsets, method or self.method)

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,) score(i, i) of each training example for its own label."""
        return self._self_influence(method)

    def __repr__(self) -> str:
        widths = sum(layer.width for layer in self.layers)
        return (f"NetworkExplainer({len(self.layers)} layers, N={self.num_train}, {widths} gradient entries per "
                f"example, curvature={self.settings.curvature!r}, fisher={self.settings.fisher!r})")
