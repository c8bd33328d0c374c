"""An export is also a Hugging Face CLIP folder: CLIPModel / CLIPVisionModel / CLIPTextModel / AutoTokenizer /
CLIPImageProcessor load it and reproduce the relation-independent embedding, rcml.from_pretrained still loads
it exactly, the previous layout still loads, the model card describes the run, and the README recipe runs."""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import rcml
from data_prep.train_tokenizer import build_tokenizer
from rcml.config import ModelConfig
from rcml.embedding import RCMLEmbedder
from rcml.export import POOLING_FILE, check_tokenizer_matches_spec, write_export
from rcml.model import build_model
from rcml.model_card import write_model_card
from rcml.tokenizer import TextTokenizer

L, S = 11, 16
SIZE = {"embed_dim": 12, "pool_heads": 2,
        "vision": {"image_size": S, "patch_size": 8, "width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2},
        "text": {"width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2}}
WORDS = ["red", "green", "blue", "circle", "square", "star", "both", "are", "a", "the", "moon", "heart"]
TEXTS = ["a red circle", "both are blue stars", "the moon", "", "Square  HEART!",
         " ".join(WORDS * 3)]  # the last one is truncated to the context length
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pooling model (beta 0.4), our byte-level tokenizer (eos id 2), a trained-looking logit scale; its export."""
    root = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 7))) for _ in range(300)]
    tok_path = root / "tokenizer.json"
    build_tokenizer(iter(texts), 301).save(str(tok_path))
    tok = TextTokenizer.from_file(tok_path)
    size = root / "size.json"
    size.write_text(json.dumps(SIZE))
    torch.manual_seed(3)
    model = build_model(ModelConfig(name=str(size), mode="rcml", beta=0.4), vocab_size=tok.vocab_size,
                        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, context_length=L,
                        image_size=S).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(23.0))
    run_config = "seed: 3\ndata:\n  train: shards/train-{000000..000007}.tar\n  val: shards/val-000000.tar\n" \
                 "train:\n  steps: 40\n"
    export = write_export(root / "export", {k: v.clone() for k, v in model.state_dict().items()}, model.spec,
                          tok_path, run_config, step=40)
    return model, tok, export


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_clip_model_loads_every_tensor_and_gives_our_global_embeddings(trained):
    from transformers import AutoModel, CLIPModel

    model, tok, export = trained
    clip, info = CLIPModel.from_pretrained(export, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    assert type(AutoModel.from_pretrained(export)) is CLIPModel  # config.json has model_type "clip"
    clip.eval()
    assert clip.logit_scale.item() == pytest.approx(math.log(23.0))
    assert clip.config.projection_dim == SIZE["embed_dim"]
    images = pixels(4)
    ours_img = model.image_features(images).global_emb
    theirs_img = clip.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(theirs_img, ours_img, rtol=0, atol=1e-5)
    # texts: ours with the training tokenizer, transformers' with the exported one (2 <-> vocab_size - 1)
    ids, mask = tok.encode(TEXTS, L)
    ours_txt = model.text_features(ids, mask).global_emb
    exported = TextTokenizer.from_file(export / "tokenizer.json")
    hf_ids, hf_mask = exported.encode(TEXTS, L)
    assert exported.eos_id == tok.vocab_size - 1 and (hf_ids == exported.eos_id).any(1).all()
    theirs_txt = clip.get_text_features(input_ids=hf_ids, attention_mask=hf_mask.long()).pooler_output
    torch.testing.assert_close(F.normalize(theirs_txt, dim=-1), F.normalize(ours_txt, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_txt, ours_txt, rtol=0, atol=1e-5)
    # the pooling stays out of model.safetensors (CLIPModel saw no unexpected key) and lives beside it
    assert (export / POOLING_FILE).is_file()


@torch.no_grad()
def test_tower_models_load_the_trained_towers(trained):
    from transformers import CLIPTextModel, CLIPVisionModel

    model, tok, export = trained
    vision = CLIPVisionModel.from_pretrained(export).eval()
    for name, tensor in model.vision.state_dict().items():
        torch.testing.assert_close(vision.state_dict()[name], tensor, rtol=0, atol=0)
    images = pixels(3, seed=1)
    torch.testing.assert_close(model.visual_projection(vision(pixel_values=images).pooler_output),
                               model.image_features(images).global_emb, rtol=0, atol=1e-5)
    text = CLIPTextModel.from_pretrained(export).eval()
    hf_ids, hf_mask = TextTokenizer.from_file(export).encode(TEXTS, L)
    ids, mask = tok.encode(TEXTS, L)
    pooled = text(input_ids=hf_ids, attention_mask=hf_mask.long()).pooler_output
    torch.testing.assert_close(model.text_projection(pooled), model.text_features(ids, mask).global_emb,
                               rtol=0, atol=1e-5)


def test_auto_tokenizer_encodes_like_ours(trained):
    from transformers import AutoTokenizer

    _, tok, export = trained
    hf = AutoTokenizer.from_pretrained(export)
    ours = TextTokenizer.from_file(export)
    enc = hf(TEXTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    ids, mask = ours.encode(TEXTS, L)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"].bool(), mask)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf.model_max_length == L
    # the same words as the training tokenizer, only ids 2 and vocab_size - 1 exchanged
    swap = {2: tok.vocab_size - 1, tok.vocab_size - 1: 2}
    train_ids, _ = tok.encode(TEXTS, L)
    assert torch.equal(ids, train_ids.apply_(lambda i: swap.get(i, i)))


def test_image_processor_matches_our_transform_on_square_images(trained):
    from transformers import CLIPImageProcessor

    _, _, export = trained
    m = rcml.from_pretrained(export)
    square = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (S, S, 3), dtype=np.uint8)) for i in range(2)]
    with warnings.catch_warnings():  # without torchvision transformers falls back to its PIL processor, and says so
        warnings.simplefilter("ignore")
        processor = CLIPImageProcessor.from_pretrained(export)
    got = processor(images=square, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, torch.stack([m.transform(im) for im in square]), rtol=0, atol=1e-5)


@torch.no_grad()
def test_rcml_from_pretrained_is_exact(trained):
    model, tok, export = trained
    m = rcml.from_pretrained(export)
    spec = json.loads((export / "spec.json").read_text())
    last = tok.vocab_size - 1
    assert spec["tokenizer"]["swapped_ids"] == [2, last] and m.spec["tokenizer"]["eos_id"] == last
    reference = RCMLEmbedder(model, tok, model.spec)
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (S + 5, S, 3), dtype=np.uint8))
              for i in range(3)]
    relations = ["both are red", "both are stars", "both are red"]
    for got, want in ((m.embed_images(images, relations), reference.embed_images(images, relations)),
                      (m.embed_texts(TEXTS[:3], relations), reference.embed_texts(TEXTS[:3], relations)),
                      (m.embed_texts(TEXTS), reference.embed_texts(TEXTS))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (m.embed_images(images, relations)[0] - m.embed_images(images)[0]).abs().max() > 1e-3  # pooling loaded
    # every tensor is the trained one (the token embedding with its two rows exchanged)
    for name, tensor in model.state_dict().items():
        if name == "text.embeddings.token_embedding.weight":
            tensor = tensor[torch.arange(tok.vocab_size).apply_(lambda i: {2: last, last: 2}.get(i, i))]
        torch.testing.assert_close(m.model.state_dict()[name], tensor, rtol=0, atol=0)
    # the training tokenizer does not fit the exported ids
    with pytest.raises(ValueError, match=rf"eos_id 2 \(spec.json: {last}\)"):
        check_tokenizer_matches_spec(tok, m.spec, Path("tokenizer.json"))


@torch.no_grad()
def test_both_layouts_load_into_the_same_model(trained, tmp_path):
    """The previous layout (every tensor under its RCMLModel name in model.safetensors, no config.json, no
    tokenizer_config.json) still loads, into the model the current layout holds under CLIPModel's names."""
    from safetensors import safe_open

    model, tok, export = trained
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "vision_model.post_layernorm.weight" in keys and "text_model.final_layer_norm.weight" in keys
    assert not any(k.startswith(("vision.", "text.", "image_pool.", "text_pool.")) for k in keys)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    (old / "spec.json").write_text(json.dumps(model.spec))
    tok._tok.save(str(old / "tokenizer.json"))
    previous, current = rcml.from_pretrained(old), rcml.from_pretrained(export)
    assert previous.spec["tokenizer"]["eos_id"] == 2
    relations = ["both are red"] * len(TEXTS)
    torch.testing.assert_close(previous.embed_texts(TEXTS, relations), current.embed_texts(TEXTS, relations),
                               rtol=0, atol=0)
    images = [Image.fromarray(np.random.RandomState(7).randint(0, 256, (S, S + 2, 3), dtype=np.uint8))]
    torch.testing.assert_close(previous.embed_images(images, relations[:1]),
                               current.embed_images(images, relations[:1]), rtol=0, atol=0)


def test_model_card_describes_data_steps_config_and_evaluation(trained):
    _, tok, export = trained
    card = (export / "README.md").read_text()
    assert "`shards/train-{000000..000007}.tar`" in card and "`shards/val-000000.tar`" in card
    assert "| optimizer steps | 40 of 40 |" in card and "| seed | 3 |" in card
    assert "| vision | 16 | 2 | 2 | 16 px, patch 8 |" in card and "rcml_pooling.safetensors" in card
    assert "No evaluation report was written" in card
    assert "CLIPModel.from_pretrained" in card and "rcml.from_pretrained" in card
    assert f"ids 2 and {tok.vocab_size - 1}" in card
    hits = {f"hit@{k}": {c: k / 20 for c in ("TT", "II", "TI", "IT", "AVG", "MEAN")} for k in (1, 5, 10)}
    write_model_card(export, step=40, eval_report={"retrieval": hits, "retrieval_confusable": hits,
                                                   "counts": {"items": 64}})
    card = (export / "README.md").read_text()
    assert "| retrieval_confusable Hit@5 | 0.250 | 0.250 | 0.250 | 0.250 | 0.250 | 0.250 |" in card
    assert "No evaluation report was written" not in card and "64 items" in card


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block of the README subsection ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n### ", start + len(heading))
    section = text[start:end if end > 0 else None]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under {heading}"
    return match.group(1)


@torch.no_grad()
def test_readme_transformers_recipe_runs_as_written(trained, tmp_path, monkeypatch):
    model, tok, export = trained
    code = readme_block("### Loading an export with transformers", "python")
    assert '"runs/demo/rcml/export"' in code
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (S, S, 3), dtype=np.uint8)).save(name)
    namespace: dict = {}
    exec(code.replace('"runs/demo/rcml/export"', repr(str(export))), namespace)
    m = rcml.from_pretrained(export)
    images = [Image.open(name) for name in ("a.png", "b.png")]
    torch.testing.assert_close(namespace["image_emb"], m.embed_images(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(namespace["text_emb"], m.embed_texts(["a red circle", "a blue star"]), rtol=0, atol=1e-5)
