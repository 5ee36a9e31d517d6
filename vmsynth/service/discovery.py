"""Finding cloudlets nearby (the seed's step 1): mDNS `_cloudlet._tcp.local.`, confirmed over
HTTP.

A cloudlet advertises itself with python-zeroconf; its TXT record carries the API version,
its id, whether it speaks TLS and its certificate's fingerprint, its free slots, load and
how many bases it has. Slots are kept current as sessions come and go, at most one update
every UPDATE_EVERY seconds (each update is multicast to every listener).

mDNS is only a hint: python-zeroconf keeps a cloudlet that died without a goodbye in its
cache for about 19 minutes. So a client browses for a moment, then asks each answer for
`/v1/info` (readable without a token) and times the round trip; a cloudlet that does not
answer is not listed. The ranking: has the base wanted, has a free slot, shortest round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .api import VERSION, WantedBase

SERVICE = "_cloudlet._tcp.local."
UPDATE_EVERY = 3.0  # seconds between two TXT updates at most
CONFIRM_TIMEOUT = 2.0
PINGS = 3  # round trips timed per cloudlet: the shortest is its RTT
# Responders answer a query within 20-120 ms (RFC 6762, 6.): a half second without a new
# cloudlet after the first means the others would have spoken by now.
SETTLE = 0.5

log = logging.getLogger("vmsynth.service")


def _addresses(host: str) -> list[str]:
    """The IPv4 addresses a cloudlet listening on `host` is reachable on."""
    if host not in ("0.0.0.0", ""):
        return [host]
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(ip.ip)
    return out


class Advertiser:
    """A cloudlet's mDNS advertisement, kept current."""

    def __init__(self, service_id: str, host: str, port: int, tls: bool,
                 fingerprint: str | None) -> None:
        self.service_id, self.host, self.port = service_id, host, port
        self.tls, self.fingerprint = tls, fingerprint
        self.properties: dict[str, str] = {}
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._last = 0.0
        self._pending: asyncio.Task[None] | None = None

    def _service_info(self, status: dict[str, Any]) -> AsyncServiceInfo:
        slots = status["slots"]
        load = status["load"]["1m"]
        self.properties = {
            "api": str(VERSION), "id": self.service_id, "tls": "1" if self.tls else "0",
            "slots": str(slots["free"]), "total": str(slots["total"]), "load": f"{load:.2f}",
            "bases": str(len(status["bases"]))}
        if self.fingerprint:
            self.properties["fp"] = self.fingerprint
        name = f"vmsynth {self.service_id}"[:63].replace(".", "-")
        # A host name of our own: the system's mDNS daemon (Avahi) announces the machine's
        # name with its own set of addresses, and two answers for one name would conflict.
        server = re.sub(r"[^a-z0-9-]+", "-", f"vmsynth-{self.service_id}".lower())[:63]
        return AsyncServiceInfo(SERVICE, f"{name}.{SERVICE}", port=self.port,
                                properties=self.properties,
                                parsed_addresses=_addresses(self.host),
                                server=f"{server}.local.")

    async def start(self, status: dict[str, Any]) -> None:
        addresses = _addresses(self.host)
        if not addresses:
            log.warning("not advertising: no address to advertise for %s", self.host)
            return
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._info = self._service_info(status)
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._last = time.monotonic()
        log.info("advertising %s on %s", SERVICE, ", ".join(addresses))

    def changed(self, status: Any) -> None:
        """Sessions changed: update the TXT record soon (at most every UPDATE_EVERY s).
        `status` is called for the current state when the update is sent."""
        if self._zc is None or (self._pending is not None and not self._pending.done()):
            return
        self._pending = asyncio.get_running_loop().create_task(self._update(status))

    async def _update(self, status: Any) -> None:
        wait = self._last + UPDATE_EVERY - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._zc is None or self._info is None:
            return
        info = self._service_info(status())
        info._name = self._info.name  # the name it registered under (maybe changed)
        self._info = info
        await self._zc.async_update_service(info)
        self._last = time.monotonic()

    async def stop(self) -> None:
        """Say goodbye (listeners drop us at once) and close."""
        if self._pending is not None:
            self._pending.cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_all_services()
            await self._zc.async_close()
            self._zc = None


