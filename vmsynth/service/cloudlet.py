"""The cloudlet: a user's session from negotiation to wipe (the seed's steps 2 to 7).

    negotiated -> receiving -> starting -> running <-> disconnected -> ending -> ended
         |             |           |                                      (or failed)
         +-------------+-----------+--> failed (a bad upload, a VM that does not start)

The HTTP layer (vmsynth.service.http) only parses requests and calls these methods.
Blocking work runs on threads: synthesis on one pool, everything that starts or stops QEMU
on another whose threads live as long as the service (QEMU is started with a parent-death
signal, which fires when the thread that started it ends). Session state changes only on
the event loop, so admission and state transitions need no locks: N+1 simultaneous requests
for N slots give exactly N sessions.

Soft state: a session's files live in its own directory (vmsynth.session), scrubbed when it
ends however it ends; a killed service leaves directories whose owner is dead, and the next
start scrubs them before it accepts anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmsynth import accel, bases, session
from vmsynth.apply import ApplyReport, apply
from vmsynth.bases import BootConfig
from vmsynth.errors import ExitCode, VmsynthError
from vmsynth.memory import Vmem
from vmsynth.source import Limits
from vmsynth.vm import BootOptions, Machine, ram_bytes

from . import capacity
from .api import VERSION, Negotiation, Refusal, WantedBase
from .capacity import Capacity, Need
from .confine import Cgroups, ConfineError, Group
from .upload import Upload

log = logging.getLogger("vmsynth.service")

ENDED_KEPT = 256  # how many ended sessions' final states are remembered for their clients


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8750
    slots: int | None = None  # a cap; otherwise what CPU, RAM and disk allow
    grace: float = 45.0  # seconds a disconnected user's VM waits for them
    max_overlay: int = 250 << 20
    token: str | None = None  # the operator's bearer token for new sessions
    memory: str = "1G"  # a booted VM's RAM unless the base or the client says otherwise
    cpus: int = 1
    heartbeat: float = 5.0  # WebSocket ping interval: a silent client is noticed in ~1.5x
    negotiate_timeout: float = 60.0  # a negotiated session must start its upload by then
    upload: Limits = field(default_factory=Limits)
    confine: bool = True  # each VM in a cgroup (needs root or a delegated cgroup)
    accel: str = "auto"
    service_id: str = ""
    registry: tuple[str, Any] | None = None  # --registry: (oci://HOST/REPO, its Access)


@dataclass(frozen=True)
class Offer:
    """A cached base this cloudlet serves."""

    spec: str  # NAME@VERSION
    name: str
    version: str
    digest: str
    virtual_size: int
    memory_digest: str | None
    ram_size: int | None  # a memory snapshot's RAM
    boot: BootConfig

    def serves(self, want: WantedBase) -> bool:
        return (self.digest, self.virtual_size) == (want.digest, want.virtual_size) and \
            (want.memory_digest is None or want.memory_digest == self.memory_digest)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest,
                "virtual_size": self.virtual_size, "memory": self.memory_digest is not None,
                "memory_digest": self.memory_digest}


class Session:
    def __init__(self, negotiation: Negotiation, offer: Offer, need: Need, ram: int,
                 cpus: int) -> None:
        self.id = secrets.token_hex(12)
        self.token = secrets.token_urlsafe(32)
        self.negotiation, self.offer, self.need = negotiation, offer, need
        self.ram, self.cpus = ram, cpus
        self.state = "negotiated"
        self.created = time.monotonic()
        self.reason: str | None = None  # why it ended or failed
        self.error: dict[str, Any] | None = None
        self.work: session.Session | None = None  # its private directory
        self.machine: Machine | None = None
        self.group: Group | None = None
        self.vnc_password = secrets.token_urlsafe(6)[:8]  # VNC uses 8 characters
        self.forwards: dict[int, int] = {}  # guest port -> host port
        self.timeline: dict[str, float] = {}
        self.at: dict[str, float] = {}  # wall-clock (epoch) moments, for comparisons across hosts
        self.watchers = 0  # heartbeat connections
        self.grace_task: asyncio.Task[None] | None = None
        self.timer: asyncio.Task[None] | None = None
        self.upload: Upload | None = None
        self.busy: asyncio.Future[Any] | None = None  # synthesis or launch, on a thread
        self.ended = asyncio.Event()
        self.changed = asyncio.Condition()

    def to_json(self, host: str | None = None) -> dict[str, Any]:
        """The session as its user sees it (`host`: the address they reached us on)."""
        out: dict[str, Any] = {"id": self.id, "state": self.state, "base": self.offer.spec,
                               "timeline": {k: round(v, 3) for k, v in self.timeline.items()},
                               "at": {k: round(v, 4) for k, v in self.at.items()}}
        if self.reason:
            out["reason"] = self.reason
        if self.error:
            out["error"] = self.error
        m = self.machine
        if m is not None and self.state in ("running", "disconnected"):
            vnc = m.info().get("vnc")
            out["pid"] = m.proc.pid if m.proc else None
            out["vnc"] = {"host": host or vnc["host"], "port": vnc["port"],
                          "password": self.vnc_password} if vnc else None
            out["forwards"] = {str(g): {"host": host, "port": p}
                               for g, p in self.forwards.items()}
        return out


class Cloudlet:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.ended: deque[dict[str, Any]] = deque(maxlen=ENDED_KEPT)
        self.offers: list[Offer] = []
        self.capacity: Capacity | None = None
        self.cgroups: Cgroups | None = None
        self.started = time.time()
        self.counts: dict[str, int] = {}  # sessions by how they ended
        self.phases: dict[str, list[float]] = {}  # seconds per phase, for /metrics
        self.on_change: list[Callable[[], None]] = []  # free slots changed (advertisement)
        self._synth_pool: ThreadPoolExecutor | None = None
        self._vm_pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fetcher: Any = None  # --registry: fetches a base a client asks for (fetch.py)

    # -- life of the service ----------------------------------------------------------------

    async def start(self) -> None:
        """Before anyone is served: scrub what a dead service left, learn the bases and the
        host's capacity, decide the accelerator once."""
        self._loop = asyncio.get_running_loop()
        scrubbed = await asyncio.to_thread(session.scrub_stale)
        if scrubbed:
            log.warning("scrubbed %d sessions left by a stopped service", len(scrubbed))
        if self.config.confine:
            try:
                self.cgroups = Cgroups()
                self.cgroups.sweep(alive=set())
            except ConfineError as err:
                raise VmsynthError(f"VMs cannot be confined to cgroups here: {err}",
                                   hint="run as root (or with a delegated cgroup), or "
                                        "pass --no-cgroups") from None
        self.offers = await asyncio.to_thread(self._load_offers)
        if self.config.registry is not None:
            from .fetch import Fetcher
            self.fetcher = Fetcher(*self.config.registry, self._reload_offers)
        default = capacity.session_need(ram_bytes(self.config.memory), self.config.cpus,
                                        self.config.max_overlay)
        self.capacity = Capacity.measure(bases.cache_dir("sessions"), default,
                                         self.config.slots)
        slots = max(1, self.capacity.slots)
        self._synth_pool = ThreadPoolExecutor(slots, thread_name_prefix="vmsynth-synth")
        self._vm_pool = ThreadPoolExecutor(slots + 2, thread_name_prefix="vmsynth-vm")
        chosen = await asyncio.to_thread(accel.choose, self.config.accel)
        self.accel = chosen
        log.info("serving %d bases with %d slots (%s)", len(self.offers),
                 self.capacity.slots, chosen.name)

    def _load_offers(self) -> list[Offer]:
        """Every usable cached base, opened once (which also warms its scan cache)."""
        offers = []
        for entry in bases.entries():
            if "damaged" in entry:
                log.warning("not serving %s@%s: %s", entry["name"], entry["version"],
                            entry["damaged"])
                continue
            spec = f"{entry['name']}@{entry['version']}"
            try:
                base = bases.resolve(spec)
            except VmsynthError as err:
                log.warning("not serving %s: %s", spec, err)
                continue
            try:
                mem = base.memory
                offers.append(Offer(spec, base.identity.name, base.identity.version,
                                    base.identity.digest, base.identity.virtual_size,
                                    mem.identity.digest if mem else None,
                                    mem.image.vmem.ram_size if mem else None, base.boot))
            finally:
                base.close()
        return offers

    async def _reload_offers(self) -> None:
        """A base was added (fetched from the registry): serve it too."""
        self.offers = await asyncio.to_thread(self._load_offers)
        self._changed()

    async def close(self) -> None:
        """End every session (VMs stopped, files scrubbed), then stop the pools."""
        if self.fetcher is not None:
            await self.fetcher.close()
        await asyncio.gather(*(self.end(s, "the cloudlet is shutting down")
                               for s in list(self.sessions.values())),
                             return_exceptions=True)
        for pool in (self._synth_pool, self._vm_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def info(self) -> dict[str, Any]:
        assert self.capacity is not None
        return {"api": VERSION, "service_id": self.config.service_id,
                "bases": [o.to_json() for o in self.offers], "slots": self.capacity.to_json(),
                "load": dict(zip(("1m", "5m", "15m"), (round(x, 2) for x in os.getloadavg()),
                                 strict=True)),
                "max_overlay": self.config.max_overlay, "grace": self.config.grace,
                "uptime": round(time.time() - self.started, 1)}

    # -- step 2: negotiation ----------------------------------------------------------------

    def negotiate(self, n: Negotiation) -> Session:
        """A session for this overlay, or a refusal that says why (before any upload).

        Raises:
            Refusal: base not here (404, with the bases this cloudlet has), over budget
                (413), no free slot (503).
        """
        assert self.capacity is not None
        offer = next((o for o in self.offers if o.serves(n.base) and
                      o.spec == n.base.label), None) or \
            next((o for o in self.offers if o.serves(n.base)), None)
        if offer is None and self.fetcher is not None:
            self.fetcher.ask(n.base)  # 202 "fetching" while it comes from the registry
        if offer is None:
            have = ", ".join(o.spec for o in self.offers) or "none"
            raise Refusal(404, ExitCode.BASE_MISMATCH,
                          f"this cloudlet does not have base {n.base.label} "
                          f"({n.base.digest[:19]}...); it has: {have}",
                          "find a cloudlet with that base, or run the overlay elsewhere",
                          bases=[o.to_json() for o in self.offers])
        if n.overlay_size > self.config.max_overlay:
            raise Refusal(413, ExitCode.OVER_BUDGET,
                          f"the overlay is {n.overlay_size:,} bytes, over this cloudlet's "
                          f"budget of {self.config.max_overlay:,}",
                          "make the overlay smaller (`vmsynth inspect` shows where the bytes "
                          "go)")
        ram = offer.ram_size or n.memory or \
            ram_bytes(offer.boot.memory or self.config.memory)
        cpus = n.cpus or offer.boot.cpus or self.config.cpus
        need = capacity.session_need(ram, cpus, n.overlay_size)
        if not self.capacity.admit(need):
            raise Refusal(503, ExitCode.FULL,
                          f"the cloudlet is full ({self.capacity.sessions} of "
                          f"{self.capacity.slots} slots in use)",
                          "try again shortly, or another cloudlet", retry_after=30)
        s = Session(n, offer, need, ram, cpus)
        self.sessions[s.id] = s
        self._changed()
        s.timer = asyncio.get_running_loop().create_task(self._expire_unless_sent(s))
        log.info("session %s: negotiated for %s (%d bytes)", s.id, offer.spec, n.overlay_size)
        return s

    async def _expire_unless_sent(self, s: Session) -> None:
        await asyncio.sleep(self.config.negotiate_timeout)
        if s.state == "negotiated":
            await self.end(s, f"no upload began within {self.config.negotiate_timeout:g} s")

    # -- steps 3 to 5: transfer, synthesis, launch ------------------------------------------

    async def receive(self, s: Session, content: Any, declared: int | None) -> None:
        """Synthesize the session's VM from the upload as it arrives, then start it.

        Raises:
            Refusal: the upload or the VM failed (the session is then ended and scrubbed).
        """
        if s.state != "negotiated":
            raise Refusal(409, ExitCode.USAGE, f"session {s.id} is {s.state}: its overlay "
                                               "was already sent")
        if declared is not None and declared > s.negotiation.overlay_size:
            refusal = Refusal(413, ExitCode.OVER_BUDGET,
                              f"the upload declares {declared:,} bytes, more than the "
                              f"{s.negotiation.overlay_size:,} negotiated")
            s.error = refusal.body()["error"]
            await self.end(s, f"failed: {refusal}", failed=True)
            raise refusal
        loop = asyncio.get_running_loop()
        s.state = "receiving"
        s.upload = Upload(content, loop, s.negotiation.overlay_size, self.config.upload)
        started = time.monotonic()
        try:
            s.busy = loop.run_in_executor(self._synth_pool, self._synthesize, s)
            report = await s.busy
            s.timeline["transfer"] = (s.upload.last or started) - (s.upload.first or started)
            s.at["last_byte"] = time.time() - (time.monotonic() - (s.upload.last or started))
            s.timeline["synthesize"] = time.monotonic() - started
            s.timeline["after_last_byte"] = time.monotonic() - (s.upload.last or started)
            if s.state != "receiving":
                raise Refusal(409, ExitCode.USAGE, f"session {s.id} was ended")
            s.state = "starting"
            launched = time.monotonic()
            s.busy = loop.run_in_executor(self._vm_pool, self._launch, s, report.memory)
            await s.busy
            s.timeline["resume" if report.memory else "boot"] = time.monotonic() - launched
            s.at["running"] = time.time()
        except BaseException as err:
            refusal = Refusal.of(err)
            if refusal.status >= 500:
                log.exception("session %s failed", s.id)
            s.error = refusal.body()["error"]
            await self.end(s, f"failed: {refusal}", failed=True)
            raise refusal from None
        if s.state != "starting":  # ended meanwhile (DELETE, shutdown)
            raise Refusal(409, ExitCode.USAGE, f"session {s.id} was ended")
        await self._set_state(s, "running")
        for phase, seconds in s.timeline.items():
            self.phases.setdefault(phase, []).append(seconds)
        if s.watchers == 0:
            self._start_grace(s)
        loop.create_task(self._watch_vm(s))
        log.info("session %s: running (%s)", s.id, ", ".join(
            f"{k} {v:.2f} s" for k, v in s.timeline.items()))

    def _synthesize(self, s: Session) -> ApplyReport:
        """Worker thread: rebuild the session's disk (and memory) from the upload."""
        s.work = session.new()
        base = bases.resolve(s.offer.spec)  # a shared lock: `base rm` waits for us
        try:
            assert s.upload is not None
            return apply(s.upload, base, s.work.disk, key=s.negotiation.key,  # type: ignore[arg-type]
                         memory_output=s.work.memory, durable=False)
        finally:
            base.close()

    def _launch(self, s: Session, resume: Vmem | None) -> None:
        """VM thread: start QEMU in the session's cgroup, resume or boot, set the VNC
        password. Raises on failure (QEMU is then stopped)."""
        assert s.work is not None
        boot = s.offer.boot
        s.forwards = {port: _free_port(self.config.host) for port in s.negotiation.forwards}
        options = BootOptions(
            disk=s.work.disk, accel=self.accel, memory=f"{s.ram >> 20}M", cpus=s.cpus,
            kernel=boot.kernel, initrd=boot.initrd, append=boot.append, vnc="auto",
            serial_log=s.work.dir / "serial.log", ready=None if resume else boot.ready,
            resume=resume, vnc_host=self.config.host, vnc_password=True,
            forwards=s.forwards, sandbox=True)
        if self.cgroups is not None:
            s.group = self.cgroups.create(s.id, s.cpus, s.ram)
        machine = Machine(options, grace=2.0, on_spawn=s.group.add if s.group else None)
        s.machine = machine
        try:
            machine.start()
            machine.set_vnc_password(s.vnc_password)
            machine.wait_ready()
        except BaseException:
            machine.stop(grace=0)
            raise

    async def _watch_vm(self, s: Session) -> None:
        """A VM that stops by itself (the guest powered off, QEMU died) ends its session."""
        while s.state in ("running", "disconnected"):
            m = s.machine
            if m is None or m.proc is None or m.proc.poll() is not None:
                await self.end(s, "the VM stopped")
                return
            await asyncio.sleep(1.0)

    # -- steps 6 and 7: heartbeat, grace, clean-up ------------------------------------------

    async def attach(self, s: Session) -> None:
        """A heartbeat connection opened: the user is here (again)."""
        s.watchers += 1
        if s.grace_task is not None:
            s.grace_task.cancel()
            s.grace_task = None
        if s.state == "disconnected":
            await self._set_state(s, "running")
            log.info("session %s: the user is back", s.id)

    async def detach(self, s: Session) -> None:
        """A heartbeat connection closed or went silent."""
        s.watchers -= 1
        if s.watchers == 0 and s.state == "running":
            await self._set_state(s, "disconnected")
            self._start_grace(s)
            log.info("session %s: the user is gone; %g s grace", s.id, self.config.grace)

    def _start_grace(self, s: Session) -> None:
        if s.grace_task is None:
            s.grace_task = asyncio.get_running_loop().create_task(self._grace(s))

    async def _grace(self, s: Session) -> None:
        await asyncio.sleep(self.config.grace)
        s.grace_task = None
        await self.end(s, f"the user did not come back within {self.config.grace:g} s")

    async def end(self, s: Session, reason: str, failed: bool = False) -> None:
        """Stop the VM, scrub every file, free the slot; returns when all that is done.
        Ending an ended session just waits for it."""
        if s.state in ("ending", "ended", "failed"):
            await s.ended.wait()
            return
        await self._set_state(s, "ending")
        s.reason = reason
        for task in (s.grace_task, s.timer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        loop = asyncio.get_running_loop()
        if s.busy is not None and not s.busy.done():
            # Synthesis or launch is still at work on a thread: cut it short (the upload
            # stops at once, QEMU is stopped), and let it finish before anything is scrubbed,
            # so no file is written after the scrub.
            if s.upload is not None:
                s.upload.cancel()
            if s.machine is not None:
                await loop.run_in_executor(self._vm_pool, s.machine.stop, 0.0)
            await asyncio.wait([s.busy])
        try:
            await loop.run_in_executor(self._vm_pool, self._teardown, s)
        finally:
            assert self.capacity is not None
            self.capacity.release(s.need)
            self.sessions.pop(s.id, None)
            self._changed()
            outcome = "failed" if failed else "ended"
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            await self._set_state(s, outcome)
            self.ended.append(s.to_json())
            s.ended.set()
            log.info("session %s: %s (%s); scrubbed", s.id, outcome, reason)

    def _teardown(self, s: Session) -> None:
        """VM thread: stop QEMU, scrub the session's files, remove its cgroup."""
        try:
            if s.machine is not None:
                s.machine.stop(grace=0)  # the VM is destroyed: no need to power it down
        finally:
            if s.work is not None:
                session.destroy(s.work)
            if s.group is not None:
                s.group.remove()

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    async def _set_state(self, s: Session, state: str) -> None:
        s.state = state
        async with s.changed:
            s.changed.notify_all()

    # -- looking up sessions ----------------------------------------------------------------

    def find(self, sid: str) -> Session | dict[str, Any]:
        """A live session, or the final state of an ended one."""
        s = self.sessions.get(sid)
        if s is not None:
            return s
        done = next((e for e in self.ended if e["id"] == sid), None)
        if done is None:
            raise Refusal(404, ExitCode.USAGE, f"no session {sid}")
        return done


def _free_port(host: str) -> int:
    """A TCP port nobody listens on now (QEMU binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host if host != "0.0.0.0" else "", 0))
        return int(sock.getsockname()[1])

