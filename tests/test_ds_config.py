"""DeepSpeed JSON handling: derived values come from the run config, bad configs fail clearly."""

import json

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


def test_warmup_longer_than_run_is_shortened():
    ds = load_ds_config("configs/zero3.json", cfg("train.steps=5"), 1)
    assert ds["scheduler"]["params"]["warmup_num_steps"] < 5


@pytest.mark.parametrize("patch, message", [
    ({"train_micro_batch_size_per_gpu": "auto"}, "auto"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"zero_optimization": {"stage": 7}}, "stage"),
    ({"optimizer": None}, "optimizer"),
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
