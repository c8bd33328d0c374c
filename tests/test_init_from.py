"""model.init_from: a whole local CLIPModel folder (towers, projections, logit scale) and its CLIP BPE tokenizer,
against a tiny CLIPModel saved by save_pretrained with the real CLIP vocabulary that open-clip-torch ships; and
the README's fine-tuning recipe through the real launcher."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rcml.config import ConfigError, ModelConfig, load_config
from rcml.export import clip_name, write_export
from rcml.model import build_model
from rcml.tokenizer import TextTokenizer
from rcml.train.trainer import find_tokenizer

S, L = 224, 77  # a ViT-B/32-shaped input (7 x 7 patches), CLIP's context length; the towers themselves are tiny
VOCAB = 49408
SOT, EOT = 49406, 49407
CAT = [SOT, 320, 1125, 539, 320, 2368, EOT]  # "a photo of a cat" in OpenAI's CLIP tokenizer
TEXTS = ["a photo of a cat", "Two  DOGS, playing!", "", "a diagram " * 60]  # the last one is truncated
README = Path(__file__).resolve().parents[1] / "README.md"


def clip_bpe_tokenizer():
    """transformers' CLIPTokenizer over the CLIP BPE merges in open-clip-torch (found without importing it)."""
    from transformers import CLIPTokenizer

    package = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    merges = gzip.open(package / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]  # as open_clip.tokenizer reads them
    # open_clip's bytes_to_unicode: printable bytes stand for themselves, the others for chr(256 + n)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    # OpenAI's own configs carry these legacy ids (eos 2): the model must take the tokenizer's, not these
    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=L, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=S,
                  patch_size=32)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50.0))
    return clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIPModel folder as the README's recipe writes it: model and tokenizer saved into one folder."""
    path = tmp_path_factory.mktemp("clip") / "clip-vit-b32"
    tiny_clip().save_pretrained(path)
    clip_bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def size_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("size") / "micro.json"  # embed_dim 24: the checkpoint's projection_dim wins
    path.write_text(json.dumps({"embed_dim": 24, "pool_heads": 2,
                                "vision": {"image_size": 32, "patch_size": 8, "width": 8, "layers": 1, "heads": 1,
                                           "mlp_ratio": 2},
                                "text": {"width": 8, "layers": 1, "heads": 1, "mlp_ratio": 2}}))
    return str(path)


def from_clip(size_json, clip_dir, tokenizer, **overrides):
    cfg = ModelConfig(name=size_json, mode="rcml", beta=0.5, init_from=str(clip_dir), **overrides)
    return build_model(cfg, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, context_length=L, image_size=S).eval()


