"""The cloudlet's HTTP API on aiohttp: routes, authentication, refusals, metrics.

    GET    /v1/info                      bases, free slots, load (no token: it is what the
                                         cloudlet advertises to anyone nearby anyway)
    POST   /v1/sessions                  negotiate (operator token, if the cloudlet has one)
    GET    /v1/sessions                  every session (operator token)
    PUT    /v1/sessions/{id}/overlay     the overlay, streamed (session token)
    GET    /v1/sessions/{id}             its state (session or operator token)
    GET    /v1/sessions/{id}/heartbeat   WebSocket: the user is here (session token)
    DELETE /v1/sessions/{id}             end it; answers once it is scrubbed (session or
                                         operator token)
    GET    /metrics                      Prometheus text format

Tokens come as `Authorization: Bearer TOKEN`. Handlers parse and authenticate; everything
else is vmsynth.service.cloudlet's. A refusal is JSON (vmsynth.service.api.Refusal); no
token, key or secret is ever logged.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vmsynth.errors import BadInputError, ExitCode

from .api import MAX_BODY, Negotiation, Refusal, parse_json
from .cloudlet import Cloudlet, Session
from .discovery import Advertiser

log = logging.getLogger("vmsynth.service")

BODY_TIMEOUT = 10.0  # seconds to send a negotiation's few hundred bytes
CLOUDLET: web.AppKey[Cloudlet] = web.AppKey("cloudlet", Cloudlet)


def make_app(cloudlet: Cloudlet) -> web.Application:
    app = web.Application(middlewares=[_refusals])
    app[CLOUDLET] = cloudlet
    sid = "{sid:[0-9a-f]{24}}"
    app.router.add_get("/v1/info", info)
    app.router.add_post("/v1/sessions", create)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_put(f"/v1/sessions/{sid}/overlay", upload)
    app.router.add_get(f"/v1/sessions/{sid}/heartbeat", heartbeat)
    app.router.add_get(f"/v1/sessions/{sid}", state)
    app.router.add_delete(f"/v1/sessions/{sid}", end)
    app.router.add_get("/metrics", metrics)

    async def startup(app: web.Application) -> None:
        await cloudlet.start()

    async def shutdown(app: web.Application) -> None:
        await cloudlet.close()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    return app


@web.middleware
async def _refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refusal as refusal:
        return _refused(refusal)
    except web.HTTPException as exc:  # no such route or method: answered as JSON too
        if exc.status < 400:
            raise
        return _refused(Refusal(exc.status, ExitCode.USAGE, f"{request.method} "
                                f"{request.path}: {exc.reason}"))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _refused(Refusal(500, ExitCode.ERROR, "internal error",
                                "the cloudlet's log has the details"))


def _refused(refusal: Refusal) -> web.Response:
    headers = {}
    if "retry_after" in refusal.extra:
        headers["Retry-After"] = str(refusal.extra["retry_after"])
    return web.json_response(refusal.body(), status=refusal.status, headers=headers)


# -- authentication -------------------------------------------------------------------------

def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _operator(request: web.Request) -> bool:
    """Whether the request carries the operator's token (or the cloudlet has none)."""
    want = request.app[CLOUDLET].config.token
    if want is None:
        return True
    given = _bearer(request)
    return given is not None and hmac.compare_digest(given.encode(), want.encode())


def _require_operator(request: web.Request) -> None:
    if not _operator(request):
        raise Refusal(401, ExitCode.UNAUTHORIZED,
                      "no token, or not this cloudlet's" if _bearer(request) is None
                      else "this token is not this cloudlet's",
                      "pass the cloudlet's token with --token-file")


