"""Ctrl-C, SIGTERM and SIGHUP end any work the same careful way.

The handlers raise `Interrupted` (a KeyboardInterrupt) in the main thread, so every `finally`
and context manager on the way out runs: temporary files are removed, VMs stopped, sessions
scrubbed. A section that must not be cut in half (renaming a pair of results into place,
scrubbing a session) runs inside `deferred()`: a signal that arrives meanwhile takes effect
when the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal; `exit_code` is 128 + its number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = threading.local()  # deferral depth and the signal held back, main thread only


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _handler(signum: int, frame: object) -> None:
    if _depth() > 0:
        _state.pending = getattr(_state, "pending", None) or signum
        return
    raise Interrupted(signum)


def install() -> None:
    """Route the stop signals through `Interrupted`: first thing in a command's life, and
    for the rest of it (restoring the old handlers at the end would reopen a window for a
    traceback)."""
    for sig in HANDLED:
        signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the stop signals until the block is done; one that arrived is raised after it.

    Deferral is done in Python, not with the signal mask: a mask set in the main thread
    does not stop the kernel from delivering the signal to another thread.
    """
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
        pending = getattr(_state, "pending", None)
        if _state.depth == 0 and pending is not None:
            _state.pending = None
            raise Interrupted(pending)
