"""The docs exist and are current: docs/api.md is what docs/api.py generates
from the docstrings, every public name has a docstring that lists its
options, nothing cites a DESIGN.md outside the repository, and the README's
debug_labels snippet runs as written."""
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import exemplar

REPO = Path(__file__).resolve().parents[2]


def _api_module():
    spec = importlib.util.spec_from_file_location("api_doc", REPO / "docs" / "api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    assert (REPO / "docs" / "api.md").read_text() == _api_module().render(), \
        "docs/api.md is stale: run python docs/api.py"


def test_every_public_name_is_documented_in_the_reference():
    api = _api_module()
    listed = {name for _, names in api.SECTIONS for name in names}
    modules = ("methods", "curvature", "plot")
    missing = [name for name in exemplar.__all__ if name not in listed and name not in modules]
    assert not missing, f"add to docs/api.py SECTIONS: {missing}"
    for _, names in api.SECTIONS:
        for name in names:
            obj = api.resolve(name)
            if callable(obj):
                assert api.doc(obj).strip(), f"exemplar.{name} has no docstring"
            if inspect.isclass(obj) and not issubclass(obj, tuple):
                for member, value in api.public_members(obj):
                    assert api.doc(value).strip(), f"exemplar.{name}.{member} has no docstring"


def test_every_public_name_in_every_module_has_a_docstring():
    """Not only what exemplar/__init__ hands on: every public function, class
    and method defined in any module of any subpackage (a protocol's
    implementations inherit its docstrings)."""
    missing = []
    for info in pkgutil.walk_packages(exemplar.__path__, "exemplar."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.append(f"{info.name}.{name}")
            for member in (dir(obj) if inspect.isclass(obj) else ()):
                value = inspect.getattr_static(obj, member)
                if member.startswith("_") or member not in vars(obj):
                    continue
                target = value.__func__ if isinstance(value, (classmethod, staticmethod)) else \
                    value.fget if isinstance(value, property) else value
                if inspect.isfunction(target) and not inspect.getdoc(getattr(obj, member)):
                    missing.append(f"{info.name}.{name}.{member}")
    assert len(list(pkgutil.walk_packages(exemplar.__path__, "exemplar."))) > 30  # the subpackages' modules were found
    assert not missing, missing


def test_docstrings_list_the_options():
    attributor = inspect.getdoc(exemplar.Attributor)
    assert all(f'"{c}"' in attributor for c in exemplar.CURVATURES)
    assert "exemplar.METHODS" in inspect.getdoc(exemplar.Attributor.scores)
    assert "Indices are rows of the training set" in inspect.getdoc(exemplar.Attributor.topk)
    divine = inspect.getdoc(exemplar.divine)
    assert all(f'"{r}"' in divine for r in ("facility_location", "sum_redundancy", "mmd"))
    assert "training rows" in inspect.getdoc(exemplar.Explanation)


def test_nothing_cites_a_design_file_outside_the_repository():
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *(REPO / "python" / "exemplar").rglob("*.py")]
    offenders = [str(f.relative_to(REPO)) for f in files if re.search(r"(?<!docs/)DESIGN\.md", f.read_text())]
    assert not offenders, offenders
    for cited in re.findall(r"\]\(([^)#:]+)[)#]", (REPO / "README.md").read_text()):
        assert (REPO / cited).exists(), f"README links to {cited}, which is not in the repository"


def test_readme_debug_labels_snippet_runs(capsys):
    pytest.importorskip("sklearn")
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    snippet, = [b for b in blocks if "exemplar.debug_labels(retrain" in b]
    exec(compile(snippet, "README.md", "exec"), {})
    table = capsys.readouterr().out
    found = [float(x) for x in re.findall(r"^\| 0\.50 \| ([0-9.]+) \| ([0-9.]+) \|$", table, re.M)[0]]
    assert found[0] > found[1] + 0.2, table  # self-influence finds flipped labels far better than chance


# ------------------------------------------------ every code block in the docs runs

# Blocks not run here, and who runs them instead (a new block must be run here or added to this list).
RUN_ELSEWHERE = {
    "bash scripts/setup.sh": ".ci/run runs set-up, the demo and the tests on a fresh clone",
    "export CUDA_HOME": "needs a CUDA toolkit and a CUDA torch (bench/gpu.sh on a GPU machine)",
    "cmake -S . -B build": ".ci/run's CMake libtorch build and ctest",
    "torchrun --nproc-per-node": "the explain.py block after it runs here in a 1-process group",
    "examples/imdb_text.py": "tests/models/test_zoo.py runs --quick; the full run is docs/imdb.md's measurement",
}


def _blocks(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", path.read_text(), re.S)


def _stand_ins(tmp_path):
    """Small real objects under the names the docs' snippets assume: a digits
    MLP and its loader and images, its last layer's features, a tiny BERT (saved,
    with a tokenizer), an XGBoost booster."""
    torch = pytest.importorskip("torch")
    sklearn = pytest.importorskip("sklearn.datasets")
    transformers = pytest.importorskip("transformers")
    xgb = pytest.importorskip("xgboost")
    X, y = sklearn.load_digits(return_X_y=True)
    images, labels = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images[:300]), labels[:300]).backward()
        optimizer.step()
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:300], labels[:300]),
                                               batch_size=100)
    hook = exemplar.LastLayer(model)
    train, test = hook.collect(train_loader), hook.collect([images[300:306]])
    torch.save((test.features, test.logits), tmp_path / "test.pt")

    words = ["good", "bad", "film", "plot", "great", "awful", "actor", "boring"]
    config = transformers.BertConfig(vocab_size=len(words) + 3, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                     num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")

    def tokenizer(texts, return_tensors=None, padding=None):
        ids = [[1] + [3 + words.index(w) if w in words else 2 for w in t.split()][:14] for t in texts]
        ids = torch.tensor([i + [0] * (15 - len(i)) for i in ids])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    train_texts = [f"{words[i % 8]} {words[(3 * i) % 8]} film" for i in range(40)]
    train_labels = torch.tensor([i % 2 for i in range(40)])
    encoded = tokenizer(train_texts)
    tokenized = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                  "labels": train_labels[i]} for i in range(40)]
    booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 2}, xgb.DMatrix(
        X[:200], label=y[:200] % 3), 3)
    return {"train_features": train.features, "train_logits": train.logits, "train_labels": train.labels,
            "test_features": test.features, "test_logits": test.logits, "model": model,
            "train_loader": train_loader, "test_images": images[300:306], "train_images": images[:300],
            "names": [str(d) for d in range(10)], "bird": 3, "model_path": str(tmp_path / "bert"),
            "tokenized_train": tokenized, "train_set": tokenized, "tokenizer": tokenizer,
            "texts": ["great film", "awful plot boring"], "train_texts": train_texts,
            "review_labels": train_labels, "booster": booster, "X": X[:200], "y": y[:200] % 3,
            "attr": exemplar.Attributor(train), "test": test, "exemplar": exemplar, "torch": torch}


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "docs/imdb.md", "docs/network.md"])
def test_every_code_block_in_the_docs_runs(doc, tmp_path, monkeypatch, capsys):
    """Python blocks run in order in one namespace per document, on the stand-ins
    above (the README says which names its snippets assume); the command line
    block runs its commands; every other block says who runs it."""
    monkeypatch.chdir(tmp_path)
    names = _stand_ins(tmp_path)
    if doc == "docs/imdb.md":
        names["train_labels"] = names["review_labels"]
        names["model"] = __import__("transformers").BertForSequenceClassification.from_pretrained(
            names["model_path"])
    ran = 0
    for language, code in _blocks(REPO / doc):
        if language == "python":
            if "init_process_group" in code:
                monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
                monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
                monkeypatch.setenv("RANK", "0")
                monkeypatch.setenv("WORLD_SIZE", "1")
            try:
                exec(compile(code, doc, "exec"), names)
            finally:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
            ran += 1
        elif language == "bash" and code.lstrip().startswith("exemplar "):
            _run_cli_block(code, names, tmp_path)
            ran += 1
        elif language in ("bash", "sh"):
            assert any(key in code for key in RUN_ELSEWHERE), f"{doc}: a {language} block nobody runs:\n{code}"
    assert ran, doc


