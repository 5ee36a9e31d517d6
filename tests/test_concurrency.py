"""Concurrency: several vmsynth processes on one cached base and one output folder.

Runs that must overlap are made to overlap deterministically: `vmsynth apply -` reads the
overlay from a pipe this test feeds, so after the header it has locked the base, made its
temporary output and is waiting for the frames, for as long as the test likes. No assertion
depends on timing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmsynth.formats.layout import HEADER

from vmsynth import bases
from vmsynth.errors import ExitCode

pytestmark = pytest.mark.slow


def run(h, *args: object, check_code: int | None = 0) -> subprocess.CompletedProcess:
    p = h.run(h.VMSYNTH, *args, check=False)
    if check_code is not None:
        assert p.returncode == check_code, (args, p.returncode, p.stderr)
    return p


class HeldApply:
    """`vmsynth apply - --base BASE -o OUT`, fed the overlay's header only: it holds the base
    (a shared lock) and its temporary output until `finish` feeds the rest."""

    def __init__(self, h, overlay: bytes, base: str, out: Path) -> None:
        self.overlay, self.out = overlay, out
        self.proc = subprocess.Popen([str(h.VMSYNTH), "apply", "-", "--base", base, "-o",
                                      str(out)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.header = HEADER.unpack_from(overlay)[3]
        assert self.proc.stdin is not None
        self.proc.stdin.write(overlay[: self.header])
        self.proc.stdin.flush()

    def temp_files(self) -> list[Path]:
        return list(self.out.parent.glob(f".{self.out.name}.{self.proc.pid}.*.tmp"))

    def wait_until_writing(self) -> None:
        """Until its temporary output exists: it has locked the base and read the header."""
        deadline = time.monotonic() + 120
        while not self.temp_files():
            if self.proc.poll() is not None:
                raise AssertionError(f"apply ended early: {self.proc.stderr.read()!r}")
            assert time.monotonic() < deadline, "apply never started writing"
            time.sleep(0.01)

    def finish(self) -> tuple[int, str]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(self.overlay[self.header:])
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        return self.proc.wait(), err.decode()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        self.proc.stderr.close()


@pytest.fixture
def cached(small_pair, h, tmp_path) -> Path:
    """small_pair's base added to the cache as conc@1; returns the output folder."""
    run(h, "base", "add", small_pair.base_path, "--name", "conc", "--version", "1")
    out = tmp_path / "out"
    out.mkdir()
    return out


def entry_file(vmsynth_home: Path, spec: str) -> Path:
    return vmsynth_home / "bases" / f"{spec}.json"


def listed(h) -> list[str]:
    return [f"{e['name']}@{e['version']}"
            for e in json.loads(run(h, "base", "list", "--json").stdout)]


def held(h, small_pair, out: Path, n: int, base: str = "conc@1") -> list[HeldApply]:
    applies = [HeldApply(h, small_pair.multi, base, out / f"r{i}.qcow2") for i in range(n)]
    for a in applies:
        a.wait_until_writing()
    return applies


def finish_all(h, small_pair, applies: list[HeldApply]) -> None:
    for a in applies:
        code, err = a.finish()
        assert code == 0, err
        assert h.read_image(a.out) == small_pair.app_data
        assert a.temp_files() == []


# ------------------------------------------------------------------------------ many readers

def test_parallel_applies_on_one_cached_base(cached, small_pair, h, vmsynth_home):
    """Four applies at once, all holding conc@1 and writing into one folder; the scan cache
    is cold, so all four scan the base and write the cache at the same time too."""
    shutil.rmtree(vmsynth_home / "scans")
    applies = held(h, small_pair, cached, 4)
    assert all(a.proc.poll() is None for a in applies)  # all four in the middle at once
    assert listed(h) == ["conc@1"]
    finish_all(h, small_pair, applies)
    assert sorted(p.name for p in cached.iterdir()) == [f"r{i}.qcow2" for i in range(4)]
    scans = sorted((vmsynth_home / "scans").iterdir())
    assert [p.suffix for p in scans] == [".idx", ".json"], scans  # one scan, no temporaries
    json.loads(scans[1].read_text())


