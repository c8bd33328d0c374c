"""One optimizer step: a window of ``gradient_accumulation_steps`` (gas) micro-batches per rank through
forward, loss, DeepSpeed's ``backward`` and ``step``.

Accumulation sums gradients over the micro-steps of a window; it does not enlarge the contrastive batch.
The loss is not a sum over rows (every row is contrasted with the columns of its own micro-step), so the
batch it contrasts is one micro-step's world batch: the micro-batches of all ranks at that micro-step.
DeepSpeed divides each micro-step's loss by gas, so the update follows the mean over the window's
micro-steps of their losses' gradients.

Non-finite losses. Per micro-batch, all ranks agree whether its loss is finite (one all-reduce, which also
carries the stop request; its result is the one value a micro-step reads back from the device). DeepSpeed
counts micro-steps in ``engine.step()`` and updates at every gas-th, so every micro-batch of a window gets
exactly one ``backward`` and one ``step`` and DeepSpeed's windows stay the trainer's steps:

- A micro-batch with a non-finite loss backpropagates ``0 x (sum of the model's outputs)`` instead: an
  exact zero gradient for every parameter its loss would have reached. (Not ``0 x logit_scale`` alone:
  ZeRO-3 copies rather than adds the gradient partitions of a window's first micro-step, so a parameter
  without a gradient there would carry the previous window's gradient into this one.) The update is the
  good micro-batches' summed gradient divided by gas, as DeepSpeed divides each micro-batch's.
- A window without a good micro-batch backpropagates NaN on its last micro-step. DeepSpeed's ZeRO
  optimizers (stages 1-3, fp32 and bf16) and its bf16 optimizer discard an update whose gradient norm is
  not finite: weights, Adam moments and the lr schedule stay as they were; ``engine.global_steps`` still
  advances with the trainer's step and ``engine.skipped_steps`` counts the discarded update.
- A bad micro-batch whose outputs are themselves non-finite has no exact zero (0 x inf is NaN all the way
  back through the towers): its NaN gradient makes DeepSpeed discard the whole window in the same way.
- With gas 1 a bad micro-batch is skipped outright: no ``backward``, no ``step``, DeepSpeed's counters
  untouched (so ``global_steps`` counts updated steps only).

``engine.was_step_applied()`` then says whether the update happened. An update that DeepSpeed was expected
to discard but applied (ZeRO stage 0 does not check the gradient norm) stops the run with an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kernels.distributed import RowGather
from rcml.batch import Batch
from rcml.conditioned import conditioned_contrastive_loss
from rcml.config import LossConfig
from rcml.loss import TERMS, relation_contrastive_loss
from rcml.train import faults

# What a step reports (StepResult.terms): the loss, its four terms, the conditioned term, the scale.
LOGGED = ("loss", *TERMS, "cond", "logit_scale")


def positive_groups(batch: Batch, positives: str) -> tuple[torch.Tensor, torch.Tensor | None]:
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


@dataclass
class StepResult:
    # LOGGED name -> 0-d fp32 tensor on the device: the mean over the window's good micro-batches (empty
    # when none was good); this rank's values (the loss contract: their mean over ranks is the global value)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    good: int = 0           # micro-batches with a finite loss (agreed by all ranks)
    bad: int = 0            # micro-batches with a non-finite loss
    applied: bool = False   # the optimizer update was applied
    stop: bool = False      # some rank asked to stop (signal or STOP file)


def outputs_sum(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of every differentiable output of the model: 0 x it reaches each parameter the loss reaches,
    with gradient 0 (exactly, when the outputs are finite)."""
    return sum(v.float().sum() for v in out.values() if v.requires_grad)


