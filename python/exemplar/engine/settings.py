"""Settings: everything that decides what an Attributor or a
NetworkExplainer fits and answers, in one frozen dataclass, validated once,
with a stable fingerprint (docs/design.md §4). Saved state stores it as a dict (to_dict) and reads it
back through from_dict, so a setting is checked the same way however it
arrives."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from .. import curvature as curv

KFAC_DAMPINGS = ("eigenbasis", "factored")
FISHERS = ("expected", "sampled", "empirical")
# What only a whole network sets; a last layer's settings hold their defaults and are written
# without them, as before networks shared this class (saved state, fit caches, job folders).
NETWORK_FIELDS = ("layers", "fisher", "projection", "seed")
# Fields added after saved state was first written: a file without them holds their defaults.
LATER_FIELDS = ("rank",) + NETWORK_FIELDS


def _check_number(name: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _is_integer(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class Settings:
    """The settings of an Attributor (the last layer: layers None) or a
    NetworkExplainer (its layers, described). Every field is checked on
    construction; the error names the field and what it accepts. A field's metadata holds its
    help and, where the command line takes it, its option's argparse
    arguments ("option"): the CLI's options and defaults come from here."""
    curvature: str = field(default="kfac", metadata={
        "help": "the curvature's registered name: exemplar.CURVATURES (exact | kfac | ekfac | identity) "
                "or one added with exemplar.curvature.register",
        "option": lambda: {"choices": curv.names()}})
    damping: float = field(default=1e-3, metadata={
        "help": "lambda >= 0 added to the curvature; for 'exact' and weight decay lambda, the Hessian of "
                "the regularised objective", "option": lambda: {"type": float}})
    kfac_damping: str = field(default="eigenbasis", metadata={
        "help": "K-FAC: 'eigenbasis' adds lambda to the eigenvalues, 'factored' splits it between the "
                "factors (a rank-1 fast path)", "option": lambda: {"choices": KFAC_DAMPINGS}})
    rps_lambda: float = field(default=1e-3, metadata={"help": "RPS-l2's l2 strength, > 0",
                                                      "option": lambda: {"type": float}})
    lje_step: float = field(default=1e-3, metadata={"help": "RPS-LJE's ascent step gamma, >= 0",
                                                    "option": lambda: {"type": float}})
    bias: bool = field(default=True, metadata={"help": "the layer has a bias (a constant-1 feature)"})
    rank: int | str | None = field(default=None, metadata={
        "help": "kfac/ekfac with eigenbasis damping: truncate the damped inverse eigenvalues to rank m, "
                "or 'auto'", "option": lambda: {"type": lambda text: text if text == "auto" else int(text)}})
    layers: tuple[dict, ...] | None = field(default=None, metadata={
        "help": "a whole network's layers as NetworkExplainer describes them (name, kind, sides, "
                "projection); None: the last layer"})
    fisher: str = field(default="expected", metadata={
        "help": "the output gradients the curvature is fitted from: 'expected' (every class weighted by "
                "its probability: the Gauss-Newton matrix, a last layer's always), 'sampled' (one label "
                "drawn from the softmax, seeded) or 'empirical' (the labels)"})
    projection: int | None = field(default=None, metadata={
        "help": "a network layer's sides wider than this are projected to it (seeded Gaussian); None: exact"})
    seed: int = field(default=0, metadata={"help": "seeds the projections and the sampled Fisher's labels"})

    def __post_init__(self):
        # "curvature must be one of ...", or, for a network, one with a fit for its layers
        curvature = curv.get(self.curvature) if self.layers is None else curv.get_for_layers(self.curvature)
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {self.fisher!r}")
        if self.projection is not None and not _is_integer(self.projection, 1):
            raise ValueError(f"projection must be None (exact gradients) or an integer >= 1, got {self.projection!r}")
        if not _is_integer(self.seed, 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.layers is None:
            changed = [f.name for f in fields(self) if f.name in NETWORK_FIELDS and getattr(self, f.name) != f.default]
            if changed:  # a last layer's Fisher is the expected one, in closed form; nothing is projected
                raise ValueError(f"{changed[0]} applies to a whole network's layers (NetworkExplainer), not to a "
                                 f"last layer, got {changed[0]}={getattr(self, changed[0])!r}")
        else:
            if not isinstance(self.layers, (list, tuple)) or not all(isinstance(x, dict) for x in self.layers):
                raise ValueError(f"layers must be None or a list of layer descriptions, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kfac_damping not in KFAC_DAMPINGS:
            raise ValueError(f"kfac_damping must be one of {KFAC_DAMPINGS}, got {self.kfac_damping!r}")
        rank = self.rank
        if rank is not None and rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int)
                                                    or rank < 1):
            raise ValueError(f"rank must be None, 'auto' or an integer >= 1, got {rank!r}")
        curvature.check(self)
        _check_number("damping", self.damping, 0, strict=False)
        _check_number("rps_lambda", self.rps_lambda, 0, strict=True)
        _check_number("lje_step", self.lje_step, 0, strict=False)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")
        for name in ("damping", "rps_lambda", "lje_step"):  # 1 and 1.0 are one setting
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (saved state, job files); a last
        layer's without the fields only a network sets."""
        values = asdict(self)
        if self.layers is None:
            for name in NETWORK_FIELDS:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values, where: str = "") -> "Settings":
        """Settings from a dict such as to_dict() made, refusing missing and
        unknown keys; errors are prefixed with `where` (e.g. "attributor.")."""
        if not isinstance(values, dict):
            raise ValueError(f"{where[:-1] or 'settings'} must be a JSON object, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in values and name not in LATER_FIELDS:
                raise ValueError(f"missing key '{where}{name}'")
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown key '{where}{unknown[0]}'")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None

    def fingerprint(self) -> str:
        """16 hex digits naming these settings: equal settings, equal fingerprint,
        in any process and any session (SHA-256 of the sorted JSON)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
