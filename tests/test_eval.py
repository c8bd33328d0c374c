"""rcml.eval.evaluate with a small real RCMLModel: row embedding vs direct encode calls, retrieval vs a
naive per-query float64 recomputation, report layout, determinism, report files, MLflow, and the CLI."""

import io
import json
import os
import random

import pytest
import torch
from PIL import Image

from data_prep.train_tokenizer import build_tokenizer
from rcml.batch import clip_mode_text
from rcml.config import ModelConfig
from rcml.preprocess import ImageTransform
from rcml.embedding import RCMLEmbedder
from rcml.eval import aggregate_reports, embed_rows, evaluate, log_to_mlflow, write_report
from rcml.eval.baselines import BlindScorers, retrieval_baselines
from rcml.eval.metrics import HIT_COLUMNS, MODALITIES, SIMILARITIES
from rcml.eval.plan import RowTable, build_index, plan_gallery, plan_queries
from rcml.model import build_model
from rcml.tokenizer import TextTokenizer
from tests.eval_samples import SIZE, L, S, make_samples
from tests.shard_samples import good_members, write_tar


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
    tf = ImageTransform(S, train=False)
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


def embedder_for(model, tokenizer, **kwargs):
    return RCMLEmbedder(model, tokenizer, model.spec, **kwargs)


@pytest.mark.parametrize("mode", ["rcml", "clip"])
@torch.no_grad()
def test_row_embedding_matches_direct_encode(tmp_path_factory, tokenizer, mode):
    samples = make_samples()
    model = tiny_model(tmp_path_factory, tokenizer, mode)
    index = build_index(samples)
    rng = random.Random(1)
    table = RowTable()
    for _ in range(40):
        table(rng.randrange(len(samples)), rng.randrange(len(index.texts)))
    rows = list(table.index)
    # small chunks on purpose: items split over tower calls, rows split over pooling calls
    embedder = embedder_for(model, tokenizer, batch_size=4, max_rows_per_call=3)
    img, txt = embed_rows(embedder, [s["image"] for s in samples], index, table)
    ref_img, ref_txt = direct_rows(model, tokenizer, samples, index.texts, rows, mode)
    torch.testing.assert_close(img.double(), ref_img, atol=2e-5, rtol=0)
    torch.testing.assert_close(txt.double(), ref_txt, atol=2e-5, rtol=0)
    same = [i for i, (item, _) in enumerate(rows) if item == rows[0][0]]
    if mode == "rcml":  # the relation changes the embedding of one item ...
        assert len({tuple(img[i].tolist()) for i in same}) == len(same)
    else:  # ... and in clip mode the image embedding does not depend on it
        for i in same:
            torch.testing.assert_close(img[i], img[same[0]])


