"""Tree ensembles as a last layer: an XGBoost booster's margin is a sum of leaf
values, so with one indicator feature per leaf (phi_il = 1 when example i
lands in leaf l) and the leaf values as weights, margin = W phi + b is a linear
layer and IF, RelatIF and RPS-LJE apply unchanged (Sui et al. §4.2).
Binary boosters become C=2 softmax classifiers with logits (0, margin), whose
softmax is the booster's sigmoid. Needs `pip install xgboost-cpu`."""
from __future__ import annotations

import json

import torch

from ..data import LastLayerData


def _xgboost():
    try:
        import xgboost
    except ImportError as err:
        raise ImportError("exemplar.trees needs XGBoost: pip install xgboost-cpu "
                          "(or pip install 'exemplar[trees]')") from err
    return xgboost


class TreeEnsemble:
    """An XGBoost Booster (binary:logistic, or multi:softprob/softmax) as
    leaf-indicator features (L columns, one per leaf of every tree) and a
    linear layer (weight (C, L), bias (C,))."""

    def __init__(self, booster):
        xgb = _xgboost()
        if not isinstance(booster, xgb.Booster):
            raise TypeError(f"booster must be an xgboost.Booster, got {type(booster).__name__} "
                            "(for the sklearn API pass model.get_booster())")
        self.booster = booster
        config = json.loads(booster.save_config())["learner"]
        objective = config["objective"]["name"]
        if objective == "binary:logistic":
            self.num_classes, self.binary = 2, True
        elif objective in ("multi:softprob", "multi:softmax"):
            self.num_classes, self.binary = int(config["learner_model_param"]["num_class"]), False
        else:
            raise ValueError(f"booster objective {objective!r} is not a classifier: exemplar supports "
                             "binary:logistic, multi:softprob and multi:softmax")
        model = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]
        self._leaf_column, rows, cols, values = [], [], [], []
        L = 0
        for tree, group in zip(model["trees"], model["tree_info"]):
            is_leaf = torch.tensor(tree["left_children"]) == -1
            column = torch.full(is_leaf.shape, -1, dtype=torch.long)
            column[is_leaf] = torch.arange(L, L + int(is_leaf.sum()))
            self._leaf_column.append(column)
            leaf_values = torch.tensor(tree["split_conditions"], dtype=torch.float64)[is_leaf]
            rows.append(torch.full((len(leaf_values),), 1 if self.binary else group))
            cols.append(column[is_leaf])
            values.append(leaf_values)
            L += int(is_leaf.sum())
        self.num_leaves = L
        self.weight = torch.zeros(self.num_classes, L, dtype=torch.float64)  # (C, L)
        self.weight[torch.cat(rows), torch.cat(cols)] = torch.cat(values)
        self.bias: torch.Tensor | None = None  # (C,), read off the first data seen

    def features(self, X) -> torch.Tensor:
        """(n, L) float64 leaf indicators of the examples X (anything DMatrix takes)."""
        xgb = _xgboost()
        leaves = torch.as_tensor(self.booster.predict(xgb.DMatrix(X), pred_leaf=True)).long()
        leaves = leaves.view(leaves.shape[0], -1)
        if leaves.shape[1] != len(self._leaf_column):
            raise ValueError(f"booster predicted leaves for {leaves.shape[1]} trees, expected "
                             f"{len(self._leaf_column)}")
        phi = torch.zeros(leaves.shape[0], self.num_leaves, dtype=torch.float64)
        for t, column in enumerate(self._leaf_column):
            phi[torch.arange(leaves.shape[0]), column[leaves[:, t]]] = 1.0
        return phi

    def margins(self, X) -> torch.Tensor:
        """(n, C) float64 logits from XGBoost itself: (0, margin) for binary boosters."""
        xgb = _xgboost()
        m = torch.as_tensor(self.booster.predict(xgb.DMatrix(X), output_margin=True), dtype=torch.float64)
        return torch.stack([torch.zeros_like(m), m], 1) if self.binary else m.view(-1, self.num_classes)

    def last_layer_data(self, X, labels=None) -> LastLayerData:
        """Leaf indicators and logits = phi W^T + b (float64), checked against
        XGBoost's own margins (float32, so to 1e-4 relative)."""
        phi = self.features(X)
        margins = self.margins(X)
        partial = phi @ self.weight.T
        if self.bias is None:
            self.bias = (margins - partial).mean(0)
        logits = partial + self.bias
        err = float((logits - margins).abs().max())
        if err > 1e-4 * (1.0 + float(margins.abs().max())):
            raise ValueError(f"leaf values do not reproduce XGBoost's margins (max error {err:.3g}): "
                             "per-row base_margin and num_parallel_tree > 1 are not supported")
        y = None if labels is None else torch.as_tensor(labels).long()
        return LastLayerData(phi, logits, y)
