#!/usr/bin/env bash
# RCML vs the CLIP baseline on real relational data: the emoji dataset (data_prep.emoji).
#
#   bash benchmarks/emoji_rcml_vs_clip.sh [--ablations] [--dry-run]
#
# Builds the data (cached), trains RCML and CLIP mode with the same trainer, data, steps and batch
# (2 CPU ranks, ZeRO-3), evaluates both on the held-out styles (val_styles: out-of-domain) and the
# held-out emoji (val_emoji: zero-shot), prints the comparison and writes
# benchmarks/results/emoji_rcml_vs_clip.json (one key per run: {"val_styles": report, "val_emoji": report,
# "train": {...}}). --ablations adds: no cross-sample relations (singleton groups), no relation
# descriptions (one generic text), no intra-modal terms, beta in {0, 0.6, 1} (0.3 is the main run).
# A run whose export exists is not retrained (FORCE=1 retrains); --dry-run prints the commands only.
#
# Environment: EMOJI_STEPS (500), EMOJI_DATA (data/emoji), EMOJI_CACHE (.cache/emoji), EMOJI_RUNS
# (runs/emoji), EMOJI_PORT (29531), PY, DS. About 45 minutes for the two main runs on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

ABLATIONS=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --ablations) ABLATIONS=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash $0 [--ablations] [--dry-run]" >&2; exit 2 ;;
  esac
done

PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
DATA=${EMOJI_DATA:-data/emoji}
CACHE=${EMOJI_CACHE:-.cache/emoji}
RUNS=${EMOJI_RUNS:-runs/emoji}
STEPS=${EMOJI_STEPS:-500}
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
# name | training split | evaluation suffix ("" or "_generic") | overrides
RUN_SPECS=(
  "rcml|train||model.mode=rcml"
  "clip|train||model.mode=clip"
)
if [ "$ABLATIONS" = 1 ]; then
  RUN_SPECS+=(
    "no_cross_sample|train_singleton||model.mode=rcml"
    "no_descriptions|train_generic|_generic|model.mode=rcml"
    "no_intra|train||model.mode=rcml loss.w_intra=0"
    "beta_0|train||model.mode=rcml model.beta=0"
    "beta_0.6|train||model.mode=rcml model.beta=0.6"
    "beta_1|train||model.mode=rcml model.beta=1"
  )
fi

for spec in "${RUN_SPECS[@]}"; do
  IFS="|" read -r name split suffix overrides <<< "$spec"
  out="$RUNS/$name"
  if [ -f "$out/export/model.safetensors" ] && [ "${FORCE:-0}" != 1 ]; then
    stamp "$name: export exists in $out/export, not retrained (FORCE=1 retrains)"
  else
    stamp "$name: training $STEPS steps on $split ($overrides)"
    start=$(date +%s)
    # shellcheck disable=SC2086  # $overrides is a list of key=value words
    run $DS --num_gpus 2 --master_port "$PORT" launch/pretrain.py --ds_config configs/zero3.json \
      --config "$CONFIG" data.train="$(pattern "$split")" data.tokenizer="$DATA/tokenizer.json" \
      train.out_dir="$out" train.steps="$STEPS" tracking.run_name="$name" $overrides
    [ "$DRY" = 1 ] || echo "{\"steps\": $STEPS, \"split\": \"$split\", \"overrides\": \"$overrides\", \"seconds\": $(( $(date +%s) - start ))}" > "$out/train_summary.json"
  fi
  for val in val_styles val_emoji; do
    stamp "$name: evaluating on $val$suffix"
    eval_cmd=($PY launch/evaluate.py --checkpoint "$out/export" --shards "$(pattern "$val$suffix")"
              --out "$out/eval_$val" --negatives 20 --seed 0)
    if [ "$DRY" = 1 ]; then
      echo "+ ${eval_cmd[*]}"
    else
      "${eval_cmd[@]}" > "$out/eval_$val.log" 2>&1 || { cat "$out/eval_$val.log" >&2; exit 1; }
      grep "^| Hit@" "$out/eval_$val.log" || true
    fi
  done
done
[ "$DRY" = 1 ] && exit 0

# ---------------------------------------------------------------------------------------- summary
stamp "collecting the reports into $RESULT"
mkdir -p "$(dirname "$RESULT")"
names=()
for spec in "${RUN_SPECS[@]}"; do names+=("${spec%%|*}"); done
$PY - "$RUNS" "$RESULT" "${names[@]}" <<'EOF'
import json
import sys
from pathlib import Path

runs, result, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
out = {}
for name in names:
    entry = {val: json.loads((runs / name / f"eval_{val}" / "report.json").read_text())
             for val in ("val_styles", "val_emoji")}
    summary = runs / name / "train_summary.json"
    entry["train"] = json.loads(summary.read_text()) if summary.is_file() else {}
    out[name] = entry
result.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


cols = ("AVG", "TT", "II", "TI", "IT")
for val, title in (("val_styles", "held-out styles (out-of-domain)"), ("val_emoji", "held-out emoji (zero-shot)")):
    print(f"\n### {title}: relation-guided Hit@5 (1 positive + 20 negatives), gallery MRR, type top-3, validity AUC\n")
    print("| run | " + " | ".join(f"Hit@5 {c}" for c in cols) + " | Hit@1 AVG | MRR i->t | type top-3 | validity AUC |")
    print("|---" * (len(cols) + 5) + "|")
    for name in names:
        r = out[name][val]
        row = [r["retrieval"]["hit@5"][c] for c in cols] + [r["retrieval"]["hit@1"]["AVG"],
               r["gallery"]["image_to_text"]["MRR"], r["relation_type"].get("top3"), r["validity"].get("auc")]
        print(f"| {name} | " + " | ".join(fmt(v) for v in row) + " |")
rcml, clip = (out[n]["val_styles"]["retrieval"]["hit@5"]["AVG"] for n in ("rcml", "clip"))
gain = (rcml / clip - 1) * 100 if clip else float("inf")
print(f"\nRCML vs CLIP on held-out styles, Hit@5 (AVG): {rcml:.3f} vs {clip:.3f} = {gain:+.1f}% relative "
      f"({'meets' if gain >= 20 else 'below'} the +20% expectation)")
EOF
stamp "done: $RESULT"
