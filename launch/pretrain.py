"""Pretrain RCML under DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --ds_config configs/zero3.json \
        --config configs/pretrain/demo.yaml train.steps=200 model.beta=0.3
    torchrun --nproc_per_node 2 launch/pretrain.py --ds_config configs/zero3.json --config ...

The run configuration is ``--config`` (YAML) plus ``key=value`` overrides, validated before any rank
builds a model; the DeepSpeed JSON holds optimizer, schedule, precision and ZeRO settings.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True,
                   help="DeepSpeed JSON (configs/zero3.json, zero2.json, zero3_offload.json, zero3_bf16.json)")
    p.add_argument("--config", default=None, help="run configuration YAML (configs/pretrain/*.yaml)")
    p.add_argument("--resume", default=None,
                   help="'latest' (continue the newest checkpoint in <train.out_dir>/checkpoints, or start fresh "
                        "if there is none), a checkpoint tag, or a path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 model.mode=clip")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rcml.config import ConfigError, dumps, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dumps(cfg))
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from rcml.train.trainer import train

    return train(cfg, args.ds_config, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
