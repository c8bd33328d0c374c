"""from_pretrained refuses an export whose spec.json, model.safetensors and tokenizer.json do not belong
together, before it builds (and allocates) the model that spec.json describes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import rcml.model
from data_prep.train_tokenizer import build_tokenizer
from rcml.config import ModelConfig
from rcml.export import from_pretrained, read_weights, write_export
from rcml.model import build_model
from rcml.tokenizer import TextTokenizer

L, S = 11, 16
SIZE = {"embed_dim": 12, "pool_heads": 2,
        "vision": {"image_size": S, "patch_size": 8, "width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2},
        "text": {"width": 16, "layers": 1, "heads": 2, "mlp_ratio": 2}}
HUGE = 1 << 20  # a width whose real model would need terabytes


def tokenizer_file(tmp_path, name: str, vocab: int, seed: int):
    rng = random.Random(seed)
    words = ["red", "green", "blue", "circle", "square", "star", "both", "are", "a", "the", "moon", "heart"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(2, 7))) for _ in range(300)]
    path = tmp_path / name
    build_tokenizer(iter(texts), vocab).save(str(path))
    return path


@pytest.fixture
def export(tmp_path):
    """A small real export: the model is built from the tokenizer's own vocabulary size and ids."""
    tok_path = tokenizer_file(tmp_path, "tokenizer.json", 301, seed=0)
    tok = TextTokenizer.from_file(tok_path)
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    torch.manual_seed(3)
    model = build_model(ModelConfig(name=str(size), mode="rcml", beta=0.4), vocab_size=tok.vocab_size,
                        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, context_length=L, image_size=S)
    return write_export(tmp_path / "export", {k: v.clone() for k, v in model.state_dict().items()}, model.spec,
                        tok_path, "seed: 3\n")


def edit_spec(export, change) -> dict:
    spec = json.loads((export / "spec.json").read_text())
    change(spec)
    (export / "spec.json").write_text(json.dumps(spec))
    return spec


@pytest.fixture
def built_for_real(monkeypatch):
    """Records the text width of every RCMLModel constructed off the meta device (i.e. with storage)."""
    widths: list[int] = []
    init = rcml.model.RCMLModel.__init__

    def guarded(self, spec, **kw):
        width = spec["text_config"]["hidden_size"]
        if torch.get_default_device().type != "meta":
            widths.append(width)
            assert width < HUGE, "a model of the edited spec was allocated"
        init(self, spec, **kw)

    monkeypatch.setattr(rcml.model.RCMLModel, "__init__", guarded)
    return widths


def test_spec_edited_to_a_huge_width_is_refused_before_building(export, built_for_real):
    m = from_pretrained(export)  # intact: passes the checks, is built once for real, holds the stored weights
    assert built_for_real == [SIZE["text"]["width"]]
    stored = read_weights(export)  # model.safetensors and rcml_pooling.safetensors, under the model's names
    assert stored.keys() == m.model.state_dict().keys()
    for k, v in m.model.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0)

    def widen(spec):
        spec["text_config"]["hidden_size"] = HUGE
        spec["text_config"]["intermediate_size"] = 2 * HUGE

    edit_spec(export, widen)
    built_for_real.clear()
    with pytest.raises(ValueError, match=r"text\..*is \[\d+(, \d+)*\] in model.safetensors but .*1048576"):
        from_pretrained(export)
    assert built_for_real == []  # refused from the header: the edited spec's model is never allocated


def test_spec_with_more_layers_names_the_missing_tensors(export, built_for_real):
    edit_spec(export, lambda spec: spec["vision_config"].update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"tensor\(s\) of the spec's model are not in model.safetensors.*layers\.1"):
        from_pretrained(export)
    assert built_for_real == []


def test_weights_with_extra_tensors_are_refused(export, built_for_real):
    state = load_file(str(export / "model.safetensors"))
    state["stray.weight"] = torch.zeros(3, 5)
    save_file(state, str(export / "model.safetensors"))
    with pytest.raises(ValueError, match=r"in model.safetensors are not in the spec's model.*stray\.weight"):
        from_pretrained(export)
    assert built_for_real == []


def test_tokenizer_with_another_vocabulary_is_refused(export, tmp_path):
    other = tokenizer_file(tmp_path, "other.json", 277, seed=1)
    assert TextTokenizer.from_file(other).vocab_size != TextTokenizer.from_file(export / "tokenizer.json").vocab_size
    (export / "tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer.json is not the tokenizer this model was trained with: vocab_"):
        from_pretrained(export)


def test_special_token_ids_must_match_the_spec(export):
    spec = edit_spec(export, lambda spec: spec["tokenizer"].update(eos_id=spec["tokenizer"]["eos_id"] + 5))
    with pytest.raises(ValueError, match=rf"eos_id \d+ \(spec.json: {spec['tokenizer']['eos_id']}\)"):
        from_pretrained(export)
