"""Checks that run before any rank builds a model: every mistake that would otherwise surface minutes later
(or, for ``data.val``, after the whole run) as one traceback per rank.

``problems(cfg, ds_config_path, resume, ds_overrides)`` returns one line per problem, each naming the setting at fault;
the launcher prints them on rank 0 and every rank exits non-zero. The checks only read the file system,
never a shard's content, so they cost milliseconds also for patterns of 100,000 shards.
"""

from __future__ import annotations

from pathlib import Path

import braceexpand

from rcml.config import ConfigError, RunConfig

# ``--resume`` values: ``latest`` needs a checkpoint; ``auto`` takes one if there is one (job scripts that
# requeue themselves start with it); anything else is a tag or a path.
RESUME_LATEST = "latest"
RESUME_AUTO = "auto"


def is_local(url: str) -> bool:
    """Shards read through a pipe or a URL scheme are checked by the loader when it opens them."""
    from rcml.shard_manifest import local_path

    return local_path(url) is not None


def missing_shards(key: str, pattern: str) -> str | None:
    """One line when local shards of a ``::``-joined pattern do not exist or do not match the manifest of
    their directory (``rcml.shard_manifest``), else None."""
    from rcml.shard_manifest import check_manifest

    for source in pattern.split("::"):
        urls = [u for u in braceexpand.braceexpand(source.strip()) if is_local(u)]
        missing = [u for u in urls if not Path(u.removeprefix("file:")).is_file()]
        if missing and len(missing) == len(urls):
            return f"{key}: no shard of {source!r} exists (first: {missing[0]})"
        if missing:
            return f"{key}: {len(missing)} of {len(urls)} shards of {source!r} do not exist (first: {missing[0]})"
        try:
            check_manifest(urls)
        except ValueError as err:
            return f"{key}: {err}"
    return None


def resume_problem(ckpt_dir: Path, resume: str) -> str | None:
    from rcml.train import checkpoint

    try:
        found = checkpoint.resolve(ckpt_dir, RESUME_LATEST if resume == RESUME_AUTO else resume)
    except (RuntimeError, OSError, ValueError) as err:
        return str(err)
    if found is None and resume == RESUME_LATEST:
        return (f"--resume latest: no complete checkpoint in {ckpt_dir} (is train.out_dir right?); start without "
                f"--resume, or use --resume auto to continue a checkpoint only if there is one")
    return None


def problems(cfg: RunConfig, ds_config_path: str | None, resume: str | None,
             ds_overrides: list[str] | None = None) -> list[str]:
    from rcml.train import run_dir
    from rcml.train.ds_config import load_ds_config
    from rcml.train.trainer import find_tokenizer

    found: list[str] = []
    if not ds_config_path:
        found.append("--ds_config: missing (e.g. --ds_config configs/zero3.json)")
    else:
        try:
            load_ds_config(ds_config_path, cfg, world_size=1, overrides=ds_overrides)
        except ConfigError as err:
            found.append(str(err))
    for key, pattern in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        line = missing_shards(key, pattern) if pattern else None
        if line:
            found.append(line)
    if cfg.data.train or cfg.data.tokenizer:
        try:
            find_tokenizer(cfg)
        except FileNotFoundError as err:
            found.append(str(err))
    out_dir = Path(cfg.train.out_dir)
    if resume:
        line = resume_problem(out_dir / "checkpoints", resume)
        if line:
            found.append(line)
    else:
        try:
            run_dir.check_fresh_start(out_dir, resume, cfg.train.overwrite)
        except RuntimeError as err:
            found.append(str(err))
    return found
