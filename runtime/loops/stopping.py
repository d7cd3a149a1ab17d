"""Graceful stops: SIGTERM, SIGINT or SIGUSR1 during a loop ask it to stop between two steps.

While a loop runs inside `StopRequest.watching()`, those signals only record themselves (the
first one counts; later ones, e.g. SLURM's SIGTERM after its SIGUSR1 warning, change nothing, so
a checkpoint being written is finished). One process checks after every training step. Several
workers agree every AGREE_EVERY steps and at the last one, through the engine's collective
`agree` (the largest signal number any worker received), so they all stop after the same step;
agreeing waits for the step in flight, so it is not done after every step. The loop then writes
its checkpoint and raises `Stopped`. Outside the loops the signals keep their usual effect.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
AGREE_EVERY = 4  # training steps between two agreements of several workers


class Stopped(Exception):
    """A loop stopped on signal `signum` after `step` (a training step, or the volumes done);
    the process should exit with `code`, 128 + the signal's number."""

    def __init__(self, signum, mode, step, message=None):
        self.signum, self.mode, self.step = signum, mode, step
        super().__init__(message or f"stopped by {signal_name(signum)} after {mode} step {step}")

    @property
    def code(self) -> int:
        """The exit status job systems read as a stop by this signal."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, and so on."""
    return signal.Signals(signum).name


class StopRequest:
    """The first stop signal received while `watching()`, as `signum` (0 while none came)."""

    def __init__(self):
        self.signum = 0

    def _record(self, signum, frame):
        if not self.signum:
            self.signum = signum

    @contextlib.contextmanager
    def watching(self) -> Iterator[StopRequest]:
        """Record the stop signals instead of their usual effect, until the block ends (in the
        main thread only, where Python runs signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.signal(number, self._record) for number in SIGNALS}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
