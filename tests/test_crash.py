"""Crash safety: `vmsynth create` and `vmsynth apply` killed with SIGKILL at random points.

After every kill: nothing exists under the final output name unless it is complete and valid
(for create, byte for byte the overlay a full run writes: create is deterministic; for apply,
a disk with exactly the app's contents), the base file is unchanged, and the run that follows
into the same output removes the killed run's temporary file as soon as it makes its own.
Finally a full rerun succeeds and leaves no temporary file behind, in the output folder or
in the cache ($VMSYNTH_HOME).

The inputs are big enough for a run to take a second or more: a 32 MiB base and a 256 MiB
child of it holding ~100 MiB of new random data, some of it written by qemu-io. Kill delays
come from a seeded generator (VMSYNTH_CRASH_SEED, default fixed) spread over a full run's
duration; VMSYNTH_CRASH_KILLS sets how many kills per command (default 4). Timing only picks
the kill points: no assertion depends on how long anything takes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsynth.qcow2 import Qcow2Image, Qcow2Writer

pytestmark = pytest.mark.slow

CS = 1 << 16
MiB = 1 << 20
KILLS = int(os.environ.get("VMSYNTH_CRASH_KILLS", "4"))
SEED = int(os.environ.get("VMSYNTH_CRASH_SEED", "20241127"))


@dataclass
class Big:
    dir: Path
    base: Path
    app: Path
    base_sha: str  # of the base file's bytes
    app_sha: str  # of the app's virtual contents
    app_size: int
    overlay: Path  # what a full `vmsynth create` writes
    overlay_sha: str
    create_seconds: float  # one full run of each, to spread the kill points over
    apply_seconds: float


def content_sha(path: Path) -> tuple[str, int]:
    image = Qcow2Image(path)
    try:
        sha = hashlib.sha256()
        for offset in range(0, image.virtual_size, 4 * MiB):
            sha.update(image.read(offset, min(4 * MiB, image.virtual_size - offset)))
        return sha.hexdigest(), image.virtual_size
    finally:
        image.close()


def file_sha(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
    return sha.hexdigest()


def build_inputs(folder: Path, h) -> tuple[Path, Path]:
    """A 32 MiB base (text and random clusters) and a 256 MiB qcow2 child of it: per four
    clusters one untouched, one random, one half random, one repeated pattern; then qemu-io
    (when installed) writes byte patterns over a few regions, as a guest would."""
    base, app = folder / "base.qcow2", folder / "app.qcow2"
    w = Qcow2Writer(base, 32 * MiB)
    for i in range(32 * MiB // CS):
        w.write_cluster(i, os.urandom(CS) if i % 5 == 0 else
                        (f"base cluster {i:05d} ".encode() * (CS // 20 + 1))[:CS])
    w.finish()
    w = Qcow2Writer(app, 256 * MiB, backing=str(base.resolve()))
    for i in range(256 * MiB // CS):
        if i % 4 == 1:
            w.write_cluster(i, os.urandom(CS))
        elif i % 4 == 2:
            w.write_cluster(i, os.urandom(CS // 2) + bytes([i % 251]) * (CS // 2))
        elif i % 4 == 3:
            w.write_cluster(i, (f"app cluster {i:06d} ".encode() * (CS // 19 + 1))[:CS])
    w.finish()
    if h.which("qemu-io"):
        h.qemu_io(app, *(f"write -P {0x11 * (k + 1)} {k * 24 + 3}M 2M" for k in range(8)))
    return base, app


def run_full(*args: object) -> float:
    started = time.monotonic()
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return time.monotonic() - started


@pytest.fixture(scope="module")
def big(tmp_path_factory, h) -> Big:
    folder = tmp_path_factory.mktemp("crash-inputs")
    base, app = build_inputs(folder, h)
    app_sha, app_size = content_sha(app)
    overlay = folder / "reference.vmo"
    create_seconds = run_full(h.VMSYNTH, "create", "--base", base, "--disk", app, "-o", overlay)
    synth = folder / "reference.qcow2"
    apply_seconds = run_full(h.VMSYNTH, "apply", overlay, "--base", base, "-o", synth)
    assert content_sha(synth) == (app_sha, app_size), "the reference apply is wrong"
    synth.unlink()
    return Big(folder, base, app, file_sha(base), app_sha, app_size, overlay, file_sha(overlay),
               create_seconds, apply_seconds)


def temps(folder: Path, name: str) -> dict[int, list[Path]]:
    """Temporary files for output `name` in `folder`, by the PID in their names."""
    out: dict[int, list[Path]] = {}
    for p in folder.glob(f".{name}.*.tmp"):
        pid = p.name[len(name) + 2:].split(".")[0]
        out.setdefault(int(pid) if pid.isdigit() else -1, []).append(p)
    return out


def start_and_kill(argv: list[object], delay: float, writing: Path | None = None
                   ) -> tuple[int, bool]:
    """Start `vmsynth ARGV`, SIGKILL it after `delay` seconds unless it ended; (pid, killed).

    With `writing` (the final output), the delay counts from when the process has made its
    temporary file for that output: the kill then surely lands while it writes.
    """
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if writing is not None:
        deadline = time.monotonic() + 300
        while p.pid not in temps(writing.parent, writing.name) and p.poll() is None:
            assert time.monotonic() < deadline, "the process never made its temporary file"
            time.sleep(0.01)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return p.pid, True
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    return p.pid, False


@dataclass
class KillLog:
    killed: int = 0
    completed: int = 0
    output_seen: int = 0  # kills after which a (complete) output existed
    temp_left: int = 0  # kills that left a temporary file


def crash_loop(h, big: Big, argv: list[object], out: Path, seconds: float, valid,
               home: Path) -> KillLog:
    rng = random.Random(f"{SEED}-{out.name}")
    log = KillLog()
    stale: set[int] = set()  # PIDs of killed runs whose temporary files may remain
    for i in range(KILLS):
        if i % 2 == 0:  # any time from the start to past the end of a full run
            delay = rng.uniform(0.02, 1.15 * seconds)
            pid, killed = start_and_kill(argv, delay)
        else:  # while writing: at once the first time, then at random
            delay = 0 if i == 1 else rng.uniform(0, 0.8 * seconds)
            pid, killed = start_and_kill(argv, delay, writing=out)
        log.killed += killed
        log.completed += not killed
        left = temps(out.parent, out.name)
        assert set(left) <= stale | {pid}, f"temporary files of unknown origin: {left}"
        if pid in left or not killed:
            # This run got as far as making its own temporary file (or finished): it must
            # have removed those of the runs killed before it.
            assert not (set(left) & stale), f"{left} survived a later run into {out.name}"
            stale.clear()
        if pid in left:
            stale.add(pid)
            log.temp_left += 1
        if out.exists():
            log.output_seen += 1
            assert valid(out), f"{out.name} exists after a kill at {delay:.2f} s but is not valid"
            out.unlink()  # each kill starts from scratch
        assert file_sha(big.base) == big.base_sha, "the base file changed"
    assert log.temp_left >= 1, "no kill landed while writing: the checks above were vacuous"
    # A full rerun: succeeds, valid output, no temporary file left anywhere.
    run_full(*argv)
    assert valid(out)
    assert temps(out.parent, out.name) == {}
    assert [p for p in home.rglob("*.tmp")] == [], "temporary files left in the cache"
    assert file_sha(big.base) == big.base_sha
    return log


def test_create_killed_at_random_points(big, h, tmp_path, vmsynth_home):
    out = tmp_path / "out" / "app.vmo"
    out.parent.mkdir()
    argv: list[object] = [h.VMSYNTH, "create", "--base", big.base, "--disk", big.app, "-o", out]
    log = crash_loop(h, big, argv, out, big.create_seconds,
                     lambda p: file_sha(p) == big.overlay_sha, vmsynth_home)
    print(f"create ({big.create_seconds:.1f} s per full run): {log}")
    assert sorted(p.name for p in out.parent.iterdir()) == ["app.vmo"]


def test_apply_killed_at_random_points(big, h, tmp_path, vmsynth_home):
    out = tmp_path / "out" / "synth.qcow2"
    out.parent.mkdir()
    argv: list[object] = [h.VMSYNTH, "apply", big.overlay, "--base", big.base, "-o", out]
    log = crash_loop(h, big, argv, out, big.apply_seconds,
                     lambda p: content_sha(p) == (big.app_sha, big.app_size), vmsynth_home)
    print(f"apply ({big.apply_seconds:.1f} s per full run): {log}")
    assert sorted(p.name for p in out.parent.iterdir()) == ["synth.qcow2"]


def test_create_killed_over_an_existing_output_keeps_it(big, h, tmp_path):
    """A killed run that would have replaced an existing overlay leaves the old one whole."""
    out = tmp_path / "app.vmo"
    out.write_bytes(b"the previous overlay")
    rng = random.Random(SEED)
    for i in range(2):
        _, killed = start_and_kill([h.VMSYNTH, "create", "--base", big.base, "--disk", big.app,
                                    "-o", out], rng.uniform(0.05, 0.8 * big.create_seconds),
                                   writing=out if i else None)
        if killed:
            assert out.read_bytes() == b"the previous overlay"
        else:
            assert file_sha(out) == big.overlay_sha
            out.write_bytes(b"the previous overlay")


# ------------------------------------------------------------------------------ deterministic kills

def feed_then_kill(h, big: Big, out: Path, fed: int) -> int:
    """`vmsynth apply -` reading the overlay from a pipe: feed `fed` bytes, wait until its
    temporary output exists (it is then blocked reading), SIGKILL it. Returns its PID."""
    p = subprocess.Popen([str(h.VMSYNTH), "apply", "-", "--base", str(big.base), "-o",
                          str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    assert p.stdin is not None
    try:
        with open(big.overlay, "rb") as f:
            remaining = fed
            while remaining:
                chunk = f.read(min(MiB, remaining))
                p.stdin.write(chunk)
                remaining -= len(chunk)
        p.stdin.flush()
        deadline = time.monotonic() + 120
        while p.pid not in temps(out.parent, out.name) and p.poll() is None:
            assert time.monotonic() < deadline, "apply never made its temporary file"
            time.sleep(0.02)
        assert p.poll() is None, "apply ended before it had the whole overlay"
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
    return p.pid


@pytest.mark.parametrize("where", ["first-frame", "half", "all-but-the-last-byte"])
def test_apply_killed_while_reading_its_input(big, h, tmp_path, where):
    """Deterministic kill points: the process is blocked on its input, with a partly written
    result in its temporary file."""
    size = big.overlay.stat().st_size
    fed = {"first-frame": 1 << 16, "half": size // 2, "all-but-the-last-byte": size - 1}[where]
    out = tmp_path / "out" / "synth.qcow2"
    out.parent.mkdir()
    pid = feed_then_kill(h, big, out, fed)
    assert not out.exists()
    assert list(temps(out.parent, out.name)) == [pid]  # only the killed run's leftover
    run_full(h.VMSYNTH, "apply", big.overlay, "--base", big.base, "-o", out)
    assert temps(out.parent, out.name) == {}
    assert content_sha(out) == (big.app_sha, big.app_size)
    assert file_sha(big.base) == big.base_sha


def test_leftovers_of_a_live_process_are_kept(big, h, tmp_path):
    """Only dead processes' leftovers are removed: a temporary file named with a live PID
    (here: this test's own) belongs to a run still in progress."""
    out = tmp_path / "synth.qcow2"
    mine = tmp_path / f".synth.qcow2.{os.getpid()}.vmsynthinprogress.tmp"
    mine.write_bytes(b"partial")
    dead = tmp_path / f".synth.qcow2.{h.dead_pid()}.vmsynthgone.tmp"
    dead.write_bytes(b"stale")
    run_full(h.VMSYNTH, "apply", big.overlay, "--base", big.base, "-o", out)
    assert mine.read_bytes() == b"partial"
    assert not dead.exists()
