"""Top-k on special values (NaN, inf) and ties, raw and through the API, and
the ops' refusals of operands on another device or with gradients: where an
answer used to come back silently wrong or the process died."""
import math

import pytest
import torch

import exemplar
from exemplar import ops
from helpers import opcheck_cases, policy_order

NAN, INF = math.nan, math.inf


def raw_topk(scores, k, largest=True, device="cpu", kernel="default"):
    """The rank-1 op with R = alpha = beta = inv_norm = 1, so the scores are
    `scores`; the result on the CPU."""
    s = torch.tensor(scores, dtype=torch.float64, device=device).view(-1, 1)
    one = torch.ones(1, 1, dtype=torch.float64, device=device)
    values, indices = ops.topk_rank1(one, one, torch.ones_like(s), s, torch.ones_like(s[:, 0]), k, largest,
                                     kernel=kernel)
    return values.cpu(), indices.cpu()


# ---------------------------------------------------------------- 1. NaN and inf


@pytest.mark.parametrize("scores,k,largest,want", [
    ([NAN, 1, 2, 3], 2, True, [3, 2]),
    ([NAN, 1, 2, 3], 4, True, [3, 2, 1, 0]),
    ([NAN, 1, 2, 3], 4, False, [1, 2, 3, 0]),
    ([-INF, -INF, 2, 3], 4, True, [3, 2, 0, 1]),
    ([INF, INF, 2, 3], 4, False, [2, 3, 0, 1]),
    ([NAN, INF, NAN, -INF], 4, True, [1, 3, 0, 2]),
    ([NAN, NAN, NAN], 2, True, [0, 1]),
])
def test_topk_special_values_follow_the_policy(scores, k, largest, want, device, kernel):
    values, indices = raw_topk(scores, k, largest, device, kernel)
    assert indices[0].tolist() == want == policy_order(scores, largest)[:k]
    torch.testing.assert_close(values[0], torch.tensor(scores, dtype=torch.float64)[want], equal_nan=True)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_agrees_with_scores_on_special_values(largest, device, kernel):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, generator=g, dtype=torch.float64)
    scores[torch.randperm(300, generator=g)[:40]] = NAN
    scores[torch.randperm(300, generator=g)[:20]] = INF
    scores[torch.randperm(300, generator=g)[:20]] = -INF
    values, indices = raw_topk(scores.tolist(), 300, largest, device, kernel)
    assert indices[0].tolist() == policy_order(scores.tolist(), largest)
    one = torch.ones(1, 1, dtype=torch.float64)
    dense = ops.scores_rank1(one, one, torch.ones(300, 1, dtype=torch.float64), scores.view(-1, 1),
                             torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(dense.gather(1, indices), values, equal_nan=True)


# ---------------------------------------------------------------- 2. ties


def test_ties_by_ascending_index_raw(device, kernel):
    assert raw_topk([0, 0, 1, 1], 3, device=device, kernel=kernel)[1].tolist() == [[2, 3, 0]]
    assert raw_topk([0, 0, 1, 1], 3, largest=False, device=device, kernel=kernel)[1].tolist() == [[0, 1, 2]]


def test_ties_by_ascending_index_through_the_api():
    features = torch.tensor([[1.0, 0], [1, 0], [2, 0], [2, 0]], dtype=torch.float64)
    logits = torch.zeros(4, 2, dtype=torch.float64)
    train = exemplar.LastLayerData(features, logits, torch.zeros(4, dtype=torch.long))
    attr = exemplar.Attributor(train, curvature="identity", bias=False)
    test = exemplar.LastLayerData(features[:1], logits[:1])
    assert attr.topk(test, 3, "grad_dot")[1].tolist() == [[2, 3, 0]]
    assert attr.topk(test, 4, "grad_dot")[1].tolist() == [[2, 3, 0, 1]]


@pytest.mark.parametrize("path", ["general", "rank1"])
def test_ties_across_tiles(path, device, kernel):
    """Integer scores with many ties over several train tiles: top-k(k) is a
    prefix of top-k(k + 1) and equals the policy's order."""
    g = torch.Generator().manual_seed(5)
    N = 5000
    target = torch.randint(-3, 4, (N,), generator=g).double()
    R = torch.ones(N, 2, dtype=torch.float64)
    Phi = torch.stack([target, torch.zeros(N, dtype=torch.float64)], 1)
    inv = torch.ones(N, dtype=torch.float64)
    R, Phi, inv = R.to(device), Phi.to(device), inv.to(device)
    if path == "general":
        S = torch.zeros(1, 2, 2, dtype=torch.float64)
        S[0, 0, 0] = 1  # score = R[i,0] * Phi[i,0]
        run = lambda k: ops.topk(S.to(device), R, Phi, inv, k, True, kernel=kernel)  # noqa: E731
    else:
        a = torch.tensor([[1.0, 0]], dtype=torch.float64, device=device)
        run = lambda k: ops.topk_rank1(a, a, R, Phi, inv, k, True, kernel=kernel)  # noqa: E731
    want = policy_order(target.tolist(), True)
    for k in (1, 7, 700, 701, N):
        assert run(k)[1][0].cpu().tolist() == want[:k]


# ---------------------------------------------------------------- 11, 12. ops: mixed devices, operands with grad


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_ops_refuse_an_operand_on_another_device(case):
    op, args = opcheck_cases()[case]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in (tensors[0], tensors[-1]):  # the first operand elsewhere, then the last
        moved = tuple(a.to("meta") if j == i else a for j, a in enumerate(args))
        with pytest.raises(RuntimeError, match=r"exemplar::\w+: \w+ is on (meta|cpu) but \w+ is on (cpu|meta)"):
            op(*moved)
    meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))  # all on meta: shapes only
    for got, want in zip(meta if isinstance(meta, tuple) else (meta,), (lambda r: r if isinstance(r, tuple)
                                                                        else (r,))(op(*args))):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_ops_take_operands_that_require_grad_and_say_they_have_no_derivative(case):
    op, args = opcheck_cases()[case]
    graded = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    got, want = op(*graded), op(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert torch.equal(g.detach(), w)
    differentiable = [g for g in got if g.requires_grad]
    assert differentiable  # every op has a floating output
    with pytest.raises(RuntimeError, match=rf"derivative for exemplar::{op.__name__.split('.')[0]} is not implemented"):
        differentiable[0].sum().backward()
