"""Places where an answer used to come back silently wrong or the process died:
special values and ties in top-k, shuffled loaders, loaded state that depended
on its file or was trusted blindly, scale, inputs that require grad, module
modes, float labels, the output check's message, and the smaller ones."""
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch
from torch import nn

import exemplar
from exemplar import ops
from exemplar.testing import reference as ref
from helpers import make_data, opcheck_cases, policy_order

NAN, INF = math.nan, math.inf


def raw_topk(scores, k, largest=True, device="cpu", kernel="default"):
    """The rank-1 op with R = alpha = beta = inv_norm = 1, so the scores are
    `scores`; the result on the CPU."""
    s = torch.tensor(scores, dtype=torch.float64, device=device).view(-1, 1)
    one = torch.ones(1, 1, dtype=torch.float64, device=device)
    values, indices = ops.topk_rank1(one, one, torch.ones_like(s), s, torch.ones_like(s[:, 0]), k, largest,
                                     kernel=kernel)
    return values.cpu(), indices.cpu()


# ---------------------------------------------------------------- 1. NaN and inf


@pytest.mark.parametrize("scores,k,largest,want", [
    ([NAN, 1, 2, 3], 2, True, [3, 2]),
    ([NAN, 1, 2, 3], 4, True, [3, 2, 1, 0]),
    ([NAN, 1, 2, 3], 4, False, [1, 2, 3, 0]),
    ([-INF, -INF, 2, 3], 4, True, [3, 2, 0, 1]),
    ([INF, INF, 2, 3], 4, False, [2, 3, 0, 1]),
    ([NAN, INF, NAN, -INF], 4, True, [1, 3, 0, 2]),
    ([NAN, NAN, NAN], 2, True, [0, 1]),
])
def test_topk_special_values_follow_the_policy(scores, k, largest, want, device, kernel):
    values, indices = raw_topk(scores, k, largest, device, kernel)
    assert indices[0].tolist() == want == policy_order(scores, largest)[:k]
    torch.testing.assert_close(values[0], torch.tensor(scores, dtype=torch.float64)[want], equal_nan=True)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_agrees_with_scores_on_special_values(largest, device, kernel):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, generator=g, dtype=torch.float64)
    scores[torch.randperm(300, generator=g)[:40]] = NAN
    scores[torch.randperm(300, generator=g)[:20]] = INF
    scores[torch.randperm(300, generator=g)[:20]] = -INF
    values, indices = raw_topk(scores.tolist(), 300, largest, device, kernel)
    assert indices[0].tolist() == policy_order(scores.tolist(), largest)
    one = torch.ones(1, 1, dtype=torch.float64)
    dense = ops.scores_rank1(one, one, torch.ones(300, 1, dtype=torch.float64), scores.view(-1, 1),
                             torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(dense.gather(1, indices), values, equal_nan=True)


def confident_training_set(margin, n=200, seed=0):
    """float32 last-layer data fitted with a margin of `margin` nats on every
    example: the curvature is ~exp(-margin), its pseudo-inverse ~exp(margin)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 5, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    logits = margin * nn.functional.one_hot(labels, 3).float()
    return exemplar.LastLayerData(features, logits, labels)


@pytest.mark.parametrize("margin", [5, 20, 60, 90])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "exact"])
@pytest.mark.parametrize("method", ["if", "theta_relatif", "l_relatif"])
def test_damping_zero_on_a_confident_fit_gives_numbers_or_says_why(curvature, method, margin):
    """A curvature of ~exp(-margin) is float64 rounding noise past a margin of
    ~28, and its pseudo-inverse then meaningless (and beyond float32 past ~88):
    refused by name, never NaN or all-zero scores; below it, numbers."""
    train = confident_training_set(margin)
    if margin > 28:
        with pytest.raises(ValueError, match=r"damping=0.*Use damping > 0"):
            exemplar.Attributor(train, curvature=curvature, damping=0.0)
        return
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.0)
    test = exemplar.LastLayerData(train.features[:7], train.logits[:7])
    values, indices = attr.topk(test, 5, method)
    assert bool((indices >= 0).all()) and not bool(values.isnan().any())
    assert not bool(attr.scores(test, method).isnan().any())
    assert not bool(attr.self_influence(method).isnan().any())
    assert bool((attr.scores(test, method) != 0).any())


@pytest.mark.parametrize("method", ["knn", "grad_dot", "grad_cos"])
def test_features_whose_squares_overflow_are_refused(method):
    train = make_data(10, 3, 4, dtype=torch.float32, seed=1)
    huge = exemplar.LastLayerData(train.features * 3e19, train.logits, train.labels)
    with pytest.raises(ValueError, match=r"features are too large for torch.float32.*float64"):
        exemplar.Attributor(huge, curvature="identity")
    attr = exemplar.Attributor(train, curvature="identity")
    with pytest.raises(ValueError, match=r"test.features are too large for torch.float32"):
        attr.topk(exemplar.LastLayerData(huge.features[:2], huge.logits[:2]), 3, method)


# ---------------------------------------------------------------- 2. ties


def test_ties_by_ascending_index_raw(device, kernel):
    assert raw_topk([0, 0, 1, 1], 3, device=device, kernel=kernel)[1].tolist() == [[2, 3, 0]]
    assert raw_topk([0, 0, 1, 1], 3, largest=False, device=device, kernel=kernel)[1].tolist() == [[0, 1, 2]]


def test_ties_by_ascending_index_through_the_api():
    features = torch.tensor([[1.0, 0], [1, 0], [2, 0], [2, 0]], dtype=torch.float64)
    logits = torch.zeros(4, 2, dtype=torch.float64)
    train = exemplar.LastLayerData(features, logits, torch.zeros(4, dtype=torch.long))
    attr = exemplar.Attributor(train, curvature="identity", bias=False)
    test = exemplar.LastLayerData(features[:1], logits[:1])
    assert attr.topk(test, 3, "grad_dot")[1].tolist() == [[2, 3, 0]]
    assert attr.topk(test, 4, "grad_dot")[1].tolist() == [[2, 3, 0, 1]]


@pytest.mark.parametrize("path", ["general", "rank1"])
def test_ties_across_tiles(path, device, kernel):
    """Integer scores with many ties over several train tiles: top-k(k) is a
    prefix of top-k(k + 1) and equals the policy's order."""
    g = torch.Generator().manual_seed(5)
    N = 5000
    target = torch.randint(-3, 4, (N,), generator=g).double()
    R = torch.ones(N, 2, dtype=torch.float64)
    Phi = torch.stack([target, torch.zeros(N, dtype=torch.float64)], 1)
    inv = torch.ones(N, dtype=torch.float64)
    R, Phi, inv = R.to(device), Phi.to(device), inv.to(device)
    if path == "general":
        S = torch.zeros(1, 2, 2, dtype=torch.float64)
        S[0, 0, 0] = 1  # score = R[i,0] * Phi[i,0]
        run = lambda k: ops.topk(S.to(device), R, Phi, inv, k, True, kernel=kernel)  # noqa: E731
    else:
        a = torch.tensor([[1.0, 0]], dtype=torch.float64, device=device)
        run = lambda k: ops.topk_rank1(a, a, R, Phi, inv, k, True, kernel=kernel)  # noqa: E731
    want = policy_order(target.tolist(), True)
    for k in (1, 7, 700, 701, N):
        assert run(k)[1][0].cpu().tolist() == want[:k]


# ---------------------------------------------------------------- 3. shuffled loaders


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def tensor_dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("make_loader", [
    lambda ds: torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True),
    lambda ds: torch.utils.data.DataLoader(ds, batch_size=8, sampler=torch.utils.data.RandomSampler(ds)),
    lambda ds: torch.utils.data.DataLoader(
        ds, batch_size=8, sampler=torch.utils.data.SubsetRandomSampler(list(range(len(ds))))),
], ids=["shuffle", "random_sampler", "subset_random_sampler"])
def test_shuffled_loader_is_refused(make_loader):
    loader = make_loader(tensor_dataset())
    with pytest.raises(ValueError, match=r"order that changes from one pass to the next.*shuffle=False"):
        exemplar.Explainer(tiny_model(), loader, curvature="identity", progress=False)
    with pytest.raises(ValueError, match=r"order that changes from one pass to the next"):
        exemplar.LastLayer(tiny_model()).collect(loader, progress=False)


