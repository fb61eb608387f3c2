"""On-disk stores: writing and resuming after kill -9, an Attributor over a
store equal to the in-memory one for every method, fits written back into the
store, memory that does not grow with N, resumable top-k jobs, bad stores."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

import exemplar
from exemplar import curvature as curv
from exemplar.storage import Store, StoreError, StoreWriter, write_store
from helpers import make_data, make_layer_data

SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"


def tree_bytes(path: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_script(name, *args, kill_when=None, timeout=120):
    """Runs tests/scripts/NAME; with kill_when, polls it and sends SIGKILL once
    kill_when() is true. Returns (returncode, stdout)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / name), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        deadline = time.monotonic() + timeout
        while not kill_when() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    if kill_when is None:
        assert proc.returncode == 0, err
    return proc.returncode, out


def shards_written(path):
    try:
        return len(json.loads((path / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_collect_killed_mid_store_and_rerun_ends_byte_identical(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _, out = run_script("collect_store.py", whole, 0)
    assert out.split() == ["34", "1000"]  # 34 batches of 30 rows
    code, _ = run_script("collect_store.py", resumed, 0.05, kill_when=lambda: shards_written(resumed) >= 3)
    assert code == -signal.SIGKILL
    done = shards_written(resumed)
    assert 3 <= done < 8, done  # killed part-way: 8 shards of 128 rows make the 1000
    _, out = run_script("collect_store.py", resumed, 0)
    calls, rows = map(int, out.split())
    assert rows == 1000
    assert calls <= 34 - (done * 128) // 30 + 1  # the rows already stored were not recomputed
    assert tree_bytes(resumed) == tree_bytes(whole)
    store = Store(whole)
    assert store.index().tolist() == list(range(1000))
    assert len(store.sizes) == 8 and store.sizes[-1] == 1000 - 7 * 128


@pytest.fixture(scope="module")
def layer():
    return make_layer_data(300, 4, 6, seed=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def store(layer, tmp_path_factory):
    return write_store(layer[0], tmp_path_factory.mktemp("store") / "s", shard_rows=64)


@pytest.mark.parametrize("curvature", ["exact", "kfac", "ekfac"])
@pytest.mark.parametrize("method", exemplar.METHODS)
def test_store_attributor_equals_in_memory(layer, store, method, curvature):
    train, weight, bias = layer
    test = make_data(7, 4, 6, seed=2, labels=False, dtype=torch.float32)
    memory = exemplar.Attributor(train, curvature=curvature, weight=weight, bias=bias)
    disk = exemplar.Attributor(store.path, curvature=curvature, weight=weight, bias=bias)
    assert len(store.sizes) == 5  # the store is streamed in five blocks, the in-memory set in one
    for largest in (True, False):
        values, indices = memory.topk(test, 10, method, largest=largest)
        got_values, got_indices = disk.topk(test, 10, method, largest=largest)
        assert torch.equal(got_indices, indices)
        torch.testing.assert_close(got_values, values)
    torch.testing.assert_close(disk.scores(test, method), memory.scores(test, method))
    torch.testing.assert_close(disk.total_scores(test, method), memory.total_scores(test, method))
    torch.testing.assert_close(disk.self_influence(method), memory.self_influence(method))


def test_a_second_attributor_reads_the_fits_from_the_store(layer, tmp_path, monkeypatch):
    train, weight, bias = layer
    test = make_data(5, 4, 6, seed=3, labels=False, dtype=torch.float32)
    path = write_store(train, tmp_path / "s", shard_rows=100).path
    first = exemplar.Attributor(path, curvature="ekfac", weight=weight, bias=bias)
    want = {m: first.topk(test, 4, m) for m in ("theta_relatif", "l_relatif", "rps_l2", "rps_lje")}
    monkeypatch.setattr(curv, "build", lambda *a, **k: pytest.fail("the curvature was refitted"))
    monkeypatch.setattr(curv.Eigenbasis, "norms", lambda *a, **k: pytest.fail("normalisers were recomputed"))
    monkeypatch.setattr(exemplar.methods.rps, "fit_l2", lambda *a, **k: pytest.fail("RPS-l2 was refitted"))
    second = exemplar.Attributor(path, curvature="ekfac", weight=weight, bias=bias)
    for m, (values, indices) in want.items():
        got = second.topk(test, 4, m)
        assert torch.equal(got[1], indices) and torch.equal(got[0], values)


def test_other_settings_fit_anew_beside_the_first(layer, tmp_path):
    train, _, _ = layer
    path = write_store(train, tmp_path / "s", shard_rows=100).path
    test = make_data(5, 4, 6, seed=3, labels=False, dtype=torch.float32)
    for damping in (1e-3, 1e-1):
        disk = exemplar.Attributor(path, curvature="kfac", damping=damping)
        memory = exemplar.Attributor(train, curvature="kfac", damping=damping)
        assert torch.equal(disk.topk(test, 5, "theta_relatif")[1], memory.topk(test, 5, "theta_relatif")[1])
    assert len(list((path / "fits").iterdir())) == 2


@pytest.mark.slow
def test_store_memory_does_not_grow_with_n(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    growth = {}
    for kind in ("store", "memory"):
        for N in (60_000, 240_000):
            out = subprocess.run([sys.executable, str(SCRIPTS / "store_memory.py"), kind, str(N),
                                  str(tmp_path / f"{kind}-{N}")], capture_output=True, text=True, env=env,
                                 check=True)
            growth[kind, N] = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    data_growth = 180_000 * (48 + 4 + 1) * 4  # float32 features, logits and int64 labels: 38 MB more
    # Control: the same measurement sees the training set when it is in memory.
    assert growth["memory", 240_000] - growth["memory", 60_000] > 0.8 * data_growth, growth
    # Over the store: a few shards of 8,192 rows (1.7 MB each) whatever N is.
    assert growth["store", 240_000] - growth["store", 60_000] < 0.1 * data_growth, growth


@pytest.mark.slow
def test_topk_job_killed_and_rerun_equals_an_uninterrupted_run(layer, tmp_path):
    train = make_data(400, 3, 5, seed=4)
    path = write_store(train, tmp_path / "s", shard_rows=64).path
    out = tmp_path / "job"
    code, _ = run_script("topk_job.py", path, out, 0.3,
                         kill_when=lambda: len(list(out.glob("block-*.safetensors"))) >= 3)
    assert code == -signal.SIGKILL
    done = len(list(out.glob("block-*.safetensors")))
    assert 3 <= done < 10
    _, printed = run_script("topk_job.py", path, out, 0)
    assert int(printed) == 10 - done  # only the missing test blocks were computed
    values, indices = torch.load(str(out) + ".result.pt")
    g = torch.Generator().manual_seed(5)
    test = exemplar.LastLayerData(torch.randn(95, 5, generator=g, dtype=torch.float64),
                                  torch.randn(95, 3, generator=g, dtype=torch.float64))
    want = exemplar.Attributor(train, curvature="ekfac").topk(test, 7, "theta_relatif")
    assert torch.equal(indices, want[1])
    torch.testing.assert_close(values, want[0])


def test_a_job_folder_holding_another_job_is_refused_and_kept(tmp_path):
    train = make_data(50, 3, 5, seed=4)
    test = make_data(12, 3, 5, seed=5, labels=False)
    attr = exemplar.Attributor(train, progress=False)
    attr.topk(test, 3, "if", out=tmp_path / "job", test_rows=5)
    before = tree_bytes(tmp_path / "job")
    with pytest.raises(StoreError, match=r"holds another job: k is 3 there, 4 here"):
        attr.topk(test, 4, "if", out=tmp_path / "job", test_rows=5)
    with pytest.raises(StoreError, match=r"holds another job: method is 'if' there, 'l_relatif' here"):
        attr.topk(test, 3, "l_relatif", out=tmp_path / "job", test_rows=5)
    assert tree_bytes(tmp_path / "job") == before
    assert torch.equal(attr.topk(test, 3, "if", out=tmp_path / "job", test_rows=5)[1], attr.topk(test, 3, "if")[1])


# ------------------------------------------------------------------ bad stores


@pytest.fixture
def small_store(tmp_path):
    return write_store(make_data(100, 3, 4, seed=6), tmp_path / "s", shard_rows=32)


def test_missing_shard(small_store):
    (small_store.path / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shard shard-00002.safetensors is missing"):
        Store(small_store.path)


def test_truncated_shard(small_store):
    file = small_store.path / "shard-00001.safetensors"
    file.write_bytes(file.read_bytes()[:-16])
    with pytest.raises(StoreError, match=r"shard shard-00001.safetensors has \d+ bytes, the manifest says \d+"):
        exemplar.Attributor(small_store.path)


def test_checksum_mismatch_names_the_shard(small_store):
    file = small_store.path / "shard-00003.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the labels: same size, same header
    file.write_bytes(bytes(data))
    store = Store(small_store.path)
    with pytest.raises(StoreError, match=r"shard-00003.safetensors: checksum mismatch: CRC-32 [0-9a-f]{8}, "
                                         r"the manifest says [0-9a-f]{8}"):
        exemplar.Attributor(store, curvature="kfac")


def test_a_manifest_from_another_store(small_store, tmp_path):
    other = write_store(make_data(100, 3, 6, seed=7), tmp_path / "other", shard_rows=32)
    (small_store.path / "manifest.json").write_bytes((other.path / "manifest.json").read_bytes())
    with pytest.raises(StoreError, match=r"shard shard-00000.safetensors holds features as \(\[32, 4\], 'float64'\), "
                                         r"but the manifest \(D=6, C=3.*the manifest is from another store"):
        Store(small_store.path)


def test_a_store_from_a_newer_format(small_store):
    manifest = json.loads((small_store.path / "manifest.json").read_text())
    manifest["version"] = 99
    (small_store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"store format version 99 was written by a newer exemplar; this one "
                                         r"reads versions up to 1"):
        Store(small_store.path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match=r"is not a store: manifest.json is missing"):
        exemplar.Attributor(tmp_path)


def test_an_incomplete_store_says_to_rerun(tmp_path):
    writer = StoreWriter(tmp_path / "s", 4, 3, torch.float64, shard_rows=10)
    data = make_data(25, 3, 4, seed=8)
    writer.add(data.features, data.logits, data.labels, torch.arange(25))
    with pytest.raises(StoreError, match=r"is incomplete \(20 rows in 2 shards so far\).*rerun it with the same"):
        Store(tmp_path / "s")


def test_resuming_with_other_arguments_is_refused_and_changes_nothing(small_store, tmp_path):
    before = tree_bytes(small_store.path)
    with pytest.raises(StoreError, match=r"holds other data: shard_rows is 32 there, 50 here"):
        write_store(make_data(100, 3, 4, seed=6), small_store.path, shard_rows=50)
    with pytest.raises(StoreError, match=r"holds other data: D is 4 there, 5 here"):
        StoreWriter(small_store.path, 5, 3, torch.float64, shard_rows=32)
    assert tree_bytes(small_store.path) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"exists and is not a store: refusing to write into it"):
        write_store(make_data(10, 3, 4), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_store_rows_are_checked_when_written(tmp_path):
    writer = StoreWriter(tmp_path / "s", 4, 3, torch.float32, shard_rows=10)
    data = make_data(5, 3, 4, dtype=torch.float32)
    with pytest.raises(StoreError, match=r"holds D=4, C=3; got features \(5, 5\)"):
        writer.add(torch.randn(5, 5), data.logits, data.labels, torch.arange(5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, C\) = \[0, 3\), got labels\[0\]=7"):
        writer.add(data.features, data.logits, torch.full((5,), 7), torch.arange(5))
    bad = data.features.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"features must be finite"):
        writer.add(bad, data.logits, data.labels, torch.arange(5))


def test_a_store_test_set_of_another_width_is_refused(small_store):
    attr = exemplar.Attributor(small_store.path)
    with pytest.raises(ValueError, match=r"test.features must have shape \(T, D\) with D=4"):
        attr.topk(make_data(3, 3, 5, seed=1, labels=False), 2)
    with pytest.raises(ValueError, match=r"state_dict\(\) needs the training set in memory; "
                                         r"an Attributor over the store"):
        attr.state_dict()


def test_features_too_large_for_the_dtype_are_refused_from_the_manifest(tmp_path):
    data = make_data(40, 3, 4, dtype=torch.float32, seed=9)
    features = data.features.clone()
    features[33] = 1e19  # finite, but its squared norm overflows float32
    store = write_store(exemplar.LastLayerData(features, data.logits, data.labels), tmp_path / "s", shard_rows=16)
    with pytest.raises(ValueError, match=r"features \(shard shard-00002.safetensors\) are too large for "
                                         r"torch.float32.*write the store in float64"):
        exemplar.Attributor(store.path)
