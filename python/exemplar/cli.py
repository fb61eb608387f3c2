"""exemplar on the command line, over saved features, for pipelines that
already have a model's last-layer inputs (embeddings) and logits.

Input files are safetensors with tensors "features" (N, D) float32/float64,
"logits" (N, C) and "labels" (N,) integer (optional for test files: without
them each prediction is explained); a training file may also hold the layer
as "weight" (C, D) and "bias" (C,), which RPS-LJE needs and RPS-l2 starts from.

    exemplar fit train.safetensors -o fit.safetensors --curvature ekfac --methods if,theta_relatif
    exemplar topk fit.safetensors test.safetensors -k 10 --method theta_relatif -o top.parquet
    exemplar self-influence fit.safetensors -o suspects.csv --top 100
    exemplar report fit.safetensors test.safetensors -o report.html --methods if,theta_relatif
    exemplar evaluate fit.safetensors test.safetensors -o lds.csv --methods if,theta_relatif --subsets 100
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

import torch

from . import methods
from .analysis.debugging import suspicion_order
from .data import LastLayerData
from .engine import Attributor, Settings
from .progress import Progress
from .report.display import method_name
from .results import Explanation, TopK

OUTPUTS = (".safetensors", ".csv", ".parquet")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def read_data(path, need_labels: bool, name: str) -> tuple[LastLayerData, dict[str, torch.Tensor]]:
    """(LastLayerData, the file's other tensors) from a safetensors file."""
    import safetensors.torch

    if not Path(path).is_file():
        raise CommandError(f"{name} file {path} does not exist")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as err:  # the format's own errors vary by version
        raise CommandError(f"{name} file {path} is not a safetensors file ({err})") from None
    missing = [key for key in ("features", "logits") + (("labels",) if need_labels else ()) if key not in tensors]
    if missing:
        raise CommandError(f"{name} file {path} has no tensor {missing} (it holds {sorted(tensors)}); it needs "
                           "'features' (N, D), 'logits' (N, C)" + (" and 'labels' (N,)" if need_labels else
                                                                    " and optionally 'labels' (N,)"))
    try:
        data = LastLayerData(tensors.pop("features"), tensors.pop("logits"), tensors.pop("labels", None))
    except (TypeError, ValueError) as err:
        raise CommandError(f"{name} file {path}: {err}") from None
    return data, tensors


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        try:
            methods.get(m)
        except ValueError as err:
            raise CommandError(str(err)) from None
    return names


# What each table format needs beyond the core install (the "tables" extra: pip install 'exemplar[tables]').
TABLE_PACKAGES = {".csv": ("pandas",), ".parquet": ("pandas", "pyarrow")}


def _output(args, allowed=OUTPUTS, inputs=()) -> Path:
    """args.output checked before any work: its suffix, its folder, that it is
    none of the command's `inputs` (same file, however reached), that it
    does not exist unless --force, and that its format's packages import."""
    path = Path(args.output)
    if path.suffix not in allowed:
        raise CommandError(f"output {path} must end in one of {', '.join(allowed)}")
    if not path.parent.is_dir():
        raise CommandError(f"output folder {path.parent} does not exist")
    for given in (Path(p) for p in inputs if p is not None):
        if path.resolve() == given.resolve() or (path.exists() and given.exists() and path.samefile(given)):
            raise CommandError(f"output {path} is also an input ({given}): write to another file")
    if path.exists() and not args.force:
        raise CommandError(f"output {path} exists: pass --force to replace it, or write to another file")
    for package in TABLE_PACKAGES.get(path.suffix, ()):
        try:
            importlib.import_module(package)
        except ImportError:
            raise CommandError(f"writing {path.suffix} needs {package}: pip install {package} "
                               "(or pip install 'exemplar[tables]')") from None
    return path


def _job_folder(job, output: Path) -> None:
    """--job checked with the other paths before any work: a folder, neither a file nor the output."""
    if job is None:
        return
    path = Path(job)
    if path.exists() and not path.is_dir():
        raise CommandError(f"--job {path} is a file: --job names a folder that keeps the retrains (new, or one "
                           "an earlier run of this job wrote)")
    if path.resolve() == output.resolve():
        raise CommandError(f"--job {path} is also the output -o {output}: the job folder and the output must differ")


def _write_table(frame, path: Path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def fit(args) -> None:
    """exemplar fit: an Attributor over a training file, saved to -o."""
    train, extra = read_data(args.train, True, "training")
    weight, bias = extra.get("weight"), extra.get("bias")
    try:
        attr = Attributor(train, curvature=args.curvature, damping=args.damping, kfac_damping=args.kfac_damping,
                          rank=args.rank, rps_lambda=args.rps_lambda, lje_step=args.lje_step, weight=weight,
                          bias=True if bias is None else bias, progress=args.progress)
        for m in _methods(args.methods):
            attr.prepare(m)
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from None
    attr.save(_output(args, (".safetensors",), (args.train,)))
    st = attr.settings
    print(f"fitted {st.curvature} curvature (damping {st.damping:g}) on N={len(train)} training examples "
          f"(D={train.num_features}, C={train.num_classes}); wrote {args.output}")


def _load(path) -> Attributor:
    if not Path(path).is_file():
        raise CommandError(f"fit file {path} does not exist; make one with `exemplar fit`")
    try:
        return Attributor.load(path)
    except ValueError as err:
        raise CommandError(f"fit file {err}") from None


def _explain(attr: Attributor, test: LastLayerData, k: int, method: str, opponents: int, test_rows: int,
             progress) -> Explanation:
    """The Explanation of every test, block by block of test_rows with a progress line."""
    parts = []
    bar = Progress(f"topk {method}", -(-len(test) // test_rows), progress)
    for start in range(0, len(test), test_rows):
        parts.append(attr.explain(test[start:start + test_rows], k, method, opponents))
        bar.update()
    bar.close()
    joined = {key: torch.cat([getattr(p, key) for p in parts])
              for key in ("indices", "scores", "labels", "predictions", "probabilities")}
    against = None if not opponents else TopK(torch.cat([p.opponents.values for p in parts]),
                                              torch.cat([p.opponents.indices for p in parts]))
    return Explanation(**joined, method=method, opponents=against)


def _checked(attr: Attributor, test: LastLayerData, path, k: int, opponents: int) -> None:
    try:
        attr.check_test(test)
    except (TypeError, ValueError) as err:
        raise CommandError(f"test file {path}: {err}") from None
    for name, value in (("-k", k), ("--opponents", opponents)):
        if value > attr.num_train:
            raise CommandError(f"{name} must be at most N={attr.num_train} training examples, got {value}")


def topk(args) -> None:
    """exemplar topk: proponents (and opponents) of a test file by a saved fit."""
    attr = _load(args.fit)
    test, _ = read_data(args.test, False, "test")
    method = _methods(args.method)[0]
    _checked(attr, test, args.test, args.k, args.opponents)
    out = _output(args, OUTPUTS, (args.fit, args.test))
    e = _explain(attr, test, args.k, method, args.opponents, args.test_rows, args.progress)
    if out.suffix == ".safetensors":
        import safetensors.torch

        tensors = {"values": e.scores, "indices": e.indices, "explained": e.labels, "predictions": e.predictions}
        if e.opponents is not None:
            tensors.update({"opponent_values": e.opponents.values, "opponent_indices": e.opponents.indices})
        safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out),
                                    metadata={"method": method, "k": str(args.k)})
    else:
        _write_table(e.to_pandas(attr.train.labels), out)
    print(f"top-{args.k} {method} for {len(test)} tests written to {out}")


def self_influence(args) -> None:
    """exemplar self-influence: the training examples most worth relabelling."""
    attr = _load(args.fit)
    method = _methods(args.method)[0]
    out = _output(args, OUTPUTS, (args.fit,))
    scores = attr.self_influence(method)
    order = suspicion_order(scores, method)[:args.top or None]
    if out.suffix == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file({"self_influence": scores.contiguous().cpu(), "order": order.contiguous()},
                                    str(out), metadata={"method": method})
    else:
        import pandas

        # rank 1 is the most suspicious, as in the report
        frame = pandas.DataFrame({"rank": range(1, len(order) + 1), "train_index": order.numpy(),
                                  "label": attr.train.labels[order].cpu().numpy(),
                                  "self_influence": scores[order].cpu().double().numpy()})
        _write_table(frame, out)
    print(f"self-influence ({method}) of {attr.num_train} training examples written to {out}, most suspicious first")


def _inputs(path, count: int, name: str):
    """Texts (one per line of a .txt file) or images (a safetensors file's
    "images" tensor) to show in the report, or None."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{name} inputs file {path} does not exist")
    if path.suffix == ".txt":
        items = path.read_text(encoding="utf-8").splitlines()
    elif path.suffix == ".safetensors":
        import safetensors.torch

        items = safetensors.torch.load_file(str(path)).get("images")
        if items is None:
            raise CommandError(f"{name} inputs file {path} has no tensor 'images' (N, ...)")
    else:
        raise CommandError(f"{name} inputs file {path} must be .txt (one text per line) or .safetensors ('images')")
    if len(items) != count:
        raise CommandError(f"{name} inputs file {path} has {len(items)} entries, but there are {count} {name} examples")
    return items


def report(args) -> None:
    """exemplar report: an HTML report of a test file's explanations."""
    from .report.html import report as write_report

    attr = _load(args.fit)
    test, _ = read_data(args.test, False, "test")
    names = _methods(args.methods)
    _checked(attr, test, args.test, args.k, args.opponents)
    out = _output(args, (".html",), (args.fit, args.test, args.test_inputs, args.train_inputs))
    explanations = {method_name(m): _explain(attr, test, args.k, m, args.opponents, args.test_rows, args.progress)
                    for m in names}
    class_names = None if args.class_names is None else args.class_names.split(",")
    if class_names is not None and len(class_names) != attr.num_classes:
        raise CommandError(f"--class-names has {len(class_names)} names for C={attr.num_classes} classes")
    suspects = attr.self_influence(args.suspects_method) if args.suspects else None
    write_report(out, explanations, _inputs(args.test_inputs, len(test), "test"),
                 _inputs(args.train_inputs, attr.num_train, "training"), train_labels=attr.train.labels,
                 test_labels=test.labels, class_names=class_names, self_influence=suspects,
                 suspects=args.suspects or 1, self_influence_method=args.suspects_method)
    print(f"wrote {out.resolve()}")


def evaluate(args) -> None:
    """exemplar evaluate: LDS (or leave-one-out) of methods against retraining the head."""
    from .analysis.counterfactual import lds, leave_one_out
    from .analysis.retraining import retrain_head

    attr = _load(args.fit)
    test, _ = read_data(args.test, False, "test")
    names = _methods(args.methods)
    _checked(attr, test, args.test, 1, 0)
    out = _output(args, (".csv", ".parquet", ".html"), (args.fit, args.test))
    _job_folder(args.job, out)
    decay = attr.settings.damping if args.weight_decay is None else args.weight_decay
    layer = {} if attr.theta is None else {"weight": attr.theta[:, :attr.num_features],
                                           "bias": attr.theta[:, -1] if attr.settings.bias else False}
    truth = retrain_head(attr.train, test, decay, **layer, subsets=args.subsets, fraction=args.fraction,
                         remove=args.remove or None, seed=args.seed, target=args.target, out=args.job,
                         progress=args.progress)
    result = (leave_one_out if args.remove else lds)(attr, test, truth, names)
    if out.suffix == ".html":
        from .report.html import report as write_report

        explained = {method_name(m): attr.explain(test, 5, m) for m in names[:2]}
        write_report(out, explained, train_labels=attr.train.labels, test_labels=test.labels, evaluation=result)
    else:
        _write_table(result.to_pandas(), out)
    print(f"{truth.summary()}; weight decay {decay:g}\n{result.to_markdown()}\nwritten to {out}")


def _count(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


class ShowDefaults(argparse.HelpFormatter):
    """--help with each option's default, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not isinstance(action.default, (bool, type(None))) and action.default != argparse.SUPPRESS and \
                action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(prog="exemplar", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text):
        p = commands.add_parser(name, help=help_text, description=help_text, formatter_class=ShowDefaults)
        p.set_defaults(run=fn)
        shown = p.add_mutually_exclusive_group()
        shown.add_argument("--progress", action="store_true", default=None,
                           help="show progress even when stderr is not a terminal")
        shown.add_argument("--quiet", dest="progress", action="store_false", help="never show progress")
        p.add_argument("--force", action="store_true",
                       help="replace the output if it exists (never an input: that is always refused)")
        return p

    p = command("fit", fit, "fit an Attributor on a training file and save it")
    p.add_argument("train",
                   help="safetensors: features (N, D), logits (N, C), labels (N,) [, weight (C, D), bias (C,)]")
    p.add_argument("-o", "--output", required=True, help="where to save the fit (.safetensors)")
    for option in dataclasses.fields(Settings):  # each setting's option, default and help from Settings
        if "option" in option.metadata:
            p.add_argument("--" + option.name.replace("_", "-"), default=option.default,
                           help=option.metadata["help"], **option.metadata["option"]())
    p.add_argument("--methods", default="theta_relatif",
                   help=f"methods to fit now, comma-separated, of {', '.join(methods.names())}")

    def query_options(p):
        p.add_argument("-k", type=_count(1), default=5, help="proponents per test")
        p.add_argument("--opponents", type=_count(0), default=0, help="also this many opponents per test")
        p.add_argument("--test-rows", type=_count(1), default=256, help="tests per step (progress granularity)")

    p = command("topk", topk, "the top-k training examples for each test example")
    p.add_argument("fit", help="a file from `exemplar fit`")
    p.add_argument("test", help="safetensors: features (T, D), logits (T, C) [, labels (T,): the class to explain]")
    p.add_argument("-o", "--output", required=True,
                   help=".safetensors (values, indices (T, k)), or .csv / .parquet (one row per test and rank)")
    p.add_argument("--method", default="theta_relatif", help=f"one of {', '.join(methods.names())}")
    query_options(p)

    p = command("self-influence", self_influence, "training examples ranked by self-influence (label suspects)")
    p.add_argument("fit", help="a file from `exemplar fit`")
    p.add_argument("-o", "--output", required=True, help=".safetensors, .csv or .parquet")
    p.add_argument("--method", default="if", help="if, theta_relatif, l_relatif, grad_dot, grad_cos (by value) "
                                                  "or rps_l2, rps_lje (by magnitude)")
    p.add_argument("--top", type=_count(0), default=0, help="keep the top N rows of the table (0: all)")

    p = command("report", report, "a self-contained HTML report of explanations and suspects")
    p.add_argument("fit", help="a file from `exemplar fit`")
    p.add_argument("test", help="safetensors test file, as for topk")
    p.add_argument("-o", "--output", required=True, help="the .html file to write")
    p.add_argument("--methods", default="if,theta_relatif", help="methods side by side, comma-separated")
    query_options(p)
    p.add_argument("--train-inputs", help="what to show per training example: .txt (one text per line) "
                                          "or .safetensors with 'images' (N, ...)")
    p.add_argument("--test-inputs", help="the same for the test examples")
    p.add_argument("--class-names", help="comma-separated names, one per class")
    p.add_argument("--suspects", type=_count(0), default=24, help="self-influence suspects listed (0: none)")
    p.add_argument("--suspects-method", default="if", help="method for the self-influence page")
    p = command("evaluate", evaluate, "LDS or leave-one-out of methods against retraining the last layer")
    p.add_argument("fit", help="a file from `exemplar fit`")
    p.add_argument("test", help="safetensors test file, as for topk (labels: the class whose log p is measured)")
    p.add_argument("-o", "--output", required=True, help=".csv / .parquet (one row per method) or .html (a report)")
    p.add_argument("--methods", default="if,theta_relatif,grad_dot", help="methods, comma-separated")
    p.add_argument("--weight-decay", type=float, help="the layer's weight decay (default: the fit's damping)")
    p.add_argument("--subsets", type=_count(3), default=100, help="random subsets retrained (LDS)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the training set in each subset")
    p.add_argument("--remove", type=_count(0), default=0, help="leave-one-out over this many random rows instead")
    p.add_argument("--target", choices=("log_prob", "margin", "prob"), default="log_prob")
    p.add_argument("--seed", type=_count(0), default=0, help="seeds the subsets and the bootstrap")
    p.add_argument("--job", help="a folder keeping the retrains, so a killed run resumes")
    return top


def main(argv=None) -> int:
    """Runs one command; returns the exit status (2: bad input, one line on stderr)."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, ValueError) as err:  # bad input, said in one line
        print(f"exemplar {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
