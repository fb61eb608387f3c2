"""NetworkExplainer on the architectures people use (issue 34): randomness
that is not an nn.Dropout, a model switched to training mode, tied and
reused weights, layers whose rows are not the batch's examples, models that
mix examples across the batch, a single logit, frozen parameters and LoRA,
attention that never calls its out_proj. Each gets the right answer
(checked against float64 torch.func gradients of exactly the trainable
parameters) or one clear error naming the module and what to do."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import exemplar
from exemplar.testing import network_reference as ref
from helpers import batches as batches_of
from helpers import model_inputs


def data(n, d=6, c=3, seed=0, shape=None):
    return model_inputs(n, d, c, seed, shape)


def batches(x, y, size=4):
    return batches_of(x, y, size)


def explainer(model, train, **kw):
    return exemplar.NetworkExplainer(model, train, progress=False, **{"curvature": "kfac", **kw})


def grad_dot_truth(model, x, y, xt, yt, output=None, loss=None):
    """(T, N) g_t . g_i over every trainable parameter, from torch.func."""
    train = ref.trainable_gradients(model, x, y, output, loss)
    test = ref.trainable_gradients(model, xt, yt, output, loss)
    return test @ train.T


# ---------------------------------------------------------------- 1, 2. randomness and training mode


class Attention(nn.Module):
    """nn.MultiheadAttention (batch_first) over a sequence, mean-pooled, then a head."""

    def __init__(self, dropout=0.5):
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(5, 8)
        self.att = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))


class FunctionalDropout(nn.Module):
    """Randomness that is not a module: F.dropout with the module's own flag, or always on."""

    def __init__(self, always=False):
        super().__init__()
        torch.manual_seed(5)
        self.body, self.head, self.always = nn.Linear(6, 8), nn.Linear(8, 3), always

    def forward(self, x):
        return self.head(F.dropout(torch.tanh(self.body(x)), 0.5, training=self.always or self.training))


class AttentionDropout(nn.Module):
    """scaled_dot_product_attention with dropout_p > 0 whatever the mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.qkv, self.head = nn.Linear(5, 24), nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        return self.head(F.scaled_dot_product_attention(q, k, v, dropout_p=0.3).squeeze(1).mean(1))


def batch_norm_and_dropout():
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))
    model[1].running_mean.normal_()
    return model


@pytest.mark.filterwarnings("ignore:left out of the attributed layers")  # attention's out_proj
@pytest.mark.parametrize("model,shape", [(Attention(), (4, 5)), (FunctionalDropout(), None),
                                         (batch_norm_and_dropout(), None)])
def test_a_model_in_training_mode_is_explained_as_in_eval_mode(model, shape):
    x, y = data(12, shape=shape)
    model = model.double()
    evaluated = explainer(model.eval(), batches(x, y)).scores(batches(x[:3], y[:3]), "if")
    e = explainer(model.train(), batches(x, y))
    first = e.scores(batches(x[:3], y[:3]), "if")
    torch.testing.assert_close(first, evaluated, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "if"), first, rtol=0, atol=0)
    assert model.training and all(m.training for m in model.modules())  # the user's modes, restored


@pytest.mark.filterwarnings("ignore:left out of the attributed layers")
def test_training_mode_switched_on_after_construction_is_not_used():
    model = Attention().double().eval()
    x, y = data(12, shape=(4, 5))
    e = explainer(model, batches(x, y))
    before = e.scores(batches(x[:3], y[:3]), "if")
    model.train()
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "if"), before, rtol=0, atol=0)


@pytest.mark.parametrize("model,shape", [(FunctionalDropout(always=True), None), (AttentionDropout(), (4, 5))])
def test_randomness_in_eval_mode_is_refused(model, shape):
    x, y = data(12, shape=shape)
    with pytest.raises(ValueError, match="changes from one run to the next"):
        explainer(model.double().eval(), batches(x, y))


# ---------------------------------------------------------------- 3. tied and reused weights


class Tied(nn.Module):
    """Two nn.Linear sharing one weight (each its own bias), and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Reused(nn.Module):
    """One nn.Linear applied twice (weight and bias shared), and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("cls", [Tied, Reused])
def test_tied_weights_are_one_parameter(cls):
    model = cls().double().eval()
    x, y = data(11)
    xt, yt = data(4, seed=1)
    e = explainer(model, batches(x, y))
    assert [layer.name for layer in e.layers] == ["a", "head"]
    torch.testing.assert_close(e.scores(batches(xt, yt), "grad_dot"), grad_dot_truth(model, x, y, xt, yt),
                               rtol=1e-10, atol=1e-12)


def test_tied_weights_exact_influence_equals_the_reference():
    model = Tied().double().eval()
    x, y = data(13)
    xt, yt = data(4, seed=1)
    e = explainer(model, batches(x, y), curvature="exact", damping=0.01)
    blocks = [["a.weight", "a.bias", "b.bias"], ["head.weight", "head.bias"]]
    train = ref.parameter_blocks(model, blocks, x, y)
    test = ref.parameter_blocks(model, blocks, xt, yt)
    fishers = ref.fisher(model, blocks, x, y, "expected", gradients=ref.parameter_blocks)
    for method in ("if", "theta_relatif"):
        torch.testing.assert_close(e.scores(batches(xt, yt), method), ref.scores(train, test, fishers, 0.01, method),
                                   rtol=1e-9, atol=1e-12)


class TiedEmbedding(nn.Module):
    """GPT-style: the output layer's weight is the input embedding's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.emb, self.mix, self.out = nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def test_a_weight_shared_with_a_module_not_attributed_is_warned_about():
    model = TiedEmbedding().double().eval()
    tokens = torch.randint(0, 5, (8, 3), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"'emb.weight' is also used by 'emb' \(Embedding\).*layer 'out'"):
        explainer(model, batches(tokens, tokens[:, 0]))


