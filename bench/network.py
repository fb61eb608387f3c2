"""Whole-network attribution against kronfluence (EK-FAC, every layer) on the
same model, data and retraining protocol, one run, this machine:

* the model: experiments/lds.py's MLP 64-64-10 (tanh, float64) on digits,
  trained end to end by full-batch L-BFGS (weight decay 1e-3 on every
  parameter); ground truth: 100 random halves each retrained fully from
  the trained weights (experiments.lds.whole_model_truth, a resumable job);
* exemplar.NetworkExplainer per curvature ("exact" / "ekfac" / "kfac") and
  Fisher, and last-layer exemplar.Attributor (exact) for reference;
* kronfluence run by its own venv's python (bench/kronfluence_peer.py), never
  over exemplar's pinned torch; create it with
      python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 torchvision==0.28.0 kronfluence==1.0.1

Each row: LDS of IF on the 597 test digits (Spearman over the retrains, mean
over tests), and the seconds and peak RSS of the whole call "fit + top-10 for
1,000 queries" (the last 1,000 digits), each in a fresh process.

    .venv/bin/python bench/network.py [--peer .venv-peers/bin/python] [--truth FOLDER] [--smoke]

Prints one JSON line per row (bench/RESULTS.md, "Whole-network attribution")."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/

import exemplar  # noqa: E402
from exemplar.analysis.counterfactual import average_ranks, pearson_rows  # noqa: E402
from experiments.lds import whole_model_setup, whole_model_truth  # noqa: E402

DAMPING = 1e-3  # the weight decay the MLP was trained with
BATCH = 256
ROWS = [("exact", "expected"), ("ekfac", "expected"), ("kfac", "expected"), ("ekfac", "sampled")]


def batches(X, y):
    return [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(y), BATCH)]


def lds_of(scores_or_predicted: torch.Tensor, truth, masks=True) -> float:
    """Mean over tests of the Spearman correlation between predicted and retrained outputs."""
    used = truth.usable
    predicted = scores_or_predicted.double() @ truth.masks[used].double().T if masks else scores_or_predicted
    return float(pearson_rows(average_ranks(predicted), average_ranks(truth.outputs[used].T)).nanmean())


def ours(curvature: str, fisher: str, job: Path, out: Path) -> None:
    """Run by `--one` in a fresh process: fit + top-10 for the queries, timed; then
    the subset predictions for LDS (untimed) of the job's masks."""
    job = torch.load(job, weights_only=False)
    (Xtr, ytr), (Xq, yq), (Xte, yte) = job["train"], job["queries"]["queries"], job["queries"]["test"]
    start = time.monotonic()
    explainer = exemplar.NetworkExplainer(job["model"], batches(Xtr, ytr), curvature=curvature, fisher=fisher,
                                          damping=DAMPING, progress=False)
    fit_s = time.monotonic() - start
    top = explainer.topk(batches(Xq, yq), 10, "if")
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tests = explainer.check_test(batches(Xte, yte))
    torch.save({"fit_s": fit_s, "seconds": seconds, "top10": top.indices, "peak_rss_mb": peak,
                "predicted": explainer.subset_scores(tests, job["masks"], "if"),
                "grad_dot": explainer.subset_scores(tests, job["masks"], "grad_dot")}, out)


def fresh(command: list[str], job: dict) -> dict:
    """Runs command + [job file, out file] in a new process and reads back what it saved."""
    with tempfile.TemporaryDirectory() as folder:
        job_file, out = Path(folder) / "job.pt", Path(folder) / "out.pt"
        torch.save(job, job_file)
        subprocess.run(command + [str(job_file), str(out)], check=True)
        return torch.load(out, weights_only=False)


