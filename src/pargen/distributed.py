"""torchrun support: one process group (gloo, so it runs on CPU) when launched with WORLD_SIZE > 1."""
from __future__ import annotations

import os

import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish() -> None:
    """Wait for every rank, then tear the process group down (exiting with it alive can abort gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
