"""Fault-injection points for the failure tests.

Production code calls these no-ops where a test needs something to go wrong; nothing here reads the
environment or the run config. ``tests/scripts/faulty_pretrain.py`` (launch/pretrain.py with faults)
replaces them before the trainer starts, e.g. to make the loss of one micro-batch NaN or to hold a
checkpoint between writing its files and publishing it while the test kills a rank.
"""

from __future__ import annotations

from pathlib import Path


def nonfinite_loss(step: int, micro: int) -> bool:
    """True: make the loss of micro-batch ``micro`` (0-based) of optimizer step ``step`` (1-based) NaN."""
    return False


def before_publish(path: Path, rank: int) -> None:
    """Called on every rank once its files of the checkpoint being saved are written to ``path`` (the
    ``.tmp-`` directory), before any rank hashes them and the checkpoint is published."""


def evaluation(step: int) -> None:
    """Called on every rank when an evaluation at ``step`` starts: raising here makes the evaluation fail."""


def report_writing(step: int) -> None:
    """Called on rank 0 before it writes and logs the report of the evaluation at ``step``."""
