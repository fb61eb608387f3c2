"""The operands of a theta-RelatIF query with K-FAC curvature, built through the
public API so the benchmark times exactly what Attributor.topk runs after its
one-off setup (curvature, normalisers)."""
from __future__ import annotations

import torch

import exemplar


def theta_relatif_operands(N, T, D, C, kfac_damping, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    train = exemplar.LastLayerData(
        torch.randn(N, D, generator=g, device=device, dtype=dtype),
        2 * torch.randn(N, C, generator=g, device=device, dtype=dtype),
        torch.randint(0, C, (N,), generator=g, device=device))
    test = exemplar.LastLayerData(torch.randn(T, D, generator=g, device=device, dtype=dtype),
                                  torch.randn(T, C, generator=g, device=device, dtype=dtype))
    attr = exemplar.Attributor(train, curvature="kfac", damping=1e-3, kfac_damping=kfac_damping)
    g = attr.query(test, "theta_relatif").gradient
    train = attr.prepare("theta_relatif")
    train_side = (train.r, train.phi, train.inv_norm)
    if isinstance(g, exemplar.Rank1):
        return "rank1", (g.alpha, g.beta, *train_side)
    return "general", (g.S, *train_side)


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b (T, k) training indices, distinct per row -> the fraction of a's
    entries that b's row also holds."""
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum()) / a.numel()


def status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)
