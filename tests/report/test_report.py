"""What users look at: Explanation (pandas / CSV), exemplar.report's HTML
(rendered by a real headless Chromium), the matplotlib grid, the demo; and
the API habits around them (TopK results, explain(method=), DataLoaders of
features, progress only when asked or on a terminal)."""
import os
import re
import shutil
import subprocess

import pytest
import torch

import exemplar
from exemplar.progress import Progress
from helpers import make_data

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.fixture(scope="module")
def fitted():
    train = make_data(60, 3, 16, seed=41)
    test = make_data(4, 3, 16, seed=42, labels=False)
    attr = exemplar.Attributor(train, curvature="exact")
    return train, test, attr


def test_explanation_to_pandas_and_csv(fitted, tmp_path):
    train, test, attr = fitted
    e = attr.explain(test, k=3, method="theta_relatif", opponents=2)
    top, bottom = attr.topk(test, 3, "theta_relatif"), attr.topk(test, 2, "theta_relatif", largest=False)
    assert isinstance(top, exemplar.TopK) and torch.equal(e.indices, top.indices)
    assert torch.equal(e.opponents.indices, bottom.indices)
    frame = e.to_pandas(train.labels, class_names=["a", "b", "c"])
    assert len(frame) == 4 * (3 + 2)
    row = frame[(frame.test == 2) & (frame.kind == "opponent") & (frame["rank"] == 2)].iloc[0]  # ranks from 1
    assert row.train_index == int(bottom.indices[2, 1]) and row.score == pytest.approx(float(bottom.values[2, 1]))
    assert row.train_label == int(train.labels[row.train_index]) and row.method == "theta_relatif"
    assert row.train_label_name == "abc"[row.train_label]
    assert row.probability == pytest.approx(float(torch.softmax(test.logits[2].double(), 0).max()))
    e.to_csv(tmp_path / "e.csv", train.labels)
    assert (tmp_path / "e.csv").read_text().splitlines()[0].startswith("test,kind,rank,train_index,score")


def test_topk_divine_and_divine_global_return_topk(fitted):
    _, test, attr = fitted
    for result in (attr.topk(test, 3, "if"), exemplar.divine(attr, test, m=3, gamma=0.0),
                   exemplar.divine_global(attr, test, m=3, gamma=0.0)):
        assert isinstance(result, exemplar.TopK) and result._fields == ("values", "indices")
        assert result.indices.dtype == torch.int64 and result.values.is_floating_point()
    values, indices = exemplar.divine(attr, test, m=3, gamma=0.0)
    assert torch.equal(indices, attr.topk(test, 3, "if").indices)


def test_scores_and_topk_take_a_dataloader(fitted):
    _, test, attr = fitted
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test.features, test.logits), batch_size=3)
    assert torch.equal(attr.scores(loader, "if"), attr.scores(test, "if"))
    assert torch.equal(attr.topk(loader, 2, "grad_cos").indices, attr.topk(test, 2, "grad_cos").indices)
    as_dicts = [{"features": test.features[:2], "logits": test.logits[:2]},
                {"features": test.features[2:], "logits": test.logits[2:]}]
    assert torch.equal(attr.total_scores(as_dicts, "if"), attr.total_scores(test, "if"))
    with pytest.raises(TypeError, match=r"test batch 0 must be \(features \(n, D\), logits \(n, C\)\[, labels"):
        attr.topk([(test.features,)], 2)
    with pytest.raises(ValueError, match=r"test batch 1 is a dict without \['logits'\]"):
        attr.topk([as_dicts[0], {"features": test.features}], 2)
    with pytest.raises(TypeError, match="test must be a LastLayerData or a DataLoader"):
        attr.topk(test.features, 2)


def test_explain_takes_the_method_per_call():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    explainer = exemplar.Explainer(model, loader, method="if", curvature="exact", progress=False)
    default, other = explainer.explain(x[:3], k=4), explainer.explain(x[:3], k=4, method="theta_relatif")
    assert default.method == "if" and other.method == "theta_relatif"
    assert torch.equal(other.indices, explainer.attributor.topk(explainer._test_data(x[:3], None, False), 4,
                                                                "theta_relatif").indices)
    with pytest.raises(ValueError, match="method must be one of"):
        explainer.explain(x[:3], method="nope")


def test_progress_is_quiet_in_logs_unless_asked(capsys):
    for enabled, shown in ((None, False), (False, False), (True, True)):
        bar = Progress("job", 3, enabled, interval=0.0)
        bar.update(3)
        bar.close()
        err = capsys.readouterr().err
        assert ("job: 3/3 in" in err) == shown, (enabled, err)
        assert "\r" not in err  # stderr is not a terminal here: whole lines, no redraws