def _session(request: web.Request, allow_operator: bool = True) -> Session:
    """The session in the path, if the request holds its token (or the operator's)."""
    cloudlet = request.app[CLOUDLET]
    found = cloudlet.find(request.match_info["sid"])
    given = _bearer(request)
    if given is None:
        raise Refusal(401, ExitCode.UNAUTHORIZED, "no session token")
    if isinstance(found, dict):  # ended: its token went with it; only its end is told
        raise _Ended(found)
    if given is not None and hmac.compare_digest(given.encode(), found.token.encode()):
        return found
    if allow_operator and cloudlet.config.token and _operator(request):
        return found
    raise Refusal(403, ExitCode.UNAUTHORIZED, f"that token is not session {found.id}'s")


class _Ended(Refusal):
    def __init__(self, final: dict[str, Any]) -> None:
        super().__init__(410, ExitCode.CLOUDLET, f"session {final['id']} has "
                         f"{final['state']}: {final.get('reason', '')}".rstrip(": "),
                         session=final)


def _secure(request: web.Request) -> bool:
    """TLS, or a client on this host: where a key may travel."""
    if request.secure:
        return True
    peer = request.transport.get_extra_info("peername") if request.transport else None
    try:
        return peer is not None and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def _our_address(request: web.Request) -> str | None:
    """The address this client reached the cloudlet on (where its VM's VNC is too)."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sock[0]) if sock else None


# -- handlers -------------------------------------------------------------------------------

async def info(request: web.Request) -> web.Response:
    return web.json_response(request.app[CLOUDLET].info())


async def create(request: web.Request) -> web.Response:
    _require_operator(request)
    negotiation = Negotiation.parse(parse_json(await _small_body(request)))
    if negotiation.key is not None and not _secure(request):
        raise Refusal(400, ExitCode.USAGE, "an overlay key is only accepted over TLS or from "
                      "this host", "serve with TLS (the default) and connect with https://")
    s = request.app[CLOUDLET].negotiate(negotiation)
    return web.json_response(s.to_json(_our_address(request)) | {
        "token": s.token, "upload": f"/v1/sessions/{s.id}/overlay",
        "heartbeat": f"/v1/sessions/{s.id}/heartbeat"}, status=201)


async def _small_body(request: web.Request) -> bytes:
    """A JSON body: at most MAX_BODY bytes, within BODY_TIMEOUT (a client that sends a byte
    a minute is not waited for)."""
    async def read() -> bytes:
        parts, size = [], 0
        while chunk := await request.content.read(MAX_BODY + 1 - size):
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                break
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), BODY_TIMEOUT)
    except TimeoutError:
        raise Refusal(408, ExitCode.USAGE, "the request body did not arrive in time") from None


async def upload(request: web.Request) -> web.Response:
    s = _session(request, allow_operator=False)
    await request.app[CLOUDLET].receive(s, request.content, request.content_length)
    return web.json_response(s.to_json(_our_address(request)))


def _live(request: web.Request) -> Session | dict[str, Any]:
    """The session in the path, or the final state of one that has ended."""
    try:
        return _session(request)
    except _Ended as ended:
        return ended.extra["session"]


async def state(request: web.Request) -> web.Response:
    s = _live(request)
    return web.json_response(s if isinstance(s, dict) else s.to_json(_our_address(request)))


async def end(request: web.Request) -> web.Response:
    s = _live(request)
    if isinstance(s, dict):
        return web.json_response(s)
    await request.app[CLOUDLET].end(s, "ended by its user" if _bearer(request) == s.token
                                    else "ended by the operator")
    return web.json_response(s.to_json())


async def heartbeat(request: web.Request) -> web.WebSocketResponse:
    """While this WebSocket is open (and answers the pings), the user is here. The cloudlet
    also sends the session's state on it whenever it changes."""
    s = _session(request, allow_operator=False)
    cloudlet = request.app[CLOUDLET]
    ws = web.WebSocketResponse(heartbeat=cloudlet.config.heartbeat)
    await ws.prepare(request)
    await cloudlet.attach(s)
    pusher = asyncio.get_running_loop().create_task(_push_states(ws, s, _our_address(request)))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        pusher.cancel()
        await cloudlet.detach(s)
    return ws