def test_sequential_and_fixed_order_loaders_work():
    ds = tensor_dataset()
    model = tiny_model()
    sequential = torch.utils.data.DataLoader(ds, batch_size=8)
    reordered = torch.utils.data.DataLoader(ds, batch_size=8, sampler=list(reversed(range(40))))
    a = exemplar.LastLayer(model).collect(sequential, progress=False)
    b = exemplar.LastLayer(model).collect(reordered, progress=False)
    assert torch.equal(a.features.flip(0), b.features)


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


# ---------------------------------------------------------------- 6. scale


SCALES = [1e-8, 1e-4, 1.0, 1e4, 1e8, 1e10, 1e11, 1e12]


CURVATURE_SETTINGS = [("exact", "eigenbasis"), ("kfac", "eigenbasis"), ("kfac", "factored"),
                      ("ekfac", "eigenbasis"), ("identity", "eigenbasis")]


def scaled_problem(s, dtype, damping, curvature, kfac_damping):
    base = make_data(60, 3, 5, dtype=torch.float64, seed=3)
    test0 = make_data(4, 3, 5, dtype=torch.float64, seed=4, labels=False)
    train = exemplar.LastLayerData((base.features * s).to(dtype), base.logits.to(dtype), base.labels)
    test = exemplar.LastLayerData((test0.features * s).to(dtype), test0.logits.to(dtype))
    attr = exemplar.Attributor(train, curvature=curvature, damping=damping, bias=False, kfac_damping=kfac_damping)
    return train, test, attr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_SETTINGS)
