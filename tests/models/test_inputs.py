"""What a model and its loader hand in: shuffled loaders, inputs that
require grad, module modes, float labels, and the output check's message."""
import math
from collections import namedtuple

import pytest
import torch
from torch import nn

import exemplar
from helpers import tensor_dataset, tiny_model

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------- 3. shuffled loaders


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
