#!/usr/bin/env python3
"""Memory benchmark: vmsynth overlays with memory snapshots against zstd and xdelta3, and
resuming a VM from an overlay against booting it cold.

    sudo /work/main/.venv/bin/python bench/memory_bench.py [--workdir DIR] [--only GUEST]
                                                           [--quick] [--rebuild]

For each guest (the tiny fixture VM with 256 MiB of RAM, and the Debian 12 pair of
bench/debian_guest.py with 1 GiB) it snapshots the base VM in its ready state and the app VM
while its app runs (cached between runs), then measures, each command as its own subprocess
(wall time, and peak RSS from os.wait4 through disk_bench's helpers): `vmsynth create` with
disk and memory, `vmsynth apply` (every rebuilt disk compared with qemu-img, every rebuilt
memory snapshot with cmp), a memory-only overlay, and the peers on the same memory pair
(zstd of the whole snapshot, zstd --patch-from, xdelta3). Then it times "user arrives -> app
running": a cold boot, `vmsynth run` of the overlay (rebuild + resume) and a resume alone.

Writes bench/results-memory.json (every run) and bench/MEMORY.md (with --quick:
bench/results-memory-quick.json only). See bench/README.md, "Memory snapshots".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import debian_guest
import disk_bench
from disk_bench import Bench, BenchError, log

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VMSYNTH = disk_bench.VMSYNTH
DEFAULT_WORKDIR = REPO / ".build" / "bench" / "memory"
DEBIAN_WORKDIR = debian_guest.DEFAULT_WORKDIR

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
# Bump when the way the snapshots are taken changes: cached snapshots are then taken again.
SNAP_RECIPE = 1
RESUME_RUNS = 3
POLL = 0.01  # seconds between looks at a VM's stdout or serial log
STOP_TIMEOUT = 120.0  # seconds a vmsynth boot/run gets to end after SIGTERM
TRAILER_SIZE = 64
VMEM_MAGIC = b"VSMEM\r\n\x01"


# ---------------------------------------------------------------------------------------------
# The guests
# ---------------------------------------------------------------------------------------------

@dataclass
class Guest:
    name: str  # fixture | debian
    title: str
    base: Path  # the base image (only read: VMs boot throwaway children)
    app: Path  # the customized child of the base (only read)
    kernel: Path
    initrd: Path
    append: str
    memory: str  # guest RAM
    base_ready: str  # the base's ready line
    app_ready: str  # the app's ready line
    heartbeat: str  # "<heartbeat> <n>" lines follow the app's ready line once a second
    snapshot_at: int  # the app is snapshotted once it has printed "<heartbeat> <snapshot_at>"
    timeout: float  # seconds to wait for a ready line
    facts: dict = field(default_factory=dict)

    def boot_args(self, ready: str, resume: bool = False) -> list[str]:
        """Options for `vmsynth boot` / `vmsynth run` (the disk or overlay comes first)."""
        return ["--kernel", str(self.kernel), "--initrd", str(self.initrd),
                "--append", self.append, *([] if resume else ["--memory", self.memory]),
                "--vnc", "none", "--accel", "tcg", "--timeout", str(self.timeout),
                "--grace", "1", "--ready", ready]

    def beat(self, n: int) -> str:
        return f"{self.heartbeat} {n}"

    def beats(self, serial: Path) -> list[int]:
        # A getty prompt may share the line ("vmsynth-app login: VMSYNTH-READY app").
        pattern = re.compile(rf"(?:^|\s){re.escape(self.heartbeat)} (\d+)$")
        return [int(m[1]) for line in serial_lines(serial) if (m := pattern.search(line))]

    @property
    def ref(self) -> str:
        return f"bench-{self.name}@1"


def serial_lines(serial: Path) -> list[str]:
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]


def fixture_guest(work: Path) -> Guest:
    d = work / "fixture" / "guest"
    d.mkdir(parents=True, exist_ok=True)
    log(f"building the fixture guest in {d} (fixtures/build-guest.sh; quick when up to date)")
    disk_bench.run("bash", REPO / "fixtures" / "build-guest.sh", d)
    return Guest(
        name="fixture",
        title="fixture guest (busybox init counting, 256 MiB RAM)",
        base=d / "base.qcow2", app=d / "app.qcow2", kernel=d / "kernel",
        initrd=d / "initramfs.cpio.gz",
        append="console=ttyS0 quiet panic=-1 vmsynth.mode=counter", memory="256M",
        base_ready="VMSYNTH-READY", app_ready="VMSYNTH-READY", heartbeat="tick",
        snapshot_at=3, timeout=120.0,
        facts={"what": "fixtures/build-guest.sh: a Debian kernel (vmlinux, PVH boot), a busybox "
                       "initramfs and a 64 MiB ext4 disk; with vmsynth.mode=counter its init "
                       "mounts the disk, prints VMSYNTH-READY, then `tick N` once a second",
               "kernel_release": (d / "kernel.release").read_text().strip()
               if (d / "kernel.release").exists() else "?"})


def debian_pair() -> Guest:
    log(f"the Debian pair (bench/debian_guest.py, cached in {DEBIAN_WORKDIR})")
    info = debian_guest.build(DEBIAN_WORKDIR)
    if not info["cached"]:
        log(f"  built in {info['build_seconds']:.0f} s")
    return Guest(
        name="debian",
        title="Debian 12 guest (systemd, python3 app with numpy/pandas, 1 GiB RAM)",
        base=Path(info["base_qcow2"]), app=Path(info["app_qcow2"]),
        kernel=Path(info["kernel"]), initrd=Path(info["initrd"]),
        append=debian_guest.APPEND, memory="1G",
        base_ready=debian_guest.READY["base"], app_ready=debian_guest.READY["app"],
        heartbeat=debian_guest.ALIVE, snapshot_at=1, timeout=float(debian_guest.BOOT_TIMEOUT),
        facts={"what": "bench/debian_guest.py: Debian 12 minbase + kernel, systemd, udev, dbus "
                       "on a 3 GiB ext4 disk; the app child adds ~300 MB of python3 packages "
                       "and a systemd service holding numpy/pandas data (a 32 MiB table) that "
                       "prints VMSYNTH-READY app, then VMSYNTH-ALIVE N once a second",
               "built_at": info["built_at"], "recipe": info["recipe"],
               "kernel_version": info["base"].get("kernel_version"),
               "base_allocated_bytes": info["base"]["allocation"]["data_bytes"],
               "app_data_bytes": info["app"]["allocation"]["data_bytes"],
               "app_new_packages": len(info["app"]["new_packages"]),
               "app_installed_bytes": info["app"]["new_packages_installed_bytes"]})


# ---------------------------------------------------------------------------------------------
# VMs in the background
# ---------------------------------------------------------------------------------------------

class VM:
    """A `vmsynth boot` or `vmsynth run` in the background: stdout and stderr in files, its
    own session (so our signals stay ours). Every VM started is in VM.live until it ended."""

    live: ClassVar[list[VM]] = []

    def __init__(self, argv: list[str], env: dict, logs: Path, label: str) -> None:
        self.label = label
        self.out_path, self.err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.t0 = time.perf_counter()
            self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=env,
                                         start_new_session=True)
        VM.live.append(self)

    def since(self) -> float:
        return time.perf_counter() - self.t0

    def _fail(self, what: str) -> None:
        err = self.err_path.read_text(errors="replace").strip().splitlines()
        raise BenchError(f"{self.label}: {what}" + (f": {' | '.join(err[-3:])}" if err else "")
                         + f" (logs: {self.err_path})")

    def wait_event(self, timeout: float) -> tuple[dict, float]:
        """The ready event (first JSON document on stdout) and the wall seconds from the
        start of vmsynth until it appeared."""
        deadline = time.perf_counter() + timeout
        while True:
            text = self.out_path.read_text(errors="replace").lstrip()
            if text:
                with contextlib.suppress(ValueError):
                    event = json.JSONDecoder().raw_decode(text)[0]
                    seen = self.since()
                    if not isinstance(event, dict) or event.get("event") != "ready":
                        self._fail(f"printed {text[:300]!r} instead of a ready event")
                    return event, seen
            if self.proc.poll() is not None:
                self._fail(f"exited ({self.proc.returncode}) before its ready event")
            if time.perf_counter() > deadline:
                self._fail(f"no ready event within {timeout:.0f} s")
            time.sleep(POLL)

    def wait_serial(self, serial: Path, line: str, timeout: float) -> float:
        """Wall seconds from the start of vmsynth until the serial log holds `line`."""
        deadline = time.perf_counter() + timeout
        while True:
            if any(ln == line or ln.endswith(f" {line}") for ln in serial_lines(serial)):
                return self.since()
            if self.proc.poll() is not None:
                self._fail(f"exited ({self.proc.returncode}) before its console printed {line!r}")
            if time.perf_counter() > deadline:
                self._fail(f"its console did not print {line!r} within {timeout:.0f} s")
            time.sleep(POLL)

    def wait_exit(self, expect: tuple[int, ...], timeout: float = STOP_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.label}: still running {timeout:.0f} s after it should "
                             "have ended (killed)") from None
        VM.live.remove(self)
        if code not in expect:
            self._fail(f"exited {code}, expected {' or '.join(map(str, expect))}")
        return code

    def stop(self, expect: tuple[int, ...] = (143,)) -> tuple[int, float]:
        """SIGTERM to vmsynth (never to QEMU: vmsynth stops its own VM); exit code, seconds."""
        t = time.perf_counter()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
        code = self.wait_exit(expect)
        return code, round(time.perf_counter() - t, 3)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            VM.live.remove(self)


def qemu_pids(tmp: Path) -> list[int]:
    """QEMU processes whose command line names our TMPDIR (their run directories are in it)."""
    mark = str(tmp).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and Path(argv[0].decode(errors="replace")).name.startswith("qemu-system") \
                    and any(mark in a for a in argv):
                pids.append(int(entry.name))
    return pids


def assert_no_qemu(tmp: Path) -> None:
    deadline = time.monotonic() + 5  # a QEMU that was just told to quit may take a moment
    while (left := qemu_pids(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise BenchError(f"QEMU processes outlived their vmsynth: {left} (killed)")


def child_of(backing: Path, path: Path) -> Path:
    """A fresh qcow2 child: a VM never writes into an image another step needs."""
    path.unlink(missing_ok=True)
    disk_bench.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.resolve(),
                   "-F", "qcow2", path)
    return path


# ---------------------------------------------------------------------------------------------
# Memory snapshot files
# ---------------------------------------------------------------------------------------------

def vmem_header(path: Path) -> dict:
    """The header of a .vmem (SPEC.md section 11) and `contents_bytes` (RAM + state)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - TRAILER_SIZE)
        trailer = f.read(TRAILER_SIZE)
        if len(trailer) != TRAILER_SIZE or trailer[:8] != VMEM_MAGIC:
            raise BenchError(f"{path}: not a vmsynth memory snapshot (bad trailer)")
        h_off = int.from_bytes(trailer[8:16], "little")
        h_len = int.from_bytes(trailer[16:24], "little")
        f.seek(h_off)
        raw = f.read(h_len)
    if hashlib.sha256(raw).digest() != trailer[32:64]:
        raise BenchError(f"{path}: header digest mismatch")
    header = json.loads(raw)
    return header | {"contents_bytes": h_off, "file_bytes": size}


