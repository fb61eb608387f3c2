"""The smaller refusals: arguments of the wrong kind, nothing to attribute,
DIVINE's and flip_labels' arguments, exact curvature on a head too large."""
import math

import pytest
import torch

import exemplar
from exemplar import ops
from helpers import make_data

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------- 11. smaller ones


def test_largest_must_be_a_bool():
    train, test = make_data(10, 3, 4, seed=1), make_data(2, 3, 4, seed=2)
    attr = exemplar.Attributor(train)
    for bad in (None, 0, "yes"):
        with pytest.raises(TypeError, match="largest must be True or False"):
            attr.topk(test, 3, largest=bad)
    one = torch.ones(1, 1, dtype=torch.float64)
    R, Phi = torch.ones(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    inv = torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="largest must be True or False"):
        ops.topk_rank1(one, one, R, Phi, inv, 2, None)
    with pytest.raises(TypeError, match=r"k must be an integer in \[1, N\] = \[1, 4\], got True"):
        ops.topk_rank1(one, one, R, Phi, inv, True, True)


def test_no_columns_to_attribute():
    empty = exemplar.LastLayerData(torch.zeros(5, 0), torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features have D=0 columns and bias=False"):
        exemplar.Attributor(empty, bias=False)
    attr = exemplar.Attributor(empty, bias=True, curvature="exact")  # a bias-only layer is fine
    assert attr.topk(exemplar.LastLayerData(torch.zeros(2, 0), torch.randn(2, 3)), 2)[1].shape == (2, 2)


def test_divine_arguments():
    train, test = make_data(30, 3, 4, seed=1), make_data(4, 3, 4, seed=2)
    attr = exemplar.Attributor(train)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, got nan"):
        exemplar.divine(attr, test, m=2, gamma=NAN)
    with pytest.raises(ValueError, match=r"chunk must be a positive integer, got 0"):
        exemplar.divine(attr, test, m=2, chunk=0)
    empty = exemplar.LastLayerData(test.features[:0], test.logits[:0])
    for call in (exemplar.divine, exemplar.divine_global):
        with pytest.raises(ValueError, match=r"test is empty"):
            call(attr, empty, m=2)
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0"):
        exemplar.divine_global(attr, test, m=2, gamma=-1.0)


def test_flip_labels_checks_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes\) = \[0, 3\), got labels\[1\]=3"):
        exemplar.flip_labels(torch.tensor([0, 3, 1]), 3, 0.5)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
        exemplar.flip_labels(torch.tensor([0, 0, 0]), 1, 0.5)


def test_exact_curvature_on_a_large_head_is_refused_up_front():
    train = exemplar.LastLayerData(torch.randn(4, 2000), torch.randn(4, 100), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MemoryError, match=r"exact curvature for C\*Dp = 200100 needs about .* GB.*"
                                          r"curvature='ekfac'"):
        exemplar.Attributor(train, curvature="exact")
