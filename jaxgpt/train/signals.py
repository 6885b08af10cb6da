"""SIGTERM/SIGINT (preemption, Ctrl-C) become a flag the loop checks after each step, so the step in
flight finishes and a checkpoint is written before exiting.

Requests nest: a loop inside a multi-round command (a fine-tune inside `jaxgpt active`) passes the signal
on to the command's own request, so the whole command stops, not just the round. `caught_signal()` tells
the CLI which signal stopped the process, for the conventional exit status (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import signal
import threading

_caught: list[str] = []  # signals caught in this process since the last reset_caught()


def caught_signal() -> str | None:
    """The first stop signal caught since `reset_caught()` ('SIGINT', 'SIGTERM'), or None."""
    return _caught[0] if _caught else None


def reset_caught() -> None:
    _caught.clear()


def exit_status(signal_name: str) -> int:
    """128 + the signal number: what a shell reports for a process the signal ended."""
    return 128 + int(signal.Signals[signal_name])


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.request(signal.Signals(signum).name)
        outer = getattr(self._previous.get(signum), "__self__", None)
        if isinstance(outer, StopRequest) and outer.signal_name is None:
            outer.request(self.signal_name)  # the enclosing command stops too

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name
        _caught.append(signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
