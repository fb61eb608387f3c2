"""Whole-network attribution (NetworkExplainer, docs/design.md §11) against
float64 truth from torch.func (exemplar.testing.network_reference): exact
per-layer gradients for vector, sequence and image inputs, projections,
every curvature and method, self-influence, LDS; and every refusal."""
import json

import pytest
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional as F

import exemplar
from exemplar.testing import network_reference as ref
from helpers import batches, model_inputs

METHODS = ("if", "theta_relatif", "l_relatif", "grad_dot", "grad_cos")


def mlp(seed=0, widths=(7, 5, 3)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


data = model_inputs


class ConvNet(nn.Module):
    """A Conv2d (stride 2, padding 1, a rectangular kernel) and a Linear on the flattened image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 3, (3, 2), stride=2, padding=1)
        self.head = nn.Linear(3 * 3 * 4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class SequenceNet(nn.Module):
    """A Linear applied at every position of a sequence (B, S, D), mean-pooled, then a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.token = nn.Linear(5, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.token(x)).mean(1))


def stored(explainer):
    """Per layer (N, k_out, k_in): the training gradients as the explainer holds them (memory or store)."""
    train = explainer.train
    blocks = [rows.grads for rows in train.read(range(len(train.sizes)))]
    return [torch.cat([b[j].matrices() for b in blocks]) for j in range(len(explainer.layers))]


@pytest.mark.parametrize("model,shape,c", [(mlp(), None, 3), (ConvNet().double(), (2, 5, 6), 4),
                                           (SequenceNet().double(), (4, 5), 3)])
def test_per_layer_gradients_equal_torch_func(model, shape, c):
    x, y = data(13, c=c, shape=shape)
    e = exemplar.NetworkExplainer(model, batches(x, y), curvature="kfac", progress=False)
    names = [layer.name for layer in e.layers]
    truth = ref.layer_gradients(model, names, x, y)
    for got, want in zip(stored(e), truth):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    tested = e.check_test(batches(x, y, 4))
    for got, want in zip(tested.gradients, truth):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert [layer.factored for layer in e.layers] == [shape is None or (n == "head") for n in names]


def test_projected_gradients_are_the_projections_of_the_exact_ones():
    model = ConvNet().double()
    x, y = data(9, shape=(2, 5, 6), c=4)
    e = exemplar.NetworkExplainer(model, batches(x, y), curvature="kfac", projection=3, progress=False)
    truth = ref.layer_gradients(model, [layer.name for layer in e.layers], x, y)
    for layer, got, want in zip(e.layers, stored(e), truth):
        p_out = torch.eye(layer.out_dim, dtype=torch.float64) if layer.p_out is None else layer.p_out
        p_in = torch.eye(layer.in_dim, dtype=torch.float64) if layer.p_in is None else layer.p_in
        assert got.shape == (len(y), min(3, layer.out_dim), min(3, layer.in_dim))
        torch.testing.assert_close(got, p_out @ want @ p_in.T, rtol=1e-12, atol=1e-14)


def _kronecker_truth(model, x, y, ekfac):
    """K-FAC / EK-FAC per layer of a Sequential MLP from torch.func output gradients."""
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    out = []
    for k, m in enumerate(model):
        if not isinstance(m, nn.Linear):
            continue
        with torch.no_grad():
            a = model[:k](x)
            z = m(a)
        suffix = model[k + 1:]
        deltas = torch.stack([vmap(grad(lambda zi, c=c, f=suffix: F.cross_entropy(f(zi[None]), torch.tensor([c]))))(z)
                              for c in range(p.shape[1])], 1)
        a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        out.append(ref.kronecker_fisher(a1, deltas, p, ekfac))
    return out


