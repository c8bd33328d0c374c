"""Relation attention pooling: one query per (relation, head) attends over one item's keys.

Rows are (item, relation) index pairs. Row b pools item ``row_item[b]``'s tokens under the query of
relation ``row_relation[b]``::

    out[b, h] = sum_t softmax_t(scale * q[r, h] . k[i, t, h]) v[i, t, h],   i = row_item[b], r = row_relation[b]

over the valid keys t of item i (``key_valid[i, t]``), scale = head_dim ** -0.5. Keys and values are
given once per item and queries once per relation; at evaluation one item is scored under many
relations and one relation over many items, so nothing is ever copied per row by the kernel.

Three faces, one signature (``impl``):

- ``reference``: a Python loop over rows, plain autograd. The test oracle (run it in float64).
- ``torch``: kernels/relation_attention_torch.py, gathers keys/values per row ([B, H, T, Dh] copies)
  and calls ``F.scaled_dot_product_attention`` with a boolean key mask. The CPU path and the baseline.
- ``triton``: kernels/relation_attention_triton.py, an autograd Function over the forward and backward
  kernels (design notes there), fp32 accumulation for fp32/bf16/fp16 inputs. The GPU path; on CPU it
  runs under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch

from kernels.dispatch import IMPLS, resolve_impl
from kernels.relation_attention_torch import torch_relation_attention

__all__ = ["IMPLS", "relation_attention", "resolve_impl"]


def _check_inputs(q, k, v, key_valid, row_item, row_relation) -> None:
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.shape[2:] != q.shape[1:]:
        raise ValueError(
            "relation_attention: expected q [R, H, Dh] and k, v [I, T, H, Dh] with the same H and Dh, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_valid.dtype != torch.bool or key_valid.shape != k.shape[:2]:
        raise ValueError(f"relation_attention: key_valid must be a bool [I, T] = {tuple(k.shape[:2])} mask, got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")
    if row_item.dim() != 1 or row_item.shape != row_relation.shape:
        raise ValueError(f"relation_attention: row_item and row_relation must both be [B], got "
                         f"{tuple(row_item.shape)} and {tuple(row_relation.shape)}")
    if row_item.dtype != torch.int64 or row_relation.dtype != torch.int64:
        raise TypeError(f"relation_attention: row indices must be int64, got {row_item.dtype} / {row_relation.dtype}")
    if len({t.device for t in (q, k, v, key_valid, row_item, row_relation)}) != 1:
        raise ValueError("relation_attention: all inputs must be on one device")
    if row_item.numel() == 0:
        return
    # One host sync for all value checks (an out-of-range index would be a silent bad read in the kernel).
    bad = torch.stack([
        ~key_valid.any(1).all(),
        (row_item.min() < 0) | (row_item.max() >= k.shape[0]),
        (row_relation.min() < 0) | (row_relation.max() >= q.shape[0]),
    ]).tolist()
    if bad[0]:
        empty = (~key_valid.any(1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"relation_attention: items {empty} have no valid key (key_valid all False); every item "
                         "needs at least one token to attend to")
    if bad[1]:
        raise IndexError(f"relation_attention: row_item must be in [0, {k.shape[0]}) (items), got values in "
                         f"[{int(row_item.min())}, {int(row_item.max())}]")
    if bad[2]:
        raise IndexError(f"relation_attention: row_relation must be in [0, {q.shape[0]}) (relations), got values in "
                         f"[{int(row_relation.min())}, {int(row_relation.max())}]")


def relation_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    row_item: torch.Tensor,
    row_relation: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Pool item keys/values under relation queries (see the module docstring).

    q [R, H, Dh] (one query per relation and head), k, v [I, T, H, Dh] (per item), key_valid [I, T]
    bool (True = real token; every item needs one), row_item / row_relation [B] int64.
    Returns [B, H, Dh] in the promoted dtype of q, k, v. Differentiable in q, k and v.
    """
    _check_inputs(q, k, v, key_valid, row_item, row_relation)
    impl = resolve_impl(impl, q.device)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if row_item.numel() == 0:
        return q.new_zeros(0, *q.shape[1:])
    if impl == "reference":
        return _reference(q, k, v, key_valid, row_item, row_relation)
    if impl == "triton":
        from kernels.relation_attention_triton import triton_relation_attention

        return triton_relation_attention(q, k, v, key_valid, row_item, row_relation)
    return torch_relation_attention(q, k, v, key_valid, row_item, row_relation)


# ------------------------------------------------------------------------------------ reference
def _reference(q, k, v, key_valid, row_item, row_relation):
    """Naive oracle: one row at a time, only the item's valid keys, explicit softmax."""
    scale = q.shape[-1] ** -0.5
    out = []
    for item, rel in zip(row_item.tolist(), row_relation.tolist()):
        keys, values = k[item][key_valid[item]], v[item][key_valid[item]]  # [t, H, Dh]
        p = torch.softmax(torch.einsum("hd,thd->ht", q[rel], keys) * scale, dim=-1)  # [H, t]
        out.append(torch.einsum("ht,thd->hd", p, values))
    return torch.stack(out)  # [B, H, Dh]

