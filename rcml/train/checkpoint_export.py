"""A training checkpoint (``<out_dir>/checkpoints/step_<n>``) -> an export folder, in one process.

    python -m rcml.train.checkpoint export runs/x/checkpoints/step_00001000 --out runs/x/export_step_1000

The trainer exports the model once, when training ends. To evaluate or ship an intermediate step, or a run
that was stopped before its end, this rebuilds the full fp32 weights from the ZeRO-partitioned files with
DeepSpeed's own ``zero_to_fp32`` (stage 2 and 3, any world size; no process group, no accelerator) and writes
them with the trainer's ``write_export``: the same folder, loadable by ``rcml.from_pretrained`` and
transformers' ``CLIPModel``. What DeepSpeed reads it unpickles (``weights_only=False``), so every file is
first checked against the sha256 list of the checkpoint's COMPLETE marker, as a resume does: the
checkpoints you wrote are trusted, a changed file is refused before it is read.

A checkpoint carries what the conversion needs besides the weights: ``spec.json`` (the architecture),
``tokenizer.json`` and ``run_config.yaml``. Under bf16 training the export holds DeepSpeed's fp32 master
weights, where the trainer's own export holds the module's bf16 values widened to fp32.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from rcml.train import checkpoint

SPEC_FILE = "spec.json"
TOKENIZER_FILE = "tokenizer.json"
RUN_CONFIG_FILE = "run_config.yaml"


def conversion_files(spec: dict[str, Any], tokenizer_path: Path, run_config_yaml: str) -> dict[str, str]:
    """The files a checkpoint needs beside DeepSpeed's to become an export (``Trainer.save`` adds them)."""
    from rcml.tokenizer import tokenizer_file

    return {SPEC_FILE: json.dumps(spec, indent=2, sort_keys=True),
            TOKENIZER_FILE: tokenizer_file(tokenizer_path).read_text(encoding="utf-8"),
            RUN_CONFIG_FILE: run_config_yaml}


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the model saved in checkpoint ``path`` (a verified ``step_<n>`` directory)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 reports its progress with print(): keep stdout for what the caller prints
    with contextlib.redirect_stdout(sys.stderr):
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in state.items()}


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the export folder ``out`` from checkpoint ``path``; returns ``out``.

    Raises RuntimeError (naming the file) for a checkpoint that is incomplete, changed, written before
    checkpoints carried the conversion files, or whose weights do not fit its own spec."""
    from rcml.export import spec_shapes, write_export

    path, out = Path(path), Path(out)
    checkpoint.verify(path)  # before anything is unpickled
    missing = [name for name in (SPEC_FILE, TOKENIZER_FILE, RUN_CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise RuntimeError(
            f"checkpoint {path} has no {', '.join(missing)}: it was saved before checkpoints carried what an export "
            "needs. Resume it with `--resume` for at least one step (its next checkpoint has them), or let the run "
            "finish and evaluate its export/.")
    spec = json.loads((path / SPEC_FILE).read_text())
    state = consolidated_weights(path)
    expected = spec_shapes(spec)
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got.keys() != expected.keys():
        lost, surplus = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise RuntimeError(f"checkpoint {path}: its weights do not match its {SPEC_FILE}: missing {lost[:3]}"
                           f"{' ...' if len(lost) > 3 else ''}, unexpected {surplus[:3]}{' ...' if len(surplus) > 3 else ''}")
    wrong = [name for name in expected if got[name] != expected[name]]
    if wrong:
        raise RuntimeError(f"checkpoint {path}: {wrong[0]} has shape {got[wrong[0]]}, its {SPEC_FILE} says "
                           f"{expected[wrong[0]]}")
    step = int(json.loads((path / checkpoint.COMPLETE).read_text())["step"])
    return write_export(out, state, spec, path / TOKENIZER_FILE, (path / RUN_CONFIG_FILE).read_text(), step=step)
