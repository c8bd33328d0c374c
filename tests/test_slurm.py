"""Multi-node launch: SLURM node-list expansion and the dry run of the sbatch script."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch" / "slurm"))
from node_launch import expand_nodelist, node_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[1-2],b[09-11],login", ["a1", "a2", "b09", "b10", "b11", "login"]),
    ("rack1-n[8-9]", ["rack1-n8", "rack1-n9"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_node_command_ranks_share_one_rendezvous():
    hosts = ["n1", "n2", "n3"]
    cmds = [node_command(hosts, r, 8, 12345, "python", ["--ds_config", "z.json"]) for r in range(3)]
    for rank, cmd in enumerate(cmds):
        assert f"--node-rank={rank}" in cmd and "--nnodes=3" in cmd and "--nproc-per-node=8" in cmd
        assert "--master-addr=n1" in cmd and "--master-port=12345" in cmd
        assert cmd[-2:] == ["--ds_config", "z.json"]
    with pytest.raises(ValueError):
        node_command(hosts, 3, 8, 1, "python", [])


def test_sbatch_dry_run_with_fake_slurm_environment(tmp_path):
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu[07-09]", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="4242",
               RCML_PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", str(REPO / "launch/slurm/pretrain.sbatch"), "--dry-run", "--ds_config", "configs/zero3.json",
         "data.train=/data/s-{000..099}.tar", f"train.out_dir={tmp_path}/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()
    assert len(out) == 3
    for rank, (line, host) in enumerate(zip(out, ["gpu07", "gpu08", "gpu09"])):
        assert line.startswith(f"[{host}] ")
        cmd = shlex.split(line.split("] ", 1)[1])
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert f"--node-rank={rank}" in cmd and "--nnodes=3" in cmd and "--nproc-per-node=4" in cmd
        assert "--master-addr=gpu07" in cmd
        assert "--master-port=24242" in cmd  # 20000 + job id % 20000: distinct jobs, distinct ports
        assert cmd[cmd.index("--resume") + 1] == "auto"  # the first start and every requeue alike
        assert "data.train=/data/s-{000..099}.tar" in cmd
