"""NetworkExplainer(distributed=True) with gloo on CPU: 2 and 3 processes,
each running the model on its own batches, give every method's answers
equal to one process's; ranks given another model or other data are refused."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import exemplar

pytestmark = pytest.mark.slow
METHODS = ("if", "theta_relatif", "l_relatif", "grad_dot", "grad_cos")


def inputs(rank_variant=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    if rank_variant == 1:
        x = x + 1  # other data on this rank
    elif rank_variant == 2:
        with torch.no_grad():
            model[0].weight.add_(1)  # another model on this rank
    elif rank_variant == 4:
        x[5, 0] = float("nan")  # batch 1, which rank 1 runs: only rank 1 sees the non-finite logits
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 23, 4)]  # 6 batches, the last of 3 rows
    if rank_variant == 3:
        train = [(x, y)]  # one batch for two ranks
    test = [(x[:5] * 0.5, y[:5])]
    return model, train, test


class FailingLoader:
    """The batches, raising `error` (ValueError) once `fail_after` have been yielded over all passes."""

    def __init__(self, items, fail_after, error=ValueError):
        self.items, self.fail_after, self.yielded, self.error = items, fail_after, 0, error

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            if self.yielded == self.fail_after:
                raise self.error("the loader failed")
            self.yielded += 1
            yield item


def answers(e, test):
    out = {}
    for method in METHODS:
        out[f"{method}.topk"] = tuple(e.topk(test, 7, method))
        out[f"{method}.bottom"] = tuple(e.topk(test, 7, method, largest=False))
        out[f"{method}.scores"] = e.scores(test, method)
        out[f"{method}.self"] = e.self_influence(method)
    out["subsets"] = e.subset_scores(test, torch.arange(23).remainder(torch.arange(1, 4).view(3, 1)) == 0, "if")
    return out


def worker(rank, world, init, curvature, variants, answer, store=None):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, train, test = inputs(variants[rank])
        if variants[rank] == 6:  # fails in the gradient pass at batch 4 (after the probe's batch, the data digest's 6)
            train = FailingLoader(train, 1 + 6 + 4)
        elif variants[rank] == 7:  # fails in the data digest the ranks agree on, before any pass
            train = FailingLoader(train, 1 + 3)
        elif variants[rank] == 8:  # interrupted (Ctrl-C) in the gradient pass
            train = FailingLoader(train, 1 + 6 + 4, KeyboardInterrupt)
        try:
            e = exemplar.NetworkExplainer(model, train, curvature=curvature, distributed=True,
                                          damping=0.02 if variants[rank] == 5 else 0.01,
                                          store=store, shard_rows=5, progress=False)
        except ValueError as err:
            torch.save(str(err), f"{answer}.{rank}")
            return
        except (RuntimeError, KeyboardInterrupt) as err:
            torch.save(f"{type(err).__name__}: {err}", f"{answer}.{rank}")
            return
        torch.save(answers(e, test), f"{answer}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(world, curvature, variants, tmp_path, store=None, run=""):
    init = f"file://{tmp_path}/rendezvous-{world}-{curvature}{run}"
    answer = str(tmp_path / f"answer-{world}-{curvature}{run}")
    mp.spawn(worker, args=(world, init, curvature, variants, answer, store), nprocs=world, join=True)
    return [torch.load(f"{answer}.{rank}", weights_only=False) for rank in range(world)]


def assert_as_one(got, one):
    for key, want in one.items():
        if key.endswith(("topk", "bottom")):
            assert torch.equal(got[key][1], want[1]), key
            torch.testing.assert_close(got[key][0], want[0], rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(got[key], want, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("world,curvature", [(2, "ekfac"), (3, "exact")])
def test_ranks_answer_as_one_process(world, curvature, tmp_path):
    model, train, test = inputs()
    one = answers(exemplar.NetworkExplainer(model, train, curvature=curvature, damping=0.01, progress=False), test)
    for got in spawn(world, curvature, [0] * world, tmp_path):
        assert_as_one(got, one)


def test_a_store_written_by_ranks_answers_as_one_process_read_by_any_number_of_ranks(tmp_path):
    """Two ranks write one gradient store (each its own batches' rows, in
    shards of 5); it then answers as one process whether one process, the
    same two ranks (from its fit cache) or three ranks read it."""
    model, train, test = inputs()
    one = answers(exemplar.NetworkExplainer(model, train, curvature="ekfac", damping=0.01, progress=False), test)
    store = str(tmp_path / "store")
    for got in spawn(2, "ekfac", [0, 0], tmp_path, store=store):
        assert_as_one(got, one)
    written = exemplar.storage.gradients.GradientStore(store)
    assert written.manifest["world"] == 2 and [s["rank"] for s in written.shards] == [0, 1, 0, 1, 0, 1]
    assert written.sizes == [5, 5, 5, 5, 2, 1]  # rank 0: batches 0, 2, 4 (12 rows); rank 1: 1, 3, 5 (11)
    fits = sorted(p.name for p in (tmp_path / "store" / "fits").iterdir())
    assert_as_one(answers(exemplar.NetworkExplainer(model, train, curvature="ekfac", damping=0.01, store=store,
                                                    shard_rows=5, progress=False), test), one)
    for world in (2, 3):
        for got in spawn(world, "ekfac", [0] * world, tmp_path, store=store, run="-again"):
            assert_as_one(got, one)
    assert sorted(p.name for p in (tmp_path / "store" / "fits").iterdir()) == fits  # every reader used its fits


def test_ranks_with_other_data_models_or_settings_are_refused(tmp_path):
    for variants, field in (([0, 1], "data"), ([0, 2], "model"), ([0, 5], "damping")):
        (tmp_path / field).mkdir()
        errors = spawn(2, "kfac", variants, tmp_path / field)
        assert all(isinstance(err, str) and f"{field}=" in err and len(err) < 300 for err in errors), errors


def test_an_error_on_one_rank_is_raised_on_every_rank_before_any_collective(tmp_path):
    for variant, match in ((3, "1 batch"), (4, "NaN or inf"), (7, "the loader failed")):
        (tmp_path / str(variant)).mkdir()
        errors = spawn(2, "ekfac", [variant, variant], tmp_path / str(variant))
        assert all(isinstance(err, str) and match in err for err in errors), errors
        assert errors[0] == errors[1]


def test_a_store_two_ranks_were_interrupted_writing_is_finished_by_them(tmp_path):
    """Rank 1's loader fails in the gradient pass (after one complete shard of
    its rows); both ranks raise its error, rank 0 having written all of its
    rows. Rerun, the ranks continue from their parts and answer as one process."""
    model, train, test = inputs()
    one = answers(exemplar.NetworkExplainer(model, train, curvature="ekfac", damping=0.01, progress=False), test)
    store = str(tmp_path / "store")
    errors = spawn(2, "ekfac", [0, 6], tmp_path, store=store)
    assert errors[0] == errors[1] and "rank 1 of 2: the loader failed" in errors[0], errors
    parts = [json.loads((tmp_path / "store" / f"part-{r}.json").read_text()) for r in range(2)]
    assert parts[0]["done"] and [s["rows"] for s in parts[0]["shards"]] == [5, 5, 2]
    assert not parts[1]["done"] and [s["rows"] for s in parts[1]["shards"]] == [5]
    for got in spawn(2, "ekfac", [0, 0], tmp_path, store=store, run="-resumed"):
        assert_as_one(got, one)
    assert exemplar.storage.gradients.GradientStore(store).sizes == [5, 5, 5, 5, 2, 1]


def test_an_interrupt_on_one_rank_is_told_to_the_others(tmp_path):
    """Ctrl-C on rank 1 in the gradient pass: it raises KeyboardInterrupt,
    rank 0 a RuntimeError naming it (not a collective error, not a wait)."""
    errors = spawn(2, "ekfac", [0, 8], tmp_path)
    assert errors == ["RuntimeError: rank 1 of 2: the loader failed", "KeyboardInterrupt: the loader failed"], errors
