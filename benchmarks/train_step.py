"""Training-step throughput and per-rank memory under DeepSpeed: ZeRO-3 at 1 and 2 ranks, ZeRO-2 beside it.

    .venv/bin/python benchmarks/train_step.py [--models tiny,mid] [--steps 6] [--rows 32]

Each point is a fresh `deepspeed` launch running ``benchmarks/_train_step_worker.py``: random batches of
the real Batch layout (no data pipeline, so the model step alone is measured), fwd + loss + bwd + AdamW.
Reported per rank: samples/s (global), peak RSS, and the bytes of parameters + optimizer state that the
rank holds (counted from the tensors DeepSpeed keeps, so independent of allocator noise). The headline
ratio is ZeRO-3 per-rank parameter+optimizer bytes at 2 ranks over 1 rank (ideal 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_point(model: str, stage: int, ranks: int, steps: int, rows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               str(REPO / "benchmarks" / "_train_step_worker.py"), "--model", model, "--stage", str(stage),
               "--steps", str(steps), "--rows", str(rows), "--out", tmp]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // ranks)), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        per_rank = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return {
        "model": model, "zero": stage, "ranks": ranks, "params_m": per_rank[0]["params"] / 1e6,
        "samples_per_s": per_rank[0]["samples_per_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank),
        "state_mb_per_rank": max(r["state_bytes"] for r in per_rank) / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,mid")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=32, help="rows per rank per step")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = p.parse_args()
    results = []
    for model in args.models.split(","):
        for stage, ranks in ((3, 1), (3, 2), (2, 1), (2, 2)):
            r = run_point(model, stage, ranks, args.steps, args.rows)
            results.append(r)
            print(f"{r['model']:5s} ZeRO-{r['zero']} {r['ranks']} rank(s): {r['params_m']:.1f} M params, "
                  f"{r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"params+optimizer {r['state_mb_per_rank']:.1f} MB/rank", flush=True)
    print()
    print("| model | ZeRO | ranks | params (M) | samples/s | peak RSS / rank (MB) | params+optim / rank (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['zero']} | {r['ranks']} | {r['params_m']:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['state_mb_per_rank']:.1f} |")
    ratios = {}
    for model in args.models.split(","):
        for stage in (3, 2):
            one = next(r for r in results if r["model"] == model and r["zero"] == stage and r["ranks"] == 1)
            two = next(r for r in results if r["model"] == model and r["zero"] == stage and r["ranks"] == 2)
            ratios[f"{model}/zero{stage}"] = two["state_mb_per_rank"] / one["state_mb_per_rank"]
            print(f"{model} ZeRO-{stage}: params+optimizer per rank, 2 ranks / 1 rank = "
                  f"{ratios[f'{model}/zero{stage}']:.3f} (target <= 0.55 for ZeRO-3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "state_ratio_2_over_1": ratios,
                                          "steps": args.steps, "rows": args.rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
