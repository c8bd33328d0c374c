"""The batch the loader yields and the model consumes.

A batch has *items* (distinct image/caption pairs), *relations* (distinct relation texts) and *rows*,
(item, relation) pairs. The loss is over rows; rows on any rank with equal ``group_ids`` are positives
of each other. In training each item appears in exactly one row; at evaluation one item is scored under
many relations, which is why rows index items and relations instead of copying them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

def group_id(key: str) -> int:
    """Hash a group key to a signed int64, identical on every rank, process and platform.

    Python's ``hash`` is salted per process, so it cannot be used across ranks.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def item_identity(url: str, key: str) -> int:
    """The hashed identity of one item: ``group_id("item:<shard url>::<key>")`` (no url contains ``::``)."""
    return group_id(f"item:{url}::{key}")


def clip_mode_text(caption: str, relation_text: str) -> str:
    """How the CLIP baseline sees a relation: appended to the caption (the paper's baseline input)."""
    return f"{caption} {relation_text}".strip()


def member_group_ids(row_groups: list[str], item_groups: list[set[str]]) -> torch.Tensor:
    """Batch.member_groups: int64 [B, M], row i = its own group first, then the other groups of its item in
    sorted order (sets of strings iterate in a per-process order), padded by repeating the own group."""
    rows = [[group_id(g)] + [group_id(h) for h in sorted(groups - {g})] for g, groups in zip(row_groups, item_groups)]
    width = max([len(r) for r in rows] + [1])
    return torch.tensor([r + r[:1] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), width)


def batch_stats(row_groups: list[str], row_types: list[str], item_groups: list[set[str]]) -> dict[str, int]:
    """Counts that say how hard a training batch is (row i = item i), summed over steps and ranks for logging.

    ``rows_<type>``: rows per relation type (``rows_self``: leftover singletons); ``negative_pairs``: ordered
    row pairs (i, j), i != j, drawn for different groups, i.e. the in-batch negatives of the loss;
    ``related_negative_pairs``: those whose items share some group (related under another relation: the
    negatives a relation-blind embedding cannot push away); ``member_negative_pairs``: those where j is
    in fact a member of i's group (drawn for another relation), a positive that the row-level loss counts
    as a negative.
    """
    out: dict[str, int] = {}
    for t in row_types:
        out[f"rows_{t}"] = out.get(f"rows_{t}", 0) + 1
    negatives = related = members = 0
    for i, (gi, groups_i) in enumerate(zip(row_groups, item_groups)):
        for j, (gj, groups_j) in enumerate(zip(row_groups, item_groups)):
            if i != j and gi != gj:
                negatives += 1
                related += bool(groups_i & groups_j)
                members += gi in groups_j
    return out | {"negative_pairs": negatives, "related_negative_pairs": related, "member_negative_pairs": members}


@dataclass
class Batch:
    # uint8 [I, 3, S, S] cropped and resized pixels from the loader (RCMLModel normalizes them on its device),
    # or float [I, 3, S, S] already normalized (rcml.preprocess.ImageTransform)
    images: torch.Tensor
    text_ids: torch.Tensor        # long [I, L]  (clip mode: caption + relation text, I == B)
    text_mask: torch.Tensor       # bool [I, L]  True = real token
    relation_ids: torch.Tensor    # long [R, L]
    relation_mask: torch.Tensor   # bool [R, L]
    row_item: torch.Tensor        # long [B]
    row_relation: torch.Tensor    # long [B]
    group_ids: torch.Tensor       # int64 [B]
    # every group of each row's item (hashed; the row's own group included), padded by repeating it: the
    # loss's full-membership positives. None: an item is only in the group its row was drawn for
    member_groups: torch.Tensor | None = None   # int64 [B, M]
    # rows of the conditioned contrast term (rcml/conditioned.py), None when loss.w_cond = 0
    cond_item: torch.Tensor | None = None       # long [C] item of each conditioned row
    cond_relation: torch.Tensor | None = None   # long [C] its relation (index into relation_ids)
    cond_slice: torch.Tensor | None = None      # long [C] slice (one per relation group), contiguous
    cond_member: torch.Tensor | None = None     # bool [C] the item is a member of the slice's group
    # int64 [I] hash of (shard url, key): an item's identity over sources and ranks (a key alone is unique
    # only within its dataset); loss.positives=item makes each row a positive of its own item only
    item_ids: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)            # [I] item ids
    relation_types: list[str] = field(default_factory=list)  # [B]
    skipped: dict[str, int] = field(default_factory=dict)    # skipped samples by reason since last batch
    stats: dict[str, int] = field(default_factory=dict)      # batch_stats() of a training batch
    worker: int = 0               # logical DataLoader worker that produced the batch
    index: int = 0                # that worker's batch counter
    # that worker's stream state just after this batch (rcml.stream.WorkerStream.state): what a checkpoint
    # saves per worker to resume the data exactly (rcml.data_state.LoaderPosition)
    reader_state: dict | None = None

    @property
    def num_rows(self) -> int:
        return int(self.row_item.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {}
        for name, value in vars(self).items():
            moved[name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})
