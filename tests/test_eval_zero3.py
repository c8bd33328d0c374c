"""evaluate() under DeepSpeed ZeRO-3 on 2 gloo ranks: every rank runs the same collective forwards and gets
the same report, equal to a single process evaluating the consolidated weights."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from data_prep.train_tokenizer import build_tokenizer
    from rcml.config import ModelConfig
    from rcml.eval import evaluate
    from rcml.export import consolidated_state_dict
    from rcml.model import RCMLModel, build_model
    from rcml.tokenizer import TextTokenizer
    from tests.eval_samples import L, make_samples

    S = 32  # the tiny model's patch size is 8

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    samples = make_samples(27, seed=8)
    texts = [s["caption"] for s in samples] + [r["text"] for s in samples for r in s["relations"]]
    tok = TextTokenizer(build_tokenizer(iter(texts * 3), 300))
    # the project's ZeRO-3 settings and the tiny model: its large matrices are partitioned
    from rcml.config import load_config
    from rcml.train.ds_config import load_ds_config

    run = load_config(None, ["data.train=x.tar", "data.groups_per_batch=1", "data.members_per_group=4"])
    ds = load_ds_config(REPO / "configs" / "zero3.json", run, world_size=2)  # micro batch and schedule derived
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build_model(ModelConfig(name="tiny", mode="rcml", beta=0.4), vocab_size=tok.vocab_size,
                            pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, context_length=L, image_size=S,
                            impl="torch")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    partitioned = sum(1 for p in engine.module.parameters() if p.numel() == 0)
    report = evaluate(engine.module, tok, samples, mode="rcml", context_length=L, image_size=S, negatives=5, seed=2,
                      batch_size=5)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"report": report, "partitioned": partitioned}))
    state = consolidated_state_dict(engine.module, rank == 0)
    if rank == 0:
        single = RCMLModel.from_spec(engine.module.spec, impl="torch")
        single.load_state_dict(state)
        ref = evaluate(single.eval(), tok, samples, mode="rcml", context_length=L, image_size=S, negatives=5, seed=2,
                       batch_size=9)
        (Path(out) / "single.json").write_text(json.dumps(ref))
    dist.barrier()
    dist.destroy_process_group()


def _close(a, b, path="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


def test_evaluate_under_zero3_matches_single_process(tmp_path, port):
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert r0["partitioned"] > 10  # parameters really were partitioned while evaluating
    assert r0["report"] == r1["report"]
    # ZeRO-3 evaluation (batch 5) == one process on the gathered weights (batch 9): same plan, same numbers
    _close(r0["report"], single)
    assert r0["report"]["retrieval"]["queries"] > 20
