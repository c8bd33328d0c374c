"""Export a model at its random initialization: the untrained floor of an evaluation.

    python launch/export_init.py --config configs/pretrain/emoji.yaml --out runs/emoji/untrained_rcml/seed_0/export \
        seed=0 model.mode=rcml data.tokenizer=data/emoji/tokenizer.json

Builds the model exactly as ``launch/pretrain.py`` would describe it (same config, overrides, tokenizer
and ``seed``), in one process and without DeepSpeed, and writes a normal export directory that
``launch/evaluate.py`` and ``rcml.from_pretrained`` load. Weights are those of ``torch.manual_seed(seed)``
followed by the towers' own initialization (a ZeRO-3 run initializes partitioned weights in another
order, so its step-0 weights differ; both are draws from the same initialization). With ``model.init_from``
the towers, projections and logit scale are the pretrained CLIP's (its zero-shot floor) and only the
relation pooling is random.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run configuration YAML (configs/pretrain/*.yaml)")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 model.mode=clip")
    args = p.parse_args(argv)

    from rcml.config import ConfigError, dumps, load_config
    from rcml.export import write_export
    from rcml.model import build_model
    from rcml.tokenizer import TextTokenizer
    from rcml.train.trainer import find_tokenizer, seed_everything

    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer_path = find_tokenizer(cfg)
    except (ConfigError, FileNotFoundError) as exn:
        print(f"config error: {exn}", file=sys.stderr)
        return 2
    tok = TextTokenizer.from_file(str(tokenizer_path))
    seed_everything(cfg.seed)
    model = build_model(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                        context_length=cfg.data.context_length, image_size=cfg.data.image_size)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    out = write_export(Path(args.out), state, model.spec, tokenizer_path, dumps(cfg), step=0)
    print(f"exported the initial {cfg.model.mode} model (seed {cfg.seed}, {len(state)} tensors) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
