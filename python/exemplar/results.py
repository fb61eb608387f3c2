"""What the APIs return: TopK (values, indices), and Explanation, the top
proponents (and optionally opponents) of each test prediction, which exports
to pandas / CSV and feeds exemplar.report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """The result of topk, divine and divine_global: values (T, k) (or (k,) for
    a whole test set) and indices (T, k) of training rows, best first (see
    "Order of a top-k" in the README). Unpacks as `values, indices = ...`."""
    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class Explanation:
    """Per test example: the k training examples that most support its
    explained label (proponents) and, when asked, those that most oppose it.

    indices, scores: (T, k) proponents, best first; indices are training rows
    (positions in the training loader's order / the LastLayerData / store).
    labels: (T,) the explained class (the prediction unless another was
    asked). predictions: (T,) the model's predicted class. probabilities:
    (T,) the model's softmax probability of the explained class. method: the
    scoring method's name. opponents: TopK of the most opposing examples (most
    negative scores first), or None."""
    indices: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    probabilities: torch.Tensor | None = None
    method: str = ""
    opponents: TopK | None = None

    @classmethod
    def of(cls, test, top: TopK, method: str, opponents: TopK | None = None) -> "Explanation":
        """The Explanation of `top` (proponents) found for `test` (a LastLayerData)."""
        explained = test.explained_labels()
        probabilities = torch.softmax(test.logits.double(), 1).gather(1, explained.view(-1, 1)).squeeze(1)
        return cls(top.indices, top.values, explained, test.logits.argmax(1), probabilities, method, opponents)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def to_pandas(self, train_labels: torch.Tensor | None = None, class_names=None):
        """A pandas DataFrame, one row per (test, kind, rank): columns test,
        kind ("proponent" | "opponent"), rank (1 = strongest, as every table
        exemplar writes counts), train_index,
        score, method, explained_label, prediction, probability, and
        train_label when `train_labels` (N,) is given. class_names (a
        sequence indexed by class) adds readable *_name columns."""
        import pandas

        parts = [("proponent", self.indices, self.scores)]
        if self.opponents is not None:
            parts.append(("opponent", self.opponents.indices, self.opponents.values))
        frames = []
        for kind, indices, scores in parts:
            T, k = indices.shape
            columns = {
                "test": torch.arange(T).repeat_interleave(k).numpy(),
                "kind": kind,
                "rank": torch.arange(1, k + 1).repeat(T).numpy(),
                "train_index": indices.reshape(-1).cpu().numpy(),
                "score": scores.reshape(-1).cpu().double().numpy(),
                "method": self.method,
                "explained_label": self.labels.cpu().repeat_interleave(k).numpy(),
                "prediction": self.predictions.cpu().repeat_interleave(k).numpy(),
            }
            if self.probabilities is not None:
                columns["probability"] = self.probabilities.cpu().double().repeat_interleave(k).numpy()
            if train_labels is not None:
                columns["train_label"] = torch.as_tensor(train_labels).cpu()[indices.reshape(-1).cpu()].numpy()
            frames.append(pandas.DataFrame(columns))
        frame = pandas.concat(frames, ignore_index=True)
        if class_names is not None:
            for column in ("explained_label", "prediction", "train_label"):
                if column in frame:
                    frame[column + "_name"] = [str(class_names[int(c)]) for c in frame[column]]
        return frame

    def to_csv(self, path, train_labels: torch.Tensor | None = None, class_names=None) -> None:
        """Writes to_pandas(...) to `path` as CSV (no index column)."""
        self.to_pandas(train_labels, class_names).to_csv(path, index=False)
