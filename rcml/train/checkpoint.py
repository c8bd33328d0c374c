"""Atomic, resumable checkpoints on top of DeepSpeed's.

Layout of ``<out_dir>/checkpoints``::

    step_00000040/               one published checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        trainer_state_rank00000.pt   step, data position, RNG states, skip counters of that rank
        run_config.yaml, ds_config.json
        COMPLETE                     written last, before the directory is published
    latest                       name of the newest published checkpoint, replaced atomically
    .tmp-step_00000060/          a save in progress (never loaded; removed on the next save)

Publishing is a directory rename and a ``os.replace`` of ``latest``, both atomic on POSIX file systems
(one shared file system across nodes, as on any cluster). A process killed mid-save leaves only a
``.tmp-*`` directory behind, and ``latest`` still names the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("rcml")

# Fault injection for the atomicity test: pause (seconds) after the rank files are written, before
# publishing, so that a test can kill a rank mid-save.
SAVE_PAUSE_ENV = "RCML_TEST_SAVE_PAUSE_S"

LATEST = "latest"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    """RNG states as plain tensors / lists, so they load with ``weights_only=True``."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(path: Path) -> int | None:
    """The step of a ``step_<n>`` directory, None for any other name."""
    digits = path.name[len("step_"):]
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def published(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, lowest step first (by number: names stop sorting by step past 8 digits)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE).exists()]
    return sorted(found, key=step_of)


def prunable(ckpt_dir: Path, step: int, keep: int) -> list[Path]:
    """Checkpoints to delete after publishing ``step``: all but the ``keep`` newest at or below ``step``.
    Checkpoints beyond ``step`` (left by a run resumed from an earlier checkpoint) are not this run's past:
    they are kept until this run reaches and re-saves their step."""
    own = [p for p in published(ckpt_dir) if step_of(p) <= step]
    return own[:-keep] if keep > 0 else []


def resolve(ckpt_dir: Path, which: str) -> Path | None:
    """``which`` is ``latest`` (None when nothing is published yet), a tag, or a path."""
    if which == LATEST:
        pointer = ckpt_dir / LATEST
        if not pointer.exists():
            return None
        target = ckpt_dir / pointer.read_text().strip()
        if not (target / COMPLETE).exists():
            raise RuntimeError(f"{pointer} names {target.name}, which is not a complete checkpoint")
        return target
    candidate = Path(which)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = ckpt_dir / which
    if not (candidate / COMPLETE).exists():
        raise RuntimeError(f"--resume {which}: {candidate} is not a complete checkpoint (no {COMPLETE} marker)")
    return candidate


def save(engine, ckpt_dir: Path, step: int, rank_state: dict[str, Any], extra_files: dict[str, str],
         keep: int, rank: int) -> Path:
    """Collective: every rank must call it. Returns the published directory."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    final = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier save
        if final.exists():
            shutil.rmtree(final)  # re-saving the same step (e.g. final step after a signal save)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    tmp = ckpt_dir / tmp_tag
    torch.save(rank_state, tmp / _rank_state_name(rank))
    if float(os.environ.get(SAVE_PAUSE_ENV, "0")) > 0:
        import time

        log.warning("pausing %s s before publishing %s (%s)", os.environ[SAVE_PAUSE_ENV], tag, SAVE_PAUSE_ENV)
        time.sleep(float(os.environ[SAVE_PAUSE_ENV]))
    dist.barrier()
    if rank == 0:
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        os.rename(tmp, final)
        pointer_tmp = ckpt_dir / (LATEST + ".tmp")
        pointer_tmp.write_text(tag)
        os.replace(pointer_tmp, ckpt_dir / LATEST)
        _fsync_dir(ckpt_dir)
        for old in prunable(ckpt_dir, step, keep):
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s published", final)
    dist.barrier()
    return final


def load(engine, path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: load DeepSpeed state and this rank's trainer state from a published checkpoint."""
    meta = json.loads((path / COMPLETE).read_text())
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta['world_size']} ranks, this job has {world_size}. "
            "Exact resume needs the same world size (each rank's data position is part of the state); "
            "export the model (it is world-size independent) and start a new run to change it."
        )
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    state_file = path / _rank_state_name(rank)
    if not state_file.exists():
        raise RuntimeError(f"{state_file} is missing: the checkpoint is incomplete for rank {rank}")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
