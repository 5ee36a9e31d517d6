"""The cloudlet (issue 18): `vmsynth serve` on loopback, with the real fixture guest.

The service runs as a subprocess, as an operator runs it; clients are `vmsynth offload`
(for what a user sees: exit codes, one-line errors) and the library client or plain HTTP
(for the API itself). Every test ends with nothing left: no QEMU process of the service,
no session directory, every slot free.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from cloudlet_world import HANG, World, next_json, running_event, until, vmsynth
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsynth.errors import ExitCode
from vmsynth.service.client import Client, Trust

pytestmark = pytest.mark.vm


# ------------------------------------------------------------------------------ the service

class Service:
    """`vmsynth serve` on 127.0.0.1 and a free port."""

    def __init__(self, h, world: World, *args: object) -> None:
        self.h, self.world = h, world
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (the service's lifetime)
            prefix="serve-", suffix=".log", dir=world.dir, delete=False)
        self.proc = subprocess.Popen(
            vmsynth(h, "serve", "--listen", "127.0.0.1:0", "--accel", "tcg", "--json", *args),
            stdout=subprocess.PIPE, stderr=self.log, env=world.env(), text=True,
            start_new_session=True)
        assert self.proc.stdout is not None
        try:
            event = next_json(self.proc.stdout)
        except AssertionError:
            pytest.fail(f"serve did not start: {Path(self.log.name).read_text()[-3000:]}")
        assert event.get("event") == "serving", (event, self.log_text()[-2000:])
        self.url, self.fingerprint = event["url"], event["fingerprint"]

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token, Trust(self.fingerprint))

    def info(self) -> dict:
        return asyncio.run(_call(self.client(), "info"))

    def qemu(self) -> list[int]:
        return self.h.qemu_processes(str(self.world.home / "sessions"))

    def sessions_on_disk(self) -> list[str]:
        folder = self.world.home / "sessions"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def assert_idle(self) -> None:
        """No session left (once those ending have ended): no QEMU, no session directory,
        every slot free."""
        until("the sessions to be gone", lambda: not self.qemu() and not
               self.sessions_on_disk() and self.info()["slots"]["used"] == 0, timeout=30)
        slots = self.info()["slots"]
        assert slots["free"] == slots["total"], slots

    def offload(self, overlay: Path, *args: object) -> subprocess.Popen:
        trust = ["--fingerprint", self.fingerprint] if self.fingerprint else []
        return subprocess.Popen(vmsynth(self.h, "offload", overlay, "--cloudlet", self.url,
                                         *trust, "--json", *args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.world.env(), start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=HANG)
        return self.proc.returncode

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


@pytest.fixture
def serve(h, world):
    services: list[Service] = []

    def start(*args: object) -> Service:
        s = Service(h, world, *args)
        services.append(s)
        return s

    yield start
    for s in services:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()
        for pid in s.qemu():  # only after a failed test: never leak a VM
            os.kill(pid, signal.SIGKILL)


async def _call(client: Client, method: str, *args):
    async with client:
        return await getattr(client, method)(*args)


def _events(text: str) -> list[dict]:
    out, decoder, pos = [], json.JSONDecoder(), 0
    text = text.strip()
    while pos < len(text):
        value, end = decoder.raw_decode(text, pos)
        out.append(value)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _rfb(vnc: dict) -> list[int]:
    """Connect to the VM's VNC server: its greeting, and the security types it offers."""
    with socket.create_connection((vnc["host"], vnc["port"]), timeout=30) as c:
        assert c.recv(12).startswith(b"RFB 003.008"), "an RFB server answers"
        c.sendall(b"RFB 003.008\n")
        count = c.recv(1)[0]
        return list(c.recv(count))


# ------------------------------------------------------------------------------ the whole path

