"""The collectives an Attributor needs, over torch.distributed (NCCL on GPUs,
gloo on CPUs: whatever process group the user started, e.g. with torchrun), or
their single-process identities. Sums are of float64 statistics; top-k parts
are gathered and merged by the caller. Before any collective whose meaning
depends on what each rank was asked, the ranks `agree` (one small
all_gather_object) and every rank raises the same error when they differ; a
rank that died makes its peers' next collective fail after the process
group's timeout (init_process_group(timeout=...); torch's default is 10
minutes for NCCL and 30 for gloo), never wait forever."""
from __future__ import annotations

import json

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

    def agree(self, what: str, fields: dict, described: dict | None = None) -> None:
        """Refuses, on every rank alike, ranks whose `fields` (JSON-able values
        by name) differ: the error names the first field that differs and what
        each rank holds (described[field] on each rank, when given, is shown
        instead of the raw value)."""
        if not self.distributed:
            return
        seen = [None] * self.world
        dist.all_gather_object(seen, (fields, described or {}))
        for name in fields:
            values = [json.dumps(f.get(name), sort_keys=True, default=str) for f, _ in seen]
            if len(set(values)) > 1:
                shown = [d.get(name, f.get(name)) for f, d in seen]
                groups = {v: [r for r, w in enumerate(values) if w == v] for v in dict.fromkeys(values)}
                raise ValueError(f"the ranks were given different {what}: " + "; ".join(
                    f"ranks {ranks} have {name}={shown[ranks[0]]!r}" for ranks in groups.values())
                    + f"; every rank must be given the same {name}")

    def together(self, steps):
        """Yields what the iterable `steps` yields on this rank. When it ends or
        raises, the ranks compare notes (one small all_gather_object): if any
        rank raised, every rank raises the same error (the lowest failing
        rank's, as a ValueError or TypeError when it was one, else a
        RuntimeError), so no rank is left waiting in a collective its peers
        never reach. A KeyboardInterrupt on one rank is told to the others
        (a RuntimeError naming it) and raised again on its own. One process:
        the error as it was raised."""
        try:
            yield from steps
            failure = None
        except (Exception, KeyboardInterrupt) as err:  # not GeneratorExit: a consumer that stops early
            if not self.distributed:
                raise
            failure = err
        if not self.distributed:
            return
        seen = [None] * self.world
        dist.all_gather_object(seen, None if failure is None else (type(failure).__name__, str(failure)))
        failed = [(rank, note) for rank, note in enumerate(seen) if note is not None]
        if isinstance(failure, KeyboardInterrupt):
            raise failure
        if failed:
            rank, (kind, message) = failed[0]
            cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
            raise cls(f"rank {rank} of {self.world}: {message}") from failure

    def call_together(self, fn):
        """fn()'s result, its errors raised on every rank alike (together)."""
        return list(self.together(fn() for _ in range(1)))[0]  # exhausted, so the ranks compare notes

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a collective decision)."""
        if not self.distributed:
            return flag
        seen = [None] * self.world
        dist.all_gather_object(seen, bool(flag))
        return all(seen)
