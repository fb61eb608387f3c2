"""Nothing is reused unless it provably belongs to the question asked
(docs/design.md §9): stores, fit caches, job folders, live Explainers and the
command line refuse what another model, training set or setting produced;
what is read back from disk is validated like saved state; no file stays
mapped; read-only stores answer; threads on one Attributor agree."""
import errno
import json
import pathlib
import subprocess
import sys
import threading

import pytest
import safetensors.torch
import torch
from torch import nn

import exemplar
from exemplar.cli import main
from exemplar.storage import Store, StoreError, write_store
from helpers import make_data, make_layer_data


def tree_bytes(path: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def two_sets():
    """Two training sets of the same shapes: the second has other labels."""
    a = make_data(60, 3, 5, seed=31)
    b = exemplar.LastLayerData(a.features, a.logits, (a.labels + 1) % 3)
    return a, b


# ---------------------------------------------------------------- 1. stale artifacts


def test_write_store_over_a_store_of_other_data_is_refused_and_changes_nothing(two_sets, tmp_path):
    a, b = two_sets
    write_store(a, tmp_path / "s", shard_rows=16)
    before = tree_bytes(tmp_path / "s")
    with pytest.raises(StoreError, match=r"holds other data.*source\.content.*overwrite=True"):
        write_store(b, tmp_path / "s", shard_rows=16)
    assert tree_bytes(tmp_path / "s") == before
    again = write_store(b, tmp_path / "s", shard_rows=16, overwrite=True)
    assert torch.equal(again.load().labels, b.labels)
    assert write_store(b, tmp_path / "s", shard_rows=16).load().labels.equal(b.labels)  # same data: reused


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _loader():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_collect_from_a_retrained_model_into_an_old_store_is_refused(tmp_path):
    model, loader = _mlp(), _loader()
    exemplar.LastLayer(model).collect(loader, store=tmp_path / "s", shard_rows=20)
    before = tree_bytes(tmp_path / "s")
    with torch.no_grad():
        model[0].weight.add_(0.5)  # trained further: same shapes, other features
    with pytest.raises(StoreError, match=r"source\.model"):
        exemplar.LastLayer(model).collect(loader, store=tmp_path / "s", shard_rows=20)
    assert tree_bytes(tmp_path / "s") == before
    fresh = exemplar.LastLayer(model).collect(loader, store=tmp_path / "s", shard_rows=20, overwrite=True)
    want = exemplar.LastLayer(model).collect(loader)
    assert torch.equal(fresh.load().features, want.features)


def test_a_job_folder_of_another_training_set_is_refused(two_sets, tmp_path):
    a, b = two_sets
    test = make_data(7, 3, 5, seed=32, labels=False)
    exemplar.Attributor(a).topk(test, 3, "if", out=tmp_path / "job", test_rows=3)
    before = tree_bytes(tmp_path / "job")
    with pytest.raises(StoreError, match=r"holds another job: train"):
        exemplar.Attributor(b).topk(test, 3, "if", out=tmp_path / "job", test_rows=3)
    assert tree_bytes(tmp_path / "job") == before


def test_a_live_explainer_refuses_once_its_model_changed():
    model, loader = _mlp(), _loader()
    explainer = exemplar.Explainer(model, loader, method="if")
    x = torch.randn(4, 6)
    explainer.explain(x, k=2)
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    with pytest.raises(ValueError, match=r"changed since this Explainer was fitted"):
        explainer.explain(x, k=2)
    with torch.no_grad():
        model[2].weight.div_(2.0)  # exactly the same values again: explains again
    explainer.explain(x, k=2)
    with torch.no_grad():
        model[0].bias.add_(0.25)  # an earlier layer: the training features are stale too
    with pytest.raises(ValueError, match=r"changed since this Explainer was fitted"):
        explainer.explain(x, k=2)


# ---------------------------------------------------------------- 2. what is read back is validated


@pytest.fixture
def fitted_store(tmp_path):
    train, weight, bias = make_layer_data(70, 3, 5, seed=33)
    store = write_store(train, tmp_path / "s", shard_rows=25)
    test = make_data(4, 3, 5, seed=34, labels=False)
    attr = exemplar.Attributor(store, curvature="kfac", weight=weight, bias=bias)
    attr.topk(test, 3, "theta_relatif")
    fits = next((tmp_path / "s" / "fits").iterdir())
    return store, weight, bias, test, fits


def _rewrite(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n]).get("__metadata__")
    tensors = safetensors.torch.load(raw)
    edit(tensors)
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))


