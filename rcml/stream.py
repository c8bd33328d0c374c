"""One logical worker's stream, shard URLs -> grouped rows, with a state that a checkpoint can hold.

    per source: ShardReader  (this worker's shard order or draws, the shard being read, the byte offset
                              of its next sample) -> light decode (rcml.decode)
                -> SampleShuffle (data.sample_shuffle > 0)
    Mix (seeded weighted interleave of the sources)
    -> RelationGroupingSampler (rcml.sampler): P groups x K rows

``WorkerStream.state(index)``, taken after each batch, is everything the rest of the stream depends on:
the reader positions, every RNG state, and the items held in the shuffle and grouping buffers, these as
references ``(source, shard, byte offset of the sample's first tar header, crc32 of its key)`` in int64
arrays. A ``WorkerStream`` built from such a state re-reads the referenced items by seeking into their
shards and continues exactly where the saved one stood: the cost is one buffer of samples, whatever
the position in the epoch. Only local uncompressed tars can be seeked into; the state of a stream that
reads anything else says why (``{"index", "replay": reason}``) and the loader replays instead
(``rcml.data``).

Each stage gives exactly what the WebDataset stages it replaces gave: ``wds.SimpleShardList``'s seeded
permutation, ``wds.ResampledShards``' draws (``wds.utils.make_seed``), ``wds.shuffle``'s buffer. A
generator pipeline cannot be checkpointed; these are iterators whose state is in plain attributes.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterator

import numpy as np
from webdataset.utils import make_seed

from rcml.config import DataConfig
from rcml.decode import Item, SkipCounter, is_local, iter_tar_positions, parse_sample
from rcml.sampler import RelationGroupingSampler, Row
from rcml.seeding import stream_seed

REF_FIELDS = ("source", "shard", "offset", "key_crc32")  # the columns of an item reference [n, 4]


@dataclass
class StreamPlan:
    """Everything that defines the streams of one rank (picklable: it travels to the workers)."""

    cfg: DataConfig
    sources: list[tuple[list[str], float]]  # per source: (shard urls, weight)
    mode: str
    rank: int
    world_size: int
    seed: int
    epoch: int
    train: bool
    cond_candidates: int = 0  # > 0: build the conditioned term's rows (rcml/conditioned.py)

    def unseekable(self) -> str | None:
        """Why a worker's state cannot be restored by seeking, for shard URLs that are not local files."""
        url = next((u for urls, _ in self.sources for u in urls if not is_local(u)), None)
        return None if url is None else f"shard {url} is not a local file, a reader cannot seek into it"


def rng_array(rng: random.Random) -> np.ndarray:
    """``random.Random`` state as int64 [625] (the MT19937 words and position)."""
    version, words, gauss = rng.getstate()
    assert version == 3 and gauss is None, "the streams draw no gauss(): its cached value is not saved"
    return np.array(words, dtype=np.int64)


def set_rng(rng: random.Random, words) -> None:
    rng.setstate((3, tuple(int(w) for w in words), None))


def item_refs(items: list[Item]) -> np.ndarray:
    """int64 [n, 4] references (``REF_FIELDS``) of items read by a ``ShardReader``."""
    return np.fromiter(chain.from_iterable(item.ref for item in items), np.int64, 4 * len(items)).reshape(-1, 4)


# ------------------------------------------------------------------------------------------ stages
class ShardReader:
    """Light-stage items of one source for one logical worker, with a cursor between any two items.

    Epoch mode: ``order`` (indexes into ``urls``) lists this worker's shards, each read once. Resampled
    mode: ``draw`` picks every next shard with replacement, as ``wds.ResampledShards`` does. The cursor:
    ``begun`` shards started, ``shard`` the index in ``urls`` of the one being read (-1 between shards),
    ``offset`` the byte offset in it of the next sample.
    """

    def __init__(self, source: int, urls: list[str], counter: SkipCounter, max_pixels: int, *,
                 order: list[int] | None = None, draw: random.Random | None = None) -> None:
        self.source, self.urls, self.counter, self.max_pixels = source, urls, counter, max_pixels
        self.order, self.draw = order, draw
        self.begun, self.shard, self.offset = 0, -1, 0
        self.unseekable: str | None = None  # set once an item came from a shard that cannot be seeked into
        self._samples: Iterator | None = None

    def __iter__(self) -> "ShardReader":
        return self

    def __next__(self) -> Item:
        while True:
            if self.shard < 0:
                self._begin_shard()
            if self._samples is None:
                self._samples = iter_tar_positions(self.urls[self.shard], self.counter, self.offset)
            for sample, offset, following in self._samples:
                item = parse_sample(sample, self.counter, self.max_pixels)
                if item is None:
                    continue
                if offset < 0 and self.unseekable is None:
                    self.unseekable = f"shard {self.urls[self.shard]} is compressed or has a global pax header"
                item.ref = (self.source, self.shard, offset, zlib.crc32(item.key.encode()))
                if following is None:  # its last sample: nothing is read after it in this shard
                    self._end_shard()
                else:
                    self.offset = following
                return item
            self._end_shard()

    def _begin_shard(self) -> None:
        if self.order is None:
            self.shard = self.draw.randint(0, len(self.urls) - 1)
        elif self.begun < len(self.order):
            self.shard = self.order[self.begun]
        else:
            raise StopIteration
        self.begun += 1
        self.offset = 0

    def _end_shard(self) -> None:
        if self._samples is not None:
            self._samples.close()
        self._samples, self.shard, self.offset = None, -1, 0


