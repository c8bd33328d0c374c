#!/usr/bin/env bash
# RCML vs the relation-blind runs on real relational data: the emoji dataset (data_prep.emoji).
#
#   bash benchmarks/emoji_rcml_vs_clip.sh [--seeds 0,1,2] [--ablations] [--untrained] [--no-eval] [--dry-run]
#
# Builds the data (cached), then for every seed trains each run with the same trainer, data, steps and
# batch (2 CPU ranks, ZeRO-3; `seed=S` sets the initialization and the data stream) and evaluates it on
# the held-out styles (val_styles: out-of-domain) and the held-out emoji (val_emoji: zero-shot) with
# `launch/evaluate.py --seed S`: both retrieval protocols (the paper's random negatives and the confusable
# ones) and the relation-blind baselines on the same plans.
#
# Runs (configs/pretrain/emoji.yaml: hard batches, full-membership positives, normalized mix, context 32,
# which cuts no caption or relation text of the emoji data):
#   rcml        beta 0.3 with the conditioned contrast term (loss.w_cond = 1 by default in rcml mode)
#   clip        the CLIP baseline mode: relation text joined to the caption, no intra terms, context 64 so
#               that no joined text is cut (at 24 tokens 39% were); same batches and positives
#   clip_plain  the paper's reduction: clip mode, each row's only positive is its own item
#   beta_1      relation-blind embeddings (beta 1) trained with the whole RCML loss
# --ablations adds, each a change of rcml: paper_rcml (the paper's objective and batches: no conditioned
# term, drawn-for-group positives, independent group picks, legacy mix), no_cond, no_intra, no_hard,
# no_cross_sample (every group unique to its item; min_group 1 so each row keeps its own relation text),
# no_descriptions (one generic text per relation type), beta_0, beta_0.6; and lexical, an addition to rcml:
# the text pooling attends over the captions' word embeddings too (model.text_pool_tokens).
# --untrained adds untrained_rcml and untrained_clip: the models at their random initialization
# (launch/export_init.py), the floor of every learned number.
#
# Output: benchmarks/results/emoji_rcml_vs_clip.json maps run -> split -> report with the mean over the
# seeds, plus "std" (a report of the same shape: sample standard deviation over seeds), "seeds" and
# "train" (steps, seconds per seed). A run whose export exists is not retrained, a report newer than its
# export is not recomputed (FORCE=1 redoes both);
# --no-eval trains only (a later call without it evaluates the existing exports); --dry-run prints the
# commands only.
#
# Environment: EMOJI_RUNS_ONLY (a comma-separated subset of the main runs; "none" for none), EMOJI_ABLATIONS_ONLY
# (with --ablations: a comma-separated subset of the ablations, e.g. beta_0.6), EMOJI_KEEP=1 (add
# these runs to the ones already in the JSON, which must share their evaluation plans), EMOJI_STEPS (300), EMOJI_DATA
# (data/emoji), EMOJI_CACHE (.cache/emoji), EMOJI_RUNS (runs/emoji), EMOJI_PORT (29531), PY, DS. About 12
# minutes per trained run and seed on a 2-core CPU, and 3-5 to evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."

ABLATIONS=0
UNTRAINED=0
EVAL=1
DRY=0
SEEDS=0,1,2
usage() { echo "usage: bash $0 [--seeds 0,1,2] [--ablations] [--untrained] [--no-eval] [--dry-run]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ablations) ABLATIONS=1 ;;
    --untrained) UNTRAINED=1 ;;
    --no-eval) EVAL=0 ;;
    --dry-run) DRY=1 ;;
    --seeds) [ $# -ge 2 ] || usage; SEEDS=$2; shift ;;
    --seeds=*) SEEDS=${1#--seeds=} ;;
    *) usage ;;
  esac
  shift
done
[[ "$SEEDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "--seeds must be a comma-separated list of integers, got '$SEEDS'" >&2; exit 2; }
IFS=, read -r -a SEED_LIST <<< "$SEEDS"

PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
DATA=${EMOJI_DATA:-data/emoji}
CACHE=${EMOJI_CACHE:-.cache/emoji}
RUNS=${EMOJI_RUNS:-runs/emoji}
STEPS=${EMOJI_STEPS:-300}
PORT=${EMOJI_PORT:-29531}
CONFIG=configs/pretrain/emoji.yaml
RESULT=benchmarks/results/emoji_rcml_vs_clip.json
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }

# ---------------------------------------------------------------------------------------- data
need_build=0
[ -f "$DATA/emoji_manifest.json" ] || need_build=1
if [ "$ABLATIONS" = 1 ] && [ ! -f "$DATA/train_singleton/manifest.json" ]; then need_build=1; fi
if [ "$need_build" = 1 ]; then
  stamp "building the emoji dataset in $DATA (sources cached in $CACHE)"
  build_args=(--cache "$CACHE" --out "$DATA" --seed 0)
  [ "$ABLATIONS" = 1 ] && build_args+=(--ablations)
  run $PY -m data_prep.emoji "${build_args[@]}"
fi
pattern() {
  if [ "$DRY" = 1 ] && [ ! -f "$DATA/$1/manifest.json" ]; then echo "$DATA/$1/shard-{...}.tar"; return; fi
  $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['pattern'])" "$DATA/$1/manifest.json"
}

