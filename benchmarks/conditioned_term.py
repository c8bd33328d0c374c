"""Cost of the conditioned contrast term (loss.w_cond): training-step time and memory with and without it.

    .venv/bin/python benchmarks/conditioned_term.py [--model tiny] [--groups 16] [--members 4] [--candidates 32]

One process, the real model and loss on a batch of the emoji benchmark's shape (P groups x K members
per rank, 64 px, 24 tokens), fwd + loss + bwd + AdamW, no data pipeline. Both variants run interleaved
in the same process (the machine is noisy: only the ratio means something). Memory: the bytes the
step allocates (torch profiler, CPU), and the extra pooled rows. The term is rank-local, so the cost per
rank does not change with the world size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._batches import random_tokens  # noqa: E402
from rcml.batch import Batch  # noqa: E402
from rcml.conditioned import conditioned_contrastive_loss, conditioned_rows  # noqa: E402
from rcml.config import ModelConfig  # noqa: E402
from rcml.loss import relation_contrastive_loss  # noqa: E402
from rcml.model import build_model  # noqa: E402


def make_batch(groups: int, members: int, candidates: int, image_size: int, context: int, vocab: int,
               gen: torch.Generator) -> Batch:
    rows = groups * members
    ids, mask = random_tokens(rows, context, vocab, gen)
    row_group = [f"g{r // members}" for r in range(rows)]
    row_relation = [r // members for r in range(rows)]
    # every item also in a second, random group: related non-members exist, as on real data
    extra = torch.randint(0, groups, (rows,), generator=gen).tolist()
    item_groups = [{g, f"h{e}"} for g, e in zip(row_group, extra)]
    c_item, c_rel, c_slice, c_member = conditioned_rows(row_group, row_relation, item_groups, candidates)
    return Batch(images=torch.randn(rows, 3, image_size, image_size, generator=gen), text_ids=ids, text_mask=mask,
                 relation_ids=ids[::members].clone(), relation_mask=mask[::members].clone(),
                 row_item=torch.arange(rows), row_relation=torch.tensor(row_relation),
                 group_ids=torch.tensor([hash(g) % 2**62 for g in row_group], dtype=torch.int64),
                 cond_item=torch.tensor(c_item), cond_relation=torch.tensor(c_rel), cond_slice=torch.tensor(c_slice),
                 cond_member=torch.tensor(c_member))


def step(model, optimizer, batch: Batch, w_cond: float) -> None:
    b = batch if w_cond > 0 else Batch(**(vars(batch) | dict.fromkeys(
        ("cond_item", "cond_relation", "cond_slice", "cond_member"))))
    out = model(b)
    loss = relation_contrastive_loss(out["image_emb"], out["text_emb"], b.group_ids, out["logit_scale"])["loss"]
    if w_cond > 0:
        loss = loss + w_cond * conditioned_contrastive_loss(out["cond_image_emb"], out["cond_text_emb"],
                                                            b.cond_slice, b.cond_member, out["logit_scale"])["cond"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def allocated_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.cpu_memory_usage) for e in prof.events())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "conditioned_term.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    image_size, context, vocab = 64, 24, 1000
    model = build_model(ModelConfig(name=args.model), vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2,
                        context_length=context, image_size=image_size, impl="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(args.groups, args.members, args.candidates, image_size, context, vocab, gen)
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(2):  # warm-up
        step(model, optimizer, batch, 0.0)
        step(model, optimizer, batch, 1.0)
    for _ in range(args.repeats):
        for name, w in (("without", 0.0), ("with", 1.0)):
            t0 = time.perf_counter()
            step(model, optimizer, batch, w)
            times[name].append(time.perf_counter() - t0)
    memory = {name: allocated_bytes(lambda w=w: step(model, optimizer, batch, w)) for name, w in
              (("without", 0.0), ("with", 1.0))}
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "rows": batch.num_rows, "cond_rows": int(batch.cond_item.numel()),
              "slices": int(batch.cond_slice.max()) + 1, "step_s": median,
              "time_ratio": median["with"] / median["without"], "allocated_mb": {k: v / 2**20 for k, v in memory.items()},
              "memory_ratio": memory["with"] / memory["without"], "repeats": args.repeats,
              "device": "cpu", "threads": torch.get_num_threads()}
    print("| variant | rows | pooled rows | step (ms, median) | allocated per step (MB) |")
    print("|---|---|---|---|---|")
    for name in ("without", "with"):
        pooled = batch.num_rows + (result["cond_rows"] if name == "with" else 0)
        print(f"| {name} conditioned term | {batch.num_rows} | {pooled} | {median[name] * 1e3:.1f} | "
              f"{memory[name] / 2**20:.1f} |")
    print(f"\nwith / without: time {result['time_ratio']:.3f}x, allocated memory {result['memory_ratio']:.3f}x")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
