"""Attributor: the facade over the engine (docs/design.md §1, §3, §4). It
resolves the method and checks the test set once per call, then hands the
checked objects to the parts: Settings (settings.py), passes over the blocks
(passes.py), the fitted state methods see (fitted.py), saved state (state.py)
and the process group (distributed.py); no per-method or per-backend code."""
from __future__ import annotations

import os

import torch

from .. import methods, storage
from ..data import LastLayerData
from ..methods import Method
from ..ops import Query, TrainOperands, check_k, check_precision
from ..results import Explanation, TopK
from ..storage import saved
from ..storage.jobs import ResultFolder, resumable
from ..storage.saved import digest
from . import state
from .answers import Answers
from .distributed import ProcessGroup
from .fitted import FitIdentity, Fitted
from .layer import check_test, theta_from_layer
from .passes import Passes
from .settings import Settings

FORMAT = "exemplar.Attributor/1"


class Attributor(Answers):
    """Explains test predictions by training examples.

    Arguments:
        train: a LastLayerData with labels, or an exemplar.Store (or its path)
            on disk, streamed shard by shard.
        curvature: "exact" | "kfac" | "ekfac" | "identity", or a name added
            with exemplar.curvature.register.
        damping: lambda >= 0 added to the curvature (for "exact" and weight
            decay lambda, the Hessian of the regularised objective).
        bias: True when the layer has a bias (a constant-1 feature appended
            to each block as it is scored, never to the whole training set),
            or the layer's bias vector (C,) itself.
        kfac_damping: "eigenbasis" adds lambda to the K-FAC eigenvalues;
            "factored" damps each factor (a rank-1 fast path).
        weight: the layer's weight (C, D); RPS-LJE needs it (and the bias
            vector when there is a bias), RPS-l2 starts its refit from it.
        rps_lambda: RPS-l2's l2 strength (> 0).
        lje_step: RPS-LJE's ascent step gamma (>= 0).
        rank: kfac or ekfac with eigenbasis damping: truncate the damped
            inverse eigenvalues to rank m, so a score costs 2 m (C + Dp)
            flops instead of 2 C Dp; "auto" takes the smallest m within
            curvature.LOW_RANK_TOL (relative Frobenius).
        distributed: run on every rank of the default torch.distributed
            process group: each rank reads its own blocks (shards),
            statistics are all-reduced and top-k merged, so every rank gets
            the whole answer.
        progress: a progress line on stderr for passes over the training
            set (None: only when stderr is a terminal).

    The settings are held as one exemplar.Settings (`attr.settings`)."""

    def __init__(self, train, curvature: str = "kfac", damping: float = 1e-3,
                 bias: bool | torch.Tensor = True, kfac_damping: str = "eigenbasis",
                 weight: torch.Tensor | None = None, rps_lambda: float = 1e-3,
                 lje_step: float = 1e-3, rank: int | str | None = None, distributed: bool = False,
                 progress: bool | None = None):
        has_bias = bool(isinstance(bias, torch.Tensor) or bias)
        train_set = storage.training_set(train, has_bias)
        settings = Settings(curvature=curvature, damping=damping, kfac_damping=kfac_damping,
                            rps_lambda=rps_lambda, lje_step=lje_step, bias=has_bias, rank=rank)
        if train_set.num_features == 0 and not has_bias:
            raise ValueError("features have D=0 columns and bias=False: there is no parameter to attribute")
        train_set.check_magnitude()
        group = ProcessGroup.default() if distributed else ProcessGroup.single()
        if group.distributed:  # the same rows, cut into the same blocks (ranks split the work by block)
            sizes, held = train_set.blocks().sizes, train_set.describe()
            group.agree("training sets", {"train": train_set.fingerprint(), "blocks": digest(str(sizes))[:16]},
                        {"train": held, "blocks": f"{held} in {len(sizes)} blocks of {sizes[0]} rows"})
        self._setup(train_set, settings, group, progress)
        theta = theta_from_layer(weight, bias, self._passes)
        self._identity = FitIdentity(settings, train_set, theta)
        if group.distributed:
            group.agree("Attributor settings or layers", {"settings": settings.to_dict(),
                                                          "layer": self._identity.layer})
        self._fitted = Fitted(settings, self._passes, train_set.columns(self._identity), theta)
        self._fitted.fit(group)

    def _setup(self, train_set, settings: Settings, group: ProcessGroup, progress: bool | None) -> None:
        self._train, self.settings, self._group = train_set, settings, group
        self._passes = Passes(train_set, settings.bias, group, progress)

    def _test_digest(self, test: LastLayerData) -> str:
        return digest(test.features, test.logits, test.labels)[:16]

    # ---------------------------------------------------------------- what it holds

    @property
    def train(self):
        """The training set as given: a LastLayerData or a Store."""
        return self._train.source

    @property
    def curvature(self):
        """The fitted damped inverse curvature (an exemplar.curvature.Curvature)."""
        return self._fitted.curvature

    @property
    def theta(self) -> torch.Tensor | None:
        """(C, Dp) float64: the trained layer [W | b], or None without weight=."""
        return self._fitted.theta

    @property
    def num_train(self) -> int:
        """N, the number of training examples."""
        return len(self._train)

    @property
    def num_classes(self) -> int:
        """C."""
        return self._train.num_classes

    @property
    def num_features(self) -> int:
        """D (without the bias column)."""
        return self._train.num_features

    @property
    def dtype(self) -> torch.dtype:
        """The training features' dtype."""
        return self._train.dtype

    @property
    def device(self) -> torch.device:
        """Where the training rows are delivered."""
        return self._train.device

    @property
    def progress(self) -> bool | None:
        """Whether passes show a progress line (None: only on a terminal)."""
        return self._passes.progress

    @progress.setter
    def progress(self, value: bool | None) -> None:
        self._passes.progress = value

    # ---------------------------------------------------------------- operands

    def augment(self, features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """features (n, D) -> phi (n, Dp): with the constant-1 bias column when the
        layer has a bias, written into `out` (rows >= n, Dp) when given."""
        return self._fitted.augment(features, out)

    def prepare(self, method: str) -> TrainOperands:
        """The training side of `method` for the score ops over the whole
        in-memory training set.

        Returns:
            TrainOperands(r (N, C'), phi (N, Dp'), inv_norm (N,)), with phi a
            copy holding the bias column. Normalisers and RPS refits are
            fitted on the first call and kept."""
        return methods.get(method).operands(self._fitted, self._fitted.whole_rows("prepare()"))

    def query(self, test, method: str) -> Query:
        """The test side of `method`.

        Returns:
            Query(gradient, offset), with gradient ops.General(S (T, C', Dp'))
            or ops.Rank1(alpha (T, C'), beta (T, Dp')) (or ops.LowRank);
            `query.topk(self.prepare(method), k)` is `topk`."""
        return methods.get(method).query(self._fitted, self.check_test(test))

    def check_test(self, test) -> LastLayerData:
        """test (a LastLayerData or a DataLoader of (features, logits[, labels])
        batches) as one LastLayerData, checked against the training set: D, C,
        dtype, device and magnitude; the error names what differs."""
        return check_test(test, self._train)

    # ---------------------------------------------------------------- API

    def scores(self, test, method: str = "theta_relatif") -> torch.Tensor:
        """score(t, i) of every training example for every test example.

        Arguments:
            test: a LastLayerData, or a DataLoader (any iterable) of (features,
                logits[, labels]) batches; labels name the class to explain
                (default: each prediction).
            method: a name in exemplar.METHODS (the built-in ones of
                docs/design.md §1, or a registered one).

        Returns:
            (T, N). Units: IF family, the change in the test loss when example
            i is up-weighted (positive = helpful: up-weighting lowers the
            loss); the RelatIF variants divide it by a norm of i's own
            influence, so they are unitless; grad_cos is a cosine in [-1, 1];
            RPS, i's contribution to the explained logit; kNN, -|f_t - f_i|^2."""
        return self._scores(test, method)

    def topk(self, test, k: int, method: str = "theta_relatif", largest: bool = True,
             out: str | os.PathLike | None = None, split: str = "train", test_rows: int = 1024,
             precision: str = "auto") -> TopK:
        """The k most helpful training examples per test example (or with
        largest=False the k most harmful, the opponents), never building the
        (T, N) matrix.

        Arguments:
            test, method: as for scores().
            k: an integer in [1, N].
            largest: True for proponents, False for opponents.
            out: a folder for a resumable job: results are written per block
                of `test_rows` tests, and a rerun with the same arguments
                skips the blocks already there.
            split: with distributed=True, "train" gives each rank its own
                training blocks, "test" its own share of the tests against
                the whole training set.
            test_rows: tests per block of a job (out=).
            precision: "auto" (default), "exact", or "bf16" to screen score
                tiles in bfloat16 and rescore only what a rigorous bound
                cannot rule out (same indices, exact scores); "auto" screens
                where that was measured faster (exemplar.ops.precision).

        Returns:
            TopK(values, indices), each (T, k), best first.
            Indices are rows of the training set (positions in the
            LastLayerData or the store)."""
        check_k(k, self.num_train)
        if not isinstance(largest, bool):
            raise TypeError(f"largest must be True or False, got {largest!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        check_precision(precision)
        m, test = methods.get(method), self.check_test(test)  # both checked before any work
        if out is not None and (isinstance(test_rows, bool) or not isinstance(test_rows, int) or test_rows < 1):
            raise ValueError(f"test_rows must be an integer >= 1, got {test_rows!r}")
        self._agree("topk", method, test, k=k, largest=largest, split=split, precision=precision,
                    job=None if out is None else test_rows)
        if out is None:
            return TopK(*self._topk(test, k, m, largest, split, precision))
        # What the job's answer depends on; a folder holding another job is refused.
        job = dict(job="topk", method=method, k=k, largest=largest, test_rows=test_rows, T=len(test),
                   precision=precision, test=self._test_digest(test),
                   N=self.num_train, train=self._train.fingerprint(), settings=self.settings.to_dict(),
                   layer=self._identity.layer)
        folder = ResultFolder(out, job)

        def block(b):
            t0 = b * test_rows
            values, indices = self._topk(test[t0:t0 + test_rows], k, m, largest, split, precision, label="")
            return {"values": values, "indices": indices}

        def expected(b):
            rows = min(test_rows, len(test) - b * test_rows)
            return {"values": ((rows, k), self.dtype), "indices": ((rows, k), torch.int64)}

        parts = resumable(folder, -(-len(test) // test_rows), block, expected, self.num_train,
                          f"topk {method} job", self.progress, self._group.all_true)
        return TopK(torch.cat([p["values"].to(self.device) for p in parts]),
                    torch.cat([p["indices"].to(self.device) for p in parts]))

    def explain(self, test, k: int = 5, method: str = "theta_relatif", opponents: int = 0) -> Explanation:
        """An Explanation of each test prediction: its k top proponents by
        `method` and, with opponents=m > 0, its m top opponents (the most
        negative scores). test and method as for scores()."""
        return self._explain(test, k, method, opponents, "auto")

    def _topk(self, test: LastLayerData, k: int, m: Method, largest: bool, split: str = "train",
              precision: str = "auto", label: str | None = None):
        """Top-k of a checked test set by a resolved method, merged across ranks."""
        group, passes = self._group, self._passes
        if split != "test" or group.world == 1:
            return self._best(test, k, m, largest, precision, label)
        q = m.query(self._fitted, test[group.share(len(test))])  # each rank its share of the tests
        label = f"topk {m.name}" if label is None else (label or None)
        values, indices = passes.topk(k, largest, range(passes.num_blocks), label, lambda rows, kb: q.topk(
            m.operands(self._fitted, rows), kb, largest, precision))
        return group.gather_rows(values, len(test)), group.gather_rows(indices, len(test))

    def total_scores(self, test, method: str = "theta_relatif") -> torch.Tensor:
        """(N,): sum over the test set of score(t, i), in one pass (test and
        method as for scores())."""
        return self._total_scores(test, method)

    def subset_scores(self, test, subsets: torch.Tensor, method: str = "theta_relatif") -> torch.Tensor:
        """(T, M) float64: sum over the training rows of each subset j of
        score(t, i), what an attribution predicts of retraining on subset j
        (the linear datamodel of LDS), in one pass; test and method as for
        scores(). subsets: (M, N) bool, or one-hot rows for single scores."""
        return self._subset_scores(test, subsets, method)

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,): score(i, i) of each training example on itself under its own
        label; large values flag examples the model finds hard or mislabelled
        (for RPS, rank by the absolute value). kNN: 0 by definition."""
        return self._self_influence(method)

    # ---------------------------------------------------------------- saved state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything fitted so far (curvature, normalisers, RPS fits), so
        `from_state` rebuilds this Attributor without refitting. In-memory
        training sets only: a store keeps its fits itself.

        Returns:
            (tensors, config): tensors by key, and the settings with the
            kind of every curvature."""
        train = self._train.whole("state_dict()")
        tensors = dict(zip(state.TRAIN_KEYS, (train.features, train.logits, train.labels)))
        if self.theta is not None:
            tensors["theta"] = self.theta
        fitted, kinds = self._fitted.state()
        tensors.update(fitted)
        tensors.update({f"cache.{k}": v for k, v in self._fitted.columns.whole().items()})
        return {k: v.contiguous() for k, v in tensors.items()}, state.config_of(self.settings, kinds)

    def save(self, path) -> None:
        """Writes state_dict() to one safetensors file, atomically (exemplar
        fit on the command line makes these); Attributor.load reads it."""
        tensors, config = self.state_dict()
        saved.write(path, tensors, {"format": FORMAT, "attributor": config})

    @classmethod
    def load(cls, path, progress: bool | None = None) -> "Attributor":
        """The Attributor saved at `path`, without refitting; the file is read
        whole and every tensor and setting checked before use."""
        tensors, meta = saved.read(path, FORMAT, ("attributor",))
        attr = cls.from_state(tensors, meta["attributor"])
        attr.progress = progress
        return attr

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict) -> "Attributor":
        """Rebuilds an Attributor from `state_dict()` output without refitting.
        Every key and tensor is checked first (shape, dtype, finiteness, and
        that the settings agree with the tensors); errors name the key."""
        settings, kinds, train = state.validate(tensors, config)
        self = cls.__new__(cls)
        self._setup(storage.InMemory(train, train.num_features + settings.bias), settings,
                    ProcessGroup.single(), None)
        self._identity = FitIdentity(settings, self._train, tensors.get("theta"))
        columns = self._train.columns(self._identity)
        self._fitted = Fitted(settings, self._passes, columns, tensors.get("theta"))
        fits = {}  # curvatures and whole-set fits; per-example columns go to the Columns
        for key, value in tensors.items():
            name = key.removeprefix("cache.")
            if name != key and state.is_per_example(name):
                columns.put_whole(name, value)
            elif not key.startswith("train.") and key != "theta":
                fits[key] = value
        self._fitted.restore(fits, kinds)
        self._fitted.save()
        return self

    def __repr__(self) -> str:
        return f"Attributor(N={self.num_train}, C={self.num_classes}, {self.settings})"
