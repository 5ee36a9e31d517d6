"""vmsynth serve."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

import click

from vmsynth import bases
from vmsynth.errors import UsageError
from vmsynth.service import tls
from vmsynth.service.cloudlet import Cloudlet, ServeConfig
from vmsynth.service.http import serve
from vmsynth.source import Limits, redact

from . import console
from .options import json_option, read_token, registry_access, registry_options


def _listen(text: str, option: str = "--listen") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise click.BadParameter(f"{text!r}: give HOST:PORT, e.g. 0.0.0.0:8750",
                                 param_hint=option)
    return host.strip("[]"), int(port)


def _registry(reference: str | None, opts: dict[str, Any]) -> tuple[str, Any] | None:
    """--registry, checked now (not when the first client asks)."""
    access = registry_access(opts)
    if reference is None:
        return None
    from vmsynth.registry import Reference

    Reference.parse(reference, need="")
    return reference, access


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Redacted(logging.Filter):
    """No credential of a URL in the service's log (its own messages and aiohttp's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


@click.command("serve", epilog="""\b
Examples:
  vmsynth serve                                    # this host only, 127.0.0.1:8750
  vmsynth serve --listen 0.0.0.0:8750 --token-file /etc/vmsynth/token --slots 8
  vmsynth serve --listen 192.168.1.10:8750 --tls-cert crt.pem --tls-key key.pem \\
      --token-file token --grace 60 --max-overlay 250M
  vmsynth serve --registry oci://registry.example.com/bases/debian   # fetches missing bases""")
@click.option("--listen", default="127.0.0.1:8750", show_default=True, metavar="HOST:PORT",
              help="Where to listen. Anything but loopback needs --token-file (or --open).")
@click.option("--slots", type=click.IntRange(1, 1024),
              help="At most this many sessions at once [default: what CPU, RAM and disk "
                   "allow].")
@click.option("--grace", type=click.FloatRange(0), default=45.0, show_default=True,
              help="Seconds a VM waits for its user to come back after the heartbeat stops.")
@click.option("--max-overlay", type=console.SizeParam(), default="250M", show_default=True,
              help="The largest overlay a client may send.")
@click.option("--token-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Clients must show this bearer token to start a session.")
@click.option("--open", "open_", is_flag=True,
              help="Serve beyond this host without a token: anyone who reaches the port "
                   "can start VMs.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), metavar="PEM",
              help="TLS certificate [default: a self-signed one, made on first start, "
                   "whose fingerprint is printed for clients to pin].")
@click.option("--tls-key", type=click.Path(dir_okay=False), metavar="PEM",
              help="The certificate's private key.")
@click.option("--no-tls", is_flag=True, help="Plain HTTP (loopback only).")
@click.option("--no-cgroups", is_flag=True,
              help="Do not confine VMs to cgroups (when not root and none is delegated).")