@pytest.mark.parametrize("curvature", ["exact", "kfac", "ekfac"])
def test_scores_equal_the_float64_reference(curvature):
    model = mlp()
    x, y = data(17)
    xt, yt = data(6, seed=1)
    e = exemplar.NetworkExplainer(model, batches(x, y), curvature=curvature, damping=0.01, progress=False)
    names = [layer.name for layer in e.layers]
    train, test = ref.layer_gradients(model, names, x, y), ref.layer_gradients(model, names, xt, yt)
    fishers = ref.fisher(model, names, x, y, "expected") if curvature == "exact" else \
        _kronecker_truth(model, x, y, curvature == "ekfac")
    for method in METHODS:
        want = ref.scores(train, test, fishers, 0.01, method)
        torch.testing.assert_close(e.scores(batches(xt, yt), method), want, rtol=1e-9, atol=1e-12)
        top = e.topk(batches(xt, yt), 4, method)
        torch.testing.assert_close(top.values, want.topk(4, 1).values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(e.total_scores(batches(xt, yt), method), want.sum(0), rtol=1e-9, atol=1e-11)
    diag = ref.scores(train, train, fishers, 0.01, "if").diagonal()
    torch.testing.assert_close(e.self_influence("if"), diag, rtol=1e-9, atol=1e-12)


def test_empirical_fisher_and_predictions_explained_without_labels():
    model = mlp()
    x, y = data(11)
    xt, _ = data(4, seed=3)
    e = exemplar.NetworkExplainer(model, batches(x, y), curvature="exact", fisher="empirical", damping=0.1,
                                  progress=False)
    names = [layer.name for layer in e.layers]
    predicted = model(xt).argmax(1)
    want = ref.scores(ref.layer_gradients(model, names, x, y), ref.layer_gradients(model, names, xt, predicted),
                      ref.fisher(model, names, x, y, "empirical"), 0.1, "if")
    torch.testing.assert_close(e.scores([xt[:2], xt[2:]], "if"), want, rtol=1e-9, atol=1e-12)


def test_sampled_fisher_is_seeded():
    model = mlp()
    x, y = data(12)
    one = exemplar.NetworkExplainer(model, batches(x, y), fisher="sampled", seed=3, progress=False)
    two = exemplar.NetworkExplainer(model, batches(x, y), fisher="sampled", seed=3, progress=False)
    other = exemplar.NetworkExplainer(model, batches(x, y), fisher="sampled", seed=4, progress=False)
    s = [e.scores(batches(x, y), "if") for e in (one, two, other)]
    assert torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2])


def test_explain_topk_odd_sizes_and_float32():
    model = mlp().float()
    x, y = data(9)
    x = x.float()
    e = exemplar.NetworkExplainer(model, batches(x, y, 4), method="if", progress=False)
    scores = e.scores(batches(x, y))
    assert scores.dtype == torch.float32
    ex = e.explain(batches(x[:3], y[:3]), k=9, opponents=1)  # k = N
    assert ex.indices.shape == (3, 9) and ex.opponents.indices.shape == (3, 1)
    assert torch.equal(ex.indices, scores[:3].double().topk(9, 1).indices)
    assert torch.equal(ex.labels, y[:3]) and ex.method == "if"
    single = exemplar.NetworkExplainer(model, [(x[:1], y[:1])], progress=False)  # N = 1
    assert single.topk([(x[:2], y[:2])], 1).indices.tolist() == [[0], [0]]


