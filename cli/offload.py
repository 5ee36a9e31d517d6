"""vmsynth offload: run an overlay on a cloudlet (found by mDNS, or given), with fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from vmsynth import signals
from vmsynth.decision import (
    CLOUD_MBPS,
    Device,
    Estimate,
    Site,
    Situation,
    Workload,
    decide_runtime,
    ranked,
)
from vmsynth.errors import CloudletError, ExitCode, NoCloudletError, VmsynthError, exit_code
from vmsynth.registry import Access
from vmsynth.service.client import Client, Trust, hold, negotiation_body, stream
from vmsynth.service.discovery import SETTLE, Found, confirm, discover
from vmsynth.source import Limits, open_source

from . import console
from .options import (
    cloudlet_client,
    cloudlet_options,
    json_option,
    key_file_option,
    limits,
    read_key,
    registry_access,
    transfer_options,
    wanted_base,
)


@click.command("offload", epilog="""\b
Examples:
  vmsynth offload app.vmo --cloudlet auto --token-file cloudlet.token
  vmsynth offload app.vmo --cloudlet https://192.168.1.10:8750 \\
      --fingerprint sha256:3f1c... --token-file cloudlet.token
  vmsynth offload app.vmo --cloudlet auto --fallback https://cloud.example.com:8750
  vmsynth offload app.vmo --cloudlet http://127.0.0.1:8750 --forward 8080 --json
  vmsynth create ... -o - | vmsynth offload - --cloudlet https://cloudlet:8750 ...""")
@click.argument("overlay")
@cloudlet_options
@click.option("--discover-timeout", type=click.FloatRange(0.2, 60), default=2.0,
              show_default=True, metavar="SECONDS",
              help="With --cloudlet auto: how long to listen for cloudlets at most; "
                   "listening ends half a second after the last new one was heard.")
@click.option("--fallback", "fallbacks", multiple=True, metavar="URL",
              help="Where to go when no cloudlet can serve (none found, none has the base, "
                   "all full, or one dies mid-session): another cloudlet or a cloud "
                   "endpoint running `vmsynth serve` (repeatable, tried in order).")
@click.option("--forward", "forwards", type=click.IntRange(1, 65535), multiple=True,
              metavar="PORT", help="Forward this guest TCP port to a cloudlet port "
                                   "(repeatable).")
@click.option("--memory", help="Guest RAM for a booted VM (a resumed one keeps its own).")
@click.option("--cpus", type=click.IntRange(1, 64), help="Virtual CPUs for a booted VM.")
@key_file_option
@transfer_options
@json_option
def command(overlay: str, url: str, token_file: str | None, fingerprint: str | None,
            cacert: str | None, discover_timeout: float, fallbacks: tuple[str, ...],
            forwards: tuple[int, ...], memory: str | None, cpus: int | None,
            key_file: str | None, as_json: bool, **transfer: Any) -> None:
    """Run OVERLAY on a cloudlet: negotiate, stream it, get a running VM, keep it alive.

    OVERLAY is a file, - (standard input), an http(s) URL or an oci:// registry
    reference. `--cloudlet auto` finds the cloudlets nearby by mDNS and takes the best that
    has the overlay's base and a free slot (pinning the certificate fingerprint it
    advertises). The cloudlet synthesizes the VM while the overlay arrives and resumes it
    (or boots it); this prints the timeline and
    how to reach the VM (VNC address and one-time password, forwarded ports), then holds
    the session with a heartbeat until Ctrl-C or SIGTERM, which end it: the answer comes
    once the cloudlet has stopped the VM and scrubbed its files.

    When no cloudlet can serve, the next tier is tried: the --fallback endpoints, in
    order; after them, exit 40 says to run locally (degraded mode).
    """
    key = read_key(key_file)
    transfer_limits = limits(transfer)
    plan = Plan(overlay, url, token_file, fingerprint, cacert, discover_timeout,
                list(fallbacks), transfer_limits, registry_access(transfer, transfer_limits))
    asyncio.run(_offload_anywhere(plan, key, memory, cpus, list(forwards), as_json))


