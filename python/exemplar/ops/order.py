"""The one top-k order in Python, the same as the kernels' RankOrder
(csrc/order.h): the better score first (larger, or smaller with
largest=False), NaN after every number, equal scores by ascending training
index. Merging per-block results (the engine, the ranks) goes through
merge_topk; k's one check is here."""
from __future__ import annotations

import torch


def k_message(k, N: int) -> str:
    """The error text for a k outside [1, N], the same as the C++ ops' (csrc/checks.h)."""
    return f"k must be an integer in [1, N] = [1, {N}], got {k!r}"


def check_k(k, N: int, check_range: bool = True) -> None:
    """Refuses a k that is not an int (TypeError; a bool is not a count) or,
    with check_range, not in [1, N] (ValueError)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(k_message(k, N))
    if check_range and not 1 <= k <= N:
        raise ValueError(k_message(k, N))


def merge_topk(parts, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of several (values (T, k_j), indices (T, k_j)) of disjoint
    training rows, in RankOrder.

    Arguments:
        parts: a sequence of (values, indices) pairs with the same T.
        k: how many to keep (at most the sum of the k_j).
        largest: True ranks larger scores first.

    Returns:
        (values (T, k), indices (T, k)), contiguous."""
    values = torch.cat([v for v, _ in parts], 1)
    indices = torch.cat([i for _, i in parts], 1)
    # Three stable sorts, least significant key first: index, value, is-NaN.
    keys = ((lambda v, i: i, False), (lambda v, i: v.masked_fill(v.isnan(), 0), largest),
            (lambda v, i: v.isnan().to(torch.uint8), False))
    for key, descending in keys:
        order = torch.sort(key(values, indices), dim=1, descending=descending, stable=True).indices
        values, indices = values.gather(1, order), indices.gather(1, order)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()
