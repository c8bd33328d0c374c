"""DataLoader workers die with their rank: a rank killed by SIGKILL leaves no worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.synthetic import build as build_synthetic
from data_prep.train_tokenizer import build_tokenizer
from rcml.config import DataConfig
from rcml.data import build_loader, iter_samples
from rcml.tokenizer import TextTokenizer
from tests._train_utils import REPO, env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

# A "rank" that builds a loader with 2 workers, takes one batch and stops reading. Long texts make each
# batch's pickled part larger than a pipe's buffer, so the workers block on the full result pipe: the
# state in which torch's own parent check does not end a worker, which then outlives its rank forever.
RANK = """
import sys, time
from rcml.config import DataConfig
from rcml.data import build_loader
from rcml.tokenizer import TextTokenizer
cfg = DataConfig(train=sys.argv[1], workers=2, image_size=32, context_length=256, groups_per_batch=4,
                 members_per_group=6, min_group=2, buffer_size=80, shard_shuffle=10)
batches = iter(build_loader(cfg, TextTokenizer.from_file(sys.argv[2]), mode="rcml", rank=0, world_size=1, seed=0))
next(batches)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker_data")
    manifests = build_synthetic(root, items=240, val_items=10, seed=1, image_size=32, shard_size=60)
    samples = list(iter_samples(manifests["train"]["pattern"]))
    tok = build_tokenizer(iter([s["caption"] for s in samples] + [r["text"] for s in samples for r in s["relations"]]),
                          300)
    tok.save(str(root / "tokenizer.json"))
    return manifests["train"]["pattern"], root / "tokenizer.json"


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Running: not gone and not a zombie (a killed process stays a zombie until reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_die_when_their_rank_is_killed(data, tmp_path):
    pattern, tokenizer = data
    log = tmp_path / "rank.log"
    with open(log, "w") as out:  # a file, not a pipe: an orphaned worker would hold a pipe open
        rank = subprocess.Popen([sys.executable, "-c", RANK, pattern, str(tokenizer)], cwd=REPO, env=env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while "ready" not in log.read_text():
            assert rank.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = children(rank.pid)
        assert len(workers) >= 2, workers
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "DataLoader workers outlived their rank"
    finally:
        for pid in [rank.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        rank.wait()


def _init_in_child(init) -> int:
    """Exit status of a forked child that runs a worker init function: 0 if it returned, 2 if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            init(0)
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


def test_a_worker_whose_rank_is_already_gone_exits(data):
    """A worker whose parent is not the process that built the loader (that one died between the fork and
    the prctl, and the worker was reparented) exits at once instead of running on."""
    pattern, tokenizer = data
    cfg = DataConfig(train=pattern, workers=1, image_size=32, context_length=16, groups_per_batch=3,
                     members_per_group=4, min_group=2, buffer_size=40, shard_shuffle=10)
    loader = build_loader(cfg, TextTokenizer.from_file(str(tokenizer)), mode="rcml", rank=0, world_size=1, seed=0)
    assert loader.worker_init_fn is not None
    assert _init_in_child(loader.worker_init_fn) == 0  # forked by the loader's own process: goes on
    middle = os.fork()
    if middle == 0:  # stands in for another parent; its child plays the worker
        os._exit(_init_in_child(loader.worker_init_fn))
    _, status = os.waitpid(middle, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
