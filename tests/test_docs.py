"""The docs exist and are current: docs/api.md is what docs/api.py generates
from the docstrings, every public name has a docstring that lists its
options, nothing cites a DESIGN.md outside the repository, and the README's
debug_labels snippet runs as written."""
import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import exemplar

REPO = Path(__file__).resolve().parents[1]


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