class TrainStep:
    """``step(batches, step, stop)`` runs one window (``batches``: this rank's gas micro-batches, CPU or
    device) on a DeepSpeed ``engine`` and returns a ``StepResult``. ``step`` is the 1-based number of the
    trainer step (for fault injection); ``stop``: this rank wants to stop (agreed with the others)."""

    def __init__(self, engine, loss: LossConfig, gas: int, device: torch.device) -> None:
        self.engine, self.loss, self.gas, self.device = engine, loss, gas, device
        self.gather = RowGather()  # kept across steps: one all-gather per loss once its capacity is known

    def forward_loss(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """-> (the model's outputs, {LOGGED name: 0-d tensor}); ``loss`` is the one to backpropagate."""
        out = self.engine(batch)
        lo = self.loss
        scale = out["logit_scale"].float()
        group_ids, members = positive_groups(batch, lo.positives)
        terms = relation_contrastive_loss(out["image_emb"].float(), out["text_emb"].float(), group_ids, scale,
                                          w_inter=lo.w_inter, w_intra=lo.w_intra, member_groups=members,
                                          impl=lo.impl, gather=self.gather)
        terms["cond"] = torch.zeros_like(terms["loss"])
        if lo.w_cond > 0:
            terms["cond"] = conditioned_contrastive_loss(out["cond_image_emb"].float(), out["cond_text_emb"].float(),
                                                         batch.cond_slice, batch.cond_member, scale,
                                                         w_inter=lo.w_inter, w_intra=lo.w_intra)["cond"]
            terms["loss"] = terms["loss"] + lo.w_cond * terms["cond"]
        terms["logit_scale"] = scale.detach()
        return out, terms

    def _agree(self, loss: torch.Tensor, out: dict[str, torch.Tensor], stop: bool) -> tuple[bool, bool, bool]:
        """(the loss is non-finite, the outputs are non-finite, stop) on any rank: one all-reduce, one read."""
        outputs_finite = torch.stack([torch.isfinite(v).all() for v in out.values()]).all()
        flags = torch.stack([~torch.isfinite(loss.detach()), ~outputs_finite]).float()
        flags = torch.cat([flags, flags.new_tensor([float(stop)])])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_outputs, stop = (flags > 0).tolist()
        return bad_loss, bad_outputs, stop

    def __call__(self, batches: list[Batch], step: int, stop: bool = False) -> StepResult:
        if len(batches) != self.gas:
            raise ValueError(f"a step takes gradient_accumulation_steps={self.gas} micro-batches, got {len(batches)}")
        batches = [b.to(self.device, non_blocking=True) for b in batches]  # queued at once, ahead of the compute
        result = StepResult()
        sums: dict[str, torch.Tensor] = {}
        must_discard = False  # the window's gradient cannot be used: DeepSpeed has to discard the update
        for micro, batch in enumerate(batches):
            out, terms = self.forward_loss(batch)
            if faults.nonfinite_loss(step, micro):
                terms["loss"] = terms["loss"] * float("nan")
            bad_loss, bad_outputs, stop_now = self._agree(terms["loss"], out, stop)
            result.stop = result.stop or stop_now
            if not bad_loss:
                self.engine.backward(terms["loss"])
                result.good += 1
                for name in LOGGED:
                    sums[name] = sums.get(name, 0.0) + terms[name].detach().float()
            elif self.gas == 1:  # skipped outright: nothing to keep in step with
                result.bad += 1
                return result
            else:
                result.bad += 1
                discard_now = micro == self.gas - 1 and result.good == 0  # no good micro-batch in the window
                must_discard = must_discard or bad_outputs or discard_now
                self.engine.backward(outputs_sum(out) * (float("nan") if discard_now else 0.0))
            self.engine.step()
        result.applied = bool(self.engine.was_step_applied())
        if must_discard and result.applied:
            raise RuntimeError(
                f"step {step}: DeepSpeed applied an update from a non-finite gradient (a window without a usable "
                "micro-batch); this optimizer does not discard such updates (ZeRO stage 0?). The weights may be "
                "corrupt: resume from the last checkpoint, and use ZeRO stage 1-3 with gradient accumulation.")
        result.terms = {name: value / result.good for name, value in sums.items()}
        return result
