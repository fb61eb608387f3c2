"""The method registry and the operands API: a method defined and registered
here, in a test file, runs through every Attributor API and survives saving
without any change to the library; the Attributor has no per-method code."""
import pathlib
import re

import pytest
import torch

import exemplar
from exemplar import methods
from helpers import make_data, make_layer_data

LIBRARY = pathlib.Path(exemplar.__file__).parent
REPO = LIBRARY.parents[1]


class FeatureDot(exemplar.Method):
    """score(t, i) = <phi_t, phi_i> / |phi_i|: a normalised feature similarity,
    with its normaliser cached (and so saved) like the library's methods."""
    name = "feature_dot"
    family = "representer"
    saved = {"feature_inv_norm": ("N",)}

    def inv_norm(self, attr, rows):
        return attr.per_example("feature_inv_norm", rows, lambda r: 1 / torch.linalg.vector_norm(r.phi, dim=1))

    def operands(self, attr, rows):
        return exemplar.TrainOperands(torch.ones_like(rows.phi[:, :1]), rows.phi, self.inv_norm(attr, rows))

    def query(self, attr, test):
        phi = attr.augment(test.features)
        return exemplar.Query(exemplar.Rank1(torch.ones_like(phi[:, :1]), phi))

    def self_influence(self, attr, rows):
        return rows.phi.square().sum(1) * self.inv_norm(attr, rows)


def feature_dot_reference(train, test):
    """float64, obviously correct."""
    phi = torch.cat([train.features.double(), torch.ones(len(train), 1, dtype=torch.float64)], 1)
    phi_t = torch.cat([test.features.double(), torch.ones(len(test), 1, dtype=torch.float64)], 1)
    return (phi_t @ phi.T) / phi.norm(dim=1)


@pytest.fixture
def feature_dot():
    exemplar.register(FeatureDot)
    yield FeatureDot.name
    methods.unregister(FeatureDot.name)


def test_a_method_registered_in_a_test_file_runs_through_every_api(feature_dot, tmp_path):
    train = make_data(31, 3, 5, seed=1)
    test = make_data(4, 3, 5, seed=2, labels=False)
    attr = exemplar.Attributor(train, curvature="ekfac")
    want = feature_dot_reference(train, test)
    torch.testing.assert_close(attr.scores(test, feature_dot), want, rtol=1e-12, atol=0)
    values, indices = attr.topk(test, 6, feature_dot)
    torch.testing.assert_close(values, torch.topk(want, 6, dim=1).values, rtol=1e-12, atol=0)
    assert torch.equal(indices, torch.topk(want, 6, dim=1).indices)
    torch.testing.assert_close(attr.self_influence(feature_dot), torch.diagonal(feature_dot_reference(train, train)),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(attr.total_scores(test, feature_dot), want.sum(0), rtol=1e-12, atol=0)
    # its representer family makes inspection rank it by magnitude, like RPS
    assert torch.equal(exemplar.inspection_order(attr, feature_dot),
                       torch.sort(attr.self_influence(feature_dot).abs(), descending=True, stable=True).indices)
    # what it cached is saved and validated like the library's own state
    tensors, config = attr.state_dict()
    assert "cache.feature_inv_norm" in tensors
    loaded = exemplar.Attributor.from_state(tensors, config)
    assert torch.equal(loaded.scores(test, feature_dot), attr.scores(test, feature_dot))
    tensors["cache.feature_inv_norm"] = tensors["cache.feature_inv_norm"][:-1]
    with pytest.raises(ValueError, match=r"cache.feature_inv_norm must have shape \(31,\)"):
        exemplar.Attributor.from_state(tensors, config)


def test_unregistered_names_are_refused_by_every_api(feature_dot):
    train, test = make_data(10, 3, 4, seed=1), make_data(2, 3, 4, seed=2)
    attr = exemplar.Attributor(train)
    methods.unregister(feature_dot)
    for call in (lambda: attr.scores(test, feature_dot), lambda: attr.prepare(feature_dot),
                 lambda: attr.query(test, feature_dot), lambda: attr.self_influence(feature_dot)):
        with pytest.raises(ValueError, match=r"method must be one of \('if', .*got 'feature_dot'"):
            call()
    exemplar.register(FeatureDot)  # for the fixture's teardown
    with pytest.raises(ValueError, match="'feature_dot' is already registered"):
        exemplar.register(FeatureDot)


@pytest.mark.parametrize("method", exemplar.METHODS)
def test_operands_drive_the_ops_directly(method):
    """What an embedding library does: take the operands and call the ops."""
    train, weight, bias = make_layer_data(41, 4, 6, seed=3)
    test = make_data(5, 4, 6, seed=4, labels=False)
    attr = exemplar.Attributor(train, curvature="kfac", weight=weight, bias=bias)
    operands, query = attr.prepare(method), attr.query(test, method)
    g = query.gradient
    if isinstance(g, exemplar.Rank1):
        values, indices = exemplar.ops.topk_rank1(g.alpha, g.beta, operands.r, operands.phi, operands.inv_norm, 7, True)
        dense = exemplar.ops.scores_rank1(g.alpha, g.beta, operands.r, operands.phi, operands.inv_norm)
    else:
        values, indices = exemplar.ops.topk(g.S, operands.r, operands.phi, operands.inv_norm, 7, True)
        dense = exemplar.ops.scores(g.S, operands.r, operands.phi, operands.inv_norm)
    if query.offset is not None:
        values, dense = values + query.offset[:, None], dense + query.offset[:, None]
    assert torch.equal(dense, attr.scores(test, method))
    want_values, want_indices = attr.topk(test, 7, method)
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)


