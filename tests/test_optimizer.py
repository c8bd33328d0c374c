"""The trainer's optimizer set-up: weight-decay groups, the logit-scale bound in DeepSpeed's fp32 master
copy (on real 1-2 rank CPU engines), TF32 on CUDA."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from rcml.config import ModelConfig
from rcml.model import build_model
from rcml.train.optimizer import LOGIT_SCALE_BOUNDS, param_groups, split_weight_decay
from tests._train_utils import DEEPSPEED, REPO, env, run


def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="tiny"), vocab_size=300, pad_id=0, bos_id=1, eos_id=2, context_length=16,
                       image_size=32)


def test_weight_decay_groups_leave_out_biases_norms_embeddings_and_logit_scale():
    model = tiny()
    params = dict(model.named_parameters())
    decay, no_decay = split_weight_decay(model)
    assert decay.keys() | no_decay.keys() == params.keys() and not decay.keys() & no_decay.keys()
    assert all(group[n] is params[n] for group in (decay, no_decay) for n in group)
    norms = [f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
             for n, _ in mod.named_parameters(recurse=False)]
    biases = [n for n in params if n.endswith(".bias")]
    embeddings = ["vision.embeddings.class_embedding", "vision.embeddings.position_embedding.weight",
                  "text.embeddings.token_embedding.weight", "text.embeddings.position_embedding.weight"]
    assert len(norms) > 10 and len(biases) > 20
    assert set(norms + biases + embeddings + ["logit_scale"]) == no_decay.keys()
    matrices = ["vision.encoder.layers.0.self_attn.q_proj.weight", "text.encoder.layers.3.self_attn.out_proj.weight",
                "text.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight", "text_projection.weight",
                "image_pool.k_proj.weight", "vision.embeddings.patch_embedding.weight"]
    assert set(matrices) <= decay.keys() and all(p.dim() >= 2 for p in decay.values())
    groups = param_groups(model)  # the decayed group takes the DeepSpeed JSON's rate
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    assert [list(map(id, g["params"])) for g in groups] == [list(map(id, d.values())) for d in (decay, no_decay)]


# (config, ranks, overrides, the optimizer DeepSpeed builds): every layout bound_logit_scale_ has to reach.
# The GPU configs run with torch's AdamW here (FusedAdam is CUDA's; on CPU it would be a 1-minute JIT build).
ENGINES = {
    "zero3_fp32": ("configs/zero3.json", 1, [], "DeepSpeedZeroOptimizer_Stage3"),
    "gpu_zero3_bf16": ("configs/gpu_zero3_bf16.json", 2, ["ds.optimizer.params.torch_adam=true"],
                       "DeepSpeedZeroOptimizer_Stage3"),
    "gpu_zero2_bf16": ("configs/gpu_zero2_bf16.json", 2, ["ds.optimizer.params.torch_adam=true"],
                       "DeepSpeedZeroOptimizer"),
    "gpu_zero1_bf16": ("configs/gpu_zero2_bf16.json", 2, ["ds.optimizer.params.torch_adam=true",
                                                          "ds.zero_optimization.stage=1"], "BF16_Optimizer"),
}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("case", list(ENGINES))
def test_engine_decays_only_the_decay_group_and_bounds_the_master_logit_scale(tmp_path, port, case):
    config, ranks, overrides, wrapper = ENGINES[case]
    lr = 0.5
    run([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), "tests/scripts/optimizer_engine.py",
         str(tmp_path), config, f"ds.optimizer.params.lr={lr}", *overrides], timeout=300)
    for rank in range(ranks):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["optimizer"] == wrapper and r["world"] == ranks
        assert r["group_weight_decay"] == [r["json_weight_decay"], 0.0] and r["json_weight_decay"] > 0
        # a zero-gradient AdamW step is pure decay: x (1 - lr x weight_decay) in the first group, x 1 in the other
        tol = 3e-3 if r["bf16"] else 1e-5
        for name in r["decay"]:
            assert r["decay_ratio"][name] == pytest.approx(1 - lr * r["json_weight_decay"], abs=tol), name
        for name in r["no_decay"]:
            assert r["decay_ratio"][name] in (None, 1.0), name
        # pushed up by ~lr per step for 10 steps from ln(1/0.07) = 2.66: bounded at ln 100 in the fp32 master
        # (the copy the next step starts from), the module's copy is its rounding, the forward its exp
        high = LOGIT_SCALE_BOUNDS[1]
        dtype = torch.bfloat16 if r["bf16"] else torch.float32
        assert r["logit_scale_dtype"] == str(dtype)
        assert r["logit_scale_master"] == [torch.tensor(high, dtype=torch.float32).item()]
        assert r["logit_scale_module"] == [torch.tensor(high).to(dtype).item()]
        assert r["forward_scale_dtype"] == "torch.float32"
        assert r["forward_scale"] == pytest.approx(math.exp(r["logit_scale_module"][0]), rel=1e-6)


def test_tf32_is_allowed_for_fp32_matmuls_on_cuda_only():
    # a fresh process: torch refuses to mix these settings with the legacy allow_tf32 flags later on
    code = ("import json, torch; from rcml.train.trainer import allow_tf32\n"
            "state = lambda: [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision]\n"
            "allow_tf32(torch.device('cpu')); cpu = state()\n"
            "allow_tf32(torch.device('cuda')); print(json.dumps([cpu, state()]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120, check=True)
    cpu, cuda = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cpu[0] != "tf32" and cuda == ["tf32", "tf32"]
