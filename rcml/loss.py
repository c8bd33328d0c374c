"""The RCML loss: four many-to-many contrastive terms over the rows of the whole world.

Global rows n = 1..N over all ranks, image / text embeddings u_n / t_n (unit norm), scale s, group ids
g_n (the relation row n was drawn for), memberships G_n (every group of row n's item, g_n included;
default {g_n}), positives P(i) = {k : g_i in G_k}::

    L_IT = 1/N  sum_i       [LSE_k s u_i.t_k - mean_{k in P(i)} s u_i.t_k]          (L_TI: u <-> t)
    L_II = 1/N' sum_{|P(i)|>1} [LSE_{k!=i} s u_i.u_k - mean_{k in P(i), k!=i} s u_i.u_k]  (L_TT on t)
    L    = w_inter (L_IT + L_TI) / 2 + w_intra (L_II + L_TT) / 2

N' counts the rows (global) with an intra-modal positive; with none the intra terms are 0. Full
membership makes an item that is in row i's group under another relation (drawn for that one) a
positive of row i, not a negative; the memberships are gathered with the group ids, padded to the
largest width of any rank.

Distribution is OpenCLIP's "local loss + gather with grad": each rank scores its own rows against the
gathered columns and scales its partial sums by W. One all-gather (``kernels.distributed.RowGather``)
brings every rank's [u | t] rows, memberships and row count; its backward is one reduce-scatter that
sends the column gradients to their owners. For W ranks:

- the mean over ranks of each returned value is the global value (loss and each of the four terms);
- the gradient of rank r's own rows is W x dL/d(those rows), and the mean over ranks of the
  logit-scale gradient is dL/ds; after DeepSpeed/DDP average gradients, every parameter gets exactly
  the gradient of L.

With one process the I->T and T->I logits are transposes of each other, and
``multi_positive_pair_loss`` computes them once for both directions.
"""

from __future__ import annotations

import torch

from kernels.contrastive import multi_positive_pair_loss, multi_positive_row_loss, resolve_impl
from kernels.distributed import RowGather

