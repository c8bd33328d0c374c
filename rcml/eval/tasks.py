"""The evaluation driver: plan every task, embed the distinct (item, relation) rows once, score.

``evaluate(model, tokenizer, samples, ...)`` returns the report dict (see rcml/eval/__init__.py for the
tasks). Rows are embedded through the public embedding API (``rcml.embedding.RCMLEmbedder``), which runs
each tower once per distinct item and pools every row under its relation.

Distributed use: every rank calls ``evaluate`` with the same samples; the plan and the batches are
identical on every rank, so ZeRO-3's collective parameter gathers match. Only rank 0 should write.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from rcml.config import MODES, EvalConfig
from rcml.embedding import RCMLEmbedder
from rcml.eval.baselines import BlindScorers, gallery_baselines, retrieval_baselines, type_only_probe, type_prior
from rcml.eval.metrics import (KS, SIMILARITIES, gallery_ranks, hit_at_k, hit_table, linear_probe, masks_by_label,
                               mean_reciprocal_rank, positive_rank, relation_type_accuracy, retrieval_scores)
from rcml.eval.plan import (EvalIndex, GalleryPlan, PairPlan, QueryPlan, RowTable, build_index, plan_gallery,
                            plan_pairs, plan_queries)


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


EMBED_CALLS_PER_UPDATE = 4  # tower calls (of ``embedder.batch_size`` items) per progress-bar update


def _progress_disabled() -> bool | None:
    """tqdm's ``disable``: True on ranks other than 0 (one bar per job), else None (a bar iff stderr is a
    terminal, so logs and redirected output get none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return True
    return None


