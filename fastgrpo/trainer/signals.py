"""SIGINT/SIGTERM during a run: each phase (set-up, an evaluation, a step, writing the model)
keeps the promise its message makes (``RunSignals``); ``TrainingInterrupted`` carries the exit
code (128 + signal)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from fastgrpo.trainer import distributed as dist_

__all__ = ["RunSignals", "StopPhase", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a completed step (``.exit_code``: 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopPhase(BaseException):
    """Raised by the signal handler to end an interruptible phase (set-up, an evaluation) at
    once; a BaseException, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RunSignals:
    """SIGINT/SIGTERM handling for the whole run: the first signal prints what the current
    phase (``phase``) will do, and either ends that phase at once (``interrupt=True``: set-up,
    evaluations, by raising ``StopPhase``) or lets it finish (a training step: the loop then
    checkpoints and stops; writing the model: the run then exits); a second signal exits at
    once (SystemExit 128 + signal)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}
        self.message = "stopping after the current step (with a checkpoint)"
        self.interrupt = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def phase(self, message: str, interrupt: bool = False):
        """Within: a first signal prints ``message`` (and, ``interrupt``, ends the phase)."""
        before = self.message, self.interrupt
        self.message, self.interrupt = message, interrupt
        try:
            if interrupt and self.signum is not None:  # signalled before the phase began
                raise StopPhase(self.signum)
            yield
        finally:
            self.message, self.interrupt = before

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting now, without a checkpoint of the current step",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{name}: {self.message}; send it again to exit at once", file=sys.stderr,
              flush=True)
        if self.interrupt:
            self.interrupt = False  # raised once
            raise StopPhase(signum)

    def stop_requested(self) -> int | None:
        """The signal that stops the run (every rank agrees), or None."""
        if not dist_.is_distributed():
            return self.signum
        got = dist_.all_gather_objects(self.signum)
        return next((x for x in got if x is not None), None)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
