"""Explainer: the whole-model entry point. Fits once on a training loader
(hooks, curvature, normalisers, RPS fits), saves and loads that state with
safetensors (never pickle), and explains test inputs by their top-k training
examples."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import methods
from .attributor import Attributor
from .data import LastLayerData, integer_labels
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
    indices in every Explanation are positions in that order (the dataset's
    indices for a DataLoader without a sampler); a loader that shuffles is
    refused. `layer` and `output` are LastLayer's. Extra keyword arguments
    (damping, kfac_damping, rps_lambda, lje_step) go to the Attributor."""

    def __init__(self, model: nn.Module, train_loader, method: str = "theta_relatif",
                 curvature: str = "kfac", layer: str | nn.Module | None = None,
                 progress: bool = True, output=None, **attributor_kwargs):
        methods.get(method)  # an unknown name fails before the training pass
        self.hook = LastLayer(model, layer, output)
        train = self.hook.collect(train_loader, progress)
        if train.labels is None:
            raise ValueError("train_loader must yield (inputs..., labels) batches: training labels are needed")
        bias = self.hook.bias
        self.attributor = Attributor(train, curvature=curvature, weight=self.hook.weight,
                                     bias=False if bias is None else bias, **attributor_kwargs)
        self.method = method
        self.attributor.prepare(method)  # normalisers / RPS fits now, not on the first query

    def _test_data(self, test_inputs, labels, progress) -> LastLayerData:
        batches = [test_inputs] if isinstance(test_inputs, torch.Tensor) else test_inputs
        data = self.hook.collect(batches, progress)
        explained = None
        if labels is not None:
            explained = integer_labels(labels).to(data.features.device)
            explained = explained.expand(len(data)) if explained.dim() == 0 else explained
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
        curvature, normalisers, RPS fits) to one safetensors file, atomically:
        a temporary file beside `path` renamed over it, so a failed save
        leaves any earlier file as it was."""
        import safetensors.torch

        tensors, config = self.attributor.state_dict()
        meta = {"format": FORMAT, "method": self.method, "layer": self.hook.name, "attributor": config}
        data = safetensors.torch.save({k: v.cpu() for k, v in tensors.items()},
                                      metadata={"exemplar": json.dumps(meta)})
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, model: nn.Module, output=None) -> "Explainer":
        """Restores a saved Explainer for `model` without refitting; the model's
        layer must be the one the state was fitted with. The file is read
        whole and checked (every key, shape, dtype and value) before use, and
        the returned object does not depend on the file afterwards."""
        import safetensors.torch

        data = Path(path).read_bytes()
        try:
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            tensors = safetensors.torch.load(data)
        except Exception as err:  # the format's own errors vary by version
            raise ValueError(f"{path} is not a safetensors file ({err})") from err
        meta = _metadata(header, path)
        self = cls.__new__(cls)
        self.hook = LastLayer(model, meta["layer"] or None, output)
        tensors = {k: v.to(self.hook.device) for k, v in tensors.items()}
        theta = self.hook.weight.double()
        if self.hook.bias is not None:
            theta = torch.cat([theta, self.hook.bias.double().view(-1, 1)], 1)
        saved = tensors.get("theta")
        if saved is None or saved.shape != theta.shape or not torch.allclose(saved, theta):
            raise ValueError(f"model's layer {meta['layer']!r} differs from the one {path} was fitted on")
        self.attributor = Attributor.from_state(tensors, meta["attributor"])
        self.method = meta["method"]
        return self


def _metadata(header, path) -> dict:
    """The 'exemplar' metadata of a safetensors header, checked key by key."""
    raw = (header.get("__metadata__") or {}).get("exemplar") if isinstance(header, dict) else None
    if raw is None:
        raise ValueError(f"{path} is not an exemplar Explainer file (no 'exemplar' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata 'exemplar' is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata 'exemplar' must be a JSON object, got {type(meta).__name__}")
    for key in ("format", "method", "layer", "attributor"):
        if key not in meta:
            raise ValueError(f"{path}: missing key '{key}' in metadata 'exemplar'")
    if meta["format"] != FORMAT:
        raise ValueError(f"{path} is not an exemplar Explainer file of format {FORMAT!r} "
                         f"(format {meta['format']!r})")
    try:
        methods.get(meta["method"])
    except ValueError as err:
        raise ValueError(f"{path}: 'method': {err}") from None
    if not isinstance(meta["layer"], str):
        raise ValueError(f"{path}: 'layer' must be a module name, got {meta['layer']!r}")
    if not isinstance(meta["attributor"], dict):
        raise ValueError(f"{path}: 'attributor' must be a JSON object, got {type(meta['attributor']).__name__}")
    return meta
