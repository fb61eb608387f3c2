"""Writes docs/api.md, the API reference, from the library's docstrings:

    python docs/api.py            (tests/test_docs.py checks the file is current)
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import exemplar
import exemplar.ops
import exemplar.storage

SECTIONS = [
    ("Data", ["LastLayerData", "LastLayer", "storage.Store", "storage.write_store"]),
    ("Scoring", ["Attributor", "Settings", "Explainer", "METHODS", "INFLUENCE_METHODS", "CURVATURES"]),
    ("Whole network", ["NetworkExplainer"]),
    ("Results", ["TopK", "Explanation", "report", "plot.grid"]),
    ("Selection and data debugging", ["divine", "divine_global", "inspection_order", "flip_labels",
                                      "debug_labels", "Fit"]),
    ("Counterfactual truth: LDS and leave-one-out", ["retrain_head", "retrain_model", "Retraining", "lds",
                                                     "leave_one_out", "Evaluation"]),
    ("Extending and embedding", ["register", "Method", "methods.Context", "curvature.register",
                                 "curvature.Curvature", "TrainOperands", "Query", "General", "Rank1",
                                 "ops.scores", "ops.scores_rank1", "ops.topk", "ops.topk_rank1", "cuda_compiled"]),
]


def resolve(name: str):
    obj = exemplar
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def public_members(cls) -> list[tuple[str, object]]:
    """A class's own public methods and properties, in source order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod))):
            continue
        members.append((name, value))
    return members


def signature(obj) -> str:
    target = obj.__func__ if isinstance(obj, classmethod) else obj
    try:
        text = str(inspect.signature(target))
    except (TypeError, ValueError):
        return ""
    return text.replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()")


def doc(obj) -> str:
    target = obj.__func__ if isinstance(obj, classmethod) else obj.fget if isinstance(obj, property) else obj
    return inspect.getdoc(target) or ""


SECTION_HEADINGS = ("Arguments:", "Returns:", "Raises:")


def markdown(text: str) -> str:
    """A docstring as Markdown: its "Arguments:" / "Returns:" / "Raises:"
    sections become a bold heading and, for arguments, one bullet per
    `name: description` (continuation lines joined), so they do not run
    together as one paragraph."""
    out, section = [], None
    for line in text.splitlines():
        if line.strip() in SECTION_HEADINGS:
            section = line.strip()[:-1]
            while out and not out[-1]:
                out.pop()
            out += ["", f"**{section}**", ""]
            continue
        if section is None or not line.startswith("    "):
            if line and not line.startswith(" "):
                section = None  # unindented prose after a section ends it; a blank line does not
            out.append(line)
            continue
        body = line[4:]
        if section == "Arguments" and not body.startswith(" ") and ": " in body:
            name, rest = body.split(": ", 1)
            out.append(f"- `{name}`: {rest}")
        elif out and out[-1]:
            out[-1] += " " + body.strip()
        else:
            out.append(body.strip())
    return "\n".join(out).strip()


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/api.py`; the design and the math are in "
             "[design.md](design.md). Everything here is importable as `exemplar.NAME`.", ""]
    for title, names in SECTIONS:
        lines += [f"## {title}", ""]
        for name in names:
            obj = resolve(name)
            if not callable(obj):
                lines += [f"### `exemplar.{name}`", "", f"`{obj!r}`", ""]
                continue
            lines += [f"### `exemplar.{name}{signature(obj)}`", "", markdown(doc(obj)), ""]
            if inspect.isclass(obj) and not issubclass(obj, tuple):
                for member, value in public_members(obj):
                    suffix = "" if isinstance(value, property) else signature(value)
                    lines += [f"#### `{name}.{member}{suffix}`", "", markdown(doc(value)), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("api.md")
    path.write_text(render())
    print(f"wrote {path}", file=sys.stderr)
