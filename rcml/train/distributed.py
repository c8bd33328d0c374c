"""Process-group setup and the few collectives the trainer itself needs.

The launchers (deepspeed, torchrun, srun) export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; we only initialize from them. The collective timeout is what turns a dead peer into an
error on every surviving rank instead of a hang (see README, "Failing fast").

Two timeouts, as torchtitan has them: steps run under a short one (``train.collective_timeout_s``: a dead
rank fails the job within a minute); start-up (until the first step is done, which includes a resumed
loader's fast-forward), checkpoints, evaluations and the export run under a long one
(``train.phase_timeout_s``), because in those the ranks legitimately drift apart: one rank hashes more
files, rank 0 writes reports, prunes and logs while the others wait at the phase's closing barrier.
The switch is local to each rank (no collective); every phase ends with a barrier under the long
timeout, so no rank enters the next step's collectives, under the short one, while another rank is
still inside the phase.
"""

from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("rcml")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int) -> WorldInfo:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"launch/pretrain.py must be started by a launcher (missing {', '.join(missing)}): use "
            "`deepspeed --num_gpus N launch/pretrain.py ...` or `torchrun --nproc_per_node N launch/pretrain.py ...`"
        )
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return WorldInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def set_collective_timeout(seconds: float) -> None:
    """The default group's timeout for every later collective on this rank (NCCL and gloo)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # the call torchtitan makes for this

    _set_pg_timeout(datetime.timedelta(seconds=seconds))


@contextmanager
def long_phase(long_s: float, short_s: float) -> Iterator[None]:
    """Collectives inside wait up to ``long_s``; a closing barrier (still under ``long_s``), then ``short_s``."""
    set_collective_timeout(long_s)
    try:
        yield
        dist.barrier()
    finally:
        set_collective_timeout(short_s)


def all_reduce_max(flag: bool | float, device: torch.device) -> float:
    """Every rank learns the maximum: used so that all ranks agree to skip, stop or save together."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_counters(counters: dict[str, int]) -> dict[str, int]:
    """Sum ``{reason: count}`` dictionaries over ranks (keys may differ between ranks)."""
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counters))
    total: dict[str, int] = {}
    for part in gathered:
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total
