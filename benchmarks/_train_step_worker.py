"""One rank of benchmarks/train_step.py (started by the deepspeed launcher)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._batches import random_tokens  # noqa: E402
from rcml.batch import Batch  # noqa: E402
from rcml.config import ModelConfig  # noqa: E402
from rcml.loss import relation_contrastive_loss  # noqa: E402
from rcml.model import build_model  # noqa: E402

# A mid-size model between tiny and base: ViT 256-wide x 6 layers at 96 px, text 256 x 6.
MID = {"embed_dim": 256, "pool_heads": 4,
       "vision": {"image_size": 96, "patch_size": 16, "width": 256, "layers": 6, "heads": 4, "mlp_ratio": 4},
       "text": {"width": 256, "layers": 6, "heads": 4, "mlp_ratio": 4}}


def ds_config(stage: int, rows: int) -> dict:
    cfg = json.loads((Path(__file__).resolve().parents[1] / "configs" / f"zero{stage}.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = rows
    cfg["train_batch_size"] = rows * dist.get_world_size()
    cfg.pop("scheduler", None)
    return cfg


def random_batch(rows: int, image_size: int, context: int, vocab: int, gen: torch.Generator) -> Batch:
    ids, mask = random_tokens(rows, context, vocab, gen)
    groups = torch.randint(0, rows // 4 + 1, (rows,), generator=gen)
    return Batch(images=torch.randn(rows, 3, image_size, image_size, generator=gen), text_ids=ids, text_mask=mask,
                 relation_ids=ids.clone(), relation_mask=mask.clone(), row_item=torch.arange(rows),
                 row_relation=torch.arange(rows), group_ids=groups.long())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(verbose=False)
    torch.manual_seed(0)
    cfg = ds_config(args.stage, args.rows)
    context, vocab = 32, 1000
    if args.model == "mid":
        model_path = Path(args.out) / "mid.json"
        if dist.get_rank() == 0:
            model_path.write_text(json.dumps(MID))
        dist.barrier()
        mcfg, image_size = ModelConfig(name=str(model_path)), MID["vision"]["image_size"]
    else:
        mcfg, image_size = ModelConfig(name=args.model), 64
    with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=args.stage == 3):
        model = build_model(mcfg, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2, context_length=context,
                            image_size=image_size)
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    gen = torch.Generator().manual_seed(dist.get_rank())
    batches = [random_batch(args.rows, image_size, context, vocab, gen) for _ in range(2)]
    times = []
    for step in range(args.steps + 2):  # 2 warm-up steps
        dist.barrier()
        t0 = time.perf_counter()
        out = engine(batches[step % 2])
        loss = relation_contrastive_loss(out["image_emb"], out["text_emb"], batches[step % 2].group_ids,
                                         out["logit_scale"])["loss"]
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    # bytes this rank holds for parameters and optimizer state
    state_bytes = 0
    seen: set[int] = set()

    def count(t) -> None:
        nonlocal state_bytes
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            state_bytes += t.numel() * t.element_size()

    for q in engine.module.parameters():
        count(q.ds_tensor if hasattr(q, "ds_tensor") else q.data)
    # fp32 master partitions (ZeRO-3 / ZeRO-2 attribute names) and every Adam state tensor; the torch
    # optimizer inside ZeRO-3 keys its state by the flat fp32 partitions, not by model parameters.
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for t in getattr(optimizer, attr, None) or []:
            count(t)
    inner = getattr(optimizer, "optimizer", optimizer)
    for key, state in inner.state.items():
        count(key)
        for v in state.values():
            count(v)
    median = sorted(times)[len(times) // 2]
    result = {"params": n_params, "samples_per_s": args.rows * dist.get_world_size() / median,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "state_bytes": state_bytes}
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