def test_offload_resumes_serves_vnc_and_wipes_after_the_grace(h, world, serve):
    """negotiate -> stream -> resume -> VNC (behind a password) -> heartbeat lost -> grace ->
    nothing left."""
    svc = serve("--grace", "2", "--slots", "2")
    p = svc.offload(world.overlay)
    running = running_event(p)
    timeline = running["timeline"]
    assert {"negotiate", "transfer", "synthesize", "resume"} <= set(timeline), timeline
    assert running["pid"] in svc.qemu(), "the VM is the cloudlet's QEMU"
    assert svc.info()["slots"]["used"] == 1
    assert _rfb(running["vnc"]) == [2], "VNC asks for the session's password (VNC auth)"
    assert len(running["vnc"]["password"]) == 8
    cgroup = Path(f"/proc/{running['pid']}/cgroup").read_text()
    assert f"vmsynth-{running['session']}" in cgroup, "the VM runs in the session's cgroup"
    os.killpg(p.pid, signal.SIGKILL)  # the user's device dies without a word
    p.wait()
    lost = time.monotonic()
    until("the user to be noticed gone", lambda: "the user is gone" in svc.log_text(),
           timeout=15)
    assert time.monotonic() - lost < 15
    svc.assert_idle()
    assert "did not come back within 2 s" in svc.log_text()


def test_ctrl_c_ends_the_session_and_waits_for_the_wipe(h, world, serve):
    svc = serve()
    p = svc.offload(world.overlay)
    running = running_event(p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=HANG)
    assert p.returncode == 0, err
    ended = _events(out)[-1]
    assert ended["event"] == "ended" and ended["state"] == "ended", ended
    assert running["pid"] not in svc.qemu()
    assert svc.sessions_on_disk() == [], "the end is answered only after the scrub"
    svc.assert_idle()


def test_a_user_who_comes_back_within_the_grace_gets_the_same_vm(world, serve):
    svc = serve("--grace", "20")

    async def scenario() -> tuple[dict, dict, dict]:
        async with svc.client() as c:
            body, head = _negotiation(world.overlay)
            session = await c.negotiate(body)
            ws = await c.heartbeat(session)
            first = await c.upload(session, _chunks(head, world.overlay), None)
            await ws.close()  # the device loses the network ...
            await _until_state(c, session, "disconnected")
            ws = await c.heartbeat(session)  # ... and comes back
            back = await _until_state(c, session, "running")
            ended = await c.end(session)
            await ws.close()
            return first, back, ended

    first, back, ended = asyncio.run(scenario())
    assert back["pid"] == first["pid"] and back["vnc"] == first["vnc"], (first, back)
    assert ended["state"] == "ended"
    svc.assert_idle()


def test_a_silent_client_is_noticed_by_the_heartbeat(world, serve):
    """A client whose network vanished sends nothing, not even a close: the pings go
    unanswered and the cloudlet notices within 15 s."""
    svc = serve("--grace", "1", "--heartbeat", "2")

    async def scenario() -> float:
        async with svc.client() as c:
            body, head = _negotiation(world.overlay)
            session = await c.negotiate(body)
            assert c._http is not None
            ws = await c._http.ws_connect(svc.url + session["heartbeat"], autoping=False,
                                          headers={"Authorization": f"Bearer {session['token']}"},
                                          ssl=c.trust.ssl())
            await c.upload(session, _chunks(head, world.overlay), None)
            silent = time.monotonic()  # from now on nothing answers the pings
            await _until_state(c, session, "disconnected", timeout=20)
            noticed = time.monotonic() - silent
            await ws.close()
            return noticed

    assert asyncio.run(scenario()) < 15
    svc.assert_idle()