def test_feature_scale_against_reference(curvature, kfac_damping, dtype):
    """Features times s, no bias column, damping 1e-3 * s^2: the same problem at
    every scale (IF unchanged, theta-RelatIF times s), well conditioned, so
    reference.py's explicit inverse is the truth at every s."""
    for s in SCALES:
        damping = 1e-3 * s * s
        train, test, attr = scaled_problem(s, dtype, damping, curvature, kfac_damping)
        for method in ("if", "theta_relatif", "l_relatif"):
            want = ref.scores(train.features.double(), train.logits.double(), train.labels,
                              test.features.double(), test.logits.double(), test.explained_labels(), method,
                              curvature, damping, False, kfac_damping)
            got = attr.scores(test, method).double()
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= (1e-4 if dtype == torch.float32 else 1e-9), (s, method, err)
            values, indices = attr.topk(test, 5, method)
            assert torch.equal(values, attr.scores(test, method).gather(1, indices))
            own = attr.self_influence(method).double()
            want_own = ref.self_influence(train.features.double(), train.logits.double(), train.labels, method,
                                          curvature=curvature, damping=damping, bias=False,
                                          kfac_damping=kfac_damping)
            assert float((own - want_own).abs().max() / want_own.abs().max()) <= \
                (1e-4 if dtype == torch.float32 else 1e-9), (s, method)


@pytest.mark.parametrize("curvature,kfac_damping", CURVATURE_SETTINGS[1:4])
def test_feature_scale_fixed_damping_float32(curvature, kfac_damping):
    """A fixed damping of 1e-3 whatever the scale: K-FAC and EK-FAC work in
    their eigenbasis, so float32 must agree with float64 at every s (float32
    once lost every score from s=1e4 to rounding on the softmax's null
    direction, and from s=1e12 to underflow). The explicit float64 inverse of
    reference.py is itself ill-conditioned here (cond ~ s^2 / damping), so it
    is the truth only up to s=1."""
    for s in SCALES:
        got, want = ([scaled_problem(s, dtype, 1e-3, curvature, kfac_damping)[2].scores(
            scaled_problem(s, dtype, 1e-3, curvature, kfac_damping)[1], m).double()
            for m in ("if", "theta_relatif", "l_relatif")] for dtype in (torch.float32, torch.float64))
        for method, a, b in zip(("if", "theta_relatif", "l_relatif"), got, want):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-4, (s, method)
            if s <= 1:
                train, test, _ = scaled_problem(s, torch.float64, 1e-3, curvature, kfac_damping)
                truth = ref.scores(train.features, train.logits, train.labels, test.features, test.logits,
                                   test.explained_labels(), method, curvature, 1e-3, False, kfac_damping)
                assert float((b - truth).abs().max() / truth.abs().max()) <= 1e-9, (s, method)