def test_lds_against_whole_model_retraining_and_refusals():
    model = mlp()
    x, y = data(30)
    xt, yt = data(5, seed=1)
    e = exemplar.NetworkExplainer(model, batches(x, y), curvature="exact", damping=0.01, progress=False)
    outputs = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = iter(outputs)
    truth = exemplar.retrain_model(lambda mask: next(calls), 30, 5, subsets=8)
    tested = e.check_test(batches(xt, yt))
    ev = exemplar.lds(e, tested, truth)
    assert set(ev.methods) == set(METHODS)
    predicted = e.scores(tested, "if") @ truth.masks.double().T
    torch.testing.assert_close(ev.methods["if"].predicted, predicted)
    head = exemplar.LastLayerData(torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64), y)
    head_test = exemplar.LastLayerData(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    head_truth = exemplar.retrain_head(head, head_test, 0.01, subsets=4)
    with pytest.raises(ValueError, match="retrain_model"):
        exemplar.lds(e, tested, head_truth)


def test_refusals():
    model = mlp()
    x, y = data(10)
    train = batches(x, y)
    make = lambda m=model, t=train, **kw: exemplar.NetworkExplainer(m, t, progress=False, **kw)  # noqa: E731
    for kw, match in [({"curvature": "diagonal"}, "curvature"), ({"fisher": "true"}, "fisher"),
                      ({"damping": -1.0}, "damping"), ({"damping": float("nan")}, "damping"),
                      ({"projection": 0}, "projection"), ({"projection": True}, "projection"),
                      ({"layers": ["nope"]}, "not a submodule"), ({"layers": ["1"]}, "Tanh"),
                      ({"layers": ["0", "0"]}, "each once"), ({"method": "knn"}, "method"), ({"seed": -1}, "seed"),
                      ({"curvature": "exact", "damping": 0.0}, "damping > 0"), ({"output": 3}, "output")]:
        with pytest.raises((ValueError, TypeError), match=match):
            make(**kw)
    with pytest.raises(ValueError, match="no labels"):
        make(t=[x])
    with pytest.raises(ValueError, match="no batches"):
        make(t=[])
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        make(t=shuffled)
    with pytest.raises(ValueError, match="labels in batch 0"):
        make(t=[(x, y + 5)])
    with pytest.raises(ValueError, match="labels in batch 0"):
        make(t=[(x, y - 5)])
    with pytest.raises(ValueError, match="batch 0 has no rows"):
        make(t=[(x[:0], y[:0])] + train)
    with pytest.raises(ValueError, match="NaN or inf"):
        make(t=[(x * float("nan"), y)])
    frozen = mlp()
    frozen[0].requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        make(m=frozen, layers=["0"])
    assert [layer.name for layer in make(m=frozen).layers] == ["2"]
    with pytest.raises(ValueError, match="C = 1"):
        make(m=nn.Sequential(nn.Linear(7, 1)).double())
    with pytest.raises(ValueError, match="too wide|more than"):
        make(m=nn.Sequential(nn.Linear(7, 200), nn.Linear(200, 100)).double(), curvature="exact")
    e = make()
    with pytest.raises(ValueError, match="k"):
        e.topk(batches(x, y), 11)
    with pytest.raises(ValueError, match="subsets"):
        e.subset_scores(batches(x, y), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        e.subset_scores(batches(x, y), torch.ones(2, 10))
    other = exemplar.NetworkExplainer(mlp(seed=5), train, progress=False)
    with pytest.raises(ValueError, match="another model"):
        e.scores(other.check_test(batches(x, y)))
    projected = [exemplar.NetworkExplainer(model, train, projection=2, seed=s, progress=False) for s in (1, 2)]
    with pytest.raises(ValueError, match="other projections"):  # same model and shapes, other projections
        projected[0].scores(projected[1].check_test(batches(x, y)))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed since"):
        e.scores(batches(x, y))


def test_batches_must_keep_their_shape():
    model = SequenceNet().double()
    x, y = data(6, shape=(4, 5))
    with pytest.raises(ValueError, match="positions per example"):
        exemplar.NetworkExplainer(model, [(x[:3], y[:3]), (x[3:, :1], y[3:])], progress=False)


class Killed:
    """A loader interrupted (KeyboardInterrupt) once it has yielded `fail_after` batches over all its passes."""

    def __init__(self, x, y, size=4, fail_after=None):
        self.items, self.fail_after, self.yielded = batches(x, y, size), fail_after, 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            if self.yielded == self.fail_after:
                raise KeyboardInterrupt("killed")
            self.yielded += 1
            yield item


def forward_calls(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("curvature", ["ekfac", "exact"])
def test_store_answers_as_memory_and_is_reused_without_running_the_model(tmp_path, curvature):
    model = SequenceNet().double()
    x, y = data(23, shape=(4, 5))
    xt, yt = data(5, shape=(4, 5), seed=1)
    kw = dict(curvature=curvature, damping=0.01, progress=False)
    memory = exemplar.NetworkExplainer(model, batches(x, y), **kw)
    stored_one = exemplar.NetworkExplainer(model, batches(x, y), store=tmp_path / "s", shard_rows=7, **kw)
    assert stored_one.train.store is not None and stored_one.train.store.sizes == [7, 7, 7, 2]
    calls = forward_calls(model)
    again = exemplar.NetworkExplainer(model, batches(x, y), store=tmp_path / "s", shard_rows=7, **kw)
    assert len(calls) == 3  # only the probe's batch 0, whole and in halves: gradients and curvature are stored
    for method in METHODS:
        want = memory.scores(batches(xt, yt), method)
        for e in (stored_one, again):
            torch.testing.assert_close(e.scores(batches(xt, yt), method), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(again.self_influence("theta_relatif"), memory.self_influence("theta_relatif"))
    other = exemplar.NetworkExplainer(model, batches(x, y), store=tmp_path / "s", shard_rows=7,
                                      **{**kw, "damping": 0.1})  # other settings: a fit of their own
    assert len(list((tmp_path / "s" / "fits").iterdir())) == 2
    assert not torch.equal(other.scores(batches(xt, yt), "if"), again.scores(batches(xt, yt), "if"))


def test_interrupted_store_resumes_to_the_same_bytes(tmp_path):
    model = mlp()
    x, y = data(30)
    whole = exemplar.NetworkExplainer(model, batches(x, y, 4), store=tmp_path / "whole", shard_rows=6,
                                      progress=False)
    with pytest.raises(KeyboardInterrupt):  # in the gradient pass (after the probe's batch and the data digest's 8)
        exemplar.NetworkExplainer(model, Killed(x, y, fail_after=1 + 8 + 5), store=tmp_path / "cut", shard_rows=6,
                                  progress=False)
    assert exemplar.storage.gradients.GradientStore(tmp_path / "cut").sizes == [6, 6, 6]
    calls = forward_calls(model)
    resumed = exemplar.NetworkExplainer(model, Killed(x, y), store=tmp_path / "cut", shard_rows=6, progress=False)
    gradient_pass_calls = len(calls) - 3 - 2 * 8  # the probe (batch 0 whole and halves); EK-FAC's two passes
    assert gradient_pass_calls == 8 - 4  # batches 0-3 (rows 0-15, within the 18 stored rows) were not run again
    for name in ["manifest.json", "part-0.json"] + [f"shard-0-0000{i}.safetensors" for i in range(5)]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    torch.testing.assert_close(resumed.scores(batches(x, y), "if"), whole.scores(batches(x, y), "if"))


def test_store_refuses_what_it_was_not_written_from(tmp_path):
    model = mlp()
    x, y = data(12)
    path = tmp_path / "s"
    make = lambda m=model, xx=x, **kw: exemplar.NetworkExplainer(m, batches(xx, y), store=path, progress=False,  # noqa: E731
                                                                 **kw)
    first = make()
    before = first.scores(batches(x, y), "if")
    for kw, match in [({"m": mlp(seed=9)}, "'model' differs"), ({"xx": x + 1}, "'data' differs"),
                      ({"projection": 2}, "'layers' differs"), ({"shard_rows": 5}, "shard_rows")]:
        with pytest.raises(ValueError, match=match):
            make(**kw)
    other = mlp(seed=9)
    replaced = make(m=other, overwrite=True)
    assert not torch.equal(replaced.scores(batches(x, y), "if"), before)
    with pytest.raises(ValueError, match="does not match the manifest"):  # its store was replaced under it
        first.scores(batches(x, y), "if")


def test_damaged_store_files_are_refused(tmp_path):
    model = mlp()
    x, y = data(12)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        exemplar.NetworkExplainer(model, batches(x, y), store=tmp_path / "file", progress=False)
    path = tmp_path / "s"
    exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)
    shard = path / "shard-0-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    e = exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)  # fit cached
    with pytest.raises(ValueError, match="does not match the manifest"):
        e.scores(batches(x, y), "if")
    fit = next((path / "fits").iterdir()) / "fitted.safetensors"
    fit.write_bytes(fit.read_bytes()[:-8])
    with pytest.raises(ValueError, match="fits|unreadable|delete"):
        exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": "yes"'))
    with pytest.raises(ValueError, match="complete"):
        exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)


class Head(nn.Module):
    """A fixed feature map and a trained linear head: the last layer as a network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body, self.head = nn.Linear(7, 5), nn.Linear(5, 3)

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("curvature", ["exact", "kfac", "ekfac", "identity"])
def test_a_network_through_its_head_equals_the_attributor(curvature):
    """The one-engine isomorphism (docs/design.md §11): a layer seen once per
    example keeps its factors (delta, a), the last layer's (r, phi); with the
    expected Fisher, NetworkExplainer over the head alone is the Attributor."""
    model = Head().double().eval()
    x, y = data(23)
    xt, yt = data(6, seed=1)
    with torch.no_grad():
        train = exemplar.LastLayerData(model.features(x), model(x), y)
        test = exemplar.LastLayerData(model.features(xt), model(xt), yt)
    attr = exemplar.Attributor(train, curvature=curvature, damping=0.01, weight=model.head.weight,
                               bias=model.head.bias)
    net = exemplar.NetworkExplainer(model, batches(x, y), layers=["head"], curvature=curvature, damping=0.01,
                                    fisher="expected", progress=False)
    for method in METHODS:
        torch.testing.assert_close(net.scores(batches(xt, yt), method), attr.scores(test, method),
                                   rtol=1e-6, atol=1e-9, msg=f"{curvature} {method}")
    torch.testing.assert_close(net.self_influence("if"), attr.self_influence("if"), rtol=1e-6, atol=1e-9)


def test_a_store_begun_by_other_ranks_or_an_older_version_is_refused(tmp_path):
    model = mlp()
    x, y = data(12)
    path = tmp_path / "s"
    exemplar.NetworkExplainer(model, batches(x, y), store=path, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(complete=False, shards=[], world=2)  # as two ranks leave it when interrupted
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"begun by another world \(2 ranks, now 1\); pass overwrite=True"):
        exemplar.NetworkExplainer(model, batches(x, y), store=path, progress=False)
    manifest["version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 1 .* collect it again: pass overwrite=True"):
        exemplar.NetworkExplainer(model, batches(x, y), store=path, progress=False)
    again = exemplar.NetworkExplainer(model, batches(x, y), store=path, overwrite=True, progress=False)
    assert exemplar.storage.gradients.GradientStore(path).manifest["world"] == 1
    memory = exemplar.NetworkExplainer(model, batches(x, y), progress=False)
    torch.testing.assert_close(again.scores(batches(x, y), "if"), memory.scores(batches(x, y), "if"))


def test_a_gradient_store_with_forged_positions_or_parts_is_refused(tmp_path):
    """Hostile edits that keep every checksum consistent: a shard whose rows'
    positions were rewritten (its SHA-256 recomputed in the manifest), and a
    part file of an unfinished store claiming another rank's shards."""
    from exemplar.storage.gradients import FORMAT
    from exemplar.storage.saved import read, tensors_digest, write
    model = mlp()
    x, y = data(12)
    path = tmp_path / "s"
    exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["shards"][1]
    tensors, _ = read(path / entry["file"], FORMAT, ("rows", "sha256"))
    tensors["positions"] = tensors["positions"].flip(0).contiguous()  # same rows, out of order
    entry["sha256"] = tensors_digest(tensors)
    write(path / entry["file"], tensors, {"format": FORMAT, "rows": entry["rows"], "sha256": entry["sha256"]})
    (path / "manifest.json").write_text(json.dumps(manifest))
    e = exemplar.NetworkExplainer(model, batches(x, y), store=path, shard_rows=5, progress=False)
    with pytest.raises(ValueError, match="holds positions that are not increasing from 5"):
        e.scores(batches(x, y), "if")
    manifest.update(complete=False, shards=[])
    (path / "manifest.json").write_text(json.dumps(manifest))
    part = json.loads((path / "part-0.json").read_text())
    part["shards"][0]["rank"] = 1
    part["shards"][0]["file"] = "shard-1-00000.safetensors"
    manifest["world"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "part-0.json").write_text(json.dumps(part))
    with pytest.raises(ValueError, match=r"part-0.json: holds shards of another rank"):
        exemplar.storage.gradients.GradientStore(path)