def _run_cli_block(code: str, names: dict, tmp_path) -> None:
    """The README's command-line block, each line as printed, with the venv's scripts on PATH."""
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"features": names["train_features"], "logits": names["train_logits"],
                                 "labels": names["train_labels"]}, tmp_path / "train.safetensors")
    safetensors.torch.save_file({"features": names["test_features"], "logits": names["test_logits"]},
                                tmp_path / "test.safetensors")
    (tmp_path / "train.txt").write_text("\n".join(f"training digit {i}" for i in range(len(names["train_labels"]))))
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "exemplar").exists():
        pytest.skip("the console script is installed by pip install (scripts/setup.sh)")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for line in (line.split("#")[0].strip() for line in code.splitlines()):
        if line:
            done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, (line, done.stderr)
    assert torch.is_tensor(safetensors.torch.load_file(tmp_path / "fit.safetensors")["train.features"])


# Files exemplar writes at run time, and a user's script the README names.
NAMED_NOT_SHIPPED = {"manifest.json", "job.json", "explain.py"}


def test_every_file_the_docs_name_exists():
    """A file the docs (and the C++ sources' comments) name is a file of the
    repository: a path from the root, the package, csrc/, tests/, bench/ or
    docs/, or a bare file name that some file has (placeholders in capitals,
    such as results/NAME/, and files written at run time aside)."""
    names = {p.name for p in REPO.rglob("*") if p.is_file() and not {".venv", ".git", "build"} & set(p.parts)}
    roots = [REPO, REPO / "python" / "exemplar", REPO / "csrc", REPO / "tests", REPO / "bench", REPO / "docs"]
    token = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|cpp|cu|h|md|sh|json))\b")
    missing = []
    for text in [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "csrc").rglob("*.*")]:
        body = text.read_text()
        if text.suffix in (".cpp", ".h", ".cu"):  # comments only, not the #includes
            body = "\n".join(line for line in body.splitlines() if line.strip().startswith("//"))
        missing += [f"{text.relative_to(REPO)}: {name}" for name in set(token.findall(body))
                    if name not in NAMED_NOT_SHIPPED and "NAME" not in name
                    and not (any((root / name).exists() for root in roots) if "/" in name else name in names)]
    assert not missing, sorted(missing)
