#!/usr/bin/env python3
"""End-to-end benchmark: "user arrives -> app running" with the overlay on a throttled link.

    sudo python3 bench/e2e_bench.py [--workdir DIR] [--debian] [--rates 50,1000] [--runs 3]

Two network namespaces joined by a veth pair; a plain HTTP server (python3 -m http.server) in
one serves the overlays, the link from it is limited with tc (tbf) to each rate in turn, and
the client namespace measures, for each workload, RUNS rounds of:

  1. the pure transfer of the overlay's bytes: `curl -s -o /dev/null URL` (curl's time_total);
  2. streaming: `vmsynth run URL --base ... --json`, wall seconds from starting it to its ready
     event on stdout (the app running), with the event's synthesis/resume/ready seconds;
  3. download, then run: `curl -o FILE URL`, then `vmsynth run FILE` (the sum of both walls).

Workloads: the fixture guest (fixtures/build-guest.sh) with a disk + memory overlay made by
fixtures/demo-memory.sh (resumed, ready at its next `tick`) and a disk-only overlay (booted
cold, ready at VMSYNTH-MARKER-END); with --debian also the Debian pair's disk + memory overlay
cached by bench/memory_bench.py (resumed, ready at its next VMSYNTH-ALIVE line).

Writes bench/results-e2e.json (every run) and bench/E2E.md. Needs root (ip netns, tc), curl,
qemu-system-x86 and the vmsynth venv. Namespaces, the server, and every vmsynth and QEMU it
started are gone when it ends, whatever happens (one `error: ...` line and exit 1 on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python -P` (make bench) adds no dir
import disk_bench
from disk_bench import BenchError, exit_on, missing_prerequisite
from memory_bench import assert_no_qemu, qemu_pids

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VMSYNTH = REPO / ".venv" / "bin" / "vmsynth"
DEFAULT_WORKDIR = REPO / ".build" / "bench" / "e2e"
MEMORY_BENCH_DEBIAN = REPO / ".build" / "bench" / "memory" / "debian"
DEBIAN_BASE = REPO / ".build" / "bench" / "debian" / "base.qcow2"
RESULTS = SCRIPT.parent / "results-e2e.json"
REPORT = SCRIPT.parent / "E2E.md"

KiB, MiB = 1 << 10, 1 << 20
SRV_NS, CLI_NS = "vms-srv", "vms-cli"
SRV_IF, CLI_IF = "vms-s", "vms-c"
SRV_IP, CLI_IP = "10.77.0.1", "10.77.0.2"
PORT = 8077
TBF_LATENCY = "50ms"
# TCP payload per Ethernet frame that tbf counts: 1448 bytes of data (MSS with timestamps)
# in 1514 bytes on the wire; the best goodput a tbf rate allows.
PAYLOAD_FRACTION = 1448 / 1514
RATE_OK = (0.80, 1.0)  # measured goodput / set rate: outside this the link is not as set
RATE_CHECK_SECONDS = 3.0  # size of the rate-check file: this many seconds at the set rate
POLL = 0.01  # seconds between looks at a vmsynth's stdout
WIRE_POLL = 0.01  # seconds between looks at the server's transmitted bytes
STOP_TIMEOUT = 60.0  # seconds a vmsynth gets to end after SIGTERM
FIXTURE_APPEND = "console=ttyS0 quiet panic=-1"
TARGET_S = 2.0  # the goal: streaming total within this of the pure transfer at 50 Mbps


def one_line(text: str) -> str:
    """A message on one line (a tool's stderr may hold a traceback)."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*args: str | Path, env: dict | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """A helper command (not measured)."""
    try:
        proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                              check=False, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(map(str, args))} took over {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def file_state(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def in_client(*argv: str | Path) -> list[str]:
    return ["ip", "netns", "exec", CLI_NS, *map(str, argv)]


# ---------------------------------------------------------------------------------------------
# Processes we start: each in its own session, all stopped by pid in cleanup
# ---------------------------------------------------------------------------------------------

class Proc:
    """A background process (stdout and stderr in files); every one started is in Proc.live
    until it has ended and been reaped."""

    live: ClassVar[list[Proc]] = []

    def __init__(self, argv: list[str], env: dict, logs: Path, label: str) -> None:
        self.label = label
        self.out_path, self.err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, start_new_session=True)
        Proc.live.append(self)

    def since(self) -> float:
        return time.perf_counter() - self.t0

    def errors(self) -> str:
        err = self.err_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(err[-3:])

    def fail(self, what: str) -> BenchError:
        err = self.errors()
        return BenchError(f"{self.label}: {what}" + (f": {err}" if err else "")
                          + f" (logs: {self.err_path})")

    def wait_event(self, timeout: float) -> tuple[dict, float]:
        """The first JSON document on stdout (must be the ready event) and the wall seconds
        from starting the process until it was there."""
        deadline = time.perf_counter() + timeout
        decoder = json.JSONDecoder()
        while True:
            text = self.out_path.read_text(errors="replace").lstrip()
            if text:
                with contextlib.suppress(ValueError):
                    event = decoder.raw_decode(text)[0]
                    seen = self.since()
                    if not isinstance(event, dict) or event.get("event") != "ready":
                        raise self.fail(f"printed {text[:300]!r} instead of a ready event")
                    return event, seen
            if self.proc.poll() is not None:
                raise self.fail(f"exited ({self.proc.returncode}) before its ready event")
            if time.perf_counter() > deadline:
                raise self.fail(f"no ready event within {timeout:.0f} s")
            time.sleep(POLL)

    def stop(self, expect: tuple[int, ...], signal_it: bool = True) -> tuple[int, float]:
        """SIGTERM (to this process only: vmsynth stops its own QEMU), or with signal_it=False
        wait for it to end by itself; exit code, seconds."""
        t = time.perf_counter()
        if signal_it and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"still running {STOP_TIMEOUT:.0f} s after SIGTERM (killed)"
                            ) from None
        Proc.live.remove(self)
        if code not in expect:
            raise self.fail(f"exited {code}, expected {' or '.join(map(str, expect))}")
        return code, round(time.perf_counter() - t, 3)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL to its process group (the group is ours: its own session)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            Proc.live.remove(self)


