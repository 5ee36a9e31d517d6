"""SHA-256 on a worker thread, so hashing runs beside the main thread's reads and writes.

hashlib releases the GIL on large buffers. One worker takes the updates in the order they
were given; a bounded number of batches in flight keeps memory small whatever the input.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

BATCH = 4 << 20  # bytes per job: large enough that handing over costs nothing
IN_FLIGHT = 8  # jobs queued before update() waits: at most ~32 MiB held


def _feed(h: Any, pieces: list[bytes]) -> None:
    for piece in pieces:
        h.update(piece)


class BackgroundHash:
    """Feeds `current` (a hashlib object) on a worker thread; `switch` starts another."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vmsynth-hash")
        self.pending: deque[Future] = deque()
        self.current = hashlib.sha256()
        self.batch: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.batch.append(data)
        self.size += len(data)
        if self.size >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.batch:
            self._submit(_feed, self.current, self.batch)
            self.batch, self.size = [], 0

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > IN_FLIGHT:
            self.pending.popleft().result()

    def switch(self, new: Any) -> Any:
        """Hash what follows into `new`; returns the previous hash object (still filling)."""
        self._flush()
        old, self.current = self.current, new
        return old

    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the worker after every update given so far."""
        self._flush()
        self._submit(fn)

    def wait(self) -> None:
        self._flush()
        while self.pending:
            self.pending.popleft().result()

    def hexdigest(self) -> str:
        self.wait()
        return self.current.hexdigest()

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)
