"""Seeds of the data streams: a pure function of (seed, epoch, rank, worker, ...), so that every stream
(shard order, sample shuffle, source mix, sampler, crops) can be rebuilt exactly on resume."""

from __future__ import annotations

import hashlib
from typing import Any


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from (seed, epoch, rank, worker, ...): stable across processes and platforms."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
