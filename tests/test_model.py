"""RCMLModel: relation pooling against a naive per-row float64 computation, beta mix, eos pooling,
spec round trip, local pretrained towers, a training step, bf16."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rcml.batch import Batch
from rcml.config import ModelConfig
from rcml.model import RCMLModel, build_model

VOCAB, PAD, BOS, EOS, L, S = 97, 0, 1, 2, 12, 16
# A model small enough that a test takes milliseconds: 2 layers per tower, D = 24 over 3 pool heads.
MICRO = {"embed_dim": 24, "pool_heads": 3,
         "vision": {"image_size": S, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2},
         "text": {"width": 32, "layers": 2, "heads": 2, "mlp_ratio": 2}}


@pytest.fixture(scope="module")
def micro_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def make(name, *, mode="rcml", beta=0.3, seed=0, vocab=VOCAB, context=L, image_size=S, mix="normalized",
         text_pool_tokens="contextual", **paths):
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, mode=mode, beta=beta, mix=mix, text_pool_tokens=text_pool_tokens, **paths)
    return build_model(cfg, vocab_size=vocab, pad_id=PAD,
                       bos_id=BOS, eos_id=EOS, context_length=context, image_size=image_size)


def texts(n, seed, vocab=VOCAB, context=L):
    """Tokenizer-shaped ids: bos, random tokens (> eos), eos, pad; random lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, context + 1, (n,), generator=gen)
    ids = torch.randint(EOS + 1, vocab, (n, context), generator=gen)
    mask = torch.arange(context)[None] < lengths[:, None]
    ids[torch.arange(n), lengths - 1] = EOS
    ids[~mask] = PAD
    ids[:, 0] = BOS
    return ids, mask


