"""Options and arguments shared by several commands."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vmsynth import bases
from vmsynth.bases import Base
from vmsynth.errors import UsageError
from vmsynth.keys import Key, read_key_file
from vmsynth.memory import VmemImage, open_vmem
from vmsynth.qcow2 import Qcow2Image
from vmsynth.source import Limits, is_url
from vmsynth.store import Inputs

from . import console

if TYPE_CHECKING:
    from vmsynth.registry import Access
    from vmsynth.service.api import WantedBase
    from vmsynth.service.client import Client

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


def overlay_input(inputs: Inputs, spec: str) -> None:
    """Remember the overlay a command reads, so no output can be it."""
    if spec == "-":
        inputs.add_fd("overlay (standard input)", 0)
    elif not is_url(spec):
        inputs.add("overlay", spec)


def disk_inputs(inputs: Inputs, image: Qcow2Image, what: str = "disk") -> None:
    """A disk and every file of its backing chain."""
    for i, node in enumerate(image.chain()):
        inputs.add(what if i == 0 else f"backing file of the {what}", node.path)


def base_inputs(inputs: Inputs, base: Base) -> None:
    inputs.add("base image", base.path)
    if base.memory is not None:
        inputs.add("base's memory snapshot", base.memory.path)


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


def transfer_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """When a transfer from a URL counts as failed (as curl's options of the same names),
    and how to reach an oci:// registry."""
    f = registry_options(f)
    for option in reversed([
        click.option("--speed-limit", type=console.SizeParam(), default="1K", show_default=True,
                     metavar="RATE",
                     help="Give up on a URL that sends less than RATE bytes per second ..."),
        click.option("--speed-time", type=click.FloatRange(1), default=30.0,
                     show_default=True, metavar="SECONDS",
                     help="... on average over this many seconds of waiting."),
        click.option("--max-time", type=click.FloatRange(0, min_open=True), default=None,
                     metavar="SECONDS", help="Give up on a URL that takes longer in all."),
    ]):
        f = option(f)
    return f


def limits(opts: dict[str, Any]) -> Limits:
    return Limits(opts.pop("speed_limit"), opts.pop("speed_time"), opts.pop("max_time"))


def registry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach an oci:// registry (the flag names oras uses where it has one)."""
    for option in reversed([
        click.option("--plain-http", is_flag=True,
                     help="Talk to an oci:// registry over plain HTTP (one without TLS)."),
        click.option("--registry-token-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Credentials for an oci:// registry: USER:PASSWORD (or USER:TOKEN), "
                          "or a bare bearer token [default: what `docker login` or `oras "
                          "login` stored in ~/.docker/config.json]."),
    ]):
        f = option(f)
    return f


def registry_access(opts: dict[str, Any], limits: Limits | None = None) -> Access:
    """The registry options of a command (removed from `opts`)."""
    from vmsynth.registry import Access

    token_file = opts.pop("registry_token_file", None)
    return Access(bool(opts.pop("plain_http", False)),
                  Path(token_file) if token_file else None, limits=limits or Limits())


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


def cloudlet_options(f: Any) -> Any:
    for option in reversed([
        click.option("--cloudlet", "url", required=True, metavar="URL",
                     help="The cloudlet, e.g. https://192.168.1.10:8750."),
        click.option("--token-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="The cloudlet's bearer token, if it has one."),
        click.option("--fingerprint", metavar="SHA256",
                     help="Trust the cloudlet's certificate with this fingerprint (as "
                          "`vmsynth serve` prints it)."),
        click.option("--cacert", type=click.Path(dir_okay=False), metavar="PEM",
                     help="Trust certificates signed by this CA instead."),
    ]):
        f = option(f)
    return f


def read_token(token_file: str | None) -> str | None:
    """A bearer token from --token-file (its first line, blanks stripped)."""
    if not token_file:
        return None
    try:
        return Path(token_file).read_text().strip()
    except OSError as err:
        raise UsageError(f"--token-file {token_file}: {err.strerror}") from None


def cloudlet_client(url: str, token_file: str | None, fingerprint: str | None,
                    cacert: str | None) -> Client:
    """A cloudlet API client from the command's options."""
    from vmsynth.service.client import Client, Trust  # aiohttp: only for the commands that talk
    token = read_token(token_file)
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--cloudlet {url!r}: give an http:// or https:// URL")
    return Client(url, token, Trust(fingerprint, cacert))


def wanted_base(overlay: str, access: Access | None = None) -> WantedBase:
    """The base an overlay needs, from its header (a file, a URL, a registry)."""
    from vmsynth.formats.container import parse_header

    from vmsynth.service.api import WantedBase
    from vmsynth.source import open_source

    with open_source(overlay, access=access) as source:
        base = parse_header(source).manifest.get("base")  # type: ignore[arg-type]
    if not isinstance(base, dict):
        raise UsageError(f"{overlay}: the overlay's manifest names no base")
    memory = base.get("memory")
    return WantedBase(str(base.get("name")), str(base.get("version")), str(base.get("digest")),
                      int(base.get("virtual_size", 0)),
                      memory.get("digest") if isinstance(memory, dict) else None)