@dataclass
class Plan:
    """Where to try, in order: the cloudlet (given, or found), then the fallbacks."""

    overlay: str
    url: str
    token_file: str | None
    fingerprint: str | None
    cacert: str | None
    discover_timeout: float
    fallbacks: list[str]
    limits: Limits
    access: Access

    async def candidates(self, as_json: bool) -> tuple[list[tuple[str, Client]], str | None]:
        """(tier label, client) in order, and why no cloudlet was found (with auto)."""
        out: list[tuple[str, Client]] = []
        why = None
        if self.url == "auto":
            want = await asyncio.to_thread(wanted_base, self.overlay, self.access)
            began = time.monotonic()
            found = await discover(self.discover_timeout, want, settle=SETTLE)
            _event(as_json, "discovered", {"cloudlets": [f.to_json() for f in found],
                                           "seconds": round(time.monotonic() - began, 3)})
            usable = {f.url: f for f in found if f.has_base and f.free > 0}
            if not found:
                why = "no cloudlet answered nearby"
            elif not any(f.has_base for f in found):
                why = f"no cloudlet nearby has base {want.label}"
            elif not usable:
                why = f"every cloudlet with base {want.label} is full"
            token = cloudlet_client("http://x", self.token_file, None, None).token
            for tier in await self._decide(found, as_json):  # best first, by the model
                if tier.tier == "cloudlet" and tier.name in usable:
                    f = usable[tier.name]
                    out.append((f"the cloudlet at {f.url}",
                                Client(f.url, token, Trust(f.fingerprint))))
                elif tier.tier == "cloud" and self.fallbacks:
                    out.append(self._fallback(self.fallbacks[0]))
        else:
            out.append((f"the cloudlet at {self.url}", cloudlet_client(
                self.url, self.token_file, self.fingerprint, self.cacert)))
        out += [self._fallback(u) for u in self.fallbacks
                if f"the fallback {u}" not in dict(out)]
        return out, why

    def _fallback(self, url: str) -> tuple[str, Client]:
        return f"the fallback {url}", cloudlet_client(url, self.token_file, None, self.cacert)

    async def _decide(self, found: list[Found], as_json: bool) -> list[Estimate]:
        """The tiers in the order the runtime model ranks them (vmsynth.decision), from
        what discovery measured; the first --fallback is the cloud, its RTT measured too."""
        cloud = None
        if self.fallbacks:
            answered = await confirm(Found(self.fallbacks[0], self.fallbacks[0], None, {}),
                                     None, Trust(None, self.cacert).ssl())
            if answered is not None and answered.rtt_ms is not None:
                cloud = Site(self.fallbacks[0], answered.rtt_ms, bandwidth_mbps=CLOUD_MBPS)
        path = Path(self.overlay)
        size = path.stat().st_size if self.overlay != "-" and path.is_file() else OVERLAY_GUESS
        situation = Situation(
            Workload(size), _device(),
            tuple(Site(f.url, f.rtt_ms or 1e4, free_slots=f.free, has_base=bool(f.has_base))
                  for f in found), cloud)
        decision = decide_runtime(situation)
        _event(as_json, "decided", {
            "choice": decision.choice, "name": decision.name, "reason": decision.reason,
            "estimates": [e.to_json() for e in decision.estimates],
            "inputs": {"overlay_bytes": size, "battery": situation.device.battery,
                       "cloudlets": [asdict(c) for c in situation.cloudlets],
                       "cloud": asdict(cloud) if cloud else None}})
        if not as_json:
            console.err.print(f"decided: {decision.reason}")
        return ranked(situation)


OVERLAY_GUESS = 150 * 1000 * 1000  # the chapter's overlay, when the size is not known ahead


def _device() -> Device:
    """This device as the model needs it: on battery (its charge) or on mains power."""
    for supply in Path("/sys/class/power_supply").glob("BAT*"):
        with contextlib.suppress(OSError, ValueError):
            if (supply / "status").read_text().strip() == "Discharging":
                return Device(battery=int((supply / "capacity").read_text()) / 100)
    return Device()


# A cloudlet that cannot serve (no base, no slot, over its budget, unreachable, dead): the
# next tier is tried. Other failures (a corrupt overlay, a wrong key) would fail anywhere.
FALL_THROUGH = (ExitCode.BASE_MISMATCH, ExitCode.FULL, ExitCode.OVER_BUDGET,
                ExitCode.CLOUDLET)


