"""Relation attention pooling: Triton kernel vs the PyTorch (gather + SDPA) path, forward + backward.

    .venv/bin/python benchmarks/kernels_attention.py --device cuda            # the GPU numbers
    .venv/bin/python benchmarks/kernels_attention.py --device cpu             # torch path vs reference
    .venv/bin/python benchmarks/kernels_attention.py --device cpu --smoke     # tiny sizes, Triton interpreted

Problem (GPU): 512 items x 8 relations each = 4096 rows, 512 distinct relations, 8 heads x 64, tokens
50 (ViT-B/32 at 224 px: 7x7 + CLS), 77 (CLIP text, random right padding) and 197 (ViT-B/16). One
measurement = forward + backward of ``sum(out * g)`` into q, k and v. On CUDA: median time from
``triton.testing.do_bench``, peak memory above the inputs from ``torch.cuda.max_memory_allocated``;
targets: Triton >= 2x faster and >= 4x less memory than the torch path. On CPU: median wall time of
a few repetitions (torch vs the per-row reference, smaller problem; CPU memory is not measured).

``check_relation_attention`` reports the max abs error of each face against the float64 reference on
the device, forward and every gradient, in fp32 and bf16. Results go to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM = 8, 64
TOKENS = (50, 77, 197)


def _kernels():
    """Import late: on CPU the Triton face needs TRITON_INTERPRET=1 before kernels are imported."""
    sys.path.insert(0, str(REPO))
    from kernels.relation_attention import relation_attention

    return relation_attention


def make_problem(device: str, items: int, per_item: int, tokens: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Rows = every item under ``per_item`` random relations; ``items`` distinct relations in all."""
    gen = torch.Generator().manual_seed(seed)
    relations = items
    q = torch.randn(relations, heads, head_dim, generator=gen)
    k = torch.randn(items, tokens, heads, head_dim, generator=gen)
    v = torch.randn(items, tokens, heads, head_dim, generator=gen)
    if tokens == 77:  # text: right padding, at least bos + eos
        lengths = torch.randint(2, tokens + 1, (items,), generator=gen)
        valid = torch.arange(tokens)[None] < lengths[:, None]
    else:  # vision: every token is real
        valid = torch.ones(items, tokens, dtype=torch.bool)
    row_item = torch.arange(items).repeat_interleave(per_item)
    row_relation = torch.randint(0, relations, (items * per_item,), generator=gen)
    grad = torch.randn(items * per_item, heads, head_dim, generator=gen)
    t = {"q": q, "k": k, "v": v, "grad": grad}
    out = {name: x.to(device=device, dtype=dtype) for name, x in t.items()}
    out.update(valid=valid.to(device), row_item=row_item.to(device), row_relation=row_relation.to(device))
    return out


def _step(relation_attention, p: dict, impl: str):
    """One forward + backward; returns a closure for the timers."""
    leaves = [p[n].detach().requires_grad_() for n in ("q", "k", "v")]

    def run():
        for x in leaves:
            x.grad = None
        out = relation_attention(*leaves, p["valid"], p["row_item"], p["row_relation"], impl=impl)
        out.backward(p["grad"])

    return run


