"""2 processes x 1 thread (torch.distributed, gloo) against 1 process x 2
threads on the same store: K-FAC fit (factored damping) and θ-RelatIF top-10
for T tests, training shards split across the ranks. Prints one JSON line per
configuration (wall seconds of the slowest rank).

    .venv/bin/python bench/scale_out.py [--rows 1000000] [--smoke]"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import exemplar
from exemplar.storage import StoreWriter

D, C, K = 256, 10, 10


def build(path, N, shard_rows):
    writer = StoreWriter(path, D, C, torch.float32, shard_rows)
    head = torch.randn(C, D, generator=torch.Generator().manual_seed(1)) / D**0.5
    for s in range(0, N, shard_rows):
        g = torch.Generator().manual_seed(s)
        n = min(shard_rows, N - s)
        f = torch.relu(torch.randn(n, D, generator=g))
        z = f @ head.T
        writer.add(f, z, z.argmax(1), torch.arange(s, s + n))
    return writer.finish()


def timed(store, T, distributed):
    g = torch.Generator().manual_seed(2)
    test = exemplar.LastLayerData(torch.relu(torch.randn(T, D, generator=g)), torch.randn(T, C, generator=g))
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    attr = exemplar.Attributor(store, curvature="kfac", kfac_damping="factored", distributed=distributed,
                               progress=False)
    fit = time.perf_counter() - start
    attr.topk(test[:1], K, "theta_relatif")  # normalisers
    start = time.perf_counter()
    attr.topk(test, K, "theta_relatif")
    return fit, time.perf_counter() - start


def worker(rank, world, init, store, T, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    fit, query = timed(store, T, True)
    times = [None] * world
    dist.all_gather_object(times, (fit, query))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    N, T = (20_000, 20) if args.smoke else (args.rows, args.tests)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(build(os.path.join(tmp, "store"), N, 65536 if not args.smoke else 4096).path)
        torch.set_num_threads(2)
        fit, query = timed(store, T, False)
        print(json.dumps({"config": "1 process x 2 threads", "N": N, "T": T, "fit_s": round(fit, 2),
                          "query_s": round(query, 2)}), flush=True)
        shutil.rmtree(os.path.join(store, "fits"))  # the ranks fit anew, as the single process did
        out = os.path.join(tmp, "times.json")
        mp.spawn(worker, args=(2, f"file://{tmp}/rendezvous", store, T, out), nprocs=2, join=True)
        times = json.load(open(out))
        print(json.dumps({"config": "2 processes x 1 thread (gloo)", "N": N, "T": T,
                          "fit_s": round(max(t[0] for t in times), 2),
                          "query_s": round(max(t[1] for t in times), 2)}), flush=True)


if __name__ == "__main__":
    main()
