"""The user's side of a cloudlet: negotiate, stream the overlay, hold the session, end it.

`offload` runs the seed's steps 2 to 7 from the device: it reads the overlay's header for
the base it needs, asks the cloudlet for a session, opens the heartbeat, streams the overlay
(synthesis begins before the last byte), reports the running VM, and keeps the heartbeat
until the user ends the session (or the cloudlet does). Refusals come back as vmsynth
errors with the same exit codes as the same failure on one machine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import aiohttp

from vmsynth.errors import CloudletError, ExitCode, VmsynthError
from vmsynth.formats.container import parse_header
from vmsynth.keys import Key
from vmsynth.source import Source, redact

CHUNK = 1 << 20
REQUEST_TIMEOUT = 30.0


class Refused(VmsynthError):
    """What the cloudlet refused, with the exit code it names."""

    def __init__(self, message: str, hint: str | None, code: int) -> None:
        super().__init__(message, hint)
        try:
            self.exit_code = ExitCode(code)  # type: ignore[misc]
        except ValueError:
            self.exit_code = ExitCode.CLOUDLET  # type: ignore[misc]


@dataclass(frozen=True)
class Trust:
    """How the cloudlet's certificate is trusted: a pinned fingerprint, a CA file, or (for
    plain http on this host) nothing."""

    fingerprint: str | None = None  # sha256:<hex> as `vmsynth serve` prints it
    cafile: str | None = None

    def ssl(self) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
        if self.fingerprint:
            digest = self.fingerprint.removeprefix("sha256:").replace(":", "").lower()
            try:
                return aiohttp.Fingerprint(bytes.fromhex(digest))
            except ValueError:
                raise VmsynthError(f"--fingerprint {self.fingerprint!r} is not a SHA-256 "
                                   "fingerprint", hint="copy it from `vmsynth serve`'s output"
                                   ) from None
        if self.cafile:
            return ssl.create_default_context(cafile=self.cafile)
        return True


class Client:
    """One cloudlet's API, over one aiohttp session."""

    def __init__(self, url: str, token: str | None = None, trust: Trust = Trust()) -> None:
        self.url = url.rstrip("/")
        self.name = redact(self.url)
        self.token = token
        self.trust = trust
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, connect=REQUEST_TIMEOUT, sock_read=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    def _headers(self, token: str | None) -> dict[str, str]:
        token = token or self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, token: str | None = None,
                   timeout: float | None = REQUEST_TIMEOUT, headers: dict[str, str] | None = None,
                   **kw: Any) -> dict[str, Any]:
        """A request whose answer is JSON; a refusal becomes the error it names."""
        assert self._http is not None
        try:
            async with self._http.request(
                    method, self.url + path, headers=self._headers(token) | (headers or {}),
                    ssl=self.trust.ssl(), timeout=aiohttp.ClientTimeout(total=timeout),
                    **kw) as response:
                body = await response.read()
                return self._answer(response.status, body, response.headers)
        except aiohttp.ServerFingerprintMismatch:
            raise CloudletError(f"{self.name}: its certificate does not match --fingerprint",
                                hint="someone may be in the middle; check the fingerprint "
                                     "`vmsynth serve` printed") from None
        except aiohttp.ClientConnectorCertificateError:
            raise CloudletError(f"{self.name}: its certificate is not trusted",
                                hint="pass --fingerprint (as `vmsynth serve` printed it) or "
                                     "--cacert") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise CloudletError(f"{self.name}: {_why(err)}",
                                hint="check the address and that the cloudlet runs") from None

    def _answer(self, status: int, body: bytes, headers: Any) -> dict[str, Any]:
        try:
            value = json.loads(body) if body else {}
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise CloudletError(f"{self.name}: answered {status} with something that is not "
                                "vmsynth's API")
        if status >= 400:
            error = value.get("error")
            if not isinstance(error, dict):
                session = value.get("session")
                raise CloudletError(f"{self.name}: the session has "
                                    f"{session.get('state') if isinstance(session, dict) else 'gone'}")
            message = str(error.get("message", f"refused ({status})"))[:500]
            if "retry_after" in error or headers.get("Retry-After"):
                message += f" (retry after {headers.get('Retry-After', error.get('retry_after'))} s)"
            hint = error.get("hint")
            raise Refused(message, str(hint)[:300] if hint else None,
                          int(error.get("exit_code", ExitCode.CLOUDLET)))
        return value

    async def info(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/info")

    async def negotiate(self, body: dict[str, Any],
                        waiting: Callable[[dict[str, Any]], None] | None = None,
                        patience: float = 1800.0) -> dict[str, Any]:
        """A session; while the cloudlet fetches the base from its registry (202), ask
        again after its Retry-After (`waiting` is told), for at most `patience` seconds."""
        deadline = time.monotonic() + patience
        while True:
            answer = await self.call("POST", "/v1/sessions", json=body)
            error = answer.get("error")
            if not isinstance(error, dict) or not isinstance(error.get("fetching"), dict):
                return answer
            if waiting is not None:
                waiting(error)
            if time.monotonic() > deadline:
                raise CloudletError(f"{self.name}: {str(error.get('message'))[:300]}, for "
                                    f"more than {patience:g} s")
            retry = error.get("retry_after")
            await asyncio.sleep(min(max(float(retry), 0.5), 60.0)
                                if isinstance(retry, (int, float)) else 5.0)

    async def upload(self, session: dict[str, Any], chunks: AsyncIterator[bytes],
                     size: int | None) -> dict[str, Any]:
        """Stream the overlay; the answer comes once the VM runs (no overall timeout: the
        transfer takes as long as the link needs)."""
        headers = {"Content-Length": str(size)} if size else {}
        return await self.call("PUT", session["upload"], token=session["token"],
                               timeout=None, data=chunks, headers=headers)

    async def end(self, session: dict[str, Any]) -> dict[str, Any]:
        """End the session; the answer comes once its VM is stopped and its files scrubbed."""
        return await self.call("DELETE", f"/v1/sessions/{session['id']}",
                               token=session["token"], timeout=120)

    async def sessions(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/sessions")

    async def heartbeat(self, session: dict[str, Any]) -> aiohttp.ClientWebSocketResponse:
        assert self._http is not None
        try:
            return await self._http.ws_connect(
                self.url + session["heartbeat"], headers=self._headers(session["token"]),
                ssl=self.trust.ssl(), heartbeat=5.0, timeout=aiohttp.ClientWSTimeout(
                    ws_close=10.0))
        except aiohttp.WSServerHandshakeError as err:
            raise CloudletError(f"{self.name}: the heartbeat was refused ({err.status})"
                                ) from None
        except (aiohttp.ClientError, OSError) as err:
            raise CloudletError(f"{self.name}: {_why(err)}") from None


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, aiohttp.ClientConnectorError):
        return f"cannot connect ({err.os_error.strerror or err.os_error})"
    return redact(str(err) or type(err).__name__)


# -- offloading -----------------------------------------------------------------------------

class _Recorder:
    """Reads a source and keeps what it read, so the header read for negotiation is
    uploaded too (standard input and URLs cannot be read twice)."""

    def __init__(self, source: Source) -> None:
        self.source, self.kept = source, bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.kept += data
        return data


def negotiation_body(source: Source, size: int | None, max_size: int, key: Key | None,
                     memory: str | None, cpus: int | None, forwards: list[int]
                     ) -> tuple[dict[str, Any], bytes]:
    """What the cloudlet is asked for, from the overlay's header (and the header's bytes)."""
    recorder = _Recorder(source)
    header = parse_header(recorder)  # type: ignore[arg-type]
    base = header.manifest.get("base")
    if not isinstance(base, dict):
        raise VmsynthError("the overlay's manifest has no base")
    body: dict[str, Any] = {
        "base": {k: base.get(k) for k in ("name", "version", "digest", "virtual_size")},
        "overlay_size": size or max_size, "forward": forwards,
        "resources": {k: v for k, v in (("memory", memory), ("cpus", cpus)) if v}}
    if isinstance(base.get("memory"), dict):
        body["base"]["memory"] = {"digest": base["memory"].get("digest")}
    if key is not None and key.key_file is not None:
        body["key"] = {"key_file": base64.b64encode(key.key_file).decode()}
    elif key is not None and key.passphrase is not None:
        body["key"] = {"passphrase": key.passphrase}
    return body, bytes(recorder.kept)


async def stream(head: bytes, source: Source, progress: Callable[[int], None]
                 ) -> AsyncIterator[bytes]:
    """The overlay's bytes for the upload: the header already read, then the rest."""
    progress(len(head))
    yield head
    while True:
        chunk = await asyncio.to_thread(source.read, CHUNK)
        if not chunk:
            return
        progress(len(chunk))
        yield chunk


Events = Callable[[str, dict[str, Any]], Awaitable[None] | None]


async def hold(client: Client, session: dict[str, Any], ws: aiohttp.ClientWebSocketResponse,
               stop: asyncio.Event, grace: float) -> tuple[str, aiohttp.ClientWebSocketResponse]:
    """Keep the session alive until `stop` is set (the user ends it) or the cloudlet ends
    it; a dropped heartbeat is reconnected while the cloudlet's grace period lasts.

    Returns why it ended ("user" or the cloudlet's reason), and the heartbeat (perhaps a
    new one), still open when the user ended it.
    """
    while True:
        closed = asyncio.ensure_future(_until_closed(ws))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopped):
            task.cancel()
        if stopped in done:
            return "user", ws  # the caller ends the session, then closes the heartbeat
        final = closed.result() if not closed.cancelled() else None
        if final is not None and final.get("state") in ("ending", "ended", "failed"):
            return str(final.get("reason", "ended by the cloudlet")), ws
        deadline = time.monotonic() + grace
        while True:  # the heartbeat dropped: come back before the grace period ends
            try:
                ws = await client.heartbeat(session)
                break
            except (CloudletError, Refused) as err:
                if time.monotonic() > deadline or stop.is_set():
                    return f"the heartbeat was lost ({err})", ws
                await asyncio.sleep(2.0)


async def _until_closed(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any] | None:
    """The last state the cloudlet pushed before the heartbeat closed."""
    last = None
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            try:
                last = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(last, dict) and last.get("state") in ("ended", "failed"):
                break
    return last
