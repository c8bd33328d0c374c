"""benchmarks/kernels.py runs end to end in its CPU smoke mode (Triton interpreter), contrastive part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernels_benchmark_smoke_contrastive(tmp_path):
    out = tmp_path / "kernels_smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--parts", "contrastive",
                           "--sizes", "48,80", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["ok"] for r in report["contrastive_check"]] == [True, True, True]
    rows = report["contrastive"]
    assert {(r["method"], r["n"]) for r in rows} == {(m, n) for m in ("triton", "torch", "naive", "open_clip")
                                                     for n in (48, 80)}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert report["bf16_matmul_peak_tflops"] > 0 and "triton_over_naive_time_at_80" in report["summary"]
    table = [line.split()[:2] for line in proc.stdout.splitlines()]
    assert all([r["method"], str(r["n"])] in table for r in rows)  # one printed table row per point
