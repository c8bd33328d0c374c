"""benchmarks/kernels.py (contrastive part) and benchmarks/kernels_split.py run end to end in their CPU
smoke modes (Triton interpreter)."""

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


@pytest.mark.slow
def test_split_benchmark_smoke(tmp_path):
    """benchmarks/kernels_split.py --smoke: split / unsplit Triton and torch at b << N, forward and fwd+bwd."""
    out = tmp_path / "split_smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels_split.py"), "--smoke", "--sizes",
                           "256,384", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["case"], r["ok"], r["split_deterministic"]) for r in report["check"]] == [
        ("fp32 cross", True, True), ("fp32 intra", True, True), ("bf16 cross", True, True)]
    rows = report["timings"]
    assert {(r["method"], r["mode"], r["n"]) for r in rows} == {
        (m, mode, n) for m in ("split", "unsplit", "torch") for mode in ("fwd", "fwd+bwd") for n in (256, 384)}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in rows)
    splits = {(r["method"], r["n"]): (r["splits_fwd"], r["splits_rows"]) for r in rows if r["method"] != "torch"}
    assert splits == {("split", 256): (2, 2), ("split", 384): (3, 3), ("unsplit", 256): (1, 1),
                      ("unsplit", 384): (1, 1)}
    assert "unsplit_over_split_time_fwd+bwd_at_384" in report["summary"]
