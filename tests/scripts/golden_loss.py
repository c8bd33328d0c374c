"""Run the reference training run of tests/test_e2e_train.py and compare it with, or export it as, the golden curve.

    python tests/scripts/golden_loss.py                   # run, print the curve next to the golden one
    python tests/scripts/golden_loss.py --export-result   # run and write tests/assets/golden_tiny_loss.json

Export only after an intended change of the model, data, loss or schedule, and say so in the commit: the
test never rewrites the file it checks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests._train_utils import (GOLDEN, REFERENCE_STEPS, below_chance, build_tiny_dataset, deepspeed_cmd,  # noqa: E402
                                read_metrics, reference_overrides, run)
from tests.conftest import free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-result", action="store_true", help=f"write the curve to {GOLDEN}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_tiny_dataset(Path(tmp) / "synthetic")
        out = Path(tmp) / "run"
        run(deepspeed_cmd(free_port(), "configs/zero3.json", reference_overrides(data, out)), timeout=1800)
        metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics]
    old = json.loads(GOLDEN.read_text())["loss"] if GOLDEN.exists() else []
    print(f"{'step':>4} {'rows':>4} {'loss':>10} {'golden':>10} {'it/ln(rows)':>11}")
    for i, m in enumerate(metrics):
        g = f"{old[i]:10.5f}" if i < len(old) else f"{'-':>10}"
        print(f"{m['step']:4d} {m['rows']:4d} {m['loss']:10.5f} {g} {m['loss_it'] / math.log(m['rows']):11.3f}")
    print(f"below chance, last 20 steps: {below_chance(metrics[-20:]):.3f}; first 20: {below_chance(metrics[:20]):.3f}")
    if args.export_result:
        GOLDEN.write_text(json.dumps({
            "what": f"tests/test_e2e_train.py reference run: tiny, seed 0, 2 CPU ranks, ZeRO-3 fp32, 16 rows per "
                    f"rank, {REFERENCE_STEPS} steps; written by tests/scripts/golden_loss.py --export-result",
            "loss": losses, "rows": [m["rows"] for m in metrics]}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
