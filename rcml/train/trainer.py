"""The training loop: wires data, model, loss, DeepSpeed, checkpoints, tracking and evaluation.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per rank (``rcml/train/step.py``);
``train.steps`` counts optimizer steps. Every rank runs the same loop; decisions that must be collective
(skip a non-finite micro-batch, stop on a signal, save) are agreed through an all-reduce first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from rcml.config import DataConfig, RunConfig, save_config
from rcml.data import build_loader, iter_samples
from rcml.data_state import LoaderPosition
from rcml.eval import evaluate, flat_numbers, write_report
from rcml.export import consolidated_state_dict, write_export
from rcml.model import build_model
from rcml.model_card import write_model_card
from rcml.tokenizer import TextTokenizer, tokenizer_file
from rcml.train import checkpoint, faults, optimizer, run_dir
from rcml.train.checkpoint_export import conversion_files
from rcml.train.distributed import WorldInfo, init_distributed, long_phase, set_collective_timeout
from rcml.train.ds_config import load_ds_config, uses_bf16, zero_stage
from rcml.train.metrics import MetricsLogger
from rcml.train.signals import StopRequest
from rcml.train.step import StepResult, TrainStep
from rcml.train.tracking import flatten_ds_config, make_tracker

log = logging.getLogger("rcml")


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


def find_tokenizer(cfg: RunConfig) -> Path:
    if cfg.model.init_from and not cfg.data.tokenizer:  # a pretrained CLIP comes with its own tokenizer
        path = tokenizer_file(cfg.model.init_from, "model.init_from")
        log.info("data.tokenizer: %s (the tokenizer of model.init_from)", path)
        return path
    if cfg.data.tokenizer:  # a tokenizer.json, or a Hugging Face tokenizer folder holding one
        return tokenizer_file(cfg.data.tokenizer, "data.tokenizer")
    first = next(iter(braceexpand.braceexpand(cfg.data.train.split("::")[0])))
    shard_dir = Path(first).parent
    for candidate in (shard_dir / "tokenizer.json", shard_dir.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer.json next to {shard_dir} or in its parent; set data.tokenizer=PATH "
        "(build one with `python -m data_prep.train_tokenizer --shards PATTERN --out tokenizer.json`)"
    )


@dataclass
class TrainState:
    """The trainer's part of a checkpoint, per rank (DeepSpeed saves the engine's). ``state_dict`` and
    ``load_state_dict`` are the one list of what is saved and restored."""

    step: int = 0                      # optimizer steps done, steps without an update included
    epoch: int = 0
    batch_in_epoch: int = 0            # micro-batches consumed in this epoch
    data_position: LoaderPosition | None = None  # the consumed batches' reader states (exact resume)
    skipped: dict[str, int] = field(default_factory=dict)  # samples the loader skipped, by reason
    nonfinite_total: int = 0           # steps without an update (non-finite losses or gradient)
    nonfinite_micro_batches: int = 0   # micro-batches whose loss was non-finite (their gradient: zero)
    mlflow_run_id: str = ""

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with ``weights_only=True``)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["skipped"] = dict(self.skipped)
        state["data_position"] = self.data_position.state_dict() if self.data_position is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any], data: DataConfig) -> None:
        """A field missing from ``state`` (a checkpoint written before the field existed) keeps its default."""
        for f in dataclasses.fields(self):
            if f.name in state and f.name != "data_position":
                value = state[f.name]
                setattr(self, f.name, {k: int(v) for k, v in value.items()} if f.name == "skipped"
                        else type(getattr(self, f.name))(value))
        self.data_position = LoaderPosition.load(state.get("data_position"), data, self.batch_in_epoch)

    def count_skipped(self, skipped: dict[str, int]) -> None:
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)


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
        seed_everything(cfg.seed)  # identical on every rank: identical initial weights

        self.tokenizer_path = find_tokenizer(cfg)
        self.tokenizer = TextTokenizer.from_file(str(self.tokenizer_path))
        self.engine = self._build_engine()
        self.train_step = TrainStep(self.engine, cfg.loss, self.gas, self.world.device)
        self.state = TrainState(data_position=LoaderPosition.start(cfg.data))
        if resume:
            self._resume(resume)
        seed_everything(cfg.seed + 1000 * self.world.rank + self.state.step)  # per-rank stream for any sampling
        self.stop = StopRequest(self.out_dir / "STOP", cfg.train.stop_grace_s)
        self.tracker = make_tracker(cfg.tracking.mlflow, self.world.is_main, self.out_dir,
                                    cfg.tracking.experiment, cfg.tracking.run_name, self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        self.val_samples: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ setup
    def _build_engine(self):
        tok = self.tokenizer
        with deepspeed.zero.Init(config_dict_or_path=self.ds, enabled=zero_stage(self.ds) == 3):
            model = build_model(self.cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                eos_id=tok.eos_id, context_length=self.cfg.data.context_length,
                                image_size=self.cfg.data.image_size)
        self.spec = model.spec
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("model %s (%s mode, beta=%.2f): %.2f M parameters, ZeRO stage %d, %s",
                 self.cfg.model.name, self.cfg.model.mode, self.spec.get("beta", float("nan")), n_params / 1e6,
                 zero_stage(self.ds), "bf16" if uses_bf16(self.ds) else "fp32")
        return optimizer.initialize(model, self.ds)  # weight-decay groups, logit scale bounded

    def _resume(self, which: str) -> None:
        path = checkpoint.resolve(self.ckpt_dir, "latest" if which == "auto" else which)
        if path is None:  # --resume auto before the first checkpoint (latest: refused by the launcher's checks)
            log.info("--resume %s: no checkpoint in %s yet, starting from scratch", which, self.ckpt_dir)
            return
        state = checkpoint.load(self.engine, path, self.world.rank, self.world.world_size)
        self.state.load_state_dict(state, self.cfg.data)
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)", path, self.state.step,
                 self.state.epoch, self.state.batch_in_epoch)

    def _loader(self):
        lo, st = self.cfg.loss, self.state
        return build_loader(self.cfg.data, self.tokenizer, mode=self.cfg.model.mode, rank=self.world.rank,
                            world_size=self.world.world_size, seed=self.cfg.seed, epoch=st.epoch,
                            position=st.data_position, cond_candidates=lo.cond_candidates if lo.w_cond > 0 else 0)

    def _batches(self):
        """Endless stream of micro-batches; advances epochs and keeps the resume position."""
        st = self.state
        while True:
            produced = 0
            for batch in self._loader():
                produced += 1
                st.batch_in_epoch += 1
                st.data_position.consumed(batch)
                yield batch
            if produced == 0 and st.batch_in_epoch == 0:
                raise RuntimeError(f"rank {self.world.rank}: epoch {st.epoch} of {self.cfg.data.train} "
                                   "produced no batch (no shards or no valid sample for this rank)")
            st.epoch += 1
            st.batch_in_epoch = 0
            st.data_position = LoaderPosition.start(self.cfg.data)

    # ------------------------------------------------------------------ loop
    def _record_keys(self, step: int, keys: list[str]) -> None:
        with open(self.out_dir / f"keys_rank{self.world.rank:05d}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def _write_run_files(self) -> None:
        cfg, world = self.cfg, self.world
        if world.is_main:
            save_config(cfg, self.out_dir / "run_config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds, indent=2))
            self.tracker.log_params(cfg.flat() | flatten_ds_config(self.ds) | {"world_size": world.world_size})
            self.tracker.log_artifact(self.out_dir / "run_config.yaml", "config")
            self.tracker.log_artifact(self.out_dir / "ds_config.json", "config")

    def _count_nonfinite(self, result: StepResult, consecutive: int) -> int:
        """Counters and the abort rule for a step; -> the new count of consecutive steps without an update."""
        st, limit = self.state, self.cfg.train.max_nonfinite_steps
        st.nonfinite_micro_batches += result.bad
        if result.bad and result.applied:
            log.warning("step %d: %d of %d micro-batches had a non-finite loss; the update used the other %d",
                        st.step, result.bad, self.gas, result.good)
        if result.applied:
            return 0
        st.nonfinite_total += 1
        consecutive += 1
        log.warning("step %d: non-finite %s, no update (%d in a row, %d in total)", st.step,
                    "loss" if result.bad else "gradient", consecutive, st.nonfinite_total)
        if consecutive >= limit:
            raise RuntimeError(
                f"{consecutive} consecutive steps had a non-finite loss (train.max_nonfinite_steps={limit}); "
                "aborting. Lower the learning rate, check the data (skipped-sample counters) or resume from an "
                "earlier checkpoint.")
        return consecutive

    def train(self) -> int:
        cfg, st = self.cfg, self.state
        self._write_run_files()
        stream = self._batches()
        metrics = MetricsLogger(cfg.train, self.world, self.tracker, self.out_dir, st.step)
        consecutive_bad, started = 0, False
        self.engine.train()
        status = "FINISHED"
        try:
            while st.step < cfg.train.steps:
                window = [next(stream) for _ in range(self.gas)]
                for batch in window:
                    st.count_skipped(batch.skipped)
                    metrics.add_batch(batch)
                reason = self.stop.local_reason()
                result = self.train_step(window, st.step + 1, stop=reason is not None)
                if result.applied:  # after the optimizer step: in place, in DeepSpeed's fp32 master copy too
                    optimizer.bound_logit_scale_(self.engine)
                st.step += 1
                if not started:  # every rank is past start-up (and a resumed loader's fast-forward)
                    set_collective_timeout(cfg.train.collective_timeout_s)
                    started = True
                if cfg.train.record_keys:
                    self._record_keys(st.step, [k for b in window for k in b.keys])
                consecutive_bad = self._count_nonfinite(result, consecutive_bad)
                metrics.after_step(st.step, result, sum(b.num_rows for b in window),
                                   {"skipped": st.skipped, "epoch": st.epoch, "nonfinite_steps": st.nonfinite_total,
                                    "nonfinite_micro_batches": st.nonfinite_micro_batches}, self.engine)
                if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.step < cfg.train.steps:
                    self.save()
                if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and st.step < cfg.train.steps:
                    self.evaluate()
                if result.stop:
                    log.warning("stop requested (%s): saving a checkpoint at step %d and exiting",
                                reason or "on another rank", st.step)
                    self.save()
                    self.stop.clear()
                    status = "KILLED"
                    return 0
            self.save()
            # export before the final evaluation: nothing in an evaluation may cost the trained model
            if cfg.train.export:
                self.export()
            report = self.evaluate()
            if report is not None and cfg.train.export and self.world.is_main:
                self._card_with_evaluation(report)
            return 0
        except BaseException:
            status = "FAILED"
            raise
        finally:
            metrics.close()
            self.tracker.close(status)

    # ------------------------------------------------------------------ phases
    def _phase(self):
        return long_phase(self.cfg.train.phase_timeout_s, self.cfg.train.collective_timeout_s)

    def save(self) -> None:
        with self._phase():
            state = self.state.state_dict() | {"rng": checkpoint.rng_state(), "world_size": self.world.world_size}
            extra = {"ds_config.json": json.dumps(self.ds, indent=2)}
            if self.world.is_main:  # only rank 0 writes these
                extra |= conversion_files(self.spec, self.tokenizer_path, (self.out_dir / "run_config.yaml").read_text())
            checkpoint.save(self.engine, self.ckpt_dir, self.state.step, state, extra,
                            self.cfg.train.keep_checkpoints, self.world.rank)

    def evaluate(self) -> dict[str, Any] | None:
        if not self.cfg.data.val:
            return None
        with self._phase():
            return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        if self.val_samples is None:
            self.val_samples = []
            for sample in iter_samples(self.cfg.data.val):
                self.val_samples.append(sample)
                if len(self.val_samples) >= self.cfg.eval.max_items:
                    break
        module, step = self.engine.module, self.state.step
        faults.evaluation(step)  # a no-op; the failure tests make an evaluation fail here
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
                faults.report_writing(step)  # a no-op; the failure tests make the report writing fail here
                for key in ("retrieval", "retrieval_confusable"):
                    log.info("eval step %d: %s Hit@5 %s", step, key,
                             " ".join(f"{k} {v:.3f}" for k, v in report[key]["hit@5"].items()))
                out = self.out_dir / "eval" / f"step_{step:08d}"
                write_report(report, out)
                self.tracker.log_metrics(flat_numbers(report, "eval/"), step)
                self.tracker.log_artifact(out, f"eval/step_{step:08d}")
            except Exception:
                log.exception("eval step %d: writing or logging the report failed; training goes on", step)
        return report  # the phase's closing barrier: the other ranks wait for rank 0's file work there

    def _card_with_evaluation(self, report: dict[str, Any]) -> None:
        """The export's model card gains the final evaluation (the export itself is written before it)."""
        try:
            write_model_card(self.out_dir / "export", step=self.state.step, eval_report=report)
        except Exception:
            log.exception("adding the final evaluation to the export's model card failed; the export is intact")

    def export(self) -> None:
        with self._phase():
            state = consolidated_state_dict(self.engine.module, self.world.is_main)
            if self.world.is_main:
                out = write_export(self.out_dir / "export", state, self.spec, self.tokenizer_path,
                                   (self.out_dir / "run_config.yaml").read_text(), step=self.state.step)
                log.info("exported %d tensors to %s (load with rcml.from_pretrained)", len(state), out)
                self.tracker.log_artifact(out / "spec.json", "export")


def train(cfg: RunConfig, ds_config_path: str, resume: str | None = None,
          ds_overrides: list[str] | None = None) -> int:
    trainer = Trainer(cfg, ds_config_path, resume, ds_overrides)
    return trainer.train()
