"""Attributor: scores, top-k and self-influence of training examples for a
classifier's last layer (DESIGN.md §1, §4). Every method reduces to the fused
score op: a training side (R, Phi, inv_norm), computed once per Attributor, and
a test side (a preconditioned gradient S_t, general or rank-1, plus an optional
per-test offset added to every score of that test)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from . import curvature as curv
from . import ops, rps
from .data import LastLayerData

INFLUENCE_METHODS = ("if", "theta_relatif", "l_relatif", "grad_dot", "grad_cos")
METHODS = INFLUENCE_METHODS + ("rps_l2", "rps_lje", "knn")
CURVATURES = ("exact", "kfac", "ekfac", "identity")
KFAC_DAMPINGS = ("eigenbasis", "factored")


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    # A zero-gradient example (a perfectly fit one) scores 0 under every method.
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _scaled(pre, factor: float):
    if isinstance(pre, curv.Rank1):
        return curv.Rank1(pre.alpha * factor, pre.beta)
    return curv.General(pre.S * factor)


@dataclass
class _Query:
    pre: curv.General | curv.Rank1
    offset: torch.Tensor | None  # (T,) added to every score of test t


def _check_number(name, value, low, strict):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _check_config(curvature, damping, kfac_damping, rps_lambda, lje_step, prefix=""):
    """The Attributor's settings, checked the same way when given and when loaded."""
    if curvature not in CURVATURES:
        raise ValueError(f"{prefix}curvature must be one of {CURVATURES}, got {curvature!r}")
    if kfac_damping not in KFAC_DAMPINGS:
        raise ValueError(f"{prefix}kfac_damping must be one of {KFAC_DAMPINGS}, got {kfac_damping!r}")
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


def _check_largest(largest) -> None:
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be True or False, got {largest!r}")


# Shapes (in N, C, D, Dp) and dtypes ("data" = the training data's) of the
# tensors an Attributor caches, for validating saved state.
_CACHE_SPEC = {
    "norm_sq": ("N",), "norm_quad": ("N",), "grad_sq": ("N",), "inv_theta": ("N",), "inv_l": ("N",),
    "inv_grad": ("N",), "ones": ("N",), "rps_l2_alpha": ("N", "C"), "lje_r": ("N", "C"),
    "knn_phi": ("N", "D+1"), "rps_l2_theta": ("C", "Dp", torch.float64),
    "lje_theta": ("C", "Dp", torch.float64),
}


