"""Data pipeline throughput: plain WebDataset + decode vs the full RCML pipeline, at 1 and 2 workers.

    .venv/bin/python benchmarks/data_pipeline.py [--items 20000] [--data /tmp/rcml_bench_data] [--repeats 2]

(a) ``plain``: ``wds.WebDataset`` (no shard shuffle) -> image decode (Pillow) + caption decode -> the same
    crop/resize as training -> batches of P x K stacked and normalized: what an OpenCLIP-style loader does.
(b) ``rcml``: ``rcml.data.build_loader`` -> safe member checks, JSON relations, relation grouping
    (P groups x K), tokenization of captions and relation texts, ``Batch`` collate.

Both run one full epoch over the synthetic dataset through a ``torch.utils.data.DataLoader`` with W
workers; samples/s = items / wall time (worker start included), best of ``--repeats``. The headline is
the ratio (b)/(a) per W, measured in the same run (target >= 0.9). Writes a table and
``benchmarks/results/data_pipeline.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
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
from rcml.data import ImageTransform, build_loader, normalize  # noqa: E402
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


def _collate_plain(batch: list) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = zip(*batch)
    return normalize(torch.from_numpy(np.stack(pixels))), list(captions)


def plain_loader(pattern: str, cfg: DataConfig, workers: int):
    rows = cfg.groups_per_batch * cfg.members_per_group
    ds = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
          .map(_PlainDecode(cfg.image_size)).batched(rows, collation_fn=_collate_plain, partial=True))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def epoch(loader) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch.num_rows if hasattr(batch, "num_rows") else len(batch[1])
    return n, time.perf_counter() - t


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
        point = {"workers": workers}
        for name, make in (("plain", lambda: plain_loader(pattern, cfg, workers)),
                           ("rcml", lambda: build_loader(cfg, tok, mode="rcml", rank=0, world_size=1, seed=0))):
            best = 0.0
            for _ in range(args.repeats):
                n, dt = epoch(make())
                assert n == args.items, (name, n)
                best = max(best, n / dt)
            point[f"{name}_samples_per_s"] = round(best, 1)
        point["ratio"] = round(point["rcml_samples_per_s"] / point["plain_samples_per_s"], 3)
        results.append(point)
        print(f"workers {workers}: plain {point['plain_samples_per_s']:.0f}/s  rcml {point['rcml_samples_per_s']:.0f}/s"
              f"  ratio {point['ratio']:.3f}", flush=True)

    print()
    print("| workers | (a) plain WebDataset + decode, samples/s | (b) RCML pipeline, samples/s | (b)/(a) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['plain_samples_per_s']:.0f} | {r['rcml_samples_per_s']:.0f} | {r['ratio']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"items": args.items, "image_size": 64, "rows_per_batch": 64, "repeats": args.repeats,
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "webdataset": wds.__version__ if hasattr(wds, "__version__") else "1.0.2"}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
