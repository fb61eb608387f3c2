"""kronfluence's EK-FAC on a saved model, run in the peer's own venv (never
over exemplar's pinned torch): bench/network.py writes the model and data,
runs this script with the peer venv's python and reads back its scores.

    python bench/kronfluence_peer.py JOB.pt OUT.pt

JOB.pt: {"model": nn.Module, "train": (X, y), "queries": {name: (X, y)},
"damping": float, "batch": int}. OUT.pt: per query set its (T, N) scores,
top-10 indices, seconds (factors once, then scores + top-10) and the peak RSS."""
from __future__ import annotations

import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task


class Classification(Task):
    """Cross-entropy; sample=True draws labels from the softmax (kronfluence's true Fisher)."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def main(job_path: str, out_path: str) -> None:
    job = torch.load(job_path, weights_only=False)
    torch.manual_seed(0)
    model = prepare_model(job["model"].eval(), Classification())
    dtype = next(model.parameters()).dtype
    train = torch.utils.data.TensorDataset(*job["train"])
    out, batch = {}, job["batch"]
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("bench", model, Classification(), cpu=True, disable_tqdm=True, output_dir=folder)
        start = time.monotonic()
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch, overwrite_output_dir=True,
                                 factor_args=FactorArguments(strategy="ekfac", activation_covariance_dtype=dtype,
                                                             gradient_covariance_dtype=dtype, lambda_dtype=dtype,
                                                             eigendecomposition_dtype=torch.float64,
                                                             per_sample_gradient_dtype=dtype))
        out["factors_s"] = time.monotonic() - start
        for name, (X, y) in job["queries"].items():
            start = time.monotonic()
            args = ScoreArguments(damping_factor=job["damping"], per_sample_gradient_dtype=dtype,
                                  precondition_dtype=dtype, score_dtype=dtype)
            analyzer.compute_pairwise_scores(name, "ekfac", torch.utils.data.TensorDataset(X, y), train,
                                             per_device_query_batch_size=batch, per_device_train_batch_size=batch,
                                             score_args=args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(name)["all_modules"]
            top = scores.topk(10, dim=1).indices
            out[name] = {"scores": scores, "top10": top, "scores_s": time.monotonic() - start}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["version"] = __import__("kronfluence").__version__
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
