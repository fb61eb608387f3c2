"""Attributor: scores, top-k and self-influence of training examples for a
classifier's last layer (docs/design.md §1, §3). It holds the training data in the
ops' form and what is fitted on it (curvature, normalisers, RPS fits); the
methods themselves live in methods.py. `prepare(method)` and `query(test,
method)` return the operands of the score ops, for libraries that drive the
kernels themselves."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os

import torch

from . import curvature as curv
from . import methods, ops, saved
from .blocks import Block, MemoryColumns, TensorBlocks, block_rows, merge_topk
from .data import LastLayerData, as_last_layer_data, check_magnitude, largest_sq_norm
from .distributed import ProcessGroup
from .jobs import ResultFolder, tensor_checksum
from .methods import Query, TrainOperands
from .progress import Progress
from .results import Explanation, TopK
from .screen import check_precision
from .store import Store

FORMAT = "exemplar.Attributor/1"

METHODS = methods.names()
INFLUENCE_METHODS = methods.names("influence")
CURVATURES = ("exact", "kfac", "ekfac", "identity")
KFAC_DAMPINGS = ("eigenbasis", "factored")


def _check_number(name, value, low, strict):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _check_config(curvature, damping, kfac_damping, rps_lambda, lje_step, rank=None, prefix=""):
    """The Attributor's settings, checked the same way when given and when loaded."""
    if curvature not in CURVATURES:
        raise ValueError(f"{prefix}curvature must be one of {CURVATURES}, got {curvature!r}")
    if kfac_damping not in KFAC_DAMPINGS:
        raise ValueError(f"{prefix}kfac_damping must be one of {KFAC_DAMPINGS}, got {kfac_damping!r}")
    if rank is not None:
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{prefix}rank must be None, 'auto' or an integer >= 1, got {rank!r}")
        if curvature not in ("kfac", "ekfac") or kfac_damping != "eigenbasis":
            raise ValueError(f"{prefix}rank applies to curvature='kfac' or 'ekfac' with "
                             f"kfac_damping='eigenbasis', got curvature={curvature!r}, "
                             f"kfac_damping={kfac_damping!r}")
    _check_number(f"{prefix}damping", damping, 0, strict=False)
    _check_number(f"{prefix}rps_lambda", rps_lambda, 0, strict=True)
    _check_number(f"{prefix}lje_step", lje_step, 0, strict=False)


def _check_magnitude(name: str, features: torch.Tensor) -> None:
    check_magnitude(name, largest_sq_norm(features), features.dtype, "pass float64 features or rescale them")


# Tensors the Attributor caches for every method, as methods.Method.saved.
_SHARED_SAVED = {"norm_sq": ("N",), "norm_quad": ("N",), "grad_sq": ("N",)}


def _saved_specs() -> tuple[dict[str, tuple], tuple[str, ...]]:
    """(shape spec of every cacheable tensor, names of every extra curvature)."""
    specs, curvatures = dict(_SHARED_SAVED), ()
    for name in methods.names():
        m = methods.get(name)
        specs.update(m.saved)
        curvatures += m.curvatures
    return specs, curvatures


class Rows:
    """One block of training rows as methods see it: the stored features,
    logits and labels, and phi and r computed from them on first use."""

    def __init__(self, attr: "Attributor", block: Block, buffer: torch.Tensor | None):
        self._attr, self._buffer = attr, buffer
        self.index, self.start = block.index, block.start  # index None: the whole training set
        self.features, self.logits, self.labels = block.features, block.logits, block.labels

    def __len__(self) -> int:
        return self.features.shape[0]

    @functools.cached_property
    def phi(self) -> torch.Tensor:
        """(b, Dp): the features with the bias column, in a buffer reused by the next block."""
        return self._attr.augment(self.features, self._buffer)

    @functools.cached_property
    def r(self) -> torch.Tensor:
        """(b, C): softmax(logits) - onehot(labels)."""
        return ops.residuals(self.logits, self.labels)


