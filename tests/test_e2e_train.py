"""End to end through the real `deepspeed` launcher: 2 CPU ranks, ZeRO-3, synthetic shards.

One reference run (tests/_train_utils.py: 160 steps from scratch, checkpoint at step 80) feeds several
checks: the model learns (its cross-modal terms end well below their chance level ln(rows), which a model
that does not learn cannot do: see test_a_model_that_does_not_learn_fails_the_check), the golden loss curve
matches, checkpoint and export are written and load, and an exact resume from the step-80 checkpoint
reproduces steps 81..160 (losses and sample keys).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests._train_utils import (GOLDEN, REFERENCE_CKPT, REPO, REFERENCE_STEPS, below_chance, build_tiny_dataset,
                                deepspeed_cmd, overrides_list, read_keys, read_metrics, reference_overrides, run)

pytestmark = pytest.mark.slow

STEPS = REFERENCE_STEPS
# Relative distance below chance of the last 20 steps' cross-modal terms that counts as learning. The
# reference run reaches 0.13 (tests/scripts/golden_loss.py prints it); a collapsed model is at 0 and the
# plateau of its first 20 steps at -0.01.
LEARNED = 0.05


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dataset):
    from tests.conftest import free_port

    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run(deepspeed_cmd(free_port(), "configs/zero3.json", reference_overrides(dataset, out)), timeout=1200)
    return out, proc


def test_the_model_learns_and_everything_is_written(reference_run):
    out, proc = reference_run
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert all(k in m for k in ("loss_it", "loss_ti", "loss_ii", "loss_tt", "lr", "samples_per_s", "grad_norm",
                                    "rows"))
    assert below_chance(metrics[-20:]) > LEARNED, [(m["loss_it"], m["rows"]) for m in metrics[-20:]]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (ckpts / f"step_{REFERENCE_CKPT:08d}" / "COMPLETE").exists()
    assert not list(ckpts.glob(".tmp-*"))
    # the final evaluation and the MLflow store
    reports = sorted((out / "eval").glob("step_*/report.json"))
    assert reports, "no evaluation report"
    hit5 = json.loads(reports[-1].read_text())["retrieval"]["hit@5"]
    assert set(hit5) >= {"TT", "II", "TI", "IT", "AVG"} and all(0.0 <= v <= 1.0 for v in hit5.values())
    assert (out / "mlflow.db").exists()
    # the embedded store's artifacts stay in the run directory (not <cwd>/mlruns: MLflow 3 exports the URI)
    assert list((out / "mlartifacts").rglob("run_config.yaml")) and list((out / "mlartifacts").rglob("report.json"))


def test_export_loads_in_one_process(reference_run, dataset):
    import rcml
    from rcml.data import iter_samples

    out, _ = reference_run
    loaded = rcml.from_pretrained(out / "export")
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.spec["mode"] == "rcml"
    sample = next(iter(iter_samples(dataset["data.val"])))
    from rcml.preprocess import ImageTransform

    image = ImageTransform(loaded.spec["image_size"], train=False)(sample["image"])[None]
    rel_ids, rel_mask = tok.encode([sample["relations"][0]["text"]], loaded.spec["context_length"])
    with torch.no_grad():
        rel = model.encode_relations(rel_ids, rel_mask)
        emb = model.encode_images(image, rel, torch.tensor([0]), torch.tensor([0]))
    assert emb.shape[0] == 1 and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_golden_loss_curve(reference_run):
    """The reference run against tests/assets/golden_tiny_loss.json (written by tests/scripts/golden_loss.py
    --export-result, never by this test).

    The first 40 steps are compared tightly: fp32 reductions differ slightly across CPUs and BLAS builds, and
    a real regression moves the curve by far more than 2e-3. Later steps are chaotic once the model leaves the
    chance plateau (a 1e-6 difference grows), so there only the mean of the last 20 steps is compared."""
    out, _ = reference_run
    losses = torch.tensor([m["loss"] for m in read_metrics(out)])
    golden = torch.tensor(json.loads(GOLDEN.read_text())["loss"])
    assert golden.shape == losses.shape == (STEPS,)
    torch.testing.assert_close(losses[:40], golden[:40], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(losses[-20:].mean(), golden[-20:].mean(), rtol=0.05, atol=0.0)


def test_a_model_that_does_not_learn_fails_the_check(reference_run, dataset, tmp_path):
    """The learning check is not vacuous: the same run with a learning rate of 0 (the model stays at its
    initialization) and the reference run's own first steps (the chance plateau) both fail it."""
    from tests.conftest import free_port

    ds = json.loads((REPO / "configs" / "zero3.json").read_text())
    ds["optimizer"]["params"]["lr"] = 0.0
    (tmp_path / "lr0.json").write_text(json.dumps(ds))
    out = tmp_path / "lr0"
    run(deepspeed_cmd(free_port(), str(tmp_path / "lr0.json"),
                      overrides_list(dataset, out, **{"train.steps": "20", "data.val": "", "train.export": "false"})))
    frozen = read_metrics(out)
    assert abs(below_chance(frozen)) < LEARNED, [(m["loss_it"], m["rows"]) for m in frozen]
    plateau = read_metrics(reference_run[0])[:20]
    assert below_chance(plateau) < LEARNED, [(m["loss_it"], m["rows"]) for m in plateau]


def _start_from_mid_run(ref: Path, out: Path) -> None:
    """A fresh run directory whose only checkpoint is the reference run's mid-run one (step REFERENCE_CKPT)."""
    name = f"step_{REFERENCE_CKPT:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name)


