"""PyTorch path of relation attention pooling (the ``torch`` face of kernels/relation_attention.py).

Gathers each row's query, keys and values ([B, H, T, Dh] copies of the item's keys and values) and calls
``F.scaled_dot_product_attention`` with a boolean key mask. The CPU path and the baseline the Triton
kernels are measured against (benchmarks/kernels_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_relation_attention(q, k, v, key_valid, row_item, row_relation) -> torch.Tensor:
    """Gather per row and use SDPA: [B, H, 1, Dh] queries over [B, H, T, Dh] keys, mask [B, 1, 1, T].

    Inputs already validated and promoted to one dtype by kernels.relation_attention. Returns [B, H, Dh].
    """
    q_rows = q[row_relation].unsqueeze(2)  # [B, H, 1, Dh]
    k_rows = k[row_item].transpose(1, 2)  # [B, H, T, Dh]
    v_rows = v[row_item].transpose(1, 2)
    mask = key_valid[row_item][:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q_rows, k_rows, v_rows, attn_mask=mask, scale=q.shape[-1] ** -0.5)
    return out.squeeze(2)  # [B, H, Dh]
