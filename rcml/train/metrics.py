"""What the trainer logs: metrics.jsonl, MLflow and the progress bar, every ``train.log_every`` steps.

Between logged steps nothing is read back from the device: a step's terms stay device tensors (the
logged values are those of the logged step itself, averaged over ranks) and the window's counts are host
integers from the loader. A logged step costs one all-reduce of [terms | rows] and one all-gather of the
skip counters.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from rcml.config import TrainConfig
from rcml.loss import TERMS
from rcml.train.distributed import WorldInfo, sum_counters
from rcml.train.step import LOGGED, StepResult

log = logging.getLogger("rcml")


def metric_name(term: str) -> str:
    """``it`` -> ``loss_it`` (the four terms and ``cond``); ``loss`` and ``logit_scale`` keep their names."""
    return f"loss_{term}" if term in (*TERMS, "cond") else term


def batch_metrics(stats: dict[str, int]) -> dict[str, float]:
    """Summed ``rcml.batch.batch_stats`` -> fractions: ``batch/rows_<type>`` (of all rows, ``rows_self`` =
    singleton fraction), ``batch/related_negative_fraction``, ``batch/member_negative_fraction`` (members of
    the anchor's group drawn for another relation: negatives unless ``loss.positives=membership``), and
    ``batch/truncated_<texts|relation_rows|captions>`` (rows whose text, relation wording or caption lost
    tokens to ``data.context_length``)."""
    rows = sum(v for k, v in stats.items() if k.startswith("rows_"))
    out = {f"batch/{k}": v / rows for k, v in stats.items() if k.startswith(("rows_", "truncated_")) and rows}
    if stats.get("negative_pairs"):
        out["batch/related_negative_fraction"] = stats["related_negative_pairs"] / stats["negative_pairs"]
        out["batch/member_negative_fraction"] = stats["member_negative_pairs"] / stats["negative_pairs"]
    return out


class MetricsLogger:
    """Collects a logging window's counts (``add_batch``) and logs a step when it is due (``after_step``)."""

    def __init__(self, cfg: TrainConfig, world: WorldInfo, tracker, out_dir: Path, start_step: int) -> None:
        self.cfg, self.world, self.tracker, self.out_dir = cfg, world, tracker, out_dir
        self.bar = (tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout)
                    if world.is_main else None)
        self._reset()

    def _reset(self) -> None:
        self.window_rows, self.window_start = 0, time.perf_counter()
        self.window_stats: dict[str, int] = {}  # batch_stats() summed over the logging window

    def add_batch(self, batch) -> None:
        self.window_rows += batch.num_rows
        for name, n in batch.stats.items():
            self.window_stats[name] = self.window_stats.get(name, 0) + int(n)

    def after_step(self, step: int, result: StepResult, step_rows: int, counters: dict[str, Any], engine) -> None:
        """``step_rows``: this rank's rows in the step (all micro-batches); ``counters``: the run's totals
        (``skipped``: samples by reason, ``nonfinite_steps``, ``nonfinite_micro_batches``). Steps without
        an update are not logged (their window goes on into the next logged step)."""
        if self.bar is not None:
            self.bar.update(1)
        if not result.applied or (step % self.cfg.log_every != 0 and step != self.cfg.steps):
            return
        # mean over ranks of the per-rank values is the global loss (the loss contract); rows summed
        values = torch.stack([result.terms[k] for k in LOGGED]).double()
        rows = values.new_tensor([self.window_rows, step_rows])
        world = self.world.world_size
        packed = torch.cat([values, rows])
        dist.all_reduce(packed)
        *terms, window_rows, rows_step = packed.tolist()
        skipped = sum_counters(counters["skipped"])
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        metrics: dict[str, Any] = {metric_name(k): v / world for k, v in zip(LOGGED, terms)}
        metrics |= {"lr": float(engine.get_lr()[0]), "samples_per_s": window_rows / elapsed,
                    "epoch": counters["epoch"],
                    # global rows of the logged step (all micro-batches); with gradient_accumulation_steps 1
                    # the cross-modal terms' chance level is ln(rows)
                    "rows": int(rows_step),
                    # optimizer updates applied so far (DeepSpeed's steps less the updates it discarded)
                    "optimizer_steps": int(engine.global_steps - engine.skipped_steps),
                    "nonfinite_steps": counters["nonfinite_steps"],
                    "nonfinite_micro_batches": counters["nonfinite_micro_batches"],
                    "skipped_total": sum(skipped.values())}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({f"skipped_{k}": v for k, v in skipped.items()})
        metrics.update(batch_metrics(sum_counters(self.window_stats)))
        if self.world.is_main:
            self._write(step, metrics)
        if step % self.cfg.log_every == 0:
            self._reset()

    def _write(self, step: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(metrics, step)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step} | metrics) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.0f}")
        log.info("step %d loss %.4f (it %.4f ti %.4f ii %.4f tt %.4f cond %.4f) scale %.2f lr %.2e %.1f samples/s "
                 "skipped %d", step, metrics["loss"], metrics["loss_it"], metrics["loss_ti"], metrics["loss_ii"],
                 metrics["loss_tt"], metrics["loss_cond"], metrics["logit_scale"], metrics["lr"],
                 metrics["samples_per_s"], metrics["skipped_total"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
