"""Run under a launcher: the trainer's step (rcml/train/step.py) on a real DeepSpeed engine with gradient
accumulation, reported for tests/test_accumulation.py.

    deepspeed --num_gpus 2 tests/scripts/accumulation_engine.py OUT_DIR DS_CONFIG [ds.key=value ...]

Five trainer steps of ``gradient_accumulation_steps`` = 2 micro-batches per rank (``micro_batch``), with
the losses of some micro-batches made NaN through the fault-injection point (``NONFINITE``). Before each
step, rank 0 saves the full weights; at each window's boundary, just before DeepSpeed's optimizer step,
every parameter's full gradient as DeepSpeed holds it (``safe_get_full_grad``: under ZeRO-3 the gradient
partitions accumulated over the window, gathered); after each step, DeepSpeed's step counters and lr.
The test recomputes the gradients in one process from the saved weights and the same micro-batches.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rcml.batch import Batch, group_id, member_group_ids  # noqa: E402
from rcml.conditioned import conditioned_rows  # noqa: E402
from rcml.config import ModelConfig, load_config  # noqa: E402
from rcml.model import build_model  # noqa: E402
from rcml.train import faults, optimizer  # noqa: E402
from rcml.train.ds_config import load_ds_config, zero_stage  # noqa: E402
from rcml.train.step import TrainStep  # noqa: E402

VOCAB, L, S, EOS = 300, 16, 32, 2
ROWS, GROUPS, COND_BUDGET = 6, ("red", "round", "small", "striped"), 4
STEPS = 5
# (step, micro-batch) whose loss is made NaN: step 2 loses its second micro-batch, step 3 its first, step 4
# both (no update); step 5 is whole again
NONFINITE = {(2, 1), (3, 0), (4, 0), (4, 1)}
RUN_CONFIG = ["data.train=x.tar", "data.groups_per_batch=2", f"data.members_per_group={ROWS // 2}",
              "train.steps=100"]


def micro_batch(step: int, micro: int, rank: int) -> Batch:
    """A training-shaped micro-batch (row i = item i, uint8 pixels) whose groups recur across ranks and
    micro-steps, with memberships in several groups and the conditioned term's rows."""
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    pick = torch.randint(0, len(GROUPS), (ROWS,), generator=gen).tolist()
    row_groups = [GROUPS[g] for g in pick]
    extra = torch.randint(0, len(GROUPS), (ROWS,), generator=gen).tolist()
    item_groups = [{g, GROUPS[e]} for g, e in zip(row_groups, extra)]
    relation_texts = list(dict.fromkeys(row_groups))
    row_relation = [relation_texts.index(g) for g in row_groups]

    def tokens(n):
        lengths = torch.randint(4, L + 1, (n,), generator=gen)
        ids = torch.randint(EOS + 1, VOCAB, (n, L), generator=gen)
        mask = torch.arange(L)[None] < lengths[:, None]
        ids[torch.arange(n), lengths - 1] = EOS
        ids[~mask] = 0
        ids[:, 0] = 1
        return ids, mask

    text_ids, text_mask = tokens(ROWS)
    relation_ids, relation_mask = tokens(len(relation_texts))
    cond = conditioned_rows(row_groups, row_relation, item_groups, COND_BUDGET)
    return Batch(images=torch.randint(0, 256, (ROWS, 3, S, S), generator=gen, dtype=torch.uint8),
                 text_ids=text_ids, text_mask=text_mask, relation_ids=relation_ids, relation_mask=relation_mask,
                 row_item=torch.arange(ROWS), row_relation=torch.tensor(row_relation),
                 group_ids=torch.tensor([group_id(g) for g in row_groups], dtype=torch.int64),
                 member_groups=member_group_ids(row_groups, item_groups),
                 cond_item=torch.tensor(cond[0]), cond_relation=torch.tensor(cond[1]),
                 cond_slice=torch.tensor(cond[2]), cond_member=torch.tensor(cond[3], dtype=torch.bool))


def full_weights(module) -> dict[str, torch.Tensor]:
    """The module's copy of every parameter, whole (gathered under ZeRO-3), in fp32 on the CPU."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def main() -> None:
    out_dir, ds_path, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    deepspeed.init_distributed(verbose=False)
    torch.manual_seed(0)
    cfg = load_config(None, RUN_CONFIG)
    ds = load_ds_config(ds_path, cfg, dist.get_world_size(), overrides)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3):
        model = build_model(ModelConfig(name="tiny"), vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=EOS,
                            context_length=L, image_size=S)
    engine = optimizer.initialize(model, ds)
    gas = int(ds["gradient_accumulation_steps"])
    train_step = TrainStep(engine, cfg.loss, gas, engine.device)
    faults.nonfinite_loss = lambda step, micro: (step, micro) in NONFINITE

    grads: list[dict[str, torch.Tensor]] = []
    real_step = engine.step

    def step_reading_gradients():
        if engine.is_gradient_accumulation_boundary():
            grads.append({n: deepspeed.utils.safe_get_full_grad(p).float().cpu().clone()
                          for n, p in engine.module.named_parameters()})
        real_step()

    engine.step = step_reading_gradients
    report = {"spec": model.spec, "loss": vars(cfg.loss), "gas": gas, "steps": []}
    for step in range(1, STEPS + 1):
        before = full_weights(engine.module)
        result = train_step([micro_batch(step, m, dist.get_rank()) for m in range(gas)], step)
        if result.applied:
            optimizer.bound_logit_scale_(engine)
        report["steps"].append({
            "weights": before, "grads": grads[-1], "good": result.good, "bad": result.bad,
            "applied": result.applied, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
            "lr": float(engine.get_lr()[0]), "terms": {k: float(v) for k, v in result.terms.items()}})
    report["final_weights"] = full_weights(engine.module)
    if dist.get_rank() == 0:
        torch.save(report, Path(out_dir) / "report.pt")
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