def check_vmem(taken: Path, rebuilt: Path) -> None:
    """The rebuilt snapshot's contents (RAM + device state) equal the taken one's: the header
    digests agree and cmp finds no difference in the content range."""
    a, b = vmem_header(taken), vmem_header(rebuilt)
    if a["digest"] != b["digest"] or a["contents_bytes"] != b["contents_bytes"]:
        raise BenchError(f"REBUILT MEMORY DIFFERS: {rebuilt} has digest {b['digest']}, "
                         f"{taken} has {a['digest']}")
    proc = disk_bench.run("cmp", "-n", str(a["contents_bytes"]), taken, rebuilt, check=False)
    if proc.returncode != 0:
        raise BenchError(f"REBUILT MEMORY DIFFERS: cmp -n {a['contents_bytes']} {taken} "
                         f"{rebuilt}: {(proc.stdout + proc.stderr).strip()}")


def page_stats(base: Path, app: Path) -> dict:
    """How app.vmem's RAM relates to base.vmem's, page by page at the same offsets."""
    hb, ha = vmem_header(base), vmem_header(app)
    ram = ha["machine"]["ram_size"]
    zero, zero_chunk = bytes(PAGE), bytes(MiB)
    same = app_zero = base_zero = 0
    with open(base, "rb") as fb, open(app, "rb") as fa:
        for _ in range(0, ram, MiB):
            b, a = fb.read(MiB), fa.read(MiB)
            if len(a) != MiB or len(b) != MiB:
                raise BenchError(f"{app} or {base} is shorter than its RAM size")
            if a == b and a == zero_chunk:  # the common case: a hole in both
                same += MiB // PAGE
                app_zero += MiB // PAGE
                base_zero += MiB // PAGE
                continue
            for p in range(0, MiB, PAGE):
                pa, pb = a[p:p + PAGE], b[p:p + PAGE]
                same += pa == pb
                app_zero += pa == zero
                base_zero += pb == zero
    pages = ram // PAGE
    return {"ram_bytes": ram, "pages": pages, "same_offset_equal_pages": same,
            "changed_pages": pages - same, "changed_bytes": (pages - same) * PAGE,
            "app_zero_pages": app_zero, "base_zero_pages": base_zero,
            "app_state_bytes": ha["state_size"], "base_state_bytes": hb["state_size"],
            "app_file_bytes": ha["file_bytes"], "app_allocated_bytes": allocated(app),
            "base_allocated_bytes": allocated(base)}


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def code_hash() -> str:
    """A hash of vmsynth's sources (others edit them while benchmarks run): taken before and
    after each guest, so a result measured across a change of the code is marked as such."""
    h = hashlib.sha256()
    files = [p for d in ("vmsynth", "cli", "formats") for p in (REPO / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts]
    for path in sorted(files):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


file_state, sha256_file = debian_guest.file_state, debian_guest.sha256_file


# ---------------------------------------------------------------------------------------------
# Step 1: the snapshots (cached)
# ---------------------------------------------------------------------------------------------

def snapshot_inputs(g: Guest) -> dict:
    """What the cached snapshots depend on: when any of it changes they are taken again."""
    qemu = disk_bench.run("qemu-system-x86_64", "--version", check=False).stdout.split("\n")[0]
    return {"recipe": SNAP_RECIPE,
            "images": {p.name: file_state(p) for p in (g.base, g.app, g.kernel, g.initrd)},
            "base_args": g.boot_args(g.base_ready), "app_args": g.boot_args(g.app_ready),
            "snapshot_at": g.beat(g.snapshot_at), "qemu": qemu,
            "vmsynth_snapshot_code": [sha256_file(REPO / "vmsynth" / f)
                                      for f in ("memory.py", "snapshot.py")]}


def take_snapshots(g: Guest, gdir: Path, tmp: Path, rebuild: bool) -> dict:
    sdir = gdir / "snapshots"
    stamp = sdir / "stamp.json"
    inputs = snapshot_inputs(g)
    outputs = ("base.vmem", "app.vmem", "app-disk.qcow2", "app-serial.log")
    if not rebuild:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            info = json.loads(stamp.read_text())
            if info["inputs"] == inputs and all(
                    file_state(sdir / n) == info["files"][n] for n in outputs):
                log(f"  reusing the snapshots taken {info['taken_at']} ({sdir})")
                return info | {"cached": True}
    shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True)
    logs = sdir / "logs"
    logs.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(sdir / "vmsynth-home"))
    info: dict = {"inputs": inputs}

    # The base, in its ready state: --snapshot-on-exit, then SIGTERM once it is ready.
    log(f"  booting a child of the base until {g.base_ready!r}, then snapshotting it "
        f"(--snapshot-on-exit)")
    disk = child_of(g.base, sdir / "base-run.qcow2")
    vm = VM([VMSYNTH, "boot", disk, *g.boot_args(g.base_ready), "--serial",
             sdir / "base-serial.log", "--snapshot-on-exit", sdir / "base.vmem", "--json"],
            env, logs, "boot-base")
    event, seen = vm.wait_event(g.timeout + 30)
    _, snap_s = vm.stop(expect=(0,))
    info["base_boot"] = {"wall_to_ready_event_s": round(seen, 3),
                         "ready_seconds": event["ready_seconds"],
                         "sigterm_to_snapshot_written_s": snap_s, "event": event}
    log(f"    base ready after {seen:.1f} s (vmsynth: {event['ready_seconds']:.1f} s); "
        f"snapshot written {snap_s:.1f} s after SIGTERM")
    (sdir / "base-run.qcow2").unlink()
    assert_no_qemu(tmp)

    # The app, running: boot, ready line, wait for the heartbeat, `vmsynth snapshot --qmp`.
    log(f"  booting a child of the app until {g.app_ready!r} and {g.beat(g.snapshot_at)!r}, "
        "then `vmsynth snapshot --qmp`")
    disk = child_of(g.app, sdir / "app-disk.qcow2")
    serial = sdir / "app-serial.log"
    vm = VM([VMSYNTH, "boot", disk, *g.boot_args(g.app_ready), "--serial", serial, "--json"],
            env, logs, "boot-app")
    event, seen = vm.wait_event(g.timeout + 30)
    beat_s = vm.wait_serial(serial, g.beat(g.snapshot_at), 60)
    run, out = disk_bench.measure_once([str(VMSYNTH), "snapshot", "--qmp", event["qmp_socket"],
                                        "-o", str(sdir / "app.vmem"), "--json"],
                                       logs, "snapshot-app", env, sdir, timeout=600)
    if run.rc != 0:
        vm.kill()
        err = (logs / "snapshot-app.stderr").read_text(errors="replace").strip()
        raise BenchError(f"vmsynth snapshot --qmp {event['qmp_socket']} failed ({run.rc}): "
                         f"{err[-500:]}")
    vm.wait_exit(expect=(0,))  # the snapshot stopped the VM: `boot` saw it end
    assert_no_qemu(tmp)
    beats = g.beats(serial)
    if not beats or beats[-1] < g.snapshot_at:
        raise BenchError(f"the app's serial log {serial} has no {g.beat(g.snapshot_at)!r}")
    info["app_boot"] = {"wall_to_ready_event_s": round(seen, 3),
                        "ready_seconds": event["ready_seconds"],
                        "wall_to_snapshot_heartbeat_s": round(beat_s, 3), "event": event}
    info["app_snapshot"] = {"command": "vmsynth snapshot --qmp SOCKET -o app.vmem",
                            "wall_s": run.wall, "peak_rss_mib": run.rss_mib,
                            "report": json.loads(out)}
    info["last_heartbeat"] = beats[-1]
    log(f"    app ready after {seen:.1f} s (vmsynth: {event['ready_seconds']:.1f} s), "
        f"{g.beat(g.snapshot_at)!r} after {beat_s:.1f} s; snapshot in {run.wall:.1f} s, "
        f"{run.rss_mib:.0f} MiB; last line before it: {g.beat(beats[-1])!r}")
    info["pages"] = page_stats(sdir / "base.vmem", sdir / "app.vmem")
    info["taken_at"] = dt.datetime.now().isoformat(timespec="seconds")
    info["files"] = {n: file_state(sdir / n) for n in outputs}
    disk_bench.run("sync")
    tmp_stamp = stamp.with_name("stamp.json.tmp")
    tmp_stamp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_stamp, stamp)  # last: only now are the snapshots complete
    return info | {"cached": False}