class Attributor:
    """Explains test predictions by training examples.

    train: LastLayerData with labels. curvature: "exact" | "kfac" | "ekfac" |
    "identity". damping: lambda >= 0 added to the curvature (for "exact" and
    weight decay lambda this is the Hessian of the regularised objective).
    bias: True when the layer has a bias (a constant-1 feature is appended), or
    the layer's bias vector (C,) itself. weight: the layer's weight (C, D);
    RPS-LJE needs it (and the bias vector when there is a bias), RPS-l2 starts
    its refit from it. kfac_damping: "eigenbasis" adds lambda to the K-FAC
    eigenvalues; "factored" damps each factor (rank-1 fast path).
    rps_lambda: RPS-l2's l2 strength. lje_step: RPS-LJE's ascent step gamma."""

    def __init__(self, train: LastLayerData, curvature: str = "kfac", damping: float = 1e-3,
                 bias: bool | torch.Tensor = True, kfac_damping: str = "eigenbasis",
                 weight: torch.Tensor | None = None, rps_lambda: float = 1e-3,
                 lje_step: float = 1e-3):
        if not isinstance(train, LastLayerData):
            raise TypeError(f"train must be a LastLayerData, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train is empty: the training set needs at least one example (N >= 1)")
        if train.labels is None:
            raise ValueError("train.labels is None: training examples need their labels")
        _check_config(curvature, damping, kfac_damping, rps_lambda, lje_step)
        if train.features.shape[1] == 0 and not (isinstance(bias, torch.Tensor) or bias):
            raise ValueError("features have D=0 columns and bias=False: there is no parameter to attribute")
        _check_magnitude("features", train.features)
        config = dict(curvature=curvature, damping=float(damping), kfac_damping=kfac_damping,
                      rps_lambda=float(rps_lambda), lje_step=float(lje_step),
                      bias=bool(isinstance(bias, torch.Tensor) or bias))
        self._setup(train, config, self._theta_from_layer(train, weight, bias))
        self.curvature = curv.build(curvature, self.damping, kfac_damping, self.phi, train.logits)

    def _setup(self, train, config, theta):
        self.train = train
        self.config = config
        self.bias = config["bias"]
        self.curvature_name = config["curvature"]
        self.damping = config["damping"]
        self.theta = theta  # (C, Dp) float64 or None: the trained layer [W | b]
        self.phi = self._augment(train.features)  # (N, Dp)
        self.r = ops.residuals(train.logits, train.labels)  # (N, C)
        self._cache: dict[str, torch.Tensor] = {}
        self._lje_curvature = None

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

    def _augment(self, features: torch.Tensor) -> torch.Tensor:
        if not self.bias:
            return features.contiguous()
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
        return torch.cat([features, ones], dim=1)

    def _cached(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def num_train(self) -> int:
        return len(self.train)

    # ------------------------------------------------------------ training side

    def _curvature_norms(self):
        """(|H^-1 g_i|^2, g_i^T H^-1 g_i), each (N,): one pass, on first use."""
        if "norm_sq" not in self._cache:
            sq, quad = self.curvature.norms(self.r, self.phi)
            self._cache.update(norm_sq=sq, norm_quad=quad)
        return self._cache["norm_sq"], self._cache["norm_quad"]

    def _grad_sq_norms(self) -> torch.Tensor:
        return self._cached("grad_sq", lambda: curv.gradient_sq_norms(self.r, self.phi).to(self.phi.dtype))

    def _inv_norm(self, method: str) -> torch.Tensor:
        if method == "theta_relatif":
            return self._cached("inv_theta", lambda: _safe_reciprocal(self._curvature_norms()[0].sqrt()))
        if method == "l_relatif":
            return self._cached("inv_l", lambda: _safe_reciprocal(self._curvature_norms()[1].clamp_min(0).sqrt()))
        if method == "grad_cos":
            return self._cached("inv_grad", lambda: _safe_reciprocal(self._grad_sq_norms().sqrt()))
        return self._cached("ones", lambda: torch.ones_like(self.phi[:, 0]))

    def _rps_alpha(self) -> torch.Tensor:
        """(N, C): RPS-l2's representer values, from the refit on first use."""
        def fit():
            theta, alpha = rps.fit_l2(self.phi, self.train.logits, self.config["rps_lambda"], init=self.theta)
            self._cache["rps_l2_theta"] = theta
            return alpha.to(self.phi.dtype)
        return self._cached("rps_l2_alpha", fit)

    def _lje(self):
        """(Theta* (C, Dp) float64, residuals at Theta* (N, C), curvature at Theta*)."""
        if self.theta is None:
            raise ValueError("method 'rps_lje' needs the trained layer: pass weight= (and the bias "
                             "vector as bias=) to the Attributor")
        if self._lje_curvature is None:
            theta_star = self._cached("lje_theta", lambda: rps.ascent_step(
                self.phi, self.r, self.theta, self.config["lje_step"]))
            logits_star = (self.phi.double() @ theta_star.T).to(self.phi.dtype)
            self._cached("lje_r", lambda: ops.residuals(logits_star, self.train.labels))
            self._lje_curvature = curv.build(self.curvature_name, self.damping,
                                             self.config["kfac_damping"], self.phi, logits_star)
        return self._cache["lje_theta"], self._cache["lje_r"], self._lje_curvature

    def _knn_phi(self) -> torch.Tensor:
        # -|f_t - f_i|^2 = [2 f_t, -1] . [f_i, |f_i|^2] - |f_t|^2: a dot product plus an offset.
        f = self.train.features
        return self._cached("knn_phi", lambda: torch.cat([f, f.square().sum(1, keepdim=True)], 1))

    def _train_side(self, method: str):
        """(R (N, C'), Phi (N, Dp'), inv_norm (N,)) for the score op."""
        if method == "rps_l2":
            return self._rps_alpha(), self.phi, self._inv_norm(method)
        if method == "rps_lje":
            return self._lje()[1], self.phi, self._inv_norm(method)
        if method == "knn":
            return torch.ones_like(self.phi[:, :1]), self._knn_phi(), self._inv_norm(method)
        return self.r, self.phi, self._inv_norm(method)

    # ---------------------------------------------------------------- test side

    def _check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def _query(self, test: LastLayerData, method: str) -> _Query:
        self._check_method(method)
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
        explained = test.explained_labels()
        phi = self._augment(test.features)
        if method == "knn":
            f = test.features
            return _Query(curv.Rank1(torch.ones_like(f[:, :1]), torch.cat([2 * f, -torch.ones_like(f[:, :1])], 1)),
                          -f.square().sum(1))
        if method in ("rps_l2", "rps_lje"):
            onehot = torch.nn.functional.one_hot(explained, test.num_classes).to(phi.dtype)
            if method == "rps_l2":
                return _Query(curv.Rank1(onehot, phi), None)
            theta_star, _, curvature_star = self._lje()
            N = self.num_train
            logit = (phi.double() @ theta_star.T).gather(1, explained.view(-1, 1)).view(-1)
            return _Query(_scaled(curvature_star.precondition(onehot, phi), -1.0 / N),
                          (logit / N).to(phi.dtype))
        r = ops.residuals(test.logits, explained)
        if method == "grad_dot":
            return _Query(curv.Rank1(r, phi), None)
        if method == "grad_cos":
            norms = curv.gradient_sq_norms(r, phi).sqrt()
            return _Query(curv.Rank1(r * _safe_reciprocal(norms).to(r.dtype).unsqueeze(1), phi), None)
        return _Query(self.curvature.precondition(r, phi), None)

    # ---------------------------------------------------------------- API

    def scores(self, test: LastLayerData, method: str = "if") -> torch.Tensor:
        """(T, N): score(t, i) of every training example for every test example.
        IF family: positive = helpful (up-weighting i lowers the test loss).
        RPS: i's contribution to the explained logit. kNN: -|f_t - f_i|^2."""
        q = self._query(test, method)
        R, Phi, inv = self._train_side(method)
        if isinstance(q.pre, curv.Rank1):
            out = ops.scores_rank1(q.pre.alpha, q.pre.beta, R, Phi, inv)
        else:
            out = ops.scores(q.pre.S, R, Phi, inv)
        return out if q.offset is None else out + q.offset.unsqueeze(1)

    def topk(self, test: LastLayerData, k: int, method: str = "if", largest: bool = True):
        """(values, indices), each (T, k), best first: the k most helpful training
        examples per test example, or with largest=False the k most harmful
        (opponents). Never builds the (T, N) matrix."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise ValueError(f"k must be an integer in [1, N] = [1, {self.num_train}], got {k!r}")
        _check_largest(largest)
        q = self._query(test, method)
        R, Phi, inv = self._train_side(method)
        if isinstance(q.pre, curv.Rank1):
            values, indices = ops.topk_rank1(q.pre.alpha, q.pre.beta, R, Phi, inv, k, largest)
        else:
            values, indices = ops.topk(q.pre.S, R, Phi, inv, k, largest)
        return (values if q.offset is None else values + q.offset.unsqueeze(1)), indices

    def total_scores(self, test: LastLayerData, method: str = "if") -> torch.Tensor:
        """(N,): sum over the test set of score(t, i), in one pass: the score is
        linear in S_t, so the test side is summed first."""
        q = self._query(test, method)
        R, Phi, inv = self._train_side(method)
        if isinstance(q.pre, curv.Rank1):
            S = q.pre.alpha.T @ q.pre.beta
        else:
            S = q.pre.S.sum(0)
        out = ops.scores(S.unsqueeze(0).contiguous(), R, Phi, inv)[0]
        return out if q.offset is None else out + q.offset.sum()

    def self_influence(self, method: str = "if") -> torch.Tensor:
        """(N,): score(i, i) of each training example on itself under its own
        label; large values flag examples the model finds hard or mislabelled
        (for RPS, rank by the absolute value). kNN: 0 by definition."""
        self._check_method(method)
        y = self.train.labels
        if method == "knn":
            return torch.zeros_like(self.phi[:, 0])
        if method == "rps_l2":
            return self._rps_alpha().gather(1, y.view(-1, 1)).view(-1) * self.phi.square().sum(1)
        if method == "rps_lje":
            theta_star, r_star, curvature_star = self._lje()
            N = self.num_train
            onehot = torch.nn.functional.one_hot(y, self.train.num_classes).to(self.phi.dtype)
            # e_y^T H*^-1 (r*_i phi_i^T) phi_i by polarisation: both sides are rank 1 in phi_i.
            cross = (curvature_star.norms(onehot + r_star, self.phi)[1]
                     - curvature_star.norms(onehot - r_star, self.phi)[1]) / 4
            logit = (self.phi.double() @ theta_star.T).gather(1, y.view(-1, 1)).view(-1)
            return (logit.to(self.phi.dtype) - cross) / N
        if method in ("grad_dot", "grad_cos"):
            return self._grad_sq_norms() * self._inv_norm(method).square()
        return self._curvature_norms()[1] * self._inv_norm(method)

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
        if self._lje_curvature is not None:
            kind, lje_tensors = curv.state(self._lje_curvature)
            tensors.update({f"lje_curvature.{k}": v for k, v in lje_tensors.items()})
            config["lje_curvature_kind"] = kind
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
        if "lje_curvature_kind" in config:
            self._lje_curvature = curv.from_state(config["lje_curvature_kind"], group("lje_curvature."))
        self._cache = group("cache.")
        return self

    def __repr__(self) -> str:
        return f"Attributor(N={self.num_train}, C={self.train.num_classes}, {json.dumps(self.config)})"


_CONFIG_KEYS = ("curvature", "damping", "kfac_damping", "rps_lambda", "lje_step", "bias", "curvature_kind")


def _validate_state(tensors: dict[str, torch.Tensor], config: dict, prefix: str = "attributor.") -> None:
    """Checks saved Attributor state against its own settings before anything uses it."""
    if not isinstance(config, dict):
        raise ValueError(f"{prefix[:-1]} must be a JSON object, got {type(config).__name__}")
    for key in _CONFIG_KEYS:
        if key not in config:
            raise ValueError(f"missing key '{prefix}{key}'")
    unknown = set(config) - set(_CONFIG_KEYS) - {"lje_curvature_kind"}
    if unknown:
        raise ValueError(f"unknown key '{prefix}{sorted(unknown)[0]}'")
    _check_config(config["curvature"], config["damping"], config["kfac_damping"], config["rps_lambda"],
                  config["lje_step"], prefix)
    if not isinstance(config["bias"], bool):
        raise ValueError(f"{prefix}bias must be true or false, got {config['bias']!r}")
    kind = curv.kind_of(config["curvature"], config["kfac_damping"])
    for key in ("curvature_kind", "lje_curvature_kind"):
        if key in config and config[key] != kind:
            raise ValueError(f"{prefix}{key} is {config[key]!r} but curvature={config['curvature']!r}, "
                             f"kfac_damping={config['kfac_damping']!r} give {kind!r}")
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
    for group, kind_key in (("curvature.", "curvature_kind"), ("lje_curvature.", "lje_curvature_kind")):
        if kind_key in config:
            for name, shape in curv.KINDS[config[kind_key]].shapes(C, Dp).items():
                expected[group + name] = (shape, train.features.dtype)
    for name, spec in _CACHE_SPEC.items():
        dims, dtype = (spec[:-1], spec[-1]) if isinstance(spec[-1], torch.dtype) else (spec, train.features.dtype)
        expected["cache." + name] = (tuple(sizes[d] for d in dims), dtype)
    required = [k for k in expected if k.startswith(("curvature.", "lje_curvature."))]
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
