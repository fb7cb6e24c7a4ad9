"""Stopping a run on a signal without losing work: finish the round, checkpoint, say where.

In process the round loop checks ``GracefulInterrupt.requested`` after each round. On Ray the
driver's handler asks the RoundLedger to stop; trainer rank 0 reads that after each round and all
ranks stop together (an all-reduce), after a checkpoint. ``ray job stop`` sends SIGTERM to the
driver and SIGKILLs it ``RAY_JOB_STOP_WAIT_TIME_S`` later (3 s by default): give the job's runtime
environment enough (e.g. 300) for a round and a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class GracefulInterrupt:
    """The first SIGINT or SIGTERM asks the run to stop after the current round (with a
    checkpoint, so a resume continues exactly); a second one stops at once (KeyboardInterrupt).
    ``on_request`` (optional) is called with the signal's name on the first one: the Ray driver
    tells the trainer through it."""

    def __init__(self, on_request: Callable[[str], None] | None = None) -> None:
        self.requested: str | None = None
        self.on_request = on_request
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s: stopping after this round, with a checkpoint (again to stop at once)", self.requested)
        if self.on_request is not None:
            self.on_request(self.requested)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
