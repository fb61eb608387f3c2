"""torch.distributed with gloo on CPU: 2 and 3 processes (torch.multiprocessing
spawn), each reading its own shards of one store, give every method's results
equal to one process's; ranks given different stores are refused."""
import datetime
import pathlib
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import exemplar
from exemplar.storage import write_store
from helpers import make_data, make_layer_data

pytestmark = pytest.mark.slow


def make_inputs():
    train, weight, bias = make_layer_data(250, 4, 6, seed=21, dtype=torch.float32)
    test = make_data(9, 4, 6, seed=22, labels=False, dtype=torch.float32)
    return train, weight, bias, test


def results(attr, test, split="train"):
    out = {}
    for method in exemplar.METHODS:
        out[f"{method}.topk"] = tuple(attr.topk(test, 6, method, split=split))  # plain tuples: torch.load reads them
        out[f"{method}.bottom"] = tuple(attr.topk(test, 6, method, largest=False, split=split))
        out[f"{method}.scores"] = attr.scores(test, method)
        out[f"{method}.self"] = attr.self_influence(method)
    return out


def worker(rank, world, init, stores, answer):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        _, weight, bias, test = make_inputs()
        try:
            attr = exemplar.Attributor(stores[rank], curvature="ekfac", weight=weight, bias=bias,
                                       distributed=True, progress=False)
        except ValueError as err:
            torch.save(str(err), f"{answer}.{rank}")
            return
        got = {"train": results(attr, test), "test": {k: tuple(attr.topk(test, 6, k.split(".")[0], split="test"))
                                                    for k in ("if.topk", "theta_relatif.topk")},
               "every": tuple(attr.topk(test, 250, "if"))}  # k = N: more than any rank holds
        torch.save(got, f"{answer}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(world, stores, tmp_path):
    init = f"file://{tmp_path}/rendezvous-{world}"
    answer = str(tmp_path / f"answer-{world}")
    mp.spawn(worker, args=(world, init, stores, answer), nprocs=world, join=True)
    return [torch.load(f"{answer}.{rank}") for rank in range(world)]


def assert_same(got, want, key):
    """Indices identical; values within 1e-6 of the scores' scale (float32 sums
    in another order: a score that cancels to near 0 has no relative accuracy)."""
    if isinstance(want, tuple):
        assert torch.equal(got[1], want[1]), key
        got, want = got[0], want[0]
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_equal_one_process(world, tmp_path):
    train, weight, bias, test = make_inputs()
    store = write_store(train, tmp_path / "store", shard_rows=40)  # 7 shards
    one = exemplar.Attributor(train, curvature="ekfac", weight=weight, bias=bias)
    want = results(one, test)
    answers = spawn(world, [str(store.path)] * world, tmp_path)
    for got in answers:
        assert set(got["train"]) == set(want)
        for key in want:
            assert_same(got["train"][key], want[key], key)
        for key, value in got["test"].items():
            assert_same(value, want[key], key)
        assert_same(got["every"], tuple(one.topk(test, 250, "if")), "k = N")


def test_ranks_given_different_stores_are_refused(tmp_path):
    train = make_inputs()[0]
    stores = [str(write_store(train, tmp_path / f"store{r}", shard_rows=40 + 10 * r).path) for r in range(2)]
    answers = spawn(2, stores, tmp_path)
    for message in answers:
        assert isinstance(message, str), message
        assert "the ranks were given different training sets" in message
        assert "store0" in message and "store1" in message


# ------------------------------------------------ ranks agree, or every rank fails loudly


def scenario(rank, name, paths, test, weight, bias):
    """What rank `rank` does in scenario `name`; returns what it got."""
    def attributor(**kw):
        return exemplar.Attributor(paths[rank], curvature="ekfac", weight=weight, bias=bias, distributed=True,
                                   progress=False, **kw)
    if name == "damping":
        return attributor(damping=1e-3 if rank == 0 else 1e-2)
    if name == "method":
        return attributor().topk(test, 5, "if" if rank == 0 else "theta_relatif")
    if name == "k":
        return attributor().topk(test, 4 + rank, "if")
    if name == "test":  # each rank its own test set, merged as if one
        return attributor().topk(test[rank:], 3, "if")
    if name == "layer":
        return exemplar.Attributor(paths[rank], curvature="ekfac", weight=weight * (1 + rank), bias=bias,
                                   distributed=True, progress=False) if rank == 0 else \
            exemplar.Attributor(paths[rank], curvature="ekfac", distributed=True, progress=False)
    if name == "copies":  # node-local copies: the first run leaves rank 0's copy with the fit, rank 1's without
        first = tuple(attributor().topk(test, 5, "rps_lje"))
        return first, tuple(attributor().topk(test, 5, "rps_lje"))
    if name == "jobs":  # node-local job folders; rank 1's loses a block, then the job resumes
        folder = pathlib.Path(paths[rank]).parent / f"job-{rank}"
        first = tuple(attributor().topk(test, 5, "theta_relatif", out=folder, test_rows=2))
        if rank == 1:
            (folder / "block-00001.safetensors").unlink()
        return first, tuple(attributor().topk(test, 5, "theta_relatif", out=folder, test_rows=2))
    raise AssertionError(name)


def scenario_worker(rank, world, init, name, paths, answer):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        _, weight, bias, test = make_inputs()
        try:
            got = ("ok", scenario(rank, name, paths, test, weight, bias))
        except ValueError as err:
            got = ("error", str(err))
        torch.save(got if got[0] == "error" or name in ("copies", "jobs") else ("ok", None), f"{answer}.{rank}")
    finally:
        dist.destroy_process_group()


def run_scenario(name, paths, tmp_path, world=2, seconds=120):
    """Every rank's (status, result) of scenario `name`; a hang fails the test instead of hanging it."""
    init, answer = f"file://{tmp_path}/rendezvous-{name}", str(tmp_path / f"answer-{name}")
    context = mp.spawn(scenario_worker, args=(world, init, name, paths, answer), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"scenario {name!r} hung for {seconds} s")
    return [torch.load(f"{answer}.{rank}") for rank in range(world)]


@pytest.mark.parametrize("name, message", [
    ("damping", r"different Attributor settings or layers: ranks \[0\] have settings=.*'damping': 0\.001"),
    ("method", r"different queries: ranks \[0\] have method='if'; ranks \[1\] have method='theta_relatif'"),
    ("k", r"different queries: ranks \[0\] have k=4; ranks \[1\] have k=5"),
    ("test", r"different queries: ranks \[0\] have test='[0-9a-f]{16}'; ranks \[1\] have test="),
    ("layer", r"different Attributor settings or layers: ranks \[0\] have layer='[0-9a-f]{16}'; "
              r"ranks \[1\] have layer=None"),
])
def test_ranks_asked_different_things_all_fail_with_one_error(tmp_path, name, message):
    store = str(write_store(make_inputs()[0], tmp_path / "store", shard_rows=40).path)
    answers = run_scenario(name, [store, store], tmp_path)
    assert answers[0] == answers[1], answers  # the same error on every rank
    status, text = answers[0]
    assert status == "error" and re.search(message, text), answers


def test_node_local_copies_and_job_folders_resume_without_hanging(tmp_path):
    train, weight, bias, test = make_inputs()
    copies = [str(write_store(train, tmp_path / f"node{r}" / "store", shard_rows=40).path) for r in range(2)]
    one = exemplar.Attributor(train, curvature="ekfac", weight=weight, bias=bias)
    for name, method in (("copies", "rps_lje"), ("jobs", "theta_relatif")):
        want = one.topk(test, 5, method)
        for status, (first, second) in run_scenario(name, copies, tmp_path):
            assert status == "ok"
            for got in (first, second):
                assert torch.equal(got[1], want.indices), name
                torch.testing.assert_close(got[0], want.values, rtol=1e-4, atol=1e-6)
