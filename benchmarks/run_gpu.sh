#!/usr/bin/env bash
# GPU benchmark of the fused kernels on one H100/H200: correctness against the references on the device,
# then time, peak memory and TFLOP/s (contrastive: Triton vs PyTorch path vs naive cuBLAS vs OpenCLIP;
# relation attention via benchmarks/kernels_attention.py), then the split-N row loss at b = 512 local rows
# against N = 8k..128k gathered columns (benchmarks/kernels_split.py: split vs unsplit Triton vs torch).
# Then the GPU DeepSpeed configs (configs/gpu_zero2_bf16.json, gpu_zero3_bf16.json): each builds and steps
# the tiny model through the trainer's optimizer set-up with FusedAdam (tests/scripts/optimizer_engine.py:
# weight-decay groups, the logit-scale bound in the fp32 master copy), and a 30-step bf16 training run of
# the tiny model on synthetic shards goes through launch/pretrain.py with gpu_zero3_bf16.json.
# No installs. The three parts are budgeted to finish within 8 minutes together (FusedAdam's first build,
# about a minute, included).
#
#   bash benchmarks/run_gpu.sh [extra kernels.py arguments, e.g. --blocks fwd_m=128,bwd_m=64]
#   SPLIT=0 CONFIGS=0 bash benchmarks/run_gpu.sh   # kernels.py only
#   SPLIT_ONLY=1 bash benchmarks/run_gpu.sh        # kernels_split.py only
#   CONFIGS_ONLY=1 bash benchmarks/run_gpu.sh      # the DeepSpeed configs only
#
# Results: benchmarks/results/kernels_gpu.json, kernels_split_gpu.json, gpu_configs/ and the printed
# tables (paste into docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
DS=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
ONLY_SPLIT=${SPLIT_ONLY:-0}
ONLY_CONFIGS=${CONFIGS_ONLY:-0}
if [ "$ONLY_SPLIT" != 1 ] && [ "$ONLY_CONFIGS" != 1 ]; then
  timeout 270 "$PY" benchmarks/kernels.py --budget-s 210 "$@"
fi
if [ "${SPLIT:-1}" != 0 ] && [ "$ONLY_CONFIGS" != 1 ]; then
  timeout 110 "$PY" benchmarks/kernels_split.py --budget-s 75
fi
if [ "${CONFIGS:-1}" != 0 ] && [ "$ONLY_SPLIT" != 1 ]; then
  OUT=benchmarks/results/gpu_configs
  WORK=$(mktemp -d)
  mkdir -p "$OUT"
  for cfg in gpu_zero2_bf16 gpu_zero3_bf16; do
    mkdir -p "$OUT/$cfg"
    timeout 120 "$DS" --num_gpus 1 tests/scripts/optimizer_engine.py "$OUT/$cfg" "configs/$cfg.json"
  done
  "$PY" -m data_prep.synthetic --out "$WORK/data" --items 800 --val-items 64 --seed 0 --shard-size 100 >/dev/null
  TRAIN=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['pattern'])" "$WORK/data/train/manifest.json")
  "$PY" -m data_prep.train_tokenizer --shards "$TRAIN" --out "$WORK/data/tokenizer.json" --vocab-size 400 >/dev/null
  timeout 150 "$PY" launch/pretrain.py --ds_config configs/gpu_zero3_bf16.json data.train="$TRAIN" \
    data.tokenizer="$WORK/data/tokenizer.json" data.workers=2 data.groups_per_batch=8 data.members_per_group=4 \
    data.buffer_size=256 train.steps=30 train.log_every=5 train.ckpt_every=0 train.export=false \
    tracking.mlflow=false train.out_dir="$WORK/run" ds.scheduler.params.warmup_num_steps=5
  cp "$WORK/run/metrics.jsonl" "$OUT/train_gpu_zero3_bf16.jsonl"
  echo "configs: $OUT (optimizer checks per config, 30-step bf16 training metrics)"
fi
