"""transformers CLIP tower configs built from a model size (``rcml/model_size.py``), and local pretrained
weights loaded into the towers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPVisionConfig


log = logging.getLogger(__name__)


def vision_config(size: dict[str, Any], image_size: int) -> CLIPVisionConfig:
    v = size["vision"]
    if image_size % v["patch_size"]:
        raise ValueError(f"data.image_size={image_size} is not a multiple of the model's patch size {v['patch_size']}")
    return CLIPVisionConfig(hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
                            num_hidden_layers=v["layers"], num_attention_heads=v["heads"], image_size=image_size,
                            patch_size=v["patch_size"], projection_dim=size["embed_dim"], hidden_act="gelu")


def text_config(size: dict[str, Any], *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                context_length: int) -> CLIPTextConfig:
    t = size["text"]
    # The special ids must lie inside the vocabulary (else CLIP's own pooling silently reads token 0).
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=t["width"], intermediate_size=int(t["width"] * t["mlp_ratio"]),
                          num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                          max_position_embeddings=context_length, projection_dim=size["embed_dim"], hidden_act="gelu",
                          pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)


def build_tower(cls: type[nn.Module], config) -> nn.Module:
    """A transformers tower (``CLIPVisionModel`` / ``CLIPTextModel``) with transformers' own weight init.

    Under ``deepspeed.zero.Init`` each submodule is partitioned as its constructor returns, so the
    tower's ``post_init`` would initialize empty shards and leave torch's defaults (N(0, 1)
    embeddings). There the tower is built the way transformers' ``from_config`` builds it under
    ZeRO-3: without init, then ``initialize_weights_zero3`` (gathers one module at a time, initializes
    on rank 0, broadcasts). Called from ``RCMLModel.__init__``, so init stays inside the constructor.
    """
    if not _zero_init_active():
        return cls(config)
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3

    with no_init_weights():
        tower = cls(config)
    initialize_weights_zero3(tower)
    return tower


def _zero_init_active() -> bool:
    import sys

    if "deepspeed" not in sys.modules:  # zero.Init cannot be active without deepspeed imported
        return False
    from deepspeed.runtime.zero import partition_parameters

    return partition_parameters.zero_init_context > 0


def pretrained_vision_config(path: str, image_size: int, key: str = "model.vision_path") -> CLIPVisionConfig:
    """The vision config of a local CLIPVisionModel or CLIPModel directory, checked against the data."""
    cfg = CLIPVisionConfig.from_pretrained(path)
    if cfg.image_size != image_size:
        raise ValueError(f"{key}={path} was trained at {cfg.image_size} px but data.image_size="
                         f"{image_size}; set data.image_size={cfg.image_size}")
    return cfg


def pretrained_text_config(path: str, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                           context_length: int, key: str = "model.text_path") -> CLIPTextConfig:
    """The text config of a local CLIPTextModel or CLIPModel directory, checked against the tokenizer."""
    cfg = CLIPTextConfig.from_pretrained(path)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"{key}={path} has a vocabulary of {cfg.vocab_size} tokens but the tokenizer has "
                         f"{vocab_size}; use the tokenizer the text tower was trained with")
    if cfg.max_position_embeddings < context_length:
        raise ValueError(f"{key}={path} has {cfg.max_position_embeddings} positions but data.context_length="
                         f"{context_length}; lower data.context_length")
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = pad_id, bos_id, eos_id
    return cfg


def pretrained_embed_dim(path: str) -> int:
    """The joint width (``projection_dim``) of a local CLIPModel directory (``model.init_from``)."""
    from transformers import CLIPConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.init_from={path}: no config.json; expected a transformers CLIPModel "
                                "directory (CLIPModel.save_pretrained)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(f"model.init_from={path}: config.json is a {model_type!r} model, expected 'clip' "
                         "(a CLIPModel directory; tower-only directories go to model.vision_path / model.text_path)")
    return int(CLIPConfig.from_pretrained(path).projection_dim)


def check_own_tokenizer(path: str, *, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> None:
    """``model.init_from``: the run's tokenizer must be the one the folder holds, when it holds one.

    Another tokenizer's ids would mean other tokens to the pretrained token embedding (and a smaller one
    fits its rows without any error).
    """
    from rcml.tokenizer import TextTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        return
    own = TextTokenizer.from_file(path)
    theirs = dict(vocab_size=own.vocab_size, pad_id=own.pad_id, bos_id=own.bos_id, eos_id=own.eos_id)
    ours = dict(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    if theirs != ours:
        raise ValueError(f"model.init_from={path} holds a tokenizer with {theirs}, but the run's tokenizer has {ours}; "
                         "leave data.tokenizer empty (data.tokenizer=) to use the folder's tokenizer")


def _weights_file(path: str) -> Path:
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: expected a transformers directory with model.safetensors "
                                "(save it with save_pretrained(..., safe_serialization=True))")
    return file


def load_pretrained(path: str, tower: nn.Module, prefixes: tuple[str, ...], extra: dict[str, nn.Parameter],
                    extra_required: bool = False) -> str:
    """Copy ``path/model.safetensors`` into ``tower`` and the ``extra`` parameters ({checkpoint key: parameter}).

    The tower's tensors are looked up under the first of ``prefixes`` that holds all of them
    (``text_model.`` in a CLIPModel or an older checkpoint, none in a transformers 5 tower); missing
    tensors are an error. An extra key the checkpoint lacks (the projection of a tower-only checkpoint)
    is an error with ``extra_required`` (a whole CLIPModel), else it keeps its random init, with a
    warning. Any shape mismatch is an error. Parameters partitioned by ZeRO-3 are gathered for the copy.
    Returns what was loaded, for the log: ``"<n> tensors <prefix>*, <key>, ..."``.
    """
    from safetensors import safe_open

    names = list(tower.state_dict().keys())  # parameters and persistent buffers
    own = dict(tower.named_parameters()) | dict(tower.named_buffers())
    weights = _weights_file(path)
    with safe_open(str(weights), framework="pt") as f:
        available = set(f.keys())
        prefix = next((p for p in prefixes if all(p + n in available for n in names)), None)
        if prefix is None:
            missing = sorted(prefixes[0] + n for n in names if prefixes[0] + n not in available)
            raise ValueError(f"{weights} lacks {len(missing)} tensors of the "
                             f"{type(tower).__name__} (e.g. {missing[:3]}): not a matching CLIP checkpoint")
        absent = [key for key in extra if key not in available]
        if absent and extra_required:
            raise ValueError(f"{weights} lacks {absent}: not a CLIPModel checkpoint (a tower-only directory goes "
                             "to model.vision_path / model.text_path)")
        copies = [(own[n], f.get_tensor(prefix + n)) for n in names]
        loaded = []
        for key, param in extra.items():
            if key in available:
                copies.append((param, f.get_tensor(key)))
                loaded.append(key)
            else:
                log.warning("%s has no %s; it keeps its random init", path, key)
    with _gathered([t for t, _ in copies if isinstance(t, nn.Parameter)]):
        for target, value in copies:
            if value.numel() == target.numel() == 1:
                value = value.reshape(target.shape)  # CLIPModel's logit_scale is 0-d, ours [1]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{path}: a tensor of shape {tuple(value.shape)} does not fit the model's "
                                 f"{tuple(target.shape)}; check the model size JSON (embed_dim) against the checkpoint")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
    return ", ".join([f"{len(names)} tensors {prefix or '(no prefix) '}*", *loaded])


def _gathered(params: list[nn.Parameter]):
    """Full parameters for a copy: ZeRO-3's GatheredParameters when partitioned, else nothing to do."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()