# ---------------------------------------------------------------------------------------------
# Steps 2 and 3: overlays and peers
# ---------------------------------------------------------------------------------------------

def size_of(p: Path) -> int:
    return p.stat().st_size


def overlays(g: Guest, gdir: Path, snaps: Path, env: dict, quick: bool, results: dict) -> None:
    out, logs = gdir / "out", gdir / "logs"
    home = Path(env["VMSYNTH_HOME"])
    bench = Bench(gdir, env, logs)
    base_vmem, app_vmem = snaps / "base.vmem", snaps / "app.vmem"
    app_disk = snaps / "app-disk.qcow2"
    levels = (3,) if quick else (3, 19)

    log("  warming the page cache with all inputs")
    disk_bench.warm([g.base, g.app, app_disk, base_vmem, app_vmem])
    m = bench.measure("rss-floor", [["true"]])
    results["rss_floor"] = m.to_json() | {
        "what": "peak RSS reported for `true`: the floor under every peak RSS below"}

    log("  vmsynth base add --memory (the one-time scan of the base and its snapshot)")
    m = bench.measure("vmsynth-base-add",
                      [[str(VMSYNTH), "base", "add", str(g.base), "--name", g.ref.split("@")[0],
                        "--version", "1", "--memory", str(base_vmem), "--json"]],
                      before=lambda: shutil.rmtree(home, ignore_errors=True), repeat=False)
    results["vmsynth_base_add"] = m.to_json() | {"report": json.loads(m.stdout)}

    def inspect(vmo: Path) -> dict:
        proc = disk_bench.run(VMSYNTH, "inspect", vmo, "--json", env=env)
        return json.loads(proc.stdout)

    empty = child_of(g.base, out / "empty-child.qcow2")  # a disk with no change: memory only
    for kind, disk in (("full", app_disk), ("memonly", empty)):
        for level, solid in itertools.product(levels, (False, True)):
            key = f"{kind}_l{level}" + ("_solid" if solid else "")
            vmo = out / f"{key}.vmo"
            what = ("disk + memory" if kind == "full"
                    else "memory only: an empty child of the base + app.vmem")
            flags = ["--level", str(level)] + (["--solid"] if solid else [])
            log(f"  vmsynth create {' '.join(flags)} ({what})")
            m = bench.measure(f"vmsynth-create-{key}",
                              [[str(VMSYNTH), "create", "--base", g.ref, "--disk", str(disk),
                                "--memory", str(app_vmem), "-o", str(vmo), *flags, "--json"]],
                              before=lambda v=vmo: v.unlink(missing_ok=True))
            rec = m.to_json() | {"output_bytes": size_of(vmo), "report": json.loads(m.stdout)}
            rec["inspect"] = inspect(vmo)
            results[f"vmsynth_create_{key}"] = rec
            mem = rec["inspect"]["memory"]
            log(f"    {size_of(vmo) / MiB:.2f} MiB, of which the memory stream "
                f"{mem['stored_bytes'] / MiB:.2f} MiB; memory pages {mem['blocks']}")

            synth, synth_vmem = out / f"synth-{key}.qcow2", out / f"synth-{key}.vmem"

            def check(_label: str, s: Path = synth, sv: Path = synth_vmem, d: Path = disk) -> None:
                disk_bench.qemu_compare(d, s)
                check_vmem(app_vmem, sv)

            log(f"  vmsynth apply ({key} overlay)")
            m = bench.measure(f"vmsynth-apply-{key}",
                              [[str(VMSYNTH), "apply", str(vmo), "--base", g.ref,
                                "-o", str(synth), "--json"]],
                              before=lambda s=synth, sv=synth_vmem: (s.unlink(missing_ok=True),
                                                                     sv.unlink(missing_ok=True)),
                              after=check)
            results[f"vmsynth_apply_{key}"] = m.to_json() | {
                "output_bytes": size_of(synth), "memory_output_bytes": size_of(synth_vmem),
                "identical": True, "report": json.loads(m.stdout)}
            if key != "full_l3":  # synth-full_l3.{qcow2,vmem} are resumed in step 4
                synth.unlink()
                synth_vmem.unlink()

    # -- peers on the memory pair ---------------------------------------------------------------
    result = out / "result.vmem"

    def check_result(_label: str) -> None:
        disk_bench.cmp_files(app_vmem, result)

    def peer(key: str, encode: list[str], encoded: Path, decode: list[str]) -> None:
        log(f"  {' '.join(Path(a).name if '/' in a else a for a in encode)}")
        m = bench.measure(f"{key}-encode", [encode], allow_fail=True,
                          before=lambda: encoded.unlink(missing_ok=True))
        err = (logs / f"{key}-encode.0.0.stderr").read_text(errors="replace").strip()
        rec = m.to_json() | {"command": " ".join(encode), "stderr": err[-500:]}
        if m.ok:
            rec["output_bytes"] = size_of(encoded)
        results[f"{key}_encode"] = rec
        if not m.ok:
            log(f"    failed or timed out: {err[-200:]}")
            return
        m = bench.measure(f"{key}-decode", [decode], allow_fail=True,
                          before=lambda: result.unlink(missing_ok=True), after=check_result)
        results[f"{key}_decode"] = m.to_json() | {"command": " ".join(decode),
                                                  "identical": m.ok}
        result.unlink(missing_ok=True)
        encoded.unlink(missing_ok=True)

    for level in levels:
        z = out / f"app.vmem.l{level}.zst"
        peer(f"zstd_whole_l{level}",
             ["zstd", f"-{level}", "-T2", str(app_vmem), "-o", str(z), "-f", "-q"], z,
             ["zstd", "-d", str(z), "-o", str(result), "-f", "-q"])
    for level in levels:
        z = out / f"app.vmem.patch-l{level}.zst"
        peer(f"zstd_patch_l{level}",
             ["zstd", f"-{level}", "-T2", "--long=31", f"--patch-from={base_vmem}",
              str(app_vmem), "-o", str(z), "-f", "-q"], z,
             ["zstd", "-d", "--long=31", f"--patch-from={base_vmem}", str(z), "-o",
              str(result), "-f", "-q"])
    x = out / "app.vmem.vcdiff"
    peer("xdelta3", ["xdelta3", "-e", "-9", "-f", "-s", str(base_vmem), str(app_vmem), str(x)], x,
         ["xdelta3", "-d", "-f", "-s", str(base_vmem), str(x), str(result)])


