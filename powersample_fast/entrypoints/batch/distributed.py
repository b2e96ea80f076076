"""Data parallelism for `powersample-fast run` under `torchrun` (torch.distributed).

Each rank takes the input lines whose 0-based line number is congruent to its rank modulo the world
size, runs them on its own device (`cuda:LOCAL_RANK`, or the CPU), and appends its records to its own
part file; after a barrier rank 0 merges the output and every part into the output, in input order.
A chain's seed depends only on (seed, line id, sample), so the same seed gives the same per-line result
whatever the number of ranks. The process group only synchronises (barrier, a few small gathers), so
it uses gloo, which needs no GPU and crosses nodes through torchrun's rendezvous; the output folder
must be one that every rank can read (a shared filesystem across nodes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, line_no: int) -> bool:
        """Whether this rank runs input line `line_no` (1-based)."""
        return (line_no - 1) % self.world_size == self.rank


def init(timeout_s: float = 7 * 24 * 3600) -> DistInfo:
    """Read torchrun's environment; with more than one rank, join the (gloo) process group. The
    timeout bounds the final barrier, where fast ranks wait for the slowest shard."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return info


def device_for(info: DistInfo, requested: Optional[str]) -> Optional[str]:
    """One GPU per rank (cuda:LOCAL_RANK) unless a device was given; None lets the loader choose."""
    if requested is not None:
        return requested
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return None


def barrier(info: DistInfo):
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(info: DistInfo, obj) -> List:
    """Every rank's `obj` on rank 0 (others get [])."""
    if info.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def all_ok(info: DistInfo, ok: bool) -> bool:
    """Whether every rank reports ok (so that all ranks stop together on a setup error)."""
    if info.world_size == 1:
        return ok
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, bool(ok))
    return all(out)


def finish(info: DistInfo):
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