def embed_rows(embedder: RCMLEmbedder, images: list, index: EvalIndex, rows: RowTable) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Every row (item, relation text) -> (image embeddings [B, D], text embeddings [B, D]), float32 CPU.

    Rows go to the embedder a few tower batches of items at a time, every row of an item in the same call
    (so each item's towers still run once), with a progress bar of rows on stderr.
    """
    import sys

    from tqdm import tqdm

    items, texts = rows.items(), [index.texts[t] for t in rows.texts()]
    rows_of: dict[int, list[int]] = {}
    for r, i in enumerate(items):  # distinct items in first-row order, as the embedder batches them
        rows_of.setdefault(i, []).append(r)
    order = list(rows_of)
    step = embedder.batch_size * EMBED_CALLS_PER_UPDATE
    dim = int(embedder.spec["embed_dim"])
    img, txt = torch.empty(len(items), dim), torch.empty(len(items), dim)                 # [B, D] each
    with tqdm(total=len(items), desc="embedding rows", unit="row", file=sys.stderr,
              disable=_progress_disabled()) as bar:
        for start in range(0, len(order), step):
            part = [r for i in order[start:start + step] for r in rows_of[i]]
            part_texts = [texts[r] for r in part]
            img[part] = embedder.embed_images([images[items[r]] for r in part], part_texts)
            txt[part] = embedder.embed_texts([index.captions[items[r]] for r in part], part_texts)
            bar.update(len(part))
    return img, txt


# ------------------------------------------------------------------------------------------- tasks
def _retrieval(plan: QueryPlan, index: EvalIndex, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    if not plan.item:
        return hit_table({s: torch.zeros(0) for s in SIMILARITIES}) | {"queries": 0, "protocol": plan.protocol}
    q_rows = torch.tensor([row_of[(q, t)] for q, t in zip(plan.item, plan.text)])                       # [Q]
    c_rows = torch.tensor([[row_of[(c, t)] for c in cands] for cands, t in zip(plan.candidates, plan.text)])  # [Q, C]
    scores = retrieval_scores(img[q_rows], txt[q_rows], img[c_rows], txt[c_rows])
    positive = torch.zeros_like(c_rows, dtype=torch.bool)
    positive[:, 0] = True
    ranks = {s: positive_rank(scores[s], positive) for s in SIMILARITIES}                               # [Q] each
    by_type = {rtype: {"queries": int(sel.sum())} | hit_table({s: r[sel] for s, r in ranks.items()}, (1, 5))
               for rtype, sel in masks_by_label([index.group_type[g] for g in plan.group]).items()}
    negatives = c_rows.shape[1] - 1
    return hit_table(ranks) | {
        "protocol": plan.protocol, "by_type": by_type, "queries": len(plan.item), "candidates": c_rows.shape[1],
        "confusable_fraction": sum(plan.confusable) / (negatives * len(plan.item)),
        "available_queries": plan.available, "skipped": plan.skipped}


def _gallery(plan: GalleryPlan, index: EvalIndex, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    pooled: dict[str, list[torch.Tensor]] = {"image_to_text": [], "text_to_image": []}
    by_type: dict[str, dict[str, list[torch.Tensor]]] = {}
    for g, t, cands, members, queries in zip(plan.group, plan.text, plan.candidates, plan.num_members, plan.queries):
        rows = torch.tensor([row_of[(c, t)] for c in cands])                      # [n]
        position = {c: j for j, c in enumerate(cands)}
        q_pos = [position[q] for q in queries]
        q_rows = rows[torch.tensor(q_pos)]                                        # [q]
        for name, sim in (("image_to_text", img[q_rows] @ txt[rows].T), ("text_to_image", txt[q_rows] @ img[rows].T)):
            ranks = gallery_ranks(sim, q_pos, members)                            # [q]
            pooled[name].append(ranks)
            by_type.setdefault(index.group_type[g], {}).setdefault(name, []).append(ranks)

    def summary(parts: list[torch.Tensor]) -> dict[str, float]:
        ranks = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return {f"R@{k}": v for k, v in hit_at_k(ranks, KS).items()} | {"MRR": mean_reciprocal_rank(ranks)}

    return {name: summary(parts) for name, parts in pooled.items()} | {
        "galleries": len(plan.group), "queries": sum(len(q) for q in plan.queries),
        "mean_candidates": sum(len(c) for c in plan.candidates) / max(1, len(plan.candidates)),
        "by_type": {rtype: {name: summary(parts) for name, parts in v.items()} for rtype, v in sorted(by_type.items())}}


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


def _validity_examples(plan: PairPlan, index: EvalIndex, seed: int):
    """(a, b, text, label, type) examples, one valid and one invalid relation per pair, and the train split."""
    examples = [(a, b, t, label, index.group_type[g])
                for a, b, vt, vg, it, ig in zip(plan.a, plan.b, plan.valid, plan.valid_group, plan.invalid,
                                                 plan.invalid_group)
                if it is not None for t, g, label in ((vt, vg, 1), (it, ig, 0))]
    pairs = len(examples) // 2
    order = list(range(pairs))
    random.Random(seed + 3).shuffle(order)
    split = torch.zeros(len(examples), dtype=torch.bool)                              # True = train
    for p in order[:int(round(0.7 * pairs))]:
        split[2 * p:2 * p + 2] = True
    return examples, split


def _validity(examples, split, row_of: dict, img: torch.Tensor, txt: torch.Tensor) -> dict:
    pairs = len(examples) // 2
    if pairs < 10:
        return {"pairs": pairs, "note": "fewer than 10 pairs with an invalid relation: no probe"}
    ar = torch.tensor([row_of[(a, t)] for a, _, t, _, _ in examples])
    br = torch.tensor([row_of[(b, t)] for _, b, t, _, _ in examples])
    ua, ta, ub, tb = img[ar], txt[ar], img[br], txt[br]
    features = torch.cat([ua * ub, ta * tb, ua * tb, ta * ub], dim=1)                 # [2P, 4D]
    labels = torch.tensor([e[3] for e in examples])
    out = linear_probe(features[split], labels[split], features[~split], labels[~split])
    return out | {"pairs": pairs, "train_examples": int(split.sum()), "test_examples": int((~split).sum())}


# ------------------------------------------------------------------------------------------ driver
@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, samples: Sequence[dict[str, Any]], *, mode: str, context_length: int,
             image_size: int, negatives: int = EvalConfig.negatives, seed: int = EvalConfig.seed, batch_size: int = 64, max_queries: int | None = 4000, max_pairs: int = 1000,
             max_galleries: int | None = 64, gallery_items: int = 256) -> dict[str, Any]:
    """Run every task on ``samples`` (dicts with ``key``, ``image`` (PIL), ``caption``, ``relations``).

    ``model`` is an ``RCMLModel`` (or a ZeRO-3 engine's module) on the device to evaluate on. Returns the
    report dict. Deterministic in ``seed`` and the order of ``samples``;
    identical on every rank that passes the same samples.
    """
    spec = dict(model.spec, mode=mode, context_length=context_length, image_size=image_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {'|'.join(MODES)}, got {mode!r}")
    samples = list(samples)
    index = build_index(samples)
    queries = {p: plan_queries(index, negatives, seed, max_queries, protocol=p) for p in ("random", "confusable")}
    gallery = plan_gallery(index, seed, max_galleries, gallery_items)
    pairs = plan_pairs(index, queries["random"], seed, max_pairs)
    examples, split = _validity_examples(pairs, index, seed)

    rows = RowTable()
    for plan in queries.values():
        for q, t, cands in zip(plan.item, plan.text, plan.candidates):
            rows(q, t)
            for c in cands:
                rows(c, t)
    for t, cands in zip(gallery.text, gallery.candidates):
        for c in cands:
            rows(c, t)
    for a, b, cands in zip(pairs.a, pairs.b, pairs.candidates):
        for _, t in cands:
            rows(a, t)
            rows(b, t)
    for a, b, t, _, _ in examples:
        rows(a, t)
        rows(b, t)

    was_training = model.training
    model.eval()
    try:
        with zero3_parameter_discovery(model):
            embedder = RCMLEmbedder(model, tokenizer, spec, batch_size=batch_size)
            img, txt = embed_rows(embedder, [s["image"] for s in samples], index, rows)
    finally:
        model.train(was_training)
    row_of = rows.index

    scorers = BlindScorers(index)
    type_counts: dict[str, int] = {}
    for g, members in enumerate(index.members):
        type_counts[index.group_type[g]] = type_counts.get(index.group_type[g], 0) + len(members)
    baselines = {
        "retrieval": retrieval_baselines(queries["random"], scorers, index.group_type),
        "retrieval_confusable": retrieval_baselines(queries["confusable"], scorers, index.group_type),
        "gallery": gallery_baselines(gallery, scorers),
        "relation_type": {"type_prior": type_prior(pairs, index)},
        "validity": ({"type_only": type_only_probe([e[4] for e in examples], torch.tensor([e[3] for e in examples]),
                                                   split)} if len(examples) >= 20 else {}),
    }
    return {
        "mode": mode,
        "seed": seed,
        "negatives": negatives,
        "retrieval": _retrieval(queries["random"], index, row_of, img, txt),
        "retrieval_confusable": _retrieval(queries["confusable"], index, row_of, img, txt),
        "gallery": _gallery(gallery, index, row_of, img, txt),
        "relation_type": _relation_type(pairs, index, row_of, img, txt),
        "validity": _validity(examples, split, row_of, img, txt),
        "baselines": baselines,
        "counts": {"items": index.num_items, "groups": len(index.groups), "relation_texts": len(index.texts),
                   "rows_embedded": len(rows), "relations_by_type": dict(sorted(type_counts.items())),
                   "groups_with_2_or_more": sum(len(m) >= 2 for m in index.members)},
    }
