"""Whole-model ground truth (docs/design.md §10) through the user's own
training code: `retrain_model` calls retrain(mask) once per random subset
and writes each subset's outputs to a job folder as it finishes, so a
killed run resumes where it stopped."""
from __future__ import annotations

import inspect
import os

import torch

from ..storage.jobs import ResultFolder, resumable
from ..storage.saved import digest
from .retraining import Retraining, check_target, integer, random_subsets


def _takes_seed(fn) -> bool:
    """Whether a callback can be called as fn(mask, seed)."""
    try:
        inspect.signature(fn).bind(None, None)
        return True
    except (TypeError, ValueError):
        return False


def _outputs(result, j: int, num_tests: int) -> torch.Tensor:
    """The callback's result for subset j as a (num_tests,) real tensor; a
    ValueError naming the callback, the subset and what came back otherwise."""
    try:
        values = torch.as_tensor(result.detach() if isinstance(result, torch.Tensor) else result)
    except (TypeError, ValueError, RuntimeError):  # None, a dict, strings: torch's message names none of them
        values = None
    if values is None or values.shape != (num_tests,) or values.dtype == torch.bool or values.dtype.is_complex:
        what = "None (a forgotten return?)" if result is None else \
            f"a {values.dtype} tensor of shape {tuple(values.shape)}" if values is not None else \
            f"a {type(result).__name__}"
        raise ValueError(f"retrain(mask) for subset {j} returned {what}; expected ({num_tests},) real outputs, "
                         "one per test (a tensor or a sequence of numbers)")
    return values


def retrain_model(retrain, num_train: int, num_tests: int, *, subsets: int = 100, fraction: float = 0.5,
                  seed: int = 0, target: str = "log_prob", out: str | os.PathLike | None = None,
                  progress: bool | None = None) -> Retraining:
    """Whole-model ground truth through your own training code: for each of
    `subsets` random subsets of round(fraction N) rows, calls
    retrain(mask) -> outputs, or retrain(mask, seed) when it takes two
    arguments (seed: an integer to seed that retrain's own randomness with,
    recorded in meta["seeds"]).

    Arguments:
        retrain: mask (N,) bool -> (num_tests,) outputs of the model trained
            on the rows where mask is True (e.g. log p of each test's label,
            the same `target` an attribution's sign refers to).
        num_train, num_tests: N and T.
        subsets, fraction, seed: as for retrain_head.
        target: the name of what retrain returns (recorded; "log_prob" by default).
        out: a job folder: each subset's outputs are written as soon as it
            finishes, so a killed run, rerun with the same arguments, goes on
            from the first subset not yet there; a folder holding another
            job is refused.
        progress: a progress line with an ETA on stderr (None: only on a terminal).

    Returns:
        A Retraining of kind "subsets"; a retrain that returned NaN or inf is
        excluded with the reason."""
    integer("num_train", num_train, 2)
    integer("num_tests", num_tests, 1)
    check_target(target)
    if not callable(retrain):
        raise TypeError(f"retrain must be a callable mask -> outputs, got {type(retrain).__name__}")
    masks = random_subsets(num_train, subsets, fraction, seed)
    seeds = torch.randint(0, 2**31 - 1, (subsets,), generator=torch.Generator().manual_seed(seed + 1))
    with_seed = _takes_seed(retrain)

    def block(j):
        mask = masks[j].clone()
        result = retrain(mask, int(seeds[j])) if with_seed else retrain(mask)
        return {"outputs": _outputs(result, j, num_tests).double().cpu()}

    expected = lambda j: {"outputs": ((num_tests,), torch.float64)}
    meta = dict(kind="subsets", N=num_train, T=num_tests, seed=seed, fraction=fraction, target=target,
                masks=digest(masks)[:16], train=None, test=None)
    folder = None if out is None else ResultFolder(out, {"job": "retrain_model", **meta})
    parts = resumable(folder, subsets, block, expected, num_train, "retrain_model: subsets", progress)
    outputs = torch.stack([p["outputs"] for p in parts])
    bad = torch.nonzero(~torch.isfinite(outputs).all(1)).flatten().tolist()
    excluded = {j: f"non-finite outputs for {int((~torch.isfinite(outputs[j])).sum())} tests" for j in bad}
    meta["seeds"] = seeds.tolist()
    return Retraining("subsets", masks, outputs, None, target, None, excluded, meta)
