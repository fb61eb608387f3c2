"""Run by tests/ops/test_memory.py in a fresh process: prints how far the resident
set grew above its level before the call (bytes), for the top-k path and, as a
control that the measurement sees a (T, N) buffer when there is one, the dense
path. The caller sets MALLOC_MMAP_THRESHOLD_ so large blocks go back to the OS
when freed; writing 5 to /proc/self/clear_refs resets the peak (VmHWM)."""
import json
import sys

import torch

import exemplar


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth(fn):
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    return result, status_bytes("VmHWM") - before


def main(T: int, N: int, k: int, path: str) -> None:
    g = torch.Generator().manual_seed(0)
    C, D = 3, 16
    train = exemplar.LastLayerData(torch.randn(N, D, generator=g), 2 * torch.randn(N, C, generator=g),
                                   torch.randint(0, C, (N,), generator=g))
    test = exemplar.LastLayerData(torch.randn(T, D, generator=g), torch.randn(T, C, generator=g))
    kfac_damping = "factored" if path == "rank1" else "eigenbasis"
    attr = exemplar.Attributor(train, curvature="kfac", damping=1e-3, kfac_damping=kfac_damping)
    small = exemplar.LastLayerData(test.features[:2], test.logits[:2])
    attr.topk(small, k, "theta_relatif")  # normalisers, thread pools, allocator warm-up
    (values, _), topk_growth = peak_growth(lambda: attr.topk(test, k, "theta_relatif"))
    dense, dense_growth = peak_growth(lambda: attr.scores(test, "theta_relatif"))
    # exact scores both (the screen's rescored in another summation order than the dense tiles)
    torch.testing.assert_close(values[:, 0], dense.max(dim=1).values, rtol=1e-5, atol=0)
    print(json.dumps({"topk": topk_growth, "dense": dense_growth}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
