"""Explainer: the whole-model entry point. Fits once on a training loader
(hooks, curvature, normalisers, RPS fits), saves and loads that state with
safetensors (never pickle), and explains test inputs by their top-k training
examples."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from .attributor import METHODS, Attributor
from .data import LastLayerData
from .hooks import LastLayer

FORMAT = "exemplar.Explainer/1"


@dataclass
class Explanation:
    indices: torch.Tensor  # (T, k) training indices, best first
    scores: torch.Tensor  # (T, k)
    labels: torch.Tensor  # (T,) the explained class of each test
    predictions: torch.Tensor  # (T,) the model's predicted class


class Explainer:
    """exemplar.Explainer(model, train_loader, method="theta_relatif", curvature="kfac")

    train_loader yields (inputs..., labels) batches in a fixed order: the
    indices in every Explanation are positions in that order. Extra keyword
    arguments (damping, kfac_damping, rps_lambda, lje_step) go to the Attributor."""

    def __init__(self, model: nn.Module, train_loader, method: str = "theta_relatif",
                 curvature: str = "kfac", layer: str | nn.Module | None = None,
                 progress: bool = True, **attributor_kwargs):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.hook = LastLayer(model, layer)
        train = self.hook.collect(train_loader, progress)
        if train.labels is None:
            raise ValueError("train_loader must yield (inputs..., labels) batches: training labels are needed")
        bias = self.hook.bias
        self.attributor = Attributor(train, curvature=curvature, weight=self.hook.weight,
                                     bias=False if bias is None else bias, **attributor_kwargs)
        self.method = method
        self.attributor._train_side(method)  # normalisers / RPS fits now, not on the first query

    def _test_data(self, test_inputs, labels, progress) -> LastLayerData:
        batches = [test_inputs] if isinstance(test_inputs, torch.Tensor) else test_inputs
        data = self.hook.collect(batches, progress)
        explained = None
        if labels is not None:
            T = len(data)
            explained = torch.as_tensor(labels, device=data.features.device).long()
            explained = explained.expand(T) if explained.dim() == 0 else explained
        return LastLayerData(data.features, data.logits, explained)

    def explain(self, test_inputs, k: int = 5, labels=None, largest: bool = True,
                progress: bool = False) -> Explanation:
        """test_inputs: a batch tensor, or a loader of batches (their labels are
        ignored). labels: None explains each prediction; an int or (T,) tensor
        explains those classes instead ("why bird and not plane"). largest=False
        gives the most opposing examples."""
        test = self._test_data(test_inputs, labels, progress)
        scores, indices = self.attributor.topk(test, k, self.method, largest=largest)
        return Explanation(indices, scores, test.explained_labels(), test.logits.argmax(1))

    def save(self, path) -> None:
        """Writes the fitted state (training features/logits/labels, layer,
        curvature, normalisers, RPS fits) to one safetensors file."""
        from safetensors.torch import save_file

        tensors, config = self.attributor.state_dict()
        meta = {"format": FORMAT, "method": self.method, "layer": self.hook.name, "attributor": config}
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"exemplar": json.dumps(meta)})

    @classmethod
    def load(cls, path, model: nn.Module) -> "Explainer":
        """Restores a saved Explainer for `model` without refitting; the model's
        layer must be the one the state was fitted with."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("exemplar", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an exemplar Explainer file (format {meta.get('format')!r})")
            self = cls.__new__(cls)
            self.hook = LastLayer(model, meta["layer"] or None)
            tensors = {k: f.get_tensor(k).to(self.hook.device) for k in f.keys()}
        theta = self.hook.weight.double()
        if self.hook.bias is not None:
            theta = torch.cat([theta, self.hook.bias.double().view(-1, 1)], 1)
        saved = tensors.get("theta")
        if saved is None or saved.shape != theta.shape or not torch.allclose(saved, theta):
            raise ValueError(f"model's layer {meta['layer']!r} differs from the one {path} was fitted on")
        self.attributor = Attributor.from_state(tensors, meta["attributor"])
        self.method = meta["method"]
        return self