# ---------------------------------------------------------------------------------------------
# Step 4: user arrives -> app running
# ---------------------------------------------------------------------------------------------

def resume_runs(g: Guest, gdir: Path, snaps: Path, env: dict, tmp: Path, last: int,
                runs: int, results: dict) -> None:
    out, logs = gdir / "out", gdir / "logs"
    vmo = out / "full_l3.vmo"
    synth, synth_vmem = out / "synth-full_l3.qcow2", out / "synth-full_l3.vmem"
    sessions = Path(env["VMSYNTH_HOME"]) / "sessions"
    nxt = g.beat(last + 1)
    rec: dict = {"cold": [], "run": [], "resume": [], "next_line_expected": nxt,
                 "last_line_before_snapshot": g.beat(last)}
    results["resume"] = rec

    def first_line_check(serial: Path, what: str) -> str:
        lines = serial_lines(serial)
        first = lines[0] if lines else ""
        if first != nxt:
            raise BenchError(f"{what}: the first console line after the resume is {first!r}, "
                             f"not {nxt!r} (serial log {serial})")
        return first

    for i in range(runs):
        # (a) cold boot of the app's disk (a fresh child of app.qcow2) to its ready line
        serial = logs / f"cold.{i}.serial.log"
        disk = child_of(g.app, out / "cold-child.qcow2")
        vm = VM([VMSYNTH, "boot", disk, *g.boot_args(g.app_ready), "--serial", serial,
                 "--json"], env, logs, f"cold.{i}")
        load1 = round(os.getloadavg()[0], 2)
        event, seen = vm.wait_event(g.timeout + 30)
        beat_s = vm.wait_serial(serial, g.beat(1), 60)
        code, stop_s = vm.stop(expect=(0, 143))
        disk.unlink()
        rec["cold"].append({"wall_to_ready_event_s": round(seen, 3),
                            "ready_seconds": event["ready_seconds"],
                            "wall_to_first_heartbeat_s": round(beat_s, 3),
                            "stop_s": stop_s, "exit": code, "load1": load1})
        log(f"  run {i + 1}: cold boot: {g.app_ready!r} event after {seen:.2f} s "
            f"(vmsynth {event['ready_seconds']:.2f} s), {g.beat(1)!r} after {beat_s:.2f} s")
        assert_no_qemu(tmp)

        # (b) vmsynth run of the overlay: rebuild into a session, resume, next heartbeat
        serial = logs / f"run.{i}.serial.log"
        vm = VM([VMSYNTH, "run", vmo, "--base", g.ref, *g.boot_args(nxt, resume=True),
                 "--serial", serial, "--json"], env, logs, f"run.{i}")
        load1 = round(os.getloadavg()[0], 2)
        event, seen = vm.wait_event(g.timeout + 30)
        first = first_line_check(serial, f"vmsynth run {vmo.name}")
        code, stop_s = vm.stop(expect=(143,))
        left = list(sessions.iterdir()) if sessions.exists() else []
        if left:
            raise BenchError(f"vmsynth run left its session behind: {left}")
        rec["run"].append({"wall_to_ready_event_s": round(seen, 3),
                           "synthesis_seconds": event["synthesis_seconds"],
                           "resume_seconds": event["resume_seconds"],
                           "ready_seconds": event["ready_seconds"], "first_line": first,
                           "stop_s": stop_s, "exit": code, "load1": load1})
        log(f"  run {i + 1}: vmsynth run: {nxt!r} after {seen:.2f} s (synthesis "
            f"{event['synthesis_seconds']:.2f} s, resume {event['resume_seconds']:.2f} s, "
            f"ready {event['ready_seconds']:.2f} s)")
        assert_no_qemu(tmp)

        # (c) the resume alone: boot --resume of the applied snapshot (disk: a fresh child of
        # the applied disk, so every run starts from the snapshot's disk state)
        serial = logs / f"resume.{i}.serial.log"
        disk = child_of(synth, out / "resume-child.qcow2")
        vm = VM([VMSYNTH, "boot", disk, "--resume", synth_vmem, *g.boot_args(nxt, resume=True),
                 "--serial", serial, "--json"], env, logs, f"resume.{i}")
        load1 = round(os.getloadavg()[0], 2)
        event, seen = vm.wait_event(g.timeout + 30)
        first = first_line_check(serial, f"vmsynth boot --resume {synth_vmem.name}")
        code, stop_s = vm.stop(expect=(143,))
        disk.unlink()
        rec["resume"].append({"wall_to_ready_event_s": round(seen, 3),
                              "resume_seconds": event["resume_seconds"],
                              "ready_seconds": event["ready_seconds"], "first_line": first,
                              "stop_s": stop_s, "exit": code, "load1": load1})
        log(f"  run {i + 1}: boot --resume: {nxt!r} after {seen:.2f} s (resume "
            f"{event['resume_seconds']:.2f} s, ready {event['ready_seconds']:.2f} s)")
        assert_no_qemu(tmp)

    def med(kind: str, k: str) -> float:
        return round(statistics.median(r[k] for r in rec[kind]), 3)

    rec["median"] = {
        "cold_wall_to_ready_event_s": med("cold", "wall_to_ready_event_s"),
        "cold_ready_seconds": med("cold", "ready_seconds"),
        "cold_wall_to_first_heartbeat_s": med("cold", "wall_to_first_heartbeat_s"),
        "run_wall_to_ready_event_s": med("run", "wall_to_ready_event_s"),
        "run_synthesis_seconds": med("run", "synthesis_seconds"),
        "run_resume_seconds": med("run", "resume_seconds"),
        "run_ready_seconds": med("run", "ready_seconds"),
        "resume_wall_to_ready_event_s": med("resume", "wall_to_ready_event_s"),
        "resume_resume_seconds": med("resume", "resume_seconds"),
        "resume_ready_seconds": med("resume", "ready_seconds"),
    }


