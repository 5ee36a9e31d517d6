"""Where an overlay's bytes come from: a file, standard input, or an http(s) URL.

Standard input and URLs are read front to back as the bytes arrive: rebuilding starts before
the transfer ends, and the overlay is never held whole in memory or on disk. Every way a
transfer can fail is one clear error; a minimum rate (like curl's --speed-limit and
--speed-time) stops a server that trickles bytes from holding a user forever; and no
credential or query value of a URL ever appears in a message.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from .errors import BadInputError
from .store import read_error

if TYPE_CHECKING:
    from .registry import Access


@dataclass(frozen=True)
class Limits:
    """When a transfer counts as failed."""

    speed_limit: int = 1024  # bytes per second, on average ...
    speed_time: float = 30.0  # ... over this many seconds spent waiting for the network
    max_time: float | None = None  # the whole transfer, if set


class Source(Protocol):
    name: str  # for messages: a path, "standard input", or a redacted URL
    size: int  # bytes, when known beforehand (for progress); 0 otherwise

    def read(self, n: int = -1) -> bytes: ...


# -- keeping secrets out of messages ---------------------------------------------------------

# A URL in running text; punctuation that ends a sentence or clause is not part of it.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,:;)]")


def redact_url(url: str) -> str:
    """The URL without its credentials, query values and fragment: `https://***@host/x?t=***`."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(a malformed URL)"
    netloc = f"***@{host}" if "@" in parts.netloc else host
    query = "&".join(f"{name.partition('=')[0]}=***" if name else ""
                     for name in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query,
                                    "***" if parts.fragment else ""))


def redact(text: str) -> str:
    """`text` with every URL in it redacted (messages, logs, JSON)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def is_url(spec: str) -> bool:
    """An overlay that is not a file: an http(s) URL or an oci:// registry reference."""
    return spec.startswith(("http://", "https://", "oci://"))


def _reason(err: BaseException) -> str:
    """A network failure in the user's terms, on one line."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "no answer in time"
    if isinstance(err, http.client.IncompleteRead):
        return "the connection closed before the end of the data"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return redact(" ".join(str(text).split()))


# -- URLs ------------------------------------------------------------------------------------

class Pace:
    """Gives up on a transfer slower than the limits: `broken(why)` is the error to raise.
    Time spent processing is not counted, only time spent waiting for the network."""

    def __init__(self, limits: Limits, broken: Callable[[str], Exception]) -> None:
        self.limits, self.broken = limits, broken
        self.started = time.monotonic()
        self._waited = 0.0  # seconds spent waiting for data in this rate window ...
        self._window = 0  # ... and the bytes that came meanwhile

    def update(self, got: int, waited: float) -> None:
        lim = self.limits
        if lim.max_time is not None and time.monotonic() - self.started > lim.max_time:
            raise self.broken(f"it took longer than the --max-time of {lim.max_time:g} s")
        self._waited += waited
        self._window += got
        if self._waited >= lim.speed_time:
            if self._window < lim.speed_limit * self._waited:
                raise self.broken(f"{self._window:,} bytes came in the last "
                                  f"{self._waited:.0f} s, below the minimum of "
                                  f"{lim.speed_limit:,} bytes/s")
            self._waited, self._window = 0.0, 0


class Download:
    """An http(s) response read as it arrives.

    Credentials in the URL (`https://user:password@host/...`) become a Basic authorization
    header that is not sent on to a host the server redirects to.
    """

    def __init__(self, url: str, limits: Limits = Limits()) -> None:
        self.name = redact_url(url)
        self.limits = limits
        self.received = 0
        self._pace = Pace(limits, self._broken)
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
        if "@" in parts.netloc:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {token}")
        try:
            self.response = urllib.request.urlopen(request, timeout=limits.speed_time)
        except urllib.error.HTTPError as err:
            err.close()
            if 300 <= err.code < 400:
                raise BadInputError(f"{self.name}: too many redirects (the server redirects "
                                    "in a loop)", hint="check the address") from None
            raise BadInputError(f"{self.name}: the server answered {err.code} "
                                f"{redact(str(err.reason or ''))}".rstrip(),
                                hint="the server wants credentials: put USER:PASSWORD@ before "
                                     "the host name in the address (they are never printed)"
                                if err.code == 401 else None) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            raise BadInputError(f"{self.name}: cannot fetch it ({_reason(err)})",
                                hint="check the address and that the server is reachable"
                                ) from None
        length = self.response.headers.get("Content-Length", "")
        self.size = int(length) if length.isdigit() else 0

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes as they arrive (fewer when that is what the network has)."""
        began = time.monotonic()
        try:
            data = self.response.read1(n if n >= 0 else 1 << 20)
        except (OSError, http.client.HTTPException) as err:
            raise self._broken(_reason(err)) from None
        self.received += len(data)
        self._pace.update(len(data), time.monotonic() - began)
        if n and not data and self.received < self.size:
            raise self._broken(f"{self.size:,} were announced")
        return data

    def _broken(self, why: str) -> BadInputError:
        return BadInputError(f"{self.name}: the transfer broke off after {self.received:,} "
                             f"bytes ({why})", hint="nothing was written; try again")

    def close(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.response.close()


# -- files and standard input ----------------------------------------------------------------

class FileSource:
    """A file or standard input, whose read errors name it."""

    def __init__(self, raw: BinaryIO, name: str, size: int) -> None:
        self.raw, self.name, self.size = raw, name, size

    def read(self, n: int = -1) -> bytes:
        try:
            return self.raw.read(n)
        except OSError as err:
            raise read_error(self.name, err) from err


@contextlib.contextmanager
def open_source(spec: str, limits: Limits = Limits(), access: Access | None = None
                ) -> Iterator[Source]:
    """An overlay to read: a path, `-` for standard input, an http(s) URL, or an `oci://`
    registry reference (`access`: TLS and credentials for it)."""
    if spec.startswith("oci://"):
        from .registry import Access
        from .registry_overlays import open_overlay  # only for commands that meet one

        with open_overlay(spec, dataclasses.replace(access or Access(), limits=limits)) \
                as overlay:
            yield overlay
        return
    if spec == "-":
        yield FileSource(sys.stdin.buffer, "standard input", 0)
        return
    if is_url(spec):
        download = Download(spec, limits)
        try:
            yield download
        finally:
            download.close()
        return
    path = Path(spec)
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise BadInputError(f"{spec}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{spec}: is a directory, not an overlay") from None
    except OSError as err:
        raise read_error(spec, err) from None
    with f:
        yield FileSource(f, spec, os.fstat(f.fileno()).st_size)
