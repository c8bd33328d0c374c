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

from tests._train_utils import (FAULTY, PY, REPO, build_tiny_dataset, deepspeed_cmd, env, overrides_list,
                                read_metrics, run)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("synthetic_ops"))


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {log.read_text()[-4000:]}")
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank_pids(launcher_pid: int, script: str = "launch/pretrain.py") -> list[int]:
    """PIDs of this job's training ranks: the ``script`` processes started by DeepSpeed's per-node
    launcher below ``launcher_pid`` (their DataLoader workers run the same command line, one level
    further down; other jobs on the machine are not descendants)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    table = {int(p): (int(pp), a) for p, pp, a in (line.split(None, 2) for line in out if line.strip())}

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == launcher_pid:
                return True
            pid = table.get(pid, (0, ""))[0]
        return False

    found = []
    for pid, (ppid, args) in table.items():
        parent_args = table.get(ppid, (0, ""))[1]
        if script in args and "deepspeed.launcher.launch" in parent_args and descends(pid):
            found.append(pid)
    return sorted(found)


def _start(cmd: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Output to a file, not a pipe: an orphaned DataLoader worker of a killed rank may hold a pipe open."""
    handle = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env() | (extra_env or {}), stdout=handle, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    """Never leave a job behind, and never mask the test's own failure with a cleanup error."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:  # and nothing of it that outlived the launcher (its process group, see _start)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _job_processes(pgid: int) -> list[str]:
    """Live (not zombie) processes of a job started by _start: its process group. Ranks and their
    DataLoader workers stay in it, also after their parent died."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_file.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(stat.split(")", 1)[0] + ")")
    return found


def _left_behind(pgid: int, timeout: float = 10) -> list[str]:
    deadline = time.time() + timeout
    while (left := _job_processes(pgid)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def test_dead_rank_fails_the_job_fast(dataset, tmp_path, port):
    out = tmp_path / "run"
    collective_timeout_s = 20
    ov = overrides_list(dataset, out, **{"train.steps": "500", "train.collective_timeout_s": str(collective_timeout_s)})
    log = tmp_path / "log.txt"
    proc = _start(deepspeed_cmd(port, "configs/zero3.json", ov), log)
    try:
        _wait_for_step(out, 2, proc, log)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        killed_at = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=90)
        elapsed = time.time() - killed_at
        left = _left_behind(proc.pid)
    finally:
        _finish(proc)
    assert proc.returncode != 0
    # Worst case, the surviving rank is blocked in a collective with the dead one and gives up after
    # train.collective_timeout_s; the allowance covers the launcher noticing (it polls its ranks every
    # second), killing the other rank's process tree and interpreter teardown on a loaded machine.
    teardown_allowance_s = 40
    assert elapsed < collective_timeout_s + teardown_allowance_s, f"job took {elapsed:.0f} s to fail after a rank died"
    # nothing of the job survives it: the killed rank's DataLoader workers die with it
    assert not left, f"processes of the failed job are still running: {left}"
    text = log.read_text()
    # the launcher names the failed rank's command line (--local_rank=1) and its exit code
    assert "--local_rank=1" in text.split("exits with return code = -9")[0].splitlines()[-1], text[-3000:]
    # and stopped the surviving rank itself rather than leaving it to time out
    assert f"Killing subprocess {ranks[0]}" in text, text[-3000:]


def test_nonfinite_steps_are_skipped_then_abort(dataset, tmp_path, port):
    out = tmp_path / "skip"
    ov = overrides_list(dataset, out, **{"train.steps": "6", "train.export": "false"})
    run(deepspeed_cmd(port, "configs/zero3.json", ov, extra_args=("--nonfinite", "3"), script=FAULTY))
    metrics = read_metrics(out)
    assert 3 not in [m["step"] for m in metrics]  # the skipped step logs no loss
    last = metrics[-1]
    assert last["nonfinite_steps"] == 1 and last["step"] == 6 and last["nonfinite_micro_batches"] == 1
    assert last["optimizer_steps"] == 5  # gradient_accumulation_steps 1: skipped outright, no DeepSpeed step

    out2 = tmp_path / "abort"
    ov2 = overrides_list(dataset, out2, **{"train.steps": "10", "train.max_nonfinite_steps": "3"})
    with pytest.raises(AssertionError, match="3 consecutive steps had a non-finite loss"):
        run(deepspeed_cmd(port + 1, "configs/zero3.json", ov2, extra_args=("--nonfinite", "2,3,4"), script=FAULTY))


