"""Atomic, resumable checkpoints on top of DeepSpeed's.

Layout of ``<out_dir>/checkpoints``::

    step_00000040/               one published checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        trainer_state_rank00000.pt   step, data position, RNG states, skip counters of that rank
        run_config.yaml, ds_config.json
        spec.json, tokenizer.json    what an export needs besides the weights (rcml/train/checkpoint_export.py)
        COMPLETE                     written last, before the directory is published: step, world size,
                                     and the size and sha256 of every other file of the directory
    latest                       name of the newest published checkpoint, replaced atomically
    .tmp-step_00000060/          a save in progress (never loaded; removed on the next save)

Publishing is a directory rename and a ``os.replace`` of ``latest``, both atomic on POSIX file systems
(one shared file system across nodes, as on any cluster). A process killed mid-save leaves only a
``.tmp-*`` directory behind, and ``latest`` still names the previous complete checkpoint.

A checkpoint directory is code: DeepSpeed loads its files with ``torch.load(weights_only=False)``. So
``latest`` may only name a ``step_<n>`` directory directly inside the checkpoint directory, and a resume
first checks every file against COMPLETE (missing, extra, other size or sha256) and refuses to load a
directory that does not match. This catches truncated or corrupt files and foreign ones; it is not a
signature: whoever can write the directory can also rewrite COMPLETE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rcml.train import faults

log = logging.getLogger("rcml")

LATEST = "latest"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
HASH_CHUNK = 1 << 20  # bytes read per hashlib update


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
    found = [p for p in ckpt_dir.iterdir()
             if not p.is_symlink() and p.is_dir() and step_of(p) is not None and (p / COMPLETE).exists()]
    return sorted(found, key=step_of)


def prunable(ckpt_dir: Path, step: int, keep: int) -> list[Path]:
    """Checkpoints to delete after publishing ``step``: all but the ``keep`` newest at or below ``step``.
    Checkpoints beyond ``step`` (left by a run resumed from an earlier checkpoint) are not this run's past:
    they are kept until this run reaches and re-saves their step."""
    own = [p for p in published(ckpt_dir) if step_of(p) <= step]
    return own[:-keep] if keep > 0 else []


def resolve(ckpt_dir: Path, which: str) -> Path | None:
    """``which`` is ``latest`` (None when nothing is published yet), a tag, or a path.

    ``latest`` must name a ``step_<n>`` directory directly inside ``ckpt_dir`` (not a path, not a symlink
    that leads elsewhere): its content is not trusted to point anywhere else."""
    if which == LATEST:
        pointer = ckpt_dir / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        target = ckpt_dir / name
        if step_of(Path(name)) is None or Path(name).name != name or \
                target.resolve().parent != ckpt_dir.resolve():
            raise RuntimeError(
                f"{pointer} names {name!r}, which is not a checkpoint directly inside {ckpt_dir} (a step_<n> "
                "directory): refusing to resume from it. Pass --resume with the tag of a checkpoint you trust.")
        if not (target / COMPLETE).exists():
            raise RuntimeError(f"{pointer} names {target.name}, which is not a complete checkpoint")
        return target
    candidate = Path(which)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = ckpt_dir / which
    if not (candidate / COMPLETE).exists():
        raise RuntimeError(f"--resume {which}: {candidate} is not a complete checkpoint (no {COMPLETE} marker)")
    return candidate


def locate(path: Path) -> Path | None:
    """The published checkpoint ``path`` names: ``path`` itself (a ``step_<n>`` directory with its COMPLETE
    marker), else the latest of ``path`` (a ``checkpoints/`` directory) or of ``path/checkpoints`` (a run
    directory); None when there is none. Raises RuntimeError for a ``latest`` that ``resolve`` refuses."""
    if (path / COMPLETE).exists():
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if (ckpt_dir / LATEST).exists():
            return resolve(ckpt_dir, LATEST)
    return None


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
    if rank == 0:
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    faults.before_publish(tmp, rank)  # a no-op; the atomicity test kills a rank here
    dist.barrier()  # every rank's files are final: hash them
    files = _hash_shared(tmp, rank, dist.get_world_size())
    if rank == 0:
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size(), "files": files},
                                               indent=1))
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
    """Collective: load DeepSpeed state and this rank's trainer state from a published checkpoint.

    Every file is checked against COMPLETE first (``verify``); the ranks share the hashing, so each reads
    about 1/world_size of the checkpoint once (sha256 runs at ~1.3 GB/s per core from the page cache on a
    CPU with SHA extensions; the shared file system is usually the limit)."""
    meta = _read_complete(path)
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta['world_size']} ranks, this job has {world_size}. "
            "Exact resume needs the same world size (each rank's data position is part of the state); "
            "export the model (it is world-size independent) and start a new run to change it."
        )
    try:
        verify(path, rank, world_size)
        problem = None
    except (RuntimeError, OSError) as e:  # on one rank only, maybe: tell the others before any raises
        problem = str(e)
    problems: list[str | None] = [None] * world_size
    dist.all_gather_object(problems, problem)  # every rank refuses, with the same message
    first = next((p for p in problems if p), None)
    if first:
        raise RuntimeError(first)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    state_file = path / _rank_state_name(rank)
    if not state_file.exists():
        raise RuntimeError(f"{state_file} is missing: the checkpoint is incomplete for rank {rank}")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def verify(path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Raise a RuntimeError naming the first file of checkpoint ``path`` that does not match the list in
    its COMPLETE marker: missing, not listed (DeepSpeed globs for its files, so an extra ``*.pt`` could be
    loaded), not a regular file, another size, or another sha256. Every rank checks names and sizes;
    the sha256 of only its share of the files (``_shares``), so that the ranks together read it once."""
    meta = _read_complete(path)
    files = meta.get("files")
    if files is None:
        raise RuntimeError(
            f"checkpoint {path}: its {COMPLETE} marker lists no file hashes (it was written before checkpoints "
            "recorded them), so its files cannot be checked before DeepSpeed unpickles them. If you trust this "
            f"directory, record its hashes with `python -m rcml.train.checkpoint seal {path}` and resume again.")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                              and isinstance(e.get("sha256"), str) for e in files.values()):
        raise RuntimeError(f"checkpoint {path}: the file list in {COMPLETE} is malformed{_previous_hint(path)}")
    found = _listing(path)
    missing = sorted(files.keys() - found.keys())
    if missing:
        raise RuntimeError(f"checkpoint {path}: {missing[0]} is missing"
                           + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
                           + _previous_hint(path))
    extra = sorted(found.keys() - files.keys())
    if extra:
        raise RuntimeError(f"checkpoint {path}: {extra[0]} is not one of the files the checkpoint was saved with; "
                           f"refusing to load the directory{_previous_hint(path)}")
    for name in sorted(files):
        if found[name] != files[name]["size"]:
            raise RuntimeError(f"checkpoint {path}: {name} has {found[name]} bytes, {files[name]['size']} were "
                               f"saved (truncated or corrupt){_previous_hint(path)}")
    for name in _shares(found, world_size)[rank]:
        if _digest(path / name)[1] != files[name]["sha256"]:
            raise RuntimeError(f"checkpoint {path}: {name} does not match the sha256 recorded in {COMPLETE} "
                               f"(corrupt){_previous_hint(path)}")


