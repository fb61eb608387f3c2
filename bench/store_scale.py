"""A training store larger than half of this machine's RAM, against the same
query in memory: θ-RelatIF top-10 with K-FAC (factored damping: the rank-1
path) for T tests. Writes an N-row store of float32 features (D columns, C
classes) shard by shard, then times, in one process:

  in memory  an N_mem-row LastLayerData (fits in RAM): fit, normalisers, query
  store      the N-row store: fit (one pass), normalisers (one pass, written
             into the store), the query with a warm page cache (what of the
             store the cache holds after the previous passes) and cold (every
             shard evicted with posix_fadvise(DONTNEED) first)

and the peak RSS of each phase (VmHWM, reset before it). Prints one JSON line
per phase; bench/RESULTS.md has the table.

    .venv/bin/python bench/store_scale.py --store /tmp/exemplar-20m [--rows 20000000] [--smoke]"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

import exemplar
from exemplar.storage import Store, StoreWriter
from workloads import status_bytes


def phase(name, fn, **extra):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(json.dumps({"phase": name, "seconds": round(seconds, 2),
                      "peak_rss_gb": round(status_bytes("VmHWM") / 1e9, 3), **extra}), flush=True)
    return out, seconds


def chunk(start, rows, D, C, head):
    """Deterministic rows [start, start + rows): ReLU features through a fixed head."""
    g = torch.Generator().manual_seed(start)
    features = torch.relu(torch.randn(rows, D, generator=g))
    logits = torch.addmm(head[1], features, head[0].T)
    labels = torch.where(torch.rand(rows, generator=g) < 0.9, logits.argmax(1),
                         torch.randint(0, C, (rows,), generator=g))
    return features, logits, labels


def write(path, N, D, C, shard_rows, head):
    writer = StoreWriter(path, D, C, torch.float32, shard_rows, {"from": "bench/store_scale.py", "rows": N})
    for s in range(writer.rows_done, N, shard_rows):
        n = min(shard_rows, N - s)
        writer.add(*chunk(s, n, D, C, head), torch.arange(s, s + n))
    return writer.finish()


def evict(store: Store):
    for shard in store.manifest["shards"]:
        fd = os.open(store.path / shard["file"], os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="/tmp/exemplar-store-bench")
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--memory-rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--shard-rows", type=int, default=262_144)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.memory_rows, args.tests, args.shard_rows = 20_000, 5_000, 20, 4096
    N, D, C, T, k = args.rows, args.dim, args.classes, args.tests, 10
    g = torch.Generator().manual_seed(12345)
    head = (torch.randn(C, D, generator=g) / D**0.5, 0.1 * torch.randn(C, generator=g))
    test_f, test_z, _ = chunk(-1, T, D, C, head)
    test = exemplar.LastLayerData(test_f, test_z)
    settings = dict(curvature="kfac", kfac_damping="factored", damping=1e-3, progress=False)
    print(json.dumps({"N": N, "N_memory": args.memory_rows, "D": D, "C": C, "T": T, "k": k, "dtype": "float32",
                      "store_gb": round(N * (D + C) * 4 / 1e9, 1), "threads": torch.get_num_threads()}), flush=True)

    memory = exemplar.LastLayerData(*chunk(0, args.memory_rows, D, C, head))
    attr, _ = phase("memory fit", lambda data=memory: exemplar.Attributor(data, **settings), rows=args.memory_rows)
    one = test[:1]
    phase("memory normalisers", lambda: attr.topk(one, k, "theta_relatif"))
    _, seconds = phase("memory query", lambda: attr.topk(test, k, "theta_relatif"))
    memory_rate = args.memory_rows * T / seconds
    print(json.dumps({"memory_pairs_per_s": round(memory_rate)}), flush=True)
    del attr, memory

    if Path(args.store).exists() and not (Path(args.store) / "manifest.json").exists():
        shutil.rmtree(args.store)
    store, _ = phase("store write", lambda: write(args.store, N, D, C, args.shard_rows, head))
    attr, _ = phase("store fit", lambda: exemplar.Attributor(store, **settings), rows=N)
    phase("store normalisers", lambda: attr.topk(one, k, "theta_relatif"))
    for name in ("warm", "cold"):
        if name == "cold":
            evict(store)
        _, seconds = phase(f"store query ({name} cache)", lambda: attr.topk(test, k, "theta_relatif"))
        print(json.dumps({f"store_{name}_pairs_per_s": round(N * T / seconds),
                          f"store_{name}_vs_memory_rate": round(memory_rate / (N * T / seconds), 3)}), flush=True)
    if args.smoke:
        shutil.rmtree(args.store)


if __name__ == "__main__":
    main()