def test_a_clip_tokenizer_folder_is_accepted(clip_dir, tmp_path):
    tok = TextTokenizer.from_file(clip_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (VOCAB, SOT, EOT, EOT, EOT)
    ids, mask = tok.encode(TEXTS, L)
    assert ids[0, :7].tolist() == CAT and ids[0, 7:].eq(EOT).all() and mask[0].sum() == 7
    hf = clip_bpe_tokenizer()(TEXTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    assert torch.equal(ids, hf["input_ids"]) and torch.equal(mask, hf["attention_mask"].bool())
    assert ids[3, -1] == EOT and mask[3].all()  # truncated, eos kept
    assert tok.decode(ids[0]) == "a photo of a cat"
    # the tokenizer.json alone (no tokenizer_config.json): CLIP's names, padding with the eos as OpenAI's CLIP
    shutil.copy(clip_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    alone = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (alone.bos_id, alone.eos_id, alone.pad_id) == (SOT, EOT, EOT)
    assert torch.equal(alone.encode(TEXTS, L)[0], ids)


@torch.no_grad()
def test_init_from_loads_the_whole_clip_model_and_its_tokenizer(clip_dir, size_json, caplog):
    from transformers import CLIPModel

    cfg = load_config(None, [f"model.init_from={clip_dir}", "data.train=shards-{0..1}.tar"])
    with caplog.at_level(logging.INFO):
        tokenizer_path = find_tokenizer(cfg)  # data.tokenizer is empty: the folder's tokenizer
        tok = TextTokenizer.from_file(tokenizer_path)
        model = from_clip(size_json, clip_dir, tok)
    assert tokenizer_path == clip_dir / "tokenizer.json"
    log = caplog.text
    assert f"data.tokenizer: {clip_dir}/tokenizer.json (the tokenizer of model.init_from)" in log
    n_vision, n_text = len(model.vision.state_dict()), len(model.text.state_dict())
    assert (f"model.init_from: vision tower <- {clip_dir}/model.safetensors: {n_vision} tensors vision_model.*, "
            "visual_projection.weight, logit_scale") in log
    assert (f"model.init_from: text tower <- {clip_dir}/model.safetensors: {n_text} tensors text_model.*, "
            "text_projection.weight") in log
    source = CLIPModel.from_pretrained(clip_dir).eval()
    ref = source.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith(("image_pool.", "text_pool.")):
            continue  # the one fresh part
        key = clip_name(name)  # vision.* -> vision_model.*, text.* -> text_model.*
        torch.testing.assert_close(tensor.reshape(ref[key].shape), ref[key], rtol=0, atol=0)
    assert model.embed_dim == 16 and model.spec["tokenizer"]["eos_id"] == EOT
    assert model.logit_scale.exp().item() == pytest.approx(50.0)
    # the global embedding is the source CLIPModel's image / text features
    images = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.normalize(model.image_features(images).global_emb, dim=-1),
                               F.normalize(source.get_image_features(pixel_values=images).pooler_output, dim=-1),
                               rtol=0, atol=1e-5)
    ids, mask = tok.encode(TEXTS, L)
    hf = clip_bpe_tokenizer()(TEXTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    theirs = source.get_text_features(**hf).pooler_output
    torch.testing.assert_close(F.normalize(model.text_features(ids, mask).global_emb, dim=-1),
                               F.normalize(theirs, dim=-1), rtol=0, atol=1e-5)
    assert model.uses_pooling and model.image_pool is not None  # relation pooling on top, freshly initialized


def test_init_from_refuses_what_does_not_fit(clip_dir, size_json, tmp_path):
    from transformers import CLIPModel

    tok = TextTokenizer.from_file(clip_dir)
    with pytest.raises(ConfigError, match="model.init_from: loads both towers .* leave model.vision_path"):
        load_config(None, [f"model.init_from={clip_dir}", f"model.vision_path={clip_dir}", "data.train=x.tar"])
    # the tower's own patch size decides which image sizes work, not model.name's
    assert load_config(None, [f"model.init_from={clip_dir}", "data.image_size=36", "data.train=x.tar"]).model.init_from
    with pytest.raises(ValueError, match=f"model.init_from={clip_dir} was trained at 224 px .* data.image_size=224"):
        build_model(ModelConfig(name=size_json, init_from=str(clip_dir)), vocab_size=VOCAB, pad_id=EOT, bos_id=SOT,
                    eos_id=EOT, context_length=L, image_size=64)
    with pytest.raises(ValueError, match="holds a tokenizer with .* leave data.tokenizer empty"):
        build_model(ModelConfig(name=size_json, init_from=str(clip_dir)), vocab_size=400, pad_id=0, bos_id=1,
                    eos_id=2, context_length=L, image_size=S)
    vision_only = tmp_path / "vision"
    CLIPModel.from_pretrained(clip_dir).vision_model.save_pretrained(vision_only)
    with pytest.raises(ValueError, match="'clip_vision_model' model, expected 'clip'"):
        from_clip(size_json, vision_only, tok)
    no_projection = tmp_path / "no_projection"
    shutil.copytree(clip_dir, no_projection)
    state = load_file(str(no_projection / "model.safetensors"))
    del state["text_projection.weight"]
    save_file(state, str(no_projection / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks \['text_projection.weight'\]: not a CLIPModel checkpoint"):
        from_clip(size_json, no_projection, tok)


@torch.no_grad()
def test_a_fine_tuned_export_is_a_clip_folder_again(clip_dir, size_json, tmp_path):
    from transformers import AutoTokenizer, CLIPModel, CLIPTokenizer

    import rcml

    tok = TextTokenizer.from_file(clip_dir)
    model = from_clip(size_json, clip_dir, tok)
    export = write_export(tmp_path / "export", {k: v.clone() for k, v in model.state_dict().items()}, model.spec,
                          clip_dir, "model:\n  init_from: clip-vit-b32\n")
    spec = json.loads((export / "spec.json").read_text())
    assert "swapped_ids" not in spec["tokenizer"]  # eos 49407: transformers pools at the first eos already
    assert json.loads((export / "config.json").read_text())["text_config"]["eos_token_id"] == EOT
    hf_tok = AutoTokenizer.from_pretrained(export)
    assert isinstance(hf_tok, CLIPTokenizer) and hf_tok("a photo of a cat").input_ids == CAT
    clip, info = CLIPModel.from_pretrained(export, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    m = rcml.from_pretrained(export)
    enc = hf_tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    torch.testing.assert_close(F.normalize(clip.eval().get_text_features(**enc).pooler_output, dim=-1),
                               m.embed_texts(TEXTS), rtol=0, atol=1e-5)
    assert "| initialized from | clip-vit-b32 |" in (export / "README.md").read_text()
    # and the export is itself a CLIPModel folder to fine-tune from
    again = from_clip(size_json, export, TextTokenizer.from_file(export))
    for name, tensor in model.vision.state_dict().items():
        torch.testing.assert_close(again.vision.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_readme_fine_tuning_recipe_runs_through_the_launcher(clip_dir, tmp_path):
    """The README's command, on one CPU rank, the tiny CLIP folder and tiny shards, for 2 steps."""
    from tests._train_utils import DEEPSPEED, build_tiny_dataset, run
    from tests.conftest import free_port

    text = README.read_text()
    start = text.index("### Fine-tuning from a pretrained CLIP")
    section = text[start:text.index("\n### ", start + 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "save_pretrained('clip-vit-b32')" in block and block.count("save_pretrained('clip-vit-b32')") == 2
    command = block[block.index("deepspeed "):].replace("\\\n", " ").split()
    data = build_tiny_dataset(tmp_path / "data", items=96, val_items=16, shard_size=24)
    out = tmp_path / "run"
    replace = {"8": "1", "model.init_from=clip-vit-b32": f"model.init_from={clip_dir}",
               "data.train='shards/shard-{000000..000999}.tar'": f"data.train={data['data.train']}",
               "train.out_dir=runs/clip-b32-rcml": f"train.out_dir={out}"}
    assert set(replace) <= set(command), command
    command = [DEEPSPEED if c == "deepspeed" else replace.get(c, c) for c in command]
    command[command.index("--num_gpus"):command.index("--num_gpus")] = ["--master_port", str(free_port())]
    small = ["train.steps=2", "data.workers=1", "data.groups_per_batch=2", "data.members_per_group=2",
             "data.buffer_size=32", "data.shard_shuffle=2", "train.log_every=1", "train.ckpt_every=0",
             "tracking.mlflow=false"]
    proc = run(command + small, timeout=900)
    log = proc.stderr + proc.stdout
    assert f"data.tokenizer: {clip_dir}/tokenizer.json (the tokenizer of model.init_from)" in log
    assert f"model.init_from: vision tower <- {clip_dir}/model.safetensors" in log
    assert f"model.init_from: text tower <- {clip_dir}/model.safetensors" in log
    from transformers import CLIPModel

    clip, info = CLIPModel.from_pretrained(out / "export", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    assert clip.config.vision_config.image_size == S and clip.config.text_config.eos_token_id == EOT
    assert len([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]) == 2
