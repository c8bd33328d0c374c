"""The training loop: wires data, model, loss, DeepSpeed, checkpoints, tracking and evaluation.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per rank; ``train.steps`` counts
optimizer steps. Every rank runs the same loop; decisions that must be collective (skip a non-finite
step, stop on a signal, save) are agreed through an all-reduce first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rcml.config import RunConfig, save_config
from rcml.data_state import LoaderPosition
from rcml.train import checkpoint, run_dir
from rcml.train.distributed import (WorldInfo, all_reduce_max, init_distributed, long_phase, set_collective_timeout,
                                    sum_counters)
from rcml.train.ds_config import load_ds_config, uses_bf16, zero_stage
from rcml.train.signals import StopRequest
from rcml.train.tracking import flatten_ds_config, make_tracker

log = logging.getLogger("rcml")

# The per-step values logged (metrics.jsonl / MLflow), each summed over micro-batches and averaged over ranks.
LOGGED = ("loss", "it", "ti", "ii", "tt", "cond", "logit_scale")

# Fault injection for the failure tests: comma-separated optimizer steps whose loss is made NaN.
INJECT_NONFINITE_ENV = "RCML_TEST_NONFINITE_STEPS"


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (inputs rounded to a 10-bit
    mantissa, fp32 accumulation), as OpenCLIP trains. Under bf16 the towers' matmuls are bf16 anyway; what
    stays fp32 is mainly the loss's similarity matmul over embeddings that are already bf16-rounded
    (8-bit mantissa), so TF32 costs nothing there. In fp32 runs it trades about 3 decimal digits per
    product for the tensor cores' throughput. torch's own default is TF32 for convolutions only."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def positive_groups(batch, positives: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(group ids [B], memberships [B, M] or None) that define the loss's positives (``loss.positives``)."""
    if positives == "membership":
        return batch.group_ids, batch.member_groups
    if positives == "group":
        return batch.group_ids, None
    # item: each row is only its own item's positive (the paper's CLIP baseline), unique across ranks and
    # sources (two sources may both hold the key 000123: different items)
    if batch.item_ids is None:
        raise ValueError("loss.positives=item needs Batch.item_ids (set by the loader's collate)")
    return batch.item_ids[batch.row_item], None


