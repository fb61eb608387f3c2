"""python -m experiments NAME [--quick] [--out FOLDER]   (NAME: an experiment or "all")

Full runs write to results/, quick runs to results-quick/ (never over a full run's results)."""
from __future__ import annotations

import argparse
import json

from . import EXPERIMENTS
from .common import FULL_ROOT, QUICK_ROOT, Results


def run(name: str, quick: bool, out: str | None = None) -> dict:
    experiment, _ = EXPERIMENTS[name]
    out = (QUICK_ROOT if quick else FULL_ROOT) if out is None else out
    results = Results(out, name, quick)
    summary = experiment(quick, results)
    path = results.write()
    (results.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {path}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     epilog="\n".join(f"{k}: {d}" for k, (_, d) in EXPERIMENTS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(EXPERIMENTS) + ["all"])
    parser.add_argument("--quick", action="store_true", help="small settings, <= 2 minutes on 2 CPU cores")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default: {FULL_ROOT}, or {QUICK_ROOT} with --quick)")
    args = parser.parse_args(argv)
    for name in EXPERIMENTS if args.name == "all" else [args.name]:
        run(name, args.quick, args.out)


if __name__ == "__main__":
    main()
