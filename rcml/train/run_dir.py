"""The run directory (``train.out_dir``) belongs to one run: a fresh start never mixes with an older run.

Without this, a fresh run in a directory that holds an older run's checkpoints has its own newest
checkpoint pruned as "oldest" next to the old ones, ``latest`` names a deleted directory, the old
``metrics.jsonl`` is appended to and ``run_config.yaml`` overwritten. So a fresh start (no ``--resume``) in a
directory that holds a run is refused, unless ``train.overwrite=true`` says to remove that run's files
first. Only the files a run writes are removed; anything else in the directory is left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# What a training run writes into its directory (the MLflow store is left: it holds many runs).
RUN_DIRS = ("checkpoints", "export", "eval")
RUN_FILES = ("metrics.jsonl", "run_config.yaml", "ds_config.json", "STOP")
RUN_GLOBS = ("keys_rank*.jsonl",)


def previous_run_files(out_dir: Path) -> list[Path]:
    """The files and directories of an earlier run in ``out_dir`` (empty when there is none)."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / d for d in RUN_DIRS if (out_dir / d).exists()]
    found += [out_dir / f for f in RUN_FILES if (out_dir / f).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(out_dir.glob(pattern))
    return found


def check_fresh_start(out_dir: Path, resume: str | None, overwrite: bool) -> list[Path]:
    """Raise when a fresh start would mix with an earlier run; return what ``overwrite`` must remove.

    Every rank calls this before any rank writes (the directory is on a file system all ranks share)."""
    if resume:
        return []
    found = previous_run_files(out_dir)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (" ..." if len(found) > 6 else "")
        raise RuntimeError(
            f"train.out_dir={out_dir} already holds a run ({names}). Continue it with --resume latest, choose "
            "another train.out_dir, or pass train.overwrite=true to delete that run's files and start afresh.")
    return found


def remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
