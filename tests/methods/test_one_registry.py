"""One registry for both facades (issue 35, acceptance 2): a method and a
curvature registered here, in a test file, run through an Attributor (the
last layer) and a NetworkExplainer (every layer of a network) with no change
to the library, each against its float64 reference — the curvature written
once, as a fit for network layers; the methods that read a trained head
(representer points, kNN) are refused by a network, naming what they need."""
import pytest
import torch
from torch import nn

import exemplar
from exemplar import curvature as curv
from exemplar import methods
from exemplar.testing import network_reference as ref
from exemplar.testing import reference
from helpers import batches, make_data, model_inputs

DAMPING = 0.05


class InfluenceOverGradient(exemplar.Method):
    """g_t^T H^-1 g_i / |g_i|: influence normalised by the training gradient's
    length, written only against the Context (no head, no network code)."""
    name = "if_over_gradient"
    saved = {"inv_gradient": ("N",)}

    def inv_norm(self, ctx, rows):
        return ctx.per_example("inv_gradient", rows,
                               lambda r: methods.safe_reciprocal(ctx.gradient_sq_norms(r).sqrt()))

    def query(self, ctx, test):
        return exemplar.Query(ctx.curvature.precondition(*methods.test_residuals(ctx, test)))

    def self_influence(self, ctx, rows):
        return ctx.curvature_quad_norms(rows) * self.inv_norm(ctx, rows)


class DiagonalFisher(curv.Curvature):
    """H^-1 ~ 1 / (diag(F) + damping), each layer's Fisher diagonal: written once,
    as fit_layers and solve, it serves a network's layers and, through the
    engine's HeadFisher, a last layer (whose expected Fisher is its Gauss-Newton)."""
    name = "diagonal_fisher"

    def __init__(self, w):
        self.w = w  # (k_out, k_in) float64: the damped inverse diagonal

    @classmethod
    def fit_layers(cls, data, settings):
        def block(j, choices):
            return (sum(curv.weighted((d.transpose(1, 2) @ a).square(), w).sum(0) for w, d, a in choices),)
        return [cls(1 / (total / data.N + settings.damping)) for (total,) in data.sums(block)]

    @staticmethod
    def shapes(C, Dp):
        return {"w": (C, Dp, torch.float64)}

    def solve(self, V):
        return V.double() * self.w.to(V.device)


@pytest.fixture
def registered():
    exemplar.register(InfluenceOverGradient)
    curv.register(DiagonalFisher)
    yield
    methods.unregister(InfluenceOverGradient.name)
    curv.unregister(DiagonalFisher.name)


def _scores(g_test, g_train, hinv_diag, method):
    """float64 (T, N) from explicit gradients and a diagonal inverse (None: the identity)."""
    pre = g_test if hinv_diag is None else g_test * hinv_diag
    influence = pre @ g_train.T
    if method == "if_over_gradient":
        return influence / g_train.norm(dim=1)
    if method == "theta_relatif":
        return influence / (g_train * hinv_diag).norm(dim=1)
    return influence


