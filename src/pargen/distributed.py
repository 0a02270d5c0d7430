"""torchrun support: one process group (gloo, so it runs on CPU) when launched with WORLD_SIZE > 1.

Work is split by rows: each rank takes a contiguous share (`share`) and `gather` puts the shares back together
in rank order, so the result is the one a single process computes for the same rows."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT_S = 120.0  # how long a collective waits for the other processes (gloo's default is 30 minutes)


def init() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun; (0, 1) otherwise. A process that stops
    (not dies) makes the others' next collective fail after `TIMEOUT_S` seconds, not hang."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group; (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int) -> slice:
    """This rank's contiguous share of n rows: ceil(n / world) rows each, the last ranks possibly fewer."""
    rank, size = world()
    per = -(-n // size)
    return slice(min(rank * per, n), min((rank + 1) * per, n))


def gather(part: torch.Tensor) -> torch.Tensor:
    """Every rank's rows `part` (the rank's share), concatenated in rank order on every rank; `part` itself
    outside torchrun. Shares may differ in length."""
    _, size = world()
    if size == 1:
        return part
    lengths = [torch.zeros((), dtype=torch.long) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor(len(part)))
    longest = int(max(lengths))
    buf = part.new_zeros((longest,) + tuple(part.shape[1:]))
    buf[: len(part)] = part
    parts = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(parts, buf)
    return torch.cat([p[: int(k)] for p, k in zip(parts, lengths)])


def finish() -> None:
    """Wait for every rank, then tear the process group down (exiting with it alive can abort gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
