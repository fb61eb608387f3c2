"""DIVINE (Bhatt et al. 2021; thesis §6.2): m training points that are
influential and diverse, maximising sum_{i in S} I_i + gamma * R(S) greedily,
with R a submodular diversity term on an RBF kernel over the last-layer
features. Candidates come from the fused top-k (per test) or from the summed
scores (global); the greedy step is vectorised over tests and candidates."""
from __future__ import annotations

import math

import torch

from ..data import LastLayerData, as_last_layer_data
from ..engine import Attributor
from ..results import TopK

REGULARIZERS = ("sum_redundancy", "facility_location", "mmd")


def rbf_kernel(x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """x (B, K, D) -> (B, K, K) exp(-|u - v|^2 / (2 sigma^2)); sigma defaults to
    the median pairwise distance of each batch element's points."""
    sq = torch.cdist(x, x).square()
    if bandwidth is None:
        K = x.shape[1]
        off = sq[:, ~torch.eye(K, dtype=torch.bool, device=x.device)].view(x.shape[0], -1)
        sigma_sq = off.median(dim=1).values if K > 1 else torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        sigma_sq = torch.where(sigma_sq > 0, sigma_sq, torch.ones_like(sigma_sq))
    else:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        sigma_sq = torch.full((x.shape[0],), float(bandwidth) ** 2, dtype=x.dtype, device=x.device)
    return torch.exp(-sq / (2 * sigma_sq.view(-1, 1, 1)))


def greedy_select(influence: torch.Tensor, kernel: torch.Tensor, m: int, gamma: float,
                  regularizer: str) -> torch.Tensor:
    """influence (B, K), kernel (B, K, K) -> (B, m) positions in K, in the order
    chosen: each step adds the candidate with the largest I_j + gamma * (R(S+j) - R(S)).
    The ground set of R is the K candidates. Ties go to the lower position."""
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    B, K = influence.shape
    if not 1 <= m <= K:
        raise ValueError(f"m must be in [1, K] = [1, {K}] candidates, got {m}")
    rows = torch.arange(B, device=influence.device)
    diag = torch.diagonal(kernel, dim1=1, dim2=2)  # (B, K)
    chosen = torch.zeros(B, K, dtype=torch.bool, device=influence.device)
    sim_to_chosen = torch.zeros_like(influence)  # sum_{v in S} k(j, v)
    coverage = torch.zeros_like(influence)  # max_{v in S} k(u, v)
    mass_to_ground = kernel.sum(1)  # sum_{u in D} k(u, j)
    cross, within = torch.zeros_like(influence[:, 0]), torch.zeros_like(influence[:, 0])
    picks = []
    for size in range(m):
        if regularizer == "sum_redundancy":
            gain = -(2 * sim_to_chosen + diag)
        elif regularizer == "facility_location":
            gain = (kernel - coverage.unsqueeze(2)).clamp_min(0).sum(1)
        else:  # mmd: R(S) = 2/(K|S|) sum_{u in D, v in S} k - 1/|S|^2 sum_{u, v in S} k
            after = (2 * (cross.unsqueeze(1) + mass_to_ground) / (K * (size + 1))
                     - (within.unsqueeze(1) + 2 * sim_to_chosen + diag) / (size + 1) ** 2)
            before = 2 * cross / (K * size) - within / size**2 if size else torch.zeros_like(cross)
            gain = after - before.unsqueeze(1)
        objective = (influence + gamma * gain).masked_fill(chosen, float("-inf"))
        j = objective.argmax(dim=1)
        picks.append(j)
        chosen[rows, j] = True
        k_j = kernel[rows, j]  # (B, K): k(u, j) for every u
        cross = cross + mass_to_ground[rows, j]
        within = within + 2 * sim_to_chosen[rows, j] + diag[rows, j]
        sim_to_chosen = sim_to_chosen + k_j
        coverage = torch.maximum(coverage, k_j)
    return torch.stack(picks, dim=1)


def _select(values, indices, features, m, gamma, regularizer, bandwidth, scale_influence) -> TopK:
    influence = values
    if scale_influence:  # gamma then weighs diversity against influence in units of the best one
        influence = values / values.abs().amax(1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    kernel = rbf_kernel(features[indices], bandwidth)
    pos = greedy_select(influence, kernel, m, gamma, regularizer)
    return TopK(values.gather(1, pos), indices.gather(1, pos))


def _check_selection(attributor, test, gamma, chunk=1) -> LastLayerData:
    if not isinstance(attributor, Attributor):
        # DIVINE's diversity kernel is over the last layer's features, which a whole network's explainer has not
        raise TypeError(f"attributor must be an exemplar.Attributor (DIVINE's kernel is over the last layer's "
                        f"features), got {type(attributor).__name__}; for a model, use exemplar.Explainer's "
                        ".attributor")
    test = as_last_layer_data(test)
    if len(test) == 0:
        raise ValueError("test is empty: DIVINE needs at least one test example")
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma)
    if not ok or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return test


def _num_candidates(attributor, m, candidates):
    K = min(attributor.num_train, max(10 * m, 50)) if candidates is None else candidates
    if not (isinstance(m, int) and 1 <= m <= K <= attributor.num_train):
        raise ValueError(f"need 1 <= m <= candidates <= N={attributor.num_train}, got m={m!r}, "
                         f"candidates={K!r}")
    return K


def divine(attributor: Attributor, test, m: int, gamma: float = 1.0,
           regularizer: str = "facility_location", method: str = "if",
           candidates: int | None = None, bandwidth: float | None = None,
           scale_influence: bool = True, chunk: int = 256) -> TopK:
    """DIVINE per test: m diverse influential training points.

    Arguments:
        attributor: the Attributor whose scores rank the candidates.
        test: a LastLayerData or a DataLoader of (features, logits[, labels]) batches.
        m: points to choose per test.
        gamma: weight of diversity against influence; 0 returns the top-m by score.
        regularizer: "facility_location" (default), "sum_redundancy" or
            "mmd", on an RBF kernel over the last-layer features.
        method: the scoring method (any of exemplar.METHODS).
        candidates: chosen from each test's top-`candidates` (default max(10m, 50)).
        bandwidth: the kernel's sigma (default the median pairwise distance).
        scale_influence: divide each test's scores by its largest |score|
            before weighing them against gamma*R.
        chunk: tests per (chunk, K, K) kernel.

    Returns:
        TopK(values (T, m), indices (T, m)), in the order the greedy step
        chose them, with their scores by `method`."""
    test = _check_selection(attributor, test, gamma, chunk)
    K = _num_candidates(attributor, m, candidates)
    out_idx, out_val = [], []
    for start in range(0, len(test), chunk):  # bounds the (chunk, K, K) kernel
        part = test[start:start + chunk]
        values, indices = attributor.topk(part, K, method)
        v, i = _select(values, indices, attributor.train.features, m, gamma, regularizer,
                       bandwidth, scale_influence)
        out_idx.append(i)
        out_val.append(v)
    return TopK(torch.cat(out_val), torch.cat(out_idx))


def divine_global(attributor: Attributor, test, m: int, gamma: float = 1.0,
                  regularizer: str = "facility_location", method: str = "if",
                  candidates: int | None = None, bandwidth: float | None = None,
                  scale_influence: bool = True) -> TopK:
    """DIVINE for a whole test set: m diverse training points with the
    largest score summed over the tests.

    Arguments:
        attributor, test, m, gamma, regularizer: as for divine().
        method, candidates, bandwidth, scale_influence: as for divine().

    Returns:
        TopK(summed scores (m,), indices (m,))."""
    test = _check_selection(attributor, test, gamma)
    K = _num_candidates(attributor, m, candidates)
    values, indices = attributor.total_scores(test, method).topk(K)
    v, i = _select(values.unsqueeze(0), indices.unsqueeze(0), attributor.train.features, m, gamma,
                   regularizer, bandwidth, scale_influence)
    return TopK(v[0], i[0])