def test_a_registered_method_and_curvature_run_through_the_last_layer(registered):
    train, test = make_data(29, 3, 4, seed=1), make_data(5, 3, 4, seed=2)
    attr = exemplar.Attributor(train, curvature="diagonal_fisher", damping=DAMPING)
    g_train = reference.per_example_grads(train.features, train.logits, train.labels, True)
    g_test = reference.per_example_grads(test.features, test.logits, test.labels, True)
    diag = reference.exact_hessian(train.features, train.logits, True).diagonal()
    for method in ("if", "theta_relatif", "if_over_gradient"):
        want = _scores(g_test, g_train, 1 / (diag + DAMPING), method)
        torch.testing.assert_close(attr.scores(test, method), want, rtol=1e-9, atol=1e-12, msg=method)
        torch.testing.assert_close(attr.topk(test, 4, method).values, want.topk(4, 1).values, rtol=1e-9, atol=1e-12)
    # the registered method over a built-in curvature, against the explicit inverse
    exact = exemplar.Attributor(train, curvature="exact", damping=DAMPING)
    hinv = reference.inverse_curvature(train.features, train.logits, "exact", DAMPING, True)
    want = (g_test @ hinv @ g_train.T) / g_train.norm(dim=1)
    torch.testing.assert_close(exact.scores(test, "if_over_gradient"), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(exact.self_influence("if_over_gradient"),
                               ((g_train @ hinv) * g_train).sum(1) / g_train.norm(dim=1), rtol=1e-9, atol=1e-12)


def _mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_a_registered_method_and_curvature_run_through_a_whole_network(registered, tmp_path):
    model = _mlp()
    x, y = model_inputs(23, d=6)
    xt, yt = model_inputs(5, seed=1, d=6)
    names = ["0", "2"]
    g_train = torch.cat([g.flatten(1) for g in ref.layer_gradients(model, names, x, y)], 1)
    g_test = torch.cat([g.flatten(1) for g in ref.layer_gradients(model, names, xt, yt)], 1)
    diag = torch.cat([f.diagonal() for f in ref.fisher(model, names, x, y, "expected")])
    for store in (None, tmp_path / "store"):
        net = exemplar.NetworkExplainer(model, batches(x, y, size=7), curvature="diagonal_fisher", damping=DAMPING,
                                        store=store, shard_rows=10, progress=False)
        assert [type(b).__name__ for b in net.curvature.blocks] == ["DiagonalFisher", "DiagonalFisher"]
        for method in ("if", "theta_relatif", "if_over_gradient"):
            want = _scores(g_test, g_train, 1 / (diag + DAMPING), method)
            torch.testing.assert_close(net.scores(batches(xt, yt), method), want, rtol=1e-9, atol=1e-12,
                                       msg=f"{store} {method}")
            top = net.topk(batches(xt, yt), 4, method)
            torch.testing.assert_close(top.values, want.topk(4, 1).values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(net.self_influence("if_over_gradient"),
                                   (g_train.square() / (diag + DAMPING)).sum(1) / g_train.norm(dim=1),
                                   rtol=1e-9, atol=1e-12)
    # the store's fit cache holds the registered form, and a second explainer reads it back as it was
    again = exemplar.NetworkExplainer(model, batches(x, y, size=7), curvature="diagonal_fisher", damping=DAMPING,
                                      store=tmp_path / "store", shard_rows=10, progress=False)
    assert torch.equal(again.curvature.blocks[1].w, net.curvature.blocks[1].w)
    # the registered method over the built-in exact curvature, against the explicit block Fisher
    exact = exemplar.NetworkExplainer(model, batches(x, y, size=7), curvature="exact", damping=DAMPING,
                                      progress=False)
    fishers = ref.fisher(model, names, x, y, "expected")
    want = ref.scores(ref.layer_gradients(model, names, x, y), ref.layer_gradients(model, names, xt, yt), fishers,
                      DAMPING, "if") / g_train.norm(dim=1)
    torch.testing.assert_close(exact.scores(batches(xt, yt), "if_over_gradient"), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["rps_l2", "rps_lje", "knn"])
def test_methods_that_read_a_trained_head_are_refused_by_a_network_naming_it(method):
    model = _mlp()
    x, y = model_inputs(9, d=6)
    with pytest.raises(ValueError, match=f"method='{method}' reads a trained last layer.*exemplar.Explainer"):
        exemplar.NetworkExplainer(model, batches(x, y), method=method, progress=False)
    net = exemplar.NetworkExplainer(model, batches(x, y), progress=False)
    for call in (lambda: net.scores(batches(x, y), method), lambda: net.topk(batches(x, y), 2, method),
                 lambda: net.self_influence(method)):
        with pytest.raises(ValueError, match=f"method='{method}' reads a trained last layer"):
            call()


def test_a_curvature_without_a_layer_fit_is_refused_by_a_network_before_any_pass():
    class Nothing(curv.Curvature):
        name = "nothing"
    with pytest.raises(ValueError, match="Nothing needs fit_layers .* or fit"):
        curv.register(Nothing)

    class HeadOnly(curv.Curvature):
        name = "head_only"

        @classmethod
        def fit(cls, data, settings):
            raise AssertionError("never fitted here")
    curv.register(HeadOnly)
    try:
        model = _mlp()
        x, y = model_inputs(9, d=6)
        with pytest.raises(ValueError, match=r"curvature='head_only' has no fit for a whole network's layers.*"
                                             r"use one of \('exact', 'kfac', 'ekfac', 'identity'\)"):
            exemplar.NetworkExplainer(model, batches(x, y), curvature="head_only", progress=False)
    finally:
        curv.unregister("head_only")


def test_a_tampered_network_fit_cache_is_refused(tmp_path):
    model = _mlp()
    x, y = model_inputs(12, d=6)
    exemplar.NetworkExplainer(model, batches(x, y), curvature="kfac", store=tmp_path / "s", progress=False)
    fitted = next((tmp_path / "s" / "fits").iterdir()) / "fitted.safetensors"
    from safetensors.torch import save_file

    from exemplar.storage.saved import read_whole, tensors_digest
    tensors, meta = read_whole(fitted)
    tensors["layer1.w"] = tensors["layer1.w"][:, :-1].contiguous()
    save_file(tensors, fitted, metadata={**meta, "sha256": tensors_digest(tensors)})  # a consistent checksum
    with pytest.raises(ValueError, match=r"fit cache file .* holds layer1.w as \(3, 5\).*expected finite \(3, 6\)"):
        exemplar.NetworkExplainer(model, batches(x, y), curvature="kfac", store=tmp_path / "s", progress=False)