class SampleShuffle:
    """``wds.shuffle(bufsize, initial, rng=rng)`` as an iterator whose buffer and RNG can be saved: the same
    items in the same order (the buffer fills two items per step until full, then yields a random one)."""

    def __init__(self, source: Iterator, bufsize: int, initial: int, rng: random.Random) -> None:
        self.source, self.bufsize, self.initial, self.rng = source, bufsize, min(initial, bufsize), rng
        self.buffer: list[Any] = []

    def __iter__(self) -> "SampleShuffle":
        return self

    def __next__(self) -> Any:
        for sample in self.source:
            self.buffer.append(sample)
            if len(self.buffer) < self.bufsize:
                try:
                    self.buffer.append(next(self.source))
                except StopIteration:
                    pass
            if len(self.buffer) >= self.initial:
                return self._pick()
        if self.buffer:
            return self._pick()
        raise StopIteration

    def _pick(self) -> Any:
        k = self.rng.randint(0, len(self.buffer) - 1)
        sample = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return sample


class Mix:
    """Seeded weighted interleave until every source is exhausted (``wds.RandomMix`` uses the global RNG).
    ``active``: the sources not yet exhausted, in order."""

    def __init__(self, streams: list[Iterator], weights: list[float], rng: random.Random) -> None:
        self.streams, self.weights, self.rng = list(streams), list(weights), rng
        self.active = list(range(len(self.streams)))

    def __iter__(self) -> "Mix":
        return self

    def __next__(self) -> Any:
        while self.active:
            weights = [self.weights[s] for s in self.active]
            i = self.rng.choices(range(len(self.active)), weights)[0] if len(self.active) > 1 else 0
            try:
                return next(self.streams[self.active[i]])
            except StopIteration:
                del self.active[i]
        raise StopIteration