def test_a_nan_curvature_in_the_fit_cache_is_refused(fitted_store):
    store, weight, bias, test, fits = fitted_store
    _rewrite(fits / "fitted.safetensors", lambda t: t["curvature.qa"].fill_(float("nan")))
    with pytest.raises(StoreError, match=r"fitted\.safetensors.*(checksum|finite)"):
        exemplar.Attributor(store, curvature="kfac", weight=weight, bias=bias).topk(test, 3, "theta_relatif")


def test_a_tampered_normaliser_shard_is_refused(fitted_store):
    store, weight, bias, test, fits = fitted_store
    column = sorted((fits / "inv_theta").iterdir())[1]
    _rewrite(column, lambda t: t["value"].mul_(1000))
    with pytest.raises(StoreError, match=rf"{column.name}.*checksum"):
        exemplar.Attributor(store, curvature="kfac", weight=weight, bias=bias).topk(test, 3, "theta_relatif")


def test_a_cached_column_of_the_wrong_shape_is_refused(fitted_store):
    store, weight, bias, test, fits = fitted_store
    column = sorted((fits / "inv_theta").iterdir())[0]
    column.write_bytes(safetensors.torch.save({"value": torch.ones(3, dtype=torch.float64)}))
    with pytest.raises(StoreError, match=rf"{column.name}.*shape"):
        exemplar.Attributor(store, curvature="kfac", weight=weight, bias=bias).topk(test, 3, "theta_relatif")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(shards=[1, 2]), r"shards\[0\]"),
    (lambda m: m["shards"][0].update(file=7), r"shards\[0\]\.file"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"shards\[0\]\.file"),
    (lambda m: m["shards"][1].update(rows=-3), r"shards\[1\]\.rows"),
    (lambda m: m["shards"][0].update(crc32=12), r"shards\[0\]\.crc32"),
    (lambda m: m["shards"][0].update(max_sq_norm="big"), r"shards\[0\]\.max_sq_norm"),
    (lambda m: m.update(D=-1), r"'D'"),
])
def test_a_malformed_manifest_is_the_stores_own_error(tmp_path, edit, field):
    write_store(make_data(40, 3, 4, seed=35), tmp_path / "s", shard_rows=16)
    manifest = tmp_path / "s" / "manifest.json"
    m = json.loads(manifest.read_text())
    edit(m)
    manifest.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=rf"manifest\.json.*{field}"):
        Store(tmp_path / "s")


def _job(tmp_path):
    train, test = make_data(30, 3, 4, seed=36), make_data(5, 3, 4, seed=37, labels=False)
    attr = exemplar.Attributor(train)
    attr.topk(test, 3, "if", out=tmp_path / "job", test_rows=2)
    return attr, test, tmp_path / "job"


@pytest.mark.parametrize("damage, message", [
    (lambda job: (job / "job.json").write_text("[1, 2]"), r"job\.json.*JSON object"),
    (lambda job: (job / "job.json").write_text("{not json"), r"job\.json.*not valid JSON"),
    (lambda job: (job / "block-00001.safetensors").write_bytes(safetensors.torch.save(
        {"values": torch.zeros(2, 3, dtype=torch.float64), "indices": torch.full((2, 3), 99)})),
     r"block-00001\.safetensors.*indices.*\[0, 30\)"),
    (lambda job: (job / "block-00000.safetensors").write_bytes(safetensors.torch.save(
        {"values": torch.zeros(1, 3, dtype=torch.float64), "indices": torch.zeros(1, 3, dtype=torch.int64)})),
     r"block-00000\.safetensors.*shape \(2, 3\)"),
    (lambda job: (job / "block-00002.safetensors").write_bytes(b"junk"), r"block-00002\.safetensors"),
])
def test_damaged_job_files_are_the_jobs_own_error(tmp_path, damage, message):
    attr, test, job = _job(tmp_path)
    damage(job)
    with pytest.raises(StoreError, match=message):
        attr.topk(test, 3, "if", out=job, test_rows=2)


# ---------------------------------------------------------------- 3. nothing stays mapped