# ---------------------------------------------------------------------------------------- runs
# name | training split ("-" = not trained) | evaluation suffix ("" or "_generic") | overrides
CLIP_CONTEXT="data.context_length=64"
RUN_SPECS=(
  "rcml|train||model.mode=rcml"
  "clip|train||model.mode=clip $CLIP_CONTEXT"
  "beta_1|train||model.mode=rcml model.beta=1"
  "clip_plain|train||model.mode=clip $CLIP_CONTEXT loss.positives=item"
)
if [ -n "${EMOJI_RUNS_ONLY:-}" ]; then  # e.g. EMOJI_RUNS_ONLY=rcml,clip: a subset of the runs above
  keep=()
  for spec in "${RUN_SPECS[@]}"; do [[ ",$EMOJI_RUNS_ONLY," == *",${spec%%|*},"* ]] && keep+=("$spec"); done
  RUN_SPECS=("${keep[@]}")
fi
if [ "$ABLATIONS" = 1 ]; then
  ABLATION_SPECS=(
    "paper_rcml|train||model.mode=rcml loss.w_cond=0 loss.positives=group data.hard_batches=false data.type_quotas= model.mix=legacy"
    "no_cond|train||model.mode=rcml loss.w_cond=0"
    "no_intra|train||model.mode=rcml loss.w_intra=0"
    "no_hard|train||model.mode=rcml data.hard_batches=false"
    "no_cross_sample|train_singleton||model.mode=rcml data.min_group=1"
    "no_descriptions|train_generic|_generic|model.mode=rcml"
    "beta_0|train||model.mode=rcml model.beta=0"
    "beta_0.6|train||model.mode=rcml model.beta=0.6"
    "lexical|train||model.mode=rcml model.text_pool_tokens=contextual+lexical"
  )
  for spec in "${ABLATION_SPECS[@]}"; do  # EMOJI_ABLATIONS_ONLY=beta_0.6,no_cond: a subset of them
    if [ -z "${EMOJI_ABLATIONS_ONLY:-}" ] || [[ ",$EMOJI_ABLATIONS_ONLY," == *",${spec%%|*},"* ]]; then
      RUN_SPECS+=("$spec")
    fi
  done
fi
if [ "$UNTRAINED" = 1 ]; then
  RUN_SPECS+=(
    "untrained_rcml|-||model.mode=rcml"
    "untrained_clip|-||model.mode=clip $CLIP_CONTEXT"
  )
fi

for seed in "${SEED_LIST[@]}"; do
  for spec in "${RUN_SPECS[@]}"; do
    IFS="|" read -r name split suffix overrides <<< "$spec"
    out="$RUNS/$name/seed_$seed"
    if [ -f "$out/export/model.safetensors" ] && [ "${FORCE:-0}" != 1 ]; then
      stamp "$name seed $seed: export exists in $out/export, not retrained (FORCE=1 retrains)"
    elif [ "$split" = "-" ]; then
      stamp "$name seed $seed: exporting the random initialization ($overrides)"
      # shellcheck disable=SC2086  # $overrides is a list of key=value words
      run $PY launch/export_init.py --config "$CONFIG" --out "$out/export" seed="$seed" \
        data.tokenizer="$DATA/tokenizer.json" $overrides
      [ "$DRY" = 1 ] || echo "{\"steps\": 0, \"seed\": $seed, \"overrides\": \"$overrides\", \"seconds\": 0}" > "$out/train_summary.json"
    else
      stamp "$name seed $seed: training $STEPS steps on $split ($overrides)"
      start=$(date +%s)
      # shellcheck disable=SC2086
      run $DS --num_gpus 2 --master_port "$PORT" launch/pretrain.py --ds_config configs/zero3.json \
        --config "$CONFIG" data.train="$(pattern "$split")" data.tokenizer="$DATA/tokenizer.json" \
        train.out_dir="$out" train.steps="$STEPS" seed="$seed" tracking.run_name="$name-seed$seed" \
        train.overwrite=true $overrides  # (re)training replaces an interrupted or FORCE=1 run
      [ "$DRY" = 1 ] || echo "{\"steps\": $STEPS, \"seed\": $seed, \"split\": \"$split\", \"overrides\": \"$overrides\", \"seconds\": $(( $(date +%s) - start ))}" > "$out/train_summary.json"
    fi
    [ "$EVAL" = 1 ] || continue
    for val in val_styles val_emoji; do
      report="$out/eval_$val/report.json"
      if [ -f "$report" ] && [ "$report" -nt "$out/export/model.safetensors" ] && [ "${FORCE:-0}" != 1 ]; then
        stamp "$name seed $seed: $report is newer than the export, not re-evaluated (FORCE=1 re-evaluates)"
        continue
      fi
      stamp "$name seed $seed: evaluating on $val$suffix"
      eval_cmd=($PY launch/evaluate.py --checkpoint "$out/export" --shards "$(pattern "$val$suffix")"
                --out "$out/eval_$val" --negatives 20 --seed "$seed")
      if [ "$DRY" = 1 ]; then
        echo "+ ${eval_cmd[*]}"
      else
        "${eval_cmd[@]}" > "$out/eval_$val.log" 2>&1 || { cat "$out/eval_$val.log" >&2; exit 1; }
      fi
    done
  done
done
[ "$DRY" = 1 ] || [ "$EVAL" = 0 ] && exit 0

# ---------------------------------------------------------------------------------------- summary
stamp "collecting the reports into $RESULT"
names=()
for spec in "${RUN_SPECS[@]}"; do names+=("${spec%%|*}"); done
keep=()
[ "${EMOJI_KEEP:-0}" = 1 ] && keep=(--keep-existing)
$PY benchmarks/emoji_summary.py --runs "$RUNS" --out "$RESULT" --seeds "$SEEDS" "${keep[@]}" "${names[@]}"
stamp "done: $RESULT"
