"""Options and arguments shared by several commands."""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from vmsynth import bases
from vmsynth.bases import Base
from vmsynth.errors import BadInputError
from vmsynth.keys import Key, read_key_file
from vmsynth.memory import VmemImage, open_vmem
from vmsynth.qcow2 import Qcow2Image

from . import console

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a JSON document on stdout instead of text.")
base_option = click.option("--base", "base_spec", metavar="BASE", required=True,
                           help="The base image: NAME@VERSION from the base cache, or a path.")


@contextlib.contextmanager
def open_base(spec: str, as_json: bool) -> Iterator[Base]:
    """Resolve --base; the first use of a base image reads it once (with a progress bar)."""
    with console.progress("scanning base", 1, enabled=not as_json) as update:
        base = bases.resolve(spec, progress=update)
    try:
        yield base
    finally:
        base.close()


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """An overlay to read: a path, - for standard input, or an http(s) URL.

    Standard input and URLs are read front to back as the bytes arrive: rebuilding starts
    before the transfer ends, and the overlay is never held whole in memory or on disk.
    """
    if path == "-":
        yield sys.stdin.buffer
        return
    if is_url(path):
        with fetch(path) as response:
            yield response
        return
    try:
        f = open(Path(path), "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as err:
        raise BadInputError(f"{path}: cannot read: {err.strerror}") from None
    with f:
        yield f


@contextlib.contextmanager
def open_disk(path: str) -> Iterator[Qcow2Image]:
    image = Qcow2Image(Path(path))
    try:
        yield image
    finally:
        image.close()


@contextlib.contextmanager
def open_memory(path: str | None) -> Iterator[VmemImage | None]:
    """A memory snapshot to diff (or None when not given)."""
    if path is None:
        yield None
        return
    image = open_vmem(Path(path))
    try:
        yield image
    finally:
        image.close()


URL_TIMEOUT = 30.0  # seconds without a byte before a fetch counts as failed


class Download:
    """An http(s) response read as it arrives; a broken transfer is one clear error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received = 0
        try:
            self.response = urllib.request.urlopen(url, timeout=URL_TIMEOUT)
        except urllib.error.HTTPError as err:
            raise BadInputError(f"{url}: the server answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise BadInputError(f"{url}: cannot fetch it ({reason})",
                                hint="check the address and that the server is reachable"
                                ) from None
        length = self.response.headers.get("Content-Length", "")
        self.size = int(length) if length.isdigit() else 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.response.read(n)
        except (OSError, http.client.HTTPException) as err:
            raise self._broken(str(err) or type(err).__name__) from None
        self.received += len(data)
        if n and not data and self.received < self.size:
            raise self._broken(f"{self.size:,} announced")
        return data

    def _broken(self, why: str) -> BadInputError:
        return BadInputError(f"{self.url}: the transfer broke off after {self.received:,} "
                             f"bytes ({why})", hint="nothing was written; try again")

    def close(self) -> None:
        self.response.close()


@contextlib.contextmanager
def fetch(url: str) -> Iterator[BinaryIO]:
    download = Download(url)
    try:
        yield download  # type: ignore[misc]
    finally:
        download.close()


def file_size(path: str, source: object = None) -> int:
    """The overlay's size when known beforehand (for progress): 0 for a pipe."""
    if path == "-":
        return 0
    if isinstance(source, Download):
        return source.size
    return Path(path).stat().st_size


PASSPHRASE_ENV = "VMSYNTH_PASSPHRASE"
key_file_option = click.option(
    "--key-file", type=click.Path(dir_okay=False), metavar="FILE",
    help=f"Key for an encrypted overlay (32 bytes, from `vmsynth keygen`); otherwise the "
         f"passphrase comes from ${PASSPHRASE_ENV} or a prompt.")


def _given_key(key_file: str | None) -> Key | None:
    """A key the user gave explicitly: --key-file, else $VMSYNTH_PASSPHRASE."""
    if key_file:
        return Key(key_file=read_key_file(Path(key_file)))
    passphrase = os.environ.get(PASSPHRASE_ENV)
    return Key(passphrase=passphrase) if passphrase else None


def read_key(key_file: str | None) -> Key | None:
    """The key a reading command has: given, or a prompt asked only for an encrypted overlay."""
    key = _given_key(key_file)
    if key is None and sys.stdin.isatty():
        key = Key(ask=lambda: click.prompt("passphrase", hide_input=True, err=True))
    return key


def new_key(key_file: str | None) -> Key:
    """The key `create --encrypt` seals with."""
    key = _given_key(key_file)
    if key is not None:
        return key
    if sys.stdin.isatty():
        return Key(passphrase=click.prompt("passphrase", hide_input=True,
                                           confirmation_prompt=True, err=True))
    raise click.UsageError(f"--encrypt needs --key-file FILE or ${PASSPHRASE_ENV} "
                           "(a passphrase is never taken on the command line)")
