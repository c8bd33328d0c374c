"""Where a rank's loader stands in its epoch: what the trainer checkpoints to resume the data exactly.

The main process only sees batches. Each ``Batch`` carries ``reader_state``, the full state of its
logical worker's stream just after producing it (``rcml.stream.WorkerStream.state``: reader positions,
RNG states, the shuffle and grouping buffers as references into the shards). ``LoaderPosition`` keeps,
per logical worker, the state of the last batch of that worker consumed, and which worker comes next
in the DataLoader's round robin; ``rcml.data.build_loader(position=...)`` continues from it::

    position = LoaderPosition.start(cfg.data)        # at the start of every epoch
    for batch in build_loader(cfg.data, ..., position=resumed_or_None):
        position.consumed(batch)                      # as each batch is used
    rank_state["data_position"] = position.state_dict()   # tensors, ints, strings: weights_only loadable

A worker whose state cannot be restored (``{"replay": reason}``: shards that are not local uncompressed
tars, or a checkpoint saved before reader states existed) makes the loader replay the epoch's first
``batches`` batches instead. The logical worker count and the other settings that define the streams
(``STREAM_FIELDS``) are recorded, and a resume under other values is refused: the saved states continue
streams that those values define.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rcml.config import DataConfig

# DataConfig fields that define a logical worker's stream, hence what its saved state continues
STREAM_FIELDS = ("train", "weights", "resampled", "shard_shuffle", "sample_shuffle", "workers", "groups_per_batch",
                 "members_per_group", "min_group", "buffer_size", "type_weights", "type_quotas", "hard_batches",
                 "max_image_pixels")
NO_READER_STATES = "the checkpoint holds no reader states (it was saved before they were recorded)"


def stream_settings(cfg: DataConfig) -> dict[str, Any]:
    settings = {name: getattr(cfg, name) for name in STREAM_FIELDS}
    settings["workers"] = max(cfg.workers, 1)                     # logical workers (0: one, in the main process)
    settings["shard_shuffle"] = bool(cfg.shard_shuffle)           # any positive value is a full permutation
    return settings


@dataclass
class LoaderPosition:
    stream: dict[str, Any]              # stream_settings() of the loader
    batches: int = 0                    # batches consumed in this epoch
    next_worker: int = 0                # logical worker whose batch comes next
    cursors: list[dict[str, Any] | None] = field(default_factory=list)  # per logical worker; None: not started

    @classmethod
    def start(cls, cfg: DataConfig) -> "LoaderPosition":
        """The position at the start of an epoch."""
        settings = stream_settings(cfg)
        return cls(settings, cursors=[None] * settings["workers"])

    @property
    def workers(self) -> int:
        return self.stream["workers"]

    def consumed(self, batch) -> None:
        """Record ``batch`` (a ``rcml.batch.Batch`` from the loader) as used."""
        if batch.reader_state is None:
            raise ValueError("the batch carries no reader_state: only batches of rcml.data.build_loader can be "
                             "recorded")
        self.cursors[batch.worker] = batch.reader_state
        self.next_worker = (batch.worker + 1) % self.workers
        self.batches += 1

    def copy(self) -> "LoaderPosition":
        return LoaderPosition(dict(self.stream), self.batches, self.next_worker, list(self.cursors))

    def replay_reason(self) -> str | None:
        """Why the loader must replay instead of restoring the workers' states, or None."""
        return next((c["replay"] for c in self.cursors if c is not None and "replay" in c), None)

    def check(self, cfg: DataConfig, pattern: str | None = None) -> None:
        """Refuse to continue under settings that define other streams (``pattern``: the loader's shards)."""
        now = stream_settings(cfg) | ({"train": pattern} if pattern is not None else {})
        for name in STREAM_FIELDS:
            if now[name] != self.stream.get(name):
                what = "logical workers" if name == "workers" else "the streams"
                raise ValueError(
                    f"data.{name} is {now[name]!r}, but the data position being resumed was saved with "
                    f"{self.stream.get(name)!r}: the saved reader states continue {what} that value defines. "
                    f"Resume with data.{name}={self.stream.get(name)!r}, or start a new run to change it.")

    # ---------------------------------------------------------------------------------- saving
    def state_dict(self) -> dict[str, Any]:
        """Plain ints, strings, lists, dicts and tensors: loads with ``torch.load(weights_only=True)``."""
        return {"stream": dict(self.stream), "batches": self.batches, "next_worker": self.next_worker,
                "cursors": [_convert(c, np.ndarray, torch.from_numpy) for c in self.cursors]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LoaderPosition":
        return cls(dict(state["stream"]), int(state["batches"]), int(state["next_worker"]),
                   [_convert(c, torch.Tensor, torch.Tensor.numpy) for c in state["cursors"]])

    @classmethod
    def load(cls, state: dict[str, Any] | None, cfg: DataConfig, batches: int) -> "LoaderPosition":
        """The position a checkpoint holds (``state``) after ``batches`` batches of the epoch; for a
        checkpoint saved before reader states were recorded (``state`` None), one that replays them."""
        if state is None:
            position = cls.start(cfg)
            position.batches = batches
            position.cursors = [{"replay": NO_READER_STATES} for _ in position.cursors]
            return position
        position = cls.from_state_dict(state)
        if position.batches != batches:
            raise RuntimeError(f"the checkpoint's data position counts {position.batches} batches of the epoch, "
                               f"its trainer state {batches}: the rank state file is inconsistent")
        return position


def _convert(obj: Any, kind: type, fn) -> Any:
    """``obj`` with every ``kind`` inside (dicts, lists, tuples) replaced by ``fn(it)``."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _convert(v, kind, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, kind, fn) for v in obj)
    return obj
