"""A run directory belongs to one run: fresh starts never mix with an older run, pruning goes by step."""

import json

import pytest

from rcml.train import checkpoint, run_dir


def _ckpt(ckpt_dir, step):
    d = ckpt_dir / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_pruning_keeps_this_runs_newest_by_step_number(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6, 200):  # 200: left by a longer run that was resumed from step 4
        _ckpt(ckpts, step)
    _ckpt(ckpts, 123_456_789)  # past 8 digits the names no longer sort by step
    (ckpts / "step_notanumber").mkdir()
    assert [checkpoint.step_of(p) for p in checkpoint.published(ckpts)] == [2, 4, 6, 200, 123_456_789]
    # publishing step 6 with keep 2: step 2 goes, step 6 (just published) and 4 stay, the later ones stay too
    assert [p.name for p in checkpoint.prunable(ckpts, 6, 2)] == ["step_00000002"]
    assert checkpoint.prunable(ckpts, 6, 3) == []


def test_a_fresh_start_in_a_used_directory_is_refused_naming_the_way_out(tmp_path):
    out = tmp_path / "run"
    assert run_dir.check_fresh_start(out, None, overwrite=False) == []  # missing: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run's file
    (out / "mlflow.db").write_text("")      # a store of many runs: not a reason to refuse
    assert run_dir.check_fresh_start(out, None, overwrite=False) == []
    _ckpt(out / "checkpoints", 200)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "export").mkdir()
    (out / "keys_rank00001.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="already holds a run.*--resume latest.*train.overwrite=true"):
        run_dir.check_fresh_start(out, None, overwrite=False)
    assert run_dir.check_fresh_start(out, "latest", overwrite=False) == []  # resuming continues it
    stale = run_dir.check_fresh_start(out, None, overwrite=True)
    assert {p.name for p in stale} == {"checkpoints", "metrics.jsonl", "export", "keys_rank00001.jsonl"}
    run_dir.remove(stale)
    assert sorted(p.name for p in out.iterdir()) == ["mlflow.db", "notes.txt"]
