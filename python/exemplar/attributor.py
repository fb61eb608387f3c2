"""Attributor: scores, top-k and self-influence of training examples for a
classifier's last layer (docs/design.md §1, §3). It holds the training data in the
ops' form and what is fitted on it (curvature, normalisers, RPS fits); the
methods themselves live in methods.py. `prepare(method)` and `query(test,
method)` return the operands of the score ops, for libraries that drive the
kernels themselves."""
from __future__ import annotations

import json
import math

import torch

from . import curvature as curv
from . import methods, ops
from .data import LastLayerData
from .methods import Query, TrainOperands

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
    """Every score multiplies features by features (kNN distances, gradient dot
    products, Gram blocks): refuse rows whose squared norm the dtype cannot hold."""
    if features.numel() == 0:
        return
    limit = torch.finfo(features.dtype).max / 16
    largest = float(torch.linalg.vector_norm(features, dim=1).max().double() ** 2)  # inf when it overflows
    if largest > limit:
        raise ValueError(f"{name} are too large for {features.dtype}: the largest squared row norm is "
                         f"{largest:.3g}, beyond {limit:.3g}, so scores would overflow; pass float64 "
                         "features or rescale them")


# Tensors the Attributor caches for every method, as methods.Method.saved.
_SHARED_SAVED = {"ones": ("N",), "norm_sq": ("N",), "norm_quad": ("N",), "grad_sq": ("N",)}


def _saved_specs() -> tuple[dict[str, tuple], tuple[str, ...]]:
    """(shape spec of every cacheable tensor, names of every extra curvature)."""
    specs, curvatures = dict(_SHARED_SAVED), ()
    for name in methods.names():
        m = methods.get(name)
        specs.update(m.saved)
        curvatures += m.curvatures
    return specs, curvatures


