"""Stop at a step boundary when asked: SIGTERM (how TPU and cloud preemption arrives) or SIGINT.

The handler only records the request; the training loop checks it after each step, saves a
checkpoint and returns, so the run exits 0 and the same command resumes it. A second Ctrl-C
interrupts at once. In a multi-process job every process stops at the same step: the request
is shared through a collective, since preemption notices reach hosts at different times.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class StopRequests:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self) -> str | None:
        """The signal that asks this job to stop, if any, agreed by all processes."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils
        anyone = multihost_utils.process_allgather(np.int32(self.received is not None))
        return (self.received or "a signal to another process") if np.any(anyone) else None
