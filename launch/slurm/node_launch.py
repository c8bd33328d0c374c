"""Per-node launch command for multi-node jobs (SLURM or any scheduler that gives a node list).

Each node runs one ``torchrun`` that starts G local ranks; node 0's host is the rendezvous point:

    torchrun --nnodes N --nproc-per-node G --node-rank R --master-addr HEAD --master-port P \
        launch/pretrain.py --ds_config ... --resume auto [key=value ...]

    python launch/slurm/node_launch.py --dry-run -- --ds_config configs/zero3.json train.steps=10
        prints every node's exact command (no SLURM needed: pass --nodelist / --gpus-per-node,
        or let it read SLURM_JOB_NODELIST / SLURM_GPUS_ON_NODE)
    python launch/slurm/node_launch.py -- ...      (inside `srun`, one task per node) execs this node's command
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, like ``scontrol show hostnames``.

    ``gpu[001-003,007],login2`` -> ``gpu001 gpu002 gpu003 gpu007 login2`` (zero padding kept).
    """
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    if not hosts:
        raise ValueError(f"empty or unparsable node list {nodelist!r}")
    return hosts


def node_command(hosts: list[str], node_rank: int, gpus_per_node: int, port: int, python: str,
                 train_args: list[str]) -> list[str]:
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"node rank {node_rank} outside 0..{len(hosts) - 1}")
    return [python, "-m", "torch.distributed.run", f"--nnodes={len(hosts)}", f"--nproc-per-node={gpus_per_node}",
            f"--node-rank={node_rank}", f"--master-addr={hosts[0]}", f"--master-port={port}",
            str(REPO / "launch" / "pretrain.py"), *train_args]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print every node's command instead of running one")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""))
    p.add_argument("--gpus-per-node", type=int,
                   default=int(os.environ.get("SLURM_GPUS_ON_NODE", os.environ.get("GPUS_PER_NODE", "1"))))
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", "-1")))
    p.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    if not args.nodelist:
        p.error("no node list: run inside a SLURM allocation or pass --nodelist (e.g. 'gpu[01-04]')")
    if not train_args:
        p.error("give the trainer's arguments after '--' (e.g. -- --ds_config configs/zero3.json ...)")
    hosts = expand_nodelist(args.nodelist)
    if args.dry_run:
        for rank in range(len(hosts)):
            cmd = node_command(hosts, rank, args.gpus_per_node, args.port, args.python, train_args)
            print(f"[{hosts[rank]}] {shlex.join(cmd)}")
        return 0
    if args.node_rank < 0:
        p.error("this node's rank is unknown: run under srun (SLURM_NODEID) or pass --node-rank")
    cmd = node_command(hosts, args.node_rank, args.gpus_per_node, args.port, args.python, train_args)
    print(f"[{hosts[args.node_rank]}] {shlex.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)
    return 1  # unreachable


if __name__ == "__main__":
    sys.exit(main())