async def _offload_anywhere(plan: Plan, key: Any, memory: str | None, cpus: int | None,
                            forwards: list[int], as_json: bool) -> None:
    stop = asyncio.Event()  # Ctrl-C, SIGTERM, SIGHUP: end the session, then exit
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    tiers, why = await plan.candidates(as_json)
    reasons = [why] if why else []
    for i, (label, client) in enumerate(tiers):
        try:
            with open_source(plan.overlay, plan.limits, plan.access) as source:
                await _offload(client, source, key, memory, cpus, forwards, as_json, stop)
            return
        except VmsynthError as err:
            if exit_code(err) not in FALL_THROUGH or (plan.url != "auto" and
                                                      not plan.fallbacks):
                raise  # the one cloudlet asked for: its own failure, its own code
            reasons.append(f"{label}: {err}")
            nxt = tiers[i + 1][0] if i + 1 < len(tiers) else "running locally"
            _event(as_json, "fallback", {"from": label, "reason": str(err), "to": nxt})
            if not as_json:
                console.err.print(f"{label} cannot serve ({err}); trying {nxt}")
    raise NoCloudletError("no cloudlet can serve this overlay: " + "; ".join(reasons),
                          hint="run it locally (degraded mode), or give --fallback URL")


def _fetching(error: dict[str, Any], as_json: bool) -> None:
    """The cloudlet lacks the base and fetches it from its registry: it says so."""
    _event(as_json, "fetching", error["fetching"] | {"retry_after": error.get("retry_after")})
    if not as_json:
        console.err.print(f"{error.get('message')}; asking again in "
                          f"{error.get('retry_after')} s")


def _event(as_json: bool, event: str, data: dict[str, Any]) -> None:
    if as_json:
        console.emit_json({"event": event} | data)


async def _offload(client: Client, source: Any, key: Any, memory: str | None,
                   cpus: int | None, forwards: list[int], as_json: bool,
                   stop: asyncio.Event) -> None:
    started = time.monotonic()
    async with client:
        info = await client.info()
        body, head = await asyncio.to_thread(negotiation_body, source, source.size or None,
                                             int(info.get("max_overlay", 250 << 20)), key,
                                             memory, cpus, forwards)
        negotiated = time.monotonic()
        session = await client.negotiate(body, lambda e: _fetching(e, as_json))
        timeline: dict[str, float] = {"negotiate": time.monotonic() - negotiated}
        _event(as_json, "negotiated", {"session": session["id"], "base": session["base"]})
        ws = None
        try:
            ws = await client.heartbeat(session)
            with console.advancing("uploading", source.size, enabled=not as_json) as advance:
                sent = time.monotonic()
                answer = await _unless_stopped(
                    client.upload(session, stream(head, source, advance), source.size or None),
                    stop)
            timeline |= answer.get("timeline", {})
            timeline["running_after"] = time.monotonic() - sent
            timeline["total"] = time.monotonic() - started
            _running(answer, timeline, as_json)
            why, ws = await hold(client, session, ws, stop, float(info.get("grace", 45)))
            if why != "user":
                _event(as_json, "ended", {"session": session["id"], "reason": why})
                raise CloudletError(f"the cloudlet ended the session: {why}")
            final = await client.end(session)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.end(session))  # nothing stays behind
            raise
        finally:
            if ws is not None:
                await ws.close()
    _event(as_json, "ended", {"session": session["id"], "state": final.get("state"),
                              "reason": final.get("reason")})
    if not as_json:
        console.err.print(f"session {session['id']} ended; the cloudlet stopped the VM and "
                          "scrubbed its files")


async def _unless_stopped(work: Any, stop: asyncio.Event) -> Any:
    """`work`'s result, or Interrupted if the user asked to stop first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        raise signals.Interrupted()
    return task.result()


def _running(answer: dict[str, Any], timeline: dict[str, float], as_json: bool) -> None:
    if as_json:
        console.emit_json({"event": "running", "session": answer["id"], "vnc": answer.get("vnc"),
                           "forwards": answer.get("forwards", {}), "pid": answer.get("pid"),
                           "timeline": {k: round(v, 3) for k, v in timeline.items()},
                           "at": answer.get("at", {})})
        return
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in timeline.items())
    console.err.print(f"session {answer['id']} running: {phases}")
    vnc = answer.get("vnc")
    if vnc:
        console.err.print(f"VNC {vnc['host']}:{vnc['port']} (display "
                          f":{int(vnc['port']) - 5900}), password {vnc['password']}")
    for guest, where in answer.get("forwards", {}).items():
        console.err.print(f"guest port {guest} -> {where['host']}:{where['port']}")
    console.err.print("Ctrl-C ends the session (the cloudlet wipes the VM)")
