"""The public embedding API: PIL images and strings in, unit-norm embeddings (under a relation) out.

    m = rcml.from_pretrained("runs/emoji/rcml/seed_0/export")
    u = m.embed_images([img_a, img_b], relations=["both are fruits", "both are fruits"])   # [2, D]
    t = m.embed_texts(["a red apple", "a banana"], relations=["both are fruits"] * 2)      # [2, D]
    g = m.embed_texts(["a red apple"])             # relation-independent global embedding

Row i is embedded under ``relations[i]``; ``relations=None`` gives the global (CLS / eos) embedding,
which does not depend on any relation. A ``clip``-mode model joins the relation to the text exactly as
in training (``rcml.batch.clip_mode_text``) and ignores it for images; a ``beta = 1`` model ignores it
everywhere. Results are float32 [n, D], L2-normalized, on the CPU.

Inside: preprocessing (the evaluation transform: centre square, resize, CLIP normalization;
tokenization at the model's context length), no_grad, and batching in which each tower runs *once per
distinct input* -- images by object identity, texts by value -- and each distinct relation text is
encoded once; rows only index them. Embedding N items under R relations each therefore costs N tower
passes, not N x R (this is how the evaluator scores thousands of (item, relation) rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rcml.batch import clip_mode_text


def _distinct(values: Sequence[Any], key) -> tuple[list[Any], list[int]]:
    """-> (distinct values in first-seen order, index of each input into them)."""
    position: dict[Any, int] = {}
    distinct: list[Any] = []
    index = []
    for v in values:
        k = key(v)
        if k not in position:
            position[k] = len(distinct)
            distinct.append(v)
        index.append(position[k])
    return distinct, index


class RCMLEmbedder:
    """A model with its tokenizer and preprocessing: ``embed_images`` / ``embed_texts``.

    ``model``: an ``RCMLModel`` (or a ZeRO-3 engine's module: every rank must then make the same calls);
    ``spec``: its ``RCMLModel.spec`` (mode, context length, image size). ``batch_size``: distinct items per
    tower call; ``max_rows_per_call``: rows per pooling call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: dict[str, Any], *, run_config: dict | None = None,
                 batch_size: int = 64, max_rows_per_call: int = 4096) -> None:
        from rcml.preprocess import ImageTransform

        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.run_config = run_config or {}
        self.mode = spec["mode"]
        self.context_length, self.image_size = int(spec["context_length"]), int(spec["image_size"])
        self.batch_size, self.max_rows = max(1, int(batch_size)), max(1, int(max_rows_per_call))
        self.transform = ImageTransform(self.image_size, train=False)
        self.pools = bool(getattr(model, "uses_pooling", False))

    # ------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # bf16 engines hold bf16 parameters: feed pixels in the parameters' dtype
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts, self.context_length)  # [n, L]
        return ids.to(self.device), mask.to(self.device)

    def _relation_embeddings(self, texts: list[str]) -> torch.Tensor:
        """[T, D] pooling queries of distinct relation texts."""
        return torch.cat([self.model.encode_relations(*self._tokens(texts[i:i + self.batch_size]))
                          for i in range(0, len(texts), self.batch_size)])

    def _check(self, inputs: Sequence[Any], relations: Sequence[str] | None, what: str) -> None:
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise TypeError(f"{what} must be a list, got {type(inputs).__name__}")
        if relations is not None and (isinstance(relations, str) or len(relations) != len(inputs)):
            raise ValueError(f"relations must be None or a list of {len(inputs)} strings (one per {what[:-1]}), "
                             f"got {relations!r:.80}")

    def _embed(self, inputs: Sequence[Any], relations: Sequence[str] | None, key, features, pool) -> torch.Tensor:
        """Towers once per distinct input (``features(list) -> ItemFeatures``), ``pool`` per row."""
        distinct, row_item = _distinct(inputs, key)
        pooled_rows = relations is not None and self.pools
        rel_emb = None
        if pooled_rows:
            rel_texts, row_rel = _distinct(relations, lambda r: r)
            rel_emb = self._relation_embeddings(rel_texts)
        else:
            row_rel = [0] * len(row_item)
        rows_of: list[list[int]] = [[] for _ in distinct]
        for r, i in enumerate(row_item):
            rows_of[i].append(r)
        out = torch.empty(len(row_item), int(self.spec["embed_dim"]), dtype=torch.float32)
        for start in range(0, len(distinct), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(distinct)))
            feats = features([distinct[i] for i in chunk])
            if not pooled_rows:
                emb = F.normalize(feats.global_emb.float(), dim=-1)             # [I, D]
                for j, i in enumerate(chunk):
                    out[rows_of[i]] = emb[j].cpu()
                continue
            rows = [r for i in chunk for r in rows_of[i]]
            for r0 in range(0, len(rows), self.max_rows):
                part = rows[r0:r0 + self.max_rows]
                items = torch.tensor([row_item[r] - start for r in part], device=self.device)  # [b] -> chunk item
                rels = torch.tensor([row_rel[r] for r in part], device=self.device)            # [b] -> relation
                out[torch.tensor(part)] = pool(feats, rel_emb, items, rels).float().cpu()
        return out

    def _image_features(self, images: list):
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device, self.dtype)  # [I, 3, S, S]
        return self.model.image_features(pixels)

    def _text_features(self, texts: list[str]):
        return self.model.text_features(*self._tokens(texts))

    # ------------------------------------------------------------------------------ public
    @torch.no_grad()
    def embed_images(self, images: Sequence[Any], relations: Sequence[str] | None = None) -> torch.Tensor:
        """PIL images [n] (any size or mode), optional relation texts [n] -> float32 [n, D], unit norm, CPU."""
        self._check(images, relations, "images")
        if not images:
            return torch.zeros(0, int(self.spec["embed_dim"]))
        if self.mode == "clip":
            relations = None  # the CLIP baseline's image embedding does not see the relation
        return self._embed(images, relations, id, self._image_features, self.model.pool_images)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], relations: Sequence[str] | None = None) -> torch.Tensor:
        """Strings [n], optional relation texts [n] -> float32 [n, D], unit norm, CPU."""
        self._check(texts, relations, "texts")
        if not texts:
            return torch.zeros(0, int(self.spec["embed_dim"]))
        if self.mode == "clip" and relations is not None:
            texts, relations = [clip_mode_text(t, r) for t, r in zip(texts, relations)], None
        return self._embed([str(t) for t in texts], relations, lambda t: t, self._text_features,
                           self.model.pool_texts)
