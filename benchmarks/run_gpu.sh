#!/usr/bin/env bash
# GPU benchmark of the fused kernels on one H100/H200: correctness against the references on the device,
# then time, peak memory and TFLOP/s (contrastive: Triton vs PyTorch path vs naive cuBLAS vs OpenCLIP;
# relation attention via benchmarks/kernels_attention.py), then the split-N row loss at b = 512 local rows
# against N = 8k..128k gathered columns (benchmarks/kernels_split.py: split vs unsplit Triton vs torch).
# No installs. kernels.py takes under 8 minutes, kernels_split.py under 3.
#
#   bash benchmarks/run_gpu.sh [extra kernels.py arguments, e.g. --blocks fwd_m=128,bwd_m=64]
#   SPLIT=0 bash benchmarks/run_gpu.sh          # kernels.py only
#   SPLIT_ONLY=1 bash benchmarks/run_gpu.sh     # kernels_split.py only
#
# Results: benchmarks/results/kernels_gpu.json, kernels_split_gpu.json and the printed tables (paste into
# docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${SPLIT_ONLY:-0}" != 1 ]; then
  timeout 470 "$PY" benchmarks/kernels.py --budget-s 380 "$@"
fi
if [ "${SPLIT:-1}" != 0 ]; then
  timeout 170 "$PY" benchmarks/kernels_split.py --budget-s 120
fi
