"""Multi-node launch: SLURM node-list and GPU-count parsing, the per-node command, and the sbatch script
run without SLURM: as a dry run, and as a job against fake `srun` / `scontrol` / `squeue` executables."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch" / "slurm"))
import node_launch  # noqa: E402
from node_launch import expand_nodelist, node_command, parse_gpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
BASE_YAML = REPO / "configs" / "pretrain" / "base.yaml"
SHARDS = "data.train=/data/s-{000..099}.tar"


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[1-2],b[09-11],login", ["a1", "a2", "b09", "b10", "b11", "login"]),
    ("rack1-n[8-9]", ["rack1-n8", "rack1-n9"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("value, gpus", [("8", 8), ("gpu:8", 8), ("a100:8", 8), ("gpu:a100:4(S:0-1)", 4),
                                         ("a100:4,v100:2", 6)])
def test_parse_gpus_reads_slurm_forms(value, gpus):
    assert parse_gpus(value) == gpus


@pytest.mark.parametrize("value", ["", "gpu", "a100:x", "8 gpus"])
def test_parse_gpus_refuses_what_is_not_a_count(value):
    with pytest.raises(ValueError, match="GPU count"):
        parse_gpus(value)


def test_node_command_ranks_share_one_rendezvous():
    hosts = ["n1", "n2", "n3"]
    cmds = [node_command(hosts, r, 8, 12345, "python", ["--ds_config", "z.json"]) for r in range(3)]
    for rank, cmd in enumerate(cmds):
        assert f"--node-rank={rank}" in cmd and "--nnodes=3" in cmd and "--nproc-per-node=8" in cmd
        assert "--master-addr=n1" in cmd and "--master-port=12345" in cmd
        assert cmd[-2:] == ["--ds_config", "z.json"]
    with pytest.raises(ValueError):
        node_command(hosts, 3, 8, 1, "python", [])


@pytest.fixture
def no_slurm(monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")] + ["MASTER_PORT"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_node_launch_refuses_an_unknown_gpu_count(no_slurm, capsys):
    argv = ["--dry-run", "--nodelist", "n[1-2]", "--", "--ds_config", "z.json"]
    assert node_launch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "GPUs per node is unknown" in err and "--gpus-per-node" in err
    no_slurm.setenv("SLURM_GPUS_PER_NODE", "a100:4")  # what sbatch --gpus-per-node=a100:4 sets
    assert node_launch.main(argv) == 0
    assert all("--nproc-per-node=4" in line for line in capsys.readouterr().out.splitlines())


def test_node_launch_checks_the_gpus_torch_sees(no_slurm, capsys):
    import torch

    launched = []
    no_slurm.setattr(node_launch.os, "execv", lambda path, cmd: launched.append(cmd))
    no_slurm.setattr(torch.cuda, "is_available", lambda: True)
    no_slurm.setattr(torch.cuda, "device_count", lambda: 4)
    argv = ["--nodelist", "n[1-2]", "--node-rank", "1", "--gpus-per-node", "8", "--", "--ds_config", "z.json"]
    assert node_launch.main(argv) == 2 and launched == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[n2]" in err and "4 visible GPUs" in err and "starts 8 ranks" in err

    no_slurm.setattr(torch.cuda, "device_count", lambda: 8)
    node_launch.main(argv)
    assert len(launched) == 1 and "--nproc-per-node=8" in launched[0] and "--node-rank=1" in launched[0]

    # a CPU-only node: the count is the number of processes, and the log says so
    no_slurm.setattr(torch.cuda, "is_available", lambda: False)
    node_launch.main(argv)
    assert len(launched) == 2 and "--nproc-per-node=8" in launched[1]
    assert "no CUDA device on this node: starting 8 CPU processes" in capsys.readouterr().out


def test_base_config_is_the_cluster_config_the_script_names():
    from rcml.config import ConfigError, load_config
    from rcml.model_size import load_size

    named = set(re.findall(r"configs/[\w/.-]+\.(?:yaml|json)", SBATCH.read_text()))
    assert "configs/pretrain/base.yaml" in named
    assert all((REPO / path).is_file() for path in named), named
    with pytest.raises(ConfigError, match="data.train"):  # a placeholder: the shards are the user's to name
        load_config(BASE_YAML)
    cfg = load_config(BASE_YAML, ["data.train=/shared/shards/shard-{000000..009999}.tar"])
    patch = load_size(cfg.model.name)["vision"]["patch_size"]
    assert cfg.model.name == "base" and cfg.data.image_size == 224 and cfg.data.image_size % patch == 0
    assert cfg.data.groups_per_batch * cfg.data.members_per_group == 256
    assert cfg.data.workers == 8 and cfg.tracking.mlflow
    assert not cfg.train.out_dir.startswith("runs/")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM's variables (a test may run inside a real job), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "RCML_REPO", "RCML_STOP_WAIT_S")}
    env.update({"RCML_PYTHON": sys.executable, **extra})
    return env


def sbatch(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def node_lines(stdout: str) -> list[tuple[str, list[str]]]:
    """``[host] cmd ...`` lines -> (host, argv)."""
    lines = [line for line in stdout.splitlines() if re.match(r"\[[\w.-]+\] ", line)]
    return [(line[1:line.index("]")], shlex.split(line.split("] ", 1)[1])) for line in lines]


@pytest.mark.parametrize("gpu_var, gpu_value", [("SLURM_GPUS_ON_NODE", "4"), ("SLURM_GPUS_PER_NODE", "gpu:4")])
def test_sbatch_dry_run_with_fake_slurm_environment(tmp_path, gpu_var, gpu_value):
    env = clean_env(SLURM_JOB_NODELIST="gpu[07-09]", SLURM_JOB_ID="4242", **{gpu_var: gpu_value})
    run = sbatch("--dry-run", "--ds_config", "configs/zero3.json", "--config", str(BASE_YAML), SHARDS,
                 f"train.out_dir={tmp_path}/run", env=env)
    assert run.returncode == 0, run.stderr
    nodes = node_lines(run.stdout)
    assert [host for host, _ in nodes] == ["gpu07", "gpu08", "gpu09"]
    for rank, (_, cmd) in enumerate(nodes):
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert f"--node-rank={rank}" in cmd and "--nnodes=3" in cmd and "--nproc-per-node=4" in cmd
        assert "--master-addr=gpu07" in cmd
        # 10000 + job id % 20000: distinct jobs, distinct ports, all below the ephemeral range (32768-60999)
        assert "--master-port=14242" in cmd
        assert cmd[cmd.index("--resume") + 1] == "auto"  # the first start and every requeue alike
        assert SHARDS in cmd


def test_sbatch_dry_run_without_slurm(tmp_path):
    args = ["--ds_config", "configs/zero3.json", "--config", str(BASE_YAML), SHARDS, f"train.out_dir={tmp_path}"]
    run = sbatch("--dry-run", "--gpus-per-node", "2", *args, env=clean_env())
    assert run.returncode == 0, run.stderr
    ((host, cmd),) = node_lines(run.stdout)
    assert host == "localhost" and "--nnodes=1" in cmd and "--nproc-per-node=2" in cmd
    assert "--master-addr=localhost" in cmd and "--master-port=10000" in cmd
    assert "localhost" in run.stderr  # says which default it took

    run = sbatch("--dry-run", "--nodelist", "n[1-2]", "--gpus-per-node", "2", *args, env=clean_env())
    assert [host for host, _ in node_lines(run.stdout)] == ["n1", "n2"]

    run = sbatch("--dry-run", *args, env=clean_env())  # no GPU count anywhere: no guess
    assert run.returncode != 0 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "GPUs per node is unknown" in errors[0]


def test_sbatch_help_prints_the_header_without_slurm():
    run = sbatch("--help", env=clean_env(RCML_PYTHON="/nonexistent/python"))
    assert run.returncode == 0, run.stderr
    assert "sbatch --nodes=16" in run.stdout and "--dry-run" in run.stdout and "mkdir -p logs" in run.stdout
    assert "#SBATCH" not in run.stdout and "set -euo" not in run.stdout


def test_sbatch_dry_run_warns_when_the_log_directory_is_missing(tmp_path):
    args = ["--dry-run", "--gpus-per-node", "1", "--config", str(BASE_YAML), SHARDS]
    run = sbatch(*args, env=clean_env(), cwd=tmp_path)
    assert run.returncode == 0 and f"{tmp_path}/logs does not exist" in run.stderr and "mkdir -p logs" in run.stderr
    (tmp_path / "logs").mkdir()
    run = sbatch(*args, env=clean_env(), cwd=tmp_path)
    assert run.returncode == 0 and "logs does not exist" not in run.stderr


FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_DIR/srun.args"
echo "srun start" >> "$FAKE_DIR/events"
if [ -e "$FAKE_STOP" ]; then echo "stale STOP at step start" >> "$FAKE_DIR/events"; fi
touch "$FAKE_DIR/srun.started"
case $FAKE_SRUN in
  exit) exit 0 ;;
  until-stop)  # the trainer: checkpoint at the next step once STOP exists, then exit
    while [ ! -e "$FAKE_STOP" ]; do sleep 0.1; done
    echo "step saw STOP" >> "$FAKE_DIR/events"; exit 0 ;;
  hang)  # a step (or save) slower than the lead time
    trap 'echo "srun terminated" >> "$FAKE_DIR/events"; exit 143' TERM
    while :; do sleep 0.1; done ;;
esac
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/events"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\n' $FAKE_HOSTS; fi
"""
FAKE_SQUEUE = """#!/bin/bash
echo "$FAKE_TIME_LEFT"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A job's environment with fake srun / scontrol / squeue first on PATH; they log to <dir>/events."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out_dir = tmp_path / "run"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_STOP=str(out_dir / "STOP"),
                    FAKE_HOSTS="gpu01 gpu02", FAKE_SRUN="exit", FAKE_TIME_LEFT="",
                    SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_ON_NODE="8",
                    SLURM_CPUS_PER_TASK="64")
    args = ["--ds_config", "configs/zero3.json", "--config", str(BASE_YAML), SHARDS, f"train.out_dir={out_dir}"]
    return env, args, tmp_path, out_dir


def events(fake_dir: Path) -> list[str]:
    path = fake_dir / "events"
    return path.read_text().splitlines() if path.exists() else []


def test_sbatch_job_gives_srun_the_cpus_per_task(fake_slurm):
    env, args, fake_dir, _ = fake_slurm
    run = sbatch(*args, env=env)
    assert run.returncode == 0, run.stderr
    srun_args = (fake_dir / "srun.args").read_text().split("\0")[:-1]
    assert "--cpus-per-task=64" in srun_args  # Slurm >= 22.05 no longer passes it on from sbatch
    node_cmd = srun_args[srun_args.index(sys.executable):]
    assert node_cmd[1].endswith("launch/slurm/node_launch.py") and "--nodelist" in node_cmd
    assert node_cmd[node_cmd.index("--nodelist") + 1] == "gpu01,gpu02"
    assert [host for host, _ in node_lines(run.stdout)] == ["gpu01", "gpu02"]  # every node's command, in the log
    assert all("--master-port=10077" in cmd for _, cmd in node_lines(run.stdout))
    assert not any("requeue" in e for e in events(fake_dir))


def test_sbatch_job_stops_on_a_bad_config_before_srun(fake_slurm):
    env, args, fake_dir, _ = fake_slurm
    for mode in (["--dry-run"], []):
        run = sbatch(*mode, *args, "model.beta=7", env=env)
        assert run.returncode != 0 and "model.beta" in run.stderr and node_lines(run.stdout) == []
    assert not any(e.startswith("srun") for e in events(fake_dir))


@pytest.fixture
def start_job():
    """Start the script as a job in its own process group; wait until the (fake) job step runs.

    Whatever is left of the group (the script, its step) is killed at the end of the test."""
    procs = []

    def start(env: dict[str, str], args: list[str], fake_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", str(SBATCH), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not (fake_dir / "srun.started").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job step never started: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.05)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_sbatch_usr1_checkpoints_then_requeues(fake_slurm, start_job):
    env, args, fake_dir, out_dir = fake_slurm
    out_dir.mkdir()
    (out_dir / "STOP").touch()  # left by an earlier step killed before it saw it
    proc = start_job(dict(env, FAKE_SRUN="until-stop"), args, fake_dir)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends before the time limit
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert (out_dir / "STOP").exists()
    log = events(fake_dir)
    assert "stale STOP at step start" not in log
    assert log[-2:] == ["step saw STOP", "scontrol requeue 77"]  # requeued after the step saved and exited


def test_sbatch_usr1_requeues_when_the_step_overruns_the_lead_time(fake_slurm, start_job):
    env, args, fake_dir, out_dir = fake_slurm
    # 31 s left at USR1: the script requeues 30 s before the limit, i.e. after 1 s, with the step still running
    proc = start_job(dict(env, FAKE_SRUN="hang", FAKE_TIME_LEFT="0:31"), args, fake_dir)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=30)  # the step would never exit by itself
    assert proc.returncode == 0, stderr
    assert (out_dir / "STOP").exists()
    assert "has not exited 1 s after USR1" in stdout
    assert events(fake_dir)[-2:] == ["scontrol requeue 77", "srun terminated"]
