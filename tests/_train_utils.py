"""Helpers for the end-to-end tests: tiny synthetic shards and real launcher runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def build_tiny_dataset(root: Path, items: int = 480, val_items: int = 96, shard_size: int = 60) -> dict[str, str]:
    """Synthetic shards + tokenizer; returns the overrides that point a run at them."""
    if not (root / "tokenizer.json").exists():
        subprocess.run([PY, "-m", "data_prep.synthetic", "--out", str(root), "--items", str(items),
                        "--val-items", str(val_items), "--seed", "0", "--shard-size", str(shard_size)],
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
        train = json.loads((root / "train" / "manifest.json").read_text())["pattern"]
        subprocess.run([PY, "-m", "data_prep.train_tokenizer", "--shards", train, "--out",
                        str(root / "tokenizer.json"), "--vocab-size", "400"],
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    return {
        "data.train": json.loads((root / "train" / "manifest.json").read_text())["pattern"],
        "data.val": json.loads((root / "val" / "manifest.json").read_text())["pattern"],
        "data.tokenizer": str(root / "tokenizer.json"),
    }


# Small, fast and deterministic: 2 ranks x 16 rows, CPU fp32.
BASE_OVERRIDES = {
    "seed": "0",
    "data.workers": "2",
    "data.groups_per_batch": "4",
    "data.members_per_group": "4",
    "data.buffer_size": "128",
    "data.shard_shuffle": "8",
    "model.name": "tiny",
    "train.log_every": "1",
    "train.ckpt_every": "0",
    "train.record_keys": "true",
    "eval.max_items": "64",
    "eval.negatives": "5",
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e.pop("TRITON_INTERPRET", None)  # training uses the PyTorch CPU path
    # mlflow.set_tracking_uri() in an in-process test exports this variable; runs must use their own store
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def overrides_list(data: dict[str, str], out_dir: Path, **extra: str) -> list[str]:
    merged = dict(BASE_OVERRIDES) | data | {"train.out_dir": str(out_dir)} | extra
    return [f"{k}={v}" for k, v in merged.items()]


# launch/pretrain.py with the fault-injection points of rcml/train/faults.py set from its own options
FAULTY = "tests/scripts/faulty_pretrain.py"


def deepspeed_cmd(port: int, ds_config: str, overrides: list[str], nproc: int = 2,
                  extra_args: tuple[str, ...] = (), script: str = "launch/pretrain.py") -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), script,
            "--ds_config", ds_config, *extra_args, *overrides]


def run(cmd: list[str], timeout: int = 600, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = env() | (extra_env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def read_keys(out_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (out_dir / f"keys_rank{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


# ---------------------------------------------------------------------------------------- the reference run
# tests/test_e2e_train.py and tests/scripts/golden_loss.py run exactly this: the tiny model from scratch on the
# synthetic shards with configs/zero3.json (AdamW 5e-4, 20 warmup steps, cosine). The tiny CLIP towers sit on
# the chance plateau (embeddings collapsed, every term at ln(rows)) for the first ~70 steps and then leave it,
# so the run is long enough to learn: a 20-step run stays at chance and pins nothing about learning.
REFERENCE_STEPS = 160
REFERENCE_CKPT = 80  # mid-run checkpoint: the exact-resume test restarts from it
GOLDEN = REPO / "tests" / "assets" / "golden_tiny_loss.json"


def reference_overrides(data: dict[str, str], out_dir: Path) -> list[str]:
    return overrides_list(data, out_dir, **{"train.steps": str(REFERENCE_STEPS), "train.ckpt_every": str(REFERENCE_CKPT),
                                            "train.keep_checkpoints": "5"})


def below_chance(metrics: list[dict]) -> float:
    """Mean relative distance of the cross-modal terms below their chance level over ``metrics`` (logged steps).

    With uniform (collapsed) embeddings every logit is equal and L_IT = L_TI = ln(rows) exactly, whatever the
    positives; a model that learned nothing sits at 0, one that separates its positives is above 0."""
    import math

    gaps = [1.0 - (m["loss_it"] + m["loss_ti"]) / 2 / math.log(m["rows"]) for m in metrics]
    return sum(gaps) / len(gaps)
