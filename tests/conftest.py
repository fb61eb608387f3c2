import pytest
import torch

import exemplar


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and exemplar.cuda_compiled():
        return
    why = "needs a CUDA GPU and a CUDA build of exemplar"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


def make_data(n, c, d, dtype=torch.float64, seed=0, labels=True, device="cpu"):
    """Random last-layer data with logits of realistic spread; never zeros."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g) if labels else None
    features, logits = features.to(device, dtype), logits.to(device, dtype)
    return exemplar.LastLayerData(features, logits, None if y is None else y.to(device))


def make_layer_data(n, c, d, dtype=torch.float64, seed=0, labels=True):
    """(data, weight (C, D), bias (C,)): features through a random linear layer,
    so the logits are exactly what the layer outputs (RPS-LJE needs the layer)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    bias = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    logits = features @ weight.T + bias
    y = torch.randint(0, c, (n,), generator=g) if labels else None
    data = exemplar.LastLayerData(features.to(dtype), logits.to(dtype), y)
    return data, weight.to(dtype), bias.to(dtype)
