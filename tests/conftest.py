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


def _skip_group(reason: str) -> str:
    """The skip reasons folded into a few kinds a contributor can act on."""
    if "CUDA" in reason or "fused" in reason:
        return "need a CUDA GPU and a CUDA build (the device grid: tests/gpu/test_cuda.py, tests/ops/test_ops.py)"
    if "Chromium" in reason:
        return "need Chromium (apt-get install chromium)"
    return reason


def pytest_terminal_summary(terminalreporter):
    """One line per kind of skip at the end, instead of rows of 's' with no reason."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    kinds: dict[str, int] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        kind = _skip_group(reason.removeprefix("Skipped: "))
        kinds[kind] = kinds.get(kind, 0) + 1
    terminalreporter.write_sep("-", f"{len(skipped)} skipped")
    for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{count} skipped: {kind}")