def dense_rows(setup, truth) -> list[dict]:
    """What block-diagonal curvature costs: IF with dense (4,810 x 4,810) float64 curvatures
    built from torch.func (testing/network_reference.py), whole and block-diagonal."""
    from torch.func import functional_call

    from exemplar.testing import network_reference as ref

    model, names = setup.model, ["0", "2"]
    train = ref.layer_gradients(model, names, setup.Xtr, setup.ytr)
    test = ref.layer_gradients(model, names, setup.Xte, setup.yte)
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([v.flatten() for v in params.values()])

    def loss(theta):
        parts, offset = {}, 0
        for key, v in params.items():
            parts[key], offset = theta[offset:offset + v.numel()].view_as(v), offset + v.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, parts, (setup.Xtr,)), setup.ytr)

    # parameters in model order are [W0, b0, W2, b2]; the reference's per-layer gradients are [W | b] row-major
    def per_layer(g):
        return torch.cat([g[:, :, :-1].flatten(1), g[:, :, -1]], 1)

    hessian = torch.autograd.functional.hessian(loss, flat)
    whole_train = torch.cat([per_layer(g) for g in train], 1)
    whole_test = torch.cat([per_layer(g) for g in test], 1)
    blocks = ref.fisher(model, names, setup.Xtr, setup.ytr, "expected")
    rows = [("full Hessian (all 4,810 parameters)", [whole_train], [whole_test], [hessian])]
    rows.append(("block-diagonal Gauss-Newton per layer (what \"exact\" computes)", train, test, blocks))
    out = []
    for name, tr, te, curvatures in rows:
        scores = ref.scores(tr, te, curvatures, DAMPING, "if")
        out.append({"row": f"dense float64 IF, {name}", "lds": round(lds_of(scores, truth), 3)})
    return out


def job_of(setup, truth) -> dict:
    """What a fresh process needs: the model, the training set, the 1,000 queries (the last 1,000
    digits), the test digits, the damping, the batch size and the retrains' masks."""
    X, y = torch.cat([setup.Xtr, setup.Xte]), torch.cat([setup.ytr, setup.yte])
    return {"model": setup.model, "train": (setup.Xtr, setup.ytr), "damping": DAMPING, "batch": BATCH,
            "queries": {"queries": (X[-1000:], y[-1000:]), "test": (setup.Xte, setup.yte)},
            "masks": truth.masks[truth.usable]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", default=None, help="the python of a venv with kronfluence (skipped if absent)")
    parser.add_argument("--truth", default=None, help="a job folder for the retrains (resumable; default: none)")
    parser.add_argument("--smoke", action="store_true", help="5 retrains of 20 L-BFGS steps: CI's check that it runs")
    parser.add_argument("--one", nargs=4, metavar=("CURVATURE", "FISHER", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return ours(args.one[0], args.one[1], Path(args.one[2]), Path(args.one[3]))
    setup = whole_model_setup()
    iterations, subsets = (20, 5) if args.smoke else (500, 100)
    start = time.monotonic()
    truth = whole_model_truth(setup, iterations, subsets, out=args.truth)
    rows = [{"row": "truth", "retrains": subsets, "seconds": round(time.monotonic() - start, 1)}]
    hook = exemplar.LastLayer(setup.model)
    train_head = hook.collect(batches(setup.Xtr, setup.ytr), progress=False)
    test_head = hook.collect(batches(setup.Xte, setup.yte), progress=False)
    attr = exemplar.Attributor(train_head, curvature="exact", damping=DAMPING)
    last = exemplar.lds(attr, test_head, truth, ("if", "grad_dot")).methods
    for method, c in last.items():
        rows.append({"row": f"last layer, {method} (exact)", "lds": round(c.value, 3)})
    found = {}
    for curvature, fisher in ROWS:
        r = fresh([sys.executable, __file__, "--one", curvature, fisher], job_of(setup, truth))
        found[curvature, fisher] = r
        if not rows[-1]["row"].startswith("exemplar network"):
            rows.append({"row": "exemplar network, grad_dot",
                         "lds": round(lds_of(r["grad_dot"], truth, masks=False), 3)})
        rows.append({"row": f"exemplar network, if ({curvature}, {fisher} Fisher)",
                     "lds": round(lds_of(r["predicted"], truth, masks=False), 3),
                     "fit_s": round(r["fit_s"], 3), "seconds": round(r["seconds"], 3),
                     "peak_rss_mb": round(r["peak_rss_mb"])})
    if args.peer and Path(args.peer).exists():
        k = fresh([args.peer, str(Path(__file__).with_name("kronfluence_peer.py"))], job_of(setup, truth))
        seconds = k["factors_s"] + k["queries"]["scores_s"]
        ekfac = found["ekfac", "expected"]["top10"]
        rows.append({"row": f"kronfluence {k['version']}, if (ekfac, sampled Fisher)",
                     "lds": round(lds_of(k["test"]["scores"], truth), 3), "fit_s": round(k["factors_s"], 3),
                     "seconds": round(seconds, 3), "peak_rss_mb": round(k["peak_rss_mb"]),
                     "top10_overlap_with_ours_ekfac": round(float(
                         (k["queries"]["top10"].unsqueeze(2) == ekfac.unsqueeze(1)).any(2).double().mean()), 3)})
    if not args.smoke:
        rows += dense_rows(setup, truth)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
