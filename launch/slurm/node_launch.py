"""Per-node launch command for multi-node jobs (SLURM or any scheduler that gives a node list).

Each node runs one ``torchrun`` that starts G local ranks; node 0's host is the rendezvous point:

    torchrun --nnodes N --nproc-per-node G --node-rank R --master-addr HEAD --master-port P \
        launch/pretrain.py --ds_config ... --resume auto [key=value ...]

    python launch/slurm/node_launch.py --dry-run --nodelist 'gpu[01-04]' --gpus-per-node 8 -- \
        --ds_config configs/zero3.json train.steps=10
        prints every node's exact command (no SLURM needed; inside an allocation the node list and GPU
        count come from SLURM_JOB_NODELIST and SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE)
    python launch/slurm/node_launch.py -- ...      (inside `srun`, one task per node) execs this node's command

G is never guessed: without --gpus-per-node or SLURM's GPU variables the launch stops with an error. On the
node, the GPUs torch sees (after CUDA_VISIBLE_DEVICES) must number G; on a node without CUDA, G is the number
of CPU processes (gloo ranks) to start.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
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


def parse_gpus(value: str) -> int:
    """A SLURM GPU count -> GPUs per node: ``8``, ``gpu:8``, ``a100:8``, ``gpu:a100:8``; ``a100:4,v100:4`` -> 8."""
    total = 0
    for part in value.split(","):
        count = re.sub(r"\(.*\)$", "", part.strip()).rsplit(":", 1)[-1]  # "gpu:a100:4(S:0-1)" -> "4"
        if not count.isdigit():
            raise ValueError(f"cannot read a GPU count from {value!r} (expected e.g. 8, gpu:8 or a100:8)")
        total += int(count)
    return total


def gpus_per_node(explicit: int | None, environ: Mapping[str, str]) -> int:
    """G from --gpus-per-node, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE; an error when none says."""
    if explicit is not None:
        source, count = "--gpus-per-node", explicit
    else:
        source = next((v for v in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE") if environ.get(v)), None)
        if source is None:
            raise ValueError("the number of GPUs per node is unknown: submit with sbatch --gpus-per-node=G "
                             "(SLURM then sets SLURM_GPUS_ON_NODE) or pass --gpus-per-node G")
        count = parse_gpus(environ[source])
    if count < 1:
        raise ValueError(f"{source} gives {count} GPUs per node: at least 1 is needed (on CPU nodes, the number "
                         "of processes per node)")
    return count


def check_local_devices(gpus: int) -> str | None:
    """On the node: the GPUs torch sees must be the G ranks about to start (one GPU each).

    Returns a note for a node without CUDA (G CPU processes then run on gloo); raises on a mismatch."""
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA device on this node: starting {gpus} CPU processes (the GPUs-per-node count is the "
                "number of processes per node on CPU)")
    found = torch.cuda.device_count()
    if found != gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise ValueError(f"this node has {found} visible GPUs (CUDA_VISIBLE_DEVICES={visible}) but the launch "
                         f"starts {gpus} ranks per node: make sbatch --gpus-per-node and --gpus-per-node agree")
    return None


def node_command(hosts: list[str], node_rank: int, gpus_per_node: int, port: int, python: str,
                 train_args: list[str]) -> list[str]:
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"node rank {node_rank} outside 0..{len(hosts) - 1}")
    return [python, "-m", "torch.distributed.run", f"--nnodes={len(hosts)}", f"--nproc-per-node={gpus_per_node}",
            f"--node-rank={node_rank}", f"--master-addr={hosts[0]}", f"--master-port={port}",
            str(REPO / "launch" / "pretrain.py"), *train_args]


def fail(message: str) -> int:
    print(f"node_launch.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print every node's command instead of running one")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""))
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node (default: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE; no guess)")
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", "-1")))
    p.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    if not args.nodelist:
        return fail("no node list: run inside a SLURM allocation or pass --nodelist (e.g. 'gpu[01-04]')")
    if not train_args:
        return fail("give the trainer's arguments after '--' (e.g. -- --ds_config configs/zero3.json ...)")
    try:
        hosts = expand_nodelist(args.nodelist)
        gpus = gpus_per_node(args.gpus_per_node, os.environ)
    except ValueError as err:
        return fail(str(err))
    if args.dry_run:
        for rank in range(len(hosts)):
            cmd = node_command(hosts, rank, gpus, args.port, args.python, train_args)
            print(f"[{hosts[rank]}] {shlex.join(cmd)}")
        return 0
    if not 0 <= args.node_rank < len(hosts):
        return fail(f"this node's rank ({args.node_rank}) is unknown or outside 0..{len(hosts) - 1}: run under srun "
                    "(SLURM_NODEID) or pass --node-rank")
    host = hosts[args.node_rank]
    try:
        note = check_local_devices(gpus)
    except ValueError as err:
        return fail(f"[{host}] {err}")
    if note:
        print(f"[{host}] {note}", flush=True)
    cmd = node_command(hosts, args.node_rank, gpus, args.port, args.python, train_args)
    print(f"[{host}] {shlex.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)
    return 1  # unreachable


if __name__ == "__main__":
    sys.exit(main())
