"""DeepSpeed JSON handling: derived values come from the run config, bad configs fail clearly."""

import json
from pathlib import Path

import pytest

from rcml.config import ConfigError, load_config
from rcml.train.ds_config import load_ds_config, uses_bf16, zero_stage


def cfg(*overrides):
    return load_config(None, ["data.train=x.tar", *overrides])


def test_shipped_configs_load_and_derive_batch_and_schedule():
    run = cfg("data.groups_per_batch=5", "data.members_per_group=3", "train.steps=77")
    for name, stage in (("zero3", 3), ("zero2", 2), ("zero3_offload", 3), ("zero3_bf16", 3)):
        ds = load_ds_config(f"configs/{name}.json", run, world_size=4)
        assert zero_stage(ds) == stage
        assert ds["train_micro_batch_size_per_gpu"] == 15
        assert ds["train_batch_size"] == 15 * 4 * ds["gradient_accumulation_steps"]
        assert ds["scheduler"]["params"]["total_num_steps"] == 77
    assert uses_bf16(load_ds_config("configs/zero3_bf16.json", run, 1))
    assert not uses_bf16(load_ds_config("configs/zero3.json", run, 1))


def test_gpu_configs_use_bf16_fp32_reductions_fused_adam_and_large_buckets_cpu_configs_do_not():
    configs = {path.stem: load_ds_config(path, cfg("train.steps=10000"), world_size=64)
               for path in sorted(Path("configs").glob("*.json"))}
    gpu = {name: ds for name, ds in configs.items() if name.startswith("gpu_")}
    assert {name: zero_stage(ds) for name, ds in gpu.items()} == {"gpu_zero2_bf16": 2, "gpu_zero3_bf16": 3}
    for name, ds in gpu.items():
        zero = ds["zero_optimization"]
        assert uses_bf16(ds), name
        # gradients are summed over the ranks, and accumulated over micro-batches, in fp32
        assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
        assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is False  # FusedAdam
        assert ds["optimizer"]["params"]["weight_decay"] > 0  # biases, norms, embeddings, logit_scale: 0 (trainer)
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
        assert zero["reduce_bucket_size"] >= 5e8
        if zero_stage(ds) == 3:
            assert zero["stage3_prefetch_bucket_size"] >= 5e8 and zero["stage3_param_persistence_threshold"] >= 1e6
        else:
            assert zero["allgather_bucket_size"] >= 5e8
        assert ds["scheduler"]["params"]["warmup_num_steps"] >= 1000
    # the CPU configs (CI, the demo) compile nothing (torch's AdamW) and keep bf16 to zero3_bf16
    cpu = {name: ds for name, ds in configs.items() if name not in gpu}
    assert {name for name, ds in cpu.items() if uses_bf16(ds)} == {"zero3_bf16"}
    for name, ds in cpu.items():
        adam = ds["optimizer"]["params"]
        if name == "zero3_offload":  # the optimizer runs on the CPU: DeepSpeed's cpu_adam
            assert "torch_adam" not in adam
        else:
            assert adam["torch_adam"] is True, name
        assert ds["zero_optimization"]["overlap_comm"] is False and "communication_data_type" not in ds, name


def test_warmup_longer_than_run_is_shortened():
    ds = load_ds_config("configs/zero3.json", cfg("train.steps=5"), 1)
    assert ds["scheduler"]["params"]["warmup_num_steps"] < 5


@pytest.mark.parametrize("patch, message", [
    ({"train_micro_batch_size_per_gpu": "auto"}, "auto"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"zero_optimization": {"stage": 7}}, "stage"),
    ({"optimizer": None}, "optimizer"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16 needs zero_optimization.stage 1, 2 or 3"),
])
def test_bad_ds_configs(tmp_path, patch, message):
    ds = json.loads(open("configs/zero3.json").read())
    for k, v in patch.items():
        if v is None:
            ds.pop(k)
        else:
            ds[k] = v
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=message):
        load_ds_config(path, cfg(), 1)


def test_ds_overrides_set_values_and_refuse_derived_ones():
    run = cfg("train.steps=9")
    ds = load_ds_config("configs/zero3.json", run, 1,
                        ["ds.optimizer.params.lr=3.7e-5", "ds.optimizer.params.betas=[0.9, 0.95]",
                         "ds.scheduler.params.warmup_num_steps=3", "ds.gradient_accumulation_steps=3",
                         "ds.optimizer.type=Adam", "ds.zero_optimization.stage=2", "ds.new_section.flag=true"])
    assert ds["optimizer"]["params"]["lr"] == 3.7e-5 and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["type"] == "Adam" and zero_stage(ds) == 2 and ds["new_section"] == {"flag": True}
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 3 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 64 * 3  # derived values follow the overridden accumulation
    assert json.loads(open("configs/zero3.json").read())["optimizer"]["params"]["lr"] != 3.7e-5  # file untouched
    for bad, message in (("ds.train_batch_size=8", "derived from"), ("ds.scheduler.params.total_num_steps=5",
                                                                       "train.steps"),
                         ("ds.optimizer.params.lr.x=1", "not a section"), ("ds.=1", "ds.<path>"),
                         ("ds.gradient_clipping", "ds.<path>"), ("ds.zero_optimization.stage=9", "stage")):
        with pytest.raises(ConfigError, match=message):
            load_ds_config("configs/zero3.json", run, 1, [bad])


def test_values_replaced_by_the_run_config_are_logged(tmp_path, caplog):
    ds = json.loads(open("configs/zero3.json").read())
    ds["train_micro_batch_size_per_gpu"] = 7
    ds["scheduler"]["params"]["total_num_steps"] = 1000
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with caplog.at_level("INFO", logger="rcml"):
        out = load_ds_config(path, cfg("train.steps=5"), 2)
    text = caplog.text
    assert "train_micro_batch_size_per_gpu = 64 (the file says 7" in text
    assert "total_num_steps = 5 (the file says 1000" in text
    assert "warmup_num_steps = 1 (the file says 20" in text
    assert out["train_batch_size"] == 128
