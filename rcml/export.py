"""Export a trained model as consolidated safetensors, and load it back in one process.

An export directory is an RCML export and a Hugging Face CLIP folder at once::

    model.safetensors         the towers, projections and logit scale under transformers' CLIPModel names
                              (vision_model.*, text_model.*, visual_projection.weight, text_projection.weight,
                              logit_scale), full (unpartitioned) fp32 tensors
    rcml_pooling.safetensors  the relation pooling (image_pool.*, text_pool.*); only for a model that pools
    config.json               CLIPConfig of the towers, projection_dim = the joint width
    preprocessor_config.json  CLIPImageProcessor settings of the evaluation transform
    tokenizer.json            the tokenizer the model was trained with ...
    tokenizer_config.json     ... and its special tokens and context length (AutoTokenizer loads both)
    spec.json                 ``RCMLModel.spec``: everything needed to rebuild the architecture
    run_config.yaml           the resolved run configuration (for the record)
    README.md                 model card (rcml/model_card.py)

``transformers.CLIPModel.from_pretrained(export)`` loads every tensor of model.safetensors, no missing and
no unexpected key, and its ``get_image_features`` / ``get_text_features`` are the relation-independent
(global) embeddings of ``embed_images`` / ``embed_texts`` with ``relations=None``, before normalization.
The pooling lives in its own file because transformers has no module for it. The export is world-size
independent (unlike a DeepSpeed checkpoint) and loads without DeepSpeed.

Token ids: our text tower pools at the first eos token. ``CLIPTextModel`` does too, except when its
config says ``eos_token_id == 2``: then it pools at the largest token id (a rule kept for old OpenAI
configs), and 2 is the eos id of ``data_prep.train_tokenizer``'s tokenizers. For such a model the export
exchanges ids 2 and ``vocab_size - 1`` in the tokenizer files, in the rows of the token embedding and in
the spec (``spec["tokenizer"]["swapped_ids"]`` records the pair): the same model, whose eos is now the
largest id, so that either rule pools it. Texts encode to the same embeddings; raw ids from the training
tokenizer do not fit the exported weights (``from_pretrained`` refuses that tokenizer).

Exports written before this layout (every tensor under its ``RCMLModel`` name in model.safetensors, no
config.json) still load with ``from_pretrained``.

Loading trusts none of the files to agree with the others: spec.json is checked against the tensor
shapes in the safetensors headers (read without loading any tensor) before a model is built, so an edited
or mismatched spec is refused instead of allocating whatever it describes, and tokenizer.json is checked
against the vocabulary size and special token ids the spec recorded.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rcml.embedding import RCMLEmbedder

WEIGHTS_FILE = "model.safetensors"
POOLING_FILE = "rcml_pooling.safetensors"
POOLING_PREFIXES = ("image_pool.", "text_pool.")
# RCMLModel submodule -> transformers CLIPModel submodule; the projections and logit_scale keep their names
CLIP_PREFIXES = {"vision.": "vision_model.", "text.": "text_model."}
TOKEN_EMBEDDING = "text.embeddings.token_embedding.weight"
LEGACY_EOS_ID = 2  # CLIPTextModel pools at the arg-max token id when its config has this eos_token_id


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


# ---------------------------------------------------------------------------------------------- names
def clip_name(name: str) -> str:
    """``RCMLModel`` state-dict name -> its name in model.safetensors (a CLIPModel name)."""
    for ours, theirs in CLIP_PREFIXES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def rcml_name(key: str) -> str:
    """Name in model.safetensors (either layout) -> ``RCMLModel`` state-dict name."""
    for ours, theirs in CLIP_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _location(name: str, clip_layout: bool) -> tuple[str, str]:
    """Where the tensor ``name`` lives in an export: (file, key)."""
    if not clip_layout:
        return WEIGHTS_FILE, name
    return (POOLING_FILE, name) if name.startswith(POOLING_PREFIXES) else (WEIGHTS_FILE, clip_name(name))


def _is_clip_layout(keys) -> bool:
    return any(k.startswith(tuple(CLIP_PREFIXES.values())) for k in keys)


def _shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) if name == "logit_scale" and shape == () else shape  # CLIPModel's is 0-d, ours [1]


# ---------------------------------------------------------------------------------------------- write
def swapped_ids(spec: dict[str, Any]) -> tuple[int, int] | None:
    """The pair of token ids the export exchanges (see the module docstring), or None."""
    tok = spec["tokenizer"]
    if tok["eos_id"] != LEGACY_EOS_ID:
        return None
    last = int(tok["vocab_size"]) - 1
    if last == LEGACY_EOS_ID:
        raise ValueError(f"a vocabulary of {tok['vocab_size']} tokens is too small to export")
    return LEGACY_EOS_ID, last


def _renumber(state: dict[str, torch.Tensor], spec: dict[str, Any], pair: tuple[int, int]):
    """(state, spec) with token ids ``pair`` exchanged: token embedding rows, special ids."""
    a, b = pair
    state = dict(state)
    rows = state[TOKEN_EMBEDDING].clone()
    rows[[a, b]] = rows[[b, a]]
    state[TOKEN_EMBEDDING] = rows
    spec = copy.deepcopy(spec)
    swap = {a: b, b: a}
    for key in ("pad_id", "bos_id", "eos_id"):
        spec["tokenizer"][key] = swap.get(spec["tokenizer"][key], spec["tokenizer"][key])
        hf_key = key.replace("_id", "_token_id")  # the text tower's own config carries the same ids
        if spec["text_config"].get(hf_key) is not None:
            spec["text_config"][hf_key] = spec["tokenizer"][key]
    spec["tokenizer"]["swapped_ids"] = [a, b]
    return state, spec


def clip_config(spec: dict[str, Any], logit_scale: float):
    """The transformers ``CLIPConfig`` of the spec's towers (text ids as in ``spec["tokenizer"]``)."""
    from transformers import CLIPConfig

    tok, dim = spec["tokenizer"], int(spec["embed_dim"])
    text = dict(spec["text_config"], projection_dim=dim, pad_token_id=tok["pad_id"], bos_token_id=tok["bos_id"],
                eos_token_id=tok["eos_id"])
    vision = dict(spec["vision_config"], projection_dim=dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim,
                      logit_scale_init_value=float(logit_scale), architectures=["CLIPModel"])