# ---------------------------------------------------------------------------------------------
# One guest
# ---------------------------------------------------------------------------------------------

def bench_guest(g: Guest, work: Path, tmp: Path, quick: bool, rebuild: bool) -> dict:
    gdir = work / g.name
    gdir.mkdir(parents=True, exist_ok=True)
    data: dict = {"guest": {"title": g.title, "memory": g.memory, **g.facts,
                            "base": str(g.base), "app": str(g.app),
                            "base_ready": g.base_ready, "app_ready": g.app_ready,
                            "heartbeat": g.heartbeat, "snapshot_at": g.beat(g.snapshot_at)},
                  "started": dt.datetime.now().isoformat(timespec="seconds")}
    started = time.monotonic()
    data["code_before"] = code_hash()
    data["git"] = disk_bench.git_state()
    log(f"== {g.title}: step 1, the snapshots")
    snaps = take_snapshots(g, gdir, tmp, rebuild)
    data["snapshots"] = snaps
    for d in ("out", "logs"):
        shutil.rmtree(gdir / d, ignore_errors=True)
        (gdir / d).mkdir()
    home = gdir / "vmsynth-home"
    env = dict(os.environ, VMSYNTH_HOME=str(home), TMPDIR=str(tmp),
               PYTHONDONTWRITEBYTECODE="1")
    results: dict = {}
    data["results"] = results
    try:
        log(f"== {g.title}: steps 2-3, overlays and peers")
        overlays(g, gdir, gdir / "snapshots", env, quick, results)
        log(f"== {g.title}: step 4, cold boot vs run from the overlay vs resume "
            f"({1 if quick else RESUME_RUNS} runs each)")
        resume_runs(g, gdir, gdir / "snapshots", env, tmp, snaps["last_heartbeat"],
                    1 if quick else RESUME_RUNS, results)
    except BaseException:
        partial = gdir / "results-partial.json"
        partial.write_text(json.dumps(data, indent=2) + "\n")
        log(f"what was measured before the failure: {partial}")
        raise
    data["seconds"] = round(time.monotonic() - started, 1)
    data["code_after"] = code_hash()
    data["code_changed_during_run"] = data["code_after"] != data["code_before"]
    if data["code_changed_during_run"]:
        log(f"WARNING: vmsynth's code changed while {g.name} was measured "
            f"({data['code_before']} -> {data['code_after']}); see git state in the results")
    data["table"] = table_rows(results, g)
    data["ratios"] = ratios(data["table"], results)
    return data


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

