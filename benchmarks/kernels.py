"""GPU benchmark of the fused kernels: correctness on the device, then time and peak memory.

    bash benchmarks/run_gpu.sh                      # one H100/H200: correctness + timings, < 8 minutes
    .venv/bin/python benchmarks/kernels.py --smoke  # CPU, tiny sizes, TRITON_INTERPRET=1: runs end to end

1. Correctness: the Triton contrastive row loss against the float64 reference on the device (fp32 and
   bf16, odd sizes, cross-modal and intra-modal), and relation attention via
   benchmarks/kernels_attention.check_relation_attention(device) (max errors vs its reference).
2. bf16 matmul peak: median time of a square bf16 matmul, as TFLOP/s (the roofline for the ratios).
3. Contrastive loss, I->T + T->I over N rows (one process, bf16 unit-norm [N, D], groups of 4 rows),
   forward + backward, N = 8k ... 128k:
     triton      relation_contrastive_loss(impl="triton", w_intra=0)
     torch       relation_contrastive_loss(impl="torch",  w_intra=0) (memory-lean PyTorch path)
     naive       full [N, N] logits from one cuBLAS bf16 matmul, masked log-softmax both ways
     open_clip   OpenCLIP ClipLoss (singleton positives; its own two logits matrices)
   median time (triton.testing.do_bench), peak memory above the inputs (torch.cuda max_memory_allocated),
   useful TFLOP/s = 2 x 6 N^2 D / time (two directed logits matrices, forward + backward) and the ratio to
   the measured matmul peak. A method that runs out of memory is recorded as OOM and not tried at larger N.
4. Relation attention: rows from benchmarks/kernels_attention.bench_relation_attention(device) (run
   before 3, whose sweep is bounded by --budget-s).

Writes benchmarks/results/kernels_gpu.json (kernels_smoke.json with --smoke) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # must precede any import of a module that defines Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.contrastive import multi_positive_row_loss  # noqa: E402
from kernels.contrastive_triton import TritonBlocks, blocks  # noqa: E402
from rcml.loss import relation_contrastive_loss  # noqa: E402
from tests.oracles import load_open_clip_loss  # noqa: E402  (open_clip's loss.py by path)

METHODS = ("triton", "torch", "naive", "open_clip")


# ----------------------------------------------------------------------------------------- helpers
def bench_ms(fn, device: torch.device, grad_to_none=None, smoke_reps: int = 3) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU, wall clock on CPU (smoke only)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for _ in range(smoke_reps):
        for x in grad_to_none or []:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak device memory of one fn() above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def naive_inter_loss(u, t, groups, scale):
    """Many-to-many I->T + T->I the plain way: one cuBLAS matmul for the full logits, masked log-softmax."""
    logits = (scale * (u @ t.T)).float()  # [N, N]
    pos = (groups[:, None] == groups[None, :]).float()  # [N, N]
    count = pos.sum(1)
    it = -(F.log_softmax(logits, 1) * pos).sum(1) / count
    ti = -(F.log_softmax(logits, 0) * pos).sum(0) / count
    return (it.mean() + ti.mean()) / 2


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, group_size: int = 4, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    groups = (torch.arange(n) // group_size).to(device)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    return u, t, groups, scale


# ------------------------------------------------------------------------------------- correctness
def check_contrastive(device: torch.device, smoke: bool) -> list[dict]:
    """Max relative errors (max |err| / max |ref|) of the Triton row loss vs the float64 reference."""
    b, n, d = (37, 53, 40) if smoke else (1531, 2999, 512)
    cases = [("fp32 cross", torch.float32, None, 1e-5), ("fp32 intra", torch.float32, 700 if not smoke else 9, 1e-5),
             ("bf16 cross", torch.bfloat16, None, 2e-2)]
    rows_out = []
    for name, dtype, self_offset, tol in cases:
        gen = torch.Generator(device="cpu").manual_seed(len(rows_out))
        cols = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
        rows = cols[self_offset : self_offset + b] if self_offset is not None else \
            F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
        col_groups = torch.randint(0, n // 3, (n,), generator=gen)
        row_groups = col_groups[self_offset : self_offset + b] if self_offset is not None else \
            torch.randint(0, n // 3, (b,), generator=gen)
        weights = torch.randn(b, generator=gen, dtype=torch.float64).to(device)
        rows, cols = rows.to(device=device, dtype=dtype), cols.to(device=device, dtype=dtype)
        row_groups, col_groups = row_groups.to(device), col_groups.to(device)
        out = {}
        for impl, cast in (("triton", dtype), ("reference", torch.float64)):
            r = rows.to(cast).detach().clone().requires_grad_()
            c = cols.to(cast).detach().clone().requires_grad_()
            s = torch.tensor(12.5, device=device, dtype=torch.float32 if impl == "triton" else torch.float64,
                             requires_grad=True)
            loss, _ = multi_positive_row_loss(r, c, row_groups, col_groups, s, self_offset=self_offset, impl=impl)
            (loss.double() * weights).sum().backward()
            out[impl] = [x.detach().double() for x in (loss, r.grad, c.grad, s.grad)]
        errs = {k: ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                for k, a, ref in zip(("loss", "d_rows", "d_cols", "d_scale"), out["triton"], out["reference"])}
        # d_scale sums terms of both signs: judge it against its own magnitude only loosely.
        ok = all(v <= tol for k, v in errs.items() if k != "d_scale") and errs["d_scale"] <= 100 * tol
        rows_out.append({"case": name, "b": b, "n": n, "d": d, **errs, "tolerance": tol, "ok": ok})
    return rows_out


# ------------------------------------------------------------------------------------------ timings
def matmul_peak_tflops(device: torch.device, smoke: bool) -> float:
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def contrastive_fn(method: str, u, t, groups, scale, clip_loss):
    if method == "naive":
        return lambda: naive_inter_loss(u, t, groups, scale).backward()
    if method == "open_clip":
        return lambda: clip_loss(u, t, scale).backward()
    return lambda: relation_contrastive_loss(u, t, groups, scale, w_intra=0.0, impl=method)["loss"].backward()


def bench_contrastive(device, sizes, d, dtype, methods, peak_tflops, budget_s, started) -> list[dict]:
    clip_loss = load_open_clip_loss().ClipLoss()
    out_of_memory: set[str] = set()
    results = []
    for n in sizes:
        for method in methods:
            row = {"method": method, "n": n, "d": d, "dtype": str(dtype).replace("torch.", "")}
            if method in out_of_memory:
                row["status"] = "OOM at a smaller N"
            elif time.monotonic() - started > budget_s:
                row["status"] = "skipped (time budget)"
            else:
                u = t = groups = scale = fn = None
                try:
                    u, t, groups, scale = make_inputs(n, d, dtype, device)
                    fn = contrastive_fn(method, u, t, groups, scale, clip_loss)
                    mem = peak_bytes(fn, device)
                    ms = bench_ms(fn, device, grad_to_none=[u, t, scale])
                    useful = 2 * 6 * n * n * d  # two directed [N, N] logits, forward + backward
                    row.update(status="ok", time_ms=ms, peak_mib=None if mem is None else mem / 2**20,
                               tflops=useful / (ms * 1e-3) / 1e12)
                    row["of_peak"] = row["tflops"] / peak_tflops if peak_tflops else None
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not is_oom(err):
                        raise
                    row["status"] = "OOM"
                    out_of_memory.add(method)
                finally:
                    del u, t, groups, scale, fn  # free this point's tensors before the next one
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            results.append(row)
            print(format_row(row), flush=True)
    return results


def format_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['method']:<10}{r['n']:>8}  {r.get('status')}"
    mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
    return (f"{r['method']:<10}{r['n']:>8}{r['time_ms']:>11.2f}{mem:>11}{r['tflops']:>9.1f}"
            f"{(r['of_peak'] or 0) * 100:>8.0f}%")


def summarize(rows: list[dict]) -> dict:
    get = {(r["method"], r["n"]): r for r in rows if r.get("status") == "ok"}
    summary = {}
    for (method, n), r in get.items():
        if method == "triton" and ("naive", n) in get:
            summary[f"triton_over_naive_time_at_{n}"] = r["time_ms"] / get["naive", n]["time_ms"]
            if r["peak_mib"]:
                summary[f"naive_over_triton_memory_at_{n}"] = get["naive", n]["peak_mib"] / r["peak_mib"]
    return summary


def parse_blocks(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in TritonBlocks.__dataclass_fields__:
            fields = ", ".join(TritonBlocks.__dataclass_fields__)
            raise SystemExit(f"--blocks: unknown field {key!r} (fields: {fields})")
        out[key] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument("--parts", default="contrastive,attention", help="comma list: contrastive, attention")
    ap.add_argument("--sizes", default=None, help="N list (default 8192..131072; smoke: 64,96)")
    ap.add_argument("--dim", type=int, default=None, help="D (default 512; smoke: 32)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--blocks", default="", help="Triton block overrides, e.g. fwd_m=128,fwd_n=64,num_warps=8")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new timing points after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.monotonic()

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    sizes = [int(x) for x in (args.sizes or ("64,96" if args.smoke else "8192,16384,32768,65536,131072")).split(",")]
    d = args.dim or (32 if args.smoke else 512)
    parts = set(args.parts.split(","))
    out_path = Path(args.out or REPO / "benchmarks" / "results" / f"kernels_{'smoke' if args.smoke else 'gpu'}.json")
    report = {"command": " ".join(["python", *sys.argv]), "device": "cpu (smoke)" if args.smoke else
              torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass

    with blocks(**parse_blocks(args.blocks)) as cfg:
        report["triton_blocks"] = cfg.__dict__
        if "contrastive" in parts:
            print("## contrastive correctness (Triton vs float64 reference, max |err| / max |ref|)")
            report["contrastive_check"] = check_contrastive(device, args.smoke)
            for r in report["contrastive_check"]:
                print(f"{r['case']:<12} loss {r['loss']:.1e}  d_rows {r['d_rows']:.1e}  d_cols {r['d_cols']:.1e}  "
                      f"d_scale {r['d_scale']:.1e}  {'ok' if r['ok'] else 'FAIL'}")
        attention = None
        if "attention" in parts:
            try:
                from benchmarks import kernels_attention as attention
            except ImportError as err:
                msg = f"relation attention skipped: benchmarks/kernels_attention.py is not importable ({err})"
                print(msg)
                report["attention_error"] = msg
            if attention is not None:
                report["attention_check"] = attention.check_relation_attention(str(device))
                print("## relation attention correctness:", json.dumps(report["attention_check"]))
                # Timed before the contrastive sweep: that one is open-ended (bounded by --budget-s), this is not.
                report["attention"] = attention.bench_relation_attention(str(device))
                print("## relation attention")
                for r in report["attention"]:
                    print(json.dumps(r))
        if "contrastive" in parts:
            peak = matmul_peak_tflops(device, args.smoke)
            report["bf16_matmul_peak_tflops"] = peak
            print(f"## contrastive fwd+bwd, bf16, D={d}; bf16 matmul peak {peak:.1f} TFLOP/s")
            print(f"{'method':<10}{'N':>8}{'ms':>11}{'peak MiB':>11}{'TFLOP/s':>9}{'of peak':>9}")
            report["contrastive"] = bench_contrastive(device, sizes, d, torch.bfloat16, args.methods.split(","),
                                                      peak, args.budget_s, started)
            report["summary"] = summarize(report["contrastive"])
            for k, v in report["summary"].items():
                print(f"{k}: {v:.3f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out_path} ({time.monotonic() - started:.0f} s)")
    checks = report.get("contrastive_check", [])
    if any(not r["ok"] for r in checks):
        raise SystemExit("contrastive correctness check failed (see above)")
    if not all(math.isfinite(r.get("time_ms", 0.0)) for r in report.get("contrastive", [])):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
