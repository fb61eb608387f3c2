"""The package's shape (docs/design.md §4): laid out by extension point, with
imports running one way — ops <- curvature <- methods <- engine <- models /
analysis / report <- cli — no import circle, and no module so long that it
holds several jobs."""
import ast
import pathlib

import exemplar

LIBRARY = pathlib.Path(exemplar.__file__).parent
# Each part of the package and the floor it stands on: a part imports only
# parts on lower floors (and itself).
FLOORS = {"data": 0, "progress": 0, "results": 0, "_C": 0,
          "ops": 1, "storage": 1,
          "curvature": 2, "testing": 2,
          "methods": 3,
          "engine": 4,
          "models": 5, "analysis": 5,
          "report": 6,
          "cli": 7, "demo": 7, "__init__": 7}
MAX_LINES = 400


def _modules():
    return sorted(p for p in LIBRARY.rglob("*.py"))


def _part(path: pathlib.Path) -> str:
    return path.relative_to(LIBRARY).parts[0].removesuffix(".py")


def _imports(path: pathlib.Path) -> set[str]:
    """Modules of the package that `path` imports, as dotted paths below exemplar."""
    package = path.relative_to(LIBRARY).with_suffix("").parts[:-1]  # the importing module's package
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("exemplar."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import y
                base, below = package[:len(package) - node.level + 1], (node.module or "").split(".")
            elif (node.module or "").split(".")[0] == "exemplar":  # from exemplar.x import y
                base, below = (), node.module.split(".")[1:]
            else:
                continue
            parts = base + tuple(filter(None, below))
            if parts == base:  # from . import y: each y is a module (or a name) of the package itself
                out.update(".".join(parts + (a.name,)) for a in node.names)
            else:
                out.add(".".join(parts))
    return out


def test_every_part_of_the_package_has_a_floor():
    assert {_part(p) for p in _modules()} <= set(FLOORS)


def test_imports_run_one_way():
    offenders = []
    for path in _modules():
        part = _part(path)
        for target in _imports(path):
            other = target.split(".")[0]
            if other != part and FLOORS[other] >= FLOORS[part]:
                offenders.append(f"{path.relative_to(LIBRARY)} imports {target} (floor {FLOORS[other]} "
                                 f">= {FLOORS[part]})")
    assert not offenders, offenders


def test_no_import_circle_inside_a_part():
    graph = {}
    for path in _modules():
        name = ".".join(path.relative_to(LIBRARY).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {t for t in _imports(path) if t != name}
    names = set(graph)
    graph = {n: {t if t in names else t.rsplit(".", 1)[0] for t in ts} & names for n, ts in graph.items()}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import circle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for target in sorted(graph[node]):
            # a package's face (__init__) re-exports its own modules: that is not a circle
            if not target.startswith(node + ".") and not node.startswith(target + "."):
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(LIBRARY)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_engine_holds_no_isinstance_on_storage_backends():
    """Backends are picked once (storage.training_set); the engine sees only the protocol."""
    backends = ("Store", "InMemory", "TensorBlocks", "StoreBlocks", "MemoryColumns", "StoreColumns",
                "LastLayerData", "PathLike", "str")
    offenders = [f"{path.name}:{n}" for path in (LIBRARY / "engine").glob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "isinstance(" in line and any(f"{b}" in line.split("isinstance(", 1)[1] for b in backends)
                 and "isinstance(key, str)" not in line]
    assert not offenders, offenders
