"""Split-N Triton row loss: one rank's b rows against the N gathered columns, split vs unsplit vs torch.

    bash benchmarks/run_gpu.sh                            # after benchmarks/kernels.py
    SPLIT_ONLY=1 bash benchmarks/run_gpu.sh               # only this benchmark (about 2 minutes)
    .venv/bin/python benchmarks/kernels_split.py --smoke  # CPU, tiny sizes, TRITON_INTERPRET=1

Problem: bf16 unit-norm rows [b, D] and columns [N, D], D = 512, b = 512 local rows, N = 8k ... 128k
(16 to 256 ranks of 512 rows), groups of 4 columns, each column in its own group and one other
(membership [N, 2]), rows drawn from the columns' groups (the I->T term of a multi-GPU step).

1. Check (N = 8192; smoke: b = 7, N = 300): the split and the unsplit Triton loss and gradients against
   the float64 reference on the device (max |err| / max |ref|; fp32 cross-modal, fp32 intra-modal with
   self_offset, bf16 cross-modal), and two split runs bitwise equal (the split reduction is deterministic).
2. Timings, median of triton.testing.do_bench, forward alone and forward + backward (into rows and
   columns, as gathered columns get gradients):
     split    impl="triton", number of splits from kernels.contrastive_triton.num_splits (smoke: 3 forced,
              the interpreter counts one SM)
     unsplit  impl="triton", TritonBlocks(splits=1): one program per row block (4 forward programs at b = 512)
     torch    impl="torch", the memory-lean PyTorch path
   with the splits of the forward and rows passes, the rows-pass partial buffer (MiB), peak memory above
   the inputs, useful TFLOP/s (forward 2 b N D; forward + backward 6 b N D) and unsplit / split time.

Writes benchmarks/results/kernels_split_gpu.json (kernels_split_smoke.json with --smoke) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
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

import kernels.contrastive_triton as kt  # noqa: E402
from benchmarks.kernels import bench_ms, is_oom, peak_bytes  # noqa: E402
from kernels.contrastive import multi_positive_row_loss  # noqa: E402

METHODS = ("split", "unsplit", "torch")
MODES = ("fwd", "fwd+bwd")


def make_inputs(b: int, n: int, d: int, dtype, device, *, self_offset=None, seed=0):
    """rows [b, D], cols [N, D] (rows = cols[self_offset:][:b] when given), row_groups [b], members [N, 2]."""
    gen = torch.Generator().manual_seed(seed)
    cols = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    groups = torch.arange(n) // 4
    members = torch.stack([groups, torch.randint(0, max(1, n // 4), (n,), generator=gen)], 1)  # [N, 2]
    if self_offset is None:
        rows = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
        row_groups = groups[torch.randint(0, n, (b,), generator=gen)]
    else:
        rows, row_groups = cols[self_offset : self_offset + b], groups[self_offset : self_offset + b]
    to = dict(device=device, dtype=dtype)
    return rows.to(**to), cols.to(**to), row_groups.to(device), members.to(device)


def _method_blocks(method: str, smoke: bool) -> dict:
    """TritonBlocks overrides of a method: unsplit forces one split; split is automatic (smoke: 3 forced)."""
    if method == "unsplit":
        return {"splits": 1}
    return {"splits": 3} if smoke and method == "split" else {}


def _loss_fn(method, rows, cols, row_groups, members, scale, self_offset=None):
    """fn() -> row loss, with backward of its sum into rows / cols when they require grad. Call it inside
    ``kt.blocks(**_method_blocks(method, smoke))``."""
    impl = {"split": "triton", "unsplit": "triton"}.get(method, method)

    def fn():
        loss, _ = multi_positive_row_loss(rows, cols, row_groups, members, scale, self_offset=self_offset, impl=impl)
        if rows.requires_grad or cols.requires_grad:
            loss.sum().backward()
        return loss

    return fn


def _with_grads(method, rows, cols, row_groups, members, scale, self_offset, smoke):
    """(loss, d_rows, d_cols) of one method on fresh leaf copies of rows and cols."""
    r, c = rows.detach().clone().requires_grad_(), cols.detach().clone().requires_grad_()
    with kt.blocks(**_method_blocks(method, smoke)):
        loss = _loss_fn(method, r, c, row_groups, members, scale, self_offset)()
    return loss.detach(), r.grad, c.grad


ERRORS = ("loss", "d_rows", "d_cols")


def check(device, smoke: bool) -> list[dict]:
    b, n, d = (7, 300, 32) if smoke else (512, 8192, 512)
    cases = [("fp32 cross", torch.float32, None, 1e-5), ("fp32 intra", torch.float32, n // 2, 1e-5),
             ("bf16 cross", torch.bfloat16, None, 2e-2)]
    out = []
    for name, dtype, self_offset, tol in cases:
        rows, cols, rg, members = make_inputs(b, n, d, dtype, device, self_offset=self_offset, seed=len(out))
        s32, s64 = (torch.tensor(12.5, device=device, dtype=t) for t in (torch.float32, torch.float64))
        ref = _with_grads("reference", rows.double(), cols.double(), rg, members, s64, self_offset, smoke)
        row = {"case": name, "b": b, "n": n, "d": d, "tolerance": tol}
        errors = []
        for method in ("split", "unsplit"):
            got = _with_grads(method, rows, cols, rg, members, s32, self_offset, smoke)
            for key, a, w in zip(ERRORS, got, ref):
                row[f"{method}_{key}"] = ((a.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                errors.append(row[f"{method}_{key}"])
            if method == "split":
                again = _with_grads(method, rows, cols, rg, members, s32, self_offset, smoke)
                row["split_deterministic"] = all(torch.equal(x, y) for x, y in zip(got, again))
        row["ok"] = row["split_deterministic"] and max(errors) <= tol
        out.append(row)
        print(f"{name:<11}" + "  ".join(f"{m} " + " ".join(f"{k} {row[f'{m}_{k}']:.1e}" for k in ERRORS)
                                        for m in ("split", "unsplit"))
              + f"  deterministic {row['split_deterministic']}  {'ok' if row['ok'] else 'FAIL'}", flush=True)
    return out


def plan(method: str, b: int, n: int, d: int, device, smoke: bool) -> dict:
    """Splits of the forward and rows passes and the rows-pass partial buffer, as the launch computes them."""
    if method == "torch":
        return {}
    with kt.blocks(**_method_blocks(method, smoke)) as cfg:
        fwd = kt.pass_splits(cfg, b, n, cfg.fwd_m, cfg.fwd_n, device)[0]
        rows = kt.pass_splits(cfg, b, n, cfg.bwd_m, cfg.bwd_n, device)[0]
    return {"splits_fwd": fwd, "splits_rows": rows, "fwd_programs": fwd * -(-b // cfg.fwd_m),
            "partial_mib": (rows * b * d * 4 / 2**20) if rows > 1 else 0.0}


def bench(device, b: int, sizes, d: int, budget_s: float, started: float, smoke: bool) -> list[dict]:
    results, failed = [], set()
    scale = torch.tensor(12.5, device=device)
    for n in sizes:
        for mode in MODES:
            for method in METHODS:
                row = {"method": method, "mode": mode, "b": b, "n": n, "d": d, **plan(method, b, n, d, device, smoke)}
                if method in failed:
                    row["status"] = "OOM at a smaller N"
                elif time.monotonic() - started > budget_s:
                    row["status"] = "skipped (time budget)"
                else:
                    rows = cols = fn = None
                    try:
                        rows, cols, rg, members = make_inputs(b, n, d, torch.bfloat16, device, seed=n)
                        rows.requires_grad_(mode == "fwd+bwd")
                        cols.requires_grad_(mode == "fwd+bwd")
                        fn = _loss_fn(method, rows, cols, rg, members, scale)
                        with kt.blocks(**_method_blocks(method, smoke)):
                            mem = peak_bytes(fn, device)
                            ms = bench_ms(fn, device, grad_to_none=[rows, cols])
                        flops = (2 if mode == "fwd" else 6) * b * n * d
                        row.update(status="ok", time_ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                                   peak_mib=None if mem is None else mem / 2**20)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                        if not is_oom(err):
                            raise
                        row["status"] = "OOM"
                        failed.add(method)
                    finally:
                        del rows, cols, fn
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                results.append(row)
                print(format_row(row), flush=True)
    return results


def format_row(r: dict) -> str:
    head = f"{r['method']:<9}{r['mode']:<9}{r['n']:>8}"
    if r.get("status") != "ok":
        return f"{head}  {r.get('status')}"
    splits = f"{r['splits_fwd']}/{r['splits_rows']}" if "splits_fwd" in r else "-"
    mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
    return f"{head}{r['time_ms']:>10.3f}{r['tflops']:>9.1f}{splits:>9}{mem:>10}"


def summarize(rows: list[dict]) -> dict:
    get = {(r["method"], r["mode"], r["n"]): r for r in rows if r.get("status") == "ok"}
    out = {}
    for (method, mode, n), r in get.items():
        if method == "split":
            for other in ("unsplit", "torch"):
                if (other, mode, n) in get:
                    out[f"{other}_over_split_time_{mode}_at_{n}"] = get[other, mode, n]["time_ms"] / r["time_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument("--rows", type=int, default=None, help="b, local rows (default 512; smoke: 7)")
    ap.add_argument("--sizes", default=None, help="N list (default 8192..131072; smoke: 256,384)")
    ap.add_argument("--dim", type=int, default=None, help="D (default 512; smoke: 32)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new timing points after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    b = args.rows or (7 if args.smoke else 512)
    sizes = [int(x) for x in (args.sizes or ("256,384" if args.smoke else "8192,16384,32768,65536,131072")).split(",")]
    d = args.dim or (32 if args.smoke else 512)
    out_path = Path(args.out or REPO / "benchmarks" / "results" /
                    f"kernels_split_{'smoke' if args.smoke else 'gpu'}.json")
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
              "sm_count": kt.sm_count(device), "triton_blocks": kt._blocks.__dict__}
    print("## split-N check (Triton vs float64 reference, max |err| / max |ref|)")
    report["check"] = check(device, args.smoke)
    print(f"## b = {b} rows against N columns, bf16, D = {d}; splits = forward/rows pass")
    print(f"{'method':<9}{'mode':<9}{'N':>8}{'ms':>10}{'TFLOP/s':>9}{'splits':>9}{'peak MiB':>10}")
    report["timings"] = bench(device, b, sizes, d, args.budget_s, started, args.smoke)
    report["summary"] = summarize(report["timings"])
    for k, v in report["summary"].items():
        print(f"{k}: {v:.2f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out_path} ({time.monotonic() - started:.0f} s)")
    if not all(r["ok"] for r in report["check"]):
        raise SystemExit("split-N correctness check failed (see above)")


if __name__ == "__main__":
    main()
