"""RCMLModel: CLIP towers (transformers), relation attention pooling per modality, beta mix.

For a row (item i, relation r)::

    r_emb   = text_projection(text tower(relation text r) at its eos)      the relation tower IS the text tower
    global  = visual_projection(CLS of image i)  |  text_projection(eos state of caption i)
    pooled  = RelationPooling_m(tokens of item i, query from r_emb)         (rcml/model_pooling.py)
    e       = normalize(beta * normalize(global) + (1 - beta) * normalize(pooled))     (mix = "normalized")
    e       = normalize(beta * global + (1 - beta) * pooled)                           (mix = "legacy")

The normalized mix makes beta the weight it claims to be: the raw global and pooled vectors differ in
norm (and drift apart during training), so with the legacy mix a beta sweep does not sweep what it says.
Specs written before ``mix`` existed load as ``legacy``.

``text_pool_tokens`` says what the text pooling attends over: ``contextual`` (the paper's) the tower's
last hidden states; ``contextual+lexical`` those and, as a second set of L tokens, the caption's own
word embeddings (the tower's input table, no position). Relations name the words their members share
("both are tagged repeat", "both have medium skin tone"); after a few hundred steps from scratch the
last states of a small tower have mixed those words with their context, the input table has not. No
new parameter: the same key/value projections read both sets. Specs without the key load as
``contextual``.

With beta = 1, or in the ``clip`` baseline mode (beta forced to 1, relation text joined to the caption
by the data pipeline), the model is exactly CLIP and has no pooling modules at all.

The architecture is fully described by ``RCMLModel.spec`` (a JSON-serializable dict: tower configs,
joint width, pool heads, mode, beta, tokenizer ids, context length, image size); ``from_spec`` rebuilds
it with random weights, ``build_model`` makes the spec from a ``ModelConfig`` and loads local
pretrained weights: a whole CLIPModel with ``model.init_from``, or single towers with
``model.vision_path`` / ``model.text_path``.

ZeRO-3: every parameter is created and initialized in a module constructor (the model is built under
``deepspeed.zero.Init``), and parameters are only read by calling their modules, or in ``forward``
for ``logit_scale``.

``logit_scale`` is the log of the contrastive scale (1 / temperature). ``forward`` exponentiates it in
fp32 (or wider) even when the model runs in bf16, and does not clamp it: the trainer keeps the stored
value in [0, ln LOGIT_SCALE_MAX] in place after every optimizer step (``rcml/train/optimizer.py``), so
its gradient is never cut off by a clamp. Under DeepSpeed bf16 the parameter itself lives in
DeepSpeed's fp32 master copy, which the optimizer updates and the clamp bounds; the module holds that
value rounded to bf16 (steps of 1/32 near ln 100, i.e. the scale the forward sees moves in steps of
3 %), and the fp32 exp adds no rounding of its own (a bf16 exp near 100 would round to steps of 0.5).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from rcml import model_towers
from rcml.batch import Batch
from rcml.config import MIXES, MODES, TEXT_POOL_TOKENS, ModelConfig
from rcml.model_pooling import ItemFeatures, RelationPooling
from rcml.model_size import load_size
from rcml.preprocess import normalize_pixels

log = logging.getLogger(__name__)

SPEC_FORMAT = "rcml-model/1"
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0  # the bound the trainer keeps exp(logit_scale) under


class RCMLModel(nn.Module):
    """Build with ``build_model(cfg, ...)`` or ``RCMLModel.from_spec(spec)``; ``impl`` picks the pooling op's face."""

    def __init__(self, spec: dict[str, Any], *, impl: str = "auto") -> None:
        super().__init__()
        _check_spec(spec)
        self._spec = copy.deepcopy(spec)
        self.impl = impl
        self.mode, self.beta = spec["mode"], float(spec["beta"])
        self.mix = spec.get("mix", "legacy")
        self.text_pool_tokens = spec.get("text_pool_tokens", "contextual")
        self.eos_id = int(spec["tokenizer"]["eos_id"])
        dim = int(spec["embed_dim"])
        self.vision = model_towers.build_tower(CLIPVisionModel, CLIPVisionConfig.from_dict(spec["vision_config"]))
        self.text = model_towers.build_tower(CLIPTextModel, CLIPTextConfig.from_dict(spec["text_config"]))
        vision_width, text_width = self.vision.config.hidden_size, self.text.config.hidden_size
        self.visual_projection = nn.Linear(vision_width, dim, bias=False)
        self.text_projection = nn.Linear(text_width, dim, bias=False)
        # Shape [1], not 0-d: deepspeed.zero.Init cannot broadcast 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        # Pooling modules exist only when used, so that every parameter gets a gradient (DeepSpeed) and a
        # clip / beta = 1 model cannot depend on them.
        self.image_pool = self.text_pool = None
        if self.uses_pooling:
            self.image_pool = RelationPooling(vision_width, dim, int(spec["pool_heads"]))
            self.text_pool = RelationPooling(text_width, dim, int(spec["pool_heads"]))

    # ------------------------------------------------------------------ construction
    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serializable description of the architecture; ``from_spec(spec)`` rebuilds it."""
        return copy.deepcopy(self._spec)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, impl: str = "auto") -> "RCMLModel":
        """Random-init model of the architecture ``spec`` (load weights with ``load_state_dict``)."""
        return cls(spec, impl=impl)

    @property
    def uses_pooling(self) -> bool:
        return self.mode == "rcml" and self.beta < 1.0

    @property
    def embed_dim(self) -> int:
        return int(self._spec["embed_dim"])

    # ------------------------------------------------------------------ towers
    def image_features(self, images: torch.Tensor) -> ItemFeatures:
        """images [I, 3, S, S] -> ItemFeatures (global [I, D]; keys/values over CLS + patch tokens).

        ``images``: normalized float pixels (``rcml.preprocess.ImageTransform``), or uint8 pixels as the
        loader ships them, which are normalized here, on their device, into the vision tower's dtype."""
        if images.dtype == torch.uint8:
            images = normalize_pixels(images, self.vision.embeddings.patch_embedding.weight.dtype)
        out = self.vision(pixel_values=images)
        global_emb = self.visual_projection(out.pooler_output)  # [I, D] post-layernorm CLS
        if not self.uses_pooling:
            return ItemFeatures(global_emb)
        tokens = out.last_hidden_state  # [I, 1 + patches, W]
        keys, values = self.image_pool.keys_values(tokens)
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ItemFeatures(global_emb, keys, values, valid)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> ItemFeatures:
        """ids, mask [I, L] -> ItemFeatures (global [I, D] at the eos; keys/values over the real tokens)."""
        return self._text_features(ids, mask)

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor, check: bool = True) -> ItemFeatures:
        global_emb, hidden, words = self._text_tower(ids, mask, check, with_words=self._pools_words)
        if not self.uses_pooling:
            return ItemFeatures(global_emb)
        return self._pooled_text_features(global_emb, hidden, words, mask)

    @property
    def _pools_words(self) -> bool:
        return self.uses_pooling and self.text_pool_tokens == "contextual+lexical"

    def _pooled_text_features(self, global_emb: torch.Tensor, hidden: torch.Tensor, words: torch.Tensor | None,
                              mask: torch.Tensor) -> ItemFeatures:
        """Tower outputs of captions (global [N, D], hidden [N, L, W], word embeddings [N, L, W] or None) ->
        ItemFeatures over the pooling's tokens: [N, L] hidden states, or [N, 2L] hidden states then word
        embeddings (``contextual+lexical``)."""
        tokens, valid = hidden, mask.bool()
        if self.text_pool_tokens == "contextual+lexical":
            tokens, valid = torch.cat([hidden, words.to(hidden.dtype)], 1), torch.cat([valid, valid], 1)
        keys, values = self.text_pool.keys_values(tokens)
        return ItemFeatures(global_emb, keys, values, valid)

    def _text_tower(self, ids: torch.Tensor, mask: torch.Tensor, check: bool = True, with_words: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (projected eos embedding [N, D], token states [N, L, W], word embeddings [N, L, W] or None).

        Pools at the first eos itself: CLIPTextModel's pooler_output takes the arg-max token id instead
        whenever eos_token_id == 2 (a legacy rule), which is exactly our tokenizer's eos id. ``check``:
        raise on a row without an eos (one host sync; ``forward`` skips it, the loader checks its batches).
        ``with_words``: also return the tower's own token-embedding lookup (its input table, before positions),
        taken from that call by a forward hook rather than by a second lookup, which under ZeRO-3 would gather
        the [vocab, W] table once more per step.
        """
        if ids.shape != mask.shape or ids.dim() != 2:
            raise ValueError(f"text ids and mask must both be [N, L], got {tuple(ids.shape)} and {tuple(mask.shape)}")
        is_eos = ids == self.eos_id  # [N, L]
        if check and ids.shape[0] and not bool(is_eos.any(1).all()):
            bad = (~is_eos.any(1)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"text rows {bad} have no eos token (id {self.eos_id}); encode texts with "
                             "rcml.tokenizer.TextTokenizer.encode, which always ends a text with eos")
        looked_up: list[torch.Tensor] = []
        hook = (self.text.get_input_embeddings().register_forward_hook(lambda _m, _in, out: looked_up.append(out))
                if with_words else None)
        try:
            hidden = self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [N, L, W]
        finally:
            if hook is not None:
                hook.remove()
        words = None
        if with_words:
            if len(looked_up) != 1 or looked_up[0].shape[:2] != ids.shape:
                raise RuntimeError(f"the text tower looked its tokens up {len(looked_up)} times, expected once "
                                   f"with shape [N, L, W] = [{ids.shape[0]}, {ids.shape[1]}, W]")
            words = looked_up[0]
        eos_pos = is_eos.int().argmax(1)  # first eos
        eos_state = hidden[torch.arange(ids.shape[0], device=ids.device), eos_pos]  # [N, W]
        return self.text_projection(eos_state), hidden, words

    def encode_relations(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Relation texts [R, L] -> relation embeddings [R, D] (the text tower's projected eos state)."""
        return self._text_tower(ids, mask)[0]

    # ------------------------------------------------------------------ pooling + mix
    def pool_images(self, features: ItemFeatures, relation_emb: torch.Tensor | None, row_item: torch.Tensor,
                    row_relation: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embedding of each row (item ``row_item[b]`` under relation ``row_relation[b]``): [B, D].

        ``features`` from ``image_features``; ``relation_emb`` [R, D] from ``encode_relations`` (unused,
        may be None, when the model does not pool).
        """
        return self._mix(features, self.image_pool, relation_emb, row_item, row_relation)

    def pool_texts(self, features: ItemFeatures, relation_emb: torch.Tensor | None, row_item: torch.Tensor,
                   row_relation: torch.Tensor) -> torch.Tensor:
        """Like ``pool_images`` for ``text_features``: [B, D] unit norm."""
        return self._mix(features, self.text_pool, relation_emb, row_item, row_relation)

    def _mix(self, features: ItemFeatures, pool: RelationPooling | None, relation_emb, row_item, row_relation):
        global_rows = features.global_emb[row_item]  # [B, D]
        # Mix and normalize in (at least) fp32: the loss compares these at a scale of up to 100.
        dtype = torch.promote_types(global_rows.dtype, torch.float32)
        if not self.uses_pooling:
            return F.normalize(global_rows.to(dtype), dim=-1)
        if relation_emb is None:
            raise ValueError("this model pools under relations: pass relation_emb from encode_relations")
        pooled = pool.pool(features, relation_emb, row_item, row_relation, impl=self.impl).to(dtype)  # [B, D]
        global_rows = global_rows.to(dtype)
        if self.mix == "normalized":
            global_rows, pooled = F.normalize(global_rows, dim=-1), F.normalize(pooled, dim=-1)
        return F.normalize(self.beta * global_rows + (1.0 - self.beta) * pooled, dim=-1)

    def encode_images(self, images: torch.Tensor, relation_emb: torch.Tensor | None, row_item: torch.Tensor,
                      row_relation: torch.Tensor) -> torch.Tensor:
        """images [I, 3, S, S], relation_emb [R, D], rows [B] -> unit-norm image embeddings [B, D] (fp32 or wider)."""
        return self.pool_images(self.image_features(images), relation_emb, row_item, row_relation)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor, relation_emb: torch.Tensor | None,
                     row_item: torch.Tensor, row_relation: torch.Tensor) -> torch.Tensor:
        """ids, mask [I, L], relation_emb [R, D], rows [B] -> unit-norm text embeddings [B, D] (fp32 or wider)."""
        return self.pool_texts(self.text_features(ids, mask), relation_emb, row_item, row_relation)

    def _logit_scale_fp32(self) -> torch.Tensor:
        return self.logit_scale.to(torch.promote_types(self.logit_scale.dtype, torch.float32))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """-> {"image_emb" [B, D], "text_emb" [B, D] (unit norm, fp32 or wider), "logit_scale" (exp'd, 0-d fp32)},
        plus "cond_image_emb" / "cond_text_emb" [C, D] when the batch carries conditioned rows.

        The training entry: its texts are not checked for an eos here (no host sync per step); the loader
        checks the token rows of every batch it makes (``rcml.data.check_tokens``)."""
        relation_emb = None
        if self.uses_pooling and batch.relation_ids.shape[1] == batch.text_ids.shape[1]:
            # Captions and relation texts in one text-tower call: one parameter gather under ZeRO-3, not two.
            n = batch.text_ids.shape[0]
            global_emb, hidden, words = self._text_tower(torch.cat([batch.text_ids, batch.relation_ids]),
                                                         torch.cat([batch.text_mask, batch.relation_mask]),
                                                         check=False, with_words=self._pools_words)
            relation_emb = global_emb[n:]
            text = self._pooled_text_features(global_emb[:n], hidden[:n], None if words is None else words[:n],
                                              batch.text_mask)
        else:
            if self.uses_pooling:
                relation_emb = self._text_tower(batch.relation_ids, batch.relation_mask, check=False)[0]
            text = self._text_features(batch.text_ids, batch.text_mask, check=False)
        image = self.image_features(batch.images)
        out = {"image_emb": self.pool_images(image, relation_emb, batch.row_item, batch.row_relation),
               "text_emb": self.pool_texts(text, relation_emb, batch.row_item, batch.row_relation),
               "logit_scale": self._logit_scale_fp32().exp().reshape(())}
        if batch.cond_item is not None:  # the conditioned term's rows: the same features, pooled again
            out["cond_image_emb"] = self.pool_images(image, relation_emb, batch.cond_item, batch.cond_relation)
            out["cond_text_emb"] = self.pool_texts(text, relation_emb, batch.cond_item, batch.cond_relation)
        return out


def _check_spec(spec: dict[str, Any]) -> None:
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not an RCML model spec (format {spec.get('format') if isinstance(spec, dict) else None!r}, "
                         f"expected {SPEC_FORMAT!r}); specs are written by RCMLModel.spec / build_model")
    missing = {"mode", "beta", "embed_dim", "pool_heads", "vision_config", "text_config", "tokenizer"} - spec.keys()
    if missing:
        raise ValueError(f"model spec lacks {sorted(missing)}")
    if spec["mode"] not in MODES or not 0.0 <= float(spec["beta"]) <= 1.0:
        raise ValueError(f"model spec: mode must be rcml|clip and beta in [0, 1], got {spec['mode']!r}, {spec['beta']}")
    if spec.get("mix", "legacy") not in MIXES:
        raise ValueError(f"model spec: mix must be one of {MIXES}, got {spec['mix']!r}")
    if spec.get("text_pool_tokens", "contextual") not in TEXT_POOL_TOKENS:
        raise ValueError(f"model spec: text_pool_tokens must be one of {TEXT_POOL_TOKENS}, "
                         f"got {spec['text_pool_tokens']!r}")


def build_model(cfg: ModelConfig, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, context_length: int,
                image_size: int, impl: str = "auto") -> RCMLModel:
    """ModelConfig + tokenizer ids + data sizes -> RCMLModel (random init, or local pretrained weights).

    ``cfg.name``: ``tiny`` | ``base`` | path to a size JSON (configs/model/). With ``cfg.vision_path`` /
    ``cfg.text_path`` the tower configs come from those transformers directories (CLIPVisionModel /
    CLIPTextModel, or a full CLIPModel, whose projections and logit scale are loaded too) and the size
    JSON only gives embed_dim and pool_heads. ``cfg.init_from`` (a CLIPModel directory) loads both towers,
    both projections and the logit scale, and the joint width is the checkpoint's ``projection_dim``: the
    size JSON only gives pool_heads. Only the relation pooling keeps a fresh init. Call it inside
    ``deepspeed.zero.Init`` for ZeRO-3.
    """
    size = load_size(cfg.name)
    tok = dict(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    if not all(0 <= i < vocab_size for i in (pad_id, bos_id, eos_id)):
        raise ValueError(f"special token ids {tok} must lie inside the vocabulary")
    if cfg.init_from:
        model_towers.check_own_tokenizer(cfg.init_from, **tok)
    vision_path = cfg.init_from or cfg.vision_path
    text_path = cfg.init_from or cfg.text_path
    keys = ("model.init_from",) * 2 if cfg.init_from else ("model.vision_path", "model.text_path")
    vision = (model_towers.pretrained_vision_config(vision_path, image_size, keys[0]) if vision_path
              else model_towers.vision_config(size, image_size))
    text = (model_towers.pretrained_text_config(text_path, context_length=context_length, key=keys[1], **tok)
            if text_path else model_towers.text_config(size, context_length=context_length, **tok))
    embed_dim = model_towers.pretrained_embed_dim(cfg.init_from) if cfg.init_from else int(size["embed_dim"])
    spec = {
        "format": SPEC_FORMAT,
        "name": cfg.name,
        "mode": cfg.mode,
        "beta": 1.0 if cfg.mode == "clip" else float(cfg.beta),
        "mix": cfg.mix,
        "text_pool_tokens": cfg.text_pool_tokens,
        "embed_dim": embed_dim,
        "pool_heads": int(size["pool_heads"]),
        "image_size": int(image_size),
        "context_length": int(context_length),
        "tokenizer": tok,
        "vision_config": vision.to_dict(),
        "text_config": text.to_dict(),
    }
    model = RCMLModel(spec, impl=impl)
    whole = bool(cfg.init_from)  # a whole CLIPModel must hold its projections and logit scale
    if vision_path:
        what = model_towers.load_pretrained(vision_path, model.vision, ("vision_model.", ""),
                                            {"visual_projection.weight": model.visual_projection.weight,
                                             "logit_scale": model.logit_scale}, extra_required=whole)
        log.info("%s: vision tower <- %s/model.safetensors: %s", keys[0], vision_path, what)
    if text_path:
        what = model_towers.load_pretrained(text_path, model.text, ("text_model.", ""),
                                            {"text_projection.weight": model.text_projection.weight},
                                            extra_required=whole)
        log.info("%s: text tower <- %s/model.safetensors: %s", keys[1], text_path, what)
    return model