async def _push_states(ws: web.WebSocketResponse, s: Session, host: str | None) -> None:
    last = None
    while not ws.closed:
        current = s.to_json(host)
        if current["state"] != last:
            last = current["state"]
            await ws.send_str(json.dumps(current))
        if s.ended.is_set():
            await ws.close()
            return
        async with s.changed:
            await s.changed.wait()


async def list_sessions(request: web.Request) -> web.Response:
    _require_operator(request)
    cloudlet = request.app[CLOUDLET]
    host = _our_address(request)
    return web.json_response({"sessions": [s.to_json(host) | {"watchers": s.watchers}
                                           for s in cloudlet.sessions.values()],
                              "ended": list(cloudlet.ended)[-20:]})


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(_Collector(request.app[CLOUDLET]))
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


class _Collector:
    """The cloudlet's state, read when Prometheus scrapes (nothing to keep in step)."""

    def __init__(self, cloudlet: Cloudlet) -> None:
        self.cloudlet = cloudlet

    def collect(self) -> Any:
        c = self.cloudlet
        states = GaugeMetricFamily("vmsynth_sessions", "Sessions by state", labels=["state"])
        counted: dict[str, int] = {}
        for s in c.sessions.values():
            counted[s.state] = counted.get(s.state, 0) + 1
        for name in ("negotiated", "receiving", "starting", "running", "disconnected",
                     "ending"):
            states.add_metric([name], counted.get(name, 0))
        yield states
        if c.capacity is not None:
            yield GaugeMetricFamily("vmsynth_slots", "Session slots", value=c.capacity.slots)
            yield GaugeMetricFamily("vmsynth_slots_free", "Free session slots",
                                    value=c.capacity.free)
        done = CounterMetricFamily("vmsynth_sessions_finished", "Sessions that ended",
                                   labels=["outcome"])
        for outcome, n in sorted(c.counts.items()):
            done.add_metric([outcome], n)
        yield done
        phases = GaugeMetricFamily("vmsynth_phase_seconds_mean",
                                   "Mean seconds per session phase", labels=["phase"])
        for phase, values in sorted(c.phases.items()):
            phases.add_metric([phase], sum(values) / len(values))
        yield phases



async def serve(cloudlet: Cloudlet, ssl_context: Any | None, on_ready: Any = None,
                advertise: tuple[str, int] | None = None, fingerprint: str | None = None
                ) -> str:
    """Run the cloudlet until SIGINT, SIGTERM or SIGHUP; every session is then ended and
    scrubbed before this returns (the signal's name). With `advertise` (host, port; port 0:
    the one listened on), announce it by mDNS (vmsynth.service.discovery) while it serves."""
    import signal

    runner = web.AppRunner(make_app(cloudlet), handle_signals=False, access_log=None)
    await runner.setup()  # the start-up scrub and the base catalogue happen here
    stop = asyncio.Event()
    got: list[str] = []
    advertiser: Advertiser | None = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(s.name), stop.set()))
    try:
        site = web.TCPSite(runner, cloudlet.config.host, cloudlet.config.port,
                           ssl_context=ssl_context, shutdown_timeout=5.0)
        try:
            await site.start()
        except OSError as err:
            raise BadInputError(f"cannot listen on {cloudlet.config.host}:"
                                f"{cloudlet.config.port}: {err.strerror or err}",
                                hint="choose another --listen address or port") from None
        cloudlet.config.port = int(runner.addresses[0][1])  # the one bound, for port 0
        if advertise is not None:
            advertiser = Advertiser(cloudlet.config.service_id, advertise[0],
                                    advertise[1] or cloudlet.config.port,
                                    ssl_context is not None, fingerprint)
            await advertiser.start(cloudlet.info())
            cloudlet.on_change.append(lambda: advertiser.changed(cloudlet.info))
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        if advertiser is not None:
            await advertiser.stop()  # a goodbye first: clients drop us at once
        await runner.cleanup()  # on_shutdown: every session ended and scrubbed
    return got[0] if got else "stopped"