@dataclass
class Found:
    """A cloudlet found by mDNS and confirmed over HTTP."""

    name: str
    url: str
    fingerprint: str | None
    txt: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)  # its /v1/info
    rtt_ms: float | None = None
    has_base: bool | None = None  # None when no base was asked for

    @property
    def free(self) -> int:
        return int(self.info.get("slots", {}).get("free", 0))

    def rank(self) -> tuple[bool, bool, float]:
        return (self.has_base is False, self.free <= 0, self.rtt_ms or 1e9)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "fingerprint": self.fingerprint,
                "rtt_ms": self.rtt_ms, "has_base": self.has_base, "slots": self.info.get("slots"),
                "load": self.info.get("load"), "bases": self.info.get("bases"),
                "service_id": self.info.get("service_id"), "advertised": self.txt}


async def browse(timeout: float, settle: float | None = None) -> list[Found]:
    """Every `_cloudlet._tcp` answer heard within `timeout` seconds (not yet confirmed); with
    `settle`, listening ends sooner: that long after the last new cloudlet was heard."""
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    names: list[str] = []
    loop = asyncio.get_running_loop()
    heard = asyncio.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added and name not in names:
            names.append(name)
            loop.call_soon_threadsafe(heard.set)

    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE], handlers=[on_change])
    try:
        await _listen(heard, loop.time() + timeout, settle)
        infos = [AsyncServiceInfo(SERVICE, name) for name in names]
        await asyncio.gather(*(i.async_request(zc.zeroconf, 1000) for i in infos))
    finally:
        await browser.async_cancel()
        await zc.async_close()
    found = []
    for info in infos:
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            continue
        txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
               for k, v in (info.properties or {}).items()}
        scheme = "https" if txt.get("tls") == "1" else "http"
        found.append(Found(info.name.removesuffix("." + SERVICE), f"{scheme}://{addresses[0]}:"
                           f"{info.port}", txt.get("fp") or None, txt))
    return found


async def _listen(heard: asyncio.Event, deadline: float, settle: float | None) -> None:
    """Until `deadline`, or `settle` seconds pass with nothing new once something was heard."""
    loop = asyncio.get_running_loop()
    quiet_from = None
    while (left := deadline - loop.time()) > 0:
        wait = left if quiet_from is None else min(left, quiet_from + settle - loop.time())
        try:
            await asyncio.wait_for(heard.wait(), max(wait, 0))
        except TimeoutError:
            if quiet_from is not None:
                return
            continue
        heard.clear()
        if settle is not None:
            quiet_from = loop.time()


async def confirm(found: Found, want: WantedBase | None, ssl: Any = True) -> Found | None:
    """Ask the cloudlet itself; None if it does not answer (a stale mDNS record). `ssl`:
    how to trust it when it advertised no fingerprint (aiohttp's `ssl` argument)."""
    if found.fingerprint:
        ssl = aiohttp.Fingerprint(bytes.fromhex(found.fingerprint.removeprefix("sha256:")))
    timeout = aiohttp.ClientTimeout(total=CONFIRM_TIMEOUT)
    rtts = []
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(PINGS):
                began = time.perf_counter()
                async with http.get(found.url + "/v1/info", ssl=ssl) as r:
                    info = await r.json()
                rtts.append((time.perf_counter() - began) * 1000)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("api") != VERSION:
        return None
    found.info, found.rtt_ms = info, round(min(rtts), 2)
    if want is not None:
        found.has_base = any(b.get("digest") == want.digest and
                             b.get("virtual_size") == want.virtual_size and
                             want.memory_digest in (None, b.get("memory_digest"))
                             for b in info.get("bases", []))
    return found


async def discover(timeout: float = 2.0, want: WantedBase | None = None,
                   settle: float | None = None) -> list[Found]:
    """Cloudlets nearby that answer, best first (`settle`: see `browse`)."""
    heard = await browse(timeout, settle)
    confirmed = await asyncio.gather(*(confirm(f, want) for f in heard))
    return sorted((f for f in confirmed if f is not None), key=Found.rank)
