"""What the trainer adds to DeepSpeed's optimizer: weight-decay groups and the bound on the logit scale.

Weight decay (OpenCLIP's grouping). Decoupled AdamW decay pulls every decayed tensor towards 0 by
``lr x weight_decay`` of itself per step. That is meant for the weight matrices (attention, MLP,
projections, the patch embedding's convolution), not for

- biases and norm gains/shifts (LayerNorm): decaying a gain shrinks activations, it regularizes nothing;
- embedding tables (token, position, class embedding): rows are looked up, not multiplied, and decay
  erodes the rows of rare tokens that seldom get a gradient;
- ``logit_scale``: decay pulls the temperature towards 1, against the loss.

Those form a second group with ``weight_decay`` 0. The first group has no ``weight_decay`` of its own:
it takes the DeepSpeed JSON's ``optimizer.params.weight_decay`` (DeepSpeed passes the JSON's params as
the optimizer's defaults and a group's own value wins), so the JSON stays the one place for the rate.

Logit scale bound. ``logit_scale`` (log of the contrastive temperature's inverse) is clamped in place to
[0, ln 100] after every optimizer step, as OpenCLIP does, so the forward reads it unclamped and its
gradient is never cut off. The clamp must reach the copy the optimizer updates: under bf16, and under any
ZeRO stage, that is DeepSpeed's fp32 master copy, and the module's parameter is only a copy of it
(rounded to bf16 under bf16), overwritten from the master at every step. ``clamp_parameter_`` clamps
both; it is elementwise, so each rank clamps the part it holds and nothing is communicated.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from rcml.model import LOGIT_SCALE_MAX

log = logging.getLogger("rcml")

# Modules whose parameters are never decayed (their 1-D parameters would be caught by the rank rule anyway;
# listing them also covers the 2-D embedding tables).
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
LOGIT_SCALE_BOUNDS = (0.0, math.log(LOGIT_SCALE_MAX))  # of the stored (log) value: scale in [1, 100]


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    """The full shape, also of a ZeRO-3 partitioned parameter (whose ``.shape`` is (0,) outside forward)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def split_weight_decay(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """-> (decayed, not decayed): {name: parameter} of every trainable parameter, each in exactly one.

    Not decayed: parameters of embedding and norm modules, and every parameter of fewer than 2 dimensions
    (biases, the class embedding, ``logit_scale``). Decayed: the rest (matrices and convolution kernels).
    """
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a tied parameter counts once
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, NO_DECAY_MODULES) or len(_shape(param)) < 2:
                no_decay[full] = param
            else:
                decay[full] = param
    return decay, no_decay


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``model_parameters`` for ``deepspeed.initialize``: [decayed (the JSON's rate), not decayed (0)]."""
    decay, no_decay = split_weight_decay(model)
    return [{"params": list(decay.values())}, {"params": list(no_decay.values()), "weight_decay": 0.0}]


def log_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """One line: the weight decay of each group as the built optimizer holds it, with tensor counts."""
    decay, no_decay = split_weight_decay(model)

    def millions(params: dict[str, nn.Parameter]) -> float:
        return sum(math.prod(_shape(p)) for p in params.values()) / 1e6

    rates = [g.get("weight_decay") for g in optimizer.param_groups]
    log.info("optimizer groups (weight_decay %s): %d tensors decayed (%.2f M), %d not (%.2f M: biases, norms, "
             "embeddings, logit_scale)", rates, len(decay), millions(decay), len(no_decay), millions(no_decay))


def clamp_parameter_(optimizer: Any, param: nn.Parameter, low: float, high: float) -> None:
    """Clamp ``param`` in place, in the optimizer's fp32 master copy and in the module's copy.

    ``optimizer`` is ``engine.optimizer``. Call it between steps (after ``engine.step()``), on every rank.
    Supported: ZeRO-3 (the master is this rank's partition), ZeRO-1/2 and DeepSpeed's bf16 optimizer (the
    fragment of the master this rank owns), and no wrapper (fp32 without ZeRO: the parameter is the
    master). Any other optimizer layout raises instead of clamping a copy that the next step overwrites.
    """
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            local = safe_get_local_fp32_param(param)  # [partition], padding included
            if local is not None:
                safe_set_local_fp32_param(param, local.clamp(low, high))
            param.ds_tensor.clamp_(low, high)  # the module's partition: what the next gather reads
            if param.numel():  # gathered now (a small, persistent parameter always is)
                param.data.clamp_(low, high)
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: every rank holds the whole module copy
            if param._hp_mapping is not None:  # None: another rank owns all of its master
                param._hp_mapping.get_hp_fragment().clamp_(low, high)
            param.data.clamp_(low, high)
        elif any(p is param for group in optimizer.param_groups for p in group["params"]):
            param.data.clamp_(low, high)
        else:
            raise RuntimeError(f"cannot find the master copy of a parameter in {type(optimizer).__name__}; the "
                               "logit scale can only be bounded with ZeRO stage 1-3, or fp32 without ZeRO")


def bound_logit_scale_(engine) -> None:
    """Clamp the model's ``logit_scale`` to ``LOGIT_SCALE_BOUNDS`` (after each step, and once at start-up for
    a pretrained scale beyond them)."""
    clamp_parameter_(engine.optimizer, engine.module.logit_scale, *LOGIT_SCALE_BOUNDS)


def initialize(model: nn.Module, ds: dict[str, Any]):
    """``deepspeed.initialize`` with the weight-decay groups, logged, and the logit scale bounded -> engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    log_param_groups(engine.optimizer, model)
    bound_logit_scale_(engine)
    return engine
