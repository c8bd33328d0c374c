"""Graceful stop requests: a checkpoint is saved before the job exits (preemption, SLURM requeue).

Two ways to ask, because launchers differ in which processes see a signal:
- SIGTERM or SIGUSR1 delivered to a training process (torchrun forwards SIGTERM to its workers);
- a file ``<out_dir>/STOP`` (what ``launch/slurm/pretrain.sbatch`` touches when SLURM sends
  ``--signal=B:USR1@120`` to the batch script), which reaches every node through the shared file system.
Ranks agree on the stop at the next step boundary (an all-reduce of the flag), so all save together.

A signal can also mean "the launcher is tearing the job down" (another rank died). Then the next step
boundary may never come, so a signalled process exits by itself ``grace_s`` seconds later, and at once on
a second signal. Checkpoints are atomic, so exiting in the middle of a save loses nothing published.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("rcml")


class StopRequest:
    def __init__(self, stop_file: Path, grace_s: float) -> None:
        self.stop_file = stop_file
        self.grace_s = grace_s
        self._signalled: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self._signalled:
            log.error("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        self._signalled = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and stop at the next step boundary (or exit in %.0f s)",
                    self._signalled, self.grace_s)
        timer = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        timer.daemon = True
        timer.start()

    def _give_up(self, signum: int) -> None:
        log.error("stop after %s not completed within %.0f s (a peer is gone?): exiting", self._signalled,
                  self.grace_s)
        logging.shutdown()
        os._exit(128 + signum)

    def local_reason(self) -> str | None:
        if self._signalled:
            return self._signalled
        if self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return None

    def clear(self) -> None:
        """Called after the stop was honoured, so a requeued job does not stop again at once."""
        if self.stop_file.exists():
            try:
                self.stop_file.unlink()
            except OSError:
                pass