async def _until_state(c: Client, session: dict, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = await c.call("GET", f"/v1/sessions/{session['id']}", token=session["token"])
        if now["state"] == state:
            return now
        assert time.monotonic() < deadline, f"still {now['state']} after {timeout} s"
        await asyncio.sleep(0.2)


def _negotiation(overlay: Path, **extra) -> tuple[dict, bytes]:
    from vmsynth.service.client import negotiation_body
    from vmsynth.source import open_source

    with open_source(str(overlay)) as source:
        body, _ = negotiation_body(source, overlay.stat().st_size, 0, None, None, None, [])
    return body | extra, b""  # the upload streams the whole file, header included


async def _chunks(head: bytes, overlay: Path, chunk: int = 1 << 20):
    yield head
    data = overlay.read_bytes()  # small: a few MB
    for pos in range(0, len(data), chunk):
        yield data[pos: pos + chunk]


def test_n_plus_one_requests_for_n_slots_give_n_sessions(world, serve):
    svc = serve("--slots", "2", "--negotiate-timeout", "30")

    async def scenario() -> list:
        async with svc.client() as c:
            body, _ = _negotiation(world.overlay)
            results = await asyncio.gather(*(c.negotiate(body) for _ in range(3)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, dict):
                    await c.end(r)
            return results

    results = asyncio.run(scenario())
    made = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if not isinstance(r, dict)]
    assert len(made) == 2 and len(refused) == 1, results
    assert refused[0].exit_code == ExitCode.FULL and "retry after" in str(refused[0])
    svc.assert_idle()


def test_kill_9_of_the_service_leaves_nothing_for_long(h, world, serve):
    svc = serve("--grace", "3")  # the client tries to come back for that long
    p = svc.offload(world.overlay)
    running = running_event(p)
    pid = running["pid"]
    svc.stop(signal.SIGKILL)
    until("QEMU to die with the service", lambda: not h.alive(pid), timeout=10)
    assert svc.sessions_on_disk(), "the dead service could not scrub (the next start will)"
    p.wait(timeout=HANG)  # the client notices the cloudlet is gone
    assert p.returncode == ExitCode.CLOUDLET, p.stderr.read() if p.stderr else ""
    again = serve()
    assert again.sessions_on_disk() == [], "scrubbed before the first request"
    assert "scrubbed 1 sessions" in again.log_text()
    again.assert_idle()


def test_sigterm_ends_every_session_cleanly(h, world, serve):
    svc = serve("--grace", "3")
    p = svc.offload(world.overlay)
    running = running_event(p)
    assert svc.stop(signal.SIGTERM) == 0
    assert not h.alive(running["pid"]) and svc.sessions_on_disk() == []
    p.wait(timeout=HANG)
    assert p.returncode == ExitCode.CLOUDLET


def test_an_encrypted_overlay_with_its_key_over_tls(world, serve):
    svc = serve()
    p = svc.offload(world.encrypted, "--key-file", world.key)
    running = running_event(p)
    assert running["vnc"]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=HANG) == 0
    svc.assert_idle()


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize(("case", "code"), [
    ("base-not-here", ExitCode.BASE_MISMATCH), ("over-budget", ExitCode.OVER_BUDGET),
    ("no-token", ExitCode.UNAUTHORIZED), ("wrong-token", ExitCode.UNAUTHORIZED),
    ("wrong-key", ExitCode.KEY), ("no-key", ExitCode.KEY),
    ("wrong-fingerprint", ExitCode.CLOUDLET), ("unreachable", ExitCode.CLOUDLET)])
def test_refusals_are_one_line_with_their_exit_code(world, serve, case, code):
    token = world.dir / "token"
    token.write_text("t" * 32)
    wrong = world.dir / "wrong-token"
    wrong.write_text("w" * 32)
    args = ["--max-overlay", "64K"] if case == "over-budget" else []
    if case in ("no-token", "wrong-token"):
        args += ["--token-file", token]
    svc = serve(*args)
    overlay = {"base-not-here": world.foreign, "wrong-key": world.encrypted,
               "no-key": world.encrypted}.get(case, world.overlay)
    extra: list[object] = {"wrong-token": ["--token-file", wrong],
                           "wrong-key": ["--key-file", wrong]}.get(case, [])
    if case == "wrong-key":
        bad_key = world.dir / "bad.key"
        bad_key.write_bytes(b"k" * 32)
        extra = ["--key-file", bad_key]
    real = svc.fingerprint, svc.url
    if case == "wrong-fingerprint":
        svc.fingerprint = "sha256:" + "0" * 64
    if case == "unreachable":
        svc.url = "https://127.0.0.1:1"
    p = svc.offload(overlay, *extra)
    svc.fingerprint, svc.url = real
    out, err = p.communicate(timeout=HANG)
    assert p.returncode == code, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    if case == "base-not-here":
        assert "it has: tiny@1" in err
    svc.assert_idle()


