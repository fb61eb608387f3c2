"""Saved Attributor state (docs/design.md §4): one dict of tensors — the
in-memory training data, the layer, every curvature by its kind, whole-set
fits and per-example columns — and one JSON config, Settings.to_dict() plus
the kind of each curvature. `validate` checks all of it against the
settings, the registered methods and the curvatures' shapes before anything
uses it; errors name the key."""
from __future__ import annotations

import torch

from .. import curvature as curv
from .. import methods
from ..data import LastLayerData
from .settings import Settings

# Tensors the engine caches for every method, in methods.Method.saved's form.
SHARED_SAVED = {"norm_sq": ("N",), "norm_quad": ("N",), "grad_sq": ("N",)}
TRAIN_KEYS = ("train.features", "train.logits", "train.labels")


def saved_specs() -> tuple[dict[str, tuple], tuple[str, ...]]:
    """(shape spec of every cacheable tensor, names of every extra curvature)."""
    specs, curvatures = dict(SHARED_SAVED), ()
    for name in methods.names():
        m = methods.get(name)
        specs.update(m.saved)
        curvatures += m.curvatures
    return specs, curvatures


def is_per_example(key: str) -> bool:
    """Whether cache key `key` is an (N,) column (kept per block) rather than a whole-set fit."""
    return saved_specs()[0][key][:1] == ("N",)


def config_of(settings: Settings, kinds: dict[str, str]) -> dict:
    """The saved config: the settings and the kind of every curvature."""
    return dict(settings.to_dict(), **{f"{name}_kind": kind for name, kind in kinds.items()})


def expected_tensors(settings: Settings, kinds: dict[str, str], tensors: dict[str, torch.Tensor], N: int,
                     C: int, D: int, dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every tensor saved state may hold for these settings and curvature
    kinds, by key: (shape, dtype); a low-rank curvature's rank m is what its
    first factor in `tensors` holds."""
    specs = saved_specs()[0]
    Dp = D + int(settings.bias)
    sizes = {"N": N, "C": C, "D": D, "Dp": Dp, "D+1": D + 1}
    expected = {"theta": ((C, Dp), torch.float64)}
    for group, kind in kinds.items():
        shapes = curv.form(kind).shapes(C, Dp)
        free = next((f"{group}.{name}" for name, spec in shapes.items() if "m" in spec), None)
        held = tensors.get(free) if free else None
        m = held.shape[0] if isinstance(held, torch.Tensor) and held.dim() > 0 and held.shape[0] >= 1 else 1
        for name, spec in shapes.items():
            dims, kind_dtype = curv.shape_and_dtype(spec, dtype)
            expected[f"{group}.{name}"] = (tuple(m if d == "m" else d for d in dims), kind_dtype)
    for name, spec in specs.items():
        dims, spec_dtype = curv.shape_and_dtype(spec, dtype)
        expected["cache." + name] = (tuple(sizes[d] for d in dims), spec_dtype)
    return expected


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict, settings: Settings, C: int, D: int,
                  prefix: str = "attributor.", skip: tuple[str, ...] = ()) -> None:
    """Every curvature's tensors present; every tensor (but `skip`) expected,
    of its shape and dtype, and finite; errors name the key."""
    curvature_groups = {key.split(".")[0] for key in expected if not key.startswith(("cache.", "theta"))}
    for key in expected:
        if key.split(".")[0] in curvature_groups and key not in tensors:
            raise ValueError(f"missing tensor '{key}'")
    where = f"for C={C}, Dp=D+bias={D + int(settings.bias)} ({prefix}bias={settings.bias})"
    for key, value in tensors.items():
        if key in skip:
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


def check_kinds(settings: Settings, kinds: dict[str, str], prefix: str = "attributor.") -> None:
    """Every curvature kind one that these settings' curvature fits, and only
    the main curvature and methods' extra curvatures named."""
    names = ("curvature",) + saved_specs()[1]
    unknown = sorted(name for name in kinds if name not in names)
    if unknown:
        raise ValueError(f"unknown key '{prefix}{unknown[0]}_kind'")
    if "curvature" not in kinds:
        raise ValueError(f"missing key '{prefix}curvature_kind'")
    forms = curv.get(settings.curvature).forms(settings)
    for name, kind in kinds.items():
        if kind not in forms:
            raise ValueError(f"{prefix}{name}_kind is {kind!r} but curvature={settings.curvature!r}, "
                             f"kfac_damping={settings.kfac_damping!r}, damping={settings.damping!r} "
                             f"give {' or '.join(map(repr, forms))}")


def validate(tensors: dict[str, torch.Tensor], config, prefix: str = "attributor.") \
        -> tuple[Settings, dict[str, str], LastLayerData]:
    """(settings, curvature kinds by name, training data) of saved state,
    after checking every key and tensor against its own settings."""
    if not isinstance(config, dict):
        raise ValueError(f"{prefix[:-1]} must be a JSON object, got {type(config).__name__}")
    if "curvature_kind" not in config:
        raise ValueError(f"missing key '{prefix}curvature_kind'")
    kinds = {k[:-len("_kind")]: v for k, v in config.items() if k.endswith("_kind")}
    settings = Settings.from_dict({k: v for k, v in config.items() if not k.endswith("_kind")}, prefix)
    check_kinds(settings, kinds, prefix)
    for key in TRAIN_KEYS:
        if not isinstance(tensors.get(key), torch.Tensor):
            raise ValueError(f"missing tensor '{key}'")
    try:
        train = LastLayerData(*(tensors[key] for key in TRAIN_KEYS))
    except (TypeError, ValueError) as err:
        raise ValueError(f"saved training data ({', '.join(TRAIN_KEYS)}): {err}") from err
    N, D = train.features.shape
    expected = expected_tensors(settings, kinds, tensors, N, train.num_classes, D, train.features.dtype)
    check_tensors(tensors, expected, settings, train.num_classes, D, prefix, skip=TRAIN_KEYS)
    return settings, kinds, train


def check_fits(tensors: dict[str, torch.Tensor], kinds, settings: Settings, N: int, C: int, D: int,
               dtype: torch.dtype) -> None:
    """Fits read back from a fit cache (curvatures, whole-set fits), checked
    as saved state is: kinds against the settings, every tensor's shape,
    dtype and finiteness."""
    check_kinds(settings, kinds, prefix="")
    check_tensors(tensors, expected_tensors(settings, kinds, tensors, N, C, D, dtype), settings, C, D, prefix="")
