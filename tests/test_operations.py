"""Operations at scale, on 2 CPU ranks: failing fast, non-finite steps, graceful stop, atomic saves,
two "nodes" on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests._train_utils import (PY, REPO, build_tiny_dataset, deepspeed_cmd, env, overrides_list, read_metrics,
                                run)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("synthetic_ops"))


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-4000:]}")
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the training processes (children running launch/pretrain.py) under the launcher."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    table = [(int(p), int(pp), a) for p, pp, a in (line.split(None, 2) for line in out if line.strip())]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in table:
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [launcher_pid]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            stack.append(child)
            args = next(a for p, _, a in table if p == child)
            if "launch/pretrain.py" in args and "deepspeed.launcher" not in args and "--local_rank" in args:
                found.append(child)
    return sorted(found)


def test_dead_rank_fails_the_job_fast(dataset, tmp_path, port):
    out = tmp_path / "run"
    ov = overrides_list(dataset, out, **{"train.steps": "500", "train.collective_timeout_s": "20"})
    proc = subprocess.Popen(deepspeed_cmd(port, "configs/zero3.json", ov), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(out, 2, proc)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        killed_at = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=90)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 60, f"job took {elapsed:.0f} s to fail after a rank died"
    log = stdout + stderr
    assert "exits with return code = -9" in log or "rank 1" in log.lower(), log[-3000:]


def test_nonfinite_steps_are_skipped_then_abort(dataset, tmp_path, port):
    out = tmp_path / "skip"
    ov = overrides_list(dataset, out, **{"train.steps": "6", "train.export": "false"})
    run(deepspeed_cmd(port, "configs/zero3.json", ov), extra_env={"RCML_TEST_NONFINITE_STEPS": "3"})
    metrics = read_metrics(out)
    assert 3 not in [m["step"] for m in metrics]  # the skipped step logs no loss
    assert metrics[-1]["nonfinite_steps"] == 1 and metrics[-1]["step"] == 6

    out2 = tmp_path / "abort"
    ov2 = overrides_list(dataset, out2, **{"train.steps": "10", "train.max_nonfinite_steps": "3"})
    with pytest.raises(AssertionError, match="3 consecutive steps had a non-finite loss"):
        run(deepspeed_cmd(port + 1, "configs/zero3.json", ov2), extra_env={"RCML_TEST_NONFINITE_STEPS": "2,3,4"})


def test_stop_request_checkpoints_and_resume_finishes(dataset, tmp_path, port):
    """The SLURM requeue path: a STOP file makes every rank checkpoint and exit 0; --resume continues."""
    out = tmp_path / "stop"
    ov = overrides_list(dataset, out, **{"train.steps": "12", "train.export": "false"})
    proc = subprocess.Popen(deepspeed_cmd(port, "configs/zero3.json", ov), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(out, 3, proc)
        (out / "STOP").touch()
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < 12 and not (out / "STOP").exists()
    run(deepspeed_cmd(port + 1, "configs/zero3.json", ov, extra_args=("--resume", "latest")))
    steps = [m["step"] for m in read_metrics(out)]
    assert steps[-1] == 12 and steps.count(stopped_at + 1) == 1


def test_rank_killed_mid_save_leaves_previous_checkpoint_loadable(dataset, tmp_path, port):
    out = tmp_path / "midsave"
    ov = overrides_list(dataset, out, **{"train.steps": "4", "train.ckpt_every": "2", "train.export": "false"})
    # first run: publishes step 2 and step 4
    run(deepspeed_cmd(port, "configs/zero3.json", ov))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # second run: resume to 6 steps, killed while saving step 6 (after DeepSpeed wrote its files)
    ov6 = overrides_list(dataset, out, **{"train.steps": "6", "train.ckpt_every": "2", "train.export": "false"})
    proc = subprocess.Popen(deepspeed_cmd(port + 1, "configs/zero3.json", ov6, extra_args=("--resume", "latest")),
                            cwd=REPO, env=env() | {"RCML_TEST_SAVE_PAUSE_S": "60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "checkpoints").glob(".tmp-step_00000006/trainer_state_*")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[0], signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000006").exists()
    # the previous checkpoint loads and training finishes from it
    run(deepspeed_cmd(port + 2, "configs/zero3.json", ov6, extra_args=("--resume", "latest")))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_two_nodes_equal_one_node(dataset, tmp_path, port):
    """torchrun --nnodes 2 (one rank each, rendezvous on 127.0.0.1) == deepspeed 2 ranks on one node."""
    steps = "6"
    single = tmp_path / "single"
    run(deepspeed_cmd(port, "configs/zero3.json",
                      overrides_list(dataset, single, **{"train.steps": steps, "train.export": "false"})))
    multi = tmp_path / "multi"
    ov = overrides_list(dataset, multi, **{"train.steps": steps, "train.export": "false"})
    rdzv = port + 1
    procs = [subprocess.Popen([PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(rdzv),
                               "launch/pretrain.py", "--ds_config", "configs/zero3.json", *ov],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    a = [m["loss"] for m in read_metrics(single)]
    b = [m["loss"] for m in read_metrics(multi)]
    assert len(a) == len(b) == int(steps)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
    assert json.loads((multi / "ds_config.json").read_text())["train_batch_size"] == 32