def test_exact_resume_from_mid_run_checkpoint(reference_run, dataset, tmp_path):
    """80 steps + resume + 80 steps == 160 straight steps: same losses (1e-5) and same sample keys."""
    from tests.conftest import free_port

    ref, _ = reference_run
    out = tmp_path / "resumed"
    _start_from_mid_run(ref, out)
    ov = overrides_list(dataset, out, **{"train.steps": str(STEPS), "train.ckpt_every": str(REFERENCE_CKPT)})
    run(deepspeed_cmd(free_port(), "configs/zero3.json", ov, extra_args=("--resume", "latest")), timeout=1200)
    resumed = {m["step"]: m["loss"] for m in read_metrics(out)}
    straight = {m["step"]: m["loss"] for m in read_metrics(ref)}
    assert sorted(resumed) == list(range(REFERENCE_CKPT + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= 1e-5 * max(1.0, abs(straight[step])), (step, loss, straight[step])
    for rank in (0, 1):
        ref_keys, res_keys = read_keys(ref, rank), read_keys(out, rank)
        assert {s: ref_keys[s] for s in range(REFERENCE_CKPT + 1, STEPS + 1)} == res_keys


def test_resume_with_another_world_size_is_refused(reference_run, dataset, tmp_path):
    from tests.conftest import free_port

    ref, _ = reference_run
    out = tmp_path / "one_rank"
    _start_from_mid_run(ref, out)
    ov = overrides_list(dataset, out, **{"train.steps": str(STEPS)})
    with pytest.raises(AssertionError, match="written by 2 ranks, this job has 1"):
        run(deepspeed_cmd(free_port(), "configs/zero3.json", ov, nproc=1, extra_args=("--resume", "latest")),
            timeout=300)


def test_a_fresh_start_in_a_directory_holding_a_run_is_refused(reference_run, dataset):
    """Without --resume, a run directory that holds another run is not reused: its checkpoints, latest,
    metrics and export stay as they were (train.overwrite=true would replace them)."""
    from tests.conftest import free_port

    ref, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in [ref / "metrics.jsonl", ref / "checkpoints" / "latest"]}
    ov = overrides_list(dataset, ref, **{"train.steps": "2"})
    with pytest.raises(AssertionError, match="already holds a run"):
        run(deepspeed_cmd(free_port(), "configs/zero3.json", ov), timeout=300)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (ref / "export" / "model.safetensors").is_file()


def test_a_training_checkpoint_exports_as_the_trainer_does(reference_run, dataset, tmp_path, capsys):
    """python -m rcml.train.checkpoint export: the final checkpoint's export holds exactly the weights, spec
    and tokenizer of the trainer's own export; evaluate.py reads a checkpoint directly and scores it as the
    export; a changed file or weights that do not fit the spec are refused before anything loads."""
    from safetensors.torch import load_file

    import rcml
    from launch.evaluate import main as evaluate_main
    from rcml.train import checkpoint
    from rcml.train.checkpoint_export import export_checkpoint

    ref, _ = reference_run
    final = ref / "checkpoints" / f"step_{STEPS:08d}"
    assert checkpoint.main(["export", str(ref / "checkpoints"), "--out", str(tmp_path / "final")]) == 0  # its latest
    for weights in ("model.safetensors", "rcml_pooling.safetensors"):
        ours, trainers = load_file(tmp_path / "final" / weights), load_file(ref / "export" / weights)
        assert ours.keys() == trainers.keys()
        assert all(torch.equal(ours[k], trainers[k]) for k in ours), weights
    for name in ("spec.json", "tokenizer.json", "config.json", "run_config.yaml"):
        assert (tmp_path / "final" / name).read_text() == (ref / "export" / name).read_text(), name
    # the mid-run checkpoint is another model
    mid = export_checkpoint(ref / "checkpoints" / f"step_{REFERENCE_CKPT:08d}", tmp_path / "mid")
    key = "text_projection.weight"
    assert not torch.equal(load_file(mid / "model.safetensors")[key], load_file(ref / "export" / "model.safetensors")[key])
    assert f"{REFERENCE_CKPT} of {STEPS}" in (mid / "README.md").read_text()  # the model card's optimizer steps

    # evaluate.py on the checkpoint directory == on the export
    common = ["--shards", dataset["data.val"], "--max-items", "48", "--negatives", "5", "--batch-size", "16"]
    assert evaluate_main(["--checkpoint", str(final), "--out", str(tmp_path / "eval_ckpt"), *common]) == 0
    assert evaluate_main(["--checkpoint", str(ref / "export"), "--out", str(tmp_path / "eval_export"), *common]) == 0
    from_ckpt, from_export = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("eval_ckpt", "eval_export"))
    assert from_ckpt["retrieval"] == from_export["retrieval"] and from_ckpt["checkpoint"] == str(final.resolve())
    capsys.readouterr()

    # a changed byte in a file DeepSpeed would unpickle: refused, naming it
    tampered = tmp_path / "tampered" / final.name
    shutil.copytree(final, tampered)
    optim = sorted(tampered.glob("*optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    assert checkpoint.main(["export", str(tampered), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert optim.name in err and "sha256" in err and not (tmp_path / "never").exists()
    # a spec that the weights do not fit (one text layer fewer), resealed as if trusted
    shutil.rmtree(tampered)
    shutil.copytree(final, tampered)
    spec = json.loads((tampered / "spec.json").read_text())
    spec["text_config"]["num_hidden_layers"] -= 1
    (tampered / "spec.json").write_text(json.dumps(spec))
    checkpoint.seal(tampered)
    with pytest.raises(RuntimeError, match=r"do not match its spec.json: missing \[\], unexpected \['text\."):
        export_checkpoint(tampered, tmp_path / "never")
    # from_pretrained names the conversion instead of a missing file
    with pytest.raises(FileNotFoundError, match="is a training checkpoint, not an export: convert it with"):
        rcml.from_pretrained(final)