def test_nonfinite_micro_batches_with_accumulation_keep_steps_aligned(dataset, tmp_path, port):
    """gradient_accumulation_steps 2: a non-finite micro-batch at micro-step 1 of step 3 gives a zero
    gradient and the step still updates (logged); step 5 has no good micro-batch and no update. DeepSpeed's
    optimizer steps stay the trainer's steps: before, the window broke off after one micro-batch and every
    later optimizer step straddled two trainer steps."""
    out = tmp_path / "accumulated"
    ov = overrides_list(dataset, out, **{"train.steps": "6", "train.export": "false", "data.val": "",
                                         "ds.gradient_accumulation_steps": "2"})
    run(deepspeed_cmd(port, "configs/zero3.json", ov, extra_args=("--nonfinite", "3.1,5"), script=FAULTY))
    metrics = {m["step"]: m for m in read_metrics(out)}
    assert sorted(metrics) == [1, 2, 3, 4, 6]
    assert [metrics[s]["optimizer_steps"] for s in sorted(metrics)] == [1, 2, 3, 4, 5]
    assert metrics[6]["nonfinite_steps"] == 1 and metrics[6]["nonfinite_micro_batches"] == 3
    assert metrics[3]["nonfinite_micro_batches"] == 1 and all(m["rows"] > 32 for m in metrics.values())  # 2 micro-batches


def test_a_failing_final_evaluation_never_costs_the_export(dataset, tmp_path, port):
    """The export is written before the final evaluation. Rank 0 failing to write the report is logged and
    the job ends 0; an evaluation that fails fails the job, and the export is there and loads either way."""
    import rcml

    out = tmp_path / "report_fails"
    ov = overrides_list(dataset, out, **{"train.steps": "3"})
    proc = run(deepspeed_cmd(port, "configs/zero3.json", ov, extra_args=("--fail-report",), script=FAULTY))
    text = proc.stdout + proc.stderr
    assert "eval step 3: writing or logging the report failed" in text, text[-3000:]
    assert "injected: writing the report of step 3 fails" in text
    assert not (out / "eval" / "step_00000003" / "report.json").exists()
    assert rcml.from_pretrained(out / "export").spec["mode"] == "rcml"

    out2 = tmp_path / "evaluation_fails"
    ov2 = overrides_list(dataset, out2, **{"train.steps": "3"})
    with pytest.raises(AssertionError, match="injected: the evaluation at step 3 fails"):
        run(deepspeed_cmd(port + 1, "configs/zero3.json", ov2, extra_args=("--fail-evaluation",), script=FAULTY))
    assert (out2 / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert rcml.from_pretrained(out2 / "export").spec["mode"] == "rcml"


def test_stop_request_checkpoints_and_resume_finishes(dataset, tmp_path, port):
    """The SLURM requeue path: a STOP file makes every rank checkpoint and exit 0; --resume continues."""
    out = tmp_path / "stop"
    ov = overrides_list(dataset, out, **{"train.steps": "12", "train.export": "false"})
    log = tmp_path / "log.txt"
    proc = _start(deepspeed_cmd(port, "configs/zero3.json", ov), log)
    try:
        _wait_for_step(out, 3, proc, log)
        (out / "STOP").touch()
        proc.wait(timeout=120)
    finally:
        _finish(proc)
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
    log = tmp_path / "log.txt"
    pids = tmp_path / "paused"
    proc = _start(deepspeed_cmd(port + 1, "configs/zero3.json", ov6, script=FAULTY,
                                extra_args=("--resume", "latest", "--save-pause-s", "60", "--pause-pids", str(pids))),
                  log)
    try:
        # each rank writes its pid once its checkpoint files are written, then pauses before publishing
        deadline = time.time() + 300
        while time.time() < deadline and len(list(pids.glob("rank*.pid"))) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert len(list(pids.glob("rank*.pid"))) == 2, f"no rank paused mid-save in 300 s: {log.read_text()[-3000:]}"
        assert len(list((out / "checkpoints").glob(".tmp-step_00000006/trainer_state_*"))) == 2
        ranks = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        os.kill(ranks[0], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        _finish(proc)
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
