"""The `exemplar` command line over saved features: fit, topk, self-influence,
report; its results equal the Python API's, and bad files give one clear line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import exemplar
from exemplar.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(53)
    weight, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    features = torch.randn(89, 6, generator=g)
    logits = features @ weight.T + bias
    noise = torch.randint(0, 4, (80,), generator=g)
    labels = torch.where(torch.rand(80, generator=g) < 0.8, logits[:80].argmax(1), noise)
    train = exemplar.LastLayerData(features[:80], logits[:80], labels)
    test = exemplar.LastLayerData(features[80:], logits[80:])
    safetensors.torch.save_file({"features": train.features, "logits": train.logits, "labels": train.labels,
                                 "weight": weight, "bias": bias}, folder / "train.safetensors")
    safetensors.torch.save_file({"features": test.features, "logits": test.logits}, folder / "test.safetensors")
    assert main(["fit", str(folder / "train.safetensors"), "-o", str(folder / "fit.safetensors"),
                 "--curvature", "ekfac", "--methods", "if,rps_lje"]) == 0
    attr = exemplar.Attributor(train, curvature="ekfac", weight=weight, bias=bias)
    return folder, train, test, attr


def test_topk_outputs_equal_the_api(files, capsys):
    folder, train, test, attr = files
    expected = attr.topk(test, 3, "rps_lje")
    assert main(["topk", str(folder / "fit.safetensors"), str(folder / "test.safetensors"), "-k", "3",
                 "--method", "rps_lje", "--opponents", "2", "--test-rows", "4",
                 "-o", str(folder / "t.safetensors")]) == 0
    got = safetensors.torch.load_file(folder / "t.safetensors")
    assert torch.equal(got["indices"], expected.indices)
    torch.testing.assert_close(got["values"], expected.values)  # test blocks of 4 rows: float32 rounding
    assert torch.equal(got["opponent_indices"], attr.topk(test, 2, "rps_lje", largest=False).indices)
    pandas = pytest.importorskip("pandas")
    for suffix in (".csv", ".parquet"):
        if suffix == ".parquet":
            pytest.importorskip("pyarrow")
        out = folder / f"t{suffix}"
        assert main(["topk", str(folder / "fit.safetensors"), str(folder / "test.safetensors"), "-k", "3",
                     "--method", "rps_lje", "-o", str(out)]) == 0
        frame = pandas.read_csv(out) if suffix == ".csv" else pandas.read_parquet(out)
        assert frame.train_index.tolist() == expected.indices.reshape(-1).tolist()
        assert frame.train_label.tolist() == train.labels[expected.indices.reshape(-1)].tolist()


def test_progress_on_request(files, capfd):
    folder, *_ = files
    main(["topk", str(folder / "fit.safetensors"), str(folder / "test.safetensors"), "--test-rows", "2",
          "-o", str(folder / "p.csv"), "--progress"])
    assert "topk theta_relatif: 5/5 in" in capfd.readouterr().err
    main(["topk", str(folder / "fit.safetensors"), str(folder / "test.safetensors"), "-o", str(folder / "p.csv"),
          "--force"])
    assert capfd.readouterr().err == ""  # not a terminal, not asked: quiet


def test_self_influence_and_report(files):
    folder, train, test, attr = files
    assert main(["self-influence", str(folder / "fit.safetensors"), "--top", "7", "-o", str(folder / "s.csv")]) == 0
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(folder / "s.csv")
    assert frame.train_index.tolist() == torch.sort(attr.self_influence("if"), descending=True,
                                                    stable=True).indices[:7].tolist()
    (folder / "train.txt").write_text("\n".join(f"training sentence {i}" for i in range(80)))
    assert main(["report", str(folder / "fit.safetensors"), str(folder / "test.safetensors"), "-o",
                 str(folder / "r.html"), "--methods", "if,grad_cos", "--opponents", "1", "--train-inputs",
                 str(folder / "train.txt"), "--class-names", "a,b,c,d"]) == 0
    page = (folder / "r.html").read_text()
    assert page.count("class='test'") == 9 and "training sentence" in page and "<h4>grad-cos</h4>" in page
    assert frame["rank"].tolist() == list(range(1, 8))  # ranked from 1, as in the report


@pytest.mark.parametrize("args,message", [
    (["topk", "{fit}", "{missing}", "-o", "{o}.csv"], r"test file .*missing.safetensors does not exist"),
    (["topk", "{fit}", "{garbage}", "-o", "{o}.csv"], r"test file .*garbage.safetensors is not a safetensors file"),
    (["topk", "{fit}", "{nolabels_wrong_d}", "-o", "{o}.csv"],
     r"test file .*wrong_d.safetensors: test.features must have shape \(T, D\) with D=6 like train.features, "
     r"got \(3, 5\)"),
    (["topk", "{test}", "{test}", "-o", "{o}.csv"], r"fit file .* is not a file of format 'exemplar.Attributor/1'"),
    (["topk", "{fit}", "{test}", "-o", "{o}.json"], r"output .*\.json must end in one of .safetensors, .csv, .parquet"),
    (["topk", "{fit}", "{test}", "-k", "81", "-o", "{o}.csv"], r"-k must be at most N=80 training examples, got 81"),
    (["topk", "{fit}", "{test}", "--method", "nope", "-o", "{o}.csv"], r"method must be one of"),
    (["fit", "{test}", "-o", "{o}.safetensors"], r"training file .* has no tensor \['labels'\]"),
    (["fit", "{badlabels}", "-o", "{o}.safetensors"],
     r"training file .*: labels must be in \[0, C\) = \[0, 4\), got labels\[2\]=9"),
    (["report", "{fit}", "{test}", "-o", "{o}.html", "--train-inputs", "{short_txt}"],
     r"training inputs file .* has 2 entries, but there are 80 training examples"),
])
def test_bad_input_gives_one_clear_line(files, capsys, args, message):
    folder, train, *_ = files
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    safetensors.torch.save_file({"features": torch.randn(3, 5), "logits": torch.randn(3, 4)},
                                folder / "wrong_d.safetensors")
    labels = train.labels.clone()
    labels[2] = 9
    safetensors.torch.save_file({"features": train.features, "logits": train.logits, "labels": labels},
                                folder / "badlabels.safetensors")
    (folder / "short.txt").write_text("one\ntwo\n")
    paths = dict(fit=folder / "fit.safetensors", test=folder / "test.safetensors",
                 missing=folder / "missing.safetensors",
                 garbage=folder / "garbage.safetensors", nolabels_wrong_d=folder / "wrong_d.safetensors",
                 badlabels=folder / "badlabels.safetensors", short_txt=folder / "short.txt", o=folder / "out")
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"exemplar {args[0]}: error: "), err
    assert pytest.importorskip("re").search(message, err), err
    assert not Path(f"{paths['o']}.csv").exists()


def test_console_script_help_for_every_command():
    script = Path(sys.executable).with_name("exemplar")
    if not script.exists():
        pytest.skip("the console script is installed by pip install (scripts/setup.sh)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="100"))
    assert done.returncode == 0 and done.stdout.startswith("usage: exemplar"), done.stderr


@pytest.mark.parametrize("command", ["fit", "topk", "self-influence", "report"])
def test_help_of_every_command_shows_its_defaults(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: exemplar") and "-o OUTPUT" in out
    assert "(default: " in out, out


def test_fit_says_what_it_fitted(files, capsys, tmp_path):
    folder, *_ = files
    assert main(["fit", str(folder / "train.safetensors"), "-o", str(tmp_path / "f.safetensors"),
                 "--curvature", "kfac"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fitted kfac curvature (damping 0.001) on N=80 training examples (D=6, C=4); wrote ")
    assert "Attributor(" not in out


def test_evaluate_equals_the_api(files, capsys):
    folder, train, test, attr = files
    fit, tests = str(folder / "fit.safetensors"), str(folder / "test.safetensors")
    pytest.importorskip("pandas")
    with pytest.warns(UserWarning, match="not the minimiser"):  # the fixture's layer is random
        assert main(["evaluate", fit, tests, "-o", str(folder / "lds.csv"), "--subsets", "6",
                     "--methods", "if,grad_dot", "--job", str(folder / "job")]) == 0
    printed = capsys.readouterr().out
    assert "6 retrains (subsets) of N = 80, 6 usable; weight decay 0.001" in printed
    with pytest.warns(UserWarning):
        truth = exemplar.retrain_head(train, test, 1e-3, weight=attr.theta[:, :-1], bias=attr.theta[:, -1],
                                      subsets=6)
    expected = exemplar.lds(attr, test, truth, ("if", "grad_dot"))
    import pandas

    table = pandas.read_csv(folder / "lds.csv")
    assert table.method.tolist() == ["if", "grad_dot"]
    assert table.lds.tolist() == pytest.approx([c.value for c in expected.methods.values()], abs=1e-6)
    with pytest.warns(UserWarning):  # the job folder answers the second run; a report this time
        assert main(["evaluate", fit, tests, "-o", str(folder / "lds.html"), "--subsets", "6",
                     "--methods", "if,grad_dot", "--job", str(folder / "job")]) == 0
    assert "Counterfactual check: LDS" in (folder / "lds.html").read_text()
    with pytest.warns(UserWarning):
        assert main(["evaluate", fit, tests, "-o", str(folder / "loo.csv"), "--remove", "5", "--methods", "if"]) == 0
    assert pandas.read_csv(folder / "loo.csv").columns.tolist()[:2] == ["method", "leave_one_out"]
    assert main(["evaluate", fit, tests, "-o", str(folder / "x.csv"), "--fraction", "1.5"]) == 2
    assert "exemplar evaluate: error: fraction must be a number in (0, 1), got 1.5" in capsys.readouterr().err
    assert main(["evaluate", fit, tests, "-o", str(folder / "y.csv"), "--weight-decay", "0"]) == 2
    assert "weight_decay must be a finite number > 0" in capsys.readouterr().err


def test_evaluate_checks_the_job_folder_before_any_work(files, capsys, tmp_path):
    folder, *_ = files
    fit, tests = str(folder / "fit.safetensors"), str(folder / "test.safetensors")
    for job, output, message in [(fit, tmp_path / "a.csv", "--job .*is a file"),
                                 (tmp_path / "b.html", tmp_path / "b.html", "--job .*is also the output"),
                                 (tests, tmp_path / "c.csv", "--job .*is a file")]:
        assert main(["evaluate", fit, tests, "-o", str(output), "--subsets", "6", "--job", str(job)]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not output.exists()


def test_fit_options_and_defaults_come_from_settings():
    args = exemplar.cli.parser().parse_args(["fit", "train.safetensors", "-o", "fit.safetensors"])
    defaults = exemplar.Settings()
    for name in ("curvature", "damping", "kfac_damping", "rps_lambda", "lje_step", "rank"):
        assert getattr(args, name) == getattr(defaults, name), name
    args = exemplar.cli.parser().parse_args(["fit", "t", "-o", "f", "--rank", "auto", "--curvature", "ekfac"])
    assert (args.rank, args.curvature) == ("auto", "ekfac")
