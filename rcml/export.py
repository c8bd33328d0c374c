"""Export a trained model as consolidated safetensors, and load it back in one process.

An export directory holds::

    model.safetensors   all parameters and buffers, full (unpartitioned) tensors, fp32
    spec.json           ``RCMLModel.spec``: everything needed to rebuild the architecture
    tokenizer.json      the tokenizer the model was trained with
    run_config.yaml     the resolved run configuration (for the record)

It is world-size independent (unlike a DeepSpeed checkpoint) and loads without DeepSpeed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rcml.embedding import RCMLEmbedder



def consolidated_state_dict(module: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of every parameter and buffer; collective under ZeRO-3.

    Parameters are gathered one module at a time (``GatheredParameters``), so peak memory is one
    module's full weights, not the whole model's.
    """
    from deepspeed import zero

    state: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        params = list(mod.named_parameters(recurse=False))
        prefix = f"{mod_name}." if mod_name else ""
        with zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if is_main:
                for name, p in params:
                    state[prefix + name] = p.detach().to("cpu", torch.float32).clone()
        if is_main:
            for name, b in mod.named_buffers(recurse=False):
                if name in mod._non_persistent_buffers_set:
                    continue
                state[prefix + name] = b.detach().to("cpu").clone()
    return state


def write_export(out: Path, state: dict[str, torch.Tensor], spec: dict[str, Any], tokenizer_path: Path,
                 run_config_yaml: str) -> Path:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    (tmp / "run_config.yaml").write_text(run_config_yaml)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def from_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> RCMLEmbedder:
    """Load an export directory (``<train.out_dir>/export``) into one process, no DeepSpeed needed.

    Returns an ``RCMLEmbedder``: ``.embed_images`` / ``.embed_texts`` (rcml/embedding.py), and ``.model``
    (``RCMLModel``, eval mode), ``.tokenizer``, ``.spec``, ``.run_config``.
    """
    import yaml
    from safetensors.torch import load_file

    from rcml.model import RCMLModel
    from rcml.tokenizer import TextTokenizer

    path = Path(path)
    for name in ("model.safetensors", "spec.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not an RCML export: {name} is missing")
    spec = json.loads((path / "spec.json").read_text())
    model = RCMLModel.from_spec(spec)
    state = load_file(str(path / "model.safetensors"), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}/model.safetensors does not match spec.json: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.to(map_location).eval()
    tokenizer = TextTokenizer.from_file(str(path / "tokenizer.json"))
    run_cfg_file = path / "run_config.yaml"
    run_config = yaml.safe_load(run_cfg_file.read_text()) if run_cfg_file.exists() else {}
    return RCMLEmbedder(model, tokenizer, spec, run_config=run_config)
