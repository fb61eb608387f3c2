"""One content fingerprint whatever holds the rows, surviving an interrupted write."""
import json
import math

import pytest
import torch

import exemplar
from helpers import make_data

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------- 13. one fingerprint whatever holds the rows


def test_a_store_and_memory_holding_the_same_rows_have_one_fingerprint(tmp_path):
    train, test = make_data(70, 3, 4, seed=31), make_data(5, 3, 4, seed=32, labels=False)
    memory = exemplar.Attributor(train, curvature="exact", damping=0.01)
    stores = [exemplar.storage.write_store(train, tmp_path / f"s{rows}", shard_rows=rows) for rows in (9, 70, 4096)]
    truth = exemplar.retrain_head(train, test, 0.01, subsets=6)
    want = exemplar.lds(memory, test, truth, ("if",)).methods["if"].value
    for store in stores:
        assert store.fingerprint() == exemplar.storage.training_set(train, True).fingerprint()
        attr = exemplar.Attributor(store, curvature="exact", damping=0.01)
        assert exemplar.lds(attr, test, truth, ("if",)).methods["if"].value == pytest.approx(want, abs=1e-12)
    other = make_data(70, 3, 4, seed=33)
    with pytest.raises(ValueError, match="another training set"):
        exemplar.lds(exemplar.Attributor(exemplar.storage.write_store(other, tmp_path / "o"), curvature="exact",
                                         damping=0.01), test, truth, ("if",))


def test_the_content_fingerprint_survives_an_interrupted_write(tmp_path):
    data = make_data(9000, 3, 4, seed=34, dtype=torch.float32)  # two full 4,096-row chunks and an open one
    whole = exemplar.storage.write_store(data, tmp_path / "whole", shard_rows=1000)
    source = json.loads((tmp_path / "whole" / "manifest.json").read_text())["source"]
    cut = exemplar.storage.StoreWriter(tmp_path / "cut", 4, 3, torch.float32, 1000, source)
    cut.add(data.features[:5500], data.logits[:5500], data.labels[:5500], torch.arange(5500))  # 5 shards written
    del cut  # killed: rows 4096-4999 are read back from the shards by the resumed writer
    resumed = exemplar.storage.write_store(data, tmp_path / "cut", shard_rows=1000)
    assert (tmp_path / "cut" / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    memory = exemplar.storage.training_set(data, True).fingerprint()
    assert resumed.fingerprint() == whole.fingerprint() == memory
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert len(manifest["content_chunks"]) == 2
    del manifest["content"], manifest["content_chunks"]  # as a store written before they were recorded
    (tmp_path / "whole" / "manifest.json").write_text(json.dumps(manifest))
    assert exemplar.storage.Store(tmp_path / "whole").fingerprint() == memory
    manifest["content_chunks"] = ["0" * 16]
    (tmp_path / "whole" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="content_chunks' must list 2 digests"):
        exemplar.storage.Store(tmp_path / "whole")
