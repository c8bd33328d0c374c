"""Mistakes caught before launch: one line per problem, exit status 2, no traceback, no rank started; the
--help key list, --print-config without data, ds.* overrides, and a plain `python launch/pretrain.py` run."""

from __future__ import annotations

import json
import subprocess

import pytest

from rcml.config import describe_keys, load_config
from rcml.train.preflight import missing_shards, problems
from tests.conftest import free_port
from tests._train_utils import PY, REPO, build_tiny_dataset, deepspeed_cmd, env, overrides_list, read_metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("synthetic_preflight"), items=240, val_items=48)


def pretrain(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "launch/pretrain.py", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_every_problem_is_one_line_before_any_model_is_built(dataset, tmp_path):
    out = tmp_path / "typo_out"
    bad = overrides_list(dataset, out, **{"data.train": dataset["data.train"].replace("/train/", "/trian/"),
                                          "data.val": str(tmp_path / "val-{000..002}.tar"),
                                          "data.tokenizer": str(tmp_path / "no_tokenizer.json")})
    proc = pretrain("--ds_config", str(tmp_path / "zero9.json"), "--resume", "latest", *bad)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 5, proc.stderr
    assert "--ds_config" in lines[0] and "does not exist" in lines[0]
    assert lines[1].startswith("error: data.train: no shard of") and "/trian/" in lines[1]
    assert lines[2].startswith("error: data.val: no shard of")
    assert lines[3].startswith("error: data.tokenizer:")
    assert "--resume latest: no complete checkpoint in" in lines[4] and str(out) in lines[4]
    assert "Traceback" not in proc.stderr and not out.exists()  # nothing was started, nothing written


def test_a_missing_ds_config_and_a_partly_missing_pattern_are_named(dataset, tmp_path):
    pattern = dataset["data.train"]  # e.g. .../train-{000000..000003}.tar: widen it past the last shard
    head, _, tail = pattern.rpartition("..")
    widened = head + ".." + str(int(tail.split("}")[0]) + 3).zfill(len(tail.split("}")[0])) + "}" + tail.split("}")[1]
    cfg = load_config(None, overrides_list(dataset, tmp_path / "o", **{"data.train": widened}))
    found = problems(cfg, None, None)
    assert found[0].startswith("--ds_config: missing")
    assert found[1].startswith("data.train: 3 of ") and "do not exist" in found[1]
    assert missing_shards("data.train", "pipe:curl -s http://x/{0..3}.tar") is None  # remote: the loader's job
    assert missing_shards("data.train", dataset["data.train"]) is None


def test_a_shard_that_does_not_match_its_manifest_is_refused_up_front(tmp_path):
    import shutil

    from data_prep.synthetic import build as build_synthetic

    manifests = build_synthetic(tmp_path / "d", items=90, val_items=1, seed=3, image_size=32, shard_size=40)
    pattern = manifests["train"]["pattern"]
    assert missing_shards("data.train", pattern) is None
    first = sorted((tmp_path / "d" / "train").glob("shard-*.tar"))[0]
    shutil.copy(first, first.with_name("shard-000099.tar"))  # a stray shard the manifest does not list
    line = missing_shards("data.train", str(first.with_name("shard-{000000,000099}.tar")))
    assert line.startswith("data.train: shard ") and "is not listed in" in line


def test_resume_values(dataset, tmp_path):
    cfg = load_config(None, overrides_list(dataset, tmp_path / "fresh"))
    assert problems(cfg, "configs/zero3.json", None) == []
    assert problems(cfg, "configs/zero3.json", "auto") == []  # nothing yet: a job script's first start
    assert "no complete checkpoint" in problems(cfg, "configs/zero3.json", "latest")[0]
    assert "step_00000042" in " ".join(problems(cfg, "configs/zero3.json", "step_00000042"))
    bad_ds = problems(cfg, "configs/zero3.json", None, ["ds.train_batch_size=3"])
    assert len(bad_ds) == 1 and "derived from" in bad_ds[0]


def test_help_lists_every_key_with_its_default_and_print_config_needs_no_data():
    proc = pretrain("--help")
    assert proc.returncode == 0
    keys = describe_keys()
    assert len(keys) > 40
    for key, default, _ in keys:
        assert f"  {key}={'' if default is None else default}" in proc.stdout, key
    assert "shard URL pattern(s)" in proc.stdout and "ds.optimizer.params.lr" in proc.stdout

    proc = pretrain("--print-config", "model.mode=clip", "train.steps=7")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["data"]["train"] == "" and printed["train"]["steps"] == 7 and printed["loss"]["w_intra"] == 0.0


@pytest.mark.slow
def test_plain_python_runs_a_single_process_with_ds_overrides(dataset, tmp_path):
    out = tmp_path / "single"
    ov = overrides_list(dataset, out, **{"train.steps": "3", "train.export": "false", "data.val": "",
                                         "tracking.mlflow": "false"})
    proc = pretrain("--ds_config", "configs/zero3.json", *ov, "ds.optimizer.params.lr=1e-5", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "running as a single process" in proc.stderr
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert max(m["lr"] for m in metrics) <= 1e-5 * (1 + 1e-6)  # the override reached the optimizer
    # a second start in the same directory without --resume is refused up front, once, by the launcher
    proc = subprocess.run(deepspeed_cmd(free_port(), "configs/zero3.json", ov), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert sum("already holds a run" in line for line in error_lines(proc)) == 1, proc.stderr[-3000:]