def _report(tmp_path, fitted, texts=False):
    train, test, attr = fitted
    truth = exemplar.retrain_head(train, test, 1e-3, subsets=9)  # no layer given: refit from zero
    evaluation = exemplar.lds(attr, test, truth, methods=("if", "theta_relatif"))
    explanations = {"IF": attr.explain(test, 3, "if", opponents=2),
                    "θ-RelatIF": attr.explain(test, 3, "theta_relatif", opponents=2)}
    if texts:
        inputs = dict(train_inputs=[f"review <b>{i}</b> & more" for i in range(len(train))],
                      test_inputs=[f"test text {t}" for t in range(len(test))])
    else:
        inputs = dict(train_inputs=train.features.view(-1, 4, 4), test_inputs=test.features, image_shape=(4, 4))
    return exemplar.report(tmp_path / "r.html", explanations, train_labels=train.labels,
                           self_influence=attr.self_influence("if"), suspects=5,
                           class_names=["cat", "dog", "eel"], evaluation=evaluation, **inputs)


@pytest.mark.parametrize("texts", [False, True])
def test_report_is_self_contained(tmp_path, fitted, texts):
    page = _report(tmp_path, fitted, texts).read_text()
    assert not re.search(r"""(src|href)=['"](?!data:|#)""", page)  # only inlined data and in-page links
    n_images = 0 if texts else 4 * (1 + 2 * (3 + 2)) + 5
    assert page.count("<img") == n_images
    assert page.count("class='test'") == 4 and "Self-influence suspects" in page
    assert "Counterfactual check: LDS" in page and page.count("<circle") == 9  # one point per retrain
    if texts:
        assert "review &lt;b&gt;7&lt;/b&gt; &amp; more" in page or "&lt;b&gt;" in page
    _, test, attr = fitted
    first = attr.topk(test, 3, "theta_relatif")
    assert f"train #{int(first.indices[0, 0])}, label " in page


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path, fitted):
    if CHROMIUM is None:
        if os.environ.get("EXEMPLAR_REQUIRE_BROWSER"):
            pytest.fail("EXEMPLAR_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("needs Chromium (apt-get install chromium)")
    path = _report(tmp_path, fitted)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-broken-images="0"' in dom.stdout, dom.stderr[-2000:]  # every inlined PNG decoded
    widths = {k: float(v) for k, v in re.findall(r'data-(example|suspect)-width="([0-9.]+)"', dom.stdout)}
    assert widths["suspect"] >= widths["example"] >= 48, widths  # the suspects' 4x4 thumbnails are readable
    assert dom.stdout.count("<img") == 4 * (1 + 2 * (3 + 2)) + 5
    assert 'data-scatter-points="9"' in dom.stdout  # the counterfactual scatter is drawn, one point per retrain
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = torch.as_tensor(matplotlib.image.imread(shot))[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    dark = (pixels.mean(-1) < 0.5).double().mean()
    assert 0.01 < float(dark) < 0.6, float(dark)  # text and images drawn, not a blank or black page


def test_plot_grid_and_demo_files(tmp_path, fitted):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    train, test, attr = fitted
    e = {"IF": attr.explain(test, 3, "if", opponents=1), "kNN": attr.explain(test, 3, "knn")}
    figure = exemplar.plot.grid(e, test.features, train.features, train_labels=train.labels, image_shape=(4, 4),
                                path=tmp_path / "g.png")
    assert len(figure.axes) == 2 * 4 * (1 + 3 + 1)
    assert (tmp_path / "g.png").stat().st_size > 5_000
    # the picture reads on its own: a title naming the methods and a legend of the captions
    assert "by IF, kNN" in figure._suptitle.get_text()
    assert any("opponents ('opp.')" in t.get_text() and "its label and its score" in t.get_text()
               for t in figure.texts)
    assert figure.axes[1].get_title().startswith("#") and "label" in figure.axes[1].get_title()
    assert figure.axes[0].images[0].get_cmap().name == "gray"  # 0 is black, as in the report's PNGs
    with pytest.raises(TypeError, match="use exemplar.report for texts"):
        exemplar.plot.grid(e, ["a"] * 4, ["b"] * 60)


def test_demo_saves_its_picture_and_report(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from exemplar import demo

    demo.main(["--tests", "2", "--k", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "position in the test split (0 to 596)" in out and "p is the model's probability" in out
    assert re.search(r"^test #\d+: true \d, predicted \d with p=0\.\d+$", out, re.M)
    assert str((tmp_path / "demo" / "report.html").resolve()) in out
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert "Self-influence suspects" in (tmp_path / "demo" / "report.html").read_text()