# ----------------------------------------------------------------------------------- worker stream
class WorkerStream:
    """Batches of rows of logical worker ``worker`` of ``plan``'s rank, a pure function of (seed, epoch,
    rank, worker); from the epoch's start, or from ``state`` (a ``state()`` taken after batch i: it goes
    on with batch i + 1). ``index``: the index of the first batch it yields."""

    def __init__(self, plan: StreamPlan, worker: int, num_workers: int, counter: SkipCounter,
                 state: dict[str, Any] | None = None) -> None:
        cfg = plan.cfg
        self.plan, self.identity = plan, (plan.seed, plan.epoch, plan.rank, worker)
        self.unseekable = plan.unseekable()  # non-local shards: no state can be restored
        self.readers: list[ShardReader] = []
        self.shuffles: list[SampleShuffle | None] = []
        for s, (urls, _) in enumerate(plan.sources):
            seed = stream_seed("shards", plan.seed, plan.epoch, s)
            if cfg.resampled:  # as wds.ResampledShards(urls, seed, worker_seed=reader, deterministic=True)
                draw = random.Random(make_seed(plan.rank * num_workers + worker, 0, seed))
                reader = ShardReader(s, urls, counter, cfg.max_image_pixels, draw=draw)
            else:  # as wds.SimpleShardList(urls, seed): a full seeded permutation, then split
                order = list(range(len(urls)))
                if plan.train and cfg.shard_shuffle > 0:
                    random.Random(seed).shuffle(order)
                order = order[plan.rank::plan.world_size][worker::num_workers]
                reader = ShardReader(s, urls, counter, cfg.max_image_pixels, order=order)
            shuffle = None
            if plan.train and cfg.sample_shuffle > 0:
                rng = random.Random(stream_seed("samples", *self.identity, s))
                shuffle = SampleShuffle(reader, cfg.sample_shuffle, min(cfg.sample_shuffle, 100), rng)
            self.readers.append(reader)
            self.shuffles.append(shuffle)
        stages = [shuffle or reader for reader, shuffle in zip(self.readers, self.shuffles)]
        self.mix = Mix(stages, [w for _, w in plan.sources], random.Random(stream_seed("mix", *self.identity)))
        self.sampler = RelationGroupingSampler(
            cfg.groups_per_batch, cfg.members_per_group, cfg.min_group, cfg.buffer_size, cfg.type_weights,
            hard=cfg.hard_batches and plan.train, type_quotas=cfg.type_quotas, seed=plan.seed, epoch=plan.epoch,
            rank=plan.rank, worker=worker)
        self.index, self._sampler_state = 0, None
        if state is not None:
            self._sampler_state = self._restore(state)
            self.index = int(state["index"]) + 1

    def __iter__(self) -> Iterator[list[Row]]:
        return self.sampler(self.mix, self._sampler_state)

    def state(self, index: int) -> dict[str, Any]:
        """The state after this stream's batch ``index``: numpy arrays, ints, strings (see the module doc)."""
        reason = self.unseekable or next((r.unseekable for r in self.readers if r.unseekable), None)
        if reason is not None:
            return {"index": index, "replay": reason}
        sampler = self.sampler.state()
        return {
            "stream": self.identity,
            "index": index,
            "readers": np.array([(r.begun, r.shard, r.offset) for r in self.readers], dtype=np.int64),  # [S, 3]
            "draws": [None if r.draw is None else rng_array(r.draw) for r in self.readers],
            "shuffles": [None if sh is None else {"items": item_refs(sh.buffer), "rng": rng_array(sh.rng)}
                         for sh in self.shuffles],
            "mix": {"active": np.array(self.mix.active, dtype=np.int64), "rng": rng_array(self.mix.rng)},
            "sampler": {"items": item_refs(sampler["items"]),                                   # [n, 4]
                        "ready": {t: np.array(v, dtype=np.int64).reshape(-1, 2) for t, v in sampler["ready"].items()},
                        "group_types": sampler["group_types"], "rng": np.array(sampler["rng"][1], dtype=np.int64),
                        "stats": sampler["stats"]},
        }

    def _restore(self, state: dict[str, Any]) -> dict[str, Any]:
        """Set readers, shuffles and mix from ``state``; returns the sampler's state with its items re-read."""
        if "replay" in state:
            raise ValueError(f"this worker state cannot be restored ({state['replay']}); the loader replays instead")
        if tuple(int(x) for x in state["stream"]) != self.identity:
            raise ValueError(f"a worker state of stream (seed, epoch, rank, worker) = {tuple(state['stream'])} "
                             f"cannot continue stream {self.identity}")
        for reader, row, draw in zip(self.readers, np.asarray(state["readers"]).tolist(), state["draws"]):
            reader.begun, reader.shard, reader.offset = row
            if draw is not None:
                set_rng(reader.draw, draw)
        for shuffle, saved in zip(self.shuffles, state["shuffles"]):
            if shuffle is not None:
                shuffle.buffer = self._reread(saved["items"])
                set_rng(shuffle.rng, saved["rng"])
        self.mix.active = [int(s) for s in state["mix"]["active"]]
        set_rng(self.mix.rng, state["mix"]["rng"])
        saved = state["sampler"]
        return {"items": self._reread(saved["items"]),
                "ready": {t: np.asarray(v).tolist() for t, v in saved["ready"].items()},
                "group_types": [(int(p), int(r), str(t)) for p, r, t in saved["group_types"]],
                "rng": (3, tuple(int(w) for w in saved["rng"]), None),
                "stats": {k: int(v) for k, v in saved["stats"].items()}}

    def _reread(self, refs) -> list[Item]:
        """The items ``refs`` ([n, 4], ``REF_FIELDS``) name, each read by seeking to it in its shard."""
        counter = SkipCounter(warn_ignored=False)  # they were counted when first read
        items = []
        for source, shard, offset, crc in np.asarray(refs).tolist():
            url = self.plan.sources[source][0][shard]
            samples = iter_tar_positions(url, counter, offset)
            try:
                found = next(samples, None)
            finally:
                samples.close()
            item = None if found is None else parse_sample(found[0], counter, self.plan.cfg.max_image_pixels)
            if item is None or zlib.crc32(item.key.encode()) != crc:
                problem = (f"holds sample {item.key!r}, not the saved one" if item is not None else
                           f"cannot be read ({'; '.join(e for ex in counter.examples.values() for e in ex)})")
                raise RuntimeError(
                    f"resuming the data stream: byte {offset} of shard {url} {problem}. The shard changed "
                    "since the checkpoint was saved; restore the shards it was trained on to resume exactly.")
            item.ref = (source, shard, offset, crc)
            items.append(item)
        return items
