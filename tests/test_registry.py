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


def test_the_attributor_has_no_per_method_code():
    source = (LIBRARY / "attributor.py").read_text()
    for name in exemplar.METHODS:
        # a name may appear only as a parameter's default, never in a comparison or branch
        uses = re.findall(rf"(.{{0,20}})[\"']{name}[\"']", source)
        assert all(use.endswith("method: str = ") for use in uses), (name, uses)


def test_nothing_outside_attributor_py_uses_its_private_members():
    private = [m for m in vars(exemplar.Attributor) if m.startswith("_") and not m.startswith("__")]
    private += ["_cache", "_curvatures"]
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, private)) + r")\b|\battr(ibutor)?\._[a-z]")
    folders = [LIBRARY, REPO / "experiments", REPO / "bench", REPO / "tests"]
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in folders for path in folder.rglob("*.py")
                 if path.name != "attributor.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_the_library_never_imports_the_experiments_or_the_bench():
    offenders = [str(path.relative_to(REPO)) for path in LIBRARY.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+(experiments|bench|tests)\b", path.read_text(), re.M)]
    assert not offenders and not (LIBRARY / "repro").exists(), offenders
