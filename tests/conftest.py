import pytest
import torch

import exemplar

# Every op test runs on each of these; CUDA ones are skipped without a GPU and a CUDA build.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and exemplar.cuda_compiled():
        return
    why = "needs a CUDA GPU and a CUDA build of exemplar"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["default", "streamed", "fused"])
def kernel(request, device):
    """The top-k implementations (exemplar.ops.TOPK_KERNELS); the fused one is CUDA's alone."""
    if request.param == "fused" and device != "cuda":
        pytest.skip("the fused top-k kernel is CUDA-only")
    return request.param
