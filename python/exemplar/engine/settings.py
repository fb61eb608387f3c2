"""Settings: everything that decides what an Attributor fits and answers,
in one frozen dataclass, validated once, with a stable fingerprint
(docs/design.md §4). Saved state stores it as a dict (to_dict) and reads it
back through from_dict, so a setting is checked the same way however it
arrives."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from .. import curvature as curv

KFAC_DAMPINGS = ("eigenbasis", "factored")


def _check_number(name: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """An Attributor's settings. Every field is checked on construction; the
    error names the field and what it accepts. A field's metadata holds its
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

    def __post_init__(self):
        curvature = curv.get(self.curvature)  # "curvature must be one of ..."
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
        """The settings as a JSON-able dict (saved state, job files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values, where: str = "") -> "Settings":
        """Settings from a dict such as to_dict() made, refusing missing and
        unknown keys; errors are prefixed with `where` (e.g. "attributor.")."""
        if not isinstance(values, dict):
            raise ValueError(f"{where[:-1] or 'settings'} must be a JSON object, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in values and name != "rank":  # files written before rank= existed lack it
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