@torch.no_grad()
def test_public_embedding_api_through_from_pretrained(tmp_path_factory, tmp_path, tokenizer):
    """rcml.from_pretrained(path).embed_images / embed_texts: shapes, norms, relation (in)dependence."""
    import rcml
    from rcml.export import write_export

    samples = make_samples(7, seed=9)
    images, captions = [s["image"] for s in samples], [s["caption"] for s in samples]
    rel_a, rel_b = ["both are red"] * 7, ["both are circles"] * 7
    tok_path = tmp_path / "tokenizer.json"
    tokenizer._tok.save(str(tok_path))
    loaded = {}
    for name, mode, beta in (("rcml", "rcml", 0.3), ("beta_1", "rcml", 1.0), ("clip", "clip", 1.0)):
        model = tiny_model(tmp_path_factory, tokenizer, mode, beta=beta, seed=4)
        export = write_export(tmp_path / name, {k: v.clone() for k, v in model.state_dict().items()}, model.spec,
                              tok_path, "seed: 0\n")
        loaded[name] = rcml.from_pretrained(export)
    for name, m in loaded.items():
        u_a, t_a = m.embed_images(images, rel_a), m.embed_texts(captions, rel_a)
        u_b, t_b = m.embed_images(images, rel_b), m.embed_texts(captions, rel_b)
        u_0, t_0 = m.embed_images(images), m.embed_texts(captions)
        for e in (u_a, t_a, u_b, t_b, u_0, t_0):
            assert e.shape == (7, 24) and e.dtype == torch.float32 and e.device.type == "cpu"
            torch.testing.assert_close(e.norm(dim=1), torch.ones(7))
        # row i is the same as embedding it alone: batching and de-duplication change nothing
        torch.testing.assert_close(m.embed_images(images[3:4], rel_a[3:4])[0], u_a[3], atol=1e-5, rtol=0)
        # global embedding = the normalized projected CLS / eos state
        feats = m.model.image_features(torch.stack([m.transform(im) for im in images]))
        torch.testing.assert_close(u_0, torch.nn.functional.normalize(feats.global_emb, dim=-1), atol=1e-5, rtol=0)
        changed_image = (u_a - u_b).abs().max() > 1e-3
        changed_text = (t_a - t_b).abs().max() > 1e-3
        if name == "rcml":
            assert changed_image and changed_text
            assert (u_a - u_0).abs().max() > 1e-3
        elif name == "beta_1":  # relation-blind: every relation gives the global embedding
            assert not changed_image and not changed_text
            torch.testing.assert_close(u_a, u_0)
            torch.testing.assert_close(t_a, t_0)
        else:  # clip: the relation is joined to the text, and images ignore it
            assert not changed_image and changed_text
            joined = m.embed_texts([clip_mode_text(c, r) for c, r in zip(captions, rel_a)])
            torch.testing.assert_close(t_a, joined)
    m = loaded["rcml"]
    with pytest.raises(ValueError, match="relations must be None or a list of 7"):
        m.embed_images(images, rel_a[:3])
    with pytest.raises(TypeError, match="must be a list"):
        m.embed_texts("a red circle")
    assert m.embed_images([]).shape == (0, 24)


def _naive_hits(model, tokenizer, samples, index, plan):
    hits = {s: {1: 0, 5: 0, 10: 0} for s in HIT_COLUMNS}
    for q, t, cands in zip(plan.item, plan.text, plan.candidates):
        qi, qt = direct_rows(model, tokenizer, samples, index.texts, [(q, t)], "rcml")
        ci, ct = direct_rows(model, tokenizer, samples, index.texts, [(c, t) for c in cands], "rcml")
        sims = {"TT": ct @ qt[0], "II": ci @ qi[0], "TI": ci @ qt[0], "IT": ct @ qi[0]}
        sims["AVG"] = (sims["TT"] + sims["II"] + sims["TI"] + sims["IT"]) / 4
        for s, v in sims.items():
            rank = 1 + sum(1 for j in range(1, len(cands)) if v[j] >= v[0] - 1e-9)
            for k in (1, 5, 10):
                hits[s][k] += rank <= k
    n = len(plan.item)
    return {k: {s: hits[s][k] / n for s in SIMILARITIES} | {"MEAN": sum(hits[s][k] for s in MODALITIES) / (4 * n)}
            for k in (1, 5, 10)}


@torch.no_grad()
def test_retrieval_both_protocols_match_naive_per_query_recomputation(tmp_path_factory, tokenizer):
    samples = make_samples()
    model = tiny_model(tmp_path_factory, tokenizer, "rcml", beta=0.2, seed=3)
    negatives, seed = 6, 5
    report = evaluate(model, tokenizer, samples, mode="rcml", context_length=L, image_size=S, negatives=negatives,
                      seed=seed, batch_size=5, max_queries=25)
    index = build_index(samples)
    for key, protocol in (("retrieval", "random"), ("retrieval_confusable", "confusable")):
        plan = plan_queries(index, negatives, seed, 25, protocol=protocol)
        assert report[key]["queries"] == len(plan.item) == 25 and report[key]["protocol"] == protocol
        for q, cands in zip(plan.item, plan.candidates):
            assert q not in cands and len(set(cands)) == negatives + 1
        expected = _naive_hits(model, tokenizer, samples, index, plan)
        for k in (1, 5, 10):
            assert report[key][f"hit@{k}"] == pytest.approx(expected[k], abs=1e-9), (key, k)
        assert report[key]["confusable_fraction"] == pytest.approx(sum(plan.confusable) / (25 * negatives))