@click.option("--memory", default="1G", show_default=True,
              help="Guest RAM of a booted VM, unless the base's or the client's says else.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, help="auto uses KVM only if a test boot shows it works.")
@click.option("--negotiate-timeout", type=click.FloatRange(1), default=60.0,
              show_default=True, metavar="SECONDS",
              help="A session whose overlay has not begun to arrive by then is dropped.")
@click.option("--speed-limit", type=console.SizeParam(), default="1K", show_default=True,
              metavar="RATE", help="An upload slower than RATE bytes per second ...")
@click.option("--speed-time", type=click.FloatRange(1), default=30.0, show_default=True,
              metavar="SECONDS", help="... on average over SECONDS ends its session.")
@click.option("--heartbeat", type=click.FloatRange(0.5, 60), default=5.0, show_default=True,
              metavar="SECONDS", help="Heartbeat ping interval: a silent client is noticed "
                                      "within about 1.5 times this.")
@click.option("--no-advertise", is_flag=True,
              help="Do not announce the cloudlet by mDNS (_cloudlet._tcp) on the network.")
@click.option("--advertise", "advertise_at", metavar="HOST:PORT",
              help="Announce this address instead of the one listened on (a cloudlet behind "
                   "a proxy or NAT).")
@click.option("--registry", metavar="oci://HOST/REPOSITORY",
              help="Fetch a base a client asks for and this cloudlet lacks from this "
                   "repository (as `vmsynth base pull`); the client is told to wait.")
@registry_options
@json_option
def command(listen: str, slots: int | None, grace: float, max_overlay: int,
            token_file: str | None, open_: bool, tls_cert: str | None, tls_key: str | None,
            no_tls: bool, no_cgroups: bool, memory: str, accel: str, negotiate_timeout: float,
            speed_limit: int, speed_time: float, heartbeat: float, no_advertise: bool,
            advertise_at: str | None, registry: str | None, as_json: bool,
            **opts: Any) -> None:
    """Run a cloudlet: serve the cached bases to users who bring overlays.

    A user's device negotiates a session for its overlay's base, streams the overlay (the
    VM is synthesized as it arrives), gets a running VM (resumed from its memory snapshot,
    or booted) with a VNC address and a one-time password, and keeps a heartbeat. When the
    user leaves, the VM waits --grace seconds, then is stopped and every file of the session
    is overwritten and deleted. SIGTERM ends every session the same way. The API is
    documented in docs/cloudlet-api.md.
    """
    host, port = _listen(listen)
    token = read_token(token_file)
    if token is not None and len(token) < 16:
        raise UsageError(f"--token-file {token_file}: a token needs at least 16 characters")
    if not _loopback(host) and token is None and not open_:
        raise UsageError(f"serving {host} without a token lets anyone who reaches it start "
                         "VMs", hint="give --token-file FILE, or --open to do it anyway")
    if no_tls and not _loopback(host):
        raise UsageError("--no-tls only on loopback: keys and VNC passwords cross the network",
                         hint="drop --no-tls (a self-signed certificate is made for you)")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = fingerprint = None
    if not no_tls:
        if tls_cert is None:
            names = [host] if host not in ("0.0.0.0", "::") else [socket.gethostname()]
            cert, key = tls.self_signed(bases.cache_dir("serve"), names)
        else:
            cert, key = Path(tls_cert), Path(str(tls_key))
        context, fingerprint = tls.server_context(cert, key)
    config = ServeConfig(host=host, port=port, slots=slots, grace=grace,
                         max_overlay=max_overlay, token=token, memory=memory,
                         confine=not no_cgroups, accel=accel, heartbeat=heartbeat,
                         negotiate_timeout=negotiate_timeout,
                         upload=Limits(speed_limit, speed_time),
                         service_id=f"{socket.gethostname()}:{port}",
                         registry=_registry(registry, opts))
    handler = logging.StreamHandler()
    handler.addFilter(_Redacted())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    cloudlet = Cloudlet(config)
    scheme = "http" if no_tls else "https"

    def ready() -> None:
        assert cloudlet.capacity is not None
        url = f"{scheme}://{host}:{config.port}"
        if as_json:
            console.emit_json({"event": "serving", "url": url, "fingerprint": fingerprint,
                               "slots": cloudlet.capacity.slots,
                               "bases": [o.spec for o in cloudlet.offers]})
        else:
            console.err.print(f"serving {url} with {cloudlet.capacity.slots} slots; bases: "
                              f"{', '.join(o.spec for o in cloudlet.offers) or 'none'}")
            if fingerprint:
                console.err.print(f"certificate fingerprint (clients pin it with "
                                  f"--fingerprint): {fingerprint}")

    # mDNS from loopback reaches no one: only a cloudlet on the network is announced.
    advertise = None
    if advertise_at:
        advertise = _listen(advertise_at, "--advertise")
    elif not no_advertise and not _loopback(host):
        advertise = (host, 0)
    why = asyncio.run(serve(cloudlet, context, ready, advertise, fingerprint))
    if not as_json:
        console.err.print(f"stopped ({why}): every session ended and scrubbed")