# ---------------------------------------------------------------- 7. requires grad


def test_inputs_that_require_grad_work():
    model = tiny_model()
    x, y = tensor_dataset().tensors
    feats = model[:2](x)  # with grad
    logits = model[2](feats)
    assert logits.requires_grad
    train = exemplar.LastLayerData(feats, logits, y)
    attr = exemplar.Attributor(train, curvature="kfac", weight=model[2].weight, bias=model[2].bias)
    test = exemplar.LastLayerData(feats[:3], logits[:3])
    for method in ("if", "theta_relatif", "rps_lje", "grad_cos", "knn"):
        values, indices = attr.topk(test, 4, method)
        assert not values.requires_grad
        torch.testing.assert_close(values, attr.scores(test, method).gather(1, indices))


# ---------------------------------------------------------------- 8. module modes


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_collect_restores_every_modules_mode():
    model = WithBatchNorm().train()
    model.body[1].eval()  # frozen BatchNorm in a model that trains
    loader = torch.utils.data.DataLoader(tensor_dataset(), batch_size=8)
    exemplar.LastLayer(model).collect(loader, progress=False)
    assert model.training and model.body.training and not model.body[1].training and model.head.training

    def failing():
        yield torch.randn(2, 4), torch.zeros(2, dtype=torch.long)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        exemplar.LastLayer(model).collect(failing(), progress=False)
    assert model.training and not model.body[1].training and model.head.training


# ---------------------------------------------------------------- 9. float labels


def test_float_labels_are_refused():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"labels must be integers.*torch.float32"):
        exemplar.LastLayer(tiny_model()).collect([(x, torch.tensor([0.9, 1.7, 2.2]))], progress=False)
    explainer = exemplar.Explainer(tiny_model(), torch.utils.data.DataLoader(tensor_dataset(), batch_size=8),
                                   curvature="identity", progress=False)
    for labels in (1.9, torch.tensor([0.9, 1.7, 2.2]), [0.5, 1.0, 2.0], True):
        with pytest.raises(TypeError, match="labels must be"):
            explainer.explain(x, k=2, labels=labels)
    assert explainer.explain(x, k=2, labels=1).labels.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"labels must be in \[0, C\) = \[0, 3\)"):
        explainer.explain(x, k=2, labels=3)


# ---------------------------------------------------------------- 10. the output check


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


class ReturnsDict(ReturnsTuple):
    def forward(self, x):
        return {"logits": self.fc(x), "hidden": x}


Pair = namedtuple("Pair", "logits hidden")


class ReturnsNamedTuple(ReturnsTuple):
    def forward(self, x):
        return Pair(self.fc(x), x)


class EndsInSoftmax(ReturnsTuple):
    def forward(self, x):
        return torch.softmax(self.fc(x), dim=1)


class ReturnsTwoCopies(ReturnsTuple):
    def forward(self, x):
        z = self.fc(x)
        return z, z.clone()


class ReturnsProbabilities(ReturnsTuple):
    def forward(self, x):
        return {"probs": torch.softmax(self.fc(x), dim=1)}


@pytest.mark.parametrize("model", [ReturnsTuple(), ReturnsDict(), ReturnsNamedTuple()])
def test_structured_outputs_find_their_logits(model):
    x = torch.randn(5, 4)
    data = exemplar.LastLayer(model).collect([x], progress=False)
    torch.testing.assert_close(data.logits, model.fc(x).detach())


@pytest.mark.parametrize("model,message,fix", [
    (ReturnsTwoCopies(), r"the model returns a tuple of 2 elements, and its elements \[0, 1\] all equal.*"
                         r"LastLayer\(model, output=0\)", {"output": 0}),
    (ReturnsProbabilities(), r"returns a dict with keys \['probs'\], and none of its elements.*"
                             r"LastLayer\(model, layer='fc', output=\"logits\"\)", {"layer": "fc"}),
    (EndsInSoftmax(), r"'fc' is the last module to run.*changes its output.*layer='fc'", {"layer": "fc"}),
])
def test_output_check_says_what_it_found(model, message, fix):
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=message) as err:
        exemplar.LastLayer(model).collect([x], progress=False)
    assert "is not nn.Linear" not in str(err.value)
    data = exemplar.LastLayer(model, **fix).collect([x], progress=False)
    torch.testing.assert_close(data.logits, model.fc(x).detach())