class _Means(curv.Statistics):
    """Means over every training row of fn(phi, logits), block by block and
    across ranks; logits_of(rows) replaces the stored logits (RPS-LJE's Theta*)."""

    def __init__(self, attr: "Attributor", label: str, logits_of=None):
        self.attr, self.label, self.logits_of = attr, label, logits_of
        self.N, self.C, self.Dp = attr.num_train, attr.num_classes, attr.num_features + attr.bias
        self.dtype, self.device = attr.dtype, attr.device

    def mean(self, fn):
        return self.mean_rows(lambda rows: fn(rows.phi, rows.logits if self.logits_of is None
                                              else self.logits_of(rows)))

    def mean_rows(self, fn):
        """As mean, with fn(rows: Rows) giving the block's means."""
        total = None
        for rows in self.attr._rows(self.attr._own_blocks(), self.label):
            part = tuple(x.double() * len(rows) for x in fn(rows))
            total = part if total is None else tuple(a.add_(b) for a, b in zip(total, part))
        return tuple(x / self.N for x in self.attr._group.all_sum(total))


class Attributor:
    """Explains test predictions by training examples.

    train: LastLayerData with labels, or an exemplar.Store (or its path) on
    disk, streamed shard by shard. curvature: "exact" | "kfac" | "ekfac" |
    "identity". damping: lambda >= 0 added to the curvature (for "exact" and
    weight decay lambda this is the Hessian of the regularised objective).
    bias: True when the layer has a bias (a constant-1 feature is appended to
    each block as it is scored, never to the whole training set), or the
    layer's bias vector (C,) itself. weight: the layer's weight (C, D);
    RPS-LJE needs it (and the bias vector when there is a bias), RPS-l2 starts
    its refit from it. kfac_damping: "eigenbasis" adds lambda to the K-FAC
    eigenvalues; "factored" damps each factor (rank-1 fast path). rank (kfac
    or ekfac, eigenbasis damping): truncate the damped inverse eigenvalues to
    rank m, so a score costs 2 m (C + Dp) flops instead of 2 C Dp; "auto"
    takes the smallest m within curvature.LOW_RANK_TOL (relative Frobenius).
    rps_lambda: RPS-l2's l2 strength. lje_step: RPS-LJE's ascent step gamma.
    distributed: run on every rank of the default torch.distributed process
    group: each rank reads its own blocks (shards), statistics are
    all-reduced and top-k merged, so every rank gets the whole answer.
    progress: a progress line on stderr for passes over the training set
    (None: only when stderr is a terminal)."""

    def __init__(self, train, curvature: str = "kfac", damping: float = 1e-3,
                 bias: bool | torch.Tensor = True, kfac_damping: str = "eigenbasis",
                 weight: torch.Tensor | None = None, rps_lambda: float = 1e-3,
                 lje_step: float = 1e-3, rank: int | str | None = None, distributed: bool = False,
                 progress: bool | None = None):
        if isinstance(train, (str, os.PathLike)):
            train = Store(train)
        if not isinstance(train, (LastLayerData, Store)):
            raise TypeError(f"train must be a LastLayerData or an exemplar.Store, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train is empty: the training set needs at least one example (N >= 1)")
        if isinstance(train, LastLayerData) and train.labels is None:  # a store always holds them
            raise ValueError("train.labels is None: training examples need their labels")
        _check_config(curvature, damping, kfac_damping, rps_lambda, lje_step, rank)
        if train.num_features == 0 and not (isinstance(bias, torch.Tensor) or bias):
            raise ValueError("features have D=0 columns and bias=False: there is no parameter to attribute")
        if isinstance(train, LastLayerData):
            _check_magnitude("features", train.features)
        else:
            largest, shard = train.largest_sq_norm()
            check_magnitude(f"features (shard {shard})", largest, train.dtype,
                            "write the store in float64 or rescale the features")
        config = dict(curvature=curvature, damping=float(damping), kfac_damping=kfac_damping,
                      rps_lambda=float(rps_lambda), lje_step=float(lje_step),
                      bias=bool(isinstance(bias, torch.Tensor) or bias), rank=rank)
        self._setup(train, config, None, distributed, progress)
        self.theta = self._theta_from_layer(weight, bias)
        if isinstance(train, Store):
            self._columns = train.columns(self._fit_tag(), self._group.rank == 0)
        fitted = self._columns.load_fitted()
        if fitted is not None:
            self._restore_fitted(*fitted)
        else:
            self.curvature = curv.build(curvature, self.damping, kfac_damping, _Means(self, "curvature"), rank)
            self._save_fitted()

    def _setup(self, train, config, theta, distributed=False, progress=None):
        self.train = train
        self.config = config
        self.bias = config["bias"]
        self.curvature_name = config["curvature"]
        self.damping = config["damping"]
        self.theta = theta  # (C, Dp) float64 or None: the trained layer [W | b]
        self.num_train, self.num_classes, self.num_features = len(train), train.num_classes, train.num_features
        self.dtype, self.device = train.dtype, train.device
        self._group = ProcessGroup.default() if distributed else ProcessGroup.single()
        self.progress = progress  # None: Progress shows it only on a terminal
        if isinstance(train, Store):
            self._blocks = train.blocks()
            self._group.check_same(train.fingerprint(), "store")
            self._columns = None  # the store's, once the layer is known (__init__)
        else:
            self._blocks = TensorBlocks(train, block_rows(self.num_features + self.bias))
            self._columns = MemoryColumns(self._blocks.sizes)
        if self._group.world > len(self._blocks):
            raise ValueError(f"{self._group.world} ranks but the training set has only {len(self._blocks)} "
                             "blocks (shards): each rank needs at least one; write the store with smaller shards")
        self._cache: dict[str, torch.Tensor] = {}  # what methods fit on the whole set (RPS refits)
        self._curvatures: dict = {}  # methods' extra curvatures by name, e.g. at RPS-LJE's Theta*
        self._buffer, self._buffer_busy = None, False

    def _fit_tag(self) -> str:
        """What a store's saved fits depend on: the settings and the layer."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        if self.theta is not None:
            digest.update(self.theta.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, curvature kinds) of what is fitted on the whole set."""
        tensors, kinds = {}, {}
        for name, curvature in {"curvature": self.curvature, **self._curvatures}.items():
            kinds[name], values = curv.state(curvature)
            tensors.update({f"{name}.{k}": v for k, v in values.items()})
        tensors.update({f"cache.{k}": v for k, v in self._cache.items()})
        return tensors, kinds

    def _restore_fitted(self, tensors, kinds) -> None:
        def group(prefix):
            return {k[len(prefix):]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)}
        self.curvature = curv.from_state(kinds["curvature"], group("curvature."))
        self._curvatures = {n: curv.from_state(k, group(f"{n}.")) for n, k in kinds.items() if n != "curvature"}
        self._cache = group("cache.")

    def _save_fitted(self) -> None:
        self._columns.save_fitted(*self._fitted_state())

    def _theta_from_layer(self, weight, bias):
        vector = bias if isinstance(bias, torch.Tensor) else None
        if weight is None:
            if vector is not None:
                raise ValueError("bias is a tensor but weight is None: pass the layer's weight (C, D) too")
            return None
        C, D = self.num_classes, self.num_features
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C, D):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a tensor of shape (C, D) = ({C}, {D}), got {got}")
        if weight.device != self.device:
            raise ValueError(f"weight is on {weight.device} but train is on {self.device}")
        if bias is True and vector is None:
            raise ValueError("bias=True with a weight: pass the layer's bias vector (C,) as bias=")
        if vector is not None and (vector.dim() != 1 or vector.shape[0] != C):
            raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(vector.shape)}")
        weight = weight.detach()
        theta = weight.double() if vector is None else torch.cat([weight.double(), vector.detach().double().view(C, 1)], 1)
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("weight and bias must be finite")
        # The first block is enough to catch a wrong layer.
        rows = next(self._rows([0], None, reuse=False))
        err = float((rows.phi.double() @ theta.T - rows.logits.double()).abs().max())
        scale = 1.0 + float(rows.logits.abs().max())
        tol = 1e-3 * scale  # catches a wrong layer, not float32 rounding of logits cast to float64
        if err > tol:
            raise ValueError(f"weight and bias do not reproduce train.logits: max |phi W^T + b - logits| "
                             f"= {err:.3g} > {tol:.3g}; pass the layer that produced the logits")
        return theta

    def augment(self, features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """features (n, D) -> phi (n, Dp): with the constant-1 bias column when the
        layer has a bias, written into `out` (rows >= n, Dp) when given."""
        if not self.bias:
            return features.contiguous()
        n, D = features.shape
        phi = torch.empty(n, D + 1, dtype=features.dtype, device=features.device) if out is None else out[:n]
        phi[:, :D] = features
        phi[:, D] = 1
        return phi

    # ------------------------------------------------- blocks and passes

    def _own_blocks(self) -> range:
        """The blocks this rank reads: all of them on one process."""
        return range(self._group.rank, len(self._blocks), self._group.world)

    def _rows(self, indices, label: str | None, reuse: bool = True):
        """Rows of the blocks numbered `indices`, with a progress line when `label`."""
        bar = Progress(label or "", len(indices), False if label is None else self.progress)
        # A pass nested in another (a fit on first use inside a query) gets no
        # buffer: the outer pass's rows still point into it.
        reuse = reuse and self.bias and not self._buffer_busy
        self._buffer_busy |= reuse
        try:
            for block in self._blocks.read(indices):
                if reuse and self._buffer is None:
                    self._buffer = torch.empty(self._blocks.max_rows, self.num_features + 1,
                                               dtype=self.dtype, device=self.device)
                yield Rows(self, block, self._buffer if reuse else None)
                bar.update()
        finally:
            bar.close()
            if reuse:
                self._buffer_busy = False

    def _whole(self) -> Rows:
        """The whole in-memory training set as one Rows (prepare's operands)."""
        if not isinstance(self.train, LastLayerData):
            raise ValueError("prepare() returns operands for the whole training set in memory; an "
                             "Attributor over a store streams its shards instead (use topk/scores)")
        t = self.train
        return Rows(self, Block(None, 0, t.features, t.logits, t.labels), None)

    # ------------------------------------------------- fitted state, for methods

    def cached(self, key: str | tuple[str, ...], compute):
        """The tensor saved under `key`, computed by `compute()` on first use and
        kept in the saved state; a tuple of keys caches a tuple of tensors
        computed together. Methods keep what they fit on the whole training
        set here (RPS refits); per-example values go in `per_example`."""
        keys = (key,) if isinstance(key, str) else key
        if any(k not in self._cache for k in keys):
            values = compute()
            self._cache.update(zip(keys, (values,) if isinstance(key, str) else values))
            self._save_fitted()
        return self._cache[key] if isinstance(key, str) else tuple(self._cache[k] for k in keys)

    def per_example(self, key: str | tuple[str, ...], rows: Rows, compute):
        """The (b,) values saved under `key` for `rows`, computed by compute(rows)
        on the block's first visit and kept (in memory and the saved state, or
        written into the store beside the shard); a tuple of keys gets a tuple."""
        single = isinstance(key, str)
        keys = (key,) if single else tuple(key)

        def block(rows):
            out = self._columns.get(keys, rows.index)
            if out is None:
                out = (compute(rows),) if single else tuple(compute(rows))
                self._columns.put(keys, rows.index, out)
            return out

        if rows.index is None:  # the whole set: block by block, then joined
            parts = [block(r) for r in self._rows(range(len(self._blocks)), None, reuse=False)]
            out = tuple(torch.cat(column) for column in zip(*parts))
        else:
            out = block(rows)
        return out[0] if single else out

    def means(self, label: str, logits_of=None) -> curv.Statistics:
        """Means over the training set for fitting (curvature.Statistics)."""
        return _Means(self, label, logits_of)

    def curvature_at(self, key: str, logits_of):
        """The damped curvature with this Attributor's settings at other logits
        of the same features, logits_of(rows) (b, C), fitted once under `key`."""
        if key not in self._curvatures:
            self._curvatures[key] = curv.build(self.curvature_name, self.damping, self.config["kfac_damping"],
                                               _Means(self, key, logits_of), self.config.get("rank"))
            self._save_fitted()
        return self._curvatures[key]

    def curvature_norms(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (b,), for the rows."""
        return self.per_example(("norm_sq", "norm_quad"), rows,
                                lambda r: self.curvature.norms(r.r, r.phi, self.num_train))

    def curvature_quad_norms(self, rows: Rows) -> torch.Tensor:
        """g_i^T H^-1 g_i, (b,): alone where the curvature computes it for less."""
        if self._columns.get(("norm_sq", "norm_quad"), rows.index) is not None:
            return self.curvature_norms(rows)[1]
        return self.per_example("norm_quad", rows, lambda r: self.curvature.quad_norms(r.r, r.phi))

    def gradient_sq_norms(self, rows: Rows) -> torch.Tensor:
        """|g_i|^2, (b,)."""
        return self.per_example("grad_sq", rows, lambda r: curv.gradient_sq_norms(r.r, r.phi).to(self.dtype))

    # ---------------------------------------------------------------- operands

    def prepare(self, method: str) -> TrainOperands:
        """The training side of `method` for the score ops over the whole
        in-memory training set: TrainOperands(r (N, C'), phi (N, Dp'), inv_norm
        (N,)), with phi a copy holding the bias column. Normalisers and RPS
        refits are fitted on the first call and kept."""
        return methods.get(method).operands(self, self._whole())

    def query(self, test: LastLayerData, method: str) -> Query:
        """The test side of `method`: Query(gradient, offset), with gradient
        curvature.General(S (T, C', Dp')) or curvature.Rank1(alpha (T, C'),
        beta (T, Dp')). `query.topk(self.prepare(method), k)` is `topk`."""
        m = methods.get(method)
        return m.query(self, self.check_test(test))

    def check_test(self, test) -> LastLayerData:
        """test (a LastLayerData or a DataLoader of (features, logits[, labels])
        batches) as one LastLayerData, checked against the training set: D, C,
        dtype, device and magnitude; the error names what differs."""
        test = as_last_layer_data(test)
        D = self.num_features
        if test.features.shape[1] != D:
            raise ValueError(f"test.features must have shape (T, D) with D={D} like train.features, "
                             f"got {tuple(test.features.shape)}")
        if test.num_classes != self.num_classes:
            raise ValueError(f"test.logits must have C={self.num_classes} classes like "
                             f"train.logits, got {tuple(test.logits.shape)}")
        if test.features.dtype != self.dtype:
            raise TypeError(f"test dtype {test.features.dtype} differs from train dtype {self.dtype}")
        if test.features.device != self.device:
            raise ValueError(f"test is on {test.features.device} but train is on {self.device}")
        _check_magnitude("test.features", test.features)
        return test

    # ---------------------------------------------------------------- API

    def scores(self, test, method: str = "if") -> torch.Tensor:
        """(T, N): score(t, i) of every training example for every test example.

        test: a LastLayerData, or a DataLoader (any iterable) of (features,
        logits[, labels]) batches; labels name the class to explain (default:
        each prediction). method: a name in exemplar.METHODS (the built-in
        ones of docs/design.md §1, or a registered one). Units: IF family, the change
        in the test loss when example i is up-weighted (positive = helpful:
        up-weighting lowers the loss); the RelatIF variants divide it by a
        norm of i's own influence, so they are unitless; grad_cos is a cosine
        in [-1, 1]; RPS, i's contribution to the explained logit; kNN,
        -|f_t - f_i|^2."""
        m, test = methods.get(method), self.check_test(test)
        q = m.query(self, test)
        return self._per_row(f"scores {method}", (len(test),), lambda rows: q.scores(m.operands(self, rows)))

    def topk(self, test, k: int, method: str = "if", largest: bool = True,
             out: str | os.PathLike | None = None, split: str = "train", test_rows: int = 1024,
             precision: str = "exact") -> TopK:
        """TopK(values, indices), each (T, k), best first: the k most helpful
        training examples per test example, or with largest=False the k most
        harmful (opponents). Never builds the (T, N) matrix. test and method
        as for scores(). Indices are rows of the training set (positions in
        the LastLayerData or the store). out: a folder for a resumable
        job: results are written per block of `test_rows` tests, and a rerun
        with the same arguments skips the blocks already there. split (with
        distributed=True): "train" gives each rank its own training blocks,
        "test" its own share of the tests against the whole training set.
        precision: "exact", or "tf32" / "bf16" to screen score tiles in that
        format and rescore only what a rigorous bound cannot rule out (same
        indices, exact scores; exemplar.ops.topk)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            error = ValueError if isinstance(k, int) and not isinstance(k, bool) else TypeError
            raise error(f"k must be an integer in [1, N] = [1, {self.num_train}], got {k!r}")
        if not isinstance(largest, bool):
            raise TypeError(f"largest must be True or False, got {largest!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        check_precision(precision)
        methods.get(method)  # the method and the test set are checked before any work
        test = self.check_test(test)
        if out is None:
            return TopK(*self._topk(test, k, method, largest, split, precision=precision))
        if isinstance(test_rows, bool) or not isinstance(test_rows, int) or test_rows < 1:
            raise ValueError(f"test_rows must be an integer >= 1, got {test_rows!r}")
        settings = dict(job="topk", method=method, k=k, largest=largest, test_rows=test_rows, T=len(test),
                        precision=precision,
                        test=tensor_checksum(test.features, test.logits, test.labels), N=self.num_train,
                        attributor=self._fit_tag())
        folder = ResultFolder(out, settings, writer=self._group.rank == 0)
        parts, blocks = [], range(0, len(test), test_rows)
        bar = Progress(f"topk {method} job", len(blocks), self.progress)
        for b, t0 in enumerate(blocks):
            done = folder.load(b)
            if done is None:
                values, indices = self._topk(test[t0:t0 + test_rows], k, method, largest, split, label="",
                                             precision=precision)
                done = {"values": values, "indices": indices}
                folder.save(b, done)
            parts.append((done["values"].to(self.device), done["indices"].to(self.device)))
            bar.update()
        bar.close()
        return TopK(torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts]))

    def explain(self, test, k: int = 5, method: str = "if", opponents: int = 0) -> Explanation:
        """An Explanation of each test prediction: its k top proponents by
        `method` and, with opponents=m > 0, its m top opponents (the most
        negative scores). test and method as for scores()."""
        if isinstance(opponents, bool) or not isinstance(opponents, int) or not 0 <= opponents <= self.num_train:
            raise ValueError(f"opponents must be an integer in [0, N] = [0, {self.num_train}], got {opponents!r}")
        test = self.check_test(test)
        against = self.topk(test, opponents, method, largest=False) if opponents else None
        return Explanation.of(test, self.topk(test, k, method), method, against)

    def _topk(self, test, k, method, largest, split="train", label=None, precision="exact"):
        if split == "test" and self._group.world > 1:
            part = test[self._group.share(len(test))]
            values, indices = self._topk_over(part, k, method, largest, range(len(self._blocks)), label, precision)
            return self._group.gather_rows(values, len(test)), self._group.gather_rows(indices, len(test))
        best = self._topk_over(test, k, method, largest, self._own_blocks(), label, precision)
        return merge_topk(self._group.all_gather(best), k, largest) if self._group.world > 1 else best

    def _topk_over(self, test, k, method, largest, blocks, label, precision):
        m, q = methods.get(method), self.query(test, method)
        best = None
        for rows in self._rows(blocks, f"topk {method}" if label is None else (label or None)):
            values, indices = q.topk(m.operands(self, rows), min(k, len(rows)), largest, precision)
            part = (values, indices + rows.start)
            best = part if best is None else merge_topk([best, part], k, largest)
        return best

    def total_scores(self, test, method: str = "if") -> torch.Tensor:
        """(N,): sum over the test set of score(t, i), in one pass (test and
        method as for scores())."""
        m, q = methods.get(method), self.query(test, method)
        return self._per_row(f"total_scores {method}", (), lambda rows: q.total(m.operands(self, rows)))

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,): score(i, i) of each training example on itself under its own
        label; large values flag examples the model finds hard or mislabelled
        (for RPS, rank by the absolute value). kNN: 0 by definition."""
        m = methods.get(method)
        return self._per_row(f"self_influence {method}", (), lambda rows: m.self_influence(self, rows))

    def _per_row(self, label: str, leading: tuple[int, ...], fn) -> torch.Tensor:
        """(*leading, N): fn(rows) (*leading, b) for every block, each rank filling
        its own blocks' columns and the sum over ranks joining them."""
        out = torch.zeros(*leading, self.num_train, dtype=self.dtype, device=self.device)
        for rows in self._rows(self._own_blocks(), label):
            out[..., rows.start:rows.start + len(rows)] = fn(rows)
        return self._group.all_sum((out,))[0]

    # ---------------------------------------------------------------- state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, config): everything fitted so far (curvature, normalisers,
        RPS fits), so `from_state` rebuilds this Attributor without refitting.
        In-memory training sets only: a store keeps its fits itself."""
        if not isinstance(self.train, LastLayerData):
            raise ValueError("state_dict() saves an in-memory Attributor; one over a store keeps its fits "
                             f"in the store ({self.train.path}) and reopens them from there")
        tensors = {"train.features": self.train.features, "train.logits": self.train.logits,
                   "train.labels": self.train.labels}
        if self.theta is not None:
            tensors["theta"] = self.theta
        kind, curvature_tensors = curv.state(self.curvature)
        tensors.update({f"curvature.{k}": v for k, v in curvature_tensors.items()})
        config = dict(self.config, curvature_kind=kind)
        for name, curvature in self._curvatures.items():
            kind, extra = curv.state(curvature)
            tensors.update({f"{name}.{k}": v for k, v in extra.items()})
            config[f"{name}_kind"] = kind
        tensors.update({f"cache.{k}": v for k, v in self._cache.items()})
        tensors.update({f"cache.{k}": v for k, v in self._columns.complete().items()})
        return {k: v.contiguous() for k, v in tensors.items()}, config

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
        _validate_state(tensors, config)
        def group(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        train = LastLayerData(tensors["train.features"], tensors["train.logits"], tensors["train.labels"])
        self = cls.__new__(cls)
        self._setup(train, {k: v for k, v in config.items() if not k.endswith("_kind")}, tensors.get("theta"))
        self.curvature = curv.from_state(config["curvature_kind"], group("curvature."))
        for name in _saved_specs()[1]:
            if f"{name}_kind" in config:
                self._curvatures[name] = curv.from_state(config[f"{name}_kind"], group(f"{name}."))
        specs = _saved_specs()[0]
        for key, value in group("cache.").items():
            if specs[key][:1] == ("N",):
                self._columns.put_whole(key, value)
            else:
                self._cache[key] = value
        return self

    def __repr__(self) -> str:
        return f"Attributor(N={self.num_train}, C={self.num_classes}, {json.dumps(self.config)})"


def _shape_and_dtype(spec: tuple, data_dtype: torch.dtype) -> tuple[tuple, torch.dtype]:
    """A saved tensor's spec: its dimensions, optionally followed by its dtype (default: the data's)."""
    if spec and isinstance(spec[-1], torch.dtype):
        return spec[:-1], spec[-1]
    return spec, data_dtype


_CONFIG_KEYS = ("curvature", "damping", "kfac_damping", "rps_lambda", "lje_step", "bias", "curvature_kind")


def _validate_state(tensors: dict[str, torch.Tensor], config: dict, prefix: str = "attributor.") -> None:
    """Checks saved Attributor state against its own settings before anything uses it."""
    if not isinstance(config, dict):
        raise ValueError(f"{prefix[:-1]} must be a JSON object, got {type(config).__name__}")
    specs, extra_curvatures = _saved_specs()
    for key in _CONFIG_KEYS:
        if key not in config:
            raise ValueError(f"missing key '{prefix}{key}'")
    curvature_keys = ("curvature",) + extra_curvatures
    unknown = set(config) - set(_CONFIG_KEYS) - {"rank"} - {f"{name}_kind" for name in extra_curvatures}
    if unknown:
        raise ValueError(f"unknown key '{prefix}{sorted(unknown)[0]}'")
    _check_config(config["curvature"], config["damping"], config["kfac_damping"], config["rps_lambda"],
                  config["lje_step"], config.get("rank"), prefix)
    if not isinstance(config["bias"], bool):
        raise ValueError(f"{prefix}bias must be true or false, got {config['bias']!r}")
    kinds = curv.kinds_of(config["curvature"], config["kfac_damping"], config["damping"], config.get("rank"))
    for key in (f"{name}_kind" for name in curvature_keys):
        if key in config and config[key] not in kinds:
            raise ValueError(f"{prefix}{key} is {config[key]!r} but curvature={config['curvature']!r}, "
                             f"kfac_damping={config['kfac_damping']!r}, damping={config['damping']!r} "
                             f"give {' or '.join(map(repr, kinds))}")
    for key in ("train.features", "train.logits", "train.labels"):
        if not isinstance(tensors.get(key), torch.Tensor):
            raise ValueError(f"missing tensor '{key}'")
    try:
        train = LastLayerData(tensors["train.features"], tensors["train.logits"], tensors["train.labels"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"saved training data (train.features, train.logits, train.labels): {err}") from err
    N, D = train.features.shape
    C, Dp = train.num_classes, D + int(config["bias"])
    sizes = {"N": N, "C": C, "D": D, "Dp": Dp, "D+1": D + 1}
    expected = {"theta": ((C, Dp), torch.float64)}
    for group in curvature_keys:
        if f"{group}_kind" in config:
            shapes = curv.KINDS[config[f"{group}_kind"]].shapes(C, Dp)
            # A low-rank curvature's rank m is whatever its first factor holds (>= 1).
            free = next((f"{group}.{name}" for name, spec in shapes.items() if "m" in spec), None)
            held = tensors.get(free) if free else None
            m = held.shape[0] if isinstance(held, torch.Tensor) and held.dim() > 0 and held.shape[0] >= 1 else 1
            for name, spec in shapes.items():
                dims, dtype = _shape_and_dtype(spec, train.features.dtype)
                expected[f"{group}.{name}"] = (tuple(m if d == "m" else d for d in dims), dtype)
    for name, spec in specs.items():
        dims, dtype = _shape_and_dtype(spec, train.features.dtype)
        expected["cache." + name] = (tuple(sizes[d] for d in dims), dtype)
    required = [k for k in expected if k.startswith(tuple(f"{group}." for group in curvature_keys))]
    for key in required:
        if key not in tensors:
            raise ValueError(f"missing tensor '{key}'")
    where = f"for C={C}, Dp=D+bias={Dp} ({prefix}bias={config['bias']})"
    for key, value in tensors.items():
        if key.startswith("train."):
            continue
        if key not in expected:
            raise ValueError(f"unknown tensor '{key}'")
        shape, dtype = expected[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{key} must have shape {shape} {where}, got {tuple(value.shape)}")
        if value.dtype != dtype:
            raise ValueError(f"{key} must have dtype {dtype}, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} must be finite, found {int((~torch.isfinite(value)).sum())} "
                             "non-finite entries")
