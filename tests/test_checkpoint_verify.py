"""Resuming treats a checkpoint directory as untrusted input: ``latest`` stays inside the checkpoint
directory, and every file is checked against the sizes and sha256 in COMPLETE before DeepSpeed loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rcml.train import checkpoint
from tests.conftest import free_port


class FakeEngine:
    """Writes and reads DeepSpeed-like files; records whether DeepSpeed's loader was reached."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        d = Path(save_dir) / tag
        (d / "sub").mkdir(parents=True)
        torch.save({"w": torch.arange(1000)}, d / "mp_rank_00_model_states.pt")
        torch.save({"m": torch.ones(300)}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (d / "sub" / "part.bin").write_bytes(bytes(range(256)) * 10)
        (d / "zero_to_fp32.py").write_text("# recovery script\n")

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool):
        self.loaded.append(tag)
        return str(Path(load_dir) / tag), {}


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group: save() and load() are collectives."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def ckpts(tmp_path, one_rank):
    """Two published checkpoints, step 2 and step 4, written by the real save()."""
    ckpt_dir = tmp_path / "checkpoints"
    engine = FakeEngine()
    for step in (2, 4):
        checkpoint.save(engine, ckpt_dir, step, {"step": step}, {"run_config.yaml": "seed: 0\n"}, keep=5, rank=0)
    return ckpt_dir


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _refused(ckpt_dir: Path, tag: str, match: str) -> None:
    """load() refuses with ``match`` and never reaches DeepSpeed's loader."""
    engine = FakeEngine()
    with pytest.raises(RuntimeError, match=match):
        checkpoint.load(engine, ckpt_dir / tag, rank=0, world_size=1)
    assert engine.loaded == []


# ------------------------------------------------------------------------------------- latest confinement
def _outside_checkpoint(tmp_path: Path) -> Path:
    """A complete-looking checkpoint outside the checkpoint directory."""
    elsewhere = tmp_path / "elsewhere" / "step_00000009"
    elsewhere.mkdir(parents=True)
    (elsewhere / checkpoint.COMPLETE).write_text(json.dumps({"step": 9, "world_size": 1, "files": {}}))
    return elsewhere


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_latest_must_name_a_checkpoint_inside_the_directory(tmp_path, how):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    outside = _outside_checkpoint(tmp_path)
    if how == "relative":
        name = "../../elsewhere/step_00000009"
    elif how == "absolute":
        name = str(outside)
    else:
        (ckpt_dir / "step_00000009").symlink_to(outside, target_is_directory=True)
        name = "step_00000009"
    (ckpt_dir / checkpoint.LATEST).write_text(name)
    with pytest.raises(RuntimeError, match="not a checkpoint directly inside"):
        checkpoint.resolve(ckpt_dir, checkpoint.LATEST)
    assert checkpoint.published(ckpt_dir) == []  # a symlinked step directory is never offered or pruned


def test_latest_naming_a_plain_tag_resolves(ckpts):
    assert checkpoint.resolve(ckpts, checkpoint.LATEST) == ckpts / "step_00000004"
    (ckpts / checkpoint.LATEST).write_text(".tmp-step_00000006")
    with pytest.raises(RuntimeError, match="not a checkpoint directly inside"):
        checkpoint.resolve(ckpts, checkpoint.LATEST)


# ----------------------------------------------------------------------------------------- verification
def test_save_records_every_file_and_load_verifies_them(ckpts):
    path = ckpts / "step_00000004"
    meta = json.loads((path / checkpoint.COMPLETE).read_text())
    assert sorted(meta["files"]) == ["mp_rank_00_model_states.pt", "run_config.yaml", "sub/part.bin",
                                     "trainer_state_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "zero_to_fp32.py"]
    for name, entry in meta["files"].items():
        assert entry == dict(zip(("size", "sha256"), checkpoint._digest(path / name))), name
    engine = FakeEngine()
    assert checkpoint.load(engine, path, rank=0, world_size=1) == {"step": 4}
    assert engine.loaded == ["step_00000004"]


def test_a_flipped_byte_is_refused_and_the_previous_checkpoint_offered(ckpts):
    _flip_byte(ckpts / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _refused(ckpts, "step_00000004", r"zero_pp_rank_0_mp_rank_00_optim_states\.pt does not match the sha256.*"
                                     r"--resume step_00000002 to resume from the previous complete checkpoint")
    checkpoint.verify(ckpts / "step_00000002")  # the offered one is intact


def test_the_oldest_checkpoint_corrupt_says_there_is_no_earlier_one(ckpts):
    _flip_byte(ckpts / "step_00000002" / "sub" / "part.bin")
    _refused(ckpts, "step_00000002", r"sub/part\.bin does not match.*no earlier complete checkpoint")


def test_a_truncated_file_is_refused(ckpts):
    model = ckpts / "step_00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-10])
    _refused(ckpts, "step_00000004", r"mp_rank_00_model_states\.pt has \d+ bytes.*truncated.*--resume step_00000002")


def test_an_extra_file_is_refused(ckpts):
    torch.save({"x": 1}, ckpts / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    _refused(ckpts, "step_00000004", r"zero_pp_rank_1_mp_rank_00_optim_states\.pt is not one of the files")


def test_a_missing_file_is_refused(ckpts):
    (ckpts / "step_00000004" / "trainer_state_rank00000.pt").unlink()
    _refused(ckpts, "step_00000004", r"trainer_state_rank00000\.pt is missing.*--resume step_00000002")


def test_a_symlink_inside_a_checkpoint_is_refused(ckpts, tmp_path):
    (tmp_path / "planted.pt").write_bytes(b"x")
    (ckpts / "step_00000004" / "extra.pt").symlink_to(tmp_path / "planted.pt")
    _refused(ckpts, "step_00000004", r"extra\.pt is not a regular file")


def test_a_checkpoint_without_hashes_is_refused_until_sealed(ckpts):
    path = ckpts / "step_00000004"
    meta = json.loads((path / checkpoint.COMPLETE).read_text())
    (path / checkpoint.COMPLETE).write_text(json.dumps({"step": meta["step"], "world_size": meta["world_size"]}))
    _refused(ckpts, "step_00000004", r"lists no file hashes.*python -m rcml\.train\.checkpoint seal")
    assert checkpoint.main(["seal", str(path)]) == 0
    assert json.loads((path / checkpoint.COMPLETE).read_text())["files"] == meta["files"]
    assert checkpoint.load(FakeEngine(), path, rank=0, world_size=1) == {"step": 4}


def test_ranks_share_the_hashing(ckpts):
    """Each file is hashed by exactly one rank; the rank holding a corrupt file is the one that refuses."""
    path = ckpts / "step_00000004"
    sizes = checkpoint._listing(path)
    shares = checkpoint._shares(sizes, 4)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    victim = "sub/part.bin"
    _flip_byte(path / victim)
    owner = next(r for r, share in enumerate(shares) if victim in share)
    for rank in range(4):
        if rank == owner:
            with pytest.raises(RuntimeError, match="sub/part.bin does not match"):
                checkpoint.verify(path, rank, 4)
        else:
            checkpoint.verify(path, rank, 4)


def test_a_corrupt_complete_marker_is_refused(ckpts):
    (ckpts / "step_00000004" / checkpoint.COMPLETE).write_text("{not json")
    _refused(ckpts, "step_00000004", r"COMPLETE cannot be read.*--resume step_00000002")