# ---------------------------------------------------------------- 4. rows that are not the batch's examples


class TimeMajor(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False, fed (S, B, D)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x.transpose(0, 1)).mean(0))


class Routed(nn.Module):
    """Mixture of experts: each row goes to the expert its gate picks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.gate, self.experts, self.head = nn.Linear(6, 2), nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)]), \
            nn.Linear(6, 3)

    def forward(self, x):
        choice = self.gate(x).argmax(1)
        h = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            h = h.index_put((choice == j).nonzero()[:, 0:1].T.unbind(0), expert(x[choice == j]))
        return self.head(torch.tanh(h))


class Siamese(nn.Module):
    """One encoder over both members of each pair: 2B rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.encoder, self.head = nn.Linear(6, 4), nn.Linear(8, 3)

    def forward(self, x):
        both = torch.tanh(self.encoder(torch.cat([x[:, 0], x[:, 1]])))
        return self.head(torch.cat(both.chunk(2), 1))


@pytest.mark.parametrize("model,shape,rows,layer", [
    (TimeMajor(), (4, 8), 4, "encoder.linear1"),  # sequence length == batch size: the silent case
    (TimeMajor(), (5, 8), 4, "encoder.linear1"),
    (Routed(), None, 4, "experts.0"),
    (Siamese(), (2, 6), 4, "encoder"),
])
def test_layers_whose_rows_are_not_the_examples_are_refused(model, shape, rows, layer):
    x, y = data(12, shape=shape)
    with pytest.raises(ValueError, match=rf"layer '{layer}'.*rows.*batch"):
        explainer(model.double().eval(), batches(x, y, rows))


# ---------------------------------------------------------------- 5. examples mixed across the batch


class BatchCentred(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(13)
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_a_model_that_mixes_the_batch_is_refused():
    x, y = data(16)
    with pytest.raises(ValueError, match="depends on the other examples in its batch"):
        explainer(BatchCentred().double().eval(), batches(x, y, 8))


# ---------------------------------------------------------------- 6. one logit


def test_a_single_logit_is_refused_with_the_two_logit_form():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    x, _ = data(10)
    y = (x[:, 0] > 0).long()
    with pytest.raises(ValueError, match=r"C = 1.*torch.cat\(\[torch.zeros_like\(z\), z\], 1\)"):
        explainer(model, batches(x, y))
    two = lambda z: torch.cat([torch.zeros_like(z), z], 1)  # noqa: E731
    e = explainer(model, batches(x, y), output=two)
    bce = lambda z, t: F.binary_cross_entropy_with_logits(z[:, 0], t.double(), reduction="sum")  # noqa: E731
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "grad_dot"),
                               grad_dot_truth(model, x, y, x[:3], y[:3], loss=bce), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 7. frozen parameters, LoRA


