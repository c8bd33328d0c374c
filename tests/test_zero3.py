"""ZeRO-3 for real: each rank holds about 1/world of every large parameter after construction."""

import json
import math

import pytest

from tests._train_utils import DEEPSPEED, run

pytestmark = pytest.mark.slow


def test_each_rank_holds_half_of_every_large_parameter(tmp_path, port):
    run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "tests/scripts/zero3_partition.py", str(tmp_path)],
        timeout=300)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0.keys() == r1.keys() and len(r0) > 20
    large = [n for n, v in r0.items() if v["full"] >= 10_000]
    assert len(large) >= 10
    for name in large:
        full = r0[name]["full"]
        assert r0[name]["visible"] == 0, f"{name} is materialized outside forward"
        for rank in (r0, r1):
            assert rank[name]["local"] == math.ceil(full / 2), (name, rank[name], full)
    total_full = sum(v["full"] for v in r0.values())
    total_local = sum(v["local"] for v in r0.values())
    assert total_local <= 0.55 * total_full
