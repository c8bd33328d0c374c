"""launch/pretrain.py with faults injected, for the failure tests (tests/test_operations.py).

    deepspeed --num_gpus 2 tests/scripts/faulty_pretrain.py [--nonfinite 3,5.1] [--save-pause-s 30] \
        [--pause-pids DIR] [--fail-evaluation] [--fail-report] <launch/pretrain.py arguments>

``--nonfinite``: the losses made NaN, ``S`` (every micro-batch of optimizer step S, 1-based) or ``S.M``
(micro-batch M of step S, 0-based). ``--save-pause-s``: every rank waits that long between writing its
checkpoint files and publishing them, so that a test can kill a rank mid-save; with ``--pause-pids`` it
first writes its process id to ``DIR/rank<r>.pid``, so that the test knows which process is paused
where without reading the process table. ``--fail-evaluation``: every evaluation raises on every rank
as it starts; ``--fail-report``: rank 0's writing of every evaluation report raises. All replace the no-op
injection points of rcml/train/faults.py before the trainer starts; nothing is read from the environment.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch import pretrain  # noqa: E402
from rcml.train import faults  # noqa: E402


def parse_nonfinite(spec: str) -> set[tuple[int, int | None]]:
    """``"3,5.1"`` -> {(3, None), (5, 1)}: None = every micro-batch of the step."""
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        step, _, micro = part.partition(".")
        out.add((int(step), int(micro) if micro else None))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--nonfinite", default="")
    p.add_argument("--save-pause-s", type=float, default=0.0)
    p.add_argument("--pause-pids", type=Path, default=None)
    p.add_argument("--fail-evaluation", action="store_true")
    p.add_argument("--fail-report", action="store_true")
    args, rest = p.parse_known_args(argv)
    bad = parse_nonfinite(args.nonfinite)
    if bad:
        faults.nonfinite_loss = lambda step, micro: (step, None) in bad or (step, micro) in bad
    if args.save_pause_s > 0:
        def pause(path, rank):
            if args.pause_pids is not None:
                args.pause_pids.mkdir(parents=True, exist_ok=True)
                marker = args.pause_pids / f"rank{rank}.pid"
                marker.with_suffix(".tmp").write_text(str(os.getpid()))
                os.replace(marker.with_suffix(".tmp"), marker)  # the test never reads a half-written id
            logging.getLogger("rcml").warning("pausing %.0f s before publishing %s", args.save_pause_s, path.name)
            time.sleep(args.save_pause_s)

        faults.before_publish = pause
    if args.fail_evaluation:
        def fail_evaluation(step):
            raise RuntimeError(f"injected: the evaluation at step {step} fails")

        faults.evaluation = fail_evaluation
    if args.fail_report:
        def fail_report(step):
            raise OSError(f"injected: writing the report of step {step} fails")

        faults.report_writing = fail_report
    return pretrain.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