ROWS = [  # label, create key, apply key, kind, what the output holds
    ("vmsynth (default, zstd -3)", "vmsynth_create_full_l3", "vmsynth_apply_full_l3", "vmsynth",
     "disk + memory overlay"),
    ("vmsynth --level 19", "vmsynth_create_full_l19", "vmsynth_apply_full_l19", "vmsynth",
     "disk + memory overlay"),
    ("vmsynth --solid", "vmsynth_create_full_l3_solid", "vmsynth_apply_full_l3_solid",
     "vmsynth", "disk + memory overlay"),
    ("vmsynth --level 19 --solid", "vmsynth_create_full_l19_solid",
     "vmsynth_apply_full_l19_solid", "vmsynth", "disk + memory overlay"),
    ("vmsynth memory only (zstd -3)", "vmsynth_create_memonly_l3", "vmsynth_apply_memonly_l3",
     "vmsynth-mem", "memory (empty disk change)"),
    ("vmsynth memory only --level 19", "vmsynth_create_memonly_l19",
     "vmsynth_apply_memonly_l19", "vmsynth-mem", "memory (empty disk change)"),
    ("vmsynth memory only --solid", "vmsynth_create_memonly_l3_solid",
     "vmsynth_apply_memonly_l3_solid", "vmsynth-mem", "memory (empty disk change)"),
    ("vmsynth memory only --level 19 --solid", "vmsynth_create_memonly_l19_solid",
     "vmsynth_apply_memonly_l19_solid", "vmsynth-mem", "memory (empty disk change)"),
    ("zstd -3 -T2, whole app.vmem", "zstd_whole_l3_encode", "zstd_whole_l3_decode", "peer",
     "memory"),
    ("zstd -19 -T2, whole app.vmem", "zstd_whole_l19_encode", "zstd_whole_l19_decode", "peer",
     "memory"),
    ("zstd -3 -T2 --long=31 --patch-from=base.vmem", "zstd_patch_l3_encode",
     "zstd_patch_l3_decode", "peer", "memory"),
    ("zstd -19 -T2 --long=31 --patch-from=base.vmem", "zstd_patch_l19_encode",
     "zstd_patch_l19_decode", "peer", "memory"),
    ("xdelta3 -e -9 -s base.vmem", "xdelta3_encode", "xdelta3_decode", "peer", "memory"),
]


def table_rows(results: dict, g: Guest) -> list[dict]:
    rows = []
    for label, ck, ak, kind, holds in ROWS:
        c, a = results.get(ck), results.get(ak)
        if c is None:
            continue
        ok = c["ok"] and (a is None or a["ok"])
        failure = None if ok else ("timed out" if any(r["timed_out"] for r in c["runs"])
                                   else "failed")
        row = {"tool": label, "kind": kind, "holds": holds, "ok": ok, "failure": failure,
               "size_bytes": c.get("output_bytes") if ok else None,
               "create_s": c["wall_s_median"] if ok else None,
               "apply_s": a["wall_s_median"] if ok and a else None,
               "create_rss_mib": c["peak_rss_mib_median"] if ok else None,
               "apply_rss_mib": a["peak_rss_mib_median"] if ok and a else None,
               "create_cpu_s": c.get("cpu_s_median") if ok else None,
               "apply_cpu_s": a.get("cpu_s_median") if ok and a else None,
               "create_runs": len(c["runs"]), "apply_runs": len(a["runs"]) if a else 0}
        if kind.startswith("vmsynth"):
            row["memory_stored_bytes"] = c["inspect"]["memory"]["stored_bytes"]
        rows.append(row)
    return rows


def ratios(rows: list[dict], results: dict) -> dict:
    """vmsynth's memory-only overlays against the best peer on the same memory pair."""
    peers = [r for r in rows if r["kind"] == "peer" and r["ok"]]
    out: dict = {}
    if not peers:
        return out
    smallest = min(peers, key=lambda r: r["size_bytes"])
    fastest = min(peers, key=lambda r: r["create_s"])
    out["smallest_peer"] = smallest["tool"]
    out["fastest_peer"] = fastest["tool"]
    patch = {lvl: next((r for r in peers if r["tool"].startswith(f"zstd -{lvl} ")
                        and "patch-from" in r["tool"]), None) for lvl in (3, 19)}
    for r in rows:
        if not r["ok"] or r["kind"] == "peer":
            continue
        key = r["tool"]
        same = patch[19 if "19" in key else 3]
        out[key] = {
            "holds": r["holds"],
            "size_vs_zstd_patch_from_same_level": round(r["size_bytes"] / same["size_bytes"], 3)
            if same else None,
            "size_vs_smallest_peer": round(r["size_bytes"] / smallest["size_bytes"], 3),
            "memory_stream_vs_smallest_peer": round(r["memory_stored_bytes"]
                                                    / smallest["size_bytes"], 3),
            "create_s_vs_smallest_peer": round(r["create_s"] / smallest["create_s"], 3),
            "apply_s_vs_smallest_peer": round(r["apply_s"] / smallest["apply_s"], 3)
            if smallest["apply_s"] else None,
            "create_rss_vs_smallest_peer": round(r["create_rss_mib"]
                                                 / smallest["create_rss_mib"], 3),
            "apply_rss_vs_smallest_peer": round(r["apply_rss_mib"] / smallest["apply_rss_mib"], 3)
            if smallest["apply_rss_mib"] else None,
            "create_s_vs_fastest_peer": round(r["create_s"] / fastest["create_s"], 3),
        }
    return out


def mib_text(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / MiB:,.2f} MiB" if n < 100 * MiB else f"{n / MiB:,.0f} MiB"


