"""The conditioned contrast term: items contrasted with each other *under the same relation*.

The four terms of rcml/loss.py contrast rows (item, relation) whose relation texts almost never repeat
within a batch, so a row's relation nearly identifies its group and the loss can be lowered by encoding
*which* relation was given. This term removes that shortcut. For each relation group g of the batch
(one *slice*, conditioned on g's relation text r), a candidate set C_g of the rank's items is embedded
under r: g's members (full membership: every item whose relations include g, not only the rows drawn
for g), then the items related to a member under another relation (the confusable ones, which a
relation-blind embedding cannot push away), then the rest of the batch, up to ``budget`` items. Within
the slice, the same multi-positive InfoNCE as the other terms, anchors = the members::

    IT_g = mean_{a in M_g} [ LSE_{c in C_g} s u_a.t_c - mean_{p in M_g} s u_a.t_p ]          (TI: u <-> t)
    II_g = mean_{a in M_g, |M_g|>1} [ LSE_{c in C_g, c != a} s u_a.u_c - mean_{p in M_g, p != a} s u_a.u_p ]  (TT on t)
    L_cond = w_inter (IT + TI) / 2 + w_intra (II + TT) / 2,   each term averaged over all anchors of all slices

u_c, t_c are item c's image / text embeddings under r (unit norm), s the logit scale. Rank-local: a
slice's candidates are this rank's items (the relation and its members live on one rank; gathering
would multiply the pooled rows by the world size for negatives that are mostly unrelated anyway). The
towers still run once per item; only pooling rows grow (P slices x ``budget`` rows).
"""

from __future__ import annotations

import torch

from rcml.sampler import SELF_GROUP_PREFIX  # leftover singleton rows: no relation to contrast under

TERMS = ("it", "ti", "ii", "tt")


def conditioned_rows(row_groups: list[str], row_relation: list[int], item_groups: list[set[str]],
                     budget: int) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Which (item, relation) rows the conditioned term embeds, for a training batch where row i is item i.

    row_groups [B]: the group each row was drawn for; row_relation [B]: its relation-text index;
    item_groups [B]: every group of item i. Returns (item, relation, slice, member), each [C]: rows of a
    slice are contiguous, its members first (sorted by item), then related non-members, then the rest.
    """
    slices: dict[str, int] = {}  # group -> relation index, in first-row order
    for g, r in zip(row_groups, row_relation):
        if not g.startswith(SELF_GROUP_PREFIX):
            slices.setdefault(g, r)
    items, relations, slice_ids, members = [], [], [], []
    for s, (g, r) in enumerate(slices.items()):
        inside = [i for i, groups in enumerate(item_groups) if g in groups][:budget]
        member_set = set(inside)
        related_groups = set().union(*(item_groups[i] for i in inside)) - {g}
        related = [i for i in range(len(item_groups)) if i not in member_set and item_groups[i] & related_groups]
        rest = [i for i in range(len(item_groups)) if i not in member_set and not item_groups[i] & related_groups]
        chosen = (inside + related + rest)[:budget]
        items += chosen
        relations += [r] * len(chosen)
        slice_ids += [s] * len(chosen)
        members += [i in member_set for i in chosen]
    return items, relations, slice_ids, members


def _padded(x: torch.Tensor, slice_ids: torch.Tensor, member: torch.Tensor):
    """Rows [C, D] -> [S, W, D] padded slices, valid [S, W], member [S, W] (slices are contiguous)."""
    counts = torch.bincount(slice_ids)
    num, width = counts.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(slice_ids.numel(), device=x.device) - starts[slice_ids]   # [C] position in its slice
    out = x.new_zeros(num, width, x.shape[1])
    out[slice_ids, pos] = x
    valid = torch.zeros(num, width, dtype=torch.bool, device=x.device)
    valid[slice_ids, pos] = True
    is_member = torch.zeros_like(valid)
    is_member[slice_ids, pos] = member
    return out, valid, is_member


def _term(rows: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, member: torch.Tensor, scale: torch.Tensor,
          exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over member anchors of the slice-wise multi-positive row loss, and the anchor count."""
    logits = scale * rows @ cols.transpose(1, 2)                                 # [S, W, W]
    col_ok = valid[:, None, :].expand_as(logits)
    positive = member[:, None, :].expand_as(logits)
    if exclude_self:
        eye = torch.eye(logits.shape[1], dtype=torch.bool, device=logits.device)[None]
        col_ok, positive = col_ok & ~eye, positive & ~eye
    n_pos = positive.sum(-1)                                                     # [S, W]
    anchor = member & (n_pos > 0)
    # a finite fill, not -inf: a row with no column left (padding) must keep finite, zero gradients
    lse = torch.logsumexp(logits.masked_fill(~col_ok, -1e9), dim=-1)             # [S, W]
    pos_mean = (logits * positive).sum(-1) / n_pos.clamp(min=1)
    row_loss = torch.where(anchor, lse - pos_mean, torch.zeros_like(lse))
    return row_loss.sum(), anchor.sum()


def conditioned_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, slice_ids: torch.Tensor,
                                 member: torch.Tensor, logit_scale: torch.Tensor | float, *, w_inter: float = 1.0,
                                 w_intra: float = 1.0) -> dict[str, torch.Tensor]:
    """L_cond and its four terms (module docstring). image_emb, text_emb: [C, D] unit norm, rows of
    ``conditioned_rows``; slice_ids: long [C] (contiguous slices); member: bool [C]. Returns
    {"cond", "it", "ti", "ii", "tt"}: 0-d tensors in fp32 or wider (0 where a term has no anchor)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image_emb and text_emb must both be [rows, D], got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if slice_ids.shape != (image_emb.shape[0],) or member.shape != slice_ids.shape:
        raise ValueError(f"slice_ids and member must be [{image_emb.shape[0]}], got {tuple(slice_ids.shape)} and "
                         f"{tuple(member.shape)}")
    dtype = torch.promote_types(torch.float32, image_emb.dtype)
    scale = torch.as_tensor(logit_scale, device=image_emb.device).to(dtype).reshape(())
    if image_emb.shape[0] == 0:
        zero = (image_emb.sum() + text_emb.sum()).to(dtype) * 0  # keeps the graph: every rank calls backward
        return dict.fromkeys(("cond",) + TERMS, zero)
    u, valid, is_member = _padded(image_emb.to(dtype), slice_ids, member.bool())
    t, _, _ = _padded(text_emb.to(dtype), slice_ids, member.bool())
    terms = {}
    for name, rows, cols, exclude in (("it", u, t, False), ("ti", t, u, False), ("ii", u, u, True),
                                      ("tt", t, t, True)):
        total, count = _term(rows, cols, valid, is_member, scale, exclude)
        terms[name] = total / count.clamp(min=1)
    cond = w_inter * (terms["it"] + terms["ti"]) / 2 + w_intra * (terms["ii"] + terms["tt"]) / 2
    return {"cond": cond, **terms}
