"""Explainer: the whole-model entry point. Fits once on a training loader
(hooks, curvature, normalisers, RPS fits), saves and loads that state with
safetensors (never pickle), and explains test inputs by their top-k training
examples."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .. import methods
from ..data import LastLayerData, integer_labels
from ..engine import Attributor
from ..results import Explanation
from ..storage import saved
from .hooks import LastLayer, model_digest

FORMAT = "exemplar.Explainer/1"


class Explainer:
    """Explains a whole model's predictions through its last linear layer:
    fits once on a training loader, saves and loads that state, explains
    test inputs.

    Arguments:
        model: the classifier (an nn.Module).
        train_loader: yields (inputs..., labels) batches in a fixed order:
            the indices in every Explanation are positions in that order
            (the dataset's indices for a DataLoader without a sampler); a
            loader that shuffles is refused.
        method: the default method of explain() (any of exemplar.METHODS).
        curvature: as for Attributor.
        layer, output: LastLayer's (which linear layer; which part of a
            structured output holds the logits).
        progress: a progress line for the training pass (None: only on a terminal).
        attributor_kwargs: damping, kfac_damping, rps_lambda, lje_step, rank:
            passed to the Attributor."""

    def __init__(self, model: nn.Module, train_loader, method: str = "theta_relatif",
                 curvature: str = "kfac", layer: str | nn.Module | None = None,
                 progress: bool | None = None, output=None, **attributor_kwargs):
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
        self._remember_model()

    def _remember_model(self) -> None:
        """What the fit was made from: the model's digest, and its tensors'
        versions, which every in-place change (an optimiser step, a load)
        bumps, so an unchanged model is recognised without hashing it."""
        self._model_digest, self._model_versions = model_digest(self.hook.model), _versions(self.hook.model)

    def _check_model(self) -> None:
        """Refuses to explain a model that changed since the fit (its features
        and logits, and so every score, would be another model's)."""
        if _versions(self.hook.model) == self._model_versions:
            return
        if model_digest(self.hook.model) != self._model_digest:
            raise ValueError("the model changed since this Explainer was fitted (its parameters or buffers "
                             "differ): its training features and fit describe the old model; build a new "
                             "Explainer for the model as it is now")
        self._model_versions = _versions(self.hook.model)  # touched in place, same values
    def _test_data(self, test_inputs, labels, progress) -> LastLayerData:
        single = isinstance(test_inputs, (torch.Tensor, Mapping))
        data = self.hook.collect([test_inputs] if single else test_inputs, progress)
        explained = None
        if labels is not None:
            explained = integer_labels(labels).to(data.features.device)
            explained = explained.expand(len(data)) if explained.dim() == 0 else explained
        return LastLayerData(data.features, data.logits, explained)

    def explain(self, test_inputs, k: int = 5, labels=None, largest: bool = True,
                progress: bool | None = None, method: str | None = None, opponents: int = 0) -> Explanation:
        """Explains each test prediction by its k top training examples.

        Arguments:
            test_inputs: one batch (a tensor, or a dict such as a tokenizer's
                output) or a loader of batches (their labels are ignored).
            k: proponents per test.
            labels: None explains each prediction; an int or (T,) tensor
                explains those classes instead ("why bird and not plane").
            largest: False puts the most opposing examples in indices/scores instead.
            progress: a progress line for the test pass.
            method: this call's method (default the Explainer's; any of exemplar.METHODS).
            opponents: m > 0 adds the m most opposing examples.

        Returns:
            An Explanation (training indices are positions in train_loader's order)."""
        method = self.method if method is None else method
        methods.get(method)
        self._check_model()
        test = self._test_data(test_inputs, labels, progress)
        if largest:
            return self.attributor.explain(test, k, method, opponents)
        if opponents:
            raise ValueError("opponents= adds the opponents to the proponents (largest=True); "
                             "largest=False already returns the opponents in indices/scores")
        return Explanation.of(test, self.attributor.topk(test, k, method, largest=False), method)

    def save(self, path) -> None:
        """Writes the fitted state (training features/logits/labels, layer,
        curvature, normalisers, RPS fits) to one safetensors file, atomically:
        a temporary file beside `path` renamed over it, so a failed save
        leaves any earlier file as it was."""
        tensors, config = self.attributor.state_dict()
        saved.write(path, tensors, {"format": FORMAT, "method": self.method, "layer": self.hook.name,
                                    "attributor": config})

    @classmethod
    def load(cls, path, model: nn.Module, output=None) -> "Explainer":
        """Restores a saved Explainer for `model` without refitting; the model's
        layer must be the one the state was fitted with. The file is read
        whole and checked (every key, shape, dtype and value) before use, and
        the returned object does not depend on the file afterwards."""
        tensors, meta = saved.read(path, FORMAT, ("method", "layer", "attributor"))
        try:
            methods.get(meta["method"])
        except ValueError as err:
            raise ValueError(f"{path}: 'method': {err}") from None
        if not isinstance(meta["layer"], str):
            raise ValueError(f"{path}: 'layer' must be a module name, got {meta['layer']!r}")
        self = cls.__new__(cls)
        self.hook = LastLayer(model, meta["layer"] or None, output)
        tensors = {k: v.to(self.hook.device) for k, v in tensors.items()}
        theta = self.hook.weight.double()
        if self.hook.bias is not None:
            theta = torch.cat([theta, self.hook.bias.double().view(-1, 1)], 1)
        stored = tensors.get("theta")
        if stored is None or stored.shape != theta.shape or not torch.allclose(stored, theta):
            raise ValueError(f"model's layer {meta['layer']!r} differs from the one {path} was fitted on")
        self.attributor = Attributor.from_state(tensors, meta["attributor"])
        self.method = meta["method"]
        self._remember_model()
        return self


def _versions(model: nn.Module) -> tuple:
    """(identity, in-place version) of every parameter and buffer."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
