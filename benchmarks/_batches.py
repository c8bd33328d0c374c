"""Random inputs in the real Batch layout for the benchmarks (no data pipeline)."""

from __future__ import annotations

import torch


def random_tokens(rows: int, context: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenizer-shaped ids and mask [rows, context]: bos 1, random tokens, eos 2, pad 0; random lengths."""
    lengths = torch.randint(3, context, (rows,), generator=gen)
    ids = torch.randint(3, vocab, (rows, context), generator=gen)
    mask = torch.arange(context)[None] < lengths[:, None]
    ids[torch.arange(rows), lengths - 1] = 2  # eos
    ids[~mask] = 0
    ids[:, 0] = 1
    return ids, mask
