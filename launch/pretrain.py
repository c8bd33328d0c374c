"""Pretrain RCML under DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --ds_config configs/zero3.json \
        --config configs/pretrain/demo.yaml train.steps=200 model.beta=0.3 ds.optimizer.params.lr=1e-4
    torchrun --nproc_per_node 2 launch/pretrain.py --ds_config configs/zero3.json --config ...
    python launch/pretrain.py --ds_config configs/zero3.json ...   # one process, no launcher (debugging)

The run configuration is --config (YAML) plus key=value overrides; ds.<path>=<value> overrides set values
of the DeepSpeed JSON, which holds optimizer, schedule, precision and ZeRO settings. Before any rank
builds a model, the configuration is validated and the shards, tokenizer, DeepSpeed JSON, run directory
and checkpoint to resume are checked: each problem is one line, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# DeepSpeed calls the pre-2.12 collective names; the warning repeats every step and says nothing to users.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def config_keys_help() -> str:
    from rcml.config import describe_keys

    lines = ["run configuration keys (key=value overrides; defaults shown):"]
    for key, default, note in describe_keys():
        lines.append(f"  {key}={'' if default is None else default}" + (f"    {note}" if note else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=config_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                   help="DeepSpeed JSON: configs/zero3.json, zero2.json, zero3_offload.json, zero3_bf16.json (CPU, "
                        "CI); configs/gpu_zero2_bf16.json, gpu_zero3_bf16.json (GPU)")
    p.add_argument("--config", default=None, help="run configuration YAML (configs/pretrain/*.yaml)")
    p.add_argument("--resume", default=None,
                   help="'latest' (the newest checkpoint in <train.out_dir>/checkpoints; an error if there is "
                        "none), 'auto' (the newest checkpoint if there is one, else a fresh start: for job scripts "
                        "that requeue themselves), a checkpoint tag, or a path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run configuration (JSON) and exit; data.train may be unset")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. train.steps=100 model.mode=clip ds.optimizer.params.lr=1e-4")
    return p.parse_args(argv)


def single_process_environment() -> bool:
    """Without a launcher, run as a world of one (handy under a debugger): set what a launcher would."""
    if any(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    import socket

    with socket.socket() as s:  # a free port for the one-process rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rcml.config import ConfigError, dumps, load_config
    from rcml.train.ds_config import split_ds_overrides

    run_overrides, ds_overrides = split_ds_overrides(args.overrides)
    try:
        cfg = load_config(args.config, run_overrides, require_data=not args.print_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dumps(cfg))
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from rcml.train.preflight import problems

    found = problems(cfg, args.ds_config, args.resume, ds_overrides)
    if found:
        if os.environ.get("RANK", "0") == "0":  # the same lines on every rank: print them once
            for line in found:
                print(f"error: {line}", file=sys.stderr)
        return 2
    if single_process_environment():
        print("no launcher environment (RANK, WORLD_SIZE): running as a single process", file=sys.stderr)
    from rcml.train.trainer import train

    return train(cfg, args.ds_config, resume=args.resume, ds_overrides=ds_overrides)


if __name__ == "__main__":
    sys.exit(main())