TRUNCATE_AFTER_OPENING = """
import pathlib, sys, torch, exemplar
sys.path.insert(0, {tests!r})
from helpers import make_data
path = pathlib.Path({path!r})
attr = exemplar.Attributor(path, curvature="kfac")
test = make_data(4, 3, 5, seed=34, labels=False)
for f in (path / "fits").rglob("fitted.safetensors"):
    f.write_bytes(b"")  # truncated under the open Attributor
print(attr.topk(test, 3, "theta_relatif").indices.tolist())
for f in (path / "fits").rglob("*.safetensors"):
    f.write_bytes(b"")
try:
    attr.topk(test, 3, "theta_relatif")
except exemplar.storage.StoreError as err:
    print("StoreError", "delete it to recompute" in str(err))
"""


def test_truncating_fit_files_under_an_open_attributor_cannot_kill_it(tmp_path):
    store = write_store(make_data(70, 3, 5, seed=33), tmp_path / "s", shard_rows=25)
    test = make_data(4, 3, 5, seed=34, labels=False)
    want = exemplar.Attributor(store, curvature="kfac").topk(test, 3, "theta_relatif").indices.tolist()
    script = TRUNCATE_AFTER_OPENING.format(tests=str(pathlib.Path(__file__).parents[1]), path=str(store.path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # SIGBUS would be -7
    assert run.stdout.splitlines() == [str(want), "StoreError True"]


# ---------------------------------------------------------------- 4. read-only stores


def test_a_read_only_store_answers_with_its_fits_in_memory(tmp_path, monkeypatch):
    train = make_data(70, 3, 5, seed=38)
    store = write_store(train, tmp_path / "s", shard_rows=25)
    test = make_data(4, 3, 5, seed=39, labels=False)
    want = exemplar.Attributor(train, curvature="ekfac").topk(test, 3, "theta_relatif")

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    import exemplar.storage.store as store_module
    monkeypatch.setattr(store_module, "write_atomic", read_only)
    monkeypatch.setattr(pathlib.Path, "mkdir", lambda self, *a, **k: read_only(self, None))
    with pytest.warns(UserWarning, match=r"read-only.*kept in memory") as caught:
        attr = exemplar.Attributor(store, curvature="ekfac")
        got = attr.topk(test, 3, "theta_relatif")
    assert len(caught) == 1  # said once
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values)


# ---------------------------------------------------------------- 5. threads


THREAD_METHODS = ("if", "theta_relatif", "l_relatif", "grad_cos", "rps_l2", "rps_lje")


@pytest.mark.parametrize("backend", ["store", "memory"])
def test_six_threads_by_six_methods_on_one_attributor_equal_serial(tmp_path, backend):
    train, weight, bias = make_layer_data(400, 4, 6, seed=40)
    tests = [make_data(5, 4, 6, seed=41 + i, labels=False) for i in range(6)]
    serial = exemplar.Attributor(train, curvature="ekfac", weight=weight, bias=bias)
    want = {(i, m): serial.topk(t, 4, m) for i, t in enumerate(tests) for m in THREAD_METHODS}
    source = write_store(train, tmp_path / "s", shard_rows=64) if backend == "store" else train
    attr = exemplar.Attributor(source, curvature="ekfac", weight=weight, bias=bias)  # nothing fitted yet
    got, errors = {}, []

    def work(i):
        try:
            for m in THREAD_METHODS[i:] + THREAD_METHODS[:i]:  # each thread its own order
                got[(i, m)] = attr.topk(tests[i], 4, m)
        except Exception as err:  # noqa: BLE001  (any failure is the finding)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, w in want.items():
        assert torch.equal(got[key].indices, w.indices), key
        torch.testing.assert_close(got[key].values, w.values, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 7. the command line


@pytest.fixture
def cli_files(tmp_path):
    train, weight, bias = make_layer_data(40, 3, 4, seed=42, dtype=torch.float32)
    test = make_data(5, 3, 4, seed=43, labels=False, dtype=torch.float32)
    safetensors.torch.save_file({"features": train.features, "logits": train.logits, "labels": train.labels,
                                 "weight": weight, "bias": bias}, tmp_path / "train.safetensors")
    safetensors.torch.save_file({"features": test.features, "logits": test.logits}, tmp_path / "test.safetensors")
    assert main(["fit", str(tmp_path / "train.safetensors"), "-o", str(tmp_path / "fit.safetensors")]) == 0
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["self-influence", "{d}/fit.safetensors", "-o", "{d}/fit.safetensors"],
    ["topk", "{d}/fit.safetensors", "{d}/test.safetensors", "-o", "{d}/test.safetensors"],
    ["topk", "{d}/fit.safetensors", "{d}/test.safetensors", "-o", "{d}/fit.safetensors"],
    ["fit", "{d}/train.safetensors", "-o", "{d}/train.safetensors"],
    ["fit", "{d}/train.safetensors", "-o", "{d}/link.safetensors"],
])
def test_the_cli_never_writes_over_its_inputs(cli_files, argv, capsys):
    (cli_files / "link.safetensors").symlink_to(cli_files / "train.safetensors")
    before = tree_bytes(cli_files)
    assert main([a.format(d=cli_files) for a in argv]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert tree_bytes(cli_files) == before


def test_the_cli_does_not_overwrite_an_output_without_force(cli_files, capsys):
    out = cli_files / "top.safetensors"
    argv = ["topk", str(cli_files / "fit.safetensors"), str(cli_files / "test.safetensors"), "-o", str(out)]
    assert main(argv) == 0
    first = out.read_bytes()
    assert main(argv + ["-k", "2"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err
    assert out.read_bytes() == first
    assert main(argv + ["-k", "2", "--force"]) == 0
    assert out.read_bytes() != first


def test_tables_without_pandas_fail_in_one_line_naming_it(cli_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    out = cli_files / "top.csv"
    assert main(["topk", str(cli_files / "fit.safetensors"), str(cli_files / "test.safetensors"),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pandas" in err and "pip install" in err, err
    assert not out.exists()


# ---------------------------------------------------------------- the hostile pass, kept


def test_a_fit_folder_copied_from_another_store_is_refused(tmp_path):
    a = make_data(60, 3, 5, seed=44)
    b = exemplar.LastLayerData(a.features * 2, a.logits, a.labels)
    sa, sb = write_store(a, tmp_path / "a", shard_rows=16), write_store(b, tmp_path / "b", shard_rows=16)
    exemplar.Attributor(sa, curvature="kfac")
    exemplar.Attributor(sb, curvature="kfac")
    ours, theirs = next((tmp_path / "b" / "fits").iterdir()), next((tmp_path / "a" / "fits").iterdir())
    (ours / "fitted.safetensors").write_bytes((theirs / "fitted.safetensors").read_bytes())
    with pytest.raises(StoreError, match=r"was fitted for train="):
        exemplar.Attributor(sb, curvature="kfac")


def test_a_fit_with_a_forged_checksum_is_still_checked_like_saved_state(fitted_store):
    from exemplar.storage.saved import tensors_digest

    store, weight, bias, test, fits = fitted_store
    file = fits / "fitted.safetensors"
    raw = file.read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = safetensors.torch.load(raw)
    tensors["curvature.qa"].fill_(float("nan"))
    meta["sha256"] = tensors_digest(tensors)  # forged: only the content check can see the NaN
    file.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    with pytest.raises(StoreError, match=r"curvature\.qa must be finite"):
        exemplar.Attributor(store, curvature="kfac", weight=weight, bias=bias)


def test_the_cli_refuses_a_hard_link_of_an_input(cli_files, capsys):
    import os

    os.link(cli_files / "train.safetensors", cli_files / "hard.safetensors")
    assert main(["fit", str(cli_files / "train.safetensors"), "-o", str(cli_files / "hard.safetensors")]) == 2
    assert "is also an input" in capsys.readouterr().err


def test_a_store_on_a_read_only_mount_answers(tmp_path):
    """The real thing where the machine allows it (root may bind-mount read-only): a store
    on a mounted dataset or a shared cluster folder."""
    train = make_data(70, 3, 5, seed=45)
    write_store(train, tmp_path / "src" / "s", shard_rows=25)
    (tmp_path / "ro").mkdir()
    mount = subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(tmp_path / "ro")], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mount.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(tmp_path / "ro")]).returncode != 0:
            pytest.skip("cannot remount read-only here")
        test = make_data(4, 3, 5, seed=46, labels=False)
        with pytest.warns(UserWarning, match=r"read-only"):
            got = exemplar.Attributor(tmp_path / "ro" / "s", curvature="ekfac").topk(test, 3, "theta_relatif")
        want = exemplar.Attributor(train, curvature="ekfac").topk(test, 3, "theta_relatif")
        assert torch.equal(got.indices, want.indices)
        assert not (tmp_path / "src" / "s" / "fits").exists()
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")])