def test_the_cloudlet_full_is_its_own_exit_code(world, serve):
    svc = serve("--slots", "1")
    first = svc.offload(world.overlay)
    running_event(first)
    second = svc.offload(world.overlay)
    _, err = second.communicate(timeout=HANG)
    assert second.returncode == ExitCode.FULL and "full" in err, err
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=HANG) == 0
    svc.assert_idle()


# ------------------------------------------------------------------------------ hostile clients

def _raw(svc: Service, method: str, path: str, body: bytes | None = None,
         token: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            hdrs = ({"Authorization": f"Bearer {token}"} if token else {}) | (headers or {})
            async with http.request(method, svc.url + path, data=body, headers=hdrs,
                                    ssl=aiohttp.Fingerprint(bytes.fromhex(
                                        svc.fingerprint.removeprefix("sha256:")))) as r:
                return r.status, await r.json(content_type=None)

    return asyncio.run(go())


def test_hostile_requests_are_refused_and_harm_no_one(world, serve):
    svc = serve("--slots", "3", "--negotiate-timeout", "5", "--speed-time", "3")
    good = svc.offload(world.overlay)
    running = running_event(good)
    body, _ = _negotiation(world.overlay)
    cases = {
        "not json": (b"{not json", 400), "a list": (b"[1, 2]", 400),
        "huge": (b'{"x": "' + b"a" * (70 << 10) + b'"}', 413),
        "no base": (json.dumps({"overlay_size": 10}).encode(), 400),
        "bad digest": (json.dumps(body | {"base": body["base"] | {"digest": "md5:x"}}).encode(),
                       400),
        "negative size": (json.dumps(body | {"overlay_size": -5}).encode(), 400),
        "too many forwards": (json.dumps(body | {"forward": list(range(1, 40))}).encode(), 400),
    }
    for name, (payload, status) in cases.items():
        got, answer = _raw(svc, "POST", "/v1/sessions", payload)
        assert got == status and answer["error"]["message"], (name, got, answer)
    for path in ("/v1/sessions/../../etc/passwd", "/v1/sessions/%2e%2e", "/v1/sessions/zz",
                 "/v1/sessions/" + "a" * 24):
        got, _ = _raw(svc, "GET", path, token="x")
        assert got in (401, 404), (path, got)
    # One session's token on another's.
    a = _raw(svc, "POST", "/v1/sessions", json.dumps(body).encode())[1]
    b = _raw(svc, "POST", "/v1/sessions", json.dumps(body).encode())[1]
    got, answer = _raw(svc, "GET", f"/v1/sessions/{a['id']}", token=b["token"])
    assert got == 403 and answer["error"]["kind"] == "unauthorized"
    # Garbage instead of an overlay: that session fails, its slot comes back.
    got, answer = _raw(svc, "PUT", a["upload"], b"garbage" * 1000, token=a["token"])
    assert got == 422 and answer["error"]["kind"] == "corrupt", answer
    # More bytes than negotiated.
    small = _raw(svc, "POST", "/v1/sessions",
                 json.dumps(body | {"overlay_size": 100}).encode())[1]
    got, answer = _raw(svc, "PUT", small["upload"], world.overlay.read_bytes(),
                       token=small["token"])
    assert got == 413, answer
    # A client that sends a byte and then nothing: given up on after --speed-time.
    slow = _raw(svc, "POST", "/v1/sessions", json.dumps(body).encode())[1]
    began = time.monotonic()

    async def trickle():
        yield world.overlay.read_bytes()[:10]
        await asyncio.sleep(30)
        yield b""

    async def slow_upload() -> tuple[int, dict]:
        async with svc.client() as c, c._http.put(  # type: ignore[union-attr]
                svc.url + slow["upload"], data=trickle(),
                headers={"Authorization": f"Bearer {slow['token']}"},
                ssl=c.trust.ssl()) as r:
            return r.status, await r.json()

    got, answer = asyncio.run(slow_upload())
    assert got == 408 and "stalled" in answer["error"]["message"], answer
    assert time.monotonic() - began < 20
    # b was never sent: it expires after --negotiate-timeout.
    until("the unsent session to expire",
           lambda: _raw(svc, "GET", f"/v1/sessions/{b['id']}", token=b["token"])[1]["state"]
           == "ended", timeout=30)
    # Through all of it, the good session ran on.
    assert running["pid"] in svc.qemu()
    good.send_signal(signal.SIGINT)
    assert good.wait(timeout=HANG) == 0
    svc.assert_idle()


def test_thousands_of_session_requests_take_only_the_slots(world, serve):
    svc = serve("--slots", "2")
    body, _ = _negotiation(world.overlay)

    async def flood() -> tuple[dict[int, int], list[dict]]:
        counts: dict[int, int] = {}
        made: list[dict] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:
            async def one() -> None:
                async with http.post(svc.url + "/v1/sessions", json=body,
                                     ssl=aiohttp.Fingerprint(bytes.fromhex(
                                         svc.fingerprint.removeprefix("sha256:")))) as r:
                    counts[r.status] = counts.get(r.status, 0) + 1
                    if r.status == 201:
                        made.append(await r.json())
            await asyncio.gather(*(one() for _ in range(2000)))
        return counts, made

    counts, made = asyncio.run(flood())
    assert counts == {201: 2, 503: 1998}, counts
    for session in made:
        assert _raw(svc, "DELETE", f"/v1/sessions/{session['id']}",
                    token=session["token"])[0] == 200
    svc.assert_idle()


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=30),
                    lambda kids: st.lists(kids, max_size=4) |
                    st.dictionaries(st.sampled_from(
                        ["base", "overlay_size", "resources", "forward", "key", "name",
                         "version", "digest", "virtual_size", "memory", "cpus", "key_file",
                         "passphrase"]), kids, max_size=5), max_leaves=12))
