#!/usr/bin/env bash
# `make demo`: synthetic relational data -> tokenizer -> 2-rank ZeRO-3 pretraining on CPU -> evaluation.
# Usage: bash launch/demo.sh [RUN_DIR]   (default runs/demo). Re-running reuses the data already built.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
STEPS=${DEMO_STEPS:-300}
NPROC=${DEMO_RANKS:-2}
PORT=${DEMO_PORT:-29517}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

if [ ! -f "$RUN/data/val/manifest.json" ]; then
  echo "== building the synthetic relational dataset in $RUN/data"
  $PY -m data_prep.synthetic --out "$RUN/data" --items 4000 --val-items 500 --seed 0 --shard-size 500
fi
pattern() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['pattern'])" "$1"; }
TRAIN=$(pattern "$RUN/data/train/manifest.json")
VAL=$(pattern "$RUN/data/val/manifest.json")
if [ ! -f "$RUN/data/tokenizer.json" ]; then
  echo "== training the BPE tokenizer"
  $PY -m data_prep.train_tokenizer --shards "$TRAIN" --out "$RUN/data/tokenizer.json" --vocab-size 1000
fi

echo "== pretraining the tiny RCML model: $NPROC CPU ranks, ZeRO-3, $STEPS steps"
$DS --num_gpus "$NPROC" --master_port "$PORT" launch/pretrain.py --ds_config configs/zero3.json \
  --config configs/pretrain/demo.yaml data.train="$TRAIN" data.val="$VAL" \
  data.tokenizer="$RUN/data/tokenizer.json" train.out_dir="$RUN/rcml" train.steps="$STEPS" \
  train.overwrite=true  # each demo is a fresh run: replace the previous demo's checkpoints and export

echo "== evaluating the exported model on held-out items"
$PY launch/evaluate.py --checkpoint "$RUN/rcml/export" --shards "$VAL" --out "$RUN/rcml/eval_final" --max-items 500
echo
cat "$RUN/rcml/eval_final/report.md"
echo
echo "Exported model: $RUN/rcml/export   (rcml.from_pretrained(\"$RUN/rcml/export\"))"
echo "MLflow run:     mlflow ui --backend-store-uri sqlite:///$PWD/$RUN/rcml/mlflow.db   (then open http://127.0.0.1:5000)"