# ---------------------------------------------------------------------------------------------
# The network: two namespaces, a veth pair, tbf on the server's side
# ---------------------------------------------------------------------------------------------

def netns_list() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Network:
    def __init__(self) -> None:
        self.created: list[str] = []

    def up(self) -> dict:
        taken = [n for n in (SRV_NS, CLI_NS) if n in netns_list()]
        if taken:
            raise BenchError(f"network namespace {', '.join(taken)} already exists (left by "
                             f"an earlier run? remove it with `ip netns del NAME`)")
        for ns in (SRV_NS, CLI_NS):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        run("ip", "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF,
            "netns", CLI_NS)
        run("ip", "link", "set", SRV_IF, "netns", SRV_NS)
        for ns, dev, addr in ((SRV_NS, SRV_IF, SRV_IP), (CLI_NS, CLI_IF, CLI_IP)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
        mtu = run("ip", "-n", SRV_NS, "-o", "link", "show", SRV_IF).stdout
        return {"namespaces": [SRV_NS, CLI_NS], "veth": [SRV_IF, CLI_IF],
                "server": f"{SRV_IP}/24 on {SRV_IF} in {SRV_NS}",
                "client": f"{CLI_IP}/24 on {CLI_IF} in {CLI_NS}",
                "mtu": int(m[1]) if (m := re.search(r"mtu (\d+)", mtu)) else None,
                "shaped": f"egress of {SRV_IF} (server -> client: the overlay's direction)"}

    @staticmethod
    def burst(mbit: int) -> str:
        """tbf's bucket: 64 KiB, or one 250 Hz tick's worth of bytes when that is more (at
        1 Gbit/s a 64 KiB bucket holds the goodput to ~760 Mbit/s here)."""
        per_tick = mbit * 1_000_000 // 8 // 250
        return f"{max(64, -(-per_tick // (64 * KiB)) * 64)}kb"

    def shape(self, mbit: int, ns: str = SRV_NS, dev: str = SRV_IF) -> dict:
        """Limit what `dev` in `ns` sends (by default: the server's side, downloads)."""
        cmd = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
               f"{mbit}mbit", "burst", self.burst(mbit), "latency", TBF_LATENCY]
        run(*cmd)
        shown = run("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout.strip()
        if "tbf" not in shown:
            raise BenchError(f"tc did not install tbf on {dev}: {shown}")
        return {"command": " ".join(cmd), "qdisc": shown}

    def down(self) -> list[str]:
        """Delete what we created; what went wrong (nothing, normally)."""
        problems = []
        for ns in reversed(self.created):
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only ours can be in a namespace this run created
                problems.append(f"process {pid} was still in {ns} (killed)")
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2 if problems else 0)
        for ns in reversed(self.created):
            proc = run("ip", "netns", "del", ns, check=False)
            if proc.returncode != 0:
                problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
        self.created.clear()
        left = [n for n in (SRV_NS, CLI_NS) if n in netns_list()]
        if left:
            problems.append(f"namespaces still there: {left}")
        if run("ip", "link", "show", SRV_IF, check=False).returncode == 0:
            run("ip", "link", "del", SRV_IF, check=False)
            problems.append(f"{SRV_IF} was left in the root namespace (deleted)")
        return problems


# ---------------------------------------------------------------------------------------------
# The HTTP server and transfers
# ---------------------------------------------------------------------------------------------

def server_python() -> str:
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def url(name: str) -> str:
    return f"http://{SRV_IP}:{PORT}/{name}"