def test_parallel_applies_started_together(cached, small_pair, h, tmp_path):
    """Not held: eight applies started at once from files, racing from the first step."""
    vmo = tmp_path / "app.vmo"
    vmo.write_bytes(small_pair.multi)
    procs = [subprocess.Popen([str(h.VMSYNTH), "apply", str(vmo), "--base", "conc@1", "-o",
                               str(cached / f"s{i}.qcow2")], stderr=subprocess.PIPE)
             for i in range(8)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    for i in range(8):
        assert h.read_image(cached / f"s{i}.qcow2") == small_pair.app_data
    assert sorted(p.name for p in cached.iterdir()) == [f"s{i}.qcow2" for i in range(8)]


def test_base_add_of_another_version_while_applies_read(cached, small_pair, h, tmp_path):
    copy = tmp_path / "base-v2.qcow2"
    shutil.copyfile(small_pair.base_path, copy)
    applies = held(h, small_pair, cached, 3)
    run(h, "base", "add", copy, "--name", "conc", "--version", "2")
    assert listed(h) == ["conc@1", "conc@2"]
    finish_all(h, small_pair, applies)
    out = cached / "on-v2.qcow2"
    vmo = tmp_path / "app.vmo"
    vmo.write_bytes(small_pair.multi)
    run(h, "apply", vmo, "--base", "conc@2", "-o", out)
    assert h.read_image(out) == small_pair.app_data


# ------------------------------------------------------------------------------ rm and re-add while in use

def test_base_rm_is_refused_while_an_apply_uses_the_base(cached, small_pair, h, vmsynth_home):
    entry = entry_file(vmsynth_home, "conc@1")
    before = entry.read_text()
    [user] = held(h, small_pair, cached, 1)
    p = run(h, "base", "rm", "conc@1", check_code=ExitCode.BUSY)
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    p = run(h, "base", "add", small_pair.base_path, "--name", "conc", "--version", "1",
            check_code=ExitCode.BUSY)
    assert p.stderr.count("\n") == 1
    assert entry.read_text() == before  # untouched, and still listed
    assert listed(h) == ["conc@1"]
    finish_all(h, small_pair, [user])
    run(h, "base", "rm", "conc@1")
    assert listed(h) == []
    assert not entry.exists()


def test_base_rm_is_refused_while_another_process_has_it_resolved(cached, small_pair, h,
                                                                  vmsynth_home):
    code = ("import sys\nfrom vmsynth import bases\nb = bases.resolve('conc@1')\n"
            "print('ready', flush=True)\nsys.stdin.read()\nb.close()\nprint('closed')\n")
    child = subprocess.Popen([sys.executable, "-P", "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline() == "ready\n"
        run(h, "base", "rm", "conc@1", check_code=ExitCode.BUSY)
        assert listed(h) == ["conc@1"]
        json.loads(entry_file(vmsynth_home, "conc@1").read_text())
    finally:
        out, _ = child.communicate("")
    assert child.returncode == 0 and out == "closed\n"
    run(h, "base", "rm", "conc@1")
    assert listed(h) == []


def test_a_killed_user_does_not_keep_the_base_busy(cached, small_pair, h):
    """flock locks die with their process: after kill -9 the base can be removed, and the
    killed run's temporary file goes with the next run into the same output."""
    [user] = held(h, small_pair, cached, 1)
    leftover = user.temp_files()
    user.kill()
    assert all(p.exists() for p in leftover)
    again = HeldApply(h, small_pair.multi, "conc@1", user.out)
    again.wait_until_writing()
    assert not any(p.exists() for p in leftover)
    finish_all(h, small_pair, [again])
    run(h, "base", "rm", "conc@1")


def test_apply_of_a_base_being_removed_fails_cleanly(cached, small_pair, h, tmp_path):
    """After `base rm`, a new apply naming the base is a base-not-found (10), not a crash."""
    run(h, "base", "rm", "conc@1")
    vmo = tmp_path / "app.vmo"
    vmo.write_bytes(small_pair.multi)
    p = run(h, "apply", vmo, "--base", "conc@1", "-o", cached / "x.qcow2",
            check_code=ExitCode.BASE_MISMATCH)
    assert p.stderr.count("\n") == 1
    assert list(cached.iterdir()) == []


# ------------------------------------------------------------------------------ torn state

WRITER = """
import sys
from pathlib import Path
from vmsynth import bases
a, b, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
done = i = 0
while not stop.exists():  # until the test has seen enough: no race on who finishes first
    i += 1
    try:
        bases.add(a if i % 2 else b, "torn", "1").close()
        done += 1
    except Exception as err:  # busy while a reader holds it: try again
        if type(err).__name__ != "BusyError":
            raise
print(done)
"""
READS, APPLIES = 300, 4


def test_the_cache_entry_is_never_torn(small_pair, h, tmp_path, vmsynth_home):
    """A child re-adds torn@1 over and over, alternating two image files, while this test
    reads the entry and `base list`, and applies on torn@1 run: every read parses and names
    one of the two files; every apply succeeds or is refused as busy (21)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copyfile(small_pair.base_path, a)
    shutil.copyfile(small_pair.base_path, b)
    run(h, "base", "add", a, "--name", "torn", "--version", "1")
    entry = entry_file(vmsynth_home, "torn@1")
    vmo = tmp_path / "app.vmo"
    vmo.write_bytes(small_pair.multi)
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-P", "-c", WRITER, str(a), str(b), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = applies = 0
    codes: set[int] = set()
    while reads < READS or applies < APPLIES:
        assert writer.poll() is None, writer.communicate()
        record = json.loads(entry.read_text())
        assert record["path"] in (str(a.resolve()), str(b.resolve()))
        assert record["digest"] == h.sha256(small_pair.base_data)
        assert [e["name"] for e in bases.entries()] == ["torn"]
        reads += 1
        if reads % (READS // APPLIES) == 1:
            out = tmp_path / f"synth{applies}.qcow2"
            p = run(h, "apply", vmo, "--base", "torn@1", "-o", out, check_code=None)
            codes.add(p.returncode)
            assert p.returncode in (0, ExitCode.BUSY), p.stderr
            if p.returncode == 0:
                assert h.read_image(out) == small_pair.app_data
            else:
                assert not out.exists()
            applies += 1
    stop.touch()
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert int(out) > 0, "the writer rewrote the entry while it was read"
    assert list(entry.parent.glob("*.tmp")) == []
    print(f"{reads} reads, {applies} applies ({sorted(codes)}), {out.strip()} rewrites")


# ------------------------------------------------------------------------------ neighbours in one folder

@pytest.mark.parametrize("suffix", ["dead-pid", "date"])
def test_an_apply_does_not_disturb_one_to_a_longer_name(cached, small_pair, h, tmp_path,
                                                        suffix):
    """Two applies in one folder, to `disk.qcow2` and to `disk.qcow2.N` (a numbered copy,
    say, or a date). The second's temporary file is `.disk.qcow2.N.<pid>.<random>.tmp`; the
    first, cleaning up after dead processes, must not take N for a PID: with N a PID that is
    not running it deletes the second's file in mid-write (which then fails), with N too big
    for a PID it crashes."""
    n = str(h.dead_pid()) if suffix == "dead-pid" else "20241127093000"
    long = HeldApply(h, small_pair.multi, "conc@1", cached / f"disk.qcow2.{n}")
    long.wait_until_writing()
    vmo = tmp_path / "app.vmo"
    vmo.write_bytes(small_pair.multi)
    p = run(h, "apply", vmo, "--base", "conc@1", "-o", cached / "disk.qcow2", check_code=None)
    still_there = bool(long.temp_files())
    code, err = long.finish()
    assert p.returncode == 0, f"apply to disk.qcow2: {p.stderr}"
    assert still_there, "the apply to disk.qcow2 deleted the temporary file of a running apply"
    assert code == 0, f"apply to disk.qcow2.{n}: {err}"
    assert h.read_image(cached / f"disk.qcow2.{n}") == small_pair.app_data
    assert h.read_image(cached / "disk.qcow2") == small_pair.app_data
