"""An overlay upload as synthesis reads it: bytes pulled from the request body on demand.

Synthesis (vmsynth.apply) is synchronous and runs on a worker thread; the request body is an
aiohttp stream on the event loop. Each read from the worker asks the event loop for the next
bytes, so nothing is buffered beyond what synthesis asked for and TCP flow control paces
the client. The same rules as for a URL apply (vmsynth.source.Limits): a client that sends
too slowly, or more than it declared, ends its session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from aiohttp import StreamReader

from vmsynth.errors import BadInputError, ExitCode
from vmsynth.source import Limits

from .api import Refusal

READ = 1 << 20


class Upload:
    """The request body, read from a worker thread; counts, paces and bounds the bytes."""

    name = "the upload"

    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop, limit: int,
                 limits: Limits) -> None:
        self.content, self.loop, self.limit, self.limits = content, loop, limit, limits
        self.size = limit  # for progress: the size the client declared
        self.received = 0
        self.first: float | None = None  # when the first and last bytes arrived
        self.last: float | None = None
        self.cancelled = False  # the session ended meanwhile (see cancel)
        self._pending: concurrent.futures.Future[bytes] | None = None
        self._waited = 0.0
        self._window = 0

    def read(self, n: int = -1) -> bytes:
        if self.cancelled:
            raise BadInputError("the session was ended during the upload")
        began = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(self.content.read(n if n > 0 else READ),
                                                  self.loop)
        self._pending = future
        try:
            data = future.result(timeout=self.limits.speed_time)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Refusal(408, ExitCode.BAD_INPUT, f"the upload stalled: no byte for "
                          f"{self.limits.speed_time:g} s after {self.received:,}") from None
        except Exception as err:  # noqa: BLE001 (the connection broke: the client's doing)
            if self.cancelled:
                raise BadInputError("the session was ended during the upload") from None
            raise BadInputError(f"the upload broke off after {self.received:,} bytes "
                                f"({type(err).__name__})") from None
        finally:
            self._pending = None
        now = time.monotonic()
        if data:
            self.first = self.first or began
            self.last = now
        self.received += len(data)
        if self.received > self.limit:
            raise Refusal(413, ExitCode.OVER_BUDGET, f"the upload is larger than the "
                          f"{self.limit:,} bytes the client declared")
        self._pace(len(data), now - began)
        return data

    def cancel(self) -> None:
        """From the event loop: the session ends; a read waiting for the client stops now."""
        self.cancelled = True
        pending = self._pending
        if pending is not None:
            pending.cancel()

    def _pace(self, got: int, waited: float) -> None:
        self._waited += waited
        self._window += got
        if self._waited >= self.limits.speed_time:
            if self._window < self.limits.speed_limit * self._waited:
                raise Refusal(408, ExitCode.BAD_INPUT,
                              f"the upload is too slow: {self._window:,} bytes in "
                              f"{self._waited:.0f} s, below {self.limits.speed_limit:,} "
                              "bytes/s")
            self._waited, self._window = 0.0, 0