def test_random_plan_respects_groups_and_is_deterministic():
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


def test_confusable_plan_draws_related_negatives_first_and_the_least_related_positive():
    samples = make_samples(47, seed=2)
    index = build_index(samples)
    groups = [{g for g, _ in rels} for rels in index.item_relations]
    rand = plan_queries(index, 5, 7, 60)
    conf = plan_queries(index, 5, 7, 60, protocol="confusable")
    assert conf == plan_queries(index, 5, 7, 60, protocol="confusable")
    assert (conf.item, conf.group, conf.text) == (rand.item, rand.group, rand.text)  # same queries
    for q, g, cands, n_conf in zip(conf.item, conf.group, conf.candidates, conf.confusable):
        members, others = set(index.members[g]), groups[q] - {g}
        positive, negs = cands[0], cands[1:]
        assert positive in members and positive != q and not members & set(negs)
        # the positive shares the fewest other groups with q among the members
        assert len(groups[positive] & others) == min(len(groups[p] & others) for p in members - {q})
        related = {c for h in others for c in index.members[h]} - members
        is_related = [c in related for c in negs]
        assert n_conf == sum(is_related) == min(5, len(related))
        assert is_related == sorted(is_related, reverse=True)  # related ones first, then the top-up
        # the most related of them: no related item left out shares more other groups with q
        overlap = [len(groups[c] & others) for c in negs if c in related]
        assert overlap == sorted(overlap, reverse=True)
        left_out = [len(groups[c] & others) for c in related - set(negs)]
        assert not overlap or not left_out or max(left_out) <= min(overlap)
    assert sum(conf.confusable) > 2 * sum(rand.confusable)  # dense toy data: random negatives are often related too
    with pytest.raises(ValueError, match="protocol"):
        plan_queries(index, 5, 7, 60, protocol="hard")


def test_blind_baselines_match_naive_scoring_and_confusable_defeats_them():
    """Shared-group count and caption overlap, recomputed by hand; under the confusable protocol a
    relation-blind scorer loses what it wins under random negatives, while a relation-aware oracle
    (is the candidate in the query's group?) keeps Hit@1 = 1 on both."""
    samples = make_samples(61, seed=3)
    index = build_index(samples)
    scorers = BlindScorers(index)
    groups = [{g for g, _ in rels} for rels in index.item_relations]
    words = [set(c.lower().split()) for c in index.captions]
    results = {}
    for protocol in ("random", "confusable"):
        plan = plan_queries(index, 8, 1, None, protocol=protocol)
        got = retrieval_baselines(plan, scorers, index.group_type)
        for name, score in (("shared_groups", lambda a, b: len(groups[a] & groups[b])),
                            ("caption_overlap", lambda a, b: len(words[a] & words[b]) / len(words[a] | words[b]))):
            hits5, per_type = 0, {}
            for q, g, cands in zip(plan.item, plan.group, plan.candidates):
                s = [score(q, c) for c in cands]
                hit = 1 + sum(v >= s[0] for v in s[1:]) <= 5
                hits5 += hit
                per_type.setdefault(index.group_type[g], []).append(hit)
            assert got[name]["hit@5"] == pytest.approx(hits5 / len(plan.item)), (protocol, name)
            assert len(per_type) > 1 and set(got[name]["by_type"]) == set(per_type)
            for rtype, hits in per_type.items():
                assert got[name]["by_type"][rtype]["queries"] == len(hits)
                assert got[name]["by_type"][rtype]["hit@5"] == pytest.approx(sum(hits) / len(hits)), (name, rtype)
        oracle = [all(c not in index.members[g] for c in cands[1:]) and cands[0] in index.members[g]
                  for g, cands in zip(plan.group, plan.candidates)]
        assert all(oracle)
        results[protocol] = got
    assert results["confusable"]["shared_groups"]["hit@1"] < results["random"]["shared_groups"]["hit@1"] - 0.2


