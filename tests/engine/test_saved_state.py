"""Loaded state: independent of its file once loaded, every tensor and key
validated, saves atomic."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import exemplar
from helpers import tensor_dataset, tiny_model

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------- 4, 5. loaded state


def fitted_explainer(tmp_path, curvature="kfac", method="theta_relatif"):
    ds = tensor_dataset()
    model = tiny_model()
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    explainer = exemplar.Explainer(model, loader, method=method, curvature=curvature, progress=False)
    path = tmp_path / "explainer.safetensors"
    explainer.save(path)
    return model, explainer, path, ds.tensors[0][:5]


LOADED_AFTER_FILE_CHANGE = textwrap.dedent("""
    import sys, torch, exemplar
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    path, x = sys.argv[1], torch.load(sys.argv[2])
    explainer = exemplar.Explainer.load(path, model)
    before = explainer.explain(x, k=3)
    with open(path, "r+b") as f:
        f.truncate(100)
    after = explainer.explain(x, k=3)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.scores, after.scores)
    print("unchanged")
""")


def test_loaded_explainer_survives_truncating_its_file(tmp_path):
    _, _, path, x = fitted_explainer(tmp_path)
    torch.save(x, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", LOADED_AFTER_FILE_CHANGE, str(path), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "unchanged" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_loaded_explainer_ignores_a_rewritten_file(tmp_path):
    model, _, path, x = fitted_explainer(tmp_path)
    loaded = exemplar.Explainer.load(path, model)
    before = loaded.explain(x, k=3)
    from safetensors.torch import save
    tensors, meta = read_state(path)
    tensors = {k: (v * 7 if v.is_floating_point() else v) for k, v in tensors.items()}
    with open(path, "r+b") as f:  # same size and layout, new values, same inode
        f.write(save(tensors, metadata={"exemplar": meta}))
    after = loaded.explain(x, k=3)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.scores, after.scores)


def read_state(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()["exemplar"]


def write_state(path, tensors, meta):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"exemplar": meta})


def edit_config(meta, **changes):
    d = json.loads(meta)
    d["attributor"].update(changes)
    return json.dumps(d)


CORRUPTIONS = {
    "curvature_row": (lambda t, m: ({**t, "curvature.w": t["curvature.w"][:1].clone()}, m),
                      r"curvature.w.*shape \(3, 7\).*\(1, 7\)"),
    "curvature_col": (lambda t, m: ({**t, "curvature.w": t["curvature.w"][:, :1].clone()}, m),
                      r"curvature.w.*shape \(3, 7\).*\(3, 1\)"),
    "nan_normaliser": (lambda t, m: ({**t, "cache.inv_theta": t["cache.inv_theta"].clone().fill_(NAN)}, m),
                       r"cache.inv_theta.*finite"),
    "wrong_dtype": (lambda t, m: ({**t, "curvature.qa": t["curvature.qa"].double()}, m),
                    r"curvature.qa.*dtype torch.float32.*torch.float64"),
    "unknown_tensor": (lambda t, m: ({**t, "cache.bogus": torch.ones(3)}, m), r"unknown tensor 'cache.bogus'"),
    "missing_tensor": (lambda t, m: ({k: v for k, v in t.items() if k != "curvature.qa"}, m),
                       r"missing tensor 'curvature.qa'"),
    "not_json": (lambda t, m: (t, "{not json"), r"metadata 'exemplar' is not valid JSON"),
    "json_list": (lambda t, m: (t, "[1, 2]"), r"metadata 'exemplar' must be a JSON object, got list"),
    "missing_key": (lambda t, m: (t, json.dumps({k: v for k, v in json.loads(m).items() if k != "method"})),
                    r"missing key 'method'"),
    "bad_method": (lambda t, m: (t, json.dumps({**json.loads(m), "method": "tracin"})), r"'method'.*'tracin'"),
    "missing_config_key": (lambda t, m: (t, json.dumps({**json.loads(m), "attributor": {
        k: v for k, v in json.loads(m)["attributor"].items() if k != "damping"}})),
        r"missing key 'attributor.damping'"),
    "flipped_bias": (lambda t, m: (t, edit_config(m, bias=False)), r"attributor.bias"),
    "negative_damping": (lambda t, m: (t, edit_config(m, damping=-1.0)), r"attributor.damping.*>= 0"),
    "string_damping": (lambda t, m: (t, edit_config(m, damping="0.1")), r"attributor.damping.*number"),
    "bad_curvature": (lambda t, m: (t, edit_config(m, curvature="fisher")), r"attributor.curvature.*'fisher'"),
    "kind_mismatch": (lambda t, m: (t, edit_config(m, curvature_kind="Exact")), r"attributor.curvature_kind"),
    "bad_labels": (lambda t, m: ({**t, "train.labels": t["train.labels"] + 10}, m), r"train.labels"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_load_validates_every_tensor_and_key(tmp_path, case):
    model, _, path, _ = fitted_explainer(tmp_path)
    corrupt, message = CORRUPTIONS[case]
    write_state(path, *corrupt(*read_state(path)))
    with pytest.raises(ValueError, match=message):
        exemplar.Explainer.load(path, model)


def test_load_names_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        exemplar.Explainer.load(path, tiny_model())


def test_save_is_atomic(tmp_path, monkeypatch):
    model, explainer, path, _ = fitted_explainer(tmp_path)
    original = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save", broken)
    with pytest.raises(OSError, match="disk full"):
        explainer.save(path)
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["explainer.safetensors"]
    monkeypatch.undo()
    monkeypatch.setattr("os.replace", broken)  # fails after the temporary file is written
    with pytest.raises(OSError, match="disk full"):
        explainer.save(path)
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["explainer.safetensors"]


def test_one_settings_for_both_facades_and_state_saved_before_its_network_fields():
    """exemplar.Settings is a NetworkExplainer's settings too (its layers, Fisher,
    projection and seed); a last layer's are written as before (without those
    fields, which it refuses to set), and state saved before rank existed loads."""
    model = tiny_model()
    loader = torch.utils.data.DataLoader(tensor_dataset(), batch_size=8)
    net = exemplar.NetworkExplainer(model, loader, fisher="sampled", projection=3, progress=False)
    assert isinstance(net.settings, exemplar.Settings)
    assert [layer["name"] for layer in net.settings.layers] == ["0", "2"]
    assert (net.settings.fisher, net.settings.projection, net.settings.curvature) == ("sampled", 3, "ekfac")
    for bad, match in (({"fisher": "model"}, "fisher must be one of"), ({"projection": 0}, "projection must be"),
                       ({"seed": -1}, "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=match):
            exemplar.NetworkExplainer(model, loader, progress=False, **bad)
    train = exemplar.LastLayer(model).collect(loader, progress=False)
    attr = exemplar.Attributor(train, curvature="kfac")
    tensors, config = attr.state_dict()
    assert not {"layers", "fisher", "projection", "seed"} & set(config)  # a last layer's, as written before
    with pytest.raises(ValueError, match="fisher applies to a whole network's layers"):
        exemplar.Settings(fisher="sampled")
    old = {k: v for k, v in config.items() if k != "rank"}
    loaded = exemplar.Attributor.from_state(tensors, old)
    assert loaded.settings == attr.settings
    assert torch.equal(loaded.scores(train, "if"), attr.scores(train, "if"))