class Wire:
    """What the server's veth sent, sampled every WIRE_POLL seconds from /proc/<server
    pid>/net/dev (the server's namespace) while a transfer runs: when the first packet (the
    SYN-ACK) and the last data packet left the server. The link has no delay, so that is
    when the client had its first and its last byte."""

    def __init__(self, server_pid: int) -> None:
        self.path = Path(f"/proc/{server_pid}/net/dev")
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tx_bytes(self) -> int:
        for line in self.path.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == SRV_IF:
                return int(rest.split()[8])
        raise BenchError(f"{SRV_IF} is not in {self.path}")

    def start(self) -> None:
        self.samples = [(time.perf_counter(), self.tx_bytes())]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = self.samples[0][1]
        while not self._stop.wait(WIRE_POLL):
            with contextlib.suppress(OSError, BenchError):
                tx = self.tx_bytes()
                if tx != last:
                    self.samples.append((time.perf_counter(), tx))
                    last = tx

    def stop(self, t0: float) -> dict:
        """Times relative to t0 (when the measured command started)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        (_, base), changes = self.samples[0], self.samples[1:]
        if not changes:
            return {"first_packet_s": None, "last_data_s": None, "tx_bytes": 0}
        # Data packets are ~1.5 KB each and come by the dozen between samples; what follows
        # the data is a few bare ACK/FIN packets of 66 bytes.
        data = [t for (t, tx), (_, prev) in zip(changes, [self.samples[0], *changes[:-1]])
                if tx - prev >= 1000]
        return {"first_packet_s": round(changes[0][0] - t0, 3),
                "last_data_s": round((data[-1] if data else changes[-1][0]) - t0, 3),
                "tx_bytes": changes[-1][1] - base, "poll_s": WIRE_POLL}


WIRE: Wire | None = None  # set once the server runs


def start_server(serve: Path, logs: Path) -> Proc:
    (serve / "hello.txt").write_text("hello\n")
    srv = Proc(["ip", "netns", "exec", SRV_NS, server_python(), "-m", "http.server",
                "--bind", SRV_IP, str(PORT), "--directory", str(serve)],
               dict(os.environ), logs, "http-server")
    deadline = time.monotonic() + 15
    while True:
        proc = run(*in_client("curl", "-s", "--max-time", "2", url("hello.txt")), check=False)
        if proc.returncode == 0 and proc.stdout == "hello\n":
            return srv
        if srv.proc.poll() is not None:
            raise srv.fail(f"the HTTP server exited ({srv.proc.returncode})")
        if time.monotonic() > deadline:
            raise srv.fail("the HTTP server did not answer within 15 s")
        time.sleep(0.1)


def curl(name: str, out: str | Path = "/dev/null", timeout: float = 900) -> dict:
    """One transfer in the client namespace: curl's own time_total, and our wall time of the
    whole curl process."""
    load = load1()
    if WIRE:
        WIRE.start()
    t0 = time.perf_counter()
    try:
        proc = run(*in_client("curl", "-sS", "--fail", "-o", out, "-w",
                              "%{time_total} %{size_download} %{time_starttransfer}",
                              url(name)), timeout=timeout)
    finally:
        wire = WIRE.stop(t0) if WIRE else None
    wall = time.perf_counter() - t0
    total, size, first = proc.stdout.split()
    rec = {"time_total_s": round(float(total), 4), "wall_s": round(wall, 4),
           "bytes": int(size), "time_starttransfer_s": round(float(first), 4),
           "goodput_mbit": round(int(size) * 8 / float(total) / 1e6, 2), "load1": load}
    if wire:
        rec["wire"] = wire
        if wire["last_data_s"] is not None:
            rec["wire"]["transfer_s"] = round(wire["last_data_s"] - wire["first_packet_s"], 3)
    return rec


def check_rate(mbit: int, serve: Path, runs: int) -> dict:
    """A plain transfer of random bytes must run at the rate set (less TCP/IP headers)."""
    size = int(min(256 * MiB, max(8 * MiB, mbit * 1e6 / 8 * RATE_CHECK_SECONDS)))
    size -= size % MiB
    name = f"ratecheck-{mbit}.bin"
    path = serve / name
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(size // MiB))
    transfers = [curl(name) for _ in range(runs)]
    for t in transfers:
        if t["bytes"] != size:
            raise BenchError(f"rate check: got {t['bytes']} of {size} bytes")
    goodput = statistics.median(t["goodput_mbit"] for t in transfers)
    ratio = goodput / mbit
    rec = {"file_bytes": size, "transfers": transfers, "goodput_mbit_median": goodput,
           "goodput_vs_rate": round(ratio, 4),
           "best_possible_goodput_mbit": round(mbit * PAYLOAD_FRACTION, 2),
           "accepted_range": list(RATE_OK)}
    if not RATE_OK[0] <= ratio <= RATE_OK[1]:
        raise BenchError(f"the link set to {mbit} Mbit/s carries {goodput:.1f} Mbit/s "
                         f"({ratio:.0%}; accepted {RATE_OK[0]:.0%}-{RATE_OK[1]:.0%})")
    rec["verified"] = True
    return rec


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    key: str
    title: str
    overlay: Path  # served from the serve directory under the name key + ".vmo"
    home: Path  # VMSYNTH_HOME holding base_ref
    base_ref: str
    args: list[str]  # vmsynth run options besides the overlay, --base, --serial and --json
    ready: str
    kind: str  # resume | boot
    check: Callable[[list[str]], str]  # serial lines -> what was checked (raises if wrong)
    timeout: float  # seconds for the VM part (beyond the transfer)
    facts: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"title": self.title, "kind": self.kind, "overlay": str(self.overlay),
                "overlay_bytes": self.overlay.stat().st_size,
                "overlay_sha256": sha256_file(self.overlay), "base": self.base_ref,
                "vmsynth_home": str(self.home), "run_options": self.args,
                "ready": self.ready, **self.facts}


def serial_lines(serial: Path) -> list[str]:
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]


def first_line_is(expected: str) -> Callable[[list[str]], str]:
    def check(lines: list[str]) -> str:
        first = lines[0] if lines else ""
        # A getty prompt may share the line ("vmsynth-app login: VMSYNTH-ALIVE 2").
        if first != expected and not first.endswith(f" {expected}"):
            raise BenchError(f"the first console line after the resume is {first!r}, "
                             f"not {expected!r}")
        return f"first console line {first!r}"
    return check


def marker_is(expected: str) -> Callable[[list[str]], str]:
    def check(lines: list[str]) -> str:
        if "VMSYNTH-MARKER-BEGIN" not in lines or "VMSYNTH-MARKER-END" not in lines:
            raise BenchError(f"no marker on the console: {lines[-5:]}")
        got = lines[lines.index("VMSYNTH-MARKER-BEGIN") + 1:lines.index("VMSYNTH-MARKER-END")]
        if got != [expected]:
            raise BenchError(f"the booted disk's marker is {got!r}, not {[expected]!r}")
        return f"marker {expected!r}"
    return check


def fixture_workloads(work: Path, tmp: Path) -> list[Workload]:
    d = work / "fixture"
    d.mkdir(parents=True, exist_ok=True)
    log(f"the fixture guest in {d} (fixtures/build-guest.sh; quick when up to date)")
    run("bash", REPO / "fixtures" / "build-guest.sh", d, timeout=1800)
    home = d / "home"
    demo = REPO / "fixtures" / "demo-memory.sh"
    stamp = d / "e2e-stamp.json"
    inputs = {"images": [file_state(d / n) for n in ("vmlinux", "initramfs.cpio.gz",
                                                      "base.qcow2", "app.qcow2")],
              "demo_memory_sh": sha256_file(demo),
              "vmsynth": run(VMSYNTH, "--version").stdout.strip(),
              "git_head": run("git", "-C", REPO, "rev-parse", "HEAD", check=False).stdout.strip()}
    outputs = ("app-mem.vmo", "app.vmo", "app-run.qcow2.serial")
    env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(home))
    cached = False
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        old = json.loads(stamp.read_text())
        cached = old["inputs"] == inputs and all(
            file_state(d / n) == old["outputs"][n] for n in outputs)
    if cached:
        log("  reusing the overlays made earlier (e2e-stamp.json)")
    else:
        log("  fixtures/demo-memory.sh: snapshot base and app, create the disk + memory overlay")
        stamp.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        for n in outputs:
            (d / n).unlink(missing_ok=True)
        proc = run("bash", demo, d, VMSYNTH, env=env, check=False, timeout=900)
        (d / "demo-memory.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BenchError(f"fixtures/demo-memory.sh {d} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-800:]}")
        assert_no_qemu(tmp)
        log("  vmsynth create --base demo-base@1.1 --disk app.qcow2 -o app.vmo (disk only)")
        run(VMSYNTH, "create", "--base", "demo-base@1.1", "--disk", d / "app.qcow2",
            "-o", d / "app.vmo", "--json", env=env)
        for n in ("app-mem.vmo", "app.vmo"):
            run(VMSYNTH, "verify", d / n, "--base", "demo-base@1.1", "--json", env=env)
        stamp.write_text(json.dumps({"inputs": inputs, "outputs": {
            n: file_state(d / n) for n in outputs}}, indent=2) + "\n")
    ticks = [int(m[1]) for ln in serial_lines(d / "app-run.qcow2.serial")
             if (m := re.fullmatch(r"tick (\d+)", ln))]
    if not ticks:
        raise BenchError(f"{d / 'app-run.qcow2.serial'} has no `tick N` line")
    common = ["--kernel", str(d / "kernel"), "--initrd", str(d / "initramfs.cpio.gz"),
              "--memory", "256M", "--vnc", "none", "--accel", "tcg", "--grace", "1"]
    facts = {"kernel_release": (d / "kernel.release").read_text().strip()
             if (d / "kernel.release").exists() else "?",
             "made_by": "fixtures/build-guest.sh + fixtures/demo-memory.sh"}
    return [
        Workload(key="fixture-mem",
                 title="fixture guest, disk + memory overlay, resumed (256 MiB RAM)",
                 overlay=d / "app-mem.vmo", home=home, base_ref="demo-base@1.1",
                 args=[*common, "--append", f"{FIXTURE_APPEND} vmsynth.mode=counter",
                       "--ready", "tick"],
                 ready="tick", kind="resume", check=first_line_is(f"tick {ticks[-1] + 1}"),
                 timeout=120, facts=facts | {"last_line_before_snapshot": f"tick {ticks[-1]}"}),
        Workload(key="fixture-disk",
                 title="fixture guest, disk-only overlay, cold boot (256 MiB RAM)",
                 overlay=d / "app.vmo", home=home, base_ref="demo-base@1.1",
                 args=[*common, "--append", FIXTURE_APPEND, "--ready", "VMSYNTH-MARKER-END"],
                 ready="VMSYNTH-MARKER-END", kind="boot",
                 check=marker_is("customized by vmsynth fixtures"), timeout=180, facts=facts),
    ]


def option(args: list[str], name: str) -> str:
    try:
        return args[args.index(name) + 1]
    except (ValueError, IndexError):
        raise BenchError(f"the Debian snapshots' boot options have no {name}: {args}") from None


def debian_workload(work: Path, tmp: Path) -> Workload:
    """The disk + memory overlay bench/memory_bench.py made of the Debian pair, resumed.

    Its files are hard-linked (a later memory_bench run replaces, rather than rewrites, them)
    and its base added to a VMSYNTH_HOME of our own, so the two benchmarks never share a
    session directory or a base cache."""
    src = MEMORY_BENCH_DEBIAN
    stamp_src, vmo_src = src / "snapshots" / "stamp.json", src / "out" / "full_l3.vmo"
    vmem_src = src / "snapshots" / "base.vmem"
    missing = [p for p in (stamp_src, vmo_src, vmem_src, DEBIAN_BASE) if not p.exists()]
    if missing:
        raise BenchError(f"--debian: {', '.join(map(str, missing))} not there (made by "
                         "bench/memory_bench.py --only debian; this script does not build them)")
    if vmo_src.stat().st_mtime < vmem_src.stat().st_mtime:
        raise BenchError(f"--debian: {vmo_src} is older than {vmem_src} (memory_bench.py is "
                         "taking new snapshots? try again when it has made its overlays)")
    info = json.loads(stamp_src.read_text())
    app_args = info["inputs"]["app_args"]
    last = int(info["last_heartbeat"])
    alive = info["inputs"]["snapshot_at"].rsplit(" ", 1)[0]  # "VMSYNTH-ALIVE"
    d = work / "debian"
    d.mkdir(parents=True, exist_ok=True)
    home = d / "home"
    vmo, vmem = d / "app-mem.vmo", d / "base.vmem"
    sources = {"overlay": file_state(vmo_src), "base_vmem": file_state(vmem_src),
               "base": file_state(DEBIAN_BASE), "snapshots_taken_at": info["taken_at"]}
    stamp = d / "e2e-stamp.json"
    cached = False
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(stamp.read_text())["sources"] == sources and vmo.exists() \
            and vmem.exists() and vmo.stat().st_ino == vmo_src.stat().st_ino \
            and vmem.stat().st_ino == vmem_src.stat().st_ino
    env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(home))
    if cached:
        log(f"the Debian pair: reusing {d} (e2e-stamp.json)")
    else:
        log(f"the Debian pair: linking memory_bench's overlay and base snapshot into {d}, "
            "adding the base to our own VMSYNTH_HOME")
        stamp.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        for dst, s in ((vmo, vmo_src), (vmem, vmem_src)):
            dst.unlink(missing_ok=True)
            try:
                os.link(s, dst)
            except OSError:
                shutil.copyfile(s, dst)
        t = time.monotonic()
        run(VMSYNTH, "base", "add", DEBIAN_BASE, "--memory", vmem, "--name", "e2e-debian",
            "--version", "1", "--json", env=env, timeout=1800)
        log(f"  base add: {time.monotonic() - t:.0f} s; vmsynth verify of the overlay")
        run(VMSYNTH, "verify", vmo, "--base", "e2e-debian@1", "--json", env=env, timeout=1800)
        stamp.write_text(json.dumps({"sources": sources}, indent=2) + "\n")
    args = ["--kernel", option(app_args, "--kernel"), "--initrd", option(app_args, "--initrd"),
            "--append", option(app_args, "--append"), "--vnc", "none", "--accel", "tcg",
            "--grace", "1", "--timeout", "300", "--ready", alive]
    return Workload(
        key="debian-mem",
        title="Debian 12 pair (systemd, python3 app with numpy/pandas), disk + memory overlay, "
              "resumed (1 GiB RAM)",
        overlay=vmo, home=home, base_ref="e2e-debian@1", args=args, ready=alive,
        kind="resume", check=first_line_is(f"{alive} {last + 1}"), timeout=420,
        facts={"made_by": "bench/memory_bench.py (its out/full_l3.vmo: level 3)",
               "sources": sources, "last_line_before_snapshot": f"{alive} {last}"})


# ---------------------------------------------------------------------------------------------
# One `vmsynth run`
# ---------------------------------------------------------------------------------------------

def vmsynth_run(w: Workload, source: str, env: dict, tmp: Path, logs: Path, label: str,
                timeout: float) -> dict:
    """`vmsynth run SOURCE` in the client namespace until its ready event; then SIGTERM (a
    guest that powers off by itself may have ended already). Checks the console, that the
    session was scrubbed and that no QEMU is left."""
    serial = logs / f"{label}.serial.log"
    serial.unlink(missing_ok=True)
    argv = in_client(VMSYNTH, "run", source, "--base", w.base_ref, *w.args,
                     "--serial", serial, "--json")
    load = load1()
    networked = WIRE is not None and source.startswith("http")
    if networked:
        WIRE.start()
    p = Proc(argv, env, logs, label)
    try:
        event, seen = p.wait_event(timeout)
    except BaseException:
        p.kill()
        raise
    finally:
        wire = WIRE.stop(p.t0) if networked else None
    # A guest that powers off by itself is left to do so: a SIGTERM that arrives while
    # vmsynth scrubs the ended session kills it half-way (see E2E.md).
    code, stop_s = p.stop(expect=(143,) if w.kind == "resume" else (0,),
                          signal_it=w.kind == "resume")
    try:
        checked = w.check(serial_lines(serial))
    except BenchError as err:
        raise BenchError(f"{label}: {err} (serial log {serial})") from None
    sessions = w.home / "sessions"
    left = sorted(sessions.iterdir()) if sessions.exists() else []
    if left:
        raise BenchError(f"{label}: vmsynth run left its session behind: {left}")
    assert_no_qemu(tmp)
    rec = {"wall_to_ready_event_s": round(seen, 3), "load1": load, "exit": code,
           "stop_s": stop_s, "checked": checked}
    for k in ("synthesis_seconds", "resume_seconds", "ready_seconds"):
        if k in event:
            rec[k] = event[k]
    # When QEMU was running the guest (resumed, or starting to boot): the ready event minus
    # the wait for the ready text.
    rec["wall_to_vm_running_s"] = round(seen - event["ready_seconds"], 3)
    if wire and wire["last_data_s"] is not None:
        # the overlay's own transfer inside the streaming run, and what came before and after
        wire["transfer_s"] = round(wire["last_data_s"] - wire["first_packet_s"], 3)
        wire["last_data_to_vm_running_s"] = round(rec["wall_to_vm_running_s"]
                                                  - wire["last_data_s"], 3)
        rec["wire"] = wire
    return rec


def measure_rate(mbit: int, workloads: list[Workload], runs: int, tmp: Path, logs: Path,
                 client_dir: Path) -> dict:
    out: dict = {}
    for w in workloads:
        size = w.overlay.stat().st_size
        wire_s = size * 8 / (mbit * 1e6 * PAYLOAD_FRACTION)
        timeout = wire_s * 1.5 + w.timeout
        env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(w.home))
        name = f"{w.key}.vmo"
        rec: dict = {"overlay_bytes": size, "runs": []}
        out[w.key] = rec
        log(f"  {w.key}: {size / MiB:.2f} MiB overlay, {runs} rounds")
        for i in range(runs):
            r: dict = {"round": i + 1}
            # (1) the bytes alone
            r["transfer"] = t = curl(name, timeout=timeout)
            if t["bytes"] != size:
                raise BenchError(f"{w.key}: transferred {t['bytes']} of {size} bytes")
            # (2) streaming: run straight from the URL
            r["stream"] = s = vmsynth_run(w, url(name), env, tmp, logs,
                                          f"{mbit}M-{w.key}-stream.{i}", timeout)
            # (3) download to a file, then run the file
            dl = client_dir / name
            dl.unlink(missing_ok=True)
            d = curl(name, out=dl, timeout=timeout)
            if dl.stat().st_size != size:
                raise BenchError(f"{w.key}: downloaded {dl.stat().st_size} of {size} bytes")
            f = vmsynth_run(w, str(dl), env, tmp, logs, f"{mbit}M-{w.key}-file.{i}", timeout)
            dl.unlink()
            r["download_then_run"] = {
                "download": d, "run": f,
                "total_s": round(d["wall_s"] + f["wall_to_ready_event_s"], 3)}
            rec["runs"].append(r)
            log(f"    round {i + 1}: transfer {t['time_total_s']:.2f} s | streaming run "
                f"{s['wall_to_ready_event_s']:.2f} s (synthesis {s['synthesis_seconds']:.2f}, "
                f"resume {s.get('resume_seconds', 0):.2f}, ready text "
                f"{s['ready_seconds']:.2f}) | download {d['wall_s']:.2f} + run "
                f"{f['wall_to_ready_event_s']:.2f} = "
                f"{r['download_then_run']['total_s']:.2f} s | load {s['load1']:.1f}")
        rec["median"] = medians(rec["runs"])
    return out


def medians(runs: list[dict]) -> dict:
    def col(get: Callable[[dict], float | None]) -> dict | None:
        vals = [v for r in runs if (v := get(r)) is not None]
        if not vals:
            return None
        return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
                "max": round(max(vals), 3)}

    m = {
        "transfer_s": col(lambda r: r["transfer"]["time_total_s"]),
        "transfer_goodput_mbit": col(lambda r: r["transfer"]["goodput_mbit"]),
        "stream_s": col(lambda r: r["stream"]["wall_to_ready_event_s"]),
        "stream_synthesis_s": col(lambda r: r["stream"]["synthesis_seconds"]),
        "stream_resume_s": col(lambda r: r["stream"].get("resume_seconds")),
        "stream_ready_text_s": col(lambda r: r["stream"]["ready_seconds"]),
        "stream_vm_running_s": col(lambda r: r["stream"]["wall_to_vm_running_s"]),
        "download_s": col(lambda r: r["download_then_run"]["download"]["wall_s"]),
        "file_run_s": col(lambda r: r["download_then_run"]["run"]["wall_to_ready_event_s"]),
        "file_synthesis_s": col(lambda r: r["download_then_run"]["run"]["synthesis_seconds"]),
        "download_then_run_s": col(lambda r: r["download_then_run"]["total_s"]),
        # per round, so the differences pair runs taken under the same load
        "stream_minus_transfer_s": col(lambda r: r["stream"]["wall_to_ready_event_s"]
                                       - r["transfer"]["time_total_s"]),
        "stream_vm_running_minus_transfer_s": col(
            lambda r: r["stream"]["wall_to_vm_running_s"] - r["transfer"]["time_total_s"]),
        "stream_synthesis_minus_transfer_s": col(
            lambda r: r["stream"]["synthesis_seconds"] - r["transfer"]["time_total_s"]),
        "download_then_run_minus_transfer_s": col(
            lambda r: r["download_then_run"]["total_s"] - r["transfer"]["time_total_s"]),
        "load1": col(lambda r: r["stream"]["load1"]),
        # from the server's transmitted bytes (Wire)
        "transfer_wire_s": col(lambda r: r["transfer"].get("wire", {}).get("transfer_s")),
        "stream_first_packet_s": col(lambda r: r["stream"].get("wire", {}).get(
            "first_packet_s")),
        "stream_wire_s": col(lambda r: r["stream"].get("wire", {}).get("transfer_s")),
        "stream_wire_minus_transfer_wire_s": col(
            lambda r: r["stream"]["wire"]["transfer_s"] - r["transfer"]["wire"]["transfer_s"]
            if "transfer_s" in r["stream"].get("wire", {})
            and "transfer_s" in r["transfer"].get("wire", {}) else None),
        "stream_last_data_to_vm_running_s": col(lambda r: r["stream"].get("wire", {}).get(
            "last_data_to_vm_running_s")),
    }
    return m


# ---------------------------------------------------------------------------------------------
# Facts about the machine and the code
# ---------------------------------------------------------------------------------------------

def first_line(*cmd: str | Path) -> str:
    proc = run(*cmd, check=False)
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "?"


def versions() -> dict:
    return {
        "vmsynth": first_line(VMSYNTH, "--version").replace(", version", ""),
        "vmsynth_python": first_line(REPO / ".venv" / "bin" / "python", "--version"),
        "qemu-system": first_line("qemu-system-x86_64", "--version").replace(" version", ""),
        "qemu-img": first_line("qemu-img", "--version").replace(" version", ""),
        "curl": " ".join(first_line("curl", "--version").split()[:2]),
        "iproute2": first_line("ip", "-V"),
        "http_server_python": first_line(server_python(), "--version"),
    }


def git_state() -> dict:
    head = run("git", "-C", REPO, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = run("git", "-C", REPO, "status", "--porcelain", "--", "vmsynth", "cli", "formats",
                check=False).stdout.splitlines()
    dirty = [line[3:] for line in dirty if line.strip()]
    return {"head": head, "dirty_files": dirty,
            "describe": f"commit {head}" + (f" plus uncommitted changes to {', '.join(dirty)}"
                                            if dirty else "")}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def cell(m: dict | None, digits: int = 2) -> str:
    if not m:
        return "—"
    if m["min"] == m["max"]:
        return f"{m['median']:.{digits}f}"
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}–{m['max']:.{digits}f})"


def size_text(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n < 100 * MiB else f"{n / MiB:.0f} MiB"


def write_markdown(path: Path, data: dict) -> None:
    meta, v = data["meta"], data["meta"]["versions"]
    mc = meta["machine"]
    loads = [r["stream"]["load1"] for rate in data["rates"].values()
             for w in rate["workloads"].values() for r in w["runs"]]
    L = ["## End to end: user arrives -> app running, overlay over a throttled link",
         "",
         (f"Measured {meta['date']} on {mc['cpu']} ({mc['cores']} cores, {mc['mem_gib']} GiB, "
          f"{mc['distro']}, kernel {mc['kernel']}), VMs under TCG (KVM does not work on this "
          f"host). {v['vmsynth']}, {v['qemu-system']}, {v['curl']}, "
          f"{v['http_server_python']} `http.server`; vmsynth code: {meta['git']['describe']}"
          + (f" (at the end: {meta['git_at_end']['describe']})"
             if meta["git_at_end"] != meta["git"] else "") + ". "
          f"Command: `{meta['command']}` ({meta['total_seconds'] / 60:.0f} min). The machine "
          f"was shared with another CPU-heavy benchmark: 1-minute load average "
          f"{min(loads):.1f}–{max(loads):.1f} at the start of the runs (2 cores; "
          f"{meta['loadavg_before'][0]:.1f} before, {meta['loadavg_after'][0]:.1f} after). "
          "Every run is in bench/results-e2e.json."),
         "",
         ("**Set-up.** Two network namespaces joined by a veth pair "
          f"({SRV_IP}/24 server, {CLI_IP}/24 client, MTU {data['network']['mtu']}, no added "
          "delay); `tc qdisc replace dev <server veth> root tbf rate R burst B latency "
          f"{TBF_LATENCY}` shapes the server's egress (the overlay's direction), B = 64 KiB "
          "or a 250 Hz tick's worth of bytes when larger (512 KiB at 1 Gbit/s). The server is "
          f"`python3 -m http.server --bind {SRV_IP}` in the server namespace; `curl` and "
          "`vmsynth` run in the client namespace (`ip netns exec`). Each rate is verified "
          "with a plain `curl` of random bytes first:"),
         "",
         ("| rate set | check file | goodput measured (median) | best possible (1448/1514 "
          "payload per frame) | measured / set |"),
         "|---:|---:|---:|---:|---:|"]
    for mbit, rate in data["rates"].items():
        c = rate["rate_check"]
        L.append(f"| {mbit} Mbit/s | {size_text(c['file_bytes'])} | "
                 f"{c['goodput_mbit_median']:.1f} Mbit/s | "
                 f"{c['best_possible_goodput_mbit']:.1f} Mbit/s | {c['goodput_vs_rate']:.1%} |")
    L += ["",
          "**Workloads.**"]
    for key, w in data["workloads"].items():
        L.append(f"- `{key}`: {w['title']}; {size_text(w['overlay_bytes'])} overlay made by "
                 f"{w['made_by']}; ready text `{w['ready']}`"
                 + (f", last console line before the snapshot `{w['last_line_before_snapshot']}`"
                    if w.get("last_line_before_snapshot") else "") + ".")
    L += ["",
          (f"**Method.** Per rate and workload, {meta['runs']} rounds of: (1) pure transfer, "
           "`curl -s -o /dev/null URL` (curl's `time_total`); (2) streaming, `vmsynth run URL "
           "--base B <boot options> --ready TEXT --json`: wall seconds from starting the "
           "process to its ready event on stdout, with the event's `synthesis_seconds` (from "
           "the start of `run` until disk and memory are rebuilt, i.e. until the last byte "
           "arrived and was written), `resume_seconds` (QEMU loading the device state) and "
           "`ready_seconds` (QEMU started or resumed -> ready text on the console); "
           "(3) download, then run: `curl -o FILE URL`, then `vmsynth run FILE` (the same "
           "options), both walls added. Medians, min–max in brackets. After the ready event "
           "a resumed VM's vmsynth gets SIGTERM (exit 143); the disk-only guest powers off "
           "by itself after its marker (exit 0; not signalled: a SIGTERM then would be held "
           "until vmsynth has scrubbed the ended session). Each run is checked: the resumed "
           "guest's first console line "
           "is the one after the last line before its snapshot; the cold-booted disk prints "
           "the app's marker; the session directory was scrubbed; no QEMU is left. "
           "\"VM running\" is the ready event minus `ready_seconds`: when the resumed guest "
           "was running again (or QEMU started booting). Both resumed guests print a line once a "
           "second and were snapshotted just after printing one, so their next line (the "
           "ready text) comes ~0.8-1 s after the resume: guest time that neither transfer nor "
           "synthesis can shorten."),
          ""]
    for mbit, rate in data["rates"].items():
        L += [f"### {mbit} Mbit/s",
              "",
              ("| workload | overlay | pure transfer s | streaming run s | of which synthesis "
               "s | VM running at s | download then run s | streaming − transfer s | "
               "VM running − transfer s | download then run − transfer s | load (1 min) |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, w in rate["workloads"].items():
            m = w["median"]
            L.append(f"| {key} | {size_text(w['overlay_bytes'])} | {cell(m['transfer_s'])} | "
                     f"{cell(m['stream_s'])} | {cell(m['stream_synthesis_s'])} | "
                     f"{cell(m['stream_vm_running_s'])} | {cell(m['download_then_run_s'])} | "
                     f"{cell(m['stream_minus_transfer_s'])} | "
                     f"{cell(m['stream_vm_running_minus_transfer_s'])} | "
                     f"{cell(m['download_then_run_minus_transfer_s'])} | "
                     f"{cell(m['load1'], 1)} |")
        L += ["",
              ("Inside the streaming run, from the bytes the server's veth sent (sampled every "
               f"{WIRE_POLL * 1000:.0f} ms): when the connection opened, how long the overlay's "
               "bytes took on the wire compared with the pure transfer's, and what followed "
               "the last byte until the VM ran:"),
              "",
              ("| workload | connection opened at s | overlay on the wire s | pure transfer on "
               "the wire s | difference s | last byte -> VM running s |"),
              "|---|---:|---:|---:|---:|---:|"]
        for key, w in rate["workloads"].items():
            m = w["median"]
            L.append(f"| {key} | {cell(m['stream_first_packet_s'])} | "
                     f"{cell(m['stream_wire_s'])} | {cell(m['transfer_wire_s'])} | "
                     f"{cell(m['stream_wire_minus_transfer_wire_s'])} | "
                     f"{cell(m['stream_last_data_to_vm_running_s'])} |")
        L.append("")
        for key, w in rate["workloads"].items():
            m = w["median"]
            gain = m["download_then_run_s"]["median"] - m["stream_s"]["median"]
            L.append(f"- {key}: streaming reaches the ready text {abs(gain):.2f} s "
                     f"{'sooner' if gain >= 0 else 'later'} than download-then-run (medians).")
        for key, w in rate["workloads"].items():
            m = w["median"]
            L.append(f"- {key}: resume {cell(m['stream_resume_s'])} s, ready text "
                     f"{cell(m['stream_ready_text_s'])} s after QEMU started/resumed; "
                     f"`vmsynth run FILE` alone {cell(m['file_run_s'])} s "
                     f"(synthesis {cell(m['file_synthesis_s'])} s)."
                     if m["stream_resume_s"] else
                     f"- {key}: cold boot to the ready text {cell(m['stream_ready_text_s'])} s "
                     f"after QEMU started; `vmsynth run FILE` alone {cell(m['file_run_s'])} s "
                     f"(synthesis {cell(m['file_synthesis_s'])} s).")
        L.append("")
    t = data.get("target")
    if t:
        L += [f"**Target** (streaming total within {TARGET_S:.0f} s of the pure transfer at "
              f"{t['rate_mbit']} Mbit/s): "
              + "; ".join(f"{k}: {x['stream_minus_transfer_s']:.2f} s, "
                          f"{'met' if x['met'] else 'not met'} (VM running "
                          f"{x['vm_running_minus_transfer_s']:.2f} s after the transfer's end"
                          + ("; a cold boot: the rest is the guest booting under TCG"
                             if data["workloads"][k]["kind"] == "boot" else "") + ")"
                          for k, x in t["workloads"].items()) + ".", ""]
    if data.get("debian_note"):
        L += [data["debian_note"], ""]
    path.write_text("\n".join(L))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_rates(text: str) -> list[int]:
    try:
        rates = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of Mbit/s: {text!r}") from None
    if not rates or any(r <= 0 or r > 100_000 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be 1..100000 Mbit/s: {text!r}")
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"guest, overlays and logs (default {DEFAULT_WORKDIR})")
    ap.add_argument("--debian", action="store_true",
                    help="also the Debian pair's overlay cached by bench/memory_bench.py")
    ap.add_argument("--rates", type=parse_rates, default=[50, 1000],
                    help="link rates in Mbit/s, comma-separated (default 50,1000)")
    ap.add_argument("--runs", type=int, default=3, help="rounds per rate and workload")
    args = ap.parse_args()

    why = missing_prerequisite("e2e_bench.py", "ip netns, tc",
                               ("ip", "tc", "curl", "qemu-system-x86_64", "qemu-img"),
                               "iproute2 curl qemu-system-x86 qemu-utils")
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 1

    global WIRE  # one HTTP server per run: its transmitted bytes
    exit_on(signal.SIGTERM, signal.SIGHUP)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Short: QMP socket paths (in vmsynth's run directories under TMPDIR) must stay < 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="vme-", dir="/tmp"))
    logs, serve, client_dir = work / "logs", work / "serve", work / "client"
    for d in (logs, serve, client_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    git_at_start = git_state()
    net = Network()
    code = 0
    try:
        workloads = fixture_workloads(work, tmp)
        debian_note = None
        if args.debian:
            workloads.append(debian_workload(work, tmp))
        elif not (MEMORY_BENCH_DEBIAN / "out" / "full_l3.vmo").exists():
            debian_note = ("The Debian pair was not measured: bench/memory_bench.py had not "
                           "made its overlay yet (`--debian` measures it).")
        else:
            debian_note = "The Debian pair was not measured in this run (`--debian`)."
        for w in workloads:
            os.link(w.overlay, serve / f"{w.key}.vmo")
        described = {w.key: w.describe() for w in workloads}

        log("warm-up: one `vmsynth run FILE` of each workload (page cache, base indexes; not "
            "measured)")
        warmups = {}
        for w in workloads:
            env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(w.home))
            # outside the namespaces: nothing to do with the network yet
            serial = logs / f"warmup-{w.key}.serial.log"
            p = Proc([str(VMSYNTH), "run", str(w.overlay), "--base", w.base_ref, *w.args,
                      "--serial", str(serial), "--json"], env, logs, f"warmup-{w.key}")
            event, seen = p.wait_event(w.timeout + 60)
            p.stop(expect=(143,) if w.kind == "resume" else (0,), signal_it=w.kind == "resume")
            w.check(serial_lines(serial))
            assert_no_qemu(tmp)
            warmups[w.key] = {"wall_to_ready_event_s": round(seen, 3), "event": event}
            log(f"  {w.key}: ready event after {seen:.2f} s "
                f"(synthesis {event['synthesis_seconds']:.2f} s)")

        log(f"network: namespaces {SRV_NS} and {CLI_NS}, veth {SRV_IF}/{CLI_IF}")
        network = net.up()
        server = start_server(serve, logs)
        WIRE = Wire(server.proc.pid)
        WIRE.tx_bytes()  # the server's namespace is readable (fails early otherwise)
        rates: dict = {}
        for mbit in args.rates:
            log(f"== {mbit} Mbit/s")
            shaped = net.shape(mbit)
            check = check_rate(mbit, serve, runs=2)
            log(f"  rate check: {check['goodput_mbit_median']:.1f} Mbit/s of goodput "
                f"({check['goodput_vs_rate']:.1%} of the rate set)")
            rates[str(mbit)] = {"rate_mbit": mbit, "tc": shaped, "rate_check": check,
                                "workloads": measure_rate(mbit, workloads, args.runs, tmp,
                                                          logs, client_dir)}
            (serve / f"ratecheck-{mbit}.bin").unlink(missing_ok=True)
        server.stop(expect=(0, -signal.SIGTERM, 128 + signal.SIGTERM))
        problems = net.down()
        if problems:
            raise BenchError("; ".join(problems))

        target = None
        if "50" in rates:
            target = {"rate_mbit": 50, "limit_s": TARGET_S, "workloads": {}}
            for key, w in rates["50"]["workloads"].items():
                m = w["median"]
                target["workloads"][key] = {
                    "stream_minus_transfer_s": m["stream_minus_transfer_s"]["median"],
                    "vm_running_minus_transfer_s":
                        m["stream_vm_running_minus_transfer_s"]["median"],
                    "met": m["stream_minus_transfer_s"]["median"] <= TARGET_S}
        argv = " ".join(sys.argv[1:])
        data = {
            "meta": {"date": dt.datetime.now().isoformat(timespec="seconds"),
                     "command": f"sudo python3 bench/e2e_bench.py {argv}".strip(),
                     "workdir": str(work), "runs": args.runs, "accel": "tcg",
                     "total_seconds": round(time.monotonic() - started, 1),
                     "loadavg_before": load_before,
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                     "machine": disk_bench.machine(), "versions": versions(), "git": git_at_start,
                     "git_at_end": git_state()},
            "network": network | {"port": PORT, "server": f"{server_python()} -m http.server",
                                  "tbf_latency": TBF_LATENCY},
            "workloads": described,
            "warmup": warmups,
            "rates": rates,
            "target": target,
            "debian_note": debian_note,
        }
        RESULTS.write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(REPORT, data)
        log(f"wrote {RESULTS} and {REPORT}; total {time.monotonic() - started:.0f} s")
    except BenchError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 1
    except SystemExit as err:
        print(f"error: terminated (signal {(err.code or 129) - 128})", file=sys.stderr)
        code = 1
    except Exception as err:  # noqa: BLE001 (one error line, whatever went wrong)
        print(f"error: {type(err).__name__}: {one_line(str(err))}", file=sys.stderr)
        code = 1
    finally:
        problems = []
        for p in list(Proc.live):
            if p.label != "http-server":
                problems.append(f"{p.label} (pid {p.proc.pid}) was still running")
            p.kill()
        for pid in qemu_pids(tmp):
            problems.append(f"QEMU {pid} was still running")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        problems += net.down()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(client_dir, ignore_errors=True)
        for f in serve.glob("ratecheck-*.bin"):
            f.unlink()
        if problems and code == 0:
            print(f"error: left behind and cleaned up: {one_line('; '.join(problems))}",
                  file=sys.stderr)
            code = 1
        elif problems:
            log(f"cleaned up: {'; '.join(problems)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