def test_the_engine_has_no_per_method_code():
    source = "\n".join(path.read_text() for path in (LIBRARY / "engine").glob("*.py"))
    for name in exemplar.METHODS:
        # a name may appear only as a parameter's default, never in a comparison or branch
        uses = re.findall(rf"(.{{0,20}})[\"']{name}[\"']", source)
        assert all(use.endswith("method: str = ") for use in uses), (name, uses)


def test_nothing_outside_the_engine_uses_the_attributors_private_members():
    private = [m for m in vars(exemplar.Attributor) if m.startswith("_") and not m.startswith("__")]
    private += ["_fitted", "_passes", "_train", "_group"]
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, private)) + r")\b|\battr(ibutor)?\._[a-z]")
    folders = [LIBRARY, REPO / "experiments", REPO / "bench", REPO / "tests"]
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in folders for path in folder.rglob("*.py")
                 if path.parent != LIBRARY / "engine"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_the_library_never_imports_the_experiments_or_the_bench():
    offenders = [str(path.relative_to(REPO)) for path in LIBRARY.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+(experiments|bench|tests)\b", path.read_text(), re.M)]
    assert not offenders and not (LIBRARY / "repro").exists(), offenders


class DiagonalGaussNewton(exemplar.curvature.Curvature):
    """A curvature defined here, not in the library: the diagonal of the
    Gauss-Newton Hessian, h_cd = mean_i p_ic (1 - p_ic) phi_id^2, damped."""
    name = "diagonal_test"

    def __init__(self, w):
        self.w = w  # (C, Dp): 1 / (h + damping)

    @classmethod
    def check(cls, settings):
        super().check(settings)
        if settings.damping <= 0:
            raise ValueError("diagonal_test needs damping > 0")

    @classmethod
    def fit(cls, data, settings):
        def block(phi, logits):
            p = torch.softmax(logits.double(), 1)
            return ((p * (1 - p)).T @ phi.double().square() / phi.shape[0],)
        (h,) = data.mean(block)
        return cls((1.0 / (h + settings.damping)).to(data.dtype))

    @staticmethod
    def shapes(C, Dp):
        return {"w": (C, Dp)}

    def precondition(self, r, phi):
        return exemplar.General(r.unsqueeze(2) * phi.unsqueeze(1) * self.w)

    def norms(self, R, Phi, N=None):
        R2, P2 = R.square(), Phi.square()
        return ((R2 @ self.w.square()) * P2).sum(1), ((R2 @ self.w) * P2).sum(1)


def diagonal_reference(train, test, damping):
    """float64 IF and theta-RelatIF scores and IF self-influence, from explicit gradients."""
    def gradients(data, labels):
        phi = torch.cat([data.features.double(), torch.ones(len(data), 1, dtype=torch.float64)], 1)
        r = torch.softmax(data.logits.double(), 1) - torch.nn.functional.one_hot(labels, data.num_classes)
        return r.unsqueeze(2) * phi.unsqueeze(1), phi

    g_train, phi = gradients(train, train.labels)
    g_test, _ = gradients(test, test.explained_labels())
    p = torch.softmax(train.logits.double(), 1)
    w = 1.0 / ((p * (1 - p)).T @ phi.square() / len(train) + damping)
    influence = torch.einsum("tcd,cd,icd->ti", g_test, w, g_train)
    theta_norm = (g_train * w).flatten(1).norm(dim=1)
    return influence, influence / theta_norm, torch.einsum("icd,cd,icd->i", g_train, w, g_train)


@pytest.fixture
def diagonal():
    exemplar.curvature.register(DiagonalGaussNewton)
    yield DiagonalGaussNewton.name
    exemplar.curvature.unregister(DiagonalGaussNewton.name)


def test_a_curvature_registered_in_a_test_file_runs_through_every_api(diagonal, tmp_path, monkeypatch):
    train = make_data(37, 4, 5, seed=11)
    test = make_data(6, 4, 5, seed=12, labels=False)
    attr = exemplar.Attributor(train, curvature=diagonal, damping=0.1)
    assert attr.settings.curvature == diagonal and isinstance(attr.curvature, DiagonalGaussNewton)
    influence, theta_relatif, self_influence = diagonal_reference(train, test, 0.1)
    torch.testing.assert_close(attr.scores(test, "if"), influence, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.scores(test, "theta_relatif"), theta_relatif, rtol=1e-10, atol=1e-12)
    values, indices = attr.topk(test, 5, "theta_relatif")
    assert torch.equal(indices, torch.topk(theta_relatif, 5, dim=1).indices)
    torch.testing.assert_close(values, theta_relatif.gather(1, indices), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.self_influence("if"), self_influence, rtol=1e-10, atol=1e-12)
    # saved and reloaded with its kind, checked against its own shapes, never refitted
    attr.save(tmp_path / "fit.safetensors")
    monkeypatch.setattr(DiagonalGaussNewton, "fit", classmethod(lambda *a: pytest.fail("refitted")))
    loaded = exemplar.Attributor.load(tmp_path / "fit.safetensors")
    assert torch.equal(loaded.scores(test, "theta_relatif"), attr.scores(test, "theta_relatif"))
    tensors, config = attr.state_dict()
    assert config["curvature_kind"] == "DiagonalGaussNewton"
    with pytest.raises(ValueError, match=r"curvature.w must have shape \(4, 6\)"):
        exemplar.Attributor.from_state({**tensors, "curvature.w": tensors["curvature.w"][:, :5]}, config)
    # a store keeps its fit like the library's curvatures'
    store = exemplar.storage.write_store(train, tmp_path / "store", shard_rows=10)
    monkeypatch.undo()
    first = exemplar.Attributor(store, curvature=diagonal, damping=0.1)
    monkeypatch.setattr(DiagonalGaussNewton, "fit", classmethod(lambda *a: pytest.fail("refitted")))
    again = exemplar.Attributor(store, curvature=diagonal, damping=0.1)
    assert torch.equal(again.topk(test, 5, "theta_relatif").indices, first.topk(test, 5, "theta_relatif").indices)
    # its own check of the settings is the library's
    with pytest.raises(ValueError, match="diagonal_test needs damping > 0"):
        exemplar.Attributor(train, curvature=diagonal, damping=0.0)


def test_unregistered_curvatures_are_refused(diagonal):
    exemplar.curvature.unregister(diagonal)
    with pytest.raises(ValueError, match=r"curvature must be one of \('exact', 'kfac', 'ekfac', 'identity'\), "
                                         r"got 'diagonal_test'"):
        exemplar.Attributor(make_data(10, 3, 4, seed=1), curvature=diagonal)
    exemplar.curvature.register(DiagonalGaussNewton)  # for the fixture's teardown
    with pytest.raises(ValueError, match="'diagonal_test' is already registered"):
        exemplar.curvature.register(DiagonalGaussNewton)


def test_settings_are_one_frozen_validated_object_with_a_stable_fingerprint():
    settings = exemplar.Settings(curvature="ekfac", damping=1e-2)
    assert settings == exemplar.Settings(curvature="ekfac", damping=0.01) and "damping=0.01" in repr(settings)
    assert settings.fingerprint() == exemplar.Settings.from_dict(settings.to_dict()).fingerprint()
    assert exemplar.Settings(damping=1).fingerprint() == exemplar.Settings(damping=1.0).fingerprint()
    assert settings.fingerprint() != exemplar.Settings(curvature="ekfac", damping=0.02).fingerprint()
    with pytest.raises(Exception, match="cannot assign"):
        settings.damping = 1.0
    attr = exemplar.Attributor(make_data(12, 3, 4, seed=2), curvature="ekfac", damping=1e-2)
    assert attr.settings == settings and repr(settings) in repr(attr)
    assert attr.state_dict()[1]["damping"] == 0.01
    with pytest.raises(ValueError, match="unknown key 'x.colour'"):
        exemplar.Settings.from_dict(dict(settings.to_dict(), colour=1), "x.")


@pytest.mark.parametrize("values, message", [
    ("kfac", r"settings must be a JSON object, got str"),
    ({"curvature": "kfac"}, r"missing key 'damping'"),
    (dict(exemplar.Settings().to_dict(), damping=True), r"damping must be a finite number >= 0, got True"),
    (dict(exemplar.Settings().to_dict(), rank=True), r"rank must be None, 'auto' or an integer >= 1, got True"),
    (dict(exemplar.Settings().to_dict(), bias=1), r"bias must be true or false, got 1"),
    (dict(exemplar.Settings().to_dict(), curvature=None), r"curvature must be one of .*got None"),
    (dict(exemplar.Settings().to_dict(), rps_lambda=float("nan")), r"rps_lambda must be a finite number > 0"),
])
def test_bad_settings_are_refused_naming_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        exemplar.Settings.from_dict(values)


def test_the_registries_refuse_what_they_cannot_hold():
    class Nameless(exemplar.curvature.Curvature):
        """No name: a form only."""

    with pytest.raises(ValueError, match="Nameless needs a name"):
        exemplar.curvature.register(Nameless)
    with pytest.raises(ValueError, match="unknown curvature kind 'NoSuchForm'"):
        exemplar.curvature.from_state("NoSuchForm", {})
    with pytest.raises(TypeError, match="train must be a LastLayerData or an exemplar.Store, got int"):
        exemplar.Attributor(42)
