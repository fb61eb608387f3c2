"""The collectives an Attributor needs, over torch.distributed (NCCL on GPUs,
gloo on CPUs: whatever process group the user started, e.g. with torchrun), or
their single-process identities. Sums are of float64 statistics; top-k parts
are gathered and merged by the caller."""
from __future__ import annotations

import torch
import torch.distributed as dist


class ProcessGroup:
    """This process's rank in `world` processes; the collectives are identities on one."""
    def __init__(self, rank: int, world: int, distributed: bool):
        self.rank, self.world, self.distributed = rank, world, distributed

    @classmethod
    def single(cls) -> "ProcessGroup":
        """One process: no collectives."""
        return cls(0, 1, False)

    @classmethod
    def default(cls) -> "ProcessGroup":
        """The default torch.distributed process group, which must be initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised: run under torchrun and "
                             "call torch.distributed.init_process_group() first (backend 'gloo' on CPU, "
                             "'nccl' on GPUs)")
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def all_sum(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each tensor summed over the ranks, in place."""
        if self.distributed:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tensors

    def all_gather(self, part: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
        """Every rank's `part` (same shapes on every rank), in rank order."""
        if not self.distributed:
            return [part]
        gathered = [[torch.empty_like(t) for _ in range(self.world)] for t in part]
        for t, out in zip(part, gathered):
            dist.all_gather(out, t.contiguous())
        return [tuple(out[r] for out in gathered) for r in range(self.world)]

    def share(self, T: int) -> slice:
        """This rank's rows of T when they are split across ranks."""
        per = -(-T // self.world)
        return slice(min(T, self.rank * per), min(T, (self.rank + 1) * per))

    def gather_rows(self, rows: torch.Tensor, T: int) -> torch.Tensor:
        """The (T, ...) whole from each rank's share(T) rows."""
        per = -(-T // self.world)
        padded = rows.new_zeros((per,) + tuple(rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        return torch.cat([p for (p,) in self.all_gather((padded,))])[:T]

    def check_same(self, fingerprint: str, what: str) -> None:
        """Refuses ranks that were given different `what`s (e.g. stores)."""
        if not self.distributed:
            return
        seen = [None] * self.world
        dist.all_gather_object(seen, fingerprint)
        if len(set(seen)) > 1:
            ranks = {f: [r for r, g in enumerate(seen) if g == f] for f in dict.fromkeys(seen)}
            raise ValueError(f"the ranks were given different {what}s: " +
                             "; ".join(f"ranks {r} have {f}" for f, r in ranks.items()) +
                             f"; every rank must open the same {what}")