def fmt(v: float | None, digits: int = 2) -> str:
    return disk_bench.fmt(v, digits)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def guest_section(name: str, d: dict) -> list[str]:
    g, s, res = d["guest"], d["snapshots"], d["results"]
    p = s["pages"]
    L: list[str] = []
    L.append(f"### {g['title']}")
    L.append("")
    L.append(f"- Guest: {g['what']}.")
    if d.get("code_changed_during_run"):
        L.append(f"- **Note:** vmsynth's code changed while this guest was measured (sources "
                 f"hash {d['code_before']} -> {d['code_after']}): some rows may come from "
                 "different versions.")
    if d.get("from_earlier_run"):
        L.append(f"- Measured in an earlier run ({d['from_earlier_run']}).")
    L.append(f"- `base.vmem`: a child of the base booted to `{g['base_ready']}` "
             f"(cold boot: ready event {s['base_boot']['wall_to_ready_event_s']:.1f} s after "
             f"starting `vmsynth boot`), then snapshotted by SIGTERM with "
             f"`--snapshot-on-exit`. `app.vmem`: a child of the app booted to "
             f"`{g['app_ready']}` ({s['app_boot']['wall_to_ready_event_s']:.1f} s) and "
             f"`{g['snapshot_at']}` ({s['app_boot']['wall_to_snapshot_heartbeat_s']:.1f} s), "
             f"then `vmsynth snapshot --qmp` ({s['app_snapshot']['wall_s']:.2f} s, "
             f"{s['app_snapshot']['peak_rss_mib']:.0f} MiB peak RSS); that child is the disk "
             f"the overlay is made of. Taken {s['taken_at']}.")
    L.append(f"- Snapshots: {mib_text(p['app_file_bytes'])} files ({p['ram_bytes'] // MiB} MiB "
             f"RAM + {p['app_state_bytes'] / KiB:.0f} KiB device state); "
             f"{mib_text(p['app_allocated_bytes'])} allocated (zero pages are holes). Of the "
             f"{p['pages']:,} RAM pages, {p['changed_pages']:,} "
             f"({p['changed_bytes'] / MiB:.1f} MiB) differ from the base snapshot's page at the "
             f"same address; {p['app_zero_pages']:,} are zero in app.vmem "
             f"({p['base_zero_pages']:,} in base.vmem).")
    full = res.get("vmsynth_create_full_l3")
    if full:
        mem = full["inspect"]["memory"]
        L.append(f"- vmsynth's overlay (level 3) holds {mib_text(full['output_bytes'])}: "
                 f"{mib_text(mem['stored_bytes'])} of memory stream and the rest disk; memory "
                 f"pages by kind: "
                 + ", ".join(f"{k} {v:,}" for k, v in mem["blocks"].items()) + ".")
    L.append("")
    L.append("| tool | holds | size | create / compress s | apply / decompress s | "
             "peak RSS create | peak RSS apply | CPU s create / apply |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in d["table"]:
        if not r["ok"]:
            L.append(f"| {r['tool']} | {r['holds']} | {r['failure']} | | | | | |")
            continue
        L.append(f"| {r['tool']} | {r['holds']} | {mib_text(r['size_bytes'])} | "
                 f"{fmt(r['create_s'])} | {fmt(r['apply_s'])} | "
                 f"{fmt(r['create_rss_mib'], 0)} MiB | "
                 f"{fmt(r['apply_rss_mib'], 0) + ' MiB' if r['apply_rss_mib'] else '—'} | "
                 f"{fmt(r.get('create_cpu_s'))} / {fmt(r.get('apply_cpu_s'))} |")
    L.append("")
    L.append("Sizes are output files; times are wall seconds (median of 3 runs under 10 s); "
             "CPU s is user + system time of the command and what it waited for.")
    L.append("")
    ra = d.get("ratios", {})
    if ra.get("smallest_peer"):
        sm = next(r for r in d["table"] if r["tool"] == ra["smallest_peer"])
        L.append(f"Smallest peer: {ra['smallest_peer']} ({mib_text(sm['size_bytes'])}, "
                 f"{fmt(sm['create_s'])} s, {fmt(sm['create_rss_mib'], 0)} MiB). vmsynth "
                 "against it:")
        L.append("")
        L.append("| vmsynth | holds | size | memory stream | create s | apply s | "
                 "create RSS | apply RSS | size vs zstd --patch-from, same level |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for tool, x in ra.items():
            if not isinstance(x, dict):
                continue
            L.append(f"| {tool} | {x['holds']} | {x['size_vs_smallest_peer']:.2f}x | "
                     f"{x['memory_stream_vs_smallest_peer']:.2f}x | "
                     f"{x['create_s_vs_smallest_peer']:.2f}x | "
                     f"{fmt(x['apply_s_vs_smallest_peer'])}x | "
                     f"{x['create_rss_vs_smallest_peer']:.2f}x | "
                     f"{fmt(x['apply_rss_vs_smallest_peer'])}x | "
                     f"{fmt(x['size_vs_zstd_patch_from_same_level'])}x |")
        L.append("")
    return L


def resume_section(data: dict) -> list[str]:
    L = ["### User arrives -> app running",
         "",
         ("Wall seconds from starting the command to its ready event on stdout (median of "
         "the runs, min-max in brackets). Cold boot waits for the app's ready line; the "
         "resumes wait for the heartbeat that follows the last one printed before the "
         "snapshot (the first console line after the resume, checked every run)."),
         "",
         ("| guest | runs | cold boot -> app ready line | cold boot -> first heartbeat | "
         "`vmsynth run` overlay -> next heartbeat | of which synthesis | of which QEMU resume | "
         "`boot --resume` alone -> next heartbeat | of which QEMU resume |"),
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in data["guests"].items():
        r = d["results"].get("resume")
        if not r:
            continue
        L.append(f"| {name} ({d['guest']['memory']} RAM) | {len(r['cold'])} | "
                 f"{spread([x['wall_to_ready_event_s'] for x in r['cold']])} | "
                 f"{spread([x['wall_to_first_heartbeat_s'] for x in r['cold']])} | "
                 f"{spread([x['wall_to_ready_event_s'] for x in r['run']])} | "
                 f"{spread([x['synthesis_seconds'] for x in r['run']])} | "
                 f"{spread([x['resume_seconds'] for x in r['run']])} | "
                 f"{spread([x['wall_to_ready_event_s'] for x in r['resume']])} | "
                 f"{spread([x['resume_seconds'] for x in r['resume']])} |")
    L.append("")
    for name, d in data["guests"].items():
        r = d["results"].get("resume")
        if r:
            m = r["median"]
            L.append(f"- {name}: run from the overlay reaches the running app "
                     f"{m['cold_wall_to_ready_event_s'] / m['run_wall_to_ready_event_s']:.1f}x "
                     f"sooner than a cold boot reaches the app's ready line "
                     f"({m['cold_wall_to_ready_event_s']:.1f} s -> "
                     f"{m['run_wall_to_ready_event_s']:.1f} s); first line after every resume: "
                     f"`{r['next_line_expected']}` (last before the snapshot: "
                     f"`{r['last_line_before_snapshot']}`).")
    L.append("")
    return L


def write_markdown(path: Path, data: dict) -> None:
    meta = data["meta"]
    v = meta["versions"]
    floors = ", ".join(f"{n}: {d['results']['rss_floor']['peak_rss_mib_median']:.0f} MiB"
                       for n, d in data["guests"].items())
    L = ["## Memory snapshots: overlays with memory, peers, resume vs cold boot",
         "",
         (f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} "
         f"cores, {meta['machine']['mem_gib']} GiB, {meta['machine']['distro']}, kernel "
         f"{meta['machine']['kernel']}), VMs under TCG (KVM does not work on this host). "
         f"{v['vmsynth']}, {v['qemu-system']}, {v['zstd']}, {v['xdelta3']}; vmsynth code: "
         f"{meta['git']['describe']}. Command: `{meta['command']}` "
         f"({meta['total_seconds'] / 60:.0f} min; load average "
         f"{meta['loadavg_before'][0]:.1f} before, {meta['loadavg_after'][0]:.1f} after). "
         f"Every number is in bench/{data['meta'].get('results_file', 'results-memory.json')}."),
         "",
         ("**Workload.** Two base/app pairs, each snapshotted twice: the base VM in its ready "
         "state (`base.vmem`, given to `vmsynth base add --memory`) and the app VM while its "
         "app runs (`app.vmem`, with the app VM's disk). The overlay holds the disk and memory "
         "differences; the peers compress the same memory pair (they get no disk)."),
         "",
         ("**Method.** Each command runs as its own subprocess; wall time, and peak RSS from "
         "`os.wait4` (`ru_maxrss`) of that child (the floor, what `true` reports, is "
         f"{floors}). "
         "Commands under 10 s run 3 times (median shown), longer ones once; 30 min per "
         "command at most. Inputs are read once before measuring (warm page cache). "
         "Every `vmsynth apply` result is checked: `qemu-img compare` with the app VM's disk, "
         "the rebuilt `.vmem`'s header digest against `app.vmem`'s and `cmp` of their RAM + "
         "state bytes; every peer's output is compared with `cmp`. `vmsynth create` is "
         "`--base NAME@1 --disk app-disk.qcow2 --memory app.vmem`; \"memory only\" is the same "
         "with a fresh empty child of the base as the disk. Peers: `zstd -L -T2 app.vmem`, "
         "`zstd -L -T2 --long=31 --patch-from=base.vmem app.vmem` (decompressed with "
         "`zstd -d [--long=31 --patch-from=base.vmem]`), `xdelta3 -e -9 -s base.vmem app.vmem` "
         "(`xdelta3 -d -s base.vmem`)."),
         "",
         ("Resume vs cold boot: (a) `vmsynth boot` of a fresh qcow2 child of app.qcow2 with "
         "`--ready <app ready line>`; (b) `vmsynth run app.vmo --base NAME@1 --ready <next "
         "heartbeat> --json` (rebuilds disk and memory into a session, resumes, scrubs the "
         "session at the end: `synthesis_seconds` is the rebuild, `resume_seconds` QEMU's "
         "incoming migration); (c) `vmsynth boot <fresh child of synth.qcow2> --resume "
         "synth.vmem` (includes checking the snapshot's digest). All with `--accel tcg "
         "--vnc none`. The heartbeat comes once a second in guest time, so a resume's "
         "ready time includes waiting for the guest's next heartbeat (up to ~1 s)."),
         ""]
    for name, d in data["guests"].items():
        L += guest_section(name, d)
    L += resume_section(data)
    rss = []
    for name, d in data["guests"].items():
        t = {r["tool"]: r for r in d["table"]}
        a = t.get("vmsynth (default, zstd -3)")
        if a:
            rss.append(f"{name} ({d['guest']['memory']} RAM): create {fmt(a['create_rss_mib'], 0)} "
                       f"MiB, apply {fmt(a['apply_rss_mib'], 0)} MiB")
    if rss:
        L.append("**Peak RSS against guest RAM** (vmsynth, level 3, disk + memory): "
                 + "; ".join(rss) + ".")
        L.append("")
    path.write_text("\n".join(L))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def versions() -> dict:
    v = disk_bench.tool_versions()
    qemu = disk_bench.run("qemu-system-x86_64", "--version", check=False).stdout.split("\n")[0]
    v["qemu-system"] = qemu.replace(" version", "").split(" (")[0]
    return v


def cleanup(tmp: Path) -> list[str]:
    """Stop every VM we started and any QEMU naming our TMPDIR; what had to be killed."""
    problems = []
    for vm in list(VM.live):
        problems.append(f"{vm.label} (pid {vm.proc.pid}) was still running")
        vm.kill()
    time.sleep(0.2 if problems else 0)
    for pid in qemu_pids(tmp):
        problems.append(f"QEMU {pid} was still running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where snapshots and outputs go (default {DEFAULT_WORKDIR})")
    ap.add_argument("--only", choices=("fixture", "debian"), help="one guest only")
    ap.add_argument("--quick", action="store_true",
                    help="level 3 only, one resume run each; writes "
                         "bench/results-memory-quick.json and leaves MEMORY.md alone")
    ap.add_argument("--rebuild", action="store_true", help="take the cached snapshots again")
    args = ap.parse_args()

    why = disk_bench.missing_prerequisite(
        "memory_bench.py", "the guest builds loop-mount their disks",
        ("qemu-img", "qemu-system-x86_64", "xdelta3", "zstd", "cmp"),
        "qemu-utils qemu-system-x86 xdelta3 zstd diffutils")
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    disk_bench.exit_on(signal.SIGTERM)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Short: QMP socket paths (in vmsynth's run directories under TMPDIR) must stay < 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="vmb-", dir="/tmp"))
    started = time.monotonic()
    load_before = os.getloadavg()
    git_at_start = disk_bench.git_state()
    out_json = SCRIPT.parent / ("results-memory-quick.json" if args.quick
                                else "results-memory.json")
    guests: dict = {}
    code = 0
    try:
        names = [args.only] if args.only else ["fixture", "debian"]
        for name in names:
            g = fixture_guest(work) if name == "fixture" else debian_pair()
            guests[name] = bench_guest(g, work, tmp, args.quick, args.rebuild)
            assert_no_qemu(tmp)
        command = "sudo /work/main/.venv/bin/python bench/memory_bench.py" + \
            (f" --only {args.only}" if args.only else "") + (" --quick" if args.quick else "")
        data = {
            "meta": {"date": dt.datetime.now().isoformat(timespec="seconds"),
                     "command": command, "quick": args.quick, "workdir": str(work),
                     "total_seconds": round(time.monotonic() - started, 1),
                     "warm_page_cache": True, "repeat_under_s": disk_bench.REPEAT_UNDER,
                     "repeats": disk_bench.REPEATS, "resume_runs": 1 if args.quick
                     else RESUME_RUNS, "accel": "tcg",
                     "loadavg_before": [round(x, 2) for x in load_before],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                     "machine": disk_bench.machine(), "versions": versions(),
                     "git": git_at_start, "results_file": out_json.name},
            "guests": guests,
        }
        if args.only and out_json.exists():  # keep the other guest's last results
            with contextlib.suppress(ValueError, KeyError):
                old = json.loads(out_json.read_text())
                for n, d in old["guests"].items():
                    if n not in guests:
                        data["guests"][n] = d | {"from_earlier_run": old["meta"]["date"]}
        order = ["fixture", "debian"]
        data["guests"] = dict(sorted(data["guests"].items(), key=lambda kv: order.index(kv[0])))
        out_json.write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {out_json}")
        if not args.quick:
            write_markdown(SCRIPT.parent / "MEMORY.md", data)
            log(f"wrote {SCRIPT.parent / 'MEMORY.md'}")
        for name, d in guests.items():
            for r in d["table"]:
                log(f"  {name}: {r['tool']}: " + (
                    f"{mib_text(r['size_bytes'])}, create {fmt(r['create_s'])} s, "
                    f"apply {fmt(r['apply_s'])} s, RSS {fmt(r['create_rss_mib'], 0)}/"
                    f"{fmt(r['apply_rss_mib'], 0)} MiB" if r["ok"] else r["failure"]))
            if "median" in d["results"].get("resume", {}):
                log(f"  {name}: resume medians {d['results']['resume']['median']}")
        log(f"total {time.monotonic() - started:.0f} s")
    except (BenchError, debian_guest.GuestError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except Exception as err:  # noqa: BLE001 (one error line, whatever went wrong)
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as err:
        print("error: terminated", file=sys.stderr)
        code = err.code if isinstance(err.code, int) else 1
    finally:
        problems = cleanup(tmp)
        if problems and code == 0:
            print(f"error: left running and killed: {'; '.join(problems)}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
