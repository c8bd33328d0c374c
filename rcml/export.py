"""Export a trained model as consolidated safetensors, and load it back in one process.

An export directory holds::

    model.safetensors   all parameters and buffers, full (unpartitioned) tensors, fp32
    spec.json           ``RCMLModel.spec``: everything needed to rebuild the architecture
    tokenizer.json      the tokenizer the model was trained with
    run_config.yaml     the resolved run configuration (for the record)

It is world-size independent (unlike a DeepSpeed checkpoint) and loads without DeepSpeed.

Loading trusts none of the three files to agree with the others: spec.json is checked against the
tensor shapes in the safetensors header (read without loading any tensor) before a model is built, so an
edited or mismatched spec is refused instead of allocating whatever it describes, and tokenizer.json is
checked against the vocabulary size and special token ids the spec recorded at training time.
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


def check_weights_match_spec(spec: dict[str, Any], weights_file: Path) -> None:
    """Raise ValueError unless ``weights_file`` holds exactly the tensors, by name and shape, of ``spec``.

    The spec's model is built on the meta device (shapes, no storage) and compared with the safetensors
    header (no tensor is read), so a spec that describes a far larger model costs nothing to refuse.
    """
    from safetensors import safe_open

    from rcml.model import RCMLModel

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in RCMLModel.from_spec(spec).state_dict().items()}
    except (ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"{weights_file.parent}/spec.json does not describe a model that can be built: "
                         f"{type(exn).__name__}: {exn}") from None
    with safe_open(str(weights_file), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = []
    wrong = next((k for k, shape in expected.items() if k in stored and stored[k] != shape), None)
    if wrong is not None:
        problems.append(f"{wrong} is {list(stored[wrong])} in model.safetensors but {list(expected[wrong])} "
                        "by spec.json")
    missing = [k for k in expected if k not in stored]
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the spec's model are not in model.safetensors, "
                        f"e.g. {missing[:3]}")
    unexpected = sorted(stored.keys() - expected.keys())
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in model.safetensors are not in the spec's model, "
                        f"e.g. {unexpected[:3]}")
    if problems:
        raise ValueError(f"{weights_file.parent}: spec.json and model.safetensors do not describe the same model: "
                         + "; ".join(problems) + ". Use the pair one export wrote together; do not edit either.")


def check_tokenizer_matches_spec(tokenizer, spec: dict[str, Any], tokenizer_file: Path) -> None:
    """Raise ValueError unless the tokenizer has the vocabulary size and special ids the model was trained with.

    Another tokenizer would still load and encode, into ids that mean other tokens to the model (and a
    different eos id makes the text tower pool at the wrong position).
    """
    recorded = spec["tokenizer"]
    actual = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id,
              "eos_id": tokenizer.eos_id}
    wrong = [f"{k} {actual[k]} (spec.json: {recorded[k]})" for k in actual
             if k in recorded and recorded[k] != actual[k]]
    rows = spec["text_config"].get("vocab_size")
    if rows is not None and tokenizer.vocab_size > rows:
        wrong.append(f"vocab_size {tokenizer.vocab_size} > the {rows} rows of the text tower's token embedding")
    if wrong:
        raise ValueError(f"{tokenizer_file} is not the tokenizer this model was trained with: {', '.join(wrong)}. "
                         "Use the tokenizer.json exported with the model (the run's data.tokenizer).")


def from_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> RCMLEmbedder:
    """Load an export directory (``<train.out_dir>/export``) into one process, no DeepSpeed needed.

    Returns an ``RCMLEmbedder``: ``.embed_images`` / ``.embed_texts`` (rcml/embedding.py), and ``.model``
    (``RCMLModel``, eval mode), ``.tokenizer``, ``.spec``, ``.run_config``. Raises ValueError, before any
    model is built, when the spec, the weights and the tokenizer do not belong together.
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
    tokenizer = TextTokenizer.from_file(str(path / "tokenizer.json"))
    check_weights_match_spec(spec, path / "model.safetensors")
    check_tokenizer_matches_spec(tokenizer, spec, path / "tokenizer.json")
    model = RCMLModel.from_spec(spec)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))  # names and shapes checked
    model.to(map_location).eval()
    run_cfg_file = path / "run_config.yaml"
    run_config = yaml.safe_load(run_cfg_file.read_text()) if run_cfg_file.exists() else {}
    return RCMLEmbedder(model, tokenizer, spec, run_config=run_config)
