"""What only CUDA has: the fused kernel's own edge shapes (64-row tiles, splits
of the training set, C=1000), and both CUDA top-k paths (the streamed default
and the fused kernel) agreeing with the CPU on indices. Every op
test in the device grid (test_ops.py, test_methods.py) runs on CUDA as well.
Skipped without a GPU and a CUDA build (conftest.py); `pytest -m cuda` on a GPU."""
import pytest
import torch

from exemplar import ops
from helpers import PATHS, check_topk_near, general_operands, make_data, rank1_operands

pytestmark = pytest.mark.cuda
CUDA = "cuda"

# (T, N, C, Dp): T=1, N below one 64-row tile, C=2 and C=1000, Dp not a multiple
# of 8, N spanning many tiles and splits.
SIZES = [(1, 37, 2, 13), (5, 63, 3, 7), (70, 1000, 1000, 5), (3, 5000, 10, 513), (130, 20_000, 7, 29)]


def rel(got, want):
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


KERNELS = ["streamed", "fused"]


@pytest.mark.parametrize("cuda_kernel", KERNELS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_topk_cuda(path, size, largest, cuda_kernel):
    if path == "rank_m" and cuda_kernel == "fused":
        pytest.skip("the fused kernel is rank 1")
    make, truth_of, _, topk_op, _ = PATHS[path]
    T, N, C, Dp = size
    args = make(T, N, C, Dp, dtype=torch.float32, seed=1)
    truth = truth_of(*args)
    cuda_args = [a.to(CUDA) for a in args]
    for k in sorted({1, min(10, N), min(1024, N), N} if N <= 5000 else {1, 10, 1024}):
        values, indices = topk_op(*cuda_args, k, largest, kernel=cuda_kernel)
        check_topk_near(values, indices, truth, k, largest)
        cpu_values, _ = topk_op(*args, k, largest)
        assert float((values.cpu() - cpu_values).abs().max() / truth.abs().max()) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", SIZES[:4], ids=str)
def test_dense_scores_cuda(size, dtype):
    for make, truth, dense, _, _ in PATHS.values():
        args = make(*size, dtype=dtype, seed=3)
        assert rel(dense(*[a.to(CUDA) for a in args]), truth(*args)) <= 1e-4


@pytest.mark.parametrize("cuda_kernel", KERNELS)
def test_topk_float64_cuda_matches_cpu_exactly_on_indices(cuda_kernel):
    args = general_operands(9, 777, 4, 11, dtype=torch.float64, seed=5)
    v_gpu, i_gpu = ops.topk(*[a.to(CUDA) for a in args], 17, True, kernel=cuda_kernel)
    v_cpu, i_cpu = ops.topk(*args, 17, True)
    assert torch.allclose(v_gpu.cpu(), v_cpu, rtol=1e-12, atol=1e-12)
    assert torch.equal(i_gpu.cpu(), i_cpu)


def test_residuals_many_classes_cuda():
    data = make_data(301, 1000, 13, dtype=torch.float32, seed=6)
    R_gpu = ops.residuals(data.logits.to(CUDA), data.labels.to(CUDA))
    assert rel(R_gpu, ops.residuals(data.logits, data.labels).double()) <= 1e-5


def test_wrong_device_is_a_clear_error():
    S, R, Phi, inv = general_operands(2, 30, 3, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="exemplar::topk: Phi is on cpu but R is on cuda"):
        ops.topk(S.to(CUDA), R.to(CUDA), Phi, inv.to(CUDA), 3)


@pytest.mark.parametrize("cuda_kernel", KERNELS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("N", [5, 300, 5000])
def test_topk_special_values_and_ties_match_cpu(N, largest, cuda_kernel):
    """RankOrder on the GPU: NaN last, +-inf as values, ties by ascending index,
    the same indices as the CPU for every k."""
    g = torch.Generator().manual_seed(N)
    target = torch.randint(-2, 3, (N,), generator=g).double()
    target[torch.randperm(N, generator=g)[: N // 5]] = float("nan")
    target[torch.randperm(N, generator=g)[: N // 7]] = float("inf")
    target[torch.randperm(N, generator=g)[: N // 7]] = -float("inf")
    one = torch.ones(1, 1, dtype=torch.float64)
    args = [one, one, torch.ones(N, 1, dtype=torch.float64), target.view(-1, 1), torch.ones(N, dtype=torch.float64)]
    for k in sorted({1, min(7, N), N // 2, N}):
        want = ops.topk_rank1(*args, k, largest)
        got = ops.topk_rank1(*[a.to(CUDA) for a in args], k, largest, kernel=cuda_kernel)
        assert torch.equal(got[1].cpu(), want[1])
        torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True)


def test_residuals_bad_label_is_catchable_on_cuda():
    data = make_data(20, 3, 4, seed=2, device=CUDA)
    labels = data.labels.clone()
    labels[7] = 3
    with pytest.raises(RuntimeError,
                       match=r"exemplar::residuals: labels must be in \[0, C\) = \[0, 3\), got labels\[7\]=3"):
        ops.residuals(data.logits, labels)
    assert ops.residuals(data.logits, data.labels).shape == (20, 3)  # the CUDA context survived


@pytest.mark.parametrize("rank1", [False, True])
def test_opcheck_fused(rank1):
    make = rank1_operands if rank1 else general_operands
    args = [x.to(CUDA) for x in make(4, 19, 3, 5, seed=4)]
    op = torch.ops.exemplar.fused_topk_rank1 if rank1 else torch.ops.exemplar.fused_topk
    torch.library.opcheck(op, (*args, 3, True))


def test_fused_kernel_refuses_rank_m():
    from helpers import rank_m_operands

    args = [x.to(CUDA) for x in rank_m_operands(3, 40, 3, 5, dtype=torch.float32, seed=2)]
    with pytest.raises(RuntimeError, match=r"exemplar::fused_topk_rank1: the fused kernel takes rank 1"):
        ops.topk_rank1(*args, 3, True, kernel="fused")


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("path", ["general", "rank1"])
def test_screened_topk_cuda_equals_exact(path, size):
    # The bf16 screen's CUDA consumer (csrc/cuda/screen.cu) with cuBLAS's bf16
    # GEMMs must keep its bound: the exact CUDA path's indices, and survivors
    # well below N.
    T, N, C, Dp = size
    make = general_operands if path == "general" else rank1_operands
    args = [a.to(CUDA) for a in make(T, N, C, Dp, dtype=torch.float32, seed=7)]
    op = ops.screened_topk if path == "general" else ops.screened_topk_rank1
    exact = (ops.topk if path == "general" else ops.topk_rank1)(*args, min(10, N), True, precision="exact")
    values, indices, survivors = op(*args, min(10, N), True)
    assert torch.equal(indices, exact[1])
    torch.testing.assert_close(values, exact[0], rtol=0, atol=1e-5 * float(exact[0].abs().max()))
    if N >= 5000:
        assert float(survivors.double().mean()) < 0.05 * N
