"""rcml.eval.evaluate with a small real RCMLModel: row embedding vs direct encode calls, retrieval vs a
naive per-query float64 recomputation, report layout, determinism, report files, MLflow, and the CLI."""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.train_tokenizer import build_tokenizer
from rcml.batch import clip_mode_text
from rcml.config import ModelConfig
from rcml.data import image_transform
from rcml.eval import RowEmbedder, evaluate, log_to_mlflow, write_report
from rcml.eval_metrics import SIMILARITIES
from rcml.eval_plan import build_index, plan_queries
from rcml.model import build_model
from rcml.tokenizer import TextTokenizer

L, S = 12, 16  # context length, image size

SIZE = {"embed_dim": 24, "pool_heads": 2,
        "vision": {"image_size": S, "patch_size": 8, "width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2},
        "text": {"width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2}}


def make_samples(n=31, seed=0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue"], ["circle", "square", "star", "moon", "heart"]
    out = []
    for i in range(n):
        c, s = rng.choice(colours), rng.choice(shapes)
        pixels = np.random.RandomState(seed * 1000 + i).randint(0, 256, (S + 3, S + 1, 3), dtype=np.uint8)
        rels = [{"group": f"colour:{c}", "type": "colour", "text": f"both are {c}"},
                {"group": f"shape:{s}", "type": "shape", "text": f"both are {s}s"}]
        if i % 3 == 0:
            rels.append({"group": f"tag:{i % 2}", "type": "tag", "text": f"tagged {'odd' if i % 2 else 'even'}"})
        out.append({"key": f"item{i:03d}", "image": Image.fromarray(pixels), "caption": f"a {c} {s} numbered {i}",
                    "relations": rels})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [s["caption"] for s in make_samples()] + [r["text"] for s in make_samples() for r in s["relations"]]
    return TextTokenizer(build_tokenizer(iter(texts * 3), 300))


def tiny_model(tmp_path_factory, tokenizer, mode="rcml", beta=0.3, seed=0):
    path = tmp_path_factory.mktemp("size") / "micro.json"
    path.write_text(json.dumps(SIZE))
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=str(path), mode=mode, beta=beta), vocab_size=tokenizer.vocab_size,
                        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                        context_length=L, image_size=S, impl="torch")
    return model.eval()


def direct_rows(model, tokenizer, samples, texts, rows, mode):
    """Reference: every row through the public encode_* contract, one row per call."""
    tf = image_transform(S, train=False)
    img, txt = [], []
    for item, t in rows:
        pixels = tf(samples[item]["image"])[None]
        rel = model.encode_relations(*tokenizer.encode([texts[t]], L))
        zero = torch.zeros(1, dtype=torch.long)
        img.append(model.encode_images(pixels, rel, zero, zero))
        caption = samples[item]["caption"]
        ids, mask = tokenizer.encode([clip_mode_text(caption, texts[t]) if mode == "clip" else caption], L)
        txt.append(model.encode_texts(ids, mask, rel, zero, zero))
    return torch.cat(img).double(), torch.cat(txt).double()


@pytest.mark.parametrize("mode", ["rcml", "clip"])
@torch.no_grad()
def test_row_embedder_matches_direct_encode(tmp_path_factory, tokenizer, mode):
    samples = make_samples()
    model = tiny_model(tmp_path_factory, tokenizer, mode)
    index = build_index(samples)
    rng = random.Random(1)
    rows = list({(rng.randrange(len(samples)), rng.randrange(len(index.texts))) for _ in range(40)})
    # small chunks on purpose: items split over tower calls, rows split over pooling calls
    embedder = RowEmbedder(model, tokenizer, mode=mode, context_length=L, image_size=S, device="cpu", batch_size=4,
                           max_rows_per_call=3)
    img, txt = embedder.embed([s["image"] for s in samples], index.captions, index.texts, [r[0] for r in rows],
                              [r[1] for r in rows])
    ref_img, ref_txt = direct_rows(model, tokenizer, samples, index.texts, rows, mode)
    torch.testing.assert_close(img.double(), ref_img, atol=2e-5, rtol=0)
    torch.testing.assert_close(txt.double(), ref_txt, atol=2e-5, rtol=0)
    if mode == "rcml":  # the relation changes the embedding of one item ...
        assert len({tuple(img[i].tolist()) for i, (item, _) in enumerate(rows) if item == rows[0][0]}) == \
            sum(1 for item, _ in rows if item == rows[0][0])
    else:  # ... and in clip mode the image embedding does not depend on it
        same = [i for i, (item, _) in enumerate(rows) if item == rows[0][0]]
        for i in same:
            torch.testing.assert_close(img[i], img[same[0]])


@torch.no_grad()
def test_retrieval_matches_naive_per_query_recomputation(tmp_path_factory, tokenizer):
    samples = make_samples()
    model = tiny_model(tmp_path_factory, tokenizer, "rcml", beta=0.2, seed=3)
    negatives, seed = 6, 5
    report = evaluate(model, tokenizer, samples, mode="rcml", context_length=L, image_size=S, negatives=negatives,
                      seed=seed, batch_size=5, max_queries=25)
    index = build_index(samples)
    plan = plan_queries(index, negatives, seed, 25)
    assert report["retrieval"]["queries"] == len(plan.item) == 25
    hits = {s: {1: 0, 5: 0, 10: 0} for s in SIMILARITIES}
    for q, t, cands in zip(plan.item, plan.text, plan.candidates):
        assert q not in cands and len(set(cands)) == negatives + 1
        qi, qt = direct_rows(model, tokenizer, samples, index.texts, [(q, t)], "rcml")
        ci, ct = direct_rows(model, tokenizer, samples, index.texts, [(c, t) for c in cands], "rcml")
        sims = {"TT": ct @ qt[0], "II": ci @ qi[0], "TI": ci @ qt[0], "IT": ct @ qi[0]}
        sims["AVG"] = (sims["TT"] + sims["II"] + sims["TI"] + sims["IT"]) / 4
        for s, v in sims.items():
            rank = 1 + sum(1 for j in range(1, len(cands)) if v[j] >= v[0] - 1e-9)
            for k in (1, 5, 10):
                hits[s][k] += rank <= k
    for s in SIMILARITIES:
        for k in (1, 5, 10):
            assert report["retrieval"][f"hit@{k}"][s] == pytest.approx(hits[s][k] / 25, abs=1e-9), (s, k)


def test_plan_respects_groups_and_is_deterministic():
    samples = make_samples(47, seed=2)
    index = build_index(samples)
    a, b = plan_queries(index, 5, 7, None), plan_queries(index, 5, 7, None)
    assert a == b
    assert plan_queries(index, 5, 8, None).candidates != a.candidates
    for q, g, cands in zip(a.item, a.group, a.candidates):
        members = set(index.members[g])
        assert q in members and cands[0] in members and cands[0] != q
        assert not members & set(cands[1:])
    # every (item, relation) with a partner and enough outsiders is a query
    expected = sum(1 for rels in index.item_relations for g, _ in rels if len(index.members[g]) >= 2)
    assert len(a.item) == a.available == expected


@torch.no_grad()
def test_report_layout_determinism_files_and_mlflow(tmp_path_factory, tmp_path, tokenizer, monkeypatch):
    samples = make_samples(29, seed=4)
    model = tiny_model(tmp_path_factory, tokenizer, "clip")
    kwargs = dict(mode="clip", context_length=L, image_size=S, negatives=5, seed=0, batch_size=7)
    report = evaluate(model, tokenizer, samples, **kwargs)
    assert report == evaluate(model, tokenizer, samples, **kwargs)
    for k in (1, 5, 10):
        assert set(report["retrieval"][f"hit@{k}"]) == set(SIMILARITIES)
        assert all(0.0 <= v <= 1.0 for v in report["retrieval"][f"hit@{k}"].values())
    for s in SIMILARITIES:  # Hit@K is monotone in K
        assert report["retrieval"]["hit@1"][s] <= report["retrieval"]["hit@5"][s] <= report["retrieval"]["hit@10"][s]
    assert report["counts"]["items"] == 29 and report["seed"] == 0
    for direction in ("image_to_text", "text_to_image"):
        g = report["gallery"][direction]
        assert 0 < g["MRR"] <= 1 and g["R@1"] <= g["R@5"] <= g["R@10"]
    assert 0 <= report["relation_type"]["top1"] <= report["relation_type"]["top3"] <= 1
    assert report["validity"]["pairs"] >= 10 and 0 <= report["validity"]["auc"] <= 1

    out = write_report(report, tmp_path / "eval")
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["retrieval"]["hit@5"] == pytest.approx(report["retrieval"]["hit@5"])
    assert "| Hit@5 |" in (out / "report.md").read_text()
    assert Image.open(out / "hits.png").size[0] > 100

    import mlflow

    assert log_to_mlflow(report, out) is False  # no active run: nothing logged, no error
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("eval-test")
    with mlflow.start_run() as run:
        assert log_to_mlflow(report, out) is True
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["eval/retrieval/hit_at_5/AVG"] == pytest.approx(report["retrieval"]["hit@5"]["AVG"])


def test_cli_on_shards_and_export(tmp_path_factory, tmp_path, tokenizer, monkeypatch):
    import pyarrow as pa

    from data_prep.build_shards import build_shards
    from launch.evaluate import main
    from rcml.export import write_export

    samples = make_samples(23, seed=6)
    images = []
    for s in samples:
        buf = io.BytesIO()
        s["image"].save(buf, format="PNG")
        images.append(buf.getvalue())
    items = pa.table({"id": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
                      "image": images})
    rels = pa.table({name: [str(r[name]) if name != "id" else s["key"] for s in samples for r in s["relations"]]
                     for name in ("id", "group", "type", "text")})
    manifest = build_shards(items, rels, None, tmp_path / "shards", shard_size=10, progress=False)
    model = tiny_model(tmp_path_factory, tokenizer, "rcml")
    tok_path = tmp_path / "tokenizer.json"
    tokenizer._tok.save(str(tok_path))
    export = write_export(tmp_path / "export", {k: v.clone() for k, v in model.state_dict().items()}, model.spec,
                          tok_path, "seed: 0\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "eval"
    rc = main(["--checkpoint", str(export), "--shards", manifest["pattern"], "--out", str(out), "--negatives", "4",
               "--max-items", "21", "--mlflow", "--batch-size", "8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["items"] == 21 and report["mode"] == "rcml" and report["negatives"] == 4
    assert set(report["retrieval"]["hit@5"]) == set(SIMILARITIES)
    assert (out / "mlflow.db").is_file()
    assert main(["--checkpoint", str(tmp_path / "nope"), "--shards", manifest["pattern"], "--out", str(out)]) == 2