def batch(items=5, relations=3, rows=None, seed=0, vocab=VOCAB, context=L, image_size=S):
    """Items under several relations and relations over several items (rows > items)."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = texts(items, seed, vocab, context)
    rel_ids, rel_mask = texts(relations, seed + 100, vocab, context)
    rows = rows or items + 3
    row_item = torch.cat([torch.arange(items), torch.randint(0, items, (rows - items,), generator=gen)])
    row_relation = torch.randint(0, relations, (rows,), generator=gen)
    return Batch(images=torch.randn(items, 3, image_size, image_size, generator=gen), text_ids=ids, text_mask=mask,
                 relation_ids=rel_ids, relation_mask=rel_mask, row_item=row_item, row_relation=row_relation,
                 group_ids=row_relation.clone())


# ------------------------------------------------------------------------- naive per-row reference
def first_eos_states(model, ids, mask):
    hidden = model.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    pos = [row.index(EOS) for row in ids.tolist()]
    return model.text_projection(hidden[torch.arange(len(pos)), pos]), hidden


def naive_pool(pool, tokens, valid, relation_emb, global_emb, beta, row_item, row_relation, mix="normalized"):
    """One row at a time: layer norms, projections, per-head softmax over the item's valid tokens, mix."""
    D, H = relation_emb.shape[1], pool.heads
    out = []
    for i, r in zip(row_item.tolist(), row_relation.tolist()):
        q = F.linear(F.layer_norm(relation_emb[r], (D,), pool.ln_q.weight, pool.ln_q.bias),
                     pool.q_proj.weight, pool.q_proj.bias).view(H, D // H)
        x = tokens[i][valid[i]]
        x = F.layer_norm(x, (x.shape[-1],), pool.ln_kv.weight, pool.ln_kv.bias)
        k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias).view(-1, H, D // H)
        v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias).view(-1, H, D // H)
        att = torch.softmax(torch.einsum("hd,thd->ht", q, k) / math.sqrt(D // H), dim=-1)
        pooled = F.linear(torch.einsum("ht,thd->hd", att, v).reshape(D), pool.out_proj.weight, pool.out_proj.bias)
        g = global_emb[i]
        if mix == "normalized":
            g, pooled = g / g.norm(), pooled / pooled.norm()
        e = beta * g + (1 - beta) * pooled
        out.append(e / e.norm())
    return torch.stack(out)


@pytest.mark.parametrize("impl,dtype,tol,mix", [("torch", torch.float64, 1e-10, "normalized"),
                                                ("torch", torch.float64, 1e-10, "legacy"),
                                                ("triton", torch.float32, 2e-5, "normalized")])
def test_relation_pooling_matches_naive_per_row(micro_json, impl, dtype, tol, mix):
    model = make(micro_json, mix=mix).to(dtype)
    model.impl = impl
    b = batch(seed=1)
    images = b.images.to(dtype)
    with torch.no_grad():
        rel = model.encode_relations(b.relation_ids, b.relation_mask)
        rel_naive, _ = first_eos_states(model, b.relation_ids, b.relation_mask)
        torch.testing.assert_close(rel, rel_naive, rtol=0, atol=tol)
        got_img = model.encode_images(images, rel, b.row_item, b.row_relation)
        got_txt = model.encode_texts(b.text_ids, b.text_mask, rel, b.row_item, b.row_relation)
        vis = model.vision(pixel_values=images).last_hidden_state
        img_global = model.visual_projection(model.vision.post_layernorm(vis[:, 0]))
        all_valid = torch.ones(vis.shape[:2], dtype=torch.bool)
        want_img = naive_pool(model.image_pool, vis, all_valid, rel_naive, img_global, 0.3, b.row_item, b.row_relation,
                              mix)
        txt_global, hidden = first_eos_states(model, b.text_ids, b.text_mask)
        want_txt = naive_pool(model.text_pool, hidden, b.text_mask, rel_naive, txt_global, 0.3, b.row_item,
                              b.row_relation, mix)
    torch.testing.assert_close(got_img.to(dtype), want_img, rtol=0, atol=tol)
    torch.testing.assert_close(got_txt.to(dtype), want_txt, rtol=0, atol=tol)
    # forward (one text-tower call for captions + relations) gives the same embeddings.
    with torch.no_grad():
        out = model(Batch(**(vars(b) | {"images": images})))
    torch.testing.assert_close(out["image_emb"], got_img, rtol=0, atol=tol)
    torch.testing.assert_close(out["text_emb"], got_txt, rtol=0, atol=tol)
    assert out["image_emb"].shape == (b.num_rows, MICRO["embed_dim"])


def test_item_features_pool_under_many_relations(micro_json):
    """Evaluation path: towers once, pooled under every relation, equals encode_* per call."""
    model = make(micro_json).eval()
    b = batch(items=4, relations=6, seed=2)
    with torch.no_grad():
        rel = model.encode_relations(b.relation_ids, b.relation_mask)
        feats = model.image_features(b.images)
        tfeats = model.text_features(b.text_ids, b.text_mask)
        row_item = torch.arange(4).repeat_interleave(6)  # every item under every relation
        row_relation = torch.arange(6).repeat(4)
        pooled = model.pool_images(feats, rel, row_item, row_relation)
        direct = model.encode_images(b.images, rel, row_item, row_relation)
        sub = model.pool_texts(tfeats.select(torch.tensor([2, 3])), rel, torch.tensor([0, 1]), torch.tensor([5, 5]))
        direct_t = model.encode_texts(b.text_ids, b.text_mask, rel, torch.tensor([2, 3]), torch.tensor([5, 5]))
    torch.testing.assert_close(pooled, direct)
    torch.testing.assert_close(sub, direct_t)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(24))
    # The relation changes the embedding of the same item (beta < 1).
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_forward_pools_conditioned_rows_from_the_same_features(micro_json, beta):
    """Batch.cond_* rows: each item under another relation, equal to encode_* on that (item, relation)."""
    model = make(micro_json, beta=beta).eval()
    b = batch(items=5, relations=3, seed=4)
    cond_item, cond_relation = torch.tensor([0, 1, 2, 3, 4, 2, 0]), torch.tensor([2, 2, 2, 0, 0, 1, 1])
    cb = Batch(**(vars(b) | {"cond_item": cond_item, "cond_relation": cond_relation,
                             "cond_slice": torch.tensor([0, 0, 0, 1, 1, 2, 2]),
                             "cond_member": torch.tensor([1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)}))
    with torch.no_grad():
        out = model(cb)
        plain = model(b)
        rel = model.encode_relations(b.relation_ids, b.relation_mask) if model.uses_pooling else None
        direct_i = model.encode_images(b.images, rel, cond_item, cond_relation)
        direct_t = model.encode_texts(b.text_ids, b.text_mask, rel, cond_item, cond_relation)
    assert "cond_image_emb" not in plain
    torch.testing.assert_close(out["image_emb"], plain["image_emb"])
    torch.testing.assert_close(out["cond_image_emb"], direct_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["cond_text_emb"], direct_t, atol=1e-5, rtol=0)
    same_item = out["cond_image_emb"][[0, 6]]  # item 0 under relations 2 and 1
    assert ((same_item[0] - same_item[1]).abs().max() > 1e-3) == (beta < 1)


@pytest.mark.parametrize("mode,beta", [("rcml", 1.0), ("clip", 0.3)])
def test_beta_one_makes_output_independent_of_relation(micro_json, mode, beta):
    model = make(micro_json, mode=mode, beta=beta)
    assert model.spec["beta"] == 1.0 and model.image_pool is None and model.text_pool is None
    assert not any("pool" in name for name, _ in model.named_parameters())
    b1, b2 = batch(seed=3), batch(seed=3)
    b2.relation_ids, b2.relation_mask = texts(3, seed=77)
    b2.row_relation = (b1.row_relation + 1) % 3
    with torch.no_grad():
        o1, o2 = model(b1), model(b2)
        rel = torch.randn(3, 24)
        direct = model.encode_images(b1.images, rel, b1.row_item, b1.row_relation)
        glob = F.normalize(model.visual_projection(model.vision(pixel_values=b1.images).pooler_output), dim=-1)
    torch.testing.assert_close(o1["image_emb"], o2["image_emb"], rtol=0, atol=0)
    torch.testing.assert_close(o1["text_emb"], o2["text_emb"], rtol=0, atol=0)
    torch.testing.assert_close(direct, glob[b1.row_item], rtol=0, atol=1e-6)  # exactly CLIP's embedding
    # Contrast: with beta < 1 the same change of relations changes the embeddings.
    pooled = make(micro_json, beta=0.3)
    with torch.no_grad():
        assert (pooled(b1)["image_emb"] - pooled(b2)["image_emb"]).abs().max() > 1e-3


def test_text_global_embedding_reads_the_eos_position(micro_json):
    model = make(micro_json).eval()
    ids, mask = texts(4, seed=4)
    lengths = mask.sum(1)
    assert (lengths < L).any()
    with torch.no_grad():
        base = model.text_features(ids, mask).global_emb
        after = ids.clone()
        for i, n in enumerate(lengths.tolist()):
            after[i, n:] = VOCAB - 1  # the largest id after eos: CLIPTextModel's legacy arg-max rule would pick it
        same = model.text_features(after, mask).global_emb
        same_unmasked = model.text_features(after, torch.ones_like(mask)).global_emb
        before = ids.clone()
        before[:, 1] = torch.where(before[:, 1] == EOS, before[:, 1], (before[:, 1] + 1 - 3) % (VOCAB - 3) + 3)
        changed = model.text_features(before, mask).global_emb
    long_rows = lengths < L
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(same_unmasked, base, rtol=0, atol=1e-6)
    edited = before[:, 1] != ids[:, 1]
    assert edited.any() and ((changed - base).abs().amax(1)[edited] > 1e-4).all()
    assert long_rows.any()


def test_text_without_eos_is_rejected(micro_json):
    model = make(micro_json)
    ids, mask = texts(3, seed=5)
    ids[1][ids[1] == EOS] = 5
    with pytest.raises(ValueError, match=r"text rows \[1\] have no eos token"):
        model.text_features(ids, mask)


@pytest.mark.parametrize("mode", ["rcml", "clip"])
def test_spec_round_trip_rebuilds_identical_architecture(micro_json, mode):
    model = make(micro_json, mode=mode).eval()
    spec = json.loads(json.dumps(model.spec))  # JSON-serializable
    assert spec["tokenizer"] == {"vocab_size": VOCAB, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS}
    assert (spec["mode"], spec["context_length"], spec["image_size"]) == (mode, L, S)
    torch.manual_seed(123)
    rebuilt = RCMLModel.from_spec(spec).eval()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # random init, not a copy
    rebuilt.load_state_dict(a)
    x = batch(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["image_emb"], model(x)["image_emb"], rtol=0, atol=0)
        torch.testing.assert_close(rebuilt(x)["text_emb"], model(x)["text_emb"], rtol=0, atol=0)
    assert rebuilt.spec == spec


@pytest.mark.parametrize("impl,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
def test_lexical_text_pooling_matches_naive_per_row(micro_json, impl, dtype, tol):
    """contextual+lexical: each caption's pooling attends over its L last states and its L word embeddings
    (the tower's input table, no position), padding masked in both; the image side is unchanged."""
    model = make(micro_json, text_pool_tokens="contextual+lexical").to(dtype)
    model.impl = impl
    b = batch(items=7, relations=4, seed=11)
    with torch.no_grad():
        rel, _ = first_eos_states(model, b.relation_ids, b.relation_mask)
        txt_global, hidden = first_eos_states(model, b.text_ids, b.text_mask)
        words = model.text.get_input_embeddings().weight[b.text_ids]  # [I, L, W]
        tokens, valid = torch.cat([hidden, words], 1), torch.cat([b.text_mask, b.text_mask], 1)
        want = naive_pool(model.text_pool, tokens, valid, rel, txt_global, 0.3, b.row_item, b.row_relation)
        contextual_only = naive_pool(model.text_pool, hidden, b.text_mask, rel, txt_global, 0.3, b.row_item,
                                     b.row_relation)
        got = model.encode_texts(b.text_ids, b.text_mask, rel, b.row_item, b.row_relation)
        out = model(Batch(**(vars(b) | {"images": b.images.to(dtype)})))
    torch.testing.assert_close(got.to(dtype), want, rtol=0, atol=tol)
    torch.testing.assert_close(out["text_emb"], got, rtol=0, atol=tol)
    assert (got.to(dtype) - contextual_only).abs().max() > 1e-3  # the word embeddings do take part
    assert model.spec["text_pool_tokens"] == "contextual+lexical"
    rebuilt = RCMLModel.from_spec(model.spec).to(dtype)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.impl = impl
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(Batch(**(vars(b) | {"images": b.images.to(dtype)})))["text_emb"],
                                   out["text_emb"], rtol=0, atol=0)
    # no new parameter: the same state dict loads into a contextual model
    assert list(model.state_dict()) == list(make(micro_json).state_dict())


@pytest.mark.parametrize("text_pool_tokens", ["contextual", "contextual+lexical"])
def test_text_token_table_is_looked_up_once_per_tower_call(micro_json, text_pool_tokens):
    """The lexical tokens are the tower's own lookup, not a second one: under ZeRO-3 every call of the
    embedding module gathers the whole [vocab, W] table. Training (forward) calls the tower once for
    captions and relations together, encode_texts once; the table still gets the words' gradient."""
    model = make(micro_json, text_pool_tokens=text_pool_tokens)
    table = model.text.get_input_embeddings()
    calls = []
    handle = table.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    b = batch(items=6, relations=4, seed=21)
    try:
        out = model(b)
        assert len(calls) == 1, calls
        rel = model.encode_relations(b.relation_ids, b.relation_mask)
        calls.clear()
        with torch.no_grad():
            model.encode_texts(b.text_ids, b.text_mask, rel, b.row_item, b.row_relation)
        assert calls == [tuple(b.text_ids.shape)]
    finally:
        handle.remove()
    # the gradient of the word-embedding tokens reaches the table: compare with a model whose pooling
    # sees only the contextual states (same weights)
    grad_of = {}
    for tokens in ("contextual", text_pool_tokens):
        m = make(micro_json, text_pool_tokens=tokens)
        m.load_state_dict(model.state_dict())
        m.zero_grad()
        m(b)["text_emb"].pow(3).sum().backward()
        grad_of[tokens] = m.text.get_input_embeddings().weight.grad.clone()
    changed = (grad_of[text_pool_tokens] - grad_of["contextual"]).abs().max()
    assert (changed > 1e-6) == (text_pool_tokens == "contextual+lexical")


def test_spec_without_text_pool_tokens_loads_as_contextual(micro_json):
    model = make(micro_json).eval()
    old_spec = model.spec
    del old_spec["text_pool_tokens"]
    old = RCMLModel.from_spec(old_spec).eval()
    old.load_state_dict(model.state_dict())
    x = batch(seed=12)
    with torch.no_grad():
        torch.testing.assert_close(old(x)["text_emb"], model(x)["text_emb"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_pool_tokens must be one of"):
        RCMLModel.from_spec(model.spec | {"text_pool_tokens": "lexical"})


def test_spec_without_mix_loads_as_the_legacy_mix(micro_json):
    """Exports written before model.mix existed keep their embeddings: no key = the raw-vector mix."""
    legacy = make(micro_json, mix="legacy").eval()
    old_spec = legacy.spec
    del old_spec["mix"]
    old = RCMLModel.from_spec(old_spec).eval()
    old.load_state_dict(legacy.state_dict())
    normalized = RCMLModel.from_spec(legacy.spec | {"mix": "normalized"}).eval()
    normalized.load_state_dict(legacy.state_dict())
    x = batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(old(x)["image_emb"], legacy(x)["image_emb"], rtol=0, atol=0)
        assert (normalized(x)["image_emb"] - legacy(x)["image_emb"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="mix must be one of"):
        RCMLModel.from_spec(legacy.spec | {"mix": "sum"})


def test_tiny_and_base_sizes():
    tiny = make("tiny", vocab=4000, context=32, image_size=64)
    n = sum(p.numel() for p in tiny.parameters())
    print(f"tiny: {n / 1e6:.2f} M parameters (vocab 4000)")
    assert 4.0e6 <= n <= 5.0e6
    assert tiny.spec["vision_config"]["hidden_size"] == 192 and tiny.embed_dim == 128
    base = json.loads(open("configs/model/base.json").read())
    assert base["embed_dim"] == 512 and base["vision"]["patch_size"] == 32 and base["vision"]["width"] == 768


def test_logit_scale_init_and_fp32_exp(micro_json):
    model = make(micro_json)
    out = model(batch(seed=7))
    assert out["logit_scale"].shape == () and math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    # no clamp in forward (the trainer bounds the stored value in place: tests/test_optimizer.py)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert math.isclose(model(batch(seed=7))["logit_scale"].item(), 1000.0, rel_tol=1e-5)
    # a bf16 model (DeepSpeed bf16) exponentiates its bf16 parameter in fp32
    model = model.to(torch.bfloat16)
    b = batch(seed=7)
    b.images = b.images.to(torch.bfloat16)
    scale, stored = model(b)["logit_scale"], model.logit_scale.item()
    assert model.logit_scale.dtype == torch.bfloat16 and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(math.exp(stored), rel=1e-6)  # a bf16 exp is off by up to 0.4 %


def test_uint8_pixels_are_normalized_by_the_model_in_its_dtype(micro_json):
    """The loader ships uint8 pixels; the model normalizes them on their device, in the vision tower's
    dtype: the same features as the normalized float pixels of the evaluation path."""
    from rcml.preprocess import normalize_pixels

    pixels = torch.randint(0, 256, (5, 3, S, S), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    b = batch(seed=8)
    raw, normalized = Batch(**(vars(b) | {"images": pixels})), Batch(**(vars(b) | {"images": normalize_pixels(pixels)}))
    model = make(micro_json).eval()
    with torch.no_grad():
        assert torch.equal(model(raw)["image_emb"], model(normalized)["image_emb"])
        half = make(micro_json).to(torch.bfloat16).eval()
        feats = half.image_features(pixels)
        ref = half.image_features(normalize_pixels(pixels, torch.bfloat16))
    assert feats.global_emb.dtype == torch.bfloat16 and torch.equal(feats.global_emb, ref.global_emb)


def test_build_errors_are_clear(micro_json):
    with pytest.raises(FileNotFoundError, match="use one of .*base.*tiny"):
        make("huge")
    with pytest.raises(ValueError, match="not a multiple of the model's patch size"):
        make(micro_json, image_size=20)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        make(micro_json, vocab=2)
    with pytest.raises(ValueError, match="not an RCML model spec"):
        RCMLModel.from_spec({"mode": "rcml"})


def test_local_pretrained_towers_are_loaded(micro_json, tmp_path):
    """A full CLIPModel directory (towers + projections + logit scale) and tower-only directories."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    tc = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=16, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vc = dict(hidden_size=40, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=S,
              patch_size=4)
    torch.manual_seed(9)
    clip = CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24))
    clip.save_pretrained(tmp_path / "clip")
    clip.vision_model.save_pretrained(tmp_path / "vision")
    model = make(micro_json, vision_path=str(tmp_path / "clip"), text_path=str(tmp_path / "clip"))
    ref = clip.state_dict()
    for name, tensor in model.vision.state_dict().items():
        torch.testing.assert_close(tensor, ref["vision_model." + name], rtol=0, atol=0)
    for name, tensor in model.text.state_dict().items():
        torch.testing.assert_close(tensor, ref["text_model." + name], rtol=0, atol=0)
    torch.testing.assert_close(model.visual_projection.weight, ref["visual_projection.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.text_projection.weight, ref["text_projection.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.logit_scale.reshape(()), ref["logit_scale"], rtol=0, atol=0)
    assert model.spec["vision_config"]["hidden_size"] == 40  # the checkpoint's tower, not the size JSON's
    assert model(batch(seed=8))["image_emb"].shape == (8, 24)
    vision_only = make(micro_json, vision_path=str(tmp_path / "vision"))  # transformers 5 keys, no prefix
    assert isinstance(vision_only.vision, CLIPVisionModel)
    torch.testing.assert_close(vision_only.vision.state_dict()["encoder.layers.0.mlp.fc1.weight"],
                               ref["vision_model.encoder.layers.0.mlp.fc1.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="data.image_size=32"):
        make(micro_json, vision_path=str(tmp_path / "clip"), image_size=32)


def clip_style_loss(img, txt, groups, scale):
    """Symmetric cross-entropy with soft targets spread over each row's positives (same group)."""
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    logits = scale * img @ txt.T
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_training_step_on_tiny_reduces_loss():
    model = make("tiny", vocab=300, context=16, image_size=64, seed=0)
    b = batch(items=8, relations=4, rows=8, seed=9, vocab=300, context=16, image_size=64)
    b.row_item = torch.randperm(8, generator=torch.Generator().manual_seed(0))  # one row per item, as in training
    b.group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        out = model(b)
        loss = clip_style_loss(out["image_emb"], out["text_emb"], b.group_ids, out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter is used (pooling included): DeepSpeed gets a gradient for each
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_bf16_params_and_autocast_match_fp32(micro_json):
    model = make(micro_json).eval()
    b = batch(seed=10)
    with torch.no_grad():
        ref = model(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(b)
        half = make(micro_json).to(torch.bfloat16).eval()
        out16 = half(Batch(**(vars(b) | {"images": b.images.to(torch.bfloat16)})))
    for out in (auto, out16):
        for key in ("image_emb", "text_emb"):
            assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all()
            cos = (out[key] * ref[key]).sum(-1)
            assert cos.min() > 0.98, (key, cos)
