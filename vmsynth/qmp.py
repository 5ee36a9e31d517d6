"""A small synchronous QMP client: enough to drive one QEMU process from a CLI or a service.

QMP is JSON over a Unix socket: a greeting, `qmp_capabilities`, then commands that answer
with {"return": ...} or {"error": ...}, interleaved with asynchronous {"event": ...} lines.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .errors import QMPError


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._sock = self._connect(path, timeout)
        self._buf = b""
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QMPError(f"{path}: not a QEMU QMP socket (no greeting)")
        self.execute("qmp_capabilities")

    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path} did not answer: {err}") from err
                time.sleep(0.05)

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as err:
                raise QMPError(f"QMP socket {self.path}: {err}") from err
            if not chunk:
                raise QMPError(f"QMP socket {self.path} closed (QEMU exited?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as err:
            raise QMPError(f"QMP socket {self.path} sent something that is not JSON") from err
        if not isinstance(message, dict):
            raise QMPError(f"QMP socket {self.path} sent an unexpected message")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as err:
            raise QMPError(f"QMP socket {self.path}: {err}") from err
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                error = message["error"]
                raise QMPError(f"QEMU refused {command}: {error.get('desc', error)}")
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        self._sock.close()