def frozen_bias_model():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    model[0].bias.requires_grad_(False)
    return model


def bitfit_model():
    """Only the first layer's bias trains (BitFit), and the head."""
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    model[0].weight.requires_grad_(False)
    return model


class LoRA(nn.Module):
    """A frozen backbone layer plus a trainable low-rank adapter, and a trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(17)
        self.base, self.lora_a, self.lora_b = nn.Linear(6, 6), nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False)
        self.head = nn.Linear(6, 3)
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.lora_b(self.lora_a(x))))


@pytest.mark.parametrize("make,names", [(frozen_bias_model, ["0", "2"]), (bitfit_model, ["0", "2"]),
                                        (LoRA, ["lora_a", "lora_b", "head"])])
def test_exactly_the_trainable_parameters_are_attributed(make, names):
    model = make().double().eval()
    x, y = data(11)
    xt, yt = data(4, seed=1)
    e = explainer(model, batches(x, y))
    assert [layer.name for layer in e.layers] == names
    torch.testing.assert_close(e.scores(batches(xt, yt), "grad_dot"), grad_dot_truth(model, x, y, xt, yt),
                               rtol=1e-10, atol=1e-12)


class NoGradBackbone(nn.Module):
    """A backbone run under torch.no_grad() in forward: it never trains."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(18)
        self.backbone, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.backbone(x))
        return self.head(h)


def test_a_layer_no_gradient_reaches_is_left_out_or_refused():
    model = NoGradBackbone().double().eval()
    x, y = data(8)
    with pytest.warns(UserWarning, match="'backbone'.*no gradient"):
        e = explainer(model, batches(x, y))
    assert [layer.name for layer in e.layers] == ["head"]
    with pytest.raises(ValueError, match="'backbone'.*no gradient"):
        explainer(model, batches(x, y), layers=["backbone", "head"])


# ---------------------------------------------------------------- 14. attention's out_proj


def test_layers_that_never_run_are_left_out_with_a_warning():
    model = Attention(dropout=0.0).double().eval()
    x, y = data(12, shape=(4, 5))
    with pytest.warns(UserWarning, match=r"'att.out_proj'.*never ran"):
        e = explainer(model, batches(x, y))
    assert [layer.name for layer in e.layers] == ["embed", "head"]
    with pytest.raises(ValueError, match="'att.out_proj' did not run"):
        explainer(model, batches(x, y), layers=["att.out_proj"])


# ---------------------------------------------------------------- the probe's own edges


def test_probe_passes_float32_and_one_row_batches():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(6, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 3)).eval()
    x, y = data(9)
    explainer(model, batches(x.float(), y, 1))
    explainer(model, batches(x.float(), y, 9))
    assert math.isfinite(float(explainer(model, batches(x.float(), y, 5)).scores(batches(x[:2].float(), y[:2]),
                                                                                   "if").sum()))


def test_an_input_that_is_not_finite_behind_finite_logits_is_refused():
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = data(12)
    x[9, 2] = float("inf")  # tanh(inf) = 1: the logits stay finite
    with pytest.raises(ValueError, match="layer '0' saw NaN or inf in its input in batch 2"):
        explainer(model, batches(x, y))


# ---------------------------------------------------------------- the hostile pass: wrappers, dtypes, layouts


