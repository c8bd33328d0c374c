#!/usr/bin/env bash
# GPU benchmark of the fused kernels on one H100/H200: correctness against the references on the device,
# then time, peak memory and TFLOP/s (contrastive: Triton vs PyTorch path vs naive cuBLAS vs OpenCLIP;
# relation attention via benchmarks/kernels_attention.py). No installs; finishes in under 8 minutes.
#
#   bash benchmarks/run_gpu.sh [extra kernels.py arguments, e.g. --blocks fwd_m=128,bwd_m=64]
#
# Results: benchmarks/results/kernels_gpu.json and the printed tables (paste into docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 470 "$PY" benchmarks/kernels.py --budget-s 380 "$@"
