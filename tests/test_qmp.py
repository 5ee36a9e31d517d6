"""vmsynth.qmp against a scripted QMP server: qemu.qmp's errors as vmsynth's, events, and calls
from worker threads and from inside a running asyncio loop (as a cloudlet service makes them).
The real QEMU side (MIGRATION events of a snapshot and a resume) is in tests/test_vm.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmsynth.errors import ExitCode, QMPError
from vmsynth.qmp import QMP, QMPClosedError, QMPCommandError, QMPConnectError, Runstate

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""},
                    "capabilities": []}}
HANG_UP = None  # a script entry: close the connection instead of answering


class FakeQEMU:
    """QMP clients served one at a time on a Unix socket. `script[command]` lists what to send back:
    events as they are, anything else as the command's reply (its id added), HANG_UP to close
    the connection. Unscripted commands answer {"return": {}}."""

    def __init__(self, path: Path, script: dict | None = None, greeting: object = GREETING):
        self.path = path
        self.script = {"qmp_capabilities": [{"return": {}}], **(script or {})}
        self.greeting = greeting
        self.commands: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:  # one client at a time, as QEMU serves a QMP socket
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        with conn:
            if self.greeting is not None:
                conn.sendall(json.dumps(self.greeting).encode() + b"\n")
            for msg in self._messages(conn):
                self.commands.append(msg["execute"])
                for out in self.script.get(msg["execute"], [{"return": {}}]):
                    if out is HANG_UP:
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                    if "event" not in out and "id" in msg:  # qmp_capabilities has none
                        out = out | {"id": msg["id"]}
                    conn.sendall(json.dumps(out).encode() + b"\n")

    @staticmethod
    def _messages(conn: socket.socket):
        """JSON objects as they arrive (QMP needs no newline between them)."""
        decoder, buf = json.JSONDecoder(), ""
        while chunk := conn.recv(65536):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # incomplete: read on
                yield msg
                buf = buf.lstrip()[end:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close does not)
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture
def sock(tmp_path) -> Path:
    return tmp_path / "qmp.sock"


@pytest.fixture
def fake(sock):
    servers: list[FakeQEMU] = []

    def make(script: dict | None = None, greeting: object = GREETING) -> FakeQEMU:
        servers.append(FakeQEMU(sock, script, greeting))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text, repr(text)
    return text


def test_commands_and_what_qemu_refuses(fake, sock):
    fake({"query-status": [{"return": {"status": "running", "running": True}}],
          "bogus": [{"error": {"class": "CommandNotFound",
                               "desc": "The command bogus has not been found"}}]})
    with QMP(sock) as qmp:
        assert qmp.connected and qmp.runstate is Runstate.RUNNING
        assert qmp.execute("query-status") == {"status": "running", "running": True}
        with pytest.raises(QMPCommandError) as info:
            qmp.execute("bogus", {"x": 1})
        assert one_line(info.value) == "QEMU refused bogus: The command bogus has not been found"
        assert info.value.error_class == "CommandNotFound" and info.value.command == "bogus"
        assert info.value.exit_code == ExitCode.QEMU
        assert qmp.execute("query-status")["running"], "a refusal leaves the connection usable"
    assert not qmp.connected


def test_events_are_awaited_not_polled(fake, sock):
    setup, done = ({"event": "MIGRATION", "data": {"status": s}} for s in ("setup", "completed"))
    fake({"migrate": [setup, {"return": {}}, {"event": "STOP"}, done]})
    with QMP(sock) as qmp, qmp.listen("MIGRATION") as events:
        qmp.execute("migrate", {"uri": "exec:cat > x"})
        assert events.wait()["data"] == {"status": "setup"}  # sent before the reply: kept
        got = events.wait(lambda e: e["data"]["status"] == "completed", timeout=10)
        assert got["event"] == "MIGRATION" and got["data"]["status"] == "completed"
        started = time.monotonic()
        assert events.wait(timeout=0.2) is None  # STOP was not asked for; nothing else came
        assert time.monotonic() - started < 5


def test_a_connection_qemu_closes(fake, sock):
    fake({"migrate": [{"return": {}}, {"event": "MIGRATION", "data": {"status": "failed"}},
                      HANG_UP]})
    qmp = QMP(sock)
    with qmp.listen("MIGRATION") as events:
        qmp.execute("migrate")
        # An event sent before the hang-up still arrives...
        assert events.wait(lambda e: True, timeout=10)["data"]["status"] == "failed"
        # ...then waiting more says the connection is gone, at once.
        with pytest.raises(QMPClosedError, match=r"closed \(QEMU exited\?\)"):
            events.wait(timeout=30)
    assert not qmp.connected
    with pytest.raises(QMPClosedError) as info:
        qmp.execute("query-status")
    assert one_line(info.value) == f"QMP socket {sock} closed (QEMU exited?)"
    qmp.close()  # no error: how it ended is of no use
    qmp.close()


def test_a_command_interrupted_by_the_hang_up(fake, sock):
    fake({"quit": [HANG_UP]})
    with QMP(sock) as qmp, pytest.raises(QMPClosedError):
        qmp.execute("quit")


def test_no_socket_there(sock):
    started = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        QMP(sock, timeout=0.5)  # retried while QEMU may still be starting, then given up
    assert 0.4 < time.monotonic() - started < 5
    assert one_line(info.value).startswith(f"QMP socket {sock} did not answer")
    assert isinstance(info.value, QMPError) and info.value.exit_code == ExitCode.QEMU


def test_a_file_that_is_not_a_socket_fails_at_once(sock):
    sock.write_text("not a socket")
    started = time.monotonic()
    with pytest.raises(QMPConnectError, match="did not answer"):
        QMP(sock, timeout=30)
    assert time.monotonic() - started < 5


def test_a_socket_that_does_not_speak_qmp(fake, sock):
    fake(greeting={"hello": "world"})
    with pytest.raises(QMPConnectError) as info:
        QMP(sock)
    assert one_line(info.value) == f"{sock}: not a QEMU QMP socket (no greeting)"


def test_a_socket_that_never_greets(fake, sock):
    fake(greeting=None)
    with pytest.raises(QMPConnectError, match=r"did not answer within 1 s"):
        QMP(sock, timeout=1)


def test_a_command_without_an_answer_times_out(fake, sock):
    fake({"stuck": []})
    with QMP(sock) as qmp:
        with pytest.raises(QMPError, match="QEMU did not answer stuck within 1 s"):
            qmp.execute("stuck", timeout=1)
        assert qmp.execute("query-status") == {}, "still usable afterwards"


def test_worker_threads_and_a_running_event_loop(fake, sock):
    """As a cloudlet service: its own loop runs in the main thread, the engine in worker
    threads; a blocking call made inside the running loop works too (it never runs that
    loop, nor asyncio.run inside it)."""
    fake({"query-status": [{"return": {"status": "running"}}]})

    async def service() -> list:
        qmp = await asyncio.to_thread(QMP, sock)
        try:
            inside = qmp.execute("query-status")  # on the loop's thread, loop running
            workers = await asyncio.gather(*(asyncio.to_thread(qmp.execute, "query-status")
                                             for _ in range(8)))
            return [inside, *workers]
        finally:
            await asyncio.to_thread(qmp.close)

    assert asyncio.run(service()) == [{"status": "running"}] * 9


def test_connections_outlive_the_thread_that_made_them(fake, sock):
    fake({"query-status": [{"return": {"status": "running"}}]})
    made: list[QMP] = []
    t = threading.Thread(target=lambda: made.append(QMP(sock)))
    t.start()
    t.join()
    with made[0] as qmp:
        assert qmp.execute("query-status") == {"status": "running"}


def test_a_forked_child_gets_a_loop_thread_of_its_own(fake, sock):
    """The parent's QMP thread does not exist in a child made by fork (multiprocessing's
    default on Linux): the child starts its own."""
    fake({"query-status": [{"return": {"status": "running"}}]})
    with QMP(sock, timeout=5):  # the parent's thread exists now (the one client: closed next)
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            with QMP(sock, timeout=5) as qmp:
                code = 0 if qmp.execute("query-status") == {"status": "running"} else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    assert os.read(read, 1) == b"\0"
    assert os.waitpid(pid, 0)[1] == 0