class Recurrent(nn.Module):
    """An LSTM feeding Linear layers, batch-first or time-major."""

    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(22)
        self.rnn, self.proj, self.head = nn.LSTM(5, 6, batch_first=batch_first), nn.Linear(6, 6), nn.Linear(6, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head(torch.tanh(self.proj(h)).mean(1 if self.batch_first else 0))


def loop_truth(model, names, x, y):
    """(N, P) per-example gradients of the named parameters, one autograd call per example."""
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), [params[n] for n in names])
            for i in range(len(y))]
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


def test_recurrent_inputs_batch_first_are_exact_and_time_major_is_refused():
    model = Recurrent(batch_first=True).double().eval()
    x, y = data(10, shape=(4, 5))
    e = explainer(model, batches(x, y), layers=["proj", "head"])
    truth = loop_truth(model, ["proj.weight", "proj.bias", "head.weight", "head.bias"], x, y)
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "grad_dot"), truth[:3] @ truth.T,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"layer 'proj' saw input of shape \(4, 2, 6\) in a batch of 2"):
        explainer(Recurrent(batch_first=False).double().eval(), batches(x, y), layers=["proj", "head"])


def mlp():
    torch.manual_seed(23)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_wrapped_models_are_explained_as_the_module_inside(wrap):
    model = mlp()
    x, y = data(10)
    e = explainer(wrap(model), batches(x, y))
    assert [layer.name for layer in e.layers] == ["0", "2"]
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "grad_dot"),
                               grad_dot_truth(model, x, y, x[:3], y[:3]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_models_are_captured_in_float32(dtype, tol):
    model = mlp()
    x, y = data(10)
    e = explainer(mlp().to(dtype), batches(x.to(dtype), y))
    scores = e.scores(batches(x[:3].to(dtype), y[:3]), "grad_dot")
    assert scores.dtype == torch.float32
    want = grad_dot_truth(model, x, y, x[:3], y[:3])
    assert float((scores.double() - want).abs().max() / want.abs().max()) < tol


def test_channels_last_convolutions_are_exact():
    torch.manual_seed(24)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 6, 4)).double()
    x, y = data(10, shape=(2, 5, 6), c=4)
    e = explainer(model.eval().to(memory_format=torch.channels_last), batches(x.to(memory_format=torch.channels_last),
                                                                             y))
    torch.testing.assert_close(e.scores(batches(x[:3], y[:3]), "grad_dot"),
                               grad_dot_truth(model, x, y, x[:3], y[:3]), rtol=1e-10, atol=1e-12)


def test_a_hugging_face_transformer_in_training_mode_equals_per_example_autograd_in_eval_mode():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(25)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).double()  # from a config: training mode, dropout on
    ids = torch.randint(1, 50, (10, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(10, 6, dtype=torch.long)
    mask[::3, 4:] = 0  # padded examples
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2))
    loader = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4], "labels": y[i:i + 4]} for i in (0, 4, 8)]
    e = explainer(model, loader, output=lambda out: out.logits)
    assert model.training and len(e.layers) == 14  # 6 Linear per block + pooler + classifier
    params = dict(model.named_parameters())
    model.eval()
    rows = []
    for i in range(10):
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, y[i:i + 1]), [params[n] for layer in e.layers
                                                                           for n in layer.parameters])
        rows.append(torch.cat([g.flatten() for g in grads]))
    truth = torch.stack(rows)
    torch.testing.assert_close(e.scores(loader, "grad_dot"), truth @ truth.T, rtol=1e-10, atol=1e-12)


def test_the_probe_splits_every_kind_of_batch():
    model = mlp()
    x, y = data(8)
    plain = explainer(model, batches(x, y)).scores(batches(x, y), "if")
    as_lists = [(x[i:i + 4], y[i:i + 4].tolist()) for i in (0, 4)]  # labels as a list of ints
    torch.testing.assert_close(explainer(model, as_lists).scores(batches(x, y), "if"), plain)

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, features, scale):  # scale: one number for the whole batch
            return self.net(features * scale)

    as_dicts = [{"features": x[i:i + 4], "scale": torch.tensor(1.0, dtype=torch.float64), "labels": y[i:i + 4]}
                for i in (0, 4)]
    torch.testing.assert_close(explainer(Keyword().eval(), as_dicts).scores(as_dicts, "if"), plain)