def test_any_negotiation_body_gets_a_clear_answer(api, value):
    """Property: whatever JSON a client sends, the answer is 201 or a 4xx refusal with a
    message; never a 500, and never a slot left taken by a refused request."""
    status, answer = api(json.dumps(value).encode())
    assert status in (201, 400, 404, 413), (status, answer)
    if status != 201:
        assert answer["error"]["message"] and answer["error"]["exit_code"] != 1


@pytest.fixture(scope="module")
def api(h, world):
    """One service for the property test, asked directly (no VM is started)."""
    svc = Service(h, world, "--slots", "50", "--negotiate-timeout", "600")
    made: list[dict] = []

    def ask(payload: bytes) -> tuple[int, dict]:
        status, answer = _raw(svc, "POST", "/v1/sessions", payload)
        if status == 201:
            made.append(answer)
            _raw(svc, "DELETE", f"/v1/sessions/{answer['id']}", token=answer["token"])
        return status, answer

    yield ask
    assert svc.info()["slots"]["used"] == 0
    svc.stop()


def test_run_uses_the_bases_boot_settings(h, world):
    """`base add --kernel ...` recorded how the base's VMs start: `run` needs only the
    overlay."""
    serial = world.dir / "run.serial"
    p = subprocess.Popen(vmsynth(h, "run", world.overlay, "--base", "tiny@1", "--accel", "tcg",
                                  "--vnc", "none", "--serial", serial, "--ready", "tick",
                                  "--json"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=world.env())
    assert p.stdout is not None
    ready = next_json(p.stdout)
    assert ready["event"] == "ready" and "resume_seconds" in ready, ready
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=HANG)
    first = next(ln for ln in serial.read_text(errors="replace").splitlines() if ln.strip())
    assert first.strip() == "tick 4", first


def test_the_metrics_page_counts_sessions(world, serve):
    svc = serve()
    p = svc.offload(world.overlay)
    running_event(p)
    status, text = asyncio.run(_text(svc, "/metrics"))
    assert status == 200 and 'vmsynth_sessions{state="running"} 1.0' in text, text
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=HANG) == 0
    status, text = asyncio.run(_text(svc, "/metrics"))
    assert 'vmsynth_sessions_finished_total{outcome="ended"} 1.0' in text, text
    svc.assert_idle()


async def _text(svc: Service, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(
            svc.url + path, ssl=aiohttp.Fingerprint(bytes.fromhex(
                svc.fingerprint.removeprefix("sha256:")))) as r:
        return r.status, await r.text()

