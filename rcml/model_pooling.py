"""Relation attention pooling of one modality's tokens, and the relation-independent item features.

Per modality m::

    q = Wq_m LN(r)                  r = relation embedding [R, D]         -> [R, H, Dh]
    K, V = Wk_m LN(T), Wv_m LN(T)   T = the item's tokens [I, T, W]       -> [I, T, H, Dh]
    pooled = Wo_m attention(q, K, V, key padding mask) per row (item, relation)   -> [B, D]

K/V are computed once per item and q once per relation; rows only index them (kernels.relation_attention).
The layer norms follow OpenCLIP's AttentionalPooler (ln_q on the query, ln_k on the context): the
relation embedding and the token states come from different places with different scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.relation_attention import relation_attention


@dataclass
class ItemFeatures:
    """What the towers produce for a set of items, before any relation is applied.

    Computed once per item (``RCMLModel.image_features`` / ``text_features``) and pooled under any
    number of relations (``RCMLModel.pool_images`` / ``pool_texts``) without re-running a tower.
    """

    global_emb: torch.Tensor               # [I, D] projected CLS / eos embedding, not normalized
    keys: torch.Tensor | None = None       # [I, T, H, Dh] pooling keys; None when the model does not pool
    values: torch.Tensor | None = None     # [I, T, H, Dh]
    key_valid: torch.Tensor | None = None  # [I, T] bool, True = real token

    def __len__(self) -> int:
        return int(self.global_emb.shape[0])

    def select(self, index: torch.Tensor) -> "ItemFeatures":
        """Features of the items ``index`` [n] (e.g. one evaluation gallery)."""
        pick = (lambda t: None if t is None else t[index])
        return ItemFeatures(self.global_emb[index], pick(self.keys), pick(self.values), pick(self.key_valid))


class RelationPooling(nn.Module):
    """Attention pooling of tokens [I, T, token_width] under relation queries, to the joint width D."""

    def __init__(self, token_width: int, embed_dim: int, heads: int) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of pool_heads {heads}")
        self.heads, self.head_dim = heads, embed_dim // heads
        self.ln_q = nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.ln_kv = nn.LayerNorm(token_width)
        self.k_proj = nn.Linear(token_width, embed_dim)
        self.v_proj = nn.Linear(token_width, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def queries(self, relation_emb: torch.Tensor) -> torch.Tensor:
        """[R, D] -> [R, H, Dh]."""
        return self.q_proj(self.ln_q(relation_emb)).unflatten(-1, (self.heads, self.head_dim))

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[I, T, W] -> (K, V), each [I, T, H, Dh]."""
        x = self.ln_kv(tokens)
        split = (self.heads, self.head_dim)
        return self.k_proj(x).unflatten(-1, split), self.v_proj(x).unflatten(-1, split)

    def pool(self, features: ItemFeatures, relation_emb: torch.Tensor, row_item: torch.Tensor,
             row_relation: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """Pooled embedding of each row (item, relation): [B, D]."""
        if features.keys is None:
            raise ValueError("these item features carry no pooling keys: they come from a model that does not pool "
                             "(clip mode or beta = 1)")
        q = self.queries(relation_emb)  # [R, H, Dh]
        pooled = relation_attention(q, features.keys, features.values, features.key_valid, row_item, row_relation,
                                    impl=impl)  # [B, H, Dh]
        return self.out_proj(pooled.flatten(1))  # [B, D]
