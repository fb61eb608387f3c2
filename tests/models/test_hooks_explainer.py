"""Model hooks on an MLP, a small CNN and an LSTM classifier; the Explainer's
fit / explain / save / load cycle."""
import pytest
import torch
from torch import nn

import exemplar
from exemplar import curvature as curv

torch.manual_seed(0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=20, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.out = nn.Linear(12, classes)

    def forward(self, tokens):
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.out(h[-1])


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3)),
            lambda n: torch.randn(n, 6), 3, "3"),
    "cnn": (SmallCNN, lambda n: torch.randn(n, 1, 8, 8), 3, "head"),
    "lstm": (LSTMClassifier, lambda n: torch.randint(0, 20, (n, 7)), 4, "out"),
}


def loader(x, y, batch_size=16):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.parametrize("name", MODELS)
def test_last_layer_collects_inputs_and_outputs(name):
    make_model, make_inputs, C, layer_name = MODELS[name]
    model = make_model().train()
    x, y = make_inputs(37), torch.randint(0, C, (37,))
    hook = exemplar.LastLayer(model)
    assert hook.name == layer_name
    data = hook.collect(loader(x, y), progress=False)
    assert model.training  # restored after collecting in eval mode
    model.eval()
    with torch.no_grad():
        want = model(x)
    assert data.features.shape == (37, hook.weight.shape[1]) and torch.equal(data.labels, y)
    torch.testing.assert_close(data.logits, want)
    torch.testing.assert_close(data.features @ hook.weight.T + hook.bias, want)


def test_last_layer_errors():
    not_linear_last = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Softplus())
    with pytest.raises(ValueError, match=r"last module to run is Softplus '3', so the model's last "
                                         r"layer is not nn.Linear"):
        exemplar.LastLayer(not_linear_last).collect([torch.randn(2, 4)], progress=False)
    # naming the layer explains it anyway
    data = exemplar.LastLayer(not_linear_last, layer="2").collect([torch.randn(2, 4)], progress=False)
    assert data.logits.shape == (2, 3)
    with pytest.raises(ValueError, match="has no nn.Linear"):
        exemplar.LastLayer(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="layer '0' is Conv2d, not nn.Linear"):
        exemplar.LastLayer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), layer="0")
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        exemplar.LastLayer(nn.Sequential(nn.Linear(2, 2)), layer="nope")
    per_token = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"saw input of shape \(2, 4, 3\).*must see \(batch, D\)"):
        exemplar.LastLayer(per_token).collect([torch.randint(0, 5, (2, 4))], progress=False)


def trained_mlp(n=120, C=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C))
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


@pytest.mark.parametrize("method,curvature", [("theta_relatif", "kfac"), ("if", "exact"),
                                              ("rps_lje", "ekfac"), ("rps_l2", "kfac"), ("knn", "kfac")])
def test_explainer_explains_saves_and_loads(tmp_path, monkeypatch, method, curvature):
    model, x, y = trained_mlp()
    explainer = exemplar.Explainer(model, loader(x, y), method=method, curvature=curvature, progress=False)
    test = torch.randn(6, 5)
    got = explainer.explain(test, k=4)
    data = exemplar.LastLayer(model).collect([test], progress=False)
    values, indices = explainer.attributor.topk(data, 4, method)
    assert torch.equal(got.indices, indices) and torch.equal(got.scores, values)
    assert torch.equal(got.labels, data.logits.argmax(1)) and torch.equal(got.predictions, got.labels)

    other = explainer.explain(test, k=4, labels=2)  # why class 2 (and not the prediction)?
    assert torch.equal(other.labels, torch.full((6,), 2))
    want = explainer.attributor.topk(exemplar.LastLayerData(data.features, data.logits, other.labels), 4, method)
    assert torch.equal(other.indices, want[1])

    path = tmp_path / "explainer.safetensors"
    explainer.save(path)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    monkeypatch.setattr(curv, "build", lambda *a: pytest.fail("load must not refit the curvature"))
    monkeypatch.setattr(exemplar.methods.rps, "fit_l2", lambda *a, **k: pytest.fail("load must not refit RPS-l2"))
    loaded = exemplar.Explainer.load(path, model)
    again = loaded.explain(test, k=4)
    # saved tensors are made contiguous, so GEMMs may sum in another order: equal to rounding
    assert torch.equal(again.indices, got.indices)
    torch.testing.assert_close(again.scores, got.scores, rtol=1e-5, atol=1e-7)


def test_explainer_load_rejects_another_model(tmp_path):
    model, x, y = trained_mlp()
    path = tmp_path / "e.safetensors"
    exemplar.Explainer(model, loader(x, y), progress=False).save(path)
    other, _, _ = trained_mlp(seed=1)
    with pytest.raises(ValueError, match="differs from the one"):
        exemplar.Explainer.load(path, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        exemplar.Explainer.load(tmp_path / "junk.safetensors", model)
