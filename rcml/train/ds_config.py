"""Reading the DeepSpeed JSON: optimizer, schedule, precision, clipping and accumulation live there.

Two values are derived from the run config instead of being typed twice: the micro batch (the sampler
defines it: ``groups_per_batch x members_per_group`` rows) and the schedule length (``train.steps``);
each value that differs from what the file says is logged. Any other value can be set from the command
line as ``ds.<path>=<JSON value>`` (``ds.optimizer.params.lr=1e-4``, ``ds.zero_optimization.stage=2``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rcml.config import ConfigError, RunConfig

log = logging.getLogger("rcml")

DS_PREFIX = "ds."
# derived from the run config: an override of these would be silently replaced, so it is refused
DERIVED = {"train_micro_batch_size_per_gpu": "data.groups_per_batch x data.members_per_group",
           "train_batch_size": "the micro batch x gradient_accumulation_steps x world size",
           "scheduler.params.total_num_steps": "train.steps"}


def split_ds_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` arguments -> (run config overrides, ``ds.`` overrides)."""
    ds = [o for o in overrides if o.startswith(DS_PREFIX)]
    return [o for o in overrides if not o.startswith(DS_PREFIX)], ds


def apply_ds_overrides(ds: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``ds.a.b.c=VALUE`` in the DeepSpeed dict (in place). VALUE is JSON (``1e-4``, ``true``,
    ``[0.9, 0.98]``), else a string (``AdamW``). Missing intermediate sections are created."""
    for item in overrides:
        dotted, sep, raw = item[len(DS_PREFIX):].partition("=")
        parts = dotted.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not of the form ds.<path>=<value> (e.g. ds.optimizer.params.lr=1e-4)")
        if dotted in DERIVED:
            raise ConfigError(f"{item!r}: {dotted} is derived from {DERIVED[dotted]}; set that instead")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = ds
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{item!r}: ds.{'.'.join(parts[:depth + 1])} is not a section")
        node[parts[-1]] = value
    return ds


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def load_ds_config(path: str | Path, cfg: RunConfig, world_size: int,
                   overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config: {path} is not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config: {path} must hold a JSON object")
    apply_ds_overrides(ds, overrides or [])
    autos = _find_auto(ds)
    if autos:
        raise ConfigError(f"--ds_config {path}: 'auto' values are not resolved by this trainer: {', '.join(autos)}")

    micro = cfg.data.groups_per_batch * cfg.data.members_per_group
    gas = int(ds.get("gradient_accumulation_steps", 1))
    if gas < 1:
        raise ConfigError(f"--ds_config {path}: gradient_accumulation_steps must be >= 1")
    derived = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
               "train_batch_size": micro * gas * world_size}
    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        if sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
            # one source of truth for the schedule length: train.steps (optimizer steps)
            derived["scheduler.params.total_num_steps"] = cfg.train.steps
            warm = int(params.get("warmup_num_steps", 0))
            if warm >= cfg.train.steps:  # a warmup longer than the run would never reach the peak rate
                derived["scheduler.params.warmup_num_steps"] = max(1, cfg.train.steps // 10)
    for dotted, value in derived.items():
        *parents, leaf = dotted.split(".")
        node = ds
        for part in parents:
            node = node[part]
        if leaf in node and node[leaf] != value:
            log.info("--ds_config %s: %s = %s (the file says %s; derived from the run config)", path.name, dotted,
                     value, node[leaf])
        node[leaf] = value
    if "optimizer" not in ds:
        raise ConfigError(f"--ds_config {path}: no 'optimizer' section (e.g. AdamW)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--ds_config {path}: zero_optimization.stage must be 0..3, got {stage}")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--ds_config {path}: fp16 is not supported (use bf16 or fp32)")
    if uses_bf16(ds) and stage == 0:  # DeepSpeed's stage-0 bf16 wrapper hides the fp32 master weights
        raise ConfigError(f"--ds_config {path}: bf16 needs zero_optimization.stage 1, 2 or 3 (stage 1 moves "
                          "as many bytes as plain data parallelism); the trainer bounds the logit scale in the "
                          "fp32 master weights, which it can only reach through ZeRO")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def uses_bf16(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
