"""The model card (README.md) of an export directory: data, steps, architecture, evaluation, how to load.

``write_model_card(export_dir, step=..., eval_report=...)`` renders it from the export's own spec.json and
run_config.yaml; ``write_export`` calls it, and calling it again later (after the final evaluation) adds
that evaluation's table without touching the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def _eval_section(report: dict[str, Any] | None, step: Any) -> list[str]:
    from rcml.eval.metrics import HIT_COLUMNS, KS
    from rcml.eval.report import PROTOCOLS

    if not report:
        return ["## Evaluation", "", "No evaluation report was written into this card. `python launch/evaluate.py "
                "--checkpoint <this folder> --shards ... --out ...` evaluates the export; the trainer's own reports "
                "are in `<train.out_dir>/eval/`.", ""]
    lines = ["## Evaluation", "",
             f"Relation-guided retrieval on the run's `data.val` (step {_fmt(step)}, "
             f"{_fmt(report.get('counts', {}).get('items'))} items), Hit@K under each similarity:", ""]
    rows = []
    for key, title in PROTOCOLS:
        hits = report.get(key, {})
        rows += [[f"{key} Hit@{k}", *[hits.get(f"hit@{k}", {}).get(c) for c in HIT_COLUMNS]] for k in KS]
    lines += _table(["", *HIT_COLUMNS], rows)
    lines += ["", "; ".join(f"`{key}`: {title}" for key, title in PROTOCOLS) + ".", ""]
    return lines


def render_model_card(spec: dict[str, Any], run_config: dict[str, Any], *, step: int | None = None,
                      eval_report: dict[str, Any] | None = None) -> str:
    data, model, train = (run_config.get(k) or {} for k in ("data", "model", "train"))
    v, t, tok = spec["vision_config"], spec["text_config"], spec["tokenizer"]
    size, context = int(spec["image_size"]), int(spec["context_length"])
    pools = spec["mode"] == "rcml" and float(spec["beta"]) < 1.0
    lines = [f"# RCML model: {spec.get('name', '?')}, {spec['mode']} mode, beta {_fmt(float(spec['beta']))}", "",
             "CLIP towers (transformers `CLIPVisionModel` / `CLIPTextModel`) trained with the relation-conditioned "
             "objective of RCML (arXiv 2508.17497): an item's embedding under a relation is "
             "`normalize(beta * global + (1 - beta) * pooled)`, the pooled part attending over the item's tokens "
             "with the relation text's embedding as query.", ""]
    lines += ["## Training", ""]
    origin = model.get("init_from") or " / ".join(p for p in (model.get("vision_path"), model.get("text_path")) if p)
    lines += _table(["", ""], [
        ["training data (`data.train`)", f"`{data.get('train')}`" if data.get("train") else None],
        ["validation data (`data.val`)", f"`{data.get('val')}`" if data.get("val") else None],
        ["optimizer steps", f"{step} of {train.get('steps', '?')}" if step is not None else train.get("steps")],
        ["seed", run_config.get("seed")],
        ["initialized from", origin or "random initialization"],
        ["mode, beta, mix", f"{spec['mode']}, {_fmt(float(spec['beta']))}, {spec.get('mix', 'legacy')}"],
        ["text pooling attends over", spec.get("text_pool_tokens", "contextual")],
    ])
    lines += ["", "The resolved configuration is `run_config.yaml`; the architecture is `spec.json`.", "",
              "## Architecture", ""]
    lines += _table(["tower", "width", "layers", "heads", "input"], [
        ["vision", v.get("hidden_size"), v.get("num_hidden_layers"), v.get("num_attention_heads"),
         f"{size} px, patch {v.get('patch_size')}"],
        ["text", t.get("hidden_size"), t.get("num_hidden_layers"), t.get("num_attention_heads"),
         f"{context} tokens, vocabulary {tok['vocab_size']}"],
    ])
    lines += ["", f"Joint width {spec['embed_dim']}; relation pooling: "
              + (f"{spec['pool_heads']} heads per modality (`rcml_pooling.safetensors`)." if pools else
                 "none (the model is CLIP: beta = 1 or the clip baseline)."), ""]
    if tok.get("swapped_ids"):
        a, b = tok["swapped_ids"]
        lines += [f"Token ids {a} and {b} of the training tokenizer are exchanged in this export (tokenizer files, "
                  f"token embedding, spec), so that eos is id {tok['eos_id']}: transformers' `CLIPTextModel` pools "
                  "at the largest id when a config's eos id is 2. Use the tokenizer in this folder.", ""]
    lines += _eval_section(eval_report, step)
    lines += ["## Loading", "", "With rcml (embeddings under a relation, or relation-independent with "
              "`relations=None`):", "", "```python", "import rcml", "",
              'm = rcml.from_pretrained("path/to/export")',
              'u = m.embed_images(images, relations=["both are red"] * len(images))   # [n, D], unit norm',
              't = m.embed_texts(["a red circle"])                                  # global embedding',
              "```", "",
              "With transformers alone (the relation-independent embedding: CLIP's image and text features):", "",
              "```python", "import torch", "from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel",
              "", 'model = CLIPModel.from_pretrained("path/to/export").eval()',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/export")',
              'processor = CLIPImageProcessor.from_pretrained("path/to/export")',
              f'text = tokenizer(["a red circle"], padding="max_length", max_length={context}, truncation=True, '
              'return_tensors="pt")',
              "with torch.no_grad():",
              "    t = model.get_text_features(**text).pooler_output                                    # [1, D]",
              '    u = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output',
              "```", "",
              "Normalize before comparing. The relation pooling is not part of transformers' CLIP: embeddings under "
              "a relation need rcml.", ""]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path, *, step: int | None = None,
                     eval_report: dict[str, Any] | None = None) -> Path:
    """(Re)write ``export_dir/README.md`` from the export's spec.json and run_config.yaml."""
    import yaml

    export_dir = Path(export_dir)
    spec = json.loads((export_dir / "spec.json").read_text())
    run_cfg_file = export_dir / "run_config.yaml"
    run_config = yaml.safe_load(run_cfg_file.read_text()) if run_cfg_file.exists() else {}
    card = export_dir / CARD_FILE
    card.write_text(render_model_card(spec, run_config if isinstance(run_config, dict) else {}, step=step,
                                      eval_report=eval_report))
    return card