def find_tokenizer(cfg: RunConfig) -> Path:
    from rcml.tokenizer import tokenizer_file

    if cfg.model.init_from and not cfg.data.tokenizer:  # a pretrained CLIP comes with its own tokenizer
        path = tokenizer_file(cfg.model.init_from, "model.init_from")
        log.info("data.tokenizer: %s (the tokenizer of model.init_from)", path)
        return path
    if cfg.data.tokenizer:  # a tokenizer.json, or a Hugging Face tokenizer folder holding one
        return tokenizer_file(cfg.data.tokenizer, "data.tokenizer")
    import braceexpand

    first = next(iter(braceexpand.braceexpand(cfg.data.train.split("::")[0])))
    shard_dir = Path(first).parent
    for candidate in (shard_dir / "tokenizer.json", shard_dir.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer.json next to {shard_dir} or in its parent; set data.tokenizer=PATH "
        "(build one with `python -m data_prep.train_tokenizer --shards PATTERN --out tokenizer.json`)"
    )


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: str, resume: str | None,
                 ds_overrides: list[str] | None = None) -> None:
        self.cfg = cfg
        # start-up runs under the long timeout until the first step is done (rcml/train/distributed.py)
        self.world: WorldInfo = init_distributed(cfg.train.phase_timeout_s)
        setup_logging(self.world.rank)
        allow_tf32(self.world.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        # all ranks look before any rank writes; the failure, if any, is the same on every rank
        stale = run_dir.check_fresh_start(self.out_dir, resume, cfg.train.overwrite)
        dist.barrier()
        if self.world.is_main:
            if stale:
                log.warning("train.overwrite=true: removing the earlier run's %s", ", ".join(p.name for p in stale))
                run_dir.remove(stale)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.ds = load_ds_config(ds_config_path, cfg, self.world.world_size, ds_overrides)
        self.gas = int(self.ds["gradient_accumulation_steps"])
        self.bf16 = uses_bf16(self.ds)
        seed_everything(cfg.seed)  # identical on every rank: identical initial weights

        from rcml.tokenizer import TextTokenizer

        self.tokenizer_path = find_tokenizer(cfg)
        self.tokenizer = TextTokenizer.from_file(str(self.tokenizer_path))
        self.engine = self._build_engine()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.data_position = LoaderPosition.start(cfg.data)  # the consumed batches' reader states (exact resume)
        self.skipped: dict[str, int] = {}
        self.nonfinite_total = 0
        self.mlflow_run_id = ""
        if resume:
            self._resume(resume)
        seed_everything(cfg.seed + 1000 * self.world.rank + self.step)  # per-rank stream for any sampling
        self.stop = StopRequest(self.out_dir / "STOP", cfg.train.stop_grace_s)
        self.tracker = make_tracker(cfg.tracking.mlflow, self.world.is_main, self.out_dir,
                                    cfg.tracking.experiment, cfg.tracking.run_name, self.mlflow_run_id)
        self.mlflow_run_id = self.tracker.run_id
        self.val_samples: list[dict[str, Any]] | None = None
        self._inject = {int(s) for s in os.environ.get(INJECT_NONFINITE_ENV, "").split(",") if s.strip()}

    # ------------------------------------------------------------------ setup
    def _build_engine(self):
        import deepspeed

        from rcml.model import build_model
        from rcml.train import optimizer

        tok = self.tokenizer
        with deepspeed.zero.Init(config_dict_or_path=self.ds, enabled=zero_stage(self.ds) == 3):
            model = build_model(self.cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                eos_id=tok.eos_id, context_length=self.cfg.data.context_length,
                                image_size=self.cfg.data.image_size)
        self.spec = model.spec
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("model %s (%s mode, beta=%.2f): %.2f M parameters, ZeRO stage %d, %s",
                 self.cfg.model.name, self.cfg.model.mode, self.spec.get("beta", float("nan")), n_params / 1e6,
                 zero_stage(self.ds), "bf16" if self.bf16 else "fp32")
        return optimizer.initialize(model, self.ds)  # weight-decay groups, logit scale bounded

    def _resume(self, which: str) -> None:
        path = checkpoint.resolve(self.ckpt_dir, "latest" if which == "auto" else which)
        if path is None:  # --resume auto before the first checkpoint (latest: refused by the launcher's checks)
            log.info("--resume %s: no checkpoint in %s yet, starting from scratch", which, self.ckpt_dir)
            return
        state = checkpoint.load(self.engine, path, self.world.rank, self.world.world_size)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.data_position = LoaderPosition.load(state.get("data_position"), self.cfg.data, self.batch_in_epoch)
        self.skipped = {k: int(v) for k, v in state["skipped"].items()}
        self.nonfinite_total = int(state["nonfinite_total"])
        self.mlflow_run_id = state.get("mlflow_run_id", "")
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)", path, self.step, self.epoch,
                 self.batch_in_epoch)

    def _loader(self):
        from rcml.data import build_loader

        lo = self.cfg.loss
        return build_loader(self.cfg.data, self.tokenizer, mode=self.cfg.model.mode, rank=self.world.rank,
                            world_size=self.world.world_size, seed=self.cfg.seed, epoch=self.epoch,
                            position=self.data_position,
                            cond_candidates=lo.cond_candidates if lo.w_cond > 0 else 0)

    def _batches(self):
        """Endless stream of micro-batches; advances epochs and keeps the resume position."""
        while True:
            produced = 0
            for batch in self._loader():
                produced += 1
                self.batch_in_epoch += 1
                self.data_position.consumed(batch)
                yield batch
            if produced == 0 and self.batch_in_epoch == 0:
                raise RuntimeError(f"rank {self.world.rank}: epoch {self.epoch} of {self.cfg.data.train} "
                                   "produced no batch (no shards or no valid sample for this rank)")
            self.epoch += 1
            self.batch_in_epoch = 0
            self.data_position = LoaderPosition.start(self.cfg.data)

    # ------------------------------------------------------------------ step
    def _forward_loss(self, batch) -> dict[str, torch.Tensor]:
        from rcml.conditioned import conditioned_contrastive_loss
        from rcml.loss import relation_contrastive_loss

        batch = batch.to(self.world.device)
        if self.bf16:
            batch.images = batch.images.to(torch.bfloat16)
        out = self.engine(batch)
        lo = self.cfg.loss
        group_ids, members = positive_groups(batch, lo.positives)
        losses = relation_contrastive_loss(
            out["image_emb"].float(), out["text_emb"].float(), group_ids, out["logit_scale"].float(),
            w_inter=lo.w_inter, w_intra=lo.w_intra, member_groups=members, impl=lo.impl,
        )
        losses["cond"] = torch.zeros_like(losses["loss"])
        if lo.w_cond > 0:
            cond = conditioned_contrastive_loss(out["cond_image_emb"].float(), out["cond_text_emb"].float(),
                                                batch.cond_slice, batch.cond_member, out["logit_scale"].float(),
                                                w_inter=lo.w_inter, w_intra=lo.w_intra)["cond"]
            losses["cond"] = cond
            losses["loss"] = losses["loss"] + lo.w_cond * cond
        return losses | {"logit_scale": out["logit_scale"].detach().float()}

    def _record_keys(self, step: int, keys: list[str]) -> None:
        with open(self.out_dir / f"keys_rank{self.world.rank:05d}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def train(self) -> int:
        from rcml.train.optimizer import bound_logit_scale_

        cfg, world = self.cfg, self.world
        if world.is_main:
            save_config(cfg, self.out_dir / "run_config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds, indent=2))
            self.tracker.log_params(cfg.flat() | flatten_ds_config(self.ds) | {"world_size": world.world_size})
            self.tracker.log_artifact(self.out_dir / "run_config.yaml", "config")
            self.tracker.log_artifact(self.out_dir / "ds_config.json", "config")
        stream = self._batches()
        consecutive_bad = 0
        window_rows, window_start = 0, time.perf_counter()
        window_stats: dict[str, int] = {}  # batch_stats() summed over the logging window
        bar = None
        if world.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stdout)
        self.engine.train()
        status = "FINISHED"
        first_step = True
        try:
            while self.step < cfg.train.steps:
                terms_sum = torch.zeros(len(LOGGED))  # summed over micro-batches
                step_rows = 0  # this rank's rows in this step (all micro-batches)
                bad = False
                step_keys: list[str] = []
                for _ in range(self.gas):
                    batch = next(stream)
                    for reason, n in batch.skipped.items():
                        self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
                    step_keys.extend(batch.keys)
                    window_rows += batch.num_rows
                    step_rows += batch.num_rows
                    for name, n in batch.stats.items():
                        window_stats[name] = window_stats.get(name, 0) + int(n)
                    losses = self._forward_loss(batch)
                    if self.step + 1 in self._inject:
                        losses["loss"] = losses["loss"] * float("nan")
                    # all ranks must agree: DeepSpeed's backward and step are collective
                    if all_reduce_max(not bool(torch.isfinite(losses["loss"]).item()), world.device) > 0:
                        bad = True
                        break
                    self.engine.backward(losses["loss"])
                    self.engine.step()
                    terms_sum += torch.stack([losses[k].detach().float().cpu() for k in LOGGED])
                if not bad:  # after the optimizer step: in place, in DeepSpeed's fp32 master copy too
                    bound_logit_scale_(self.engine)
                self.step += 1
                if first_step:  # every rank is past start-up (and a resumed loader's fast-forward)
                    set_collective_timeout(cfg.train.collective_timeout_s)
                    first_step = False
                if cfg.train.record_keys:
                    self._record_keys(self.step, step_keys)
                if bad:
                    self.nonfinite_total += 1
                    consecutive_bad += 1
                    log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in total)", self.step,
                                consecutive_bad, self.nonfinite_total)
                    if consecutive_bad >= cfg.train.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{consecutive_bad} consecutive steps had a non-finite loss (train.max_nonfinite_steps="
                            f"{cfg.train.max_nonfinite_steps}); aborting. Lower the learning rate, check the data "
                            "(skipped-sample counters) or resume from an earlier checkpoint.")
                else:
                    consecutive_bad = 0
                    self._after_step(terms_sum / self.gas, bar, window_rows, step_rows, window_start, window_stats)
                    if self.step % cfg.train.log_every == 0:
                        window_rows, window_start, window_stats = 0, time.perf_counter(), {}
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 and self.step < cfg.train.steps:
                    self.save()
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                    self.evaluate()
                reason = self.stop.local_reason()
                if all_reduce_max(reason is not None, world.device) > 0:
                    log.warning("stop requested (%s): saving a checkpoint at step %d and exiting", reason or
                                "on another rank", self.step)
                    self.save()
                    self.stop.clear()
                    status = "KILLED"
                    return 0
            self.save()
            # export before the final evaluation: nothing in an evaluation may cost the trained model
            if cfg.train.export:
                self.export()
            report = self.evaluate()
            if report is not None and cfg.train.export and world.is_main:
                self._card_with_evaluation(report)
            return 0
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if bar is not None:
                bar.close()
            self.tracker.close(status)

    def _after_step(self, terms: torch.Tensor, bar, window_rows: int, step_rows: int, window_start: float,
                    window_stats: dict[str, int]) -> None:
        cfg = self.cfg
        if bar is not None:
            bar.update(1)
        if self.step % cfg.train.log_every != 0 and self.step != cfg.train.steps:
            return
        # mean over ranks of the per-rank values is the global loss (the loss contract)
        t = terms.to(self.world.device)
        dist.all_reduce(t)
        t = (t / self.world.world_size).cpu()
        # [window rows, this step's rows], summed over ranks in one collective
        rows = torch.tensor([float(window_rows), float(step_rows)], device=self.world.device)
        dist.all_reduce(rows)
        rows = rows.cpu()
        skipped = sum_counters(self.skipped)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        metrics = {("loss_" + k if k in ("it", "ti", "ii", "tt", "cond") else k): v.item() for k, v in zip(LOGGED, t)}
        metrics |= {"lr": float(self.engine.get_lr()[0]),
                   "samples_per_s": rows[0].item() / elapsed, "epoch": self.epoch,
                   # global rows of the logged step (all micro-batches); with gradient_accumulation_steps 1
                   # the cross-modal terms' chance level is ln(rows)
                   "rows": int(rows[1].item()),
                   "nonfinite_steps": self.nonfinite_total, "skipped_total": sum(skipped.values())}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({f"skipped_{k}": v for k, v in skipped.items()})
        metrics.update(batch_metrics(sum_counters(window_stats)))
        if self.world.is_main:
            self.tracker.log_metrics(metrics, self.step)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step} | metrics) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.0f}")
            log.info("step %d loss %.4f (it %.4f ti %.4f ii %.4f tt %.4f cond %.4f) scale %.2f lr %.2e %.1f samples/s "
                     "skipped %d", self.step, metrics["loss"], metrics["loss_it"], metrics["loss_ti"],
                     metrics["loss_ii"], metrics["loss_tt"], metrics["loss_cond"], metrics["logit_scale"], metrics["lr"], metrics["samples_per_s"],
                     metrics["skipped_total"])

    # ------------------------------------------------------------------ state
    def _phase(self):
        return long_phase(self.cfg.train.phase_timeout_s, self.cfg.train.collective_timeout_s)

    def save(self) -> None:
        with self._phase():
            self._save()

    def _save(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "skipped": dict(self.skipped), "nonfinite_total": self.nonfinite_total,
                 "rng": checkpoint.rng_state(), "world_size": self.world.world_size,
                 "mlflow_run_id": self.mlflow_run_id, "data_position": self.data_position.state_dict()}
        extra = {"run_config.yaml": (self.out_dir / "run_config.yaml").read_text() if self.world.is_main else "",
                 "ds_config.json": json.dumps(self.ds, indent=2)}
        checkpoint.save(self.engine, self.ckpt_dir, self.step, state, extra, self.cfg.train.keep_checkpoints,
                        self.world.rank)

    def evaluate(self) -> dict[str, Any] | None:
        if not self.cfg.data.val:
            return None
        with self._phase():
            return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        from rcml.data import iter_samples
        from rcml.eval import evaluate, flat_numbers, write_report

        if self.val_samples is None:
            self.val_samples = []
            for sample in iter_samples(self.cfg.data.val):
                self.val_samples.append(sample)
                if len(self.val_samples) >= self.cfg.eval.max_items:
                    break
        module = self.engine.module
        module.eval()
        # every rank runs the same forwards (ZeRO-3 gathers parameters collectively); rank 0 reports
        report = evaluate(module, self.tokenizer, self.val_samples, mode=self.cfg.model.mode,
                          context_length=self.cfg.data.context_length, image_size=self.cfg.data.image_size,
                          negatives=self.cfg.eval.negatives, seed=self.cfg.eval.seed)
        module.train()
        if self.world.is_main:
            # rank 0's file work (report, plot, MLflow) must not fail the job: the others already wait at the
            # barrier below, and the numbers are in the log either way
            try:
                for key in ("retrieval", "retrieval_confusable"):
                    log.info("eval step %d: %s Hit@5 %s", self.step, key,
                             " ".join(f"{k} {v:.3f}" for k, v in report[key]["hit@5"].items()))
                out = self.out_dir / "eval" / f"step_{self.step:08d}"
                write_report(report, out)
                self.tracker.log_metrics(flat_numbers(report, "eval/"), self.step)
                self.tracker.log_artifact(out, f"eval/step_{self.step:08d}")
            except Exception:
                log.exception("eval step %d: writing or logging the report failed; training goes on", self.step)
        return report  # the phase's closing barrier: the other ranks wait for rank 0's file work there

    def _card_with_evaluation(self, report: dict[str, Any]) -> None:
        """The export's model card gains the final evaluation (the export itself is written before it)."""
        from rcml.model_card import write_model_card

        try:
            write_model_card(self.out_dir / "export", step=self.step, eval_report=report)
        except Exception:
            log.exception("adding the final evaluation to the export's model card failed; the export is intact")

    def export(self) -> None:
        with self._phase():
            self._export()

    def _export(self) -> None:
        from rcml.export import consolidated_state_dict, write_export

        state = consolidated_state_dict(self.engine.module, self.world.is_main)
        if self.world.is_main:
            out = write_export(self.out_dir / "export", state, self.spec, self.tokenizer_path,
                               (self.out_dir / "run_config.yaml").read_text(), step=self.step)
            log.info("exported %d tensors to %s (load with rcml.from_pretrained)", len(state), out)
            self.tracker.log_artifact(out / "spec.json", "export")


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


def train(cfg: RunConfig, ds_config_path: str, resume: str | None = None,
          ds_overrides: list[str] | None = None) -> int:
    trainer = Trainer(cfg, ds_config_path, resume, ds_overrides)
    return trainer.train()
