"""Counterfactual ground truth (docs/design.md §10): what a model predicts
for each test example after retraining on subsets of its training set.

* `retrain_head`: the last layer retrained on the fixed features — the model
  an attribution describes — on M random subsets of a fraction of the rows
  (for LDS) or without single rows (leave-one-out), all at once by
  refit.newton, in float64, to a stated gradient tolerance.
* `callback.retrain_model`: any model, through the user's `retrain(mask)`
  callback, one subset at a time, each subset's outputs written to a job
  folder as it finishes so a killed run resumes.

Both return a `Retraining`, which records what it answers for (the training
set's fingerprint, the test set's digest, the masks and seeds) so that
counterfactual.lds and leave_one_out refuse to compare it with another
question."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import curvature as curv
from .. import storage
from ..curvature.exact import available_bytes, exact_cost
from ..engine.distributed import ProcessGroup
from ..engine.layer import check_test, theta_from_layer
from ..engine.passes import Means, Passes, augment
from ..engine.settings import Settings
from ..progress import Progress
from ..storage import StoreError
from ..storage.jobs import ResultFolder
from ..storage.saved import digest
from .refit import SubsetObjectives, newton, target_outputs

TARGETS = ("log_prob", "margin", "prob")
# The given layer's outputs may differ from the refit's by this much (in the
# target's units) before retrain_head warns that they describe different models.
LAYER_GAP_WARNING = 1e-2


@dataclass
class Retraining:
    """Outputs of retrained models on a test set, and what they answer for.

    Attributes:
        kind: "subsets" (random subsets, for LDS) or "removals" (one row left
            out per retrain, for leave-one-out).
        masks: (M, N) bool, the training rows each retrain used.
        outputs: (M, T) float64, the retrained model's output per test.
        base: (T,) float64, the output of the model trained on every row (the
            head refit on all of them; None when a callback gave none).
        target: what an output is: "log_prob", "margin" or "prob" of `labels`.
        labels: (T,) the class each output is about (None: the callback's own).
        excluded: subset j -> why it must not be used (an empty class, no
            convergence, non-finite outputs); never averaged in.
        meta: the parameters (seed, fraction, weight decay, tolerance, ...)
            and the fingerprints of the training and test sets (None where
            unknown, e.g. for a callback).
        layer: retrain_head only, (C, Dp) float64 [W | b] refit on every row:
            the model the retrains start from and `base` comes from."""
    kind: str
    masks: torch.Tensor
    outputs: torch.Tensor
    base: torch.Tensor | None
    target: str
    labels: torch.Tensor | None
    excluded: dict[int, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    layer: torch.Tensor | None = None

    @property
    def usable(self) -> torch.Tensor:
        """Indices of the retrains that may be used."""
        keep = torch.ones(len(self.masks), dtype=torch.bool)
        keep[list(self.excluded)] = False
        return torch.nonzero(keep).flatten()

    @property
    def removed(self) -> torch.Tensor:
        """kind "removals": (M,) the training row each retrain left out."""
        if self.kind != "removals":
            raise ValueError(f"a Retraining of kind {self.kind!r} removes no single rows")
        return (~self.masks).int().argmax(1)

    def summary(self) -> str:
        """One line: how many retrains, how many usable, and why others are not."""
        why = sorted(set(self.excluded.values()))
        return (f"{len(self.masks)} retrains ({self.kind}) of N = {self.masks.shape[1]}, "
                f"{len(self.usable)} usable" + (f"; excluded: {'; '.join(why)}" if why else ""))


def integer(name: str, value, low: int, high: float = math.inf) -> int:
    """value, checked to be an integer (not a bool) in [low, high]; the error names it."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def random_subsets(N: int, subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """(subsets, N) bool: each row a uniformly random subset of round(fraction N)
    rows, drawn in order from a torch.Generator seeded with `seed`."""
    integer("subsets", subsets, 1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    size = round(fraction * N)
    if not 1 <= size < N:
        raise ValueError(f"fraction={fraction} of N={N} rows gives subsets of {size} rows; need 1 <= size < N")
    g = torch.Generator().manual_seed(integer("seed", seed, 0))
    masks = torch.zeros(subsets, N, dtype=torch.bool)
    for j in range(subsets):
        masks[j, torch.randperm(N, generator=g)[:size]] = True
    return masks


def removal_masks(N: int, remove, seed: int) -> torch.Tensor:
    """(M, N) bool, each row all but one training row: `remove` is a count of
    rows drawn at random (seeded) or the rows themselves (distinct, in [0, N))."""
    if isinstance(remove, int) and not isinstance(remove, bool):
        g = torch.Generator().manual_seed(integer("seed", seed, 0))
        rows = torch.randperm(N, generator=g)[:integer("remove", remove, 1, N)]
    else:
        rows = torch.as_tensor(remove)
        if rows.dim() != 1 or rows.numel() == 0 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise ValueError(f"remove must be a count or a 1-D sequence of training rows, got {remove!r}")
        if int(rows.min()) < 0 or int(rows.max()) >= N or len(rows.unique()) != len(rows):
            raise ValueError(f"remove must hold distinct training rows in [0, {N}), got {rows.tolist()[:8]}...")
    masks = torch.ones(len(rows), N, dtype=torch.bool)
    masks[torch.arange(len(rows)), rows.long()] = False
    return masks


def check_target(target: str) -> None:
    """Refuses an output kind other than TARGETS."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def retrain_head(train, test, weight_decay: float, *, weight: torch.Tensor | None = None,
                 bias: bool | torch.Tensor = True, subsets: int | torch.Tensor = 100, fraction: float = 0.5,
                 remove=None, seed: int = 0, target: str = "log_prob", tol: float = 1e-10, max_iter: int = 50,
                 batch: int = 100, preconditioner: str = "auto", out: str | os.PathLike | None = None,
                 progress: bool | None = None) -> Retraining:
    """Retrains the last layer on the fixed features for many subsets at once.

    Every retrain minimises the mean cross-entropy over its rows plus
    weight_decay/2 |[W | b]|^2 (the bias column included), in float64, to a
    gradient norm <= tol, warm-started from the layer refit on every row
    (itself started from `weight`/`bias` when given). With curvature="exact"
    and damping=weight_decay, an Attributor's IF is the first-order
    prediction of exactly these retrains.

    Arguments:
        train: a LastLayerData with labels, an exemplar.Store or its path (as
            for Attributor); streamed block by block.
        test: a LastLayerData (or a DataLoader of batches); its labels name
            the class whose output is measured (default: the prediction).
        weight_decay: lambda > 0, the weight decay the layer was trained with.
        weight, bias: the trained layer (warm start), as for Attributor.
        subsets: M random subsets of round(fraction N) rows, or an (M, N)
            bool tensor of your own subsets.
        fraction: the share of rows in each random subset (alpha).
        remove: instead of subsets, leave-one-out: a count of random rows
            or a sequence of rows, each retrain without one of them, every
            other row keeping its 1/N weight (Koh & Liang's perturbation).
        seed: seeds the random subsets (recorded).
        target: the output measured: "log_prob" (log p of the label),
            "margin" (log(p / (1 - p))) or "prob".
        tol: the gradient norm each retrain must reach (Frobenius, float64).
        max_iter: Newton steps per retrain before it counts as unconverged.
        batch: retrains solved together (memory grows with it).
        preconditioner: "auto" (exact curvature where it fits in memory and
            its fit takes under a minute by curvature.exact_cost, else
            EK-FAC), "exact" or "ekfac".
        out: a job folder: each batch's outputs are written as it finishes,
            and a rerun with the same arguments reads them back.
        progress: a progress line on stderr (None: only on a terminal).

    Returns:
        A Retraining; retrains that left a class empty or did not converge
        are kept in `excluded` with the reason."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay <= 0:
        raise ValueError(f"weight_decay must be a finite number > 0 (the layer's weight decay; without it a "
                         f"subset's softmax regression may have no minimiser), got {weight_decay!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    check_target(target)
    integer("max_iter", max_iter, 1)
    integer("batch", batch, 1)
    if preconditioner not in ("auto", "exact", "ekfac"):
        raise ValueError(f"preconditioner must be 'auto', 'exact' or 'ekfac', got {preconditioner!r}")
    has_bias = bool(isinstance(bias, torch.Tensor) or bias)
    train_set = storage.training_set(train, has_bias)
    train_set.check_magnitude()
    passes = Passes(train_set, has_bias, ProcessGroup.single(), False)
    N, C, Dp = len(train_set), train_set.num_classes, train_set.num_features + has_bias
    device = train_set.device
    test = check_test(test, train_set)
    if remove is not None:
        if not (isinstance(subsets, int) and subsets == 100 and fraction == 0.5):
            raise ValueError("pass either remove= (leave-one-out) or subsets=/fraction=, not both")
        kind, masks, divisors = "removals", removal_masks(N, remove, seed), None
    else:
        kind = "subsets"
        masks = subsets if isinstance(subsets, torch.Tensor) else random_subsets(N, subsets, fraction, seed)
        if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != N or not len(masks):
            raise ValueError(f"subsets must be a count or an (M, N={N}) bool tensor, got "
                             f"{tuple(masks.shape)} {masks.dtype}")
        masks = masks.cpu()
        divisors = masks.sum(1).double()
        if int(divisors.min()) == 0:
            raise ValueError(f"subsets[{int(divisors.argmin())}] holds no training row")
    divisors = torch.full((len(masks),), float(N), dtype=torch.float64) if divisors is None else divisors
    labels = test.explained_labels()
    phi_test = augment(test.features, has_bias).double()
    labels_cpu, phi_test_cpu = labels.cpu(), phi_test.cpu()
    theta0 = theta_from_layer(weight, bias, passes)
    bar = Progress(f"retrain_head: {len(masks)} {kind}, passes over the training set", None, progress)
    start = time.monotonic()
    meta = dict(kind=kind, N=N, T=len(test), C=C, Dp=Dp, train=train_set.fingerprint(), seed=seed,
                test=digest(test.features, test.logits, test.labels)[:16], masks=digest(masks)[:16],
                fraction=fraction if kind == "subsets" and not isinstance(subsets, torch.Tensor) else None,
                weight_decay=float(weight_decay), tol=float(tol), max_iter=max_iter, target=target,
                layer=None if theta0 is None else digest(theta0)[:16], batch=batch, preconditioner=preconditioner)
    counts = _class_counts(passes, masks)
    folder = None if out is None else ResultFolder(out, {"job": "retrain_head", **meta})
    solve = {}  # the preconditioner, made once, at the whole-set refit

    def block(b):
        if b == 0:
            theta, norm, solve["at"] = _whole_refit(passes, theta0, weight_decay, preconditioner, tol, max_iter, bar)
            return {"theta": theta.cpu(), "gradient_norm": norm.view(1).cpu()}
        if "at" not in solve:  # the refit was read back from the job folder: the same preconditioner again
            at = parts[0]["theta"].to(device) if theta0 is None else theta0
            solve["at"] = _preconditioner(passes, at, weight_decay, preconditioner)
        which = torch.arange((b - 1) * batch, min(b * batch, len(masks)))
        objectives = SubsetObjectives(passes, masks, divisors, weight_decay, bar)
        thetas, norms, steps = newton(objectives, parts[0]["theta"].to(device).expand(len(which), C, Dp), which,
                                      solve["at"], tol, max_iter)
        return {"outputs": target_outputs(thetas, phi_test, labels, target).cpu(), "gradient_norm": norms.cpu(),
                "steps": steps.cpu()}

    def expected(b):
        if b == 0:
            return {"theta": ((C, Dp), torch.float64), "gradient_norm": ((1,), torch.float64)}
        m = min(b * batch, len(masks)) - (b - 1) * batch
        return {"outputs": ((m, len(test)), torch.float64), "gradient_norm": ((m,), torch.float64),
                "steps": ((m,), torch.int64)}

    parts = []
    for b in range(1 + -(-len(masks) // batch)):  # block 0: the refit on every row; then batches of retrains
        part = None if folder is None else folder.load(b, expected(b), N)
        if part is not None and b == 0 and not bool(torch.isfinite(part["theta"]).all()):
            raise StoreError(f"{out}: the refit layer in block 0 is not finite; delete the folder to recompute")
        if part is None:
            part = block(b)
            if folder is not None:
                folder.save(b, part)
        parts.append(part)
        if b == 0 and float(part["gradient_norm"][0]) > tol:  # before any subset is solved from it
            raise ValueError(f"the refit on every training row did not converge (|gradient| "
                             f"{float(part['gradient_norm'][0]):.3g} > tol {tol:g} after {max_iter} Newton steps): "
                             "raise max_iter or tol")
    bar.close()
    theta = parts[0]["theta"]
    base = target_outputs(theta.unsqueeze(0), phi_test_cpu, labels_cpu, target)[0]
    outputs = torch.cat([p["outputs"] for p in parts[1:]])
    norms = torch.cat([p["gradient_norm"] for p in parts[1:]])
    excluded = _empty_classes(counts)
    for j in torch.nonzero(~(norms <= tol)).flatten().tolist():
        excluded.setdefault(j, f"did not converge: |gradient| {float(norms[j]):.2g} > tol {tol:g}")
    for j in torch.nonzero(~torch.isfinite(outputs).all(1)).flatten().tolist():
        excluded.setdefault(j, "non-finite outputs")
    if theta0 is not None:
        gap = float((target_outputs(theta0.cpu().unsqueeze(0), phi_test_cpu, labels_cpu, target)[0]
                     - base).abs().max())
        meta["layer_gap"] = gap
        if gap > LAYER_GAP_WARNING:
            warnings.warn(f"the given layer's {target} on the test set differs from the refit's by up to {gap:.3g}: "
                          "it is not the minimiser of this objective, so the retrains describe the refit layer; "
                          "is weight_decay the one the layer was trained with?", stacklevel=2)
    meta.update(seconds=time.monotonic() - start, passes=bar.done,
                steps=torch.cat([p["steps"] for p in parts[1:]]).tolist())
    return Retraining(kind, masks, outputs, base, target, labels_cpu, excluded, meta, theta)


def _class_counts(passes: Passes, masks: torch.Tensor) -> torch.Tensor:
    """(M, C): training rows of each class in each subset, and (last row) in the whole set."""
    C = passes.train.num_classes
    counts = torch.zeros(len(masks) + 1, C, dtype=torch.float64)
    for rows in passes.rows(passes.own(), None, reuse=False):
        onehot = torch.nn.functional.one_hot(rows.labels.cpu(), C).double()
        counts[:-1] += masks[:, rows.start:rows.start + len(rows)].double() @ onehot
        counts[-1] += onehot.sum(0)
    return counts


def _empty_classes(counts: torch.Tensor) -> dict[int, str]:
    """subset -> "class c has no training row", for classes the whole set has."""
    present = counts[-1] > 0
    empty = (counts[:-1] == 0) & present
    return {j: f"class {int(torch.nonzero(empty[j])[0])} has no training row in the subset"
            for j in torch.nonzero(empty.any(1)).flatten().tolist()}


def _whole_refit(passes: Passes, theta0, weight_decay: float, preconditioner: str, tol: float, max_iter: int,
                 bar: Progress):
    """(theta, its gradient norm, the preconditioner): the layer refit on every
    row and the damped inverse curvature at theta0 when given (close to the
    refit, and known before it), else at the refit, reached from zero."""
    t = passes.train
    N, C, Dp = len(t), t.num_classes, t.num_features + passes.bias
    start = torch.zeros(C, Dp, dtype=torch.float64, device=t.device) if theta0 is None else theta0
    whole = SubsetObjectives(passes, torch.ones(1, N, dtype=torch.bool), torch.tensor([float(N)]),
                             weight_decay, bar)
    if theta0 is not None:
        solve = _preconditioner(passes, start, weight_decay, preconditioner)
        theta, norms, _ = newton(whole, start.unsqueeze(0), torch.tensor([0]), solve, tol, max_iter)
        return theta[0], norms[0], solve
    # From zero the curvature changes by orders of magnitude on the way (uniform p at zero, confident
    # p at the minimum): EK-FAC (two passes) is refitted at every Newton step, the chosen one at the end.
    theta = start.unsqueeze(0)
    for _ in range(max_iter):
        solve = _preconditioner(passes, theta[0], weight_decay, "ekfac")
        theta, norms, _ = newton(whole, theta, torch.tensor([0]), solve, tol, 1)
        if float(norms[0]) <= tol:
            break
    return theta[0], norms[0], _preconditioner(passes, theta[0], weight_decay, preconditioner)


def _preconditioner(passes: Passes, theta: torch.Tensor, weight_decay: float, choice: str):
    """V -> (H(theta) + weight_decay I)^-1 V from the library's curvature."""
    t = passes.train
    C, Dp = t.num_classes, t.num_features + passes.bias
    if choice == "auto":
        cost = exact_cost(C, Dp, len(t))
        fits = cost["bytes"] < 0.5 * available_bytes(t.device) and cost["fit_s"] < 60
        choice = "exact" if fits else "ekfac"
    layer = theta.to(t.dtype)
    statistics = Means(passes, None, logits_of=lambda rows: rows.phi @ layer.T)
    fitted = curv.build(Settings(curvature=choice, damping=float(weight_decay), bias=passes.bias), statistics)
    return fitted.solve


__all__ = ["Retraining", "retrain_head", "random_subsets", "removal_masks", "TARGETS"]
