"""SIGINT/SIGTERM during a run: finish the step, checkpoint, exit cleanly."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator


class StopWhileWaiting(BaseException):
    """A stop signal while the loop waited for a step's data: stop now, the last step is whole.
    Not an Exception: with data.num_workers=0 it is raised inside the data pipeline, whose
    `except Exception` took it for an undecodable sample, so the step went on with another batch."""


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and exits cleanly. While
    the loop waits for a step's first batch (`waiting_for_data`), a signal stops it there instead:
    a loader that never delivers (all data bad, a hung mount) must not make a run ignore SIGTERM."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.waiting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no preemption support
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signum
        if self.waiting:
            self.waiting = False
            raise StopWhileWaiting(f"received {signal.Signals(signum).name} while waiting for data")

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """A block that waits for data between steps: a signal (now, or already received) ends it."""
        if self.signal is not None:
            raise StopWhileWaiting(f"received {signal.Signals(self.signal).name}")
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
