"""Peak memory and time of loss forward+backward on CPU: our loss vs OpenCLIP ClipLoss vs a naive masked loss.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_memory.py [--sizes 1024,2048,4096,8192,16384] [--dim 512]

Methods (one process, fp32, unit-norm [N, D] embeddings, groups of 4 rows; ClipLoss takes no groups):
  ours_inter  rcml.loss.relation_contrastive_loss(impl="torch", w_intra=0): I->T + T->I, like ClipLoss
  ours_full   the same with all four terms (w_intra=1)
  clip        open_clip ClipLoss (its loss.py, loaded by path)
  naive_full  relation_contrastive_loss(impl="reference"): full masked N x N logits, four terms
Each (method, N) runs in a fresh subprocess: inputs are built, a tiny warm-up call loads lazy code, the
kernel's peak-RSS mark is reset (/proc/self/clear_refs), then forward+backward runs; reported memory =
peak RSS - RSS before the call (inputs excluded, gradients included). Time is the median over repeats
(the first call included in the memory peak only). Threads are fixed for every point (OMP_NUM_THREADS,
default 1). Writes benchmarks/results/loss_memory.json and prints a table; the exponent of memory in N
is a least-squares fit of log(memory) on log(N).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ours_inter", "ours_full", "clip", "naive_full")


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _loss_fn(method: str):
    import torch  # noqa: F401

    if method == "clip":
        sys.path.insert(0, str(REPO))
        from tests.oracles import load_open_clip_loss

        clip = load_open_clip_loss().ClipLoss()
        return lambda u, t, g, s: clip(u, t, s)
    from rcml.loss import relation_contrastive_loss

    impl = "reference" if method == "naive_full" else "torch"
    w_intra = 0.0 if method == "ours_inter" else 1.0
    return lambda u, t, g, s: relation_contrastive_loss(u, t, g, s, w_intra=w_intra, impl=impl)["loss"]


def measure_point(method: str, n: int, dim: int, repeats: int) -> dict:
    """Runs inside the subprocess: one (method, N) point."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    fn = _loss_fn(method)

    def inputs(rows):
        u = F.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
        t = F.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
        g = torch.arange(rows, dtype=torch.int64) // 4  # groups of 4
        return u, t, g, torch.tensor(14.3, requires_grad=True)

    fn(*inputs(64)).backward()  # warm-up: lazy imports and first-call allocations
    u, t, g, s = inputs(n)
    times, mem_kib = [], None
    for rep in range(repeats + 1):
        u.grad = t.grad = s.grad = None
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        start = time.perf_counter()
        fn(u, t, g, s).backward()
        elapsed = time.perf_counter() - start
        if rep == 0:
            mem_kib = _rss_kib("VmHWM") - base
        if rep > 0 or repeats == 0:
            times.append(elapsed)
    times.sort()
    return {"method": method, "n": n, "dim": dim, "peak_mib": mem_kib / 1024, "time_s": times[len(times) // 2],
            "threads": torch.get_num_threads()}


def run_point(method: str, n: int, dim: int, repeats: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--point", method, str(n), "--dim", str(dim), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"method": method, "n": n, "dim": dim, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_exponent(points: list[dict]) -> float | None:
    xy = [(math.log(p["n"]), math.log(p["peak_mib"])) for p in points if p.get("peak_mib", 0) > 0]
    if len(xy) < 2:
        return None
    mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats after the first call (0: time the first)")
    ap.add_argument("--big-repeats-from", type=int, default=8192, help="N from which repeats are 0 (time budget)")
    ap.add_argument("--naive-max-n", type=int, default=8192,
                    help="largest N for naive_full: its memory grows as N^2 (about 16 GiB at N = 16384)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loss_memory.json"))
    ap.add_argument("--point", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args.dim, args.repeats)))
        return

    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    print(f"# loss forward+backward, CPU fp32, D={args.dim}, OMP_NUM_THREADS={threads}", flush=True)
    print(f"{'method':<12}{'N':>7}{'peak MiB':>11}{'time s':>9}", flush=True)
    for n in sizes:
        for method in args.methods.split(","):
            if method == "naive_full" and n > args.naive_max_n:
                continue
            reps = 0 if n >= args.big_repeats_from else max(args.repeats, 2)
            r = run_point(method, n, args.dim, reps, args.timeout)
            rows.append(r)
            if "error" in r:
                print(f"{method:<12}{n:>7}   failed: {r['error']}", flush=True)
            else:
                print(f"{method:<12}{n:>7}{r['peak_mib']:>11.1f}{r['time_s']:>9.3f}", flush=True)

    def get(method, n, key):
        return next((r.get(key) for r in rows if r["method"] == method and r["n"] == n and key in r), None)

    summary = {"exponent": {m: fit_exponent([r for r in rows if r["method"] == m and "peak_mib" in r])
                            for m in args.methods.split(",")}}
    big, mid = max(sizes), 4096 if 4096 in sizes else sizes[len(sizes) // 2]
    if get("clip", big, "peak_mib") and get("ours_inter", big, "peak_mib"):
        clip_mib = get("clip", big, "peak_mib")
        summary[f"clip_over_ours_inter_memory_at_{big}"] = clip_mib / get("ours_inter", big, "peak_mib")
        summary[f"clip_over_ours_full_memory_at_{big}"] = clip_mib / get("ours_full", big, "peak_mib")
    if get("clip", mid, "time_s"):
        summary[f"ours_inter_over_clip_time_at_{mid}"] = get("ours_inter", mid, "time_s") / get("clip", mid, "time_s")
        summary[f"ours_full_over_clip_time_at_{mid}"] = get("ours_full", mid, "time_s") / get("clip", mid, "time_s")
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([f"OMP_NUM_THREADS={threads}", "python", *sys.argv]),
                               "dim": args.dim, "threads": int(threads), "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
