"""Helpers shared by the experiments: the logistic-regression model they
explain, summary statistics and the results folder."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import exemplar
from exemplar.testing.linear import fit_softmax_regression

WEIGHT_DECAY = 1e-3


def with_bias(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


class LogisticRegression:
    """Multinomial LR fitted by Newton to machine precision, weight decay
    `WEIGHT_DECAY` (so exact curvature with damping=WEIGHT_DECAY is the
    Hessian of the training objective)."""

    def __init__(self, Xtr, ytr, num_classes=10, weight_decay=WEIGHT_DECAY, solver="newton"):
        self.Xtr, self.ytr, self.C, self.wd = Xtr, ytr, num_classes, weight_decay
        self.phi = with_bias(Xtr)
        if solver == "newton":
            self.theta = fit_softmax_regression(self.phi, ytr, num_classes, weight_decay)
        else:  # L-BFGS, for when the (C*Dp)^2 Newton system is too large
            self.theta = self._fit_lbfgs()

    def _fit_lbfgs(self):
        theta = torch.zeros(self.C, self.phi.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], max_iter=1000, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.cross_entropy(self.phi @ theta.T, self.ytr)
                    + 0.5 * self.wd * theta.square().sum())
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach()

    def data(self, X, y=None, theta=None) -> exemplar.LastLayerData:
        theta = self.theta if theta is None else theta
        return exemplar.LastLayerData(X, with_bias(X) @ theta.T, y)

    def attributor(self, curvature="exact", **kw) -> exemplar.Attributor:
        return exemplar.Attributor(self.data(self.Xtr, self.ytr), curvature=curvature,
                                   damping=self.wd, weight=self.theta[:, :-1], bias=self.theta[:, -1], **kw)

    def retrain_without(self, i: int) -> torch.Tensor:
        """Leave-one-out fit, warm-started; the other examples keep weight 1/N."""
        keep = torch.ones(len(self.ytr), dtype=torch.bool)
        keep[i] = False
        return fit_softmax_regression(self.phi[keep], self.ytr[keep], self.C, self.wd,
                                      n_total=len(self.ytr), init=self.theta)

    def losses(self, X, y, theta=None) -> torch.Tensor:
        theta = self.theta if theta is None else theta
        return torch.nn.functional.cross_entropy(with_bias(X) @ theta.T, y, reduction="none")

    def accuracy(self, X, y) -> float:
        return float(((with_bias(X) @ self.theta.T).argmax(1) == y).double().mean())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def mean_se(x: torch.Tensor) -> str:
    x = x.double()
    se = float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return f"{float(x.mean()):.4g} ± {se:.2g}"


def mean_sd(x: torch.Tensor) -> str:
    x = x.double()
    return f"{float(x.mean()):.3f} ± {float(x.std()) if len(x) > 1 else float('nan'):.2f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


FULL_ROOT, QUICK_ROOT = "results", "results-quick"  # quick runs never land beside the committed full ones


class Results:
    """results/NAME/: README.md (the tables, the command, the timing) and figures."""

    def __init__(self, root: Path, name: str, quick: bool):
        self.dir = Path(root) / name
        readme = self.dir / "README.md"
        if quick and readme.exists() and "(quick mode)" not in readme.read_text().split("\n", 1)[0]:
            raise ValueError(f"{readme} holds a full run's results; a --quick run never overwrites them: "
                             f"pass another --out (default for --quick: {QUICK_ROOT})")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.quick, self.start = name, quick, time.monotonic()
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text, flush=True)

    def figure(self, fig, filename: str) -> Path:
        path = self.dir / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        self.parts.append(f"![{filename}]({filename})")
        return path

    def write(self) -> Path:
        mode = " --quick" if self.quick else ""
        head = (f"# {self.name}{' (quick mode)' if self.quick else ''}\n\n"
                f"Command: `python -m experiments {self.name}{mode}`. "
                f"Ran in {time.monotonic() - self.start:.0f} s on {torch.get_num_threads()} CPU threads.\n")
        path = self.dir / "README.md"
        path.write_text(head + "\n" + "\n\n".join(self.parts) + "\n")
        return path