TERMS = ("it", "ti", "ii", "tt")


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, group_ids: torch.Tensor,
           member_groups: torch.Tensor | None) -> None:
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be [rows, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if group_ids.shape != (image_emb.shape[0],) or group_ids.dtype != torch.int64:
        raise ValueError(
            f"group_ids must be int64 [rows] = [{image_emb.shape[0]}] (rcml.batch.group_id), got "
            f"{group_ids.dtype} {tuple(group_ids.shape)}"
        )
    if member_groups is not None and (member_groups.dim() != 2 or member_groups.shape[0] != group_ids.shape[0]
                                      or member_groups.shape[1] < 1 or member_groups.dtype != torch.int64):
        raise ValueError(f"member_groups must be int64 [rows, M >= 1] = [{group_ids.shape[0]}, M], got "
                         f"{member_groups.dtype} {tuple(member_groups.shape)}")
    if image_emb.device != text_emb.device or group_ids.device != image_emb.device:
        raise ValueError(f"embeddings and group_ids must be on one device, got {image_emb.device}, "
                         f"{text_emb.device}, {group_ids.device}")


def _rows_with_intra_positive(all_members: torch.Tensor) -> torch.Tensor:
    """N': rows whose group has another member anywhere in the world. ``all_members`` [N, M]: every
    row's groups, its own group in column 0. 0-d int64 tensor, computed without a host sync (dense ids
    by sorting; ``torch.unique``'s data-dependent output size would wait for the device)."""
    n, m = all_members.shape
    flat = all_members.flatten()
    ordered, order = flat.sort()
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    dense = torch.empty_like(flat)
    dense[order] = starts.cumsum(0) - 1
    dense = dense.view(n, m)
    first = torch.ones_like(dense, dtype=torch.bool)  # a group repeated within a row (padding) counts once
    for j in range(1, m):
        first[:, j] = (dense[:, j : j + 1] != dense[:, :j]).all(1)
    members_of_group = torch.zeros_like(flat).index_add_(0, dense.flatten(), first.flatten().long())  # [N * M]
    return (members_of_group[dense[:, 0]] > 1).sum()  # the row itself is one member of its own group


def _with_own_group(group_ids: torch.Tensor, member_groups: torch.Tensor | None) -> torch.Tensor:
    """Memberships [b, M] that contain each row's own group (first), so that a row is its own positive."""
    if member_groups is None:
        return group_ids[:, None]
    return torch.cat([group_ids[:, None], member_groups], 1)


def relation_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    group_ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    w_inter: float = 1.0,
    w_intra: float = 1.0,
    member_groups: torch.Tensor | None = None,
    impl: str = "auto",
    group=None,
    gather: RowGather | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's share of the RCML loss (see the module docstring for the world semantics).

    image_emb, text_emb: [b, D] unit-norm embeddings of this rank's rows; group_ids: int64 [b];
    member_groups: int64 [b, M], every group of each row's item (``Batch.member_groups``; padded by
    repeating a group; None: each item is only in the group it was drawn for);
    logit_scale: the exp'd scale (0-d tensor, usually a parameter). ``group``: process group
    (default: the world, when torch.distributed is initialized). ``gather``: a ``RowGather`` kept across
    calls (it remembers the padded capacity, so that each call is one all-gather; default: a new one on
    ``group``, two all-gathers). ``impl``: see kernels.contrastive.

    Returns {"loss", "it", "ti", "ii", "tt"}, fp32 0-d tensors (fp64 for fp64 embeddings). A term whose
    weight is 0 is not computed and is reported as 0.
    """
    _check(image_emb, text_emb, group_ids, member_groups)
    if w_inter < 0 or w_intra < 0:
        raise ValueError(f"loss weights must be >= 0, got w_inter={w_inter}, w_intra={w_intra}")
    device = image_emb.device
    impl = resolve_impl(impl, device)
    dtype = torch.promote_types(torch.float32, image_emb.dtype)  # fp32 (fp64 when checking against an oracle)
    scale = torch.as_tensor(logit_scale, device=device).to(dtype).reshape(())

    members = _with_own_group(group_ids, member_groups)  # [b, M], column 0: the row's own group
    gather = gather if gather is not None else RowGather(group)
    # one collective: [u | t] rows (differentiable), memberships and the row count of every rank
    rows = gather(torch.cat([image_emb, text_emb], 1), members)
    world, num_rows, offset = len(rows.counts), sum(rows.counts), rows.offset
    if num_rows == 0:
        raise ValueError("relation_contrastive_loss: the batch has no rows on any rank")
    dim = image_emb.shape[1]
    u_all, t_all = rows.values[:, :dim].contiguous(), rows.values[:, dim:].contiguous()  # [N, D] each
    all_members = rows.labels  # [N, M]: the widest rank's width, narrower rows padded by repeats
    zero = torch.zeros((), dtype=dtype, device=device)
    terms = dict.fromkeys(TERMS, zero)

    if world == 1:
        u_all, t_all = image_emb, text_emb
        if w_inter > 0:
            it_rows, ti_rows, _ = multi_positive_pair_loss(image_emb, text_emb, group_ids, scale, members=members,
                                                           impl=impl)
            terms["it"], terms["ti"] = it_rows.sum() / num_rows, ti_rows.sum() / num_rows
    elif w_inter > 0:
        # Local rows against all columns; x W so that the mean over ranks is the global mean.
        it_rows, _ = multi_positive_row_loss(image_emb, t_all, group_ids, all_members, scale, impl=impl)
        ti_rows, _ = multi_positive_row_loss(text_emb, u_all, group_ids, all_members, scale, impl=impl)
        terms["it"], terms["ti"] = it_rows.sum() * (world / num_rows), ti_rows.sum() * (world / num_rows)

    if w_intra > 0:
        # Rows without an intra-modal positive have row loss 0, so summing all rows sums over |P(i)| > 1.
        n_intra = _rows_with_intra_positive(all_members).clamp(min=1).to(dtype)
        ii_rows, _ = multi_positive_row_loss(image_emb, u_all, group_ids, all_members, scale, self_offset=offset,
                                             impl=impl)
        tt_rows, _ = multi_positive_row_loss(text_emb, t_all, group_ids, all_members, scale, self_offset=offset,
                                             impl=impl)
        terms["ii"], terms["tt"] = ii_rows.sum() * world / n_intra, tt_rows.sum() * world / n_intra

    terms = {k: v.to(dtype) for k, v in terms.items()}
    loss = w_inter * (terms["it"] + terms["ti"]) / 2 + w_intra * (terms["ii"] + terms["tt"]) / 2
    return {"loss": loss, **terms}
