"""Run by tests/storage/test_store.py in a fresh process: peak resident-set growth
(bytes) of fitting an Attributor and a top-k query over a store of argv[2]
rows, or, as the control, over the same rows loaded in memory (argv[1] is
"store" or "memory"). The caller sets MALLOC_MMAP_THRESHOLD_ so freed shards
go back to the OS; writing 5 to /proc/self/clear_refs resets VmHWM."""
import json
import pathlib
import sys

import torch

import exemplar
from exemplar.storage import StoreWriter

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from peak_memory import status_bytes  # noqa: E402


def main(kind: str, N: int, path: str) -> None:
    D, C, rows = 48, 4, 8192
    writer = StoreWriter(path, D, C, torch.float32, rows)
    for s in range(0, N, rows):
        g = torch.Generator().manual_seed(s)
        n = min(rows, N - s)
        writer.add(torch.randn(n, D, generator=g), torch.randn(n, C, generator=g),
                   torch.randint(0, C, (n,), generator=g), torch.arange(s, s + n))
    store = writer.finish()
    g = torch.Generator().manual_seed(1)
    test = exemplar.LastLayerData(torch.randn(50, D, generator=g), torch.randn(50, C, generator=g))
    warm = exemplar.Attributor(store.load() if kind == "memory" else store, curvature="kfac", progress=False)
    warm.topk(test, 10, "theta_relatif")  # thread pools, allocator, reader thread
    del warm
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    train = store.load() if kind == "memory" else path
    attr = exemplar.Attributor(train, curvature="kfac", damping=0.01, progress=False)
    attr.topk(test, 10, "theta_relatif")
    print(json.dumps({"growth": status_bytes("VmHWM") - before}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