def _image_processor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings of ``rcml.preprocess.ImageTransform(image_size, train=False)``: the same pixels
    for a square image; for others it resizes the short side and then crops (we crop, then resize)."""
    from rcml.preprocess import CLIP_MEAN, CLIP_STD

    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def write_export(out: Path, state: dict[str, torch.Tensor], spec: dict[str, Any], tokenizer_path: Path,
                 run_config_yaml: str, *, step: int | None = None,
                 eval_report: dict[str, Any] | None = None) -> Path:
    """Write the export directory ``out`` (replaced as a whole, atomically) from an ``RCMLModel`` state dict.

    ``tokenizer_path``: the run's tokenizer.json (or a Hugging Face tokenizer folder); ``step``: the optimizer
    step of the weights and ``eval_report``: an ``rcml.eval.evaluate`` report, both for the model card only.
    """
    from safetensors.torch import save_file

    from rcml.model_card import write_model_card
    from rcml.tokenizer import TextTokenizer, tokenizer_file

    tokenizer_path = tokenizer_file(tokenizer_path)
    tokenizer = TextTokenizer.from_file(tokenizer_path)
    check_tokenizer_matches_spec(tokenizer, spec, tokenizer_path)
    pair = swapped_ids(spec)
    if pair is not None:
        state, spec = _renumber(state, spec, pair)
        tokenizer = tokenizer.with_swapped_ids(*pair)
    pooling = {k: v.contiguous() for k, v in state.items() if k.startswith(POOLING_PREFIXES)}
    towers = {clip_name(k): v.contiguous() for k, v in state.items() if not k.startswith(POOLING_PREFIXES)}
    towers["logit_scale"] = towers["logit_scale"].reshape(())

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(towers, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if pooling:
        save_file(pooling, str(tmp / POOLING_FILE), metadata={"format": "pt"})
    clip_config(spec, towers["logit_scale"].item()).to_json_file(str(tmp / "config.json"))
    (tmp / "preprocessor_config.json").write_text(
        json.dumps(_image_processor_config(int(spec["image_size"])), indent=2) + "\n")
    tokenizer.write_pretrained(tmp, int(spec["context_length"]))
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    (tmp / "run_config.yaml").write_text(run_config_yaml)
    write_model_card(tmp, step=step, eval_report=eval_report)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- read
def _stored_shapes(weights_file: Path) -> tuple[dict[str, tuple[int, ...]], list[str], bool]:
    """-> ({RCMLModel name: shape} over model.safetensors and the pooling file beside it, problems, clip layout)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    with safe_open(str(weights_file), framework="pt") as f:
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    clip_layout = _is_clip_layout(keys)
    files = [(WEIGHTS_FILE, keys)]
    pooling_file = weights_file.parent / POOLING_FILE
    if pooling_file.exists():
        with safe_open(str(pooling_file), framework="pt") as f:
            files.append((POOLING_FILE, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}))
    for file, stored in files:
        for key, shape in stored.items():
            name = rcml_name(key) if file == WEIGHTS_FILE else key
            if name in shapes:
                problems.append(f"{key} in {file} is a second copy of {name}")
            shapes[name] = _shape(name, shape)
    return shapes, problems, clip_layout


