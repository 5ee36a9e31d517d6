"""QMP, QEMU's JSON control protocol, spoken by QEMU's own Python library (qemu.qmp).

qemu.qmp is asyncio; vmsynth's engine is synchronous, and a service will call it from worker
threads while its main thread runs an asyncio loop. So every connection lives on one private
event loop, run by a daemon thread that starts on first use ("vmsynth-qmp"), and the
synchronous methods here hand coroutines to it and wait for them. Any thread may call them,
a thread whose own loop is running too: the caller's loop is never touched and nothing calls
asyncio.run. (qemu.qmp.legacy.QEMUMonitorProtocol runs the *calling* thread's loop instead:
it fails inside a running loop and ties each connection to the thread that made it.)

Every failure is a vmsynth.errors.QMPError (exit 23) with a one-line message, one of:
QMPConnectError (the socket does not answer as QMP), QMPCommandError (QEMU refused a
command; `error_class` is QMP's error class), QMPClosedError (the connection ended: QEMU
exited), or a plain QMPError (no answer in time, a protocol error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Self, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as LibraryError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from .errors import QMPError

__all__ = ["QMP", "Events", "QMPClosedError", "QMPCommandError", "QMPConnectError",
           "QMPError", "Runstate", "on_qmp_thread"]

T = TypeVar("T")
Event = dict[str, Any]


class QMPConnectError(QMPError):
    """The socket is missing, refuses connections, or does not speak QMP."""


class QMPCommandError(QMPError):
    """QEMU received a command and refused it (qemu.qmp's ExecuteError)."""

    def __init__(self, message: str, command: str, error_class: str) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class  # e.g. GenericError, DeviceNotFound, CommandNotFound


class QMPClosedError(QMPError):
    """The connection ended (QEMU exited or closed it) before an answer came."""


# -- the thread that runs every connection --------------------------------------------------


class _LoopThread:
    """The process's one QMP event loop, run forever by a daemon thread started on first use."""

    def __init__(self) -> None:
        self._reset()
        # A forked child has no such thread, and the lock may have been held at the fork.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._serve, args=(loop,), name="vmsynth-qmp",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result, from any other thread."""
        loop = self._get()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("vmsynth.qmp's blocking calls cannot run on its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the waiting thread: stop the coroutine too
            raise


_THREAD = _LoopThread()


def on_qmp_thread(fn: Callable[[], T]) -> T:
    """Call `fn` on the long-lived QMP thread and return what it returns.

    For what must not depend on the calling thread's life: a child process with
    PR_SET_PDEATHSIG is killed when the *thread* that forked it ends, and a service's worker
    thread may end while its VM runs.
    """
    async def call() -> T:
        return fn()
    return _THREAD.run(call())


def _one_line(err: BaseException) -> str:
    text = getattr(err, "error_message", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


# -- connections ----------------------------------------------------------------------------


class QMP:
    """One QMP connection to a QEMU process (a QMP socket serves one client at a time).

    Raises (at construction):
        QMPConnectError: nothing answered as QMP within `timeout` seconds.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout  # for connecting, and the default for each command
        self._client: QMPClient = _THREAD.run(self._connect())

    async def _connect(self) -> QMPClient:
        deadline = time.monotonic() + self.timeout
        while True:
            client = QMPClient(os.path.basename(self.path))
            try:
                await asyncio.wait_for(client.connect(self.path),
                                       max(0.1, deadline - time.monotonic()))
                return client
            except TimeoutError:
                raise QMPConnectError(f"QMP socket {self.path} did not answer within "
                                      f"{self.timeout:.0f} s") from None
            except ConnectError as err:
                cause = err.exc
                if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)) and \
                        time.monotonic() < deadline and self._may_appear():
                    await asyncio.sleep(0.05)  # QEMU is still starting
                    continue
                raise self._connect_error(cause) from None

    def _may_appear(self) -> bool:
        """Missing or a socket nobody listens on yet; not a file that is something else."""
        try:
            return stat.S_ISSOCK(os.stat(self.path).st_mode)
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _connect_error(self, cause: BaseException) -> QMPConnectError:
        if isinstance(cause, (GreetingError, NegotiationError)):
            return QMPConnectError(f"{self.path}: not a QEMU QMP socket (no greeting)")
        if isinstance(cause, EOFError):
            return QMPConnectError(f"QMP socket {self.path} closed (QEMU exited?)")
        return QMPConnectError(f"QMP socket {self.path} did not answer: {_one_line(cause)}")

    # -- state ------------------------------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        """qemu.qmp's session state: RUNNING while connected, then DISCONNECTING, IDLE."""
        return self._client.runstate

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    # -- commands ---------------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one QMP command and return its answer.

        Raises:
            QMPCommandError: QEMU refused it.
            QMPClosedError: the connection is gone (QEMU exited).
            QMPError: no answer within `timeout` (default: the connection's), or a reply
                that is not QMP.
        """
        return _THREAD.run(self._execute(command, arguments, timeout or self.timeout))

    async def _execute(self, command: str, arguments: dict[str, Any] | None,
                       timeout: float) -> Any:
        # Nobody reads the catch-all listener; emptied here, it cannot grow over a VM's life.
        self._client.events.clear()
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as err:
            raise QMPCommandError(f"QEMU refused {command}: {_one_line(err)}", command,
                                  err.error_class) from None
        except TimeoutError:
            raise QMPError(f"QEMU did not answer {command} within {timeout:.0f} s") from None
        except LibraryError as err:
            if not self.connected:  # StateError, ExecInterruptedError: the session ended
                raise self._closed() from None
            raise QMPError(f"QMP socket {self.path}: {_one_line(err)}") from None

    def _closed(self) -> QMPClosedError:
        return QMPClosedError(f"QMP socket {self.path} closed (QEMU exited?)")

    # -- events -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[Events]:
        """Collect the events named (all events if none) from now until the block ends.

        Open it before the command whose events you wait for, so that none is missed.
        """
        events = Events(self, names)
        try:
            yield events
        finally:
            events.close()

    # -- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect. Never raises: a connection QEMU already closed (e.g. after `quit`)
        reports how it ended through disconnect(), which is of no use here."""
        async def disconnect() -> None:
            with contextlib.suppress(Exception):  # EOFError, OSError, ProtocolError: all ended
                await self._client.disconnect()
        _THREAD.run(disconnect())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Events:
    """QMP events of some names, queued from the moment this is made (QMP.listen)."""

    def __init__(self, qmp: QMP, names: tuple[str, ...]) -> None:
        self._qmp = qmp

        async def register() -> EventListener:
            listener = EventListener(names or None)
            qmp._client.register_listener(listener)  # the loop's own thread reads the list
            return listener
        self._listener: EventListener = _THREAD.run(register())

    def wait(self, match: Callable[[Event], bool] | None = None,
             timeout: float | None = None) -> Event | None:
        """The next event for which `match` is true (the next event, without `match`);
        None when `timeout` seconds pass first.

        Raises:
            QMPClosedError: the connection ended before such an event came.
        """
        return _THREAD.run(self._wait(match or (lambda _: True), timeout))

    async def _wait(self, match: Callable[[Event], bool], timeout: float | None
                    ) -> Event | None:
        client, listener = self._qmp._client, self._listener

        async def matching() -> Event:
            while True:
                event = dict(await listener.get())
                if match(event):
                    return event

        async def ended() -> None:
            while client.runstate is Runstate.RUNNING:
                await client.runstate_changed()

        found, gone = asyncio.ensure_future(matching()), asyncio.ensure_future(ended())
        try:
            await asyncio.wait((found, gone), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (found, gone):
                task.cancel()
        if found.done() and not found.cancelled():
            return found.result()
        if gone.done() and not gone.cancelled():
            # Events QEMU sent before it hung up are queued already: they still count.
            for event in listener.clear():
                if match(dict(event)):
                    return dict(event)
            raise self._qmp._closed()
        return None

    def close(self) -> None:
        async def remove() -> None:
            self._qmp._client.remove_listener(self._listener)
        _THREAD.run(remove())
