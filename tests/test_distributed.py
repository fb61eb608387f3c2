"""torch.distributed with gloo on CPU: 2 and 3 processes (torch.multiprocessing
spawn), each reading its own shards of one store, give every method's results
equal to one process's; ranks given different stores are refused."""

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
                                                    for k in ("if.topk", "theta_relatif.topk")}}
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


def test_ranks_given_different_stores_are_refused(tmp_path):
    train = make_inputs()[0]
    stores = [str(write_store(train, tmp_path / f"store{r}", shard_rows=40 + 10 * r).path) for r in range(2)]
    answers = spawn(2, stores, tmp_path)
    for message in answers:
        assert isinstance(message, str), message
        assert "the ranks were given different stores" in message
        assert "store0" in message and "store1" in message
