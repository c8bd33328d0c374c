"""Reading the DeepSpeed JSON: optimizer, schedule, precision, clipping and accumulation live there.

Two values are derived from the run config instead of being typed twice: the micro batch (the sampler
defines it: ``groups_per_batch x members_per_group`` rows) and the schedule length (``train.steps``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rcml.config import ConfigError, RunConfig


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def load_ds_config(path: str | Path, cfg: RunConfig, world_size: int) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config: {path} is not valid JSON ({e})") from None
    autos = _find_auto(ds)
    if autos:
        raise ConfigError(f"--ds_config {path}: 'auto' values are not resolved by this trainer: {', '.join(autos)}")

    micro = cfg.data.groups_per_batch * cfg.data.members_per_group
    gas = int(ds.get("gradient_accumulation_steps", 1))
    if gas < 1:
        raise ConfigError(f"--ds_config {path}: gradient_accumulation_steps must be >= 1")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size

    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        if sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
            # one source of truth for the schedule length: train.steps (optimizer steps)
            params["total_num_steps"] = cfg.train.steps
            warm = int(params.get("warmup_num_steps", 0))
            if warm >= cfg.train.steps:
                params["warmup_num_steps"] = max(1, cfg.train.steps // 10)
    if "optimizer" not in ds:
        raise ConfigError(f"--ds_config {path}: no 'optimizer' section (e.g. AdamW)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--ds_config {path}: zero_optimization.stage must be 0..3, got {stage}")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--ds_config {path}: fp16 is not supported (use bf16 or fp32)")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def uses_bf16(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