@torch.no_grad()
def test_gallery_is_conditioned_on_one_relation_and_matches_naive(tmp_path_factory, tokenizer):
    samples = make_samples(37, seed=5)
    model = tiny_model(tmp_path_factory, tokenizer, "rcml", beta=0.3, seed=2)
    report = evaluate(model, tokenizer, samples, mode="rcml", context_length=L, image_size=S, negatives=4, seed=1,
                      batch_size=6, max_galleries=3, gallery_items=12)
    index = build_index(samples)
    plan = plan_gallery(index, 1, 3, 12)
    assert report["gallery"]["galleries"] == len(plan.group) == 3
    assert sorted(index.group_type[g] for g in plan.group) == ["colour", "shape", "tag"]  # spread over types
    ranks = []
    for g, t, cands, n_members, queries in zip(plan.group, plan.text, plan.candidates, plan.num_members, plan.queries):
        assert set(cands[:n_members]) <= set(index.members[g]) and not set(cands[n_members:]) & set(index.members[g])
        related = {c for m in cands[:n_members] for h, _ in index.item_relations[m] if h != g
                   for c in index.members[h]} - set(index.members[g])
        distractors = cands[n_members:]
        assert set(distractors) <= related or related <= set(distractors)  # related distractors come first
        assert len(cands) <= 12 and set(queries) <= set(cands[:n_members])
        img, txt = direct_rows(model, tokenizer, samples, index.texts, [(c, t) for c in cands], "rcml")
        for q in queries:
            j = cands.index(q)
            sim = img[j] @ txt.T
            best = max(float(sim[m]) for m in range(n_members) if m != j)
            ranks.append(1 + sum(1 for m in range(n_members, len(cands)) if float(sim[m]) >= best))
    ranks = torch.tensor(ranks)
    assert report["gallery"]["image_to_text"]["R@1"] == pytest.approx(float((ranks <= 1).double().mean()))
    assert report["gallery"]["image_to_text"]["MRR"] == pytest.approx(float((1.0 / ranks.double()).mean()))