def test_output_check_reports_nan():
    x = torch.randn(5, 4)
    x[2, 1] = NAN
    with pytest.raises(ValueError, match=r"the model's output contains NaN"):
        exemplar.LastLayer(tiny_model()).collect([x], progress=False)


# ---------------------------------------------------------------- 11. smaller ones


def test_largest_must_be_a_bool():
    train, test = make_data(10, 3, 4, seed=1), make_data(2, 3, 4, seed=2)
    attr = exemplar.Attributor(train)
    for bad in (None, 0, "yes"):
        with pytest.raises(TypeError, match="largest must be True or False"):
            attr.topk(test, 3, largest=bad)
    one = torch.ones(1, 1, dtype=torch.float64)
    R, Phi = torch.ones(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    inv = torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="largest must be True or False"):
        ops.topk_rank1(one, one, R, Phi, inv, 2, None)
    with pytest.raises(TypeError, match=r"k must be an integer in \[1, N\] = \[1, 4\], got True"):
        ops.topk_rank1(one, one, R, Phi, inv, True, True)


def test_no_columns_to_attribute():
    empty = exemplar.LastLayerData(torch.zeros(5, 0), torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features have D=0 columns and bias=False"):
        exemplar.Attributor(empty, bias=False)
    attr = exemplar.Attributor(empty, bias=True, curvature="exact")  # a bias-only layer is fine
    assert attr.topk(exemplar.LastLayerData(torch.zeros(2, 0), torch.randn(2, 3)), 2)[1].shape == (2, 2)


def test_divine_arguments():
    train, test = make_data(30, 3, 4, seed=1), make_data(4, 3, 4, seed=2)
    attr = exemplar.Attributor(train)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, got nan"):
        exemplar.divine(attr, test, m=2, gamma=NAN)
    with pytest.raises(ValueError, match=r"chunk must be a positive integer, got 0"):
        exemplar.divine(attr, test, m=2, chunk=0)
    empty = exemplar.LastLayerData(test.features[:0], test.logits[:0])
    for call in (exemplar.divine, exemplar.divine_global):
        with pytest.raises(ValueError, match=r"test is empty"):
            call(attr, empty, m=2)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0"):
        exemplar.divine_global(attr, test, m=2, gamma=-1.0)


def test_flip_labels_checks_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes\) = \[0, 3\), got labels\[1\]=3"):
        exemplar.flip_labels(torch.tensor([0, 3, 1]), 3, 0.5)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
        exemplar.flip_labels(torch.tensor([0, 0, 0]), 1, 0.5)


def test_exact_curvature_on_a_large_head_is_refused_up_front():
    train = exemplar.LastLayerData(torch.randn(4, 2000), torch.randn(4, 100), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MemoryError, match=r"exact curvature for C\*Dp = 200100 needs about .* GB.*"
                                          r"curvature='ekfac'"):
        exemplar.Attributor(train, curvature="exact")


# ---------------------------------------------------------------- 11, 12. ops: mixed devices, operands with grad


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_ops_refuse_an_operand_on_another_device(case):
    op, args = opcheck_cases()[case]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in (tensors[0], tensors[-1]):  # the first operand elsewhere, then the last
        moved = tuple(a.to("meta") if j == i else a for j, a in enumerate(args))
        with pytest.raises(RuntimeError, match=r"exemplar::\w+: \w+ is on (meta|cpu) but \w+ is on (cpu|meta)"):
            op(*moved)
    meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))  # all on meta: shapes only
    for got, want in zip(meta if isinstance(meta, tuple) else (meta,), (lambda r: r if isinstance(r, tuple)
                                                                        else (r,))(op(*args))):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_ops_take_operands_that_require_grad_and_say_they_have_no_derivative(case):
    op, args = opcheck_cases()[case]
    graded = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    got, want = op(*graded), op(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert torch.equal(g.detach(), w)
    differentiable = [g for g in got if g.requires_grad]
    assert differentiable  # every op has a floating output
    with pytest.raises(RuntimeError, match=rf"derivative for exemplar::{op.__name__.split('.')[0]} is not implemented"):
        differentiable[0].sum().backward()


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