class Attributor:
    """Explains test predictions by training examples.

    train: LastLayerData with labels. curvature: "exact" | "kfac" | "ekfac" |
    "identity". damping: lambda >= 0 added to the curvature (for "exact" and
    weight decay lambda this is the Hessian of the regularised objective).
    bias: True when the layer has a bias (a constant-1 feature is appended), or
    the layer's bias vector (C,) itself. weight: the layer's weight (C, D);
    RPS-LJE needs it (and the bias vector when there is a bias), RPS-l2 starts
    its refit from it. kfac_damping: "eigenbasis" adds lambda to the K-FAC
    eigenvalues; "factored" damps each factor (rank-1 fast path). rank (kfac
    or ekfac, eigenbasis damping): truncate the damped inverse eigenvalues to
    rank m, so a score costs 2 m (C + Dp) flops instead of 2 C Dp; "auto"
    takes the smallest m within curvature.LOW_RANK_TOL (relative Frobenius).
    rps_lambda: RPS-l2's l2 strength. lje_step: RPS-LJE's ascent step gamma."""

    def __init__(self, train: LastLayerData, curvature: str = "kfac", damping: float = 1e-3,
                 bias: bool | torch.Tensor = True, kfac_damping: str = "eigenbasis",
                 weight: torch.Tensor | None = None, rps_lambda: float = 1e-3,
                 lje_step: float = 1e-3, rank: int | str | None = None):
        if not isinstance(train, LastLayerData):
            raise TypeError(f"train must be a LastLayerData, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train is empty: the training set needs at least one example (N >= 1)")
        if train.labels is None:
            raise ValueError("train.labels is None: training examples need their labels")
        _check_config(curvature, damping, kfac_damping, rps_lambda, lje_step, rank)
        if train.features.shape[1] == 0 and not (isinstance(bias, torch.Tensor) or bias):
            raise ValueError("features have D=0 columns and bias=False: there is no parameter to attribute")
        _check_magnitude("features", train.features)
        config = dict(curvature=curvature, damping=float(damping), kfac_damping=kfac_damping,
                      rps_lambda=float(rps_lambda), lje_step=float(lje_step),
                      bias=bool(isinstance(bias, torch.Tensor) or bias), rank=rank)
        self._setup(train, config, self._theta_from_layer(train, weight, bias))
        self.curvature = curv.build(curvature, self.damping, kfac_damping, self.phi, train.logits, rank)

    def _setup(self, train, config, theta):
        self.train = train
        self.config = config
        self.bias = config["bias"]
        self.curvature_name = config["curvature"]
        self.damping = config["damping"]
        self.theta = theta  # (C, Dp) float64 or None: the trained layer [W | b]
        self.phi = self.augment(train.features)  # (N, Dp)
        self.r = ops.residuals(train.logits, train.labels)  # (N, C)
        self._cache: dict[str, torch.Tensor] = {}
        self._curvatures: dict = {}  # methods' extra curvatures by name, e.g. at RPS-LJE's Theta*

    @staticmethod
    def _theta_from_layer(train, weight, bias):
        vector = bias if isinstance(bias, torch.Tensor) else None
        if weight is None:
            if vector is not None:
                raise ValueError("bias is a tensor but weight is None: pass the layer's weight (C, D) too")
            return None
        N, D = train.features.shape
        C = train.num_classes
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C, D):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a tensor of shape (C, D) = ({C}, {D}), got {got}")
        if weight.device != train.features.device:
            raise ValueError(f"weight is on {weight.device} but train is on {train.features.device}")
        if bias is True and vector is None:
            raise ValueError("bias=True with a weight: pass the layer's bias vector (C,) as bias=")
        if vector is not None and (vector.dim() != 1 or vector.shape[0] != C):
            raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(vector.shape)}")
        weight = weight.detach()
        theta = weight.double() if vector is None else torch.cat([weight.double(), vector.detach().double().view(C, 1)], 1)
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("weight and bias must be finite")
        phi = train.features.double()
        if vector is not None:
            phi = torch.cat([phi, phi.new_ones(N, 1)], 1)
        err = float((phi @ theta.T - train.logits.double()).abs().max())
        scale = 1.0 + float(train.logits.abs().max())
        tol = 1e-3 * scale  # catches a wrong layer, not float32 rounding of logits cast to float64
        if err > tol:
            raise ValueError(f"weight and bias do not reproduce train.logits: max |phi W^T + b - logits| "
                             f"= {err:.3g} > {tol:.3g}; pass the layer that produced the logits")
        return theta

    def augment(self, features: torch.Tensor) -> torch.Tensor:
        """features (n, D) -> phi (n, Dp): with the constant-1 bias column when the layer has a bias."""
        if not self.bias:
            return features.contiguous()
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
        return torch.cat([features, ones], dim=1)

    @property
    def num_train(self) -> int:
        return len(self.train)

    # ------------------------------------------------- fitted state, for methods

    def cached(self, key: str | tuple[str, ...], compute):
        """The tensor saved under `key`, computed by `compute()` on first use and
        kept in the saved state; a tuple of keys caches a tuple of tensors
        computed together. Methods keep everything they fit here."""
        keys = (key,) if isinstance(key, str) else key
        if any(k not in self._cache for k in keys):
            values = compute()
            self._cache.update(zip(keys, (values,) if isinstance(key, str) else values))
        return self._cache[key] if isinstance(key, str) else tuple(self._cache[k] for k in keys)

    def curvature_at(self, key: str, logits: torch.Tensor):
        """The damped curvature with this Attributor's settings at other logits
        (N, C) of the same features, fitted once and saved under `key`."""
        if key not in self._curvatures:
            self._curvatures[key] = curv.build(self.curvature_name, self.damping, self.config["kfac_damping"],
                                               self.phi, logits, self.config.get("rank"))
        return self._curvatures[key]

    def curvature_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (N,): one pass, on first use."""
        return self.cached(("norm_sq", "norm_quad"), lambda: self.curvature.norms(self.r, self.phi))

    def curvature_quad_norms(self) -> torch.Tensor:
        """g_i^T H^-1 g_i, (N,): alone where the curvature computes it for less."""
        return self.cached("norm_quad", lambda: self.curvature.quad_norms(self.r, self.phi))

    def gradient_sq_norms(self) -> torch.Tensor:
        """|g_i|^2, (N,)."""
        return self.cached("grad_sq", lambda: curv.gradient_sq_norms(self.r, self.phi).to(self.phi.dtype))

    # ---------------------------------------------------------------- operands

    def prepare(self, method: str) -> TrainOperands:
        """The training side of `method` for the score ops: TrainOperands(r (N, C'),
        phi (N, Dp'), inv_norm (N,)). Fitted on the first call (normalisers,
        RPS refits), cached afterwards."""
        return methods.get(method).prepare(self)

    def query(self, test: LastLayerData, method: str) -> Query:
        """The test side of `method`: Query(gradient, offset), with gradient
        curvature.General(S (T, C', Dp')) or curvature.Rank1(alpha (T, C'),
        beta (T, Dp')). `query.topk(self.prepare(method), k)` is `topk`."""
        m = methods.get(method)
        self._check_test(test)
        return m.query(self, test)

    def _check_test(self, test) -> None:
        if not isinstance(test, LastLayerData):
            raise TypeError(f"test must be a LastLayerData, got {type(test).__name__}")
        D = self.train.features.shape[1]
        if test.features.shape[1] != D:
            raise ValueError(f"test.features must have shape (T, D) with D={D} like train.features, "
                             f"got {tuple(test.features.shape)}")
        if test.num_classes != self.train.num_classes:
            raise ValueError(f"test.logits must have C={self.train.num_classes} classes like "
                             f"train.logits, got {tuple(test.logits.shape)}")
        if test.features.dtype != self.phi.dtype:
            raise TypeError(f"test dtype {test.features.dtype} differs from train dtype {self.phi.dtype}")
        if test.features.device != self.phi.device:
            raise ValueError(f"test is on {test.features.device} but train is on {self.phi.device}")
        _check_magnitude("test.features", test.features)

    # ---------------------------------------------------------------- API

    def scores(self, test: LastLayerData, method: str = "if") -> torch.Tensor:
        """(T, N): score(t, i) of every training example for every test example.
        IF family: positive = helpful (up-weighting i lowers the test loss).
        RPS: i's contribution to the explained logit. kNN: -|f_t - f_i|^2."""
        return self.query(test, method).scores(self.prepare(method))

    def topk(self, test: LastLayerData, k: int, method: str = "if", largest: bool = True):
        """(values, indices), each (T, k), best first: the k most helpful training
        examples per test example, or with largest=False the k most harmful
        (opponents). Never builds the (T, N) matrix."""
        return self.query(test, method).topk(self.prepare(method), k, largest)

    def total_scores(self, test: LastLayerData, method: str = "if") -> torch.Tensor:
        """(N,): sum over the test set of score(t, i), in one pass."""
        return self.query(test, method).total(self.prepare(method))

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,): score(i, i) of each training example on itself under its own
        label; large values flag examples the model finds hard or mislabelled
        (for RPS, rank by the absolute value). kNN: 0 by definition."""
        return methods.get(method).self_influence(self)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, config): everything fitted so far (curvature, normalisers,
        RPS fits), so `from_state` rebuilds this Attributor without refitting."""
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
        return {k: v.contiguous() for k, v in tensors.items()}, config

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
        self._cache = group("cache.")
        return self

    def __repr__(self) -> str:
        return f"Attributor(N={self.num_train}, C={self.train.num_classes}, {json.dumps(self.config)})"


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
