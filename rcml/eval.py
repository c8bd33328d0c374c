"""Evaluation with the paper's protocol: relation-guided retrieval, full-gallery retrieval, relation-type
prediction and relation validity.

``evaluate(model, tokenizer, samples, ...)`` plans every task from the samples' metadata
(``rcml.eval_plan``), embeds the distinct (item, relation) rows once (``RowEmbedder``), and computes the
metrics with the pure functions of ``rcml.eval_metrics``. ``rcml.eval_report`` writes and logs the result.

The tasks, as implemented:

- **Relation-guided retrieval.** Query = (item q, one of its relations r). Candidates = 1 positive (another
  item of r's group) + ``negatives`` items outside the group, all embedded under r. Hit@1/5/10 of the
  positive under TT, II, TI, IT similarity and AVG (the mean of the four scores per candidate).
- **Full-gallery retrieval.** One gallery per relation type: every item with a relation of that type,
  under that relation. Image->text and text->image R@1/5/10 and MRR; positives = rows of the same group
  (the item's own caption/image always among them). Reported pooled over all types and per type.
- **Relation-type prediction (top-3).** For a related pair (a, b), every relation of a or b is a
  candidate explanation; it is scored by how close it brings the pair (AVG similarity of a and b, both
  embedded under it). A type scores its best candidate; the top-k types are compared with the types of
  the groups a and b really share. The chance level of a random ranking is reported beside it.
- **Relation validity.** A logistic-regression probe on pair features ``[u_a*u_b, t_a*t_b, u_a*t_b,
  t_a*u_b]`` (both items embedded under the relation) predicts whether the pair is valid under that
  relation: one valid relation (shared) and one invalid relation (a relation of a or b that they do not
  share) per pair, so the probe must read the relation, not the pair. 70/30 split by pair, fixed seed.

In ``clip`` mode the image embedding does not depend on the relation and the text is
``clip_mode_text(caption, relation text)``, exactly as the CLIP baseline was trained.

Distributed use: every rank calls ``evaluate`` with the same samples; the plan and the batches are
identical on every rank, so ZeRO-3's collective parameter gathers match. Only rank 0 should write.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from rcml.batch import clip_mode_text
from rcml.eval_metrics import (SIMILARITIES, gallery_metrics, hit_at_k, linear_probe, positive_rank,
                               relation_type_accuracy, retrieval_scores)
from rcml.eval_plan import (EvalIndex, GalleryPlan, PairPlan, QueryPlan, RowTable, build_index, plan_gallery,
                            plan_pairs, plan_queries)

KS = (1, 5, 10)


class RowEmbedder:
    """Embeds (item, relation text) rows without gradients, running each tower once per item.

    Items are processed in chunks of ``batch_size``: ``image_features`` / ``text_features`` run once per
    chunk and every row of the chunk's items is pooled from those features (``pool_images`` /
    ``pool_texts``), in slices of at most ``max_rows_per_call`` rows. In clip mode the text of a row is
    ``clip_mode_text(caption, relation text)``, so the text tower runs once per distinct such string.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, mode: str, context_length: int, image_size: int,
                 device: torch.device | str, batch_size: int, max_rows_per_call: int = 4096) -> None:
        from rcml.data import image_transform

        if mode not in ("rcml", "clip"):
            raise ValueError(f"mode must be 'rcml' or 'clip', got {mode!r}")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.context_length, self.device = context_length, torch.device(device)
        self.batch_size, self.max_rows = max(1, batch_size), max(1, max_rows_per_call)
        self.transform = image_transform(image_size, train=False)
        # bf16 ZeRO-3 engines hold bf16 parameters: feed pixels in the parameters' dtype
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.pools = mode == "rcml" and bool(getattr(model, "uses_pooling", True))

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts, self.context_length)  # [n, L]
        return ids.to(self.device), mask.to(self.device)

    def relations(self, texts: Sequence[str]) -> torch.Tensor | None:
        """[T, D] relation embeddings (the pooling queries), or None for a model that does not pool."""
        if not self.pools or not texts:
            return None
        return torch.cat([self.model.encode_relations(*self._tokens(list(texts[i:i + self.batch_size])))
                          for i in range(0, len(texts), self.batch_size)])

    def embed(self, images: list, captions: list[str], texts: Sequence[str], row_item: list[int],
              row_text: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (item, text) -> (image embeddings [B, D], text embeddings [B, D]) on the CPU, float32."""
        m, dev = self.model, self.device
        relation_emb = self.relations(texts)                                   # [T, D] or None
        by_item: dict[int, list[int]] = {}
        for r, i in enumerate(row_item):
            by_item.setdefault(i, []).append(r)
        item_order = sorted(by_item)
        image_out = text_out = None
        for start in range(0, len(item_order), self.batch_size):
            chunk = item_order[start:start + self.batch_size]
            local = {item: j for j, item in enumerate(chunk)}
            pixels = torch.stack([self.transform(images[i]) for i in chunk]).to(dev, self.dtype)  # [I, 3, S, S]
            image_features = m.image_features(pixels)
            text_features = None if self.mode == "clip" else m.text_features(*self._tokens([captions[i] for i in chunk]))
            rows = [r for item in chunk for r in by_item[item]]
            for r0 in range(0, len(rows), self.max_rows):
                part = rows[r0:r0 + self.max_rows]
                items = torch.tensor([local[row_item[r]] for r in part], device=dev)   # [b] -> chunk item
                rels = torch.tensor([row_text[r] for r in part], device=dev)           # [b] -> relation text
                img = m.pool_images(image_features, relation_emb, items, rels)         # [b, D]
                if image_out is None:
                    image_out = torch.empty(len(row_item), img.shape[1])
                index = torch.tensor(part)
                image_out[index] = img.float().cpu()
                if text_features is not None:
                    txt = m.pool_texts(text_features, relation_emb, items, rels)       # [b, D]
                    if text_out is None:
                        text_out = torch.empty(len(row_item), txt.shape[1])
                    text_out[index] = txt.float().cpu()
        if image_out is None:
            return torch.zeros(0, 0), torch.zeros(0, 0)
        if self.mode == "clip":
            text_out = self._clip_texts([clip_mode_text(captions[i], texts[t]) for i, t in zip(row_item, row_text)])
        return image_out, text_out

    def _clip_texts(self, strings: list[str]) -> torch.Tensor:
        """The CLIP baseline's row texts (caption + relation text) through the text tower, each distinct
        string once (the same emoji in several styles has one caption): [B, D] float32 on the CPU."""
        distinct = list(dict.fromkeys(strings))
        position = {text: j for j, text in enumerate(distinct)}
        out = []
        for j in range(0, len(distinct), self.batch_size):
            ids, mask = self._tokens(distinct[j:j + self.batch_size])
            rows = torch.arange(ids.shape[0], device=self.device)
            out.append(self.model.pool_texts(self.model.text_features(ids, mask), None, rows, rows).float().cpu())
        return torch.cat(out)[torch.tensor([position[text] for text in strings])]


@contextmanager
def zero3_parameter_discovery(model: torch.nn.Module) -> Iterator[None]:
    """Let ZeRO-3 fetch parameters that a module reads before calling their owner module.

    Evaluation calls the model's ``*_features`` / ``pool_*`` methods directly, not ``engine(batch)``.
    Some transformers modules read a child's parameter outside the child's forward (CLIP's text
    embeddings check ``position_embedding.weight.shape`` first), which ZeRO-3 only serves while the
    engine's forward prologue has switched on its "external parameter" discovery. This does the same
    for the duration of the block; a model without partitioned parameters is left untouched.
    """
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import ensure_zero_ordered_dict

    modules = list(model.modules())
    for module in modules:
        ensure_zero_ordered_dict(module)
        module._parameters._in_forward = True
    try:
        yield
    finally:
        for module in modules:
            if hasattr(module._parameters, "_in_forward"):
                module._parameters._in_forward = False


# ------------------------------------------------------------------------------------------- tasks
def _retrieval(plan: QueryPlan, index: EvalIndex, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    if not plan.item:
        return {f"hit@{k}": {s: float("nan") for s in SIMILARITIES} for k in KS} | {"queries": 0}
    q_rows = torch.tensor([row_of[(q, t)] for q, t in zip(plan.item, plan.text)])                       # [Q]
    c_rows = torch.tensor([[row_of[(c, t)] for c in cands] for cands, t in zip(plan.candidates, plan.text)])  # [Q, C]
    scores = retrieval_scores(img[q_rows], txt[q_rows], img[c_rows], txt[c_rows])
    positive = torch.zeros_like(c_rows, dtype=torch.bool)
    positive[:, 0] = True
    ranks = {s: positive_rank(scores[s], positive) for s in SIMILARITIES}                               # [Q] each
    out: dict[str, Any] = {f"hit@{k}": {s: hit_at_k(ranks[s], (k,))[k] for s in SIMILARITIES} for k in KS}
    q_type = [index.group_type[g] for g in plan.group]
    by_type: dict[str, Any] = {}
    for rtype in sorted(set(q_type)):
        sel = torch.tensor([t == rtype for t in q_type])
        by_type[rtype] = {"queries": int(sel.sum())} | {
            f"hit@{k}": {s: hit_at_k(ranks[s][sel], (k,))[k] for s in SIMILARITIES} for k in (1, 5)}
    return out | {"by_type": by_type, "queries": len(plan.item), "candidates": c_rows.shape[1],
                  "available_queries": plan.available, "skipped": plan.skipped}


def _gallery(plan: GalleryPlan, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    pooled: dict[str, list[torch.Tensor]] = {"image_to_text": [], "text_to_image": []}
    by_type: dict[str, Any] = {}
    for rtype, (items, groups, texts) in plan.rows.items():
        rows = torch.tensor([row_of[(i, t)] for i, t in zip(items, texts)])     # [n]
        g = torch.tensor(groups)
        positive = g[:, None] == g[None, :]                                     # [n, n]
        sim = img[rows] @ txt[rows].T                                           # [n, n] image x text
        entry = {"items": len(items)}
        for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
            ranks = torch.cat([positive_rank(s[i:i + 2048], positive[i:i + 2048]) for i in range(0, len(items), 2048)])
            pooled[name].append(ranks)
            entry[name] = gallery_metrics(s, positive, KS)
        by_type[rtype] = entry
    out: dict[str, Any] = {}
    for name, parts in pooled.items():
        ranks = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        out[name] = {f"R@{k}": v for k, v in hit_at_k(ranks, KS).items()}
        out[name]["MRR"] = float((1.0 / ranks.double()).mean()) if ranks.numel() else float("nan")
    return out | {"queries": sum(len(v[0]) for v in plan.rows.values()), "by_type": by_type}


def _relation_type(plan: PairPlan, index: EvalIndex, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    if not plan.a:
        return {"pairs": 0}
    type_id = {t: i for i, t in enumerate(index.types)}
    pair_index, type_index, a_rows, b_rows = [], [], [], []
    true = torch.zeros(len(plan.a), len(index.types), dtype=torch.bool)                 # [P, types]
    for p, (a, b, cands, shared) in enumerate(zip(plan.a, plan.b, plan.candidates, plan.shared)):
        for g, t in cands:
            pair_index.append(p)
            type_index.append(type_id[index.group_type[g]])
            a_rows.append(row_of[(a, t)])
            b_rows.append(row_of[(b, t)])
        for g in shared:
            true[p, type_id[index.group_type[g]]] = True
    ar, br = torch.tensor(a_rows), torch.tensor(b_rows)
    score = retrieval_scores(img[ar], txt[ar], img[br][:, None], txt[br][:, None])["AVG"][:, 0]  # [M]
    out = relation_type_accuracy(torch.tensor(pair_index), torch.tensor(type_index), score, true, (1, 3))
    return out | {"pairs": len(plan.a), "types": len(index.types)}


def _validity(plan: PairPlan, row_of: dict, img: torch.Tensor, txt: torch.Tensor, seed: int) -> dict:
    examples = [(a, b, t, label) for a, b, valid, invalid in zip(plan.a, plan.b, plan.valid, plan.invalid)
                if invalid is not None for t, label in ((valid, 1), (invalid, 0))]
    pairs = len(examples) // 2
    if pairs < 10:
        return {"pairs": pairs, "note": "fewer than 10 pairs with an invalid relation: no probe"}
    ar = torch.tensor([row_of[(a, t)] for a, _, t, _ in examples])
    br = torch.tensor([row_of[(b, t)] for _, b, t, _ in examples])
    ua, ta, ub, tb = img[ar], txt[ar], img[br], txt[br]
    features = torch.cat([ua * ub, ta * tb, ua * tb, ta * ub], dim=1)                 # [2P, 4D]
    labels = torch.tensor([label for *_, label in examples])
    order = list(range(pairs))
    random.Random(seed + 3).shuffle(order)
    n_train = int(round(0.7 * pairs))
    split = torch.zeros(len(examples), dtype=torch.bool)                              # True = train
    for p in order[:n_train]:
        split[2 * p:2 * p + 2] = True
    out = linear_probe(features[split], labels[split], features[~split], labels[~split])
    return out | {"pairs": pairs, "train_examples": int(split.sum()), "test_examples": int((~split).sum())}


# ------------------------------------------------------------------------------------------ driver
@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, samples: Sequence[dict[str, Any]], *, mode: str, context_length: int,
             image_size: int, negatives: int = 20, seed: int = 0, device: torch.device | str = "cpu",
             batch_size: int = 64, max_queries: int | None = 4000, max_pairs: int = 1000,
             max_gallery: int | None = 2000) -> dict[str, Any]:
    """Run the four tasks on ``samples`` (dicts with ``key``, ``image`` (PIL), ``caption``, ``relations``).

    Returns the report dict (``retrieval.hit@5.AVG`` etc.; see the module docstring). Deterministic in
    ``seed`` and the order of ``samples``; identical on every rank that passes the same samples.
    """
    samples = list(samples)
    index = build_index(samples)
    queries = plan_queries(index, negatives, seed, max_queries)
    gallery = plan_gallery(index, seed, max_gallery)
    pairs = plan_pairs(index, queries, seed, max_pairs)

    rows = RowTable()
    for q, t, cands in zip(queries.item, queries.text, queries.candidates):
        rows(q, t)
        for c in cands:
            rows(c, t)
    for items, _, texts in gallery.rows.values():
        for i, t in zip(items, texts):
            rows(i, t)
    for a, b, cands, valid, invalid in zip(pairs.a, pairs.b, pairs.candidates, pairs.valid, pairs.invalid):
        for t in [t for _, t in cands] + [valid] + ([invalid] if invalid is not None else []):
            rows(a, t)
            rows(b, t)

    was_training = model.training
    model.eval()
    try:
        with zero3_parameter_discovery(model):
            embedder = RowEmbedder(model, tokenizer, mode=mode, context_length=context_length,
                                   image_size=image_size, device=device, batch_size=batch_size)
            img, txt = embedder.embed([s["image"] for s in samples], index.captions, index.texts, rows.items(),
                                      rows.texts())
    finally:
        model.train(was_training)
    row_of = rows.index

    type_counts: dict[str, int] = {}
    for g, members in enumerate(index.members):
        type_counts[index.group_type[g]] = type_counts.get(index.group_type[g], 0) + len(members)
    return {
        "mode": mode,
        "seed": seed,
        "negatives": negatives,
        "retrieval": _retrieval(queries, index, row_of, img, txt),
        "gallery": _gallery(gallery, row_of, img, txt),
        "relation_type": _relation_type(pairs, index, row_of, img, txt),
        "validity": _validity(pairs, row_of, img, txt, seed),
        "counts": {"items": index.num_items, "groups": len(index.groups), "relation_texts": len(index.texts),
                   "rows_embedded": len(rows), "relations_by_type": dict(sorted(type_counts.items())),
                   "groups_with_2_or_more": sum(len(m) >= 2 for m in index.members)},
    }


from rcml.eval_report import log_to_mlflow, write_report  # noqa: E402  (public API of this module)

__all__ = ["evaluate", "write_report", "log_to_mlflow", "RowEmbedder"]
