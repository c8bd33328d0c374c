"""How hard are the training batches? The relation-grouping sampler's options on a real shard stream.

    python benchmarks/batch_hardness.py --shards 'data/emoji/train/shard-{000000..000026}.tar' \
        [--groups 16 --members 4 --buffer 1024 --quotas keyword=3] [--out benchmarks/results/batch_hardness.json]

Streams the shards in order through ``RelationGroupingSampler`` (light decode only: no pixel is
decoded) once per setting -- independent picks, hard batches, hard batches with the given per-type
quotas -- and reports, per setting, the in-batch negative pairs (ordered row pairs drawn for different
groups) that are *related* to the anchor under another relation (the negatives a relation-blind
embedding cannot separate; raising this is the point of hard batches), those that are in fact *members*
of the anchor's group (positives that a row-level loss would count as negatives; full-membership
positives fix them), the singleton-row fraction and the groups per relation type. One stream, the
whole dataset: a rank in training sees its share of the shards, with the same buffer per worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcml.batch import batch_stats  # noqa: E402
from rcml.data import parse_sources  # noqa: E402
from rcml.decode import SkipCounter, iter_items  # noqa: E402
from rcml.sampler import SELF_TYPE, RelationGroupingSampler  # noqa: E402


def measure(urls: list[str], args, *, hard: bool, quotas: str) -> dict:
    counter = SkipCounter()
    items = (item for url in urls for item in iter_items(url, counter, 64_000_000))
    sampler = RelationGroupingSampler(args.groups, args.members, args.min_group, args.buffer, hard=hard,
                                      type_quotas=quotas, seed=args.seed)
    totals: Counter = Counter()
    group_types: Counter = Counter()
    start = time.perf_counter()
    for rows in sampler(items):
        item_groups = [{rel["group"] for rel in row.item.relations} | {row.group} for row in rows]
        totals.update(batch_stats([r.group for r in rows], [r.type for r in rows], item_groups))
        group_types.update(t for _, t in {(r.group, r.type) for r in rows if r.type != SELF_TYPE})
    rows = sum(v for k, v in totals.items() if k.startswith("rows_"))
    batches = sampler.stats["batches"]
    return {
        "hard_batches": hard, "type_quotas": quotas, "batches": batches, "rows": rows,
        "related_negative_fraction": totals["related_negative_pairs"] / max(totals["negative_pairs"], 1),
        "member_negative_fraction": totals["member_negative_pairs"] / max(totals["negative_pairs"], 1),
        "singleton_fraction": totals.get(f"rows_{SELF_TYPE}", 0) / max(rows, 1),
        "frontier_groups_per_batch": sampler.stats["frontier_groups"] / max(batches, 1),
        "groups_per_batch_by_type": {t: n / max(batches, 1) for t, n in sorted(group_types.items())},
        "skipped": counter.counts, "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--min-group", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=1024)
    ap.add_argument("--quotas", default="", help="per-type quotas for the third setting, e.g. keyword=3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/batch_hardness.json")
    args = ap.parse_args()
    urls = [u for source, _ in parse_sources(args.shards) for u in source]
    settings = [(False, ""), (True, "")] + ([(True, args.quotas)] if args.quotas else [])
    results = [measure(urls, args, hard=h, quotas=q) for h, q in settings]
    print(f"{'setting':<28} {'related neg':>12} {'member neg':>11} {'singletons':>11} {'frontier/batch':>15}")
    for r in results:
        name = ("hard" if r["hard_batches"] else "independent") + (f" + {r['type_quotas']}" if r["type_quotas"] else "")
        print(f"{name:<28} {r['related_negative_fraction']:>12.3f} {r['member_negative_fraction']:>11.3f} "
              f"{r['singleton_fraction']:>11.3f} {r['frontier_groups_per_batch']:>15.1f}")
    for r in results:
        print(("hard" if r["hard_batches"] else "independent"), r["type_quotas"] or "",
              {t: round(v, 2) for t, v in r["groups_per_batch_by_type"].items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "shards": args.shards, "groups": args.groups,
                               "members": args.members, "buffer": args.buffer, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
