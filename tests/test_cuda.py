"""CUDA ops against the CPU ops and reference.py. Skipped without a GPU and a
CUDA build (conftest.py); run them with `pytest -m cuda` on a GPU machine."""
import pytest
import torch

import exemplar
from exemplar import ops
from exemplar import reference as ref

from conftest import make_data
from test_ops import PATHS, general_operands, opcheck_cases

pytestmark = pytest.mark.cuda
CUDA = "cuda"

# (T, N, C, Dp): T=1, N below one 64-row tile, C=2 and C=1000, Dp not a multiple
# of 8, N spanning many tiles and splits.
SIZES = [(1, 37, 2, 13), (5, 63, 3, 7), (70, 1000, 1000, 5), (3, 5000, 10, 513), (130, 20_000, 7, 29)]


def rel(got, want):
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


def check_cuda_topk(values, indices, truth, k, largest):
    """values/indices from the GPU; truth: float64 (T, N) scores on the CPU."""
    values, indices = values.cpu().double(), indices.cpu()
    want = torch.topk(truth, k, dim=1, largest=largest).values
    scale = truth.abs().max()
    assert float((values - want).abs().max() / scale) <= 1e-4
    assert float((torch.gather(truth, 1, indices) - values).abs().max() / scale) <= 1e-4
    assert all(len(set(row.tolist())) == k for row in indices)
    # A returned index can differ from the float64 top-k only at a near-tie.
    kth = want[:, -1:]
    outside = ~torch.isin(indices, torch.topk(truth, k, dim=1, largest=largest).indices)
    assert bool(((torch.gather(truth, 1, indices) - kth).abs()[outside] <= 1e-4 * scale).all())


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_topk_cuda(path, size, largest):
    make, truth_of, _, topk_op, _ = PATHS[path]
    T, N, C, Dp = size
    args = make(T, N, C, Dp, dtype=torch.float32, seed=1)
    truth = truth_of(*args)
    cuda_args = [a.to(CUDA) for a in args]
    for k in sorted({1, min(10, N), min(1024, N), N} if N <= 5000 else {1, 10, 1024}):
        values, indices = topk_op(*cuda_args, k, largest)
        check_cuda_topk(values, indices, truth, k, largest)
        cpu_values, _ = topk_op(*args, k, largest)
        assert float((values.cpu() - cpu_values).abs().max() / truth.abs().max()) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", SIZES[:4], ids=str)
def test_dense_scores_cuda(size, dtype):
    for make, truth, dense, _, _ in PATHS.values():
        args = make(*size, dtype=dtype, seed=3)
        assert rel(dense(*[a.to(CUDA) for a in args]), truth(*args)) <= 1e-4


def test_topk_float64_cuda_matches_cpu_exactly_on_indices():
    args = general_operands(9, 777, 4, 11, dtype=torch.float64, seed=5)
    v_gpu, i_gpu = ops.topk(*[a.to(CUDA) for a in args], 17, True)
    v_cpu, i_cpu = ops.topk(*args, 17, True)
    assert torch.allclose(v_gpu.cpu(), v_cpu, rtol=1e-12, atol=1e-12)
    assert torch.equal(i_gpu.cpu(), i_cpu)


@pytest.mark.parametrize("C", [2, 1000])
def test_statistics_cuda(C):
    data = make_data(301, C, 13, dtype=torch.float32, seed=6)
    phi = ref.augment(data.features, True).float()
    R_gpu = ops.residuals(data.logits.to(CUDA), data.labels.to(CUDA))
    assert rel(R_gpu, ops.residuals(data.logits, data.labels).double()) <= 1e-5
    A, G = ops.kfac_factors(phi.to(CUDA), data.logits.to(CUDA))
    A_cpu, G_cpu = ops.kfac_factors(phi, data.logits)
    assert rel(A, A_cpu) <= 1e-10 and rel(G, G_cpu) <= 1e-10
    if C == 2:
        QA = torch.linalg.eigh(A_cpu)[1]
        QG = torch.linalg.eigh(G_cpu)[1]
        lam = ops.ekfac_eigenvalues(phi.to(CUDA), data.logits.to(CUDA), QA.to(CUDA), QG.to(CUDA))
        assert rel(lam, ops.ekfac_eigenvalues(phi, data.logits, QA, QG)) <= 1e-10
        H = ops.exact_hessian(phi.to(CUDA), data.logits.to(CUDA))
        assert rel(H, ref.exact_hessian(data.features, data.logits, True)) <= 1e-6


@pytest.mark.parametrize("curvature,kfac_damping", [("exact", "eigenbasis"), ("kfac", "eigenbasis"),
                                                    ("kfac", "factored"), ("ekfac", "eigenbasis"),
                                                    ("identity", "eigenbasis")])
def test_attributor_cuda_matches_reference(curvature, kfac_damping):
    train = make_data(203, 5, 11, dtype=torch.float32, seed=7)
    test = make_data(9, 5, 11, dtype=torch.float32, seed=8, labels=False)
    on_gpu = lambda d: exemplar.LastLayerData(d.features.to(CUDA), d.logits.to(CUDA),
                                              None if d.labels is None else d.labels.to(CUDA))
    attr = exemplar.Attributor(on_gpu(train), curvature=curvature, damping=0.05, kfac_damping=kfac_damping)
    kw = dict(curvature=curvature, damping=0.05, bias=True, kfac_damping=kfac_damping)
    for method in exemplar.INFLUENCE_METHODS:
        want = ref.scores(train.features, train.logits, train.labels, test.features, test.logits,
                          test.logits.argmax(1), method, **kw)
        assert rel(attr.scores(on_gpu(test), method), want) <= 1e-4, method
        values, indices = attr.topk(on_gpu(test), 7, method)
        check_cuda_topk(values, indices, want, 7, True)
        want_self = ref.self_influence(train.features, train.logits, train.labels, method, **kw)
        assert rel(attr.self_influence(method), want_self) <= 1e-4, method


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck_cuda(case):
    op, args = opcheck_cases(CUDA)[case]
    torch.library.opcheck(op, args)


def test_wrong_device_is_a_clear_error():
    S, R, Phi, inv = general_operands(2, 30, 3, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="exemplar::topk: Phi is on cpu but R is on cuda"):
        ops.topk(S.to(CUDA), R.to(CUDA), Phi, inv.to(CUDA), 3)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("N", [5, 300, 5000])
def test_topk_special_values_and_ties_match_cpu(N, largest):
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
        got = ops.topk_rank1(*[a.to(CUDA) for a in args], k, largest)
        assert torch.equal(got[1].cpu(), want[1])
        torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True)


def test_residuals_bad_label_is_catchable_on_cuda():
    data = make_data(20, 3, 4, seed=2, device=CUDA)
    labels = data.labels.clone()
    labels[7] = 3
    with pytest.raises(RuntimeError, match=r"exemplar::residuals: labels must be in \[0, C\) = \[0, 3\), got labels\[7\]=3"):
        ops.residuals(data.logits, labels)
    assert ops.residuals(data.logits, data.labels).shape == (20, 3)  # the CUDA context survived
