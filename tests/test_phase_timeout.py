"""Two collective timeouts: a phase (checkpoint, evaluation, export, start-up) waits for a rank that is
busy longer than the step timeout; a step collective does not. 2 gloo ranks."""

from __future__ import annotations

import datetime
import json
import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from rcml.train.distributed import long_phase, set_collective_timeout
from tests.conftest import free_port

SHORT_S, LONG_S, BUSY_S = 3, 60, 7  # the busy rank outlasts the short timeout, not the long one


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=LONG_S))
    set_collective_timeout(SHORT_S)  # as the trainer does after its first step
    record: dict = {}
    start = time.monotonic()
    with long_phase(LONG_S, SHORT_S):
        if rank == 1:
            time.sleep(BUSY_S)  # rank 0 waits at the phase's closing barrier
    record["phase_s"] = time.monotonic() - start
    start = time.monotonic()
    try:
        if rank == 1:
            time.sleep(BUSY_S + 3)  # now rank 0 waits in a step collective, under the short timeout
        dist.barrier()
        record["step"] = "completed"
    except Exception as err:  # gloo raises on its timeout
        record["step"] = f"raised {type(err).__name__}"
    record["step_s"] = time.monotonic() - start
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)
    os._exit(0)  # the group is broken after a timeout: no orderly teardown


def test_a_phase_waits_longer_than_a_step(tmp_path):
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(free_port(), out), nprocs=2, start_method="spawn", join=True)
    r0 = json.loads(open(f"{out}.0").read())
    assert BUSY_S - 1 < r0["phase_s"] < LONG_S  # waited for the busy rank, did not fail
    assert r0["step"].startswith("raised"), r0  # the same wait in a step fails ...
    assert r0["step_s"] < BUSY_S + 2, r0        # ... after the short timeout, before the busy rank came back