def _time_cpu(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# CPU sizes when a caller gives none (e.g. benchmarks/kernels.py --smoke): seconds, not minutes,
# including the Triton interpreter.
CPU_SMOKE = dict(items=6, per_item=3, heads=2, head_dim=16)


def bench_relation_attention(device: str, *, items: int | None = None, per_item: int | None = None, tokens=None,
                             heads: int | None = None, head_dim: int | None = None,
                             impls: tuple[str, ...] | None = None, dtype: torch.dtype = torch.float32,
                             reps: int = 3) -> list[dict]:
    """Time (ms, median) and peak extra memory (MiB, CUDA only) of fwd+bwd per impl and token count.

    Defaults: on CUDA the full problem (module docstring), Triton vs torch; on CPU smoke sizes,
    Triton (only under TRITON_INTERPRET=1) vs torch vs reference. The last impl is the baseline of
    the ratios.
    """
    relation_attention = _kernels()
    cuda = device.startswith("cuda")
    small = {} if cuda else CPU_SMOKE
    items = items or small.get("items", 512)
    per_item = per_item or small.get("per_item", 8)
    heads, head_dim = heads or small.get("heads", HEADS), head_dim or small.get("head_dim", HEAD_DIM)
    tokens = tokens or (TOKENS if cuda else (5, 19, 37))
    impls = impls or (("triton", "torch") if cuda else
                      (("triton",) if _interpreted() else ()) + ("torch", "reference"))
    results = []
    for t in tokens:
        p = make_problem(device, items, per_item, t, heads, head_dim, dtype)
        for impl in impls:
            fn = _step(relation_attention, p, impl)
            row = {"device": device, "impl": impl, "rows": items * per_item, "items": items, "tokens": t,
                   "heads": heads, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", "")}
            if cuda:
                import triton.testing

                fn()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["ms"] = float(triton.testing.do_bench(fn, return_mode="median"))
            else:
                row["ms"] = _time_cpu(fn, reps)
            results.append(row)
    base_impl = impls[-1]  # the baseline: torch on CUDA, reference on CPU
    for row in results:
        base = next(r for r in results if r["tokens"] == row["tokens"] and r["impl"] == base_impl)
        row["speedup_vs_" + base_impl] = base["ms"] / row["ms"]
        if "peak_mib" in row:
            row["memory_ratio_" + base_impl + "_over_this"] = base["peak_mib"] / max(row["peak_mib"], 1e-9)
    return results


def check_relation_attention(device: str, *, items: int | None = None, per_item: int | None = None,
                             tokens: int | None = None, heads: int | None = None, head_dim: int | None = None,
                             impls: tuple[str, ...] | None = None) -> dict:
    """Max abs error vs the float64 reference on ``device``: {dtype: {impl: {out, dq, dk, dv}}, "scale": ...}.

    Defaults: 64 items x 4 relations, T = 77 (padded), 8 x 64 on CUDA; smoke sizes, T = 37 on CPU
    (Triton only under TRITON_INTERPRET=1).
    """
    relation_attention = _kernels()
    cuda = device.startswith("cuda")
    small = {} if cuda else CPU_SMOKE
    items, per_item = items or small.get("items", 64), per_item or small.get("per_item", 4)
    heads, head_dim = heads or small.get("heads", HEADS), head_dim or small.get("head_dim", HEAD_DIM)
    tokens = tokens or (77 if cuda else 37)
    impls = impls or (("torch", "triton") if cuda or _interpreted() else ("torch",))
    p = make_problem(device, items, per_item, tokens, heads, head_dim, torch.float64, seed=1)

    def grads(impl, dtype):
        leaves = [p[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")]
        out = relation_attention(*leaves, p["valid"], p["row_item"], p["row_relation"], impl=impl)
        out.backward(p["grad"].to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    ref = grads("reference", torch.float64)
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        report[str(dtype).replace("torch.", "")] = {
            impl: {name: float((a - b).abs().max()) for name, a, b in zip(("out", "dq", "dk", "dv"), grads(impl, dtype), ref)}
            for impl in impls
        }
    report["scale"] = {name: float(r.abs().max()) for name, r in zip(("out", "dq", "dk", "dv"), ref)}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton through the interpreter)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_attention_<device>.json)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if not cuda:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.smoke and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels are imported
    if args.smoke or cuda:
        bench = bench_relation_attention(args.device, **(dict(CPU_SMOKE, reps=1) if args.smoke else {}))
        check = check_relation_attention(args.device, **(CPU_SMOKE if args.smoke else {}))
    else:  # a CPU record: the torch path against the reference at a size the reference finishes
        bench = bench_relation_attention(args.device, items=64, per_item=8, tokens=TOKENS, heads=HEADS,
                                         head_dim=HEAD_DIM, impls=("torch", "reference"))
        check = check_relation_attention(args.device, items=64, per_item=4, tokens=77, heads=HEADS,
                                         head_dim=HEAD_DIM, impls=("torch",))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"relation attention fwd+bwd on {name}" + (" (smoke)" if args.smoke else ""))
    print(f"{'impl':>10} {'rows':>6} {'T':>4} {'ms':>10} {'peak MiB':>10} {'speedup':>8} {'mem ratio':>9}")
    for r in bench:
        speed = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
        mem = next((v for k, v in r.items() if k.startswith("memory_ratio_")), float("nan"))
        print(f"{r['impl']:>10} {r['rows']:>6} {r['tokens']:>4} {r['ms']:>10.3f} {r.get('peak_mib', float('nan')):>10.1f} "
              f"{speed:>8.2f} {mem:>9.2f}")
    print("max abs error vs float64 reference:")
    for dtype, per_impl in check.items():
        if dtype != "scale":
            for impl, errs in per_impl.items():
                print(f"  {dtype:>8} {impl:>8} " + "  ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    print("  magnitudes: " + "  ".join(f"{k}={v:.2e}" for k, v in check["scale"].items()))
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"kernels_attention_{'cuda' if cuda else 'cpu'}{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "smoke": args.smoke, "bench": bench, "check": check}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