def _read_complete(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / COMPLETE).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("world_size"), int):
            raise ValueError("not an object with an integer world_size")
    except (OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint {path}: {COMPLETE} cannot be read ({e}){_previous_hint(path)}") from None
    return meta


def _previous_hint(path: Path) -> str:
    """How to go on when checkpoint ``path`` cannot be used: the next older complete checkpoint."""
    step = step_of(path)
    older = [p for p in published(path.parent) if step is not None and step_of(p) < step]
    if older:
        return f". Use --resume {older[-1].name} to resume from the previous complete checkpoint"
    return f". There is no earlier complete checkpoint in {path.parent}"


def _listing(root: Path) -> dict[str, int]:
    """Relative path -> size of every file below ``root`` except COMPLETE. Raises on anything that is not
    a directory or a regular file (a symlink could lead out of the checkpoint)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinks
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            st = entry.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            rel = entry.relative_to(root).as_posix()
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"checkpoint {root}: {rel} is not a regular file; refusing to load the directory")
            if rel != COMPLETE:
                found[rel] = st.st_size
    return found


def _shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files each rank hashes: largest first, dealt round robin (the same split on every rank)."""
    order = sorted(sizes, key=lambda name: (-sizes[name], name))
    return [order[r::world_size] for r in range(world_size)]


def _digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in HASH_CHUNK pieces."""
    h, size = hashlib.sha256(), 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    size, sha256 = _digest(path)
    return {"size": size, "sha256": sha256}


def manifest(root: Path) -> dict[str, dict[str, Any]]:
    """COMPLETE's file list for the directory ``root``, hashed in this process."""
    return {name: _entry(root / name) for name in sorted(_listing(root))}


def _hash_shared(root: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]] | None:
    """Collective ``manifest``: rank 0 lists the directory, each rank hashes its share; rank 0 gets the
    list, the others None."""
    listing: list[Any] = [_listing(root) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    mine = {name: _entry(root / name) for name in _shares(listing[0], world_size)[rank]}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return dict(sorted(item for part in gathered for item in part.items())) if rank == 0 else None


def seal(path: Path) -> None:
    """Record the hashes of an existing checkpoint's files in its COMPLETE marker: for a checkpoint saved
    before markers held them, once you trust its files."""
    meta = _read_complete(path)
    meta["files"] = manifest(path)
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / COMPLETE)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rcml.train.checkpoint",
                                     description="Tools for training checkpoints (<train.out_dir>/checkpoints/step_<n>).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("seal", help="record the sha256 of every file of a trusted checkpoint").add_argument(
        "checkpoint", type=Path, help="a step_<n> directory with a COMPLETE marker")
    export = sub.add_parser("export", help="write an export folder (rcml.from_pretrained, transformers' CLIPModel) "
                                           "from a checkpoint, in one process")
    export.add_argument("checkpoint", type=Path,
                        help="a step_<n> directory, or a checkpoints/ or run directory (its latest checkpoint)")
    export.add_argument("--out", type=Path, required=True, help="the export folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    if args.command == "seal":
        seal(args.checkpoint)
        print(f"{args.checkpoint / COMPLETE}: {len(_listing(args.checkpoint))} files recorded")
        return 0
    from rcml.train.checkpoint_export import export_checkpoint

    try:
        path = locate(args.checkpoint)
        if path is None:
            raise RuntimeError(f"{args.checkpoint} is not a published checkpoint (no {COMPLETE}) and holds none")
        out = export_checkpoint(path, args.out)
    except (RuntimeError, FileNotFoundError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(f"exported {path} to {out} (load with rcml.from_pretrained)")
    return 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