def spec_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of the model ``spec`` describes, from the meta device (nothing allocated)."""
    from rcml.model import RCMLModel

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in RCMLModel.from_spec(spec).state_dict().items()}


def check_weights_match_spec(spec: dict[str, Any], weights_file: Path) -> None:
    """Raise ValueError unless ``weights_file`` (and the pooling file beside it) hold exactly the tensors, by
    name and shape, of ``spec``.

    The spec's model is built on the meta device (shapes, no storage) and compared with the safetensors
    headers (no tensor is read), so a spec that describes a far larger model costs nothing to refuse.
    """
    try:
        expected = spec_shapes(spec)
    except (ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"{weights_file.parent}/spec.json does not describe a model that can be built: "
                         f"{type(exn).__name__}: {exn}") from None
    stored, problems, clip_layout = _stored_shapes(weights_file)
    wrong = next((k for k, shape in expected.items() if k in stored and stored[k] != shape), None)
    if wrong is not None:
        file, key = _location(wrong, clip_layout)
        problems.append(f"{wrong}{f' ({key})' if key != wrong else ''} is {list(stored[wrong])} in {file} but "
                        f"{list(expected[wrong])} by spec.json")
    missing = [_location(k, clip_layout) for k in expected if k not in stored]
    if missing:
        files = " / ".join(sorted({file for file, _ in missing}))
        problems.append(f"{len(missing)} tensor(s) of the spec's model are not in {files}, "
                        f"e.g. {[key for _, key in missing[:3]]}")
    unexpected = [_location(k, clip_layout) for k in sorted(stored.keys() - expected.keys())]
    if unexpected:
        files = " / ".join(sorted({file for file, _ in unexpected}))
        problems.append(f"{len(unexpected)} tensor(s) in {files} are not in the spec's model, "
                        f"e.g. {[key for _, key in unexpected[:3]]}")
    if problems:
        raise ValueError(f"{weights_file.parent}: spec.json and the weights do not describe the same model: "
                         + "; ".join(problems) + ". Use the files one export wrote together; do not edit any.")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export directory (either layout), under its ``RCMLModel`` state-dict name."""
    from safetensors.torch import load_file

    path = Path(path)
    state = {rcml_name(k): v for k, v in load_file(str(path / WEIGHTS_FILE), device="cpu").items()}
    if (path / POOLING_FILE).exists():
        state |= load_file(str(path / POOLING_FILE), device="cpu")
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(_shape("logit_scale", tuple(state["logit_scale"].shape)))
    return state


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

    from rcml.model import RCMLModel
    from rcml.tokenizer import TextTokenizer

    path = Path(path)
    if (path / "COMPLETE").exists() and not (path / WEIGHTS_FILE).exists():  # rcml.train.checkpoint's marker
        raise FileNotFoundError(f"{path} is a training checkpoint, not an export: convert it with "
                                f"`python -m rcml.train.checkpoint export {path} --out DIR`")
    for name in (WEIGHTS_FILE, "spec.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not an RCML export: {name} is missing")
    spec = json.loads((path / "spec.json").read_text())
    tokenizer = TextTokenizer.from_file(path / "tokenizer.json")
    check_weights_match_spec(spec, path / WEIGHTS_FILE)
    check_tokenizer_matches_spec(tokenizer, spec, path / "tokenizer.json")
    model = RCMLModel.from_spec(spec)
    model.load_state_dict(read_weights(path))  # names and shapes checked
    model.to(map_location).eval()
    run_cfg_file = path / "run_config.yaml"
    run_config = yaml.safe_load(run_cfg_file.read_text()) if run_cfg_file.exists() else {}
    return RCMLEmbedder(model, tokenizer, spec, run_config=run_config)
