#!/usr/bin/env python3
"""Disk benchmark: vmsynth create/apply against xdelta3 and zstd --patch-from.

    /work/main/.venv/bin/python bench/disk_bench.py [--workdir DIR] [--quick]

Builds (once, cached) a base qcow2 holding an ext4 filesystem full of real files copied from
/usr, and a qcow2 child of it changed the way a running guest changes its disk (through
qemu-storage-daemon's FUSE export and a loop mount). Then measures every tool as its own
subprocess (wall time, and peak RSS from os.wait4 on exactly that child), checks that every
rebuilt disk is identical to the original, and writes bench/results.json and BENCHMARKS.md
(with --quick: a small workload, bench/results-quick.json, and BENCHMARKS.md is left alone).

With --workload debian it measures the real Debian 12 pair of bench/debian_guest.py instead
and writes bench/results-debian.json and bench/DISK-DEBIAN.md (never BENCHMARKS.md).

Needs root (mount), qemu-utils, xdelta3, zstd, e2fsprogs and /dev/fuse. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VENV_BIN = REPO / ".venv" / "bin"
VMSYNTH = VENV_BIN / "vmsynth"
DEFAULT_WORKDIR = REPO / ".build" / "bench"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REPEAT_UNDER = 10.0  # seconds: measurements faster than this run 3 times (median reported)
REPEATS = 3
TIMEOUT = 1800.0  # seconds per command; a peer that takes longer is reported as timed out
SEED = 20240601
BASE_NAME, BASE_VERSION = "bench-base", "1"
SOURCE_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin")
FS_UUID = "5eb1a2c0-0d15-4b3e-9c1e-bec4c4a11d00"  # fixed: reproducible filesystem metadata
FAKE_TIME = "1700000000"


class BenchError(RuntimeError):
    """A failed step or a wrong result: the benchmark stops, loudly."""


@dataclass(frozen=True)
class Scale:
    name: str
    disk_size: int  # virtual size of the base (and the child)
    base_files: int  # bytes of real files in the base filesystem
    max_file: int  # largest single file copied from /usr
    new_files: int  # bytes of files (not in the base) installed into the child
    dup_bytes: int  # bytes of base files copied to a second place
    edit_files: int  # files edited in place (a few bytes each)
    append_files: int  # files that grow by a few KiB of text
    delete_bytes: int  # bytes of base files deleted
    zero_bytes: int  # size of a file of zeros
    rewrite_bytes: int  # bytes of large files replaced by a modified copy of themselves
    rewrite_min: int  # smallest file considered for the rewrite


FULL = Scale("full", 2 * GiB, 1 * GiB, 48 * MiB, 200 * MiB, 64 * MiB, 3000, 400, 48 * MiB,
             64 * MiB, 32 * MiB, 4 * MiB)
QUICK = Scale("quick", 256 * MiB, 128 * MiB, 8 * MiB, 25 * MiB, 8 * MiB, 400, 50, 6 * MiB,
              8 * MiB, 4 * MiB, 1 * MiB)


@dataclass(frozen=True)
class Plan:
    """What `benchmark` runs: the synthetic workload uses the defaults (unchanged)."""
    parts: int = 2  # zstd: each raw image cut into this many pieces (each piece <= 1 GiB)
    slow: bool = True  # vmsynth --level 19, xdelta3 and zstd -19 (off: a Debian smoke run)
    qemu_apply: bool = False  # also measure an apply step for the qemu-img child (Debian)


SYNTHETIC_PLAN = Plan()
PART_WORDS = {2: "two halves", 3: "three parts", 4: "four parts"}


def missing_prerequisite(script: str, root_for: str, tools: tuple[str, ...],
                         packages: str) -> str | None:
    """Why `script` cannot run here (not root, a tool or vmsynth's venv missing), or None."""
    if os.geteuid() != 0:
        return f"{script} needs root ({root_for})"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"missing {tool} (apt-get install -y {packages})"
    if not VMSYNTH.exists():
        return f"missing {VMSYNTH}: make the venv first (make test)"
    return None


def exit_on(*signals: signal.Signals) -> None:
    """Make these signals exit like SystemExit, which unwinds through the finally blocks
    (unmount, stop the VMs) instead of killing the process where it stands."""
    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in signals:
        signal.signal(sig, on_signal)


def parts_key(parts: int) -> str:
    return "halves" if parts == 2 else "parts"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*args: str | Path, cwd: Path | None = None, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """A helper command (not measured)."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def file_key(path: str) -> bytes:
    """A stable pseudo-random order for file selection: independent of directory order."""
    return hashlib.sha256(path.encode()).digest()


def mib(n: float) -> float:
    return round(n / MiB, 2)


# ---------------------------------------------------------------------------------------------
# Workload: a base filesystem image and a child changed by "guest" file operations
# ---------------------------------------------------------------------------------------------

def source_files(max_file: int) -> list[tuple[str, int]]:
    """Regular, readable files under /usr/{lib,share,bin}, sorted by path."""
    found = []
    for root in SOURCE_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= max_file and \
                        os.access(path, os.R_OK):
                    found.append((path, st.st_size))
    found.sort()
    return found


def pick_pools(scale: Scale) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split /usr files by a hash of their path: ~80% may go into the base, the rest are
    'new packages' for the child; each pool is filled in hash order up to its budget."""
    base, new = [], []
    base_total = new_total = 0
    for path, size in sorted(source_files(scale.max_file), key=lambda f: file_key(f[0])):
        if file_key("pool:" + path)[0] < 52:  # ~20%
            if new_total + size <= scale.new_files:
                new.append((path, size))
                new_total += size
        elif base_total + size <= scale.base_files:
            base.append((path, size))
            base_total += size
        if base_total >= scale.base_files * 0.999 and new_total >= scale.new_files * 0.99:
            break
    return sorted(base), sorted(new)


def copy_file(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


@contextlib.contextmanager
def guest_mount(child: Path, work: Path) -> Iterator[Path]:
    """Export `child` over FUSE with qemu-storage-daemon and loop-mount the filesystem in it.

    Always unmounts and stops the daemon, whatever happens inside."""
    export, mnt = work / "export.raw", work / "mnt"
    for p in (export, mnt):
        if mounted(p):
            raise BenchError(f"{p} is still mounted from an earlier run; unmount it first")
    export.touch()
    mnt.mkdir(exist_ok=True)
    daemon_log = open(work / "qemu-storage-daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={child}",
         "--blockdev", "driver=qcow2,node-name=d0,file=f0",
         "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={export},writable=on"],
        stdout=daemon_log, stderr=subprocess.STDOUT)
    loop_mounted = False
    try:
        deadline = time.monotonic() + 30
        while not mounted(export):
            if daemon.poll() is not None:
                raise BenchError(f"qemu-storage-daemon exited ({daemon.returncode}); see "
                                 f"{work / 'qemu-storage-daemon.log'}")
            if time.monotonic() > deadline:
                raise BenchError("qemu-storage-daemon's FUSE export did not appear in 30 s")
            time.sleep(0.05)
        run("mount", "-o", "loop", export, mnt)
        loop_mounted = True
        yield mnt
        os.sync()
    finally:
        try:
            if loop_mounted or mounted(mnt):
                os.sync()
                proc = run("umount", mnt, check=False)
                if proc.returncode != 0:
                    time.sleep(1)
                    run("umount", mnt, check=False)
                if mounted(mnt):
                    log(f"WARNING: {mnt} would not unmount; lazy unmount")
                    run("umount", "-l", mnt, check=False)
            leftover = run("losetup", "-j", export, check=False).stdout.strip()
            for line in leftover.splitlines():
                run("losetup", "-d", line.split(":", 1)[0], check=False)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    log("WARNING: qemu-storage-daemon ignored SIGTERM; killing it")
                    daemon.kill()
                    daemon.wait()
            daemon_log.close()
            if mounted(export):
                run("fusermount3", "-u", export, check=False)
            if daemon.returncode not in (0, None):
                log(f"WARNING: qemu-storage-daemon exited with {daemon.returncode}")
            with contextlib.suppress(OSError):
                export.unlink()


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def guest_changes(mnt: Path, scale: Scale, base_list: list[tuple[str, int]],
                  new_list: list[tuple[str, int]]) -> dict:
    """What a running guest does to its disk: install, copy, edit, append, delete, rewrite."""
    stats: dict[str, int] = {}
    rng = random.Random(SEED)
    order = sorted(base_list)
    rng.shuffle(order)  # disjoint slices of the base's files for each kind of change

    def take(count: int | None = None, budget: int | None = None,
             min_size: int = 1) -> list[tuple[str, int]]:
        """The next files (in shuffled order) that fit; each file is used by one change only."""
        out, total = [], 0
        for i, (path, size) in enumerate(order):
            if (count is not None and len(out) >= count) or \
                    (budget is not None and total >= budget):
                break
            limit = budget * (1.25 if out else 2) if budget is not None else None
            if path and size >= min_size and (limit is None or total + size <= limit):
                out.append((path, size))
                total += size
                order[i] = ("", 0)  # used
        return out

    def inside(path: str) -> Path:
        return mnt / path.lstrip("/")

    # 1. in-place edits of a few bytes (dd conv=notrunc)
    r = random.Random(SEED + 1)
    edited = take(count=scale.edit_files, min_size=64)
    for path, size in edited:
        n = r.randint(1, 16)
        fd = os.open(inside(path), os.O_WRONLY)
        try:
            os.pwrite(fd, r.randbytes(n), r.randrange(0, size - n))
        finally:
            os.close(fd)
    stats["edited_files"] = len(edited)

    # 2. appends: a few KiB of log-like text at the end of existing files
    r = random.Random(SEED + 2)
    appended = take(count=scale.append_files)
    appended_bytes = 0
    for i, (path, _) in enumerate(appended):
        lines = []
        for j in range(r.randint(8, 200)):
            lines.append(f"{i:06d}.{j:04d} updated by bench guest key={r.getrandbits(64):016x} "
                         f"status={r.choice(('ok', 'changed', 'skipped'))}\n")
        text = "".join(lines).encode()
        with open(inside(path), "ab") as f:
            f.write(text)
        appended_bytes += len(text)
    stats["appended_files"] = len(appended)
    stats["appended_bytes"] = appended_bytes

    # 3. deletions
    deleted = take(budget=scale.delete_bytes)
    for path, _ in deleted:
        inside(path).unlink()
    stats["deleted_files"] = len(deleted)
    stats["deleted_bytes"] = sum(s for _, s in deleted)

    # 4. new files (a "package install"): files from /usr that are not in the base
    for path, _ in new_list:
        copy_file(path, inside(path))
    stats["new_files"] = len(new_list)
    stats["new_bytes"] = sum(s for _, s in new_list)

    # 5. duplicate copies of base files (a backup, a container layer)
    dups = take(budget=scale.dup_bytes)
    for path, _ in dups:
        dst = mnt / "srv" / "copies" / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inside(path), dst)
    stats["duplicated_files"] = len(dups)
    stats["duplicated_bytes"] = sum(s for _, s in dups)

    # 6. large files replaced by a modified copy of themselves (an upgrade: new inode, new
    #    blocks; an insertion shifts everything after it by a few bytes)
    r = random.Random(SEED + 6)
    rewritten = take(budget=scale.rewrite_bytes, min_size=scale.rewrite_min)
    for path, size in rewritten:
        src = inside(path)
        data = bytearray(src.read_bytes())
        for _ in range(100):  # scattered byte changes
            data[r.randrange(size)] = r.randrange(256)
        at = r.randrange(size * 2 // 3, size)
        data[at: at + 4096] = r.randbytes(4096)  # one rewritten 4 KiB stretch
        at = r.randrange(size // 3, size * 2 // 3)
        data[at:at] = b"inserted by the bench guest\n"  # shifts the rest by 28 bytes
        tmp = src.with_name(src.name + ".dpkg-new")
        write_file(tmp, bytes(data))
        os.replace(tmp, src)
    stats["rewritten_files"] = len(rewritten)
    stats["rewritten_bytes"] = sum(s for _, s in rewritten)

    # 7. a file of zeros (a preallocated image or swap file written out)
    zeros = mnt / "var" / "lib" / "bench" / "zeros.img"
    zeros.parent.mkdir(parents=True, exist_ok=True)
    chunk = bytes(MiB)
    with open(zeros, "wb") as f:
        for _ in range(scale.zero_bytes // MiB):
            f.write(chunk)
    stats["zero_file_bytes"] = scale.zero_bytes
    # ... which mostly lands on never-used (already zero) blocks, so also zero an existing
    #     file in place (dd if=/dev/zero conv=notrunc: a disk image or log wiped in place)
    wiped = take(budget=scale.zero_bytes // 4, min_size=scale.rewrite_min)
    for path, size in wiped:
        with open(inside(path), "r+b") as f:
            f.write(bytes(size))
    stats["zeroed_files"] = len(wiped)
    stats["zeroed_bytes"] = sum(s for _, s in wiped)
    os.sync()
    return stats


def copy_sparse(src: Path, dst: Path, start: int, length: int) -> None:
    """Copy [start, start+length) of src to dst, leaving all-zero MiB chunks as holes."""
    zero = bytes(MiB)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fi.seek(start)
        done = 0
        while done < length:
            buf = fi.read(min(MiB, length - done))
            if not buf:
                break
            if buf == zero[: len(buf)]:
                fo.seek(len(buf), 1)
            else:
                fo.write(buf)
            done += len(buf)
        fo.truncate(length)


def count_changed_blocks(a: Path, b: Path) -> dict:
    """How many 4 KiB blocks differ between two raw images (and how many of those are zero)."""
    changed = zero_changed = 0
    zblock = bytes(4096)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if not x and not y:
                break
            if x == y:
                continue
            for i in range(0, max(len(x), len(y)), 4096):
                bx, by = x[i: i + 4096], y[i: i + 4096]
                if bx != by:
                    changed += 1
                    zero_changed += by == zblock
    return {"changed_blocks_4k": changed, "changed_bytes": changed * 4096,
            "changed_blocks_now_zero": zero_changed}


def child_allocation(child: Path) -> dict:
    """Clusters the child itself holds (qemu-img map with the backing file cut off)."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(child)}})
    entries = json.loads(run("qemu-img", "map", "--output=json", f"json:{spec}").stdout)
    data = sum(e["length"] for e in entries if e.get("present") and e.get("data"))
    zero = sum(e["length"] for e in entries if e.get("present") and not e.get("data"))
    return {"child_data_bytes": data, "child_zero_bytes": zero,
            "child_file_bytes": child.stat().st_size}


def workload(work: Path, scale: Scale, force: bool) -> dict:
    """The cached workload in `work`, built first (in a child process) if missing or stale.

    The build runs in its own process so that this one, which measures, stays small (its
    memory sets the floor of every measured peak RSS)."""
    stamp = work / "workload.json"
    names = ("base.qcow2", "app.qcow2", "base.raw", "app.raw")
    if not force and stamp.exists() and stamp.stat().st_mtime > SCRIPT.stat().st_mtime and \
            all((work / n).exists() for n in names):
        info = json.loads(stamp.read_text())
        log(f"reusing the cached workload in {work} (built {info['built_at']})")
        info["cached"] = True
        return info
    run_builder(["--_build", str(work), "--_scale", scale.name])
    info = json.loads(stamp.read_text())
    info["cached"] = False
    return info


def run_builder(args: list[str]) -> None:
    """This script with `args` (a workload build) as a child process; waits for it."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args])
    try:
        proc.wait()
    except BaseException:  # let it unmount and stop its daemon: never SIGKILL it
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"building the workload failed (exit {proc.returncode})")


def build_workload(work: Path, scale: Scale) -> dict:
    """Build base.qcow2, app.qcow2 and their raw exports in `work`."""
    stamp = work / "workload.json"
    log(f"building the {scale.name} workload in {work} (cached for later runs)")
    started = time.monotonic()
    if work.exists():
        for p in (work / "mnt", work / "export.raw"):
            if mounted(p):
                raise BenchError(f"{p} is mounted; unmount it before rebuilding")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base_list, new_list = pick_pools(scale)
    log(f"  base: {len(base_list)} files, {mib(sum(s for _, s in base_list))} MiB; "
        f"new for the child: {len(new_list)} files, {mib(sum(s for _, s in new_list))} MiB")

    stage = work / "stage"
    for path, _ in base_list:
        copy_file(path, stage / path.lstrip("/"))
    fs_raw = work / "mkfs.raw"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "benchroot", "-U", FS_UUID,
        "-E", f"hash_seed={FS_UUID},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        "-d", stage, fs_raw, str(scale.disk_size // KiB) + "k", env=env)
    shutil.rmtree(stage)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", fs_raw, work / "base.qcow2")
    fs_raw.unlink()
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "app.qcow2",
        cwd=work)
    log("  changing the child through qemu-storage-daemon (FUSE) + loop mount")
    with guest_mount(work / "app.qcow2", work) as mnt:
        df_before = shutil.disk_usage(mnt)
        changes = guest_changes(mnt, scale, base_list, new_list)
        df_after = shutil.disk_usage(mnt)
    check = run("qemu-img", "check", work / "app.qcow2", check=False)
    if check.returncode != 0:
        raise BenchError(f"qemu-img check app.qcow2 failed: {check.stdout}{check.stderr}")
    log("  exporting both to raw for the peers")
    for name in ("base", "app"):
        run("qemu-img", "convert", "-O", "raw", work / f"{name}.qcow2", work / f"{name}.raw")
    info = {
        "scale": asdict(scale),
        "built_at": dt.datetime.now().isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "base_files": len(base_list),
        "base_file_bytes": sum(s for _, s in base_list),
        "fs_used_bytes_before": df_before.used,
        "fs_used_bytes_after": df_after.used,
        "changes": changes,
        **child_allocation(work / "app.qcow2"),
        **count_changed_blocks(work / "base.raw", work / "app.raw"),
        "base_qcow2_bytes": (work / "base.qcow2").stat().st_size,
    }
    stamp.write_text(json.dumps(info, indent=2))
    log(f"  workload built in {info['build_seconds']} s: {mib(info['changed_bytes'])} MiB of "
        f"4 KiB blocks differ; the child holds {mib(info['child_data_bytes'])} MiB")
    return info


def split_parts(work: Path, parts: int) -> list[tuple[Path, Path]]:
    """base.raw and app.raw cut into `parts` equal pieces each (cached), for zstd's 2 GB
    limit: piece i of app.raw is then patched against piece i of base.raw."""
    out = []
    size = (work / "base.raw").stat().st_size
    step = size // 2 if parts == 2 else size // parts // MiB * MiB
    bounds = [(i * step, step if i < parts - 1 else size - i * step) for i in range(parts)]
    for i, (start, length) in enumerate(bounds):
        pair = []
        for name in ("base", "app"):
            dst = work / (f"{name}.half{i}.raw" if parts == 2 else f"{name}.part{i}of{parts}.raw")
            if not dst.exists() or dst.stat().st_mtime < (work / f"{name}.raw").stat().st_mtime:
                copy_sparse(work / f"{name}.raw", dst, start, length)
            pair.append(dst)
        out.append((pair[0], pair[1]))
    return out


# ---------------------------------------------------------------------------------------------
# The Debian workload (--workload debian): the real guest pair of bench/debian_guest.py
# ---------------------------------------------------------------------------------------------

DEBIAN_PREP = 1  # bump when what build_debian_workload() makes changes: the cache is redone
# Each raw image is cut into three 1 GiB parts for zstd (see zstd_peers and bench/README.md).
DEBIAN_PLAN = Plan(parts=3, slow=True, qemu_apply=True)
DEBIAN_QUICK_PLAN = Plan(parts=3, slow=False, qemu_apply=True)
GUEST_LOCK_WAIT = 1200.0  # seconds to wait while another process holds debian_guest's lock


def debian_pair(guest_dir: Path) -> dict:
    """debian_guest.build(guest_dir): the cached pair (built first if missing)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import debian_guest  # only the Debian workload needs it

    deadline = time.monotonic() + GUEST_LOCK_WAIT
    while True:
        try:
            return debian_guest.build(guest_dir)
        except debian_guest.GuestError as err:
            if "another debian_guest.py" not in str(err) or time.monotonic() > deadline:
                raise BenchError(f"the Debian guest pair: {err}") from None
            log(f"waiting for the Debian pair: {err}")
            time.sleep(15)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def build_debian_workload(work: Path, guest_dir: Path, force: bool) -> None:
    """Copies of the Debian base.qcow2/app.qcow2 in `work` and their raw exports (cached).

    Copies, not the originals: debian_guest.py may rebuild its pair while a benchmark runs,
    and the raw exports must be of exactly the images measured. The copies are checked
    against the sha256 sums in debian.json; app.qcow2's relative backing name base.qcow2
    then names the copy next to it."""
    pair = debian_pair(guest_dir)
    source = {"prep": DEBIAN_PREP, "guest_workdir": pair["workdir"],
              "guest_built_at": pair["built_at"], "base_sha256": pair["base"]["file_sha256"],
              "app_sha256": pair["app"]["file_sha256"]}
    stamp = work / "workload.json"
    names = ("base.qcow2", "app.qcow2", "base.raw", "app.raw")
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(stamp.read_text())
        if not force and old.get("source") == source and all((work / n).exists() for n in names):
            log(f"reusing the Debian disk workload in {work} (prepared {old['built_at']})")
            return
    log(f"preparing the Debian disk workload in {work} from {pair['workdir']} "
        f"(pair built {pair['built_at']})")
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for old_file in [*work.glob("*.raw"), *work.glob("*.qcow2"), *work.glob("*.tmp")]:
        old_file.unlink()
    for which in ("base", "app"):
        tmp = work / f"{which}.qcow2.tmp"
        shutil.copyfile(pair[f"{which}_qcow2"], tmp)
        if sha256_of(tmp) != source[f"{which}_sha256"]:
            tmp.unlink()
            raise BenchError(f"{pair[f'{which}_qcow2']} is not the file debian.json describes "
                             "(rebuilt meanwhile?); run again")
        os.replace(tmp, work / f"{which}.qcow2")
    app_info = json.loads(run("qemu-img", "info", "--output=json", work / "app.qcow2").stdout)
    full = Path(app_info.get("full-backing-filename", ""))
    if app_info.get("backing-filename") != "base.qcow2" or \
            (work / full).resolve() != (work / "base.qcow2").resolve():
        raise BenchError(f"app.qcow2's backing file is {app_info.get('backing-filename')!r} "
                         f"({full}), expected base.qcow2 next to it")
    log("  exporting both to raw (sparse) for the peers")
    for which in ("base", "app"):
        run("qemu-img", "convert", "-O", "raw", work / f"{which}.qcow2", work / f"{which}.raw")
    base, app = pair["base"], pair["app"]
    info = {
        "workload": "debian",
        "source": source,
        "built_at": dt.datetime.now().isoformat(timespec="seconds"),
        "disk_size": (work / "base.raw").stat().st_size,
        "base": {"suite": base.get("suite"), "include": base.get("include"),
                 "kernel_version": base.get("kernel_version"),
                 "packages": len(base.get("packages", {})),
                 "fs_used_bytes": base.get("fs_used_bytes"),
                 "data_bytes": base.get("allocation", {}).get("data_bytes")},
        "app": {"requested_packages": app.get("requested_packages"),
                "new_packages": len(app.get("new_packages", {})),
                "new_packages_installed_bytes": app.get("new_packages_installed_bytes"),
                "fs_used_bytes_before": app.get("fs_used_bytes_before"),
                "fs_used_bytes_after": app.get("fs_used_bytes_after"),
                "fstrim": app.get("fstrim")},
        **child_allocation(work / "app.qcow2"),
        **count_changed_blocks(work / "base.raw", work / "app.raw"),
        "base_qcow2_bytes": (work / "base.qcow2").stat().st_size,
        "base_raw_allocated_bytes": allocated(work / "base.raw"),
        "app_raw_allocated_bytes": allocated(work / "app.raw"),
    }
    info["build_seconds"] = round(time.monotonic() - started, 1)
    stamp.write_text(json.dumps(info, indent=2))
    log(f"  prepared in {info['build_seconds']} s: {mib(info['changed_bytes'])} MiB of 4 KiB "
        f"blocks differ; the child holds {mib(info['child_data_bytes'])} MiB")


def debian_workload(work: Path, guest_dir: Path, force: bool) -> dict:
    """The prepared Debian workload in `work` (prepared in a child process, like the build
    of the synthetic one, to keep this measuring process small)."""
    stamp = work / "workload.json"
    before = stamp.stat().st_mtime_ns if stamp.exists() else None
    run_builder(["--workload", "debian", "--_build", str(work), "--_guest", str(guest_dir)]
                + (["--rebuild"] if force else []))
    info = json.loads(stamp.read_text())
    info["cached"] = before is not None and stamp.stat().st_mtime_ns == before
    return info


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    wall: float
    rss_mib: float
    rc: int
    timed_out: bool = False
    load1: float = 0.0  # 1-minute load average when the run started (the machine is shared)
    # CPU time of the child and the descendants it waited for (ru_utime, ru_stime from the
    # same wait4): steadier than wall time on a shared machine.
    user_s: float = 0.0
    sys_s: float = 0.0

    @property
    def cpu_s(self) -> float:
        return round(self.user_s + self.sys_s, 3)


def _fork_not_vfork() -> None:
    """Does nothing; its presence alone makes subprocess use fork() (see measure_once)."""


def measure_once(cmd: list[str], logs: Path, label: str, env: dict, cwd: Path,
                 timeout: float = TIMEOUT) -> tuple[Run, str]:
    """Run one command; wall time and its peak RSS (ru_maxrss of exactly this child,
    which on Linux also covers descendants it waited for)."""
    out_path, err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
    load1 = round(os.getloadavg()[0], 2)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        # preexec_fn makes Popen fork() instead of vfork(). After vfork the child execs from
        # this process's address space and the kernel carries this process's *peak* RSS into
        # the child's ru_maxrss; after fork the floor is only this (lean) process's current
        # anonymous memory, ~10 MiB, measured and reported as `rss_floor_mib`.
        # (This process runs no threads, so preexec_fn is safe here.)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd,
                                preexec_fn=_fork_not_vfork)  # noqa: PLW1509
        timed_out = False

        def on_alarm(_signum: int, _frame: object) -> None:
            nonlocal timed_out
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)  # os.wait4 then resumes and reaps it

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: keep Popen from waiting
    return (Run(round(wall, 3), round(usage.ru_maxrss / 1024, 1), proc.returncode, timed_out,
                load1, round(usage.ru_utime, 3), round(usage.ru_stime, 3)),
            out_path.read_text(errors="replace"))


@dataclass
class Measurement:
    runs: list[Run]
    stdout: str

    @property
    def ok(self) -> bool:
        return all(r.rc == 0 for r in self.runs)

    @property
    def wall(self) -> float:
        return round(statistics.median(r.wall for r in self.runs), 3)

    @property
    def rss(self) -> float:
        return round(statistics.median(r.rss_mib for r in self.runs), 1)

    @property
    def cpu(self) -> float:
        return round(statistics.median(r.cpu_s for r in self.runs), 3)

    def to_json(self) -> dict:
        return {"wall_s_median": self.wall, "peak_rss_mib_median": self.rss,
                "cpu_s_median": self.cpu, "ok": self.ok,
                "runs": [asdict(r) | {"cpu_s": r.cpu_s} for r in self.runs]}


class Bench:
    def __init__(self, work: Path, env: dict, logs: Path) -> None:
        self.work, self.env, self.logs = work, env, logs

    def measure(self, label: str, steps: list[list[str]],
                before: Callable[[], None] | None = None,
                after: Callable[[str], None] | None = None,
                repeat: bool = True, allow_fail: bool = False) -> Measurement:
        """Run `steps` (one command, or several in sequence counted as one operation) once;
        if the whole took under REPEAT_UNDER seconds, twice more; median reported.
        `after` checks each result (and raises if it is wrong)."""
        runs: list[Run] = []
        stdout = ""
        for i in range(REPEATS if repeat else 1):
            if before:
                before()
            parts = []
            for j, cmd in enumerate(steps):
                part, out = measure_once(cmd, self.logs, f"{label}.{i}.{j}", self.env, self.work)
                parts.append(part)
                stdout += out if i == 0 else ""
                if part.rc != 0:
                    break
            total = Run(round(sum(p.wall for p in parts), 3), max(p.rss_mib for p in parts),
                        next((p.rc for p in parts if p.rc != 0), 0),
                        any(p.timed_out for p in parts), parts[0].load1,
                        round(sum(p.user_s for p in parts), 3),
                        round(sum(p.sys_s for p in parts), 3))
            runs.append(total)
            status = "timed out" if total.timed_out else f"exit {total.rc}" if total.rc else "ok"
            log(f"  {label} run {i + 1}: {total.wall:.2f} s, cpu {total.cpu_s:.2f} s, "
                f"{total.rss_mib:.0f} MiB ({status}; load {total.load1})")
            if total.rc != 0:
                if not allow_fail:
                    err = (self.logs / f"{label}.{i}.{len(parts) - 1}.stderr").read_text()
                    raise BenchError(f"{label} failed ({total.rc}): {err.strip()[-2000:]}")
                break
            if after:
                after(label)
            if total.wall >= REPEAT_UNDER:
                break
        return Measurement(runs, stdout)


def qemu_compare(a: Path, b: Path) -> None:
    proc = run("qemu-img", "compare", a, b, check=False)
    if proc.returncode != 0:
        raise BenchError(f"REBUILT DISK DIFFERS: qemu-img compare {a} {b} exited "
                         f"{proc.returncode}: {(proc.stdout + proc.stderr).strip()}")


def cmp_files(a: Path, b: Path) -> None:
    proc = run("cmp", a, b, check=False)
    if proc.returncode != 0:
        raise BenchError(f"REBUILT DISK DIFFERS: cmp {a} {b}: {(proc.stdout + proc.stderr).strip()}")


def warm(paths: list[Path]) -> None:
    """Read inputs once so every tool starts with the same (warm) page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            buf = bytearray(MiB)
            while f.readinto(buf):
                pass


def tool_versions() -> dict:
    def first_line(*cmd: str) -> str:
        proc = run(*cmd, check=False)
        text = (proc.stdout or proc.stderr).strip()
        return text.splitlines()[0] if text else "?"

    zstd = first_line("zstd", "--version")
    return {
        "vmsynth": first_line(str(VMSYNTH), "--version").replace(", version", ""),
        "python": first_line(str(VENV_BIN / "python"), "--version"),
        "qemu-img": first_line("qemu-img", "--version").replace(" version", ""),
        "xdelta3": first_line("xdelta3", "-V").split(",")[0].replace(" version", ""),
        "zstd": "zstd " + next((w.strip(",") for w in zstd.split() if w.startswith("v1")), zstd),
    }


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * KiB
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / GiB, 1),
            "kernel": platform.release(), "distro": distro, "hostname": platform.node()}


