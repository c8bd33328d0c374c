"""Data pipeline throughput: plain WebDataset + decode vs the full RCML pipeline, at 1 and 2 workers.

    .venv/bin/python benchmarks/data_pipeline.py [--items 20000] [--data /tmp/rcml_bench_data] [--repeats 2]

(a) ``plain``: ``wds.WebDataset`` (no shard shuffle) -> image decode (Pillow) + caption decode -> the same
    crop/resize as training -> batches of P x K: pixels stacked and normalized, captions tokenized. This
    is what OpenCLIP's WebDataset loader does per sample.
(b) ``rcml``: ``rcml.data.build_loader`` -> safe member checks, JSON relations, relation grouping
    (P groups x K), tokenization of captions and relation texts, ``Batch`` collate.

Both run one full epoch over the synthetic dataset through a ``torch.utils.data.DataLoader`` with W
workers, (a) and (b) interleaved, best of ``--repeats``. Reported: samples/s of wall time (worker start
included) and samples per CPU-second of the main process + workers (robust on a shared machine, where
other jobs steal cores). The headline is the ratio (b)/(a) per W, measured in the same run (target
>= 0.9). Writes a table and ``benchmarks/results/data_pipeline.json``.
"""

from __future__ import annotations

import argparse
import io
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from rcml.config import DataConfig  # noqa: E402
from rcml.data import build_loader  # noqa: E402
from rcml.preprocess import ImageTransform, normalize  # noqa: E402
from rcml.tokenizer import TextTokenizer  # noqa: E402


def ensure_data(root: Path, items: int) -> tuple[str, Path]:
    manifest = root / "train" / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["num_samples"] != items:
        from data_prep.synthetic import build

        t = time.perf_counter()
        build(root, items=items, val_items=16, seed=0, image_size=64, shard_size=1000)
        print(f"built {items} synthetic items in {time.perf_counter() - t:.1f} s")
    pattern = json.loads(manifest.read_text())["pattern"]
    tok_path = root / "tokenizer.json"
    if not tok_path.is_file():
        from data_prep.train_tokenizer import build_tokenizer, iter_texts
        from rcml.decode import SkipCounter

        build_tokenizer(iter_texts(pattern, SkipCounter()), 1000).save(str(tok_path))
    return pattern, tok_path


class _PlainDecode:
    """(a)'s per-sample work: decode jpg + txt, crop/resize like training."""

    def __init__(self, image_size: int) -> None:
        self.transform = ImageTransform(image_size, train=True)

    def __call__(self, sample: dict) -> tuple[np.ndarray, str]:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return self.transform.pixels(image), sample["txt"].decode("utf-8")


class _CollatePlain:
    def __init__(self, tokenizer: TextTokenizer, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        pixels, captions = zip(*batch)
        ids, _ = self.tokenizer.encode(list(captions), self.context_length)
        return normalize(torch.from_numpy(np.stack(pixels))), ids, list(captions)


def plain_loader(pattern: str, cfg: DataConfig, workers: int, tokenizer: TextTokenizer):
    rows = cfg.groups_per_batch * cfg.members_per_group
    collate = _CollatePlain(tokenizer, cfg.context_length)
    ds = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
          .map(_PlainDecode(cfg.image_size)).batched(rows, collation_fn=collate, partial=True))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, joined at epoch end)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch(make) -> tuple[int, float, float]:
    """One full epoch of a fresh loader -> (samples, wall seconds, CPU seconds of main + workers)."""
    t, c = time.perf_counter(), _cpu_seconds()
    loader = make()
    n = 0
    for batch in loader:
        n += batch.num_rows if hasattr(batch, "num_rows") else len(batch[2])
    del loader  # workers are joined when the iterator is gone
    return n, time.perf_counter() - t, _cpu_seconds() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--data", default="/tmp/rcml_bench_data")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_pipeline.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    pattern, tok_path = ensure_data(Path(args.data), args.items)
    tok = TextTokenizer.from_file(tok_path)
    results = []
    for workers in map(int, args.workers.split(",")):
        cfg = DataConfig(train=pattern, workers=workers, image_size=64, context_length=32, groups_per_batch=16,
                         members_per_group=4, min_group=2, buffer_size=2048, shard_shuffle=100)
        makers = {"plain": lambda: plain_loader(pattern, cfg, workers, tok),
                  "rcml": lambda: build_loader(cfg, tok, mode="rcml", rank=0, world_size=1, seed=0)}
        wall, cpu = {k: 0.0 for k in makers}, {k: 0.0 for k in makers}
        for _ in range(args.repeats):  # interleaved, best of: load from other jobs hits both alike
            for name, make in makers.items():
                n, dt, dc = epoch(make)
                assert n == args.items, (name, n)
                wall[name], cpu[name] = max(wall[name], n / dt), max(cpu[name], n / dc)
        point = {"workers": workers, "plain_samples_per_s": round(wall["plain"], 1),
                 "rcml_samples_per_s": round(wall["rcml"], 1), "ratio": round(wall["rcml"] / wall["plain"], 3),
                 "plain_samples_per_cpu_s": round(cpu["plain"], 1), "rcml_samples_per_cpu_s": round(cpu["rcml"], 1),
                 "cpu_ratio": round(cpu["rcml"] / cpu["plain"], 3)}
        results.append(point)
        print(f"workers {workers}: wall plain {wall['plain']:.0f}/s rcml {wall['rcml']:.0f}/s ratio {point['ratio']:.3f}"
              f" | per CPU-second plain {cpu['plain']:.0f} rcml {cpu['rcml']:.0f} ratio {point['cpu_ratio']:.3f}",
              flush=True)

    print()
    print("| workers | (a) plain, samples/s | (b) RCML, samples/s | (b)/(a) wall | (a) samples/CPU-s | (b) samples/CPU-s "
          "| (b)/(a) CPU |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['plain_samples_per_s']:.0f} | {r['rcml_samples_per_s']:.0f} | {r['ratio']:.3f} "
              f"| {r['plain_samples_per_cpu_s']:.0f} | {r['rcml_samples_per_cpu_s']:.0f} | {r['cpu_ratio']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"items": args.items, "image_size": 64, "rows_per_batch": 64, "repeats": args.repeats,
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "webdataset": wds.__version__ if hasattr(wds, "__version__") else "1.0.2"}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
