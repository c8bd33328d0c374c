"""Run under a launcher: build the tiny model under deepspeed.zero.Init and report this rank's shards."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rcml.config import ModelConfig  # noqa: E402
from rcml.model import build_model  # noqa: E402


def main() -> None:
    out = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    ds = json.loads(Path("configs/zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 1  # zero.Init reads a whole DeepSpeed config (the trainer derives it)
    deepspeed.init_distributed(verbose=False)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build_model(ModelConfig(name="tiny"), vocab_size=500, pad_id=0, bos_id=1, eos_id=2,
                            context_length=16, image_size=32)
    report = {name: {"local": p.ds_tensor.numel(), "full": p.ds_numel, "visible": p.numel()}
              for name, p in model.named_parameters()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