def size_of(p: Path) -> int:
    return p.stat().st_size


def profile_create(work: Path, out: Path, env: dict, level: int) -> str:
    """cProfile of one create (main thread only: compression runs on worker threads)."""
    prof = out / f"create-l{level}.prof"
    run(str(VENV_BIN / "python"), "-m", "cProfile", "-o", prof, str(VMSYNTH), "create",
        "--base", f"{BASE_NAME}@{BASE_VERSION}", "--disk", "app.qcow2",
        "-o", out / "profile.vmo", "--level", str(level), cwd=work, env=env)
    code = ("import pstats,sys; s=pstats.Stats(sys.argv[1]); s.sort_stats('tottime');"
            "s.print_stats(25)")
    text = run(str(VENV_BIN / "python"), "-c", code, prof).stdout
    (out / "profile.vmo").unlink(missing_ok=True)
    return text


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def benchmark(work: Path, with_profile: bool, results: dict,
              plan: Plan = SYNTHETIC_PLAN) -> dict:
    """Run every measurement, adding to `results` as it goes (kept even if a step fails)."""
    out = work / "out"
    logs = work / "logs"
    for d in (out, logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    home = work / "vmsynth-home"
    env = dict(os.environ, VMSYNTH_HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    bench = Bench(work, env, logs)
    base_q, app_q = work / "base.qcow2", work / "app.qcow2"
    base_r, app_r = work / "base.raw", work / "app.raw"
    base_ref = f"{BASE_NAME}@{BASE_VERSION}"

    log("warming the page cache with all inputs")
    warm([base_q, app_q, base_r, app_r])
    m = bench.measure("rss-floor", [["true"]])
    results["rss_floor"] = m.to_json() | {
        "what": "peak RSS reported for `true`: the floor under every peak RSS below"}

    # -- vmsynth ------------------------------------------------------------------------------
    def fresh_home() -> None:
        shutil.rmtree(home, ignore_errors=True)

    log("vmsynth base add (the one-time scan of the base)")
    m = bench.measure("vmsynth-base-add", [[str(VMSYNTH), "base", "add", str(base_q),
                                            "--name", BASE_NAME, "--version", BASE_VERSION,
                                            "--json"]], before=fresh_home)
    results["vmsynth_base_scan"] = m.to_json()

    levels = (3, 19) if plan.slow else (3,)
    for level, solid in itertools.product(levels, (False, True)):
        key = f"l{level}" + ("_solid" if solid else "")
        vmo = out / f"vmsynth-{key}.vmo"
        flags = ["--level", str(level)] + (["--solid"] if solid else [])
        log(f"vmsynth create {' '.join(flags)}")
        m = bench.measure(f"vmsynth-create-{key}",
                          [[str(VMSYNTH), "create", "--base", base_ref, "--disk", str(app_q),
                            "-o", str(vmo), *flags, "--json"]])
        rec = m.to_json() | {"output_bytes": size_of(vmo)}
        with contextlib.suppress(ValueError):
            rec["report"] = json.loads(m.stdout) if m.stdout.strip() else None
        results[f"vmsynth_create_{key}"] = rec

        synth = out / f"synth-{key}.qcow2"
        log(f"vmsynth apply ({' '.join(flags)} overlay)")
        m = bench.measure(f"vmsynth-apply-{key}",
                          [[str(VMSYNTH), "apply", str(vmo), "--base", base_ref,
                            "-o", str(synth), "--json"]],
                          before=lambda s=synth: s.unlink(missing_ok=True),
                          after=lambda _l, s=synth: qemu_compare(app_q, s))
        results[f"vmsynth_apply_{key}"] = m.to_json() | {"output_bytes": size_of(synth),
                                                         "identical": True}
        synth.unlink()

    flat = out / "synth-flat.qcow2"
    log("vmsynth apply --flatten (once)")
    m = bench.measure("vmsynth-apply-flatten",
                      [[str(VMSYNTH), "apply", str(out / "vmsynth-l3.vmo"), "--base", base_ref,
                        "-o", str(flat), "--flatten", "--json"]],
                      after=lambda _l: qemu_compare(app_q, flat), repeat=False)
    results["vmsynth_apply_flatten"] = m.to_json() | {"output_bytes": size_of(flat),
                                                      "identical": True}
    flat.unlink()

    if with_profile:
        log("cProfile of vmsynth create (level 3)")
        results["vmsynth_create_profile_l3"] = profile_create(work, out, env, 3)

    # -- xdelta3 ------------------------------------------------------------------------------
    vcdiff, result_raw = out / "xdelta3.vcdiff", out / "result.raw"
    if plan.slow:
        xdelta3(bench, results, base_r, app_r, vcdiff, result_raw)

    # -- zstd --patch-from: whole images, then halves (or more parts) --------------------------
    zstd_peers(bench, results, work, plan, levels, base_r, app_r, result_raw)

    # -- qemu-img's own compressed child --------------------------------------------------------
    qemu_child(bench, results, out, base_q, app_q, plan)
    return results


def xdelta3(bench: Bench, results: dict, base_r: Path, app_r: Path, vcdiff: Path,
            result_raw: Path) -> None:
    log("xdelta3 -e -9")
    m = bench.measure("xdelta3-encode", [["xdelta3", "-e", "-9", "-f", "-s", str(base_r),
                                          str(app_r), str(vcdiff)]])
    results["xdelta3_encode"] = m.to_json() | {"output_bytes": size_of(vcdiff)}
    log("xdelta3 -d")
    m = bench.measure("xdelta3-decode", [["xdelta3", "-d", "-f", "-s", str(base_r), str(vcdiff),
                                          str(result_raw)]],
                      before=lambda: result_raw.unlink(missing_ok=True),
                      after=lambda _l: cmp_files(app_r, result_raw))
    results["xdelta3_decode"] = m.to_json() | {"identical": True}
    result_raw.unlink(missing_ok=True)


def zstd_peers(bench: Bench, results: dict, work: Path, plan: Plan, levels: tuple[int, ...],
               base_r: Path, app_r: Path, result_raw: Path) -> None:
    out, logs = work / "out", work / "logs"
    for level in levels:
        patch = out / f"zstd-l{level}.zst"
        log(f"zstd -{level} --long=31 --patch-from (whole image)")
        m = bench.measure(f"zstd-l{level}-encode",
                          [["zstd", f"-{level}", "-T2", "--long=31", f"--patch-from={base_r}",
                            str(app_r), "-o", str(patch), "-f"]], allow_fail=True)
        err = (logs / f"zstd-l{level}-encode.0.0.stderr").read_text(errors="replace").strip()
        rec = m.to_json() | {"stderr": err[-500:]}
        if m.ok:
            rec["output_bytes"] = size_of(patch)
        results[f"zstd_l{level}_encode"] = rec
        if m.ok:
            log(f"zstd -d --long=31 --patch-from (level {level} patch)")
            m = bench.measure(f"zstd-l{level}-decode",
                              [["zstd", "-d", "--long=31", f"--patch-from={base_r}", str(patch),
                                "-o", str(result_raw), "-f", "-q"]],
                              before=lambda: result_raw.unlink(missing_ok=True),
                              after=lambda _l: cmp_files(app_r, result_raw))
            results[f"zstd_l{level}_decode"] = m.to_json() | {"identical": True}
            result_raw.unlink(missing_ok=True)

    n, key = plan.parts, parts_key(plan.parts)
    words = PART_WORDS.get(n, f"{n} parts")
    log(f"cutting the raw images in {words} for zstd (not timed)")
    halves = split_parts(work, n)
    how = ("base.raw and app.raw each cut at the middle into two files; app half i is patched "
           "against base half i" if n == 2 else
           f"base.raw and app.raw each cut into {n} MiB-aligned pieces (the last takes the "
           "rest); app piece i is patched against base piece i")
    results["split"] = {"how": how, "parts": n, "part_bytes": [size_of(h[0]) for h in halves]}
    if n == 2:
        results["split"]["half_bytes"] = results["split"]["part_bytes"]
    for level in levels:
        tag = "half" if n == 2 else "part"
        patches = [out / f"zstd-l{level}.{tag}{i}.zst" for i in range(n)]
        results_h = [out / f"result.{tag}{i}.raw" for i in range(n)]
        log(f"zstd -{level} --long=31 --patch-from ({words})")
        m = bench.measure(f"zstd-l{level}-{key}-encode",
                          [["zstd", f"-{level}", "-T2", "--long=31", f"--patch-from={b}",
                            str(a), "-o", str(p), "-f", "-q"]
                           for (b, a), p in zip(halves, patches)])
        results[f"zstd_l{level}_{key}_encode"] = m.to_json() | {
            "output_bytes": sum(size_of(p) for p in patches),
            "part_bytes": [size_of(p) for p in patches]}

        def check_halves(_l: str, rh: list[Path] = results_h) -> None:
            for (_, a), r in zip(halves, rh):
                cmp_files(a, r)

        log(f"zstd -d ({words}, level {level})")
        m = bench.measure(f"zstd-l{level}-{key}-decode",
                          [["zstd", "-d", "--long=31", f"--patch-from={b}", str(p), "-o", str(r),
                            "-f", "-q"] for (b, _), p, r in zip(halves, patches, results_h)],
                          after=check_halves)
        results[f"zstd_l{level}_{key}_decode"] = m.to_json() | {"identical": True}
        for r in results_h:
            r.unlink(missing_ok=True)


def qemu_child(bench: Bench, results: dict, out: Path, base_q: Path, app_q: Path,
               plan: Plan) -> None:
    """qemu-img's own answer: a compressed qcow2 child holding only the child's clusters."""
    # With a child as the source and -B naming that child's own backing file, qemu-img copies
    # only the child's clusters (zero clusters too). Other routes are wrong here: converting
    # the child with its backing cut off ("backing": null) and rebasing it onto the base
    # either drops the child's all-zero clusters (they then read the base's old data) or,
    # with -B, writes zero clusters over everything the child did not touch.
    cq = out / "qemu-zstd-child.qcow2"
    log("qemu-img convert -c zstd -B base.qcow2 of the child")
    m = bench.measure("qemu-img-convert-zstd",
                      [["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                        "-B", str(base_q), "-F", "qcow2", str(app_q), str(cq)]],
                      before=lambda: cq.unlink(missing_ok=True),
                      after=lambda _l: qemu_compare(app_q, cq))
    results["qemu_img_zstd_child"] = m.to_json() | {"output_bytes": size_of(cq),
                                                    "identical": True}
    if not plan.qemu_apply:
        return
    # Its "apply": the compressed child is bootable as it is (it decompresses on every read),
    # but the like-for-like step is what `vmsynth apply` produces: an uncompressed child of the
    # base. Same -B route as above, so only the compressed child's own clusters are copied.
    restored = out / "qemu-zstd-restored.qcow2"
    log("qemu-img convert -B base.qcow2 of the compressed child (its apply)")
    m = bench.measure("qemu-img-convert-restore",
                      [["qemu-img", "convert", "-O", "qcow2", "-B", str(base_q), "-F", "qcow2",
                        str(cq), str(restored)]],
                      before=lambda: restored.unlink(missing_ok=True),
                      after=lambda _l: qemu_compare(app_q, restored))
    results["qemu_img_zstd_child_apply"] = m.to_json() | {"output_bytes": size_of(restored),
                                                          "identical": True}
    restored.unlink(missing_ok=True)
    flat = out / "qemu-zstd-flat.qcow2"
    log("qemu-img convert of the compressed child on the base to a standalone qcow2 (once)")
    m = bench.measure("qemu-img-convert-flatten",
                      [["qemu-img", "convert", "-O", "qcow2", str(cq), str(flat)]],
                      after=lambda _l: qemu_compare(app_q, flat), repeat=False)
    results["qemu_img_zstd_child_flatten"] = m.to_json() | {"output_bytes": size_of(flat),
                                                            "identical": True}
    flat.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

VMSYNTH_ROWS = [
    ("vmsynth (default, zstd -3)", "vmsynth_create_l3", "vmsynth_apply_l3", "vmsynth", 3),
    ("vmsynth --level 19", "vmsynth_create_l19", "vmsynth_apply_l19", "vmsynth", 19),
    ("vmsynth --solid", "vmsynth_create_l3_solid", "vmsynth_apply_l3_solid", "vmsynth", 3),
    ("vmsynth --level 19 --solid", "vmsynth_create_l19_solid", "vmsynth_apply_l19_solid",
     "vmsynth", 19),
]

ROWS = [  # label, create key, apply key, kind, zstd level (for level-matched ratios)
    *VMSYNTH_ROWS,
    ("xdelta3 -e -9 (raw images)", "xdelta3_encode", "xdelta3_decode", "peer", None),
    ("zstd -3 -T2 --long=31 --patch-from (whole 2 GiB)", "zstd_l3_encode", "zstd_l3_decode",
     "peer", 3),
    ("zstd -19 -T2 --long=31 --patch-from (whole 2 GiB)", "zstd_l19_encode", "zstd_l19_decode",
     "peer", 19),
    ("zstd -3 --patch-from, two halves", "zstd_l3_halves_encode", "zstd_l3_halves_decode",
     "peer", 3),
    ("zstd -19 --patch-from, two halves", "zstd_l19_halves_encode", "zstd_l19_halves_decode",
     "peer", 19),
    ("qemu-img convert -c zstd -B base of the child (context)", "qemu_img_zstd_child", None,
     "context", None),
]


DEBIAN_ROWS = [
    *VMSYNTH_ROWS,
    ("xdelta3 -e -9 (raw images)", "xdelta3_encode", "xdelta3_decode", "peer", None),
    ("zstd -3 -T2 --long=31 --patch-from (whole 3 GiB)", "zstd_l3_encode", "zstd_l3_decode",
     "peer", 3),
    ("zstd -19 -T2 --long=31 --patch-from (whole 3 GiB)", "zstd_l19_encode", "zstd_l19_decode",
     "peer", 19),
    ("zstd -3 -T2 --long=31 --patch-from, three 1 GiB parts", "zstd_l3_parts_encode",
     "zstd_l3_parts_decode", "peer", 3),
    ("zstd -19 -T2 --long=31 --patch-from, three 1 GiB parts", "zstd_l19_parts_encode",
     "zstd_l19_parts_decode", "peer", 19),
    # qemu's qcow2 zstd compression sets no level: zstd's default, 3
    ("qcow2 child, qemu-img convert -c zstd -B base", "qemu_img_zstd_child",
     "qemu_img_zstd_child_apply", "peer", 3),
]

DEBIAN_SHORT = {row[0]: short for row, short in zip(DEBIAN_ROWS, (
    "vmsynth", "vmsynth -19", "vmsynth --solid", "vmsynth -19 --solid", "xdelta3", "zstd -3 whole", "zstd -19 whole", "zstd -3, 3 parts",
    "zstd -19, 3 parts", "qcow2 child"))}


def run_loads(m: dict | None) -> list[float]:
    return [r["load1"] for r in m.get("runs", []) if "load1" in r] if m else []


def table_rows(results: dict, scale: Scale | None, rows_spec: list | None = None) -> list[dict]:
    rows = []
    for label, ck, ak, kind, level in ROWS if rows_spec is None else rows_spec:
        c, a = results.get(ck), results.get(ak) if ak else None
        if c is None:
            continue
        if scale is not None and scale.name == "quick":
            label = label.replace("whole 2 GiB", "whole image")
        row = {"tool": label, "kind": kind, "level": level, "ok": c["ok"],
               "size_bytes": c.get("output_bytes") if c["ok"] else None,
               "create_s": c["wall_s_median"] if c["ok"] else None,
               "create_rss_mib": c["peak_rss_mib_median"] if c["ok"] else None,
               "apply_s": a["wall_s_median"] if a else None,
               "apply_rss_mib": a["peak_rss_mib_median"] if a else None,
               "create_runs": len(c["runs"]), "apply_runs": len(a["runs"]) if a else 0,
               "create_cpu_s": c.get("cpu_s_median") if c["ok"] else None,
               "apply_cpu_s": a.get("cpu_s_median") if a else None,
               "create_load1": run_loads(c), "apply_load1": run_loads(a)}
        if not c["ok"]:
            run0 = c["runs"][0]
            row["failure"] = ("timed out" if run0["timed_out"] else
                              f"exit {run0['rc']}: {c.get('stderr', '')[-200:]}")
        rows.append(row)
    return rows


COLUMNS = [("size_bytes", "overlay size"), ("create_s", "create time"),
           ("apply_s", "apply time"), ("create_rss_mib", "create peak RSS"),
           ("apply_rss_mib", "apply peak RSS")]
DEBIAN_COLUMNS = [("size_bytes", "overlay size"), ("create_s", "create time"),
                  ("create_cpu_s", "create CPU"), ("apply_s", "apply time"),
                  ("apply_cpu_s", "apply CPU"), ("create_rss_mib", "create peak RSS"),
                  ("apply_rss_mib", "apply peak RSS")]


def ratios(rows: list[dict], same_level: bool = False, columns: list | None = None) -> dict:
    """vmsynth / best peer for each column (smaller is better everywhere; < 1 = vmsynth wins).

    With `same_level`, only peers using the same zstd level as that vmsynth row count."""
    peers = [r for r in rows if r["kind"] == "peer" and r["ok"]]
    out: dict = {}
    for r in rows:
        if r["kind"] != "vmsynth" or not r["ok"]:
            continue
        per = {}
        for col, _ in COLUMNS if columns is None else columns:
            cands = [p for p in peers if p.get(col) and
                     (not same_level or p.get("level") == r.get("level"))]
            if not cands or not r.get(col):
                continue
            best = min(cands, key=lambda p: p[col])
            per[col] = {"ratio": round(r[col] / best[col], 3), "best_peer": best["tool"],
                        "best_peer_value": best[col]}
        out[r["tool"]] = per
    return out


def load_range(results: dict) -> str:
    loads = [r["load1"] for m in results.values() if isinstance(m, dict)
             for r in m.get("runs", []) if "load1" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def git_state() -> dict:
    """Which vmsynth code was measured (others edit the tree while benchmarks run)."""
    head = run("git", "rev-parse", "--short", "HEAD", cwd=REPO, check=False).stdout.strip()
    dirty = run("git", "status", "--porcelain", "--", "vmsynth", "cli", "formats", cwd=REPO,
                check=False).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    return {"head": head, "dirty_files": dirty,
            "describe": f"commit {head}" + (f" plus uncommitted changes to {len(dirty)} "
                                            "file(s) under vmsynth/, cli/, formats/"
                                            if dirty else "")}


def size_text(n: int) -> str:
    return f"{n / GiB:.2f} GiB".replace(".00 GiB", " GiB") if n >= GiB else f"{n / MiB:.0f} MiB"


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def quick_note(data: dict) -> list[str]:
    """Sizes from the last --quick run: there zstd's window spans base and image together."""
    path = SCRIPT.parent / "results-quick.json"
    try:
        quick = json.loads(path.read_text())
        rows = {r["tool"]: r for r in quick["table"]}
        v3, v19 = rows["vmsynth (default, zstd -3)"], rows["vmsynth --level 19"]
        z3 = rows["zstd -3 -T2 --long=31 --patch-from (whole image)"]
        z19 = rows["zstd -19 -T2 --long=31 --patch-from (whole image)"]
        x = rows["xdelta3 -e -9 (raw images)"]
    except (OSError, ValueError, KeyError):
        return []
    if not all(r["ok"] for r in (v3, v19, z3, z19, x)):
        return []

    def size(r: dict) -> str:
        return f"{r['size_bytes'] / MiB:.1f} MiB"

    return [(f"**At small scale** (`--quick`, {quick['meta']['date'][:16]}: a "
            f"{size_text(quick['workload']['scale']['disk_size'])} disk, where zstd's "
            "--long=31 window holds the whole base and image): vmsynth "
            f"{size(v3)} (level 3) / {size(v19)} (level 19), zstd --patch-from {size(z3)} "
            f"(-3) / {size(z19)} (-19), xdelta3 {size(x)}; vmsynth is "
            f"{v3['size_bytes'] / z3['size_bytes']:.2f}x / "
            f"{v19['size_bytes'] / z19['size_bytes']:.2f}x zstd's size there."), ""]


def write_markdown(path: Path, data: dict) -> None:
    w, meta, res = data["workload"], data["meta"], data["results"]
    ch = w["changes"]
    build_note = "was reused" if w["cached"] else f"took {w['build_seconds']:.0f} s"
    lines = [
        "# Benchmarks: vmsynth against xdelta3 and zstd --patch-from",
        "",
        (f"Generated {meta['date']} by `{meta['command']}` "
        f"(total {meta['total_seconds'] / 60:.1f} min, of which the cached workload build "
        f"{build_note}). "
        "Every number is in `bench/results.json`; `bench/README.md` explains the method."),
        "",
        (f"**Machine:** {meta['machine']['distro']}, {meta['machine']['cores']} cores "
        f"({meta['machine']['cpu']}), {meta['machine']['mem_gib']} GiB RAM, kernel "
        f"{meta['machine']['kernel']}; {meta['versions']['qemu-img']}, "
        f"{meta['versions']['xdelta3']}, {meta['versions']['zstd']}, "
        f"{meta['versions']['vmsynth']} on {meta['versions']['python']}. "
        f"vmsynth code: {meta.get('git', {}).get('describe', '?')}. "
        f"1-minute load average during the measurements: {load_range(res)} on 2 cores "
        "(the machine is shared: compare ratios taken in one run, not absolutes)."),
        "",
        (f"**Workload:** a {size_text(w['scale']['disk_size'])} base qcow2 holding an ext4 "
        f"filesystem with {w['base_files']:,} real files "
        f"({size_text(w['base_file_bytes'])} copied from /usr/lib, /usr/share, /usr/bin), "
        "and a qcow2 child of it changed by ordinary file operations through "
        "qemu-storage-daemon's FUSE export and a loop mount, as a running guest would: "
        f"{ch['new_files']:,} new files ({mib(ch['new_bytes'])} MiB not in the base), "
        f"{ch['duplicated_files']:,} base files copied elsewhere ({mib(ch['duplicated_bytes'])} "
        f"MiB), {ch['edited_files']:,} files edited in place (1-16 bytes each), "
        f"{ch['appended_files']} files appended to ({mib(ch['appended_bytes'])} MiB of text), "
        f"{ch['deleted_files']} files deleted ({mib(ch['deleted_bytes'])} MiB), "
        f"{ch['rewritten_files']} large files replaced by a modified copy "
        f"({mib(ch['rewritten_bytes'])} MiB: scattered byte changes, one rewritten 4 KiB "
        f"stretch, and a 28-byte insertion that shifts the rest), and a "
        f"{mib(ch['zero_file_bytes']):.0f} MiB new file of zeros, plus "
        f"{ch['zeroed_files']} existing files ({mib(ch['zeroed_bytes'])} MiB) overwritten "
        f"with zeros in place. Result: "
        f"{mib(w['changed_bytes'])} MiB of 4 KiB blocks differ from the base; the child "
        f"holds {mib(w['child_data_bytes'])} MiB of clusters "
        f"({mib(w['child_file_bytes'])} MiB file)."),
        "",
        ("**Method:** each command is its own subprocess; wall time, and peak RSS from "
        "`os.wait4` on that process. Commands under 10 s ran 3 times (median shown), longer "
        "ones once. Runs are **warm**: all inputs were read into the page cache first (24 GiB "
        "RAM; the cache was not dropped). vmsynth's base was scanned once by `vmsynth base add` "
        f"beforehand ({fmt(res['vmsynth_base_scan']['wall_s_median'])} s, "
        f"{fmt(res['vmsynth_base_scan']['peak_rss_mib_median'], 0)} MiB peak RSS), not "
        "counted in create. vmsynth reads the qcow2 images; the peers read the raw exports "
        "(`qemu-img convert -O raw`, not counted). Every rebuilt disk was checked identical "
        "(`qemu-img compare` against app.qcow2 for vmsynth, `cmp` against app.raw for the "
        "peers)."),
        "",
        ("| tool | overlay size (MiB) | create (s) | apply (s) | create peak RSS (MiB) "
        "| apply peak RSS (MiB) |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["table"]:
        if r["ok"]:
            lines.append(f"| {r['tool']} | {fmt(r['size_bytes'] and r['size_bytes'] / MiB, 1)} "
                         f"| {fmt(r['create_s'])} | {fmt(r['apply_s'])} "
                         f"| {fmt(r['create_rss_mib'], 0)} | {fmt(r['apply_rss_mib'], 0)} |")
        else:
            lines.append(f"| {r['tool']} | failed: {r['failure']} | | | | |")
    flat = res.get("vmsynth_apply_flatten")
    lines += [""]
    if flat:
        lines.append(f"`vmsynth apply --flatten` (a standalone qcow2 instead of a child of the "
                     f"base; includes vmsynth's own `qemu-img convert`): "
                     f"{fmt(flat['wall_s_median'])} s, {fmt(flat['peak_rss_mib_median'], 0)} MiB "
                     f"peak RSS, {mib(flat['output_bytes'])} MiB output.")
        lines.append("")
    ctx = res.get("qemu_img_zstd_child")
    if ctx:
        lines.append("The qemu-img row is context, not a peer: `qemu-img convert -c -O qcow2 -o "
                     "compression_type=zstd -B base.qcow2 -F qcow2 app.qcow2 out.qcow2` "
                     "compresses the child's own 64 KiB clusters (no dedupe, no delta) into a "
                     "new child of the base; there is no apply step (the guest decompresses on "
                     "read), and it too compared identical.")
        lines.append("")
    def window_warning(stderr: str) -> str:
        return next((ln.strip() for ln in stderr.splitlines() if "window" in ln.lower()), "")

    z = res.get("zstd_l3_encode", {})
    if z and z.get("ok") and "window" in z.get("stderr", "").lower():
        lines.append(f"zstd accepts a 2 GiB input exactly (it refuses anything larger with "
                     f"\"error 42: Can't handle files larger than 2 GB\") but warns "
                     f"\"{window_warning(z['stderr'])}\": with --long=31 its window "
                     "cannot span the 2 GiB base plus the 2 GiB input. The halves rows cut "
                     "both raw images at 1 GiB and patch each half of app.raw against the "
                     "same half of base.raw (sizes, times summed; RSS is the larger half); "
                     "cutting files is not counted.")
    elif z and not z.get("ok"):
        lines.append("zstd refused the whole image; the halves rows cut both raw images at the "
                     "middle and patch each half of app.raw against the same half of base.raw "
                     "(sizes and times summed; RSS the larger half).")
    lines += ["", ("**vmsynth / best peer** (below 1: vmsynth is better; the best peer for that "
              "column in brackets):"), ""]
    for tool, per in data["ratios"].items():
        parts = [f"{title} {v['ratio']:.2f}x ({v['best_peer']})"
                 for col, title in COLUMNS if (v := per.get(col))]
        lines.append(f"- {tool}: " + "; ".join(parts))
    lines += ["", ("**Same zstd level only** (vmsynth level 3 against zstd -3, level 19 against "
              "zstd -19):"), ""]
    for tool, per in data.get("ratios_same_level", {}).items():
        parts = [f"{title} {v['ratio']:.2f}x ({v['best_peer']})"
                 for col, title in COLUMNS if (v := per.get(col))]
        lines.append(f"- {tool}: " + "; ".join(parts))
    lines.append("")
    lines += quick_note(data)
    path.write_text("\n".join(lines))


def load_cell(row: dict) -> str:
    """1-minute load average at the start of the runs: create / apply (the largest if a
    command ran more than once)."""
    parts = [f"{max(v):.2f}" if v else "—" for v in (row.get("create_load1"),
                                                    row.get("apply_load1"))]
    return " / ".join(parts)


def write_markdown_debian(path: Path, data: dict) -> None:
    """The Debian section (merged into BENCHMARKS.md by hand): bench/DISK-DEBIAN.md."""
    w, meta, res = data["workload"], data["meta"], data["results"]
    b, a = w["base"], w["app"]
    prep_note = ("were reused from an earlier run" if w["cached"]
                 else f"were made first, in {w['build_seconds']:.0f} s")
    la, lb = meta["loadavg_before"], meta["loadavg_after"]
    lines = [
        "## Disk overlays of a real Debian 12 guest",
        "",
        (f"Generated {meta['date']} by `{meta['command']}` (total "
         f"{meta['total_seconds'] / 60:.1f} min; the copies of the pair and their raw "
         f"exports {prep_note}). Every number is in `bench/{meta['results_file']}`; "
         "`bench/README.md` explains the method."
         + (" **Smoke run (`--quick`): vmsynth --level 19, xdelta3 and zstd -19 were "
            "skipped.**" if meta["quick"] else "")),
        "",
        (f"**Machine:** {meta['machine']['distro']}, {meta['machine']['cores']} cores "
         f"({meta['machine']['cpu']}), {meta['machine']['mem_gib']} GiB RAM, kernel "
         f"{meta['machine']['kernel']}; {meta['versions']['qemu-img']}, "
         f"{meta['versions']['xdelta3']}, {meta['versions']['zstd']}, "
         f"{meta['versions']['vmsynth']} on {meta['versions']['python']}. "
         f"vmsynth code: {meta.get('git', {}).get('describe', '?')}. "
         f"1-minute load average at the start of the measured runs: {load_range(res)} on "
         f"{meta['machine']['cores']} cores (before the run {la[0]:.2f}, after {lb[0]:.2f}; "
         "per row in the last column). The machine is shared: CPU time (user + system, from "
         "the same `wait4` as the peak RSS) moves less with other load than wall time does."),
        "",
        (f"**Workload** (`bench/debian_guest.py`): `base.qcow2`, a "
         f"{size_text(w['disk_size'])} disk holding one ext4 filesystem with Debian 12 "
         f"({b['suite']}: debootstrap minbase plus {', '.join(b['include'] or [])}; "
         f"{b['packages']} packages, kernel {b['kernel_version']}; "
         f"{mib(b['data_bytes'] or 0):.0f} MiB of data clusters), and `app.qcow2`, a qcow2 "
         "child of it customized the way a guest is: through qemu-storage-daemon's FUSE "
         "export, a loop mount and a chroot, `apt-get install --no-install-recommends` of "
         f"{len(a['requested_packages'] or [])} Python data packages "
         f"({a['new_packages']} new packages, "
         f"{mib(a['new_packages_installed_bytes'] or 0):.0f} MiB installed), an app service, "
         f"then `apt-get clean` and `fstrim`. Result: {mib(w['changed_bytes']):.0f} MiB of "
         f"4 KiB blocks differ from the base ({w['changed_blocks_now_zero'] * 4096 / MiB:.0f} "
         f"MiB of them now zero); the child holds {mib(w['child_data_bytes']):.0f} MiB of data "
         f"clusters and {mib(w['child_zero_bytes']):.0f} MiB of zero clusters "
         f"({mib(w['child_file_bytes']):.0f} MiB file). The peers read sparse raw exports "
         f"(`qemu-img convert -O raw`, not timed: {mib(w['base_raw_allocated_bytes']):.0f} "
         f"and {mib(w['app_raw_allocated_bytes']):.0f} MiB allocated of "
         f"{size_text(w['disk_size'])} each)."),
        "",
        ("**Method:** as for the synthetic workload: each command its own subprocess; wall "
         "time, CPU time (user + system) and peak RSS from `os.wait4` on that process; "
         "commands under 10 s ran 3 times (median shown), longer ones once; warm page cache; "
         "vmsynth's base scanned once beforehand by `vmsynth base add` "
         f"({fmt(res['vmsynth_base_scan']['wall_s_median'])} s, "
         f"{fmt(res['vmsynth_base_scan'].get('cpu_s_median'))} s CPU, "
         f"{fmt(res['vmsynth_base_scan']['peak_rss_mib_median'], 0)} MiB), not counted in "
         "create. Every rebuilt disk was checked identical (`qemu-img compare` against "
         "app.qcow2 for vmsynth and the qcow2 child, `cmp` against app.raw for the peers). "
         "zstd refuses a 3 GiB input outright (\"error 42: Can't handle files larger than "
         "2 GB\"), so its rows cut both raw images into three 1 GiB parts and patch part i of "
         "app.raw against part i of base.raw (the same rule as the two 1 GiB halves of the "
         "2 GiB synthetic disk: base part plus input part fit zstd's 2 GiB --long=31 window); "
         "sizes, times and CPU are summed over the parts, RSS is the largest part's. The qcow2 "
         "child is `qemu-img convert -c -O qcow2 -o compression_type=zstd -B base.qcow2 -F "
         "qcow2 app.qcow2 child.qcow2` (only the child's own clusters, compressed, in a new "
         "child of the base; qemu sets no zstd level, so zstd's default 3: it counts as a "
         "level-3 peer); its apply is `qemu-img convert -O qcow2 -B base.qcow2 -F qcow2 "
         "child.qcow2 restored.qcow2`: an uncompressed child of the base, exactly what "
         "`vmsynth apply` makes (the compressed child also boots as it is, with no apply "
         "step, paying zstd decompression on every read instead)."),
        "",
        ("In brackets on the vmsynth rows: **vmsynth / best peer** for that column (below 1: "
         "vmsynth is better; the best peers are named below the table)."),
        "",
        ("| tool | overlay size (MiB) | create (s) | create CPU (s) | apply (s) "
         "| apply CPU (s) | create peak RSS (MiB) | apply peak RSS (MiB) "
         "| load at start (create / apply) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratio_of = data["ratios"]

    def cell(r: dict, col: str, value: float | None, digits: int) -> str:
        text = fmt(value, digits)
        v = ratio_of.get(r["tool"], {}).get(col)
        return f"{text} ({v['ratio']:.2f}×)" if v and value is not None else text

    for r in data["table"]:
        if not r["ok"]:
            why = " ".join(r["failure"].replace("|", "/").split())
            lines.append(f"| {r['tool']} | failed: {why} | | | | | | "
                         f"| {load_cell(r)} |")
            continue
        size = r["size_bytes"] and r["size_bytes"] / MiB
        lines.append(
            f"| {r['tool']} | {cell(r, 'size_bytes', size, 1)} "
            f"| {cell(r, 'create_s', r['create_s'], 2)} "
            f"| {cell(r, 'create_cpu_s', r['create_cpu_s'], 2)} "
            f"| {cell(r, 'apply_s', r['apply_s'], 2)} "
            f"| {cell(r, 'apply_cpu_s', r['apply_cpu_s'], 2)} "
            f"| {cell(r, 'create_rss_mib', r['create_rss_mib'], 0)} "
            f"| {cell(r, 'apply_rss_mib', r['apply_rss_mib'], 0)} | {load_cell(r)} |")
    lines.append("")
    for title, key in (("Best peers", "ratios"),
                       (("Same zstd level only (vmsynth level 3 against the zstd -3 rows, "
                         "level 19 against zstd -19)"), "ratios_same_level")):
        lines += [f"**{title}:**", ""]
        for tool, per in data[key].items():
            parts = [f"{name} {v['ratio']:.2f}× "
                     f"({DEBIAN_SHORT.get(v['best_peer'], v['best_peer'])})"
                     for col, name in DEBIAN_COLUMNS if (v := per.get(col))]
            lines.append(f"- {tool}: " + "; ".join(parts))
        lines.append("")
    extras = []
    flat = res.get("vmsynth_apply_flatten")
    if flat:
        extras.append(f"`vmsynth apply --flatten` (a standalone qcow2; includes vmsynth's own "
                      f"`qemu-img convert`): {fmt(flat['wall_s_median'])} s, "
                      f"{fmt(flat.get('cpu_s_median'))} s CPU, "
                      f"{fmt(flat['peak_rss_mib_median'], 0)} MiB peak RSS, "
                      f"{mib(flat['output_bytes'])} MiB output.")
    qflat = res.get("qemu_img_zstd_child_flatten")
    if qflat:
        extras.append(f"The same for the qcow2 child (`qemu-img convert -O qcow2 child.qcow2 "
                      f"flat.qcow2`, through its backing file): {fmt(qflat['wall_s_median'])} s, "
                      f"{fmt(qflat.get('cpu_s_median'))} s CPU, "
                      f"{fmt(qflat['peak_rss_mib_median'], 0)} MiB peak RSS, "
                      f"{mib(qflat['output_bytes'])} MiB output.")
    floor = res.get("rss_floor")
    if floor:
        f_mib = floor["peak_rss_mib_median"]
        at_floor = [DEBIAN_SHORT.get(r["tool"], r["tool"]) for r in data["table"] if r["ok"]
                    and any(v is not None and v <= f_mib + 1
                            for v in (r["create_rss_mib"], r["apply_rss_mib"]))]
        extras.append(f"Peak RSS floor (what `true` reports when started the same way: the "
                      f"measuring process forks each command): {fmt(f_mib, 0)} MiB."
                      + (f" The {', '.join(at_floor)} row's peak RSS is at that floor: the "
                         "tool's own peak is at most that, so vmsynth's RSS ratios against it "
                         "understate the difference." if at_floor else ""))
    for line in extras:
        lines += [line, ""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where images and outputs go (default {DEFAULT_WORKDIR})")
    ap.add_argument("--workload", choices=("synthetic", "debian"), default="synthetic",
                    help="synthetic (default): the generated ext4 disk, writes BENCHMARKS.md; "
                         "debian: the real Debian 12 pair of bench/debian_guest.py, writes "
                         "bench/results-debian.json and bench/DISK-DEBIAN.md")
    ap.add_argument("--quick", action="store_true",
                    help="a 256 MiB workload for a smoke run; writes bench/results-quick.json "
                         "and leaves BENCHMARKS.md alone (with --workload debian: the same "
                         "images, but without vmsynth --level 19, xdelta3 and zstd -19; writes "
                         "bench/results-debian-quick.json and WORKDIR/debian-disk/"
                         "DISK-DEBIAN-quick.md)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached workload")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite BENCHMARKS.md from bench/results.json")
    ap.add_argument("--profile", action="store_true",
                    help="also record a cProfile of vmsynth create in the results")
    ap.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_scale", choices=("full", "quick"), help=argparse.SUPPRESS)
    ap.add_argument("--_guest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build:  # internal: the workload build, in its own process (see workload())
        signal.signal(signal.SIGTERM, lambda s, _f: sys.exit(128 + s))
        try:
            if args.workload == "debian":
                build_debian_workload(args._build.resolve(), args._guest, args.rebuild)
                return 0
            build_workload(args._build, QUICK if args._scale == "quick" else FULL)
        except BenchError as err:
            log(f"BUILD FAILED: {err}")
            return 1
        return 0
    if args.workload == "debian":
        return main_debian(args)
    if args.report_only:
        data = json.loads((SCRIPT.parent / "results.json").read_text())
        data["table"] = table_rows(data["results"], FULL)
        data["ratios"] = ratios(data["table"])
        data["ratios_same_level"] = ratios(data["table"], same_level=True)
        write_markdown(REPO / "BENCHMARKS.md", data)
        log(f"rewrote {REPO / 'BENCHMARKS.md'} from bench/results.json ({data['meta']['date']})")
        return 0
    why = missing_prerequisite(
        "disk_bench.py", "mount, loop devices",
        ("qemu-img", "qemu-storage-daemon", "xdelta3", "zstd", "mkfs.ext4", "cmp"),
        "qemu-utils xdelta3 zstd e2fsprogs")
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    exit_on(signal.SIGTERM)
    scale = QUICK if args.quick else FULL
    work = args.workdir.resolve() / scale.name
    started = time.monotonic()
    load_before = os.getloadavg()
    git_at_start = git_state()
    results: dict = {}
    try:
        info = workload(work / "workload", scale, args.rebuild)
        benchmark(work / "workload", args.profile, results)
    except BenchError as err:
        log(f"BENCH FAILED: {err}")
        if results:
            partial = work / "results-partial.json"
            partial.write_text(json.dumps({"error": str(err), "results": results}, indent=2))
            log(f"what was measured before the failure: {partial}")
        return 1
    command = "/work/main/.venv/bin/python bench/disk_bench.py" + (" --quick" if args.quick
                                                                   else "")
    data = {
        "meta": {"date": dt.datetime.now().isoformat(timespec="seconds"),
                 "command": command, "quick": args.quick, "workdir": str(work),
                 "total_seconds": round(time.monotonic() - started, 1),
                 "warm_page_cache": True, "repeat_under_s": REPEAT_UNDER, "repeats": REPEATS,
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "machine": machine(), "versions": tool_versions(), "git": git_at_start},
        "workload": info,
        "results": results,
    }
    data["table"] = table_rows(results, scale)
    data["ratios"] = ratios(data["table"])
    data["ratios_same_level"] = ratios(data["table"], same_level=True)
    out_json = SCRIPT.parent / ("results-quick.json" if args.quick else "results.json")
    out_json.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {out_json}")
    if not args.quick:
        write_markdown(REPO / "BENCHMARKS.md", data)
        log(f"wrote {REPO / 'BENCHMARKS.md'}")
    for r in data["table"]:
        log(f"  {r['tool']}: " + (f"{fmt(r['size_bytes'] and r['size_bytes'] / MiB, 1)} MiB, "
                                  f"create {fmt(r['create_s'])} s, apply {fmt(r['apply_s'])} s"
                                  if r["ok"] else f"failed ({r['failure']})"))
    log(f"total {data['meta']['total_seconds']:.0f} s")
    return 0


def debian_outputs(quick: bool, work: Path) -> tuple[Path, Path]:
    if quick:
        return SCRIPT.parent / "results-debian-quick.json", work / "DISK-DEBIAN-quick.md"
    return SCRIPT.parent / "results-debian.json", SCRIPT.parent / "DISK-DEBIAN.md"


def finish_debian(data: dict) -> None:
    data["table"] = table_rows(data["results"], None, DEBIAN_ROWS)
    data["ratios"] = ratios(data["table"], columns=DEBIAN_COLUMNS)
    data["ratios_same_level"] = ratios(data["table"], same_level=True, columns=DEBIAN_COLUMNS)


def main_debian(args: argparse.Namespace) -> int:
    """--workload debian: the real Debian pair. Never touches BENCHMARKS.md or results.json."""
    work = args.workdir.resolve() / "debian-disk"
    out_json, out_md = debian_outputs(args.quick, work)
    if args.report_only:
        data = json.loads(out_json.read_text())
        finish_debian(data)
        write_markdown_debian(out_md, data)
        log(f"rewrote {out_md} from {out_json.name} ({data['meta']['date']})")
        return 0
    why = missing_prerequisite(
        "disk_bench.py", "and building the Debian pair: debootstrap, mount",
        ("qemu-img", "xdelta3", "zstd", "cmp"), "qemu-utils xdelta3 zstd diffutils")
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    exit_on(signal.SIGTERM)
    plan = DEBIAN_QUICK_PLAN if args.quick else DEBIAN_PLAN
    started = time.monotonic()
    load_before = os.getloadavg()
    git_at_start = git_state()
    results: dict = {}
    try:
        info = debian_workload(work, args.workdir.resolve() / "debian", args.rebuild)
        benchmark(work, args.profile, results, plan)
    except BenchError as err:
        log(f"BENCH FAILED: {err}")
        if results:
            partial = work / "results-partial.json"
            partial.write_text(json.dumps({"error": str(err), "results": results}, indent=2))
            log(f"what was measured before the failure: {partial}")
        return 1
    command = ("/work/main/.venv/bin/python bench/disk_bench.py --workload debian"
               + (" --quick" if args.quick else ""))
    data = {
        "meta": {"date": dt.datetime.now().isoformat(timespec="seconds"),
                 "command": command, "workload": "debian", "quick": args.quick,
                 "workdir": str(work), "results_file": out_json.name,
                 "total_seconds": round(time.monotonic() - started, 1),
                 "warm_page_cache": True, "repeat_under_s": REPEAT_UNDER, "repeats": REPEATS,
                 "timeout_s": TIMEOUT, "plan": asdict(plan),
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "machine": machine(), "versions": tool_versions(), "git": git_at_start},
        "workload": info,
        "results": results,
    }
    finish_debian(data)
    out_json.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {out_json}")
    write_markdown_debian(out_md, data)
    log(f"wrote {out_md}")
    for r in data["table"]:
        log(f"  {r['tool']}: " + (f"{fmt(r['size_bytes'] and r['size_bytes'] / MiB, 1)} MiB, "
                                  f"create {fmt(r['create_s'])} s ({fmt(r['create_cpu_s'])} s "
                                  f"CPU), apply {fmt(r['apply_s'])} s "
                                  f"({fmt(r['apply_cpu_s'])} s CPU)"
                                  if r["ok"] else f"failed ({r['failure'].strip()})"))
    log(f"total {data['meta']['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
