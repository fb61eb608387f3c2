"""What every facade answers, once (docs/design.md §3, §11): scores, total
and subset scores, self-influence, top-k merged across ranks and
explanations, from a resolved method, a checked test set, the fitted
Context (fitted.py), the passes over the training blocks (passes.py) and
the process group (distributed.py). An Attributor (a last layer) and a
NetworkExplainer (a network's layers) differ only in how they check a test
set, which methods they take and how they name a test set to the ranks."""
from __future__ import annotations

import torch

from .. import methods
from ..methods import Method
from ..ops import check_k
from ..results import Explanation, TopK
from ..storage.saved import digest


class Answers:
    """The calls both facades answer. A facade calls _engine(passes, fitted,
    group) once built, and provides check_test(test), _test_digest(test) and
    num_train; _method(name) is the registry's lookup unless it overrides it."""

    def _engine(self, passes, fitted, group) -> None:
        self._passes, self._fitted, self._group = passes, fitted, group

    @property
    def context(self):
        """The fitted state methods see (an exemplar.methods.Context): what to
        pass to a Method's own functions, such as the RPS-l2 refit."""
        return self._fitted

    def _method(self, name) -> Method:
        """The registered method `name` (the error lists them)."""
        return methods.get(name)

    def _test_digest(self, test) -> str:
        """A short digest naming a checked test set, for the ranks to agree on."""
        raise NotImplementedError

    def _agree(self, call: str, method: str, test, **arguments) -> None:
        """With distributed=True: every rank was asked the same (call, method,
        test set, arguments) and holds the same fits, or every rank raises."""
        if not self._group.distributed:
            return
        fitted = self._fitted
        self._group.agree("queries", {"call": call, "method": method, **arguments,
                                      "test": None if test is None else self._test_digest(test),
                                      "fits": sorted(fitted.cache) + sorted(fitted.extra_curvatures)})

    def _asked(self, call: str, test, method: str, **arguments):
        """(Method, checked test set, Query) of one call, the ranks agreed."""
        m, test = self._method(method), self.check_test(test)
        self._agree(call, method, test, **arguments)
        return m, test, m.query(self._fitted, test)

    def _scores(self, test, method: str) -> torch.Tensor:
        m, test, q = self._asked("scores", test, method)
        return self._passes.per_row(f"scores {method}", (len(test),),
                                    lambda rows: q.scores(m.operands(self._fitted, rows)))

    def _total_scores(self, test, method: str) -> torch.Tensor:
        m, test, q = self._asked("total_scores", test, method)
        return self._passes.per_row(f"total_scores {method}", (),
                                    lambda rows: q.total(m.operands(self._fitted, rows)))

    def _subset_scores(self, test, subsets: torch.Tensor, method: str) -> torch.Tensor:
        N = self.num_train
        if not isinstance(subsets, torch.Tensor) or subsets.dtype != torch.bool or subsets.dim() != 2 \
                or subsets.shape[1] != N:
            got = (tuple(subsets.shape), subsets.dtype) if isinstance(subsets, torch.Tensor) else type(subsets).__name__
            raise ValueError(f"subsets must be an (M, N={N}) bool tensor, got {got}")
        m, test, q = self._asked("subset_scores", test, method, subsets=digest(subsets)[:16])
        masks = subsets.to(self._passes.train.device)
        return self._passes.sum(f"subset_scores {method}", lambda rows: q.scores(
            m.operands(self._fitted, rows)).double() @ masks[:, rows.positions].T.double())

    def _self_influence(self, method: str) -> torch.Tensor:
        m = self._method(method)
        self._agree("self_influence", method, None)
        return self._passes.per_row(f"self_influence {method}", (),
                                    lambda rows: m.self_influence(self._fitted, rows))

    def _best(self, test, k: int, m: Method, largest: bool, precision: str, label: str | None = None):
        """(values, indices) (T, k): the top k of a checked test set by a
        resolved method over every training block, merged across ranks."""
        q = m.query(self._fitted, test)
        label = f"topk {m.name}" if label is None else (label or None)
        return self._passes.topk_merged(len(test), k, largest, label, lambda rows, kb: q.topk(
            m.operands(self._fitted, rows), kb, largest, precision))

    def _explain(self, test, k: int, method: str, opponents: int, precision: str) -> Explanation:
        if isinstance(opponents, bool) or not isinstance(opponents, int) or not 0 <= opponents <= self.num_train:
            raise ValueError(f"opponents must be an integer in [0, N] = [0, {self.num_train}], got {opponents!r}")
        check_k(k, self.num_train)
        m, test = self._method(method), self.check_test(test)
        self._agree("explain", method, test, k=k, opponents=opponents)
        against = TopK(*self._best(test, opponents, m, False, precision)) if opponents else None
        return Explanation.of(test, TopK(*self._best(test, k, m, True, precision)), method, against)
