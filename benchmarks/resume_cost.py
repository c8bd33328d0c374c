"""Loader resume cost: replaying the epoch vs restoring the saved reader states, after n consumed batches.

    .venv/bin/python benchmarks/resume_cost.py [--batches 100,10000] [--data /tmp/rcml_resume_data] [--repeats 2]

A small config on synthetic shards (``data_prep.synthetic``, 2000 items in 8 shards, 32 px): 2 workers,
P x K = 4 x 4 rows, grouping buffer 256, ``data.resampled=true`` (an endless stream, so 10,000 batches
fit in one "epoch", as in a long resampled run). One straight loader runs to the largest n, recording
the trainer's ``LoaderPosition`` at every n. Then, per n and per method, a fresh loader is built from
that position and timed to its first batch (worker start included), which must equal the straight
run's batch n:

- ``replay``: the fallback (shards that cannot be seeked into, or a checkpoint without reader states):
  every worker re-reads the light stage of all W logical streams up to n;
- ``cursor``: each worker rebuilds its stream from its saved state, re-reading only the buffered
  samples by seeking into their shards.

Reported: wall seconds (best of ``--repeats``) and CPU seconds of the main process + workers (robust on
a shared machine). Writes a table and ``benchmarks/results/resume_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rcml.config import DataConfig  # noqa: E402
from rcml.data import build_loader  # noqa: E402
from rcml.data_state import LoaderPosition  # noqa: E402
from rcml.tokenizer import TextTokenizer  # noqa: E402

ITEMS, SHARD_SIZE, IMAGE_SIZE = 2000, 250, 32


def ensure_data(root: Path) -> tuple[str, Path]:
    manifest = root / "train" / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["num_samples"] != ITEMS:
        from data_prep.synthetic import build

        build(root, items=ITEMS, val_items=16, seed=0, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)
    pattern = json.loads(manifest.read_text())["pattern"]
    tok_path = root / "tokenizer.json"
    if not tok_path.is_file():
        from data_prep.train_tokenizer import build_tokenizer, iter_texts
        from rcml.decode import SkipCounter

        build_tokenizer(iter_texts(pattern, SkipCounter()), 500).save(str(tok_path))
    return pattern, tok_path


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, joined at shutdown)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def first_batch(make) -> tuple[object, float, float]:
    """(first batch, wall seconds from building the loader to it, CPU seconds of main + workers)."""
    t, c = time.perf_counter(), _cpu_seconds()
    it = iter(make())
    batch = next(it)
    dt = time.perf_counter() - t
    del it  # joins the workers, so that their CPU time is counted
    return batch, dt, _cpu_seconds() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="100,10000", help="consumed batches before the resume, comma-separated")
    p.add_argument("--data", default="/tmp/rcml_resume_data")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resume_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    pattern, tok_path = ensure_data(Path(args.data))
    tok = TextTokenizer.from_file(tok_path)
    cfg = DataConfig(train=pattern, workers=2, image_size=IMAGE_SIZE, context_length=16, groups_per_batch=4,
                     members_per_group=4, min_group=2, buffer_size=256, resampled=True)
    points = sorted(int(n) for n in args.batches.split(","))

    def loader(position=None):
        return build_loader(cfg, tok, mode="rcml", rank=0, world_size=1, seed=0, position=position)

    t = time.perf_counter()
    position, saved, expected = LoaderPosition.start(cfg), {}, {}
    for batch in loader():
        if position.batches in points:
            saved[position.batches], expected[position.batches] = position.copy(), batch.keys
            if position.batches == points[-1]:
                break
        position.consumed(batch)
    print(f"straight run to batch {points[-1]}: {time.perf_counter() - t:.0f} s", flush=True)

    results = []
    for n in points:
        makers = {"replay": lambda: loader(LoaderPosition.load(None, cfg, n)),
                  "cursor": lambda: loader(saved[n])}
        wall, cpu = {k: float("inf") for k in makers}, {k: float("inf") for k in makers}
        for _ in range(args.repeats):
            for name, make in makers.items():
                batch, dt, dc = first_batch(make)
                assert batch.keys == expected[n], (name, n)  # exact: the straight run's batch n
                wall[name], cpu[name] = min(wall[name], dt), min(cpu[name], dc)
        rows = cfg.groups_per_batch * cfg.members_per_group
        point = {"batches": n, "samples": n * rows, "replay_s": round(wall["replay"], 3),
                 "cursor_s": round(wall["cursor"], 3), "replay_cpu_s": round(cpu["replay"], 3),
                 "cursor_cpu_s": round(cpu["cursor"], 3)}
        results.append(point)
        print(f"after {n} batches: replay {wall['replay']:.2f} s ({cpu['replay']:.2f} CPU-s), cursor "
              f"{wall['cursor']:.2f} s ({cpu['cursor']:.2f} CPU-s)", flush=True)

    print()
    print("| batches consumed | samples | replay s | cursor s | replay CPU-s | cursor CPU-s | replay / cursor |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batches']:,} | {r['samples']:,} | {r['replay_s']:.2f} | {r['cursor_s']:.2f} "
              f"| {r['replay_cpu_s']:.2f} | {r['cursor_cpu_s']:.2f} | {r['replay_s'] / r['cursor_s']:.1f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"items": ITEMS, "shard_size": SHARD_SIZE, "image_size": IMAGE_SIZE, "workers": cfg.workers,
            "rows_per_batch": cfg.groups_per_batch * cfg.members_per_group, "buffer_size": cfg.buffer_size,
            "resampled": cfg.resampled, "repeats": args.repeats, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
