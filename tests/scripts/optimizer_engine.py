"""Run under a launcher: the trainer's optimizer set-up on a real DeepSpeed engine, reported as JSON.

    deepspeed --num_gpus N tests/scripts/optimizer_engine.py OUT_DIR DS_CONFIG [ds.key=value ...]

Builds the tiny model the way the trainer does (``zero.Init`` for ZeRO-3, ``rcml.train.optimizer.initialize``)
with a constant learning rate (the schedule is dropped), then

1. one step with an all-zero gradient: AdamW moves nothing but decay, so each parameter is multiplied by
   exactly ``1 - lr x weight_decay`` of its group (reported per parameter);
2. steps whose loss is ``-logit_scale``: Adam pushes the stored value up by about ``lr`` per step, past
   ln 100, and ``bound_logit_scale_`` clamps it after each step (reported: the fp32 master copy, the
   module's copy, and the scale the forward returns).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rcml.batch import Batch  # noqa: E402
from rcml.config import ModelConfig, load_config  # noqa: E402
from rcml.model import build_model  # noqa: E402
from rcml.train import optimizer  # noqa: E402
from rcml.train.ds_config import load_ds_config, uses_bf16, zero_stage  # noqa: E402

VOCAB, L, S, EOS = 300, 16, 32, 2
PUSH_STEPS = 10


def tiny_batch(items: int = 4, relations: int = 2) -> Batch:
    gen = torch.Generator().manual_seed(0)

    def texts(n):
        ids = torch.randint(EOS + 1, VOCAB, (n, L), generator=gen)
        ids[:, 0], ids[:, -1] = 1, EOS
        return ids, torch.ones(n, L, dtype=torch.bool)

    ids, mask = texts(items)
    rel_ids, rel_mask = texts(relations)
    rows = torch.arange(items)
    return Batch(images=torch.randn(items, 3, S, S, generator=gen), text_ids=ids, text_mask=mask,
                 relation_ids=rel_ids, relation_mask=rel_mask, row_item=rows, row_relation=rows % relations,
                 group_ids=rows.clone())


def full_values(model) -> dict[str, list[float]]:
    """The module's copy of every parameter, whole (gathered under ZeRO-3), as fp32 lists."""
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().float().flatten().tolist() for n, p in params.items()}


def main() -> None:
    out_dir, ds_path, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    deepspeed.init_distributed(verbose=False)
    world = dist.get_world_size()
    cfg = load_config(None, ["data.train=x.tar", "data.groups_per_batch=2", "data.members_per_group=2",
                             "train.steps=100"])
    ds = load_ds_config(ds_path, cfg, world, overrides)
    ds.pop("scheduler", None)  # a constant lr: each step's size is known
    lr = float(ds["optimizer"]["params"]["lr"])
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3):
        model = build_model(ModelConfig(name="tiny"), vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=EOS,
                            context_length=L, image_size=S)
    engine = optimizer.initialize(model, ds)
    decay, no_decay = optimizer.split_weight_decay(engine.module)
    batch = tiny_batch().to(engine.device)  # CPU here; on a GPU it runs the GPU configs as they are (FusedAdam)
    if uses_bf16(ds):
        batch.images = batch.images.to(torch.bfloat16)

    def step(loss_of) -> dict:
        out = engine(batch)
        engine.backward(loss_of(out))
        engine.step()
        optimizer.bound_logit_scale_(engine)  # what the trainer does after each optimizer step
        return out

    before = full_values(engine.module)
    step(lambda out: 0.0 * (out["image_emb"].sum() + out["text_emb"].sum() + out["logit_scale"]))
    after = full_values(engine.module)
    ratios = {}
    for name in before:
        pairs = [(b, a) for b, a in zip(before[name], after[name]) if abs(b) > 1e-3]
        ratios[name] = sum(a / b for b, a in pairs) / len(pairs) if pairs else None

    for _ in range(PUSH_STEPS):
        step(lambda out: -out["logit_scale"] + 0.0 * (out["image_emb"].sum() + out["text_emb"].sum()))
    param = engine.module.logit_scale
    master = deepspeed.utils.safe_get_full_fp32_param(param)  # the copy the optimizer updates (None: no wrapper)
    module_value = full_values(engine.module)["logit_scale"]
    with torch.no_grad():
        forward_scale = engine(batch)["logit_scale"]
    report = {
        "world": world, "stage": zero_stage(ds), "bf16": uses_bf16(ds), "lr": lr,
        "optimizer": type(engine.optimizer).__name__, "basic_optimizer": type(engine.basic_optimizer).__name__,
        "group_weight_decay": [g["weight_decay"] for g in engine.optimizer.param_groups],
        "json_weight_decay": ds["optimizer"]["params"]["weight_decay"],
        "decay": sorted(decay), "no_decay": sorted(no_decay), "decay_ratio": ratios,
        "logit_scale_master": None if master is None else master.float().flatten().tolist(),
        "logit_scale_module": module_value, "logit_scale_dtype": str(param.dtype),
        "forward_scale": forward_scale.item(), "forward_scale_dtype": str(forward_scale.dtype),
    }
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
