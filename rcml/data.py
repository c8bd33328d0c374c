"""Shard URLs -> light-stage stream -> relation-grouped ``Batch``es, with an exactly resumable position.

One logical DataLoader worker runs this pipeline (``rcml.stream.WorkerStream``)::

    sources "a::b" (brace-expanded, weights "3::1")
      per source: shard list (epoch: seeded permutation, split by rank then by worker | resampled: draws)
                  -> safe tar read + light decode (rcml.decode) -> optional sample shuffle
      seeded weighted mix of the sources
      -> RelationGroupingSampler (rcml.sampler): P groups x K rows
      -> heavy stage: pixel decode + crop/resize (uint8; the model normalizes on its device),
                      tokenization, collate -> Batch

The stream of a logical worker is a pure function of (seed, epoch, rank, worker). A DataLoader with W
workers yields their batches round-robin (round r: worker 0, 1, ..., W-1, skipping workers that have
run dry). Every ``Batch`` carries ``reader_state``, its worker's stream state just after it; the trainer
keeps the one of the last batch it consumed from each worker (``rcml.data_state.LoaderPosition``). To
resume, physical worker p plays the logical worker whose turn is p-th from the saved next one, rebuilt
from its state (the buffered samples re-read by seeking into their shards), and continues it: the
cost does not depend on how far the epoch got. Where a state cannot be restored (shards that are not
local uncompressed tars), every physical worker replays the light stage and the grouping of all W
logical streams until the consumed batches are accounted for (``_replay``).

Why the shard split is done here and not with ``wds.split_by_node``/``split_by_worker``: those read the
rank and the *physical* worker id from the environment; exact resume needs the *logical* worker.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import sys
from typing import Any, Iterator

import braceexpand
import numpy as np
import torch

from rcml.batch import Batch, batch_stats, clip_mode_text, group_id, item_identity, member_group_ids
from rcml.conditioned import conditioned_rows
from rcml.config import MODES, DataConfig
from rcml.data_state import LoaderPosition
from rcml.decode import SkipCounter, iter_items, load_image
from rcml.preprocess import ImageTransform, channels_first
from rcml.sampler import Row
from rcml.seeding import stream_seed
from rcml.shard_manifest import check_manifest, resolve_pattern
from rcml.stream import StreamPlan, WorkerStream

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- sources
def parse_sources(urls: str, weights: str = "") -> list[tuple[list[str], float]]:
    """``"a-{0..9}.tar::b-{0..3}.tar"`` + ``"3::1"`` -> [(shard urls, weight), ...]."""
    patterns = [p.strip() for p in urls.split("::")]
    if not all(patterns):
        raise ValueError(f"data.train: empty source in {urls!r} (sources are joined with '::')")
    ws = [1.0] * len(patterns)
    if weights:
        parts = weights.split("::")
        if len(parts) != len(patterns):
            raise ValueError(f"data.weights {weights!r} has {len(parts)} weights for {len(patterns)} sources")
        try:
            ws = [float(w) for w in parts]
        except ValueError:
            raise ValueError(f"data.weights {weights!r}: weights must be numbers, e.g. '3::1'") from None
        if any(not w > 0 for w in ws):
            raise ValueError(f"data.weights {weights!r}: weights must be > 0")
    return [(list(braceexpand.braceexpand(p)), w) for p, w in zip(patterns, ws)]


def iter_samples(urls: str, *, strict: bool = False, counter: SkipCounter | None = None,
                 max_image_pixels: int = DataConfig.max_image_pixels) -> Iterator[dict[str, Any]]:
    """Sequential, safe, fully decoded read of shards (no shuffle, no split): for evaluation and tools.

    ``urls``: brace patterns joined by ``::``, each also a shard directory or its manifest.json
    (``rcml.shard_manifest.resolve_pattern``; a local pattern that matches no file raises ValueError).
    Yields ``{"key", "image" (PIL RGB), "caption", "relations" ([{"group", "type", "text"}]), "url"}``.
    """
    counter = counter if counter is not None else SkipCounter(strict=strict)
    for shard_urls, _ in parse_sources(resolve_pattern(urls)):
        for url in shard_urls:
            for item in iter_items(url, counter, max_image_pixels):
                try:
                    image = load_image(item, max_image_pixels)
                except ValueError as exn:
                    counter.skip(exn.args[0], item.url, item.key, exn.args[1])
                    continue
                yield {"key": item.key, "image": image, "caption": item.caption, "relations": item.relations,
                       "url": item.url}


# ---------------------------------------------------------------------------------------- pipeline
def _raw_batches(plan: StreamPlan, worker: int, num_workers: int, state: dict[str, Any] | None = None
                 ) -> Iterator[tuple[int, list[Row], dict[str, int], dict[str, Any]]]:
    """(index, rows, samples skipped since the previous batch, the stream's state after this batch) of
    one logical worker, from the epoch's start or from a ``reader_state`` (then from the batch after it).

    Skips after the last batch are added to the last batch (one batch of lookahead), so none is lost.
    """
    counter = SkipCounter(strict=plan.cfg.strict)
    stream = WorkerStream(plan, worker, num_workers, counter, state)
    index, pending, mark = stream.index, None, {}
    for rows in stream:
        if pending is not None:
            yield pending
        pending, mark = (index, rows, counter.since(mark), stream.state(index)), counter.snapshot()
        index += 1
    if pending is not None:
        index, rows, skipped, after = pending
        yield index, rows, _merge(skipped, counter.since(mark)), after
    elif counter.counts and state is None:  # (a resumed stream past its last batch re-reads the trailing skips)
        log.warning("rank %d worker %d: no batch in epoch %d, %d sample(s) skipped: %s", plan.rank, worker,
                    plan.epoch, counter.total, counter.counts)


def _replay(plan: StreamPlan, num_workers: int, start_batch: int):
    """The fallback resume: replay the W logical streams in DataLoader order up to ``start_batch``.

    Returns (logical worker whose batch comes next, the streams), or None when the epoch ended before
    ``start_batch``.
    """
    streams = [_raw_batches(plan, w, num_workers) for w in range(num_workers)]
    active, produced, last = [True] * num_workers, 0, num_workers - 1
    while produced < start_batch and any(active):
        for w in range(num_workers):
            if produced == start_batch:
                break
            if active[w]:
                if next(streams[w], None) is None:
                    active[w] = False
                else:
                    produced, last = produced + 1, w
    if produced < start_batch:
        return None
    return (last + 1) % num_workers, streams


class GroupedStream(torch.utils.data.IterableDataset):
    """The IterableDataset behind ``build_loader``: yields ``Batch``es (batching happens inside)."""

    def __init__(self, plan: StreamPlan, tokenizer, num_workers: int, resume: LoaderPosition | None = None) -> None:
        super().__init__()
        self.plan, self.tokenizer, self.num_workers, self.resume = plan, tokenizer, num_workers, resume
        self.transform = ImageTransform(plan.cfg.image_size, plan.train)
        self._relation_cache: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def encode_relations(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Relation texts repeat across batches (one text per group and template): encode each once.
        -> (ids [R, L], mask [R, L], whether each text was truncated to the context length)."""
        cache, L = self._relation_cache, self.plan.cfg.context_length
        missing = [t for t in texts if t not in cache]
        if missing:
            if len(cache) + len(missing) > 100_000:  # bounded: real datasets can have many distinct texts
                cache.clear()
            ids, mask, cut = self.tokenizer.encode_counting(missing, L)
            cache.update(zip(missing, zip(ids, mask, cut.tolist())))
        rows = [cache[t] for t in texts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), [r[2] for r in rows]

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical, num = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            # A worker process inherits the parent's whole heap. Freezing it keeps the cyclic GC from
            # re-scanning those objects on every full collection, which the grouping buffer's churn
            # triggers often (measured: ~10% of the worker's CPU time). Only in our own worker process.
            gc.freeze()
        if num != self.num_workers:
            raise RuntimeError(f"GroupedStream planned for {self.num_workers} workers runs under {num}")
        resume = self.resume
        if resume is None:
            worker, raw = physical, _raw_batches(self.plan, physical, num)
        elif resume.replay_reason() is None:  # each logical worker continues from its saved state
            worker = (resume.next_worker + physical) % num
            raw = _raw_batches(self.plan, worker, num, resume.cursors[worker])
        else:
            replayed = _replay(self.plan, num, resume.batches)
            if replayed is None:
                return
            first, streams = replayed
            worker = (first + physical) % num
            raw = streams[worker]
            for w, s in enumerate(streams):
                if w != worker:
                    s.close()
        carry: dict[str, int] = {}
        for index, rows, skipped, state in raw:
            skipped = _merge(carry, skipped)
            batch = self.collate(rows, skipped, worker, index, state)
            if batch is None:  # every image of the batch failed to decode: report with the next batch
                carry = skipped
                continue
            carry = {}
            yield batch if info is None else _Wire(batch)
        if carry:
            log.warning("rank %d worker %d: the last batch of epoch %d had no decodable image; skipped: %s",
                        self.plan.rank, worker, self.plan.epoch, carry)

    def collate(self, rows: list[Row], skipped: dict[str, int], worker: int, index: int,
                reader_state: dict[str, Any] | None = None) -> Batch | None:
        """Heavy stage: decode + transform images, tokenize, build the Batch (None if no row is left).

        A row whose image fails here (a valid header over corrupt pixel data) is dropped and counted in
        ``skipped``, which is updated in place and becomes the batch's ``skipped``.
        """
        plan, cfg = self.plan, self.plan.cfg
        rng = random.Random(stream_seed("pixels", plan.seed, plan.epoch, plan.rank, worker, index))
        pixels, kept = [], []
        for row in rows:
            try:
                image = load_image(row.item, cfg.max_image_pixels)
            except ValueError as exn:
                if cfg.strict:  # raises BadSampleError naming shard and key
                    SkipCounter(strict=True).skip(exn.args[0], row.item.url, row.item.key, exn.args[1])
                skipped[exn.args[0]] = skipped.get(exn.args[0], 0) + 1
                continue
            pixels.append(self.transform.pixels(image, rng))
            kept.append(row)
        if not kept:
            return None
        rel_index: dict[str, int] = {}
        row_relation = [rel_index.setdefault(row.text, len(rel_index)) for row in kept]
        if plan.mode == "clip":
            texts = [clip_mode_text(row.item.caption, row.text) for row in kept]
        else:
            texts = [row.item.caption for row in kept]
        L = cfg.context_length
        text_ids, text_mask, text_cut = self.tokenizer.encode_counting(texts, L)  # [I, L]
        relation_ids, relation_mask, relation_cut = self.encode_relations(list(rel_index))  # [R, L]
        check_tokens(self.tokenizer, text_ids, text_mask, [row.item.key for row in kept], "caption")
        check_tokens(self.tokenizer, relation_ids, relation_mask, list(rel_index), "relation text")
        # what the context length cut: the texts the model reads (clip mode: caption + relation) and, of
        # those, the rows whose relation wording itself lost tokens (clip: it comes last, so it is cut first)
        if plan.mode == "clip":
            caption_len = self.tokenizer.encode_counting([row.item.caption for row in kept], L)[2]
            relation_lost = int(text_cut.sum())
            truncation = {"truncated_texts": int(text_cut.sum()), "truncated_relation_rows": relation_lost,
                          "truncated_captions": int(caption_len.sum())}
        else:
            truncation = {"truncated_texts": int(text_cut.sum()),
                          "truncated_relation_rows": sum(relation_cut[r] for r in row_relation),
                          "truncated_captions": int(text_cut.sum())}
        n = len(kept)
        row_groups = [row.group for row in kept]
        item_groups = [{rel["group"] for rel in row.item.relations} | {row.group} for row in kept]
        cond = {}
        if plan.cond_candidates > 0:
            rows_c = conditioned_rows(row_groups, row_relation, item_groups, plan.cond_candidates)
            cond = {name: torch.tensor(values, dtype=dtype) for name, values, dtype in
                    zip(("cond_item", "cond_relation", "cond_slice", "cond_member"), rows_c,
                        (torch.long, torch.long, torch.long, torch.bool))}
        return Batch(
            images=channels_first(torch.from_numpy(np.stack(pixels))),         # uint8 [I, 3, S, S]
            text_ids=text_ids, text_mask=text_mask, relation_ids=relation_ids, relation_mask=relation_mask,
            row_item=torch.arange(n), row_relation=torch.tensor(row_relation, dtype=torch.long),
            group_ids=torch.tensor([group_id(g) for g in row_groups], dtype=torch.int64),
            member_groups=member_group_ids(row_groups, item_groups),
            item_ids=torch.tensor([item_identity(row.item.url, row.item.key) for row in kept], dtype=torch.int64),
            keys=[row.item.key for row in kept], relation_types=[row.type for row in kept],
            skipped=skipped, worker=worker, index=index, reader_state=reader_state,
            stats=batch_stats(row_groups, [row.type for row in kept], item_groups) | truncation, **cond)


def check_tokens(tokenizer, ids: torch.Tensor, mask: torch.Tensor, names: list[str], what: str) -> None:
    """What the model assumes of token rows [n, L], checked where they are made (on the CPU of a loader
    worker) rather than on the device in every step: ids inside the vocabulary, and an eos in every row,
    inside its mask (the text tower pools there). ``names``: row -> sample key or text, for the message."""
    bad_id = (ids < 0) | (ids >= tokenizer.vocab_size)
    no_eos = ~((ids == tokenizer.eos_id) & mask).any(1)
    bad = (bad_id.any(1) | no_eos).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the tokenizer made {what} rows the model cannot read (an id outside the vocabulary of "
                         f"{tokenizer.vocab_size}, or no eos id {tokenizer.eos_id} inside the mask): "
                         f"{[names[i] for i in bad[:5]]}; check data.tokenizer")


class _Wire:
    """How a Batch leaves a DataLoader worker: unpickled in the main process as the Batch itself.

    torch sends every tensor through its own shared-memory segment (~0.1 ms per tensor on each side);
    the pixels go that way (uint8: a quarter of the bytes of float pixels), the small index and token
    tensors are pickled by value as numpy arrays.
    """

    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __reduce__(self):
        fields = {k: v.numpy() if isinstance(v, torch.Tensor) and k != "images" else v
                  for k, v in vars(self.batch).items()}
        return _from_wire, (fields,)


def _from_wire(fields: dict[str, Any]) -> Batch:
    return Batch(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()})


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(a.keys() | b.keys())}