def test_report_layout_determinism_files_and_mlflow(tmp_path_factory, tmp_path, tokenizer, monkeypatch):
    samples = make_samples(29, seed=4)
    model = tiny_model(tmp_path_factory, tokenizer, "clip")
    kwargs = dict(mode="clip", context_length=L, image_size=S, negatives=5, seed=0, batch_size=7)
    report = evaluate(model, tokenizer, samples, **kwargs)
    assert report == evaluate(model, tokenizer, samples, **kwargs)
    for key in ("retrieval", "retrieval_confusable"):
        r = report[key]
        for k in (1, 5, 10):
            assert set(r[f"hit@{k}"]) == set(HIT_COLUMNS)
            assert all(0.0 <= v <= 1.0 for v in r[f"hit@{k}"].values())
            assert r[f"hit@{k}"]["MEAN"] == pytest.approx(sum(r[f"hit@{k}"][m] for m in MODALITIES) / 4)
        for s in HIT_COLUMNS:  # Hit@K is monotone in K
            assert r["hit@1"][s] <= r["hit@5"][s] <= r["hit@10"][s]
        assert 0 <= r["confusable_fraction"] <= 1
        for name in ("shared_groups", "caption_overlap"):
            assert 0 <= report["baselines"][key][name]["hit@5"] <= 1
    assert report["retrieval_confusable"]["confusable_fraction"] > report["retrieval"]["confusable_fraction"]
    assert report["counts"]["items"] == 29 and report["seed"] == 0
    for direction in ("image_to_text", "text_to_image"):
        g = report["gallery"][direction]
        assert 0 < g["MRR"] <= 1 and g["R@1"] <= g["R@5"] <= g["R@10"]
    assert set(report["baselines"]["gallery"]) == {"shared_groups", "caption_overlap"}
    assert 0 <= report["relation_type"]["top1"] <= report["relation_type"]["top3"] <= 1
    prior = report["baselines"]["relation_type"]["type_prior"]
    assert 0 <= prior["top1"] <= prior["top3"] <= 1 and sorted(prior["order"]) == ["colour", "shape", "tag"]
    assert report["validity"]["pairs"] >= 10 and 0 <= report["validity"]["auc"] <= 1
    assert 0 <= report["baselines"]["validity"]["type_only"]["auc"] <= 1

    out = write_report(report, tmp_path / "eval")
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["retrieval"]["hit@5"] == pytest.approx(report["retrieval"]["hit@5"])
    md = (out / "report.md").read_text()
    assert "| model Hit@5 |" in md and "| shared_groups (blind) Hit@5 |" in md and "confusable protocol" in md
    assert "| type prior (blind, fixed order) |" in md and "| type only (blind) |" in md
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
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "eval"
    rc = main(["--checkpoint", str(export), "--shards", manifest["pattern"], "--out", str(out), "--negatives", "4",
               "--max-items", "21", "--mlflow", "--batch-size", "8"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # exported by mlflow.set_tracking_uri inside main()
    assert rc == 0
    # the embedded store keeps its artifacts beside it, never in <cwd>/mlruns
    assert not list(cwd.iterdir()) and list((out / "mlartifacts").rglob("report.json"))
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["items"] == 21 and report["mode"] == "rcml" and report["negatives"] == 4
    assert set(report["retrieval_confusable"]["hit@5"]) == set(HIT_COLUMNS) and "baselines" in report
    assert (out / "mlflow.db").is_file()
    assert report["counts"]["ignored_members"] == {}
    assert main(["--checkpoint", str(tmp_path / "nope"), "--shards", manifest["pattern"], "--out", str(out)]) == 2

    # the run directory stands for its export/, the shard directory for its manifest's shards
    again = tmp_path / "eval_again"
    assert main(["--checkpoint", str(tmp_path), "--shards", str(tmp_path / "shards"), "--out", str(again),
                 "--negatives", "4", "--max-items", "21", "--batch-size", "8"]) == 0
    second = json.loads((again / "report.json").read_text())
    assert second["checkpoint"] == str(export.resolve()) and second["shards"] == manifest["pattern"]
    assert second["retrieval"] == report["retrieval"]


def test_cli_says_what_checkpoint_and_shards_it_expects(tmp_path, capsys):
    from launch.evaluate import main, resolve_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    (run / "checkpoints" / "step_00000040" / "mp_rank_00_model_states.pt").write_bytes(b"")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "s0.tar", [good_members("k0", random.Random(0))])

    def error(checkpoint, pattern=str(shards / "s0.tar")) -> str:
        assert main(["--checkpoint", str(checkpoint), "--shards", pattern, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
        return err

    # a step directory whose save never completed, and a run directory that holds nothing published
    for checkpoint in (run, run / "checkpoints", run / "checkpoints" / "step_00000040"):
        err = error(checkpoint)
        assert "holds no export/ and no published checkpoint" in err and "checkpoints/step_<n>" in err
    (run / "checkpoints" / ".tmp-step_00000060").mkdir()
    assert "whose save did not finish" in error(run / "checkpoints" / ".tmp-step_00000060")
    # latest naming a directory outside checkpoints/ is not followed
    (run / "checkpoints" / "latest").write_text("../elsewhere")
    assert "not a checkpoint directly inside" in error(run)
    # a published checkpoint is converted, after its files are checked: here COMPLETE lists no hashes
    (run / "checkpoints" / "step_00000040" / "COMPLETE").write_text(json.dumps({"step": 40, "world_size": 2}))
    (run / "checkpoints" / "latest").write_text("step_00000040")
    for checkpoint in (run, run / "checkpoints", run / "checkpoints" / "step_00000040"):
        assert main(["--checkpoint", str(checkpoint), "--shards", str(shards / "s0.tar"), "--out", str(tmp_path / "o")]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert lines[0].startswith("evaluating the training checkpoint") and len(lines) == 2, lines
        assert lines[1].startswith("error: ") and "lists no file hashes" in lines[1]
    # an export beside the checkpoints is what the run directory stands for
    (run / "export").mkdir()
    (run / "export" / "spec.json").write_text("{}")
    assert resolve_checkpoint(run) == (run / "export", False)
    err = error(tmp_path / "shards")
    assert "is not an RCML export (no spec.json)" in err and "<train.out_dir>/export" in err
    missing = str(tmp_path / "val-{0..3}.tar")
    err = error(run / "export", missing)  # found before the model is loaded
    assert f"--shards: shard pattern {missing!r} matches no file" in err


@torch.no_grad()
def test_embedding_progress_goes_to_stderr_and_each_item_is_embedded_once(tmp_path_factory, tokenizer,
                                                                           monkeypatch, capsys):
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    samples = make_samples()
    model = tiny_model(tmp_path_factory, tokenizer, "rcml")
    index = build_index(samples)
    table = RowTable()
    for item in range(len(samples)):
        for text in range(0, len(index.texts), 7):
            table(item, text)
    calls = []
    image_features = model.image_features
    monkeypatch.setattr(model, "image_features", lambda pixels: calls.append(len(pixels)) or image_features(pixels))
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    embed_rows(embedder_for(model, tokenizer, batch_size=4), [s["image"] for s in samples], index, table)
    assert calls == [4] * (len(samples) // 4) + [len(samples) % 4]  # one tower pass per item, full batches
    assert "embedding rows" in stderr.getvalue() and f"{len(table)}/{len(table)}" in stderr.getvalue()
    assert capsys.readouterr().out == ""


def test_aggregate_reports_mean_and_std_over_seeds():
    reports = [{"retrieval": {"hit@5": {"TT": 0.5, "II": 0.2}, "queries": 10, "protocol": "random"},
                "order": ["a", "b"], "auc": 0.7},
               {"retrieval": {"hit@5": {"TT": 0.7, "II": 0.4}, "queries": 10, "protocol": "random"},
                "order": ["b", "a"], "auc": float("nan")},
               {"retrieval": {"hit@5": {"TT": 0.9, "II": 0.3}, "queries": 10, "protocol": "random"},
                "order": ["a", "b"], "auc": 0.8}]
    mean, std = aggregate_reports(reports)
    assert mean["retrieval"]["hit@5"]["TT"] == pytest.approx(0.7)
    assert std["retrieval"]["hit@5"]["TT"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert std["retrieval"]["hit@5"]["II"] == pytest.approx(0.1)
    assert mean["retrieval"]["queries"] == 10 and std["retrieval"]["queries"] == 0
    assert mean["retrieval"]["protocol"] == "random" and "protocol" not in std["retrieval"]
    assert mean["order"] == ["a", "b"] and "order" not in std
    assert mean["auc"] is None and std["auc"] is None  # not finite in every seed: no mean
    one_mean, one_std = aggregate_reports(reports[:1])
    assert one_mean["retrieval"]["hit@5"] == reports[0]["retrieval"]["hit@5"] and one_std["auc"] == 0.0


def test_report_renders_hostile_labels_as_data(tmp_path):
    """Relation types and the mode come from shards and configs: in report.md they are cells, never markup, and
    matplotlib never parses them as TeX (an unbalanced ``$`` used to abort the plot, and with it the run)."""
    rng = random.Random(7)
    hostile = ["$\\frac{a}{$ | b", "<script>x</script>", "two\nlines | and pipes", "$x^2$"]

    def hits():
        return {s: rng.random() for s in HIT_COLUMNS}

    report = {"mode": "rc$ml", "seed": 3, "counts": {"items": 11, "groups": 4},
              "baselines": {"retrieval": {"caption_overlap": {"hit@5": 0.4}}}}
    for key in ("retrieval", "retrieval_confusable"):
        report[key] = {"queries": 13, "candidates": 9, "confusable_fraction": 0.25,
                       **{f"hit@{k}": hits() for k in (1, 5, 10)},
                       "by_type": {t: {"queries": rng.randint(1, 9), "hit@5": hits()} for t in hostile}}
    out = write_report(report, tmp_path / "eval")
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    by_type_rows = [line for line in table_lines if any(part in line for part in ("frac", "script", "lines", "x^2"))]
    assert len(by_type_rows) == 2 * len(hostile)  # each hostile type is one row of each by-type table ...
    width = 2 + len(HIT_COLUMNS)  # ... with exactly its columns: escaped pipes never open a new cell
    for line in by_type_rows:
        cells = [c for c in line.replace("\\|", "").split("|")[1:-1]]
        assert len(cells) == width, line
    assert Image.open(out / "hits.png").size[0] > 100