LINUX = sys.platform.startswith("linux")


class DieWithRank:
    """``worker_init_fn``: the kernel SIGKILLs a DataLoader worker when its rank dies (Linux ``prctl``).

    A rank killed by SIGKILL cannot stop its workers. torch's own parent check (every 5 s) ends a worker's
    loop, but the worker then waits for its results to be written to the dead rank's pipe (or for that
    pipe's lock): once the pipe is full it never exits and lives on, reparented to init. The death signal
    is tied to the thread that started the worker (the rank's main thread, which iterates the loader).
    Elsewhere than Linux the workers rely on torch's parent check alone.
    """

    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

    def __init__(self) -> None:
        self.rank_pid = os.getpid()  # picklable state: also right for spawned or forkserver workers

    def __call__(self, worker_id: int) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(self.PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"DataLoader worker {worker_id}: prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != self.rank_pid:  # the rank died between starting the worker and the prctl
            os._exit(1)


def build_loader(cfg: DataConfig, tokenizer, *, mode: str, rank: int, world_size: int, seed: int, epoch: int = 0,
                 position: LoaderPosition | None = None, urls: str | None = None, train: bool = True,
                 cond_candidates: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader of ``Batch``es for one rank (``batch_size=None``: batches are formed by the sampler).

    ``position``: a ``LoaderPosition`` that consumed the first n batches of an identical loader (same
    arguments); this loader then yields exactly its batches n, n+1, ... ``urls`` overrides ``cfg.train``;
    ``train=False`` disables shuffles and random crops. ``cond_candidates > 0`` adds the conditioned
    term's rows to every batch (``loss.cond_candidates``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {'|'.join(MODES)}, got {mode!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    pattern = urls if urls is not None else cfg.train
    if not pattern:
        raise ValueError("no shards: set data.train (e.g. 'data/train/shard-{000000..000009}.tar')")
    sources = parse_sources(pattern, cfg.weights if urls is None else "")
    check_manifest(url for shard_urls, _ in sources for url in shard_urls)  # before any reader starts
    workers = max(cfg.workers, 1)
    if not cfg.resampled:
        for s, (shard_urls, _) in enumerate(sources):
            if world_size * workers > len(shard_urls):
                raise ValueError(
                    f"source {s} ({pattern.split('::')[s]}) has {len(shard_urls)} shard(s) but world_size "
                    f"{world_size} x data.workers {workers} = {world_size * workers} readers each need at least "
                    "one: lower data.workers, write smaller shards (data_prep.build_shards --shard-size), "
                    "or set data.resampled=true")
    plan = StreamPlan(cfg=cfg, sources=sources, mode=mode, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                      train=train, cond_candidates=cond_candidates)
    resume = None
    if position is not None and position.batches > 0:
        position.check(cfg, pattern)  # the cursors continue streams these settings define
        resume = position.copy()      # the trainer goes on updating its own
        reason = resume.replay_reason()
        if reason is None:
            log.info("rank %d: the loader resumes epoch %d at batch %d from its %d workers' saved reader states",
                     rank, epoch, resume.batches, workers)
        else:
            log.info("rank %d: the loader resumes epoch %d at batch %d by replaying the epoch so far: %s", rank,
                     epoch, resume.batches, reason)
    dataset = GroupedStream(plan, tokenizer, workers, resume)
    # Not persistent_workers: the trainer builds one DataLoader per epoch (the epoch and the resume position
    # are its dataset's arguments), and workers kept alive would iterate their start-up copy of the dataset
    # again, with the old epoch's shard order and resume state.
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.workers,
                                       pin_memory=torch.cuda.is_available(),
                                       prefetch_factor=4 if cfg.workers > 0 else None,
                                       persistent_workers=False,
                                       worker_init_fn=DieWithRank() if cfg.workers > 0 and LINUX else None)

