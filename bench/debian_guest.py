#!/usr/bin/env python3
"""A real Debian guest pair for benchmarks: base.qcow2 and its customized child app.qcow2.

    python3 bench/debian_guest.py [--workdir DIR] [--rebuild] [--check]

- base.qcow2: Debian 12 (debootstrap minbase + kernel, systemd, udev, dbus) on an ext4
  filesystem that fills the whole 3 GiB disk (no partition table, root is /dev/vda). When booted
  it prints "VMSYNTH-READY base" on ttyS0. Its kernel and initrd are kept next to it
  (vmlinuz, initrd.img) for direct kernel boot.
- app.qcow2: a qcow2 child of base.qcow2, changed the way a running guest changes its disk:
  exported with qemu-storage-daemon's FUSE export, loop-mounted, chroot + apt-get install of
  ~300 MB of Python data packages, apt-get clean and fstrim, plus an "app" (a systemd service
  running python3 with numpy and pandas in memory) that prints "VMSYNTH-READY app" once it has
  started, then "VMSYNTH-ALIVE 1", "VMSYNTH-ALIVE 2", ... once a second (a heartbeat that
  shows a VM resumed from a memory snapshot running on).

Built once and cached in WORKDIR (default .build/bench/debian); debian.json, written last, says
the pair is complete. --rebuild builds again; --check boots throwaway children of both images
under TCG with `vmsynth boot`, records the time to the ready line, and stores it in debian.json.

Importable: build(workdir, rebuild) -> dict and boot_args(which, workdir) -> list[str].
Building needs root (debootstrap, mount, chroot), /dev/fuse, qemu-utils and network access
to deb.debian.org; --check needs the vmsynth venv (.venv/bin/vmsynth) and qemu-system-x86.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VMSYNTH = REPO / ".venv" / "bin" / "vmsynth"
DEFAULT_WORKDIR = REPO / ".build" / "bench" / "debian"

# Bump when the recipe changes: a cache built by another recipe is then rebuilt.
# RECIPE covers the pair (debian.json), BASE_RECIPE the base alone (base.json): bump only
# RECIPE when just the child changes, and the cached base is reused (only the app rebuilds).
# 3: the app prints a heartbeat after its ready line.
RECIPE = 3
BASE_RECIPE = 2

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEBOOTSTRAP = "/usr/sbin/debootstrap"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# dbus is not in the brief's list: without it systemd-logind does not run, so the guest
# ignores the ACPI power button and every `vmsynth boot` stop would wait out its grace period.
INCLUDE = ("linux-image-amd64", "systemd-sysv", "udev", "dbus")
# ~300 MB installed with --no-install-recommends (python3-scipy would pull in pythran, gcc and
# boost: ~650 MB, so it is left out).
APP_PACKAGES = ("python3", "python3-numpy", "python3-pandas", "python3-sympy", "python3-numexpr",
                "python3-tables", "libopenblas0-pthread", "python3-h5py", "python3-pil",
                "python3-lxml", "python3-networkx", "python3-openpyxl", "python3-bs4",
                "python3-yaml", "python3-requests")
DISK_SIZE = 3 * GiB
FS_UUID = "d3b1a2c0-0d15-4b3e-9c1e-bec4c4a1de12"  # fixed: reproducible filesystem metadata
FAKE_TIME = "1700000000"  # mkfs timestamps
MACHINE_ID = "5eb1a2c00d154b3e9c1ebec4c4a1de12"  # fixed, so boots of base and app agree
# Timers that would wake a benchmark guest for background work (none can succeed offline).
QUIET_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                "e2scrub_all.timer", "fstrim.timer")
APPEND = "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 net.ifnames=0"
READY = {"base": "VMSYNTH-READY base", "app": "VMSYNTH-READY app"}
# After its ready line the app prints "VMSYNTH-ALIVE <n>" (n = 1, 2, ...) once a second, so a
# VM resumed from a memory snapshot can be seen to run on: the next line is n + 1.
ALIVE = "VMSYNTH-ALIVE"
BOOT_TIMEOUT = 300
STAMP, BASE_STAMP = "debian.json", "base.json"
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive"}
CMD_TIMEOUT = 3600.0  # seconds for one build step (debootstrap, apt-get) before giving up

READY_UNIT = f"""\
[Unit]
Description=vmsynth benchmark: ready line on the serial console
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{READY['base']}" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

APP_UNIT = """\
[Unit]
Description=vmsynth benchmark app: python3 holding numpy and pandas data
After=multi-user.target

[Service]
Type=simple
Environment=OPENBLAS_NUM_THREADS=1
ExecStart=/usr/bin/python3 /opt/vmsynth-app/app.py

[Install]
WantedBy=multi-user.target
"""

APP_PY = f'''\
"""vmsynth benchmark app: keeps numpy, pandas and some data in memory, then prints a
heartbeat on the serial console once a second."""
import time

import numpy as np
import pandas as pd

rng = np.random.default_rng(20240601)
table = pd.DataFrame(rng.standard_normal((262144, 16)),  # 32 MiB of float64
                     columns=[f"x{{i}}" for i in range(16)])
table["bucket"] = (table["x0"] * 8).round().astype("int64")
summary = table.groupby("bucket").mean()
print(f"numpy {{np.__version__}}, pandas {{pd.__version__}}, {{len(summary)}} groups", flush=True)
with open("/dev/ttyS0", "w", buffering=1) as tty:  # line-buffered: each line goes out whole
    tty.write("{READY['app']}\\n")
    beat = 0
    while True:
        time.sleep(1)
        beat += 1
        tty.write(f"{ALIVE} {{beat}}\\n")
'''


class GuestError(RuntimeError):
    """A failed build or check step: reported as one `error: ...` line."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------

def _stop_group(proc: subprocess.Popen) -> None:
    """End a helper and everything it started (its own session), politely then firmly."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    # A child that outlived its leader (e.g. dpkg under a killed apt-get) is still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(*args: str | Path, cwd: Path | None = None, env: dict | None = None,
        log_to: Path | None = None, timeout: float = CMD_TIMEOUT) -> str:
    """Run a helper command; its stdout, or GuestError with the end of its output.

    Each command gets its own session so that on a timeout, Ctrl-C or SIGTERM the whole tree
    is stopped here: nothing may keep a mount busy while the finally blocks unmount."""
    cmd = [str(a) for a in args]
    out = open(log_to, "a") if log_to else subprocess.PIPE  # noqa: SIM115
    try:
        if log_to:
            print(f"$ {' '.join(cmd)}", file=out, flush=True)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except BaseException:
            _stop_group(proc)
            raise
    except subprocess.TimeoutExpired:
        raise GuestError(f"{cmd[0]} took more than {timeout:.0f} s: {' '.join(cmd)}") from None
    finally:
        if log_to:
            out.close()
    if proc.returncode != 0:
        text = Path(log_to).read_text(errors="replace") if log_to else stdout or ""
        tail = " | ".join(text.strip().splitlines()[-8:])
        where = f" (log: {log_to})" if log_to else ""
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}){where}: {tail}")
    return stdout or ""


def chroot(root: Path, *args: str, log_to: Path | None = None) -> str:
    """A command inside the guest tree, with a clean environment (no host paths leak in)."""
    return run("chroot", root, *args, env=CHROOT_ENV, log_to=log_to)


def kill_chrooted(root: Path) -> list[int]:
    """Kill processes whose root directory is inside `root` (left by our chroot commands)."""

    def inside() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    proc_root = os.readlink(entry / "root")
                    if proc_root == str(root) or proc_root.startswith(f"{root}/"):
                        pids.append(int(entry.name))
        return pids

    if not inside():
        return []
    time.sleep(1)  # processes of a group just stopped by _stop_group may still be exiting
    killed = inside()
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if killed:
        time.sleep(0.5)
        log(f"WARNING: killed processes left inside {root}: {killed}")
    return killed


# -- mounts -----------------------------------------------------------------------------------

def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with spaces and such written as octal escapes.
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                for line in f if len(line.split()) > 4]


def mounts_under(path: Path, include_self: bool = False) -> list[str]:
    """Mount points below `path` (and `path` itself if asked), deepest first."""
    p = str(path)
    found = [m for m in mount_points()
             if m.startswith(p + "/") or (include_self and m == p)]
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def unmount(target: str) -> None:
    """Unmount one mount point; retried, then lazily detached with a warning."""
    for attempt in range(3):
        if subprocess.run(["umount", target], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(1 + attempt)
    log(f"WARNING: {target} would not unmount; detaching it lazily")
    subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def unmount_under(path: Path, include_self: bool = False) -> None:
    if mounts_under(path, include_self):
        kill_chrooted(path)
    for target in mounts_under(path, include_self):
        unmount(target)


@contextlib.contextmanager
def chroot_env(root: Path, network: bool = False) -> Iterator[None]:
    """/proc, /sys, /dev (and the host's resolv.conf for apt) inside `root`, and a policy-rc.d
    that keeps package scripts from starting services; all undone whatever happens."""
    if mounts_under(root):
        raise GuestError(f"something is already mounted below {root}; unmount it first")
    policy = root / "usr/sbin/policy-rc.d"
    resolv = root / "etc/resolv.conf"
    try:
        run("mount", "-t", "proc", "proc", root / "proc")
        run("mount", "-t", "sysfs", "sysfs", root / "sys")
        run("mount", "--bind", "/dev", root / "dev")
        run("mount", "--bind", "/dev/pts", root / "dev/pts")
        if network:
            # A symlink here would be followed on the host side by the bind mount.
            if resolv.is_symlink() or not resolv.is_file():
                raise GuestError(f"{resolv} is not a regular file; refusing to bind over it")
            run("mount", "--bind", "/etc/resolv.conf", resolv)
        policy.write_text("#!/bin/sh\n# vmsynth build: start no services in the chroot\nexit 101\n")
        policy.chmod(0o755)
        yield
    finally:
        with contextlib.suppress(OSError):
            policy.unlink()
        kill_chrooted(root)
        unmount_under(root)
        if mounts_under(root):
            raise GuestError(f"could not unmount everything below {root}: {mounts_under(root)}")


@contextlib.contextmanager
def guest_disk(child: Path, work: Path, log_to: Path) -> Iterator[Path]:
    """Loop-mount the filesystem of `child` through qemu-storage-daemon's writable FUSE export.

    discard=unmap lets fstrim reach the qcow2 (freed guest blocks become zero clusters). Always
    unmounts, detaches the loop device and stops the daemon, whatever happens inside."""
    export, mnt = work / "export.raw", work / "mnt"
    for p in (export, mnt):
        if p.exists() and (mounts_under(p, include_self=True)):
            raise GuestError(f"{p} is still mounted from an earlier run; unmount it first")
    export.touch()
    mnt.mkdir(exist_ok=True)
    with open(log_to, "ab") as daemon_log:
        daemon = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f0,filename={child},discard=unmap",
             "--blockdev", "driver=qcow2,node-name=d0,file=f0,discard=unmap",
             "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={export},writable=on"],
            stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while str(export) not in mount_points():
            if daemon.poll() is not None:
                raise GuestError(f"qemu-storage-daemon exited ({daemon.returncode}); see {log_to}")
            if time.monotonic() > deadline:
                raise GuestError("qemu-storage-daemon's FUSE export did not appear in 30 s")
            time.sleep(0.05)
        run("mount", "-o", "loop", export, mnt)
        yield mnt
    finally:
        try:
            os.sync()
            unmount_under(mnt, include_self=True)
            for line in subprocess.run(["losetup", "-j", str(export)], capture_output=True,
                                       text=True, check=False).stdout.splitlines():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True,
                               check=False)
        finally:
            if daemon.poll() is None:  # SIGTERM: the daemon flushes, closes and unmounts
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    log("WARNING: qemu-storage-daemon ignored SIGTERM; killing it")
                    daemon.kill()
                    daemon.wait()
            if str(export) in mount_points():
                subprocess.run(["fusermount3", "-u", str(export)], capture_output=True, check=False)
            if daemon.returncode not in (0, None):
                log(f"WARNING: qemu-storage-daemon exited with {daemon.returncode}")
            with contextlib.suppress(OSError):
                export.unlink()
            with contextlib.suppress(OSError):
                mnt.rmdir()


# -- facts ------------------------------------------------------------------------------------

def file_state(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocation(image: Path, own_only: bool) -> dict:
    """Bytes of data and zero clusters the image itself holds (backing cut off for a child)."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}
    if own_only:
        spec["backing"] = None
    entries = json.loads(run("qemu-img", "map", "--output=json", f"json:{json.dumps(spec)}"))
    info = json.loads(run("qemu-img", "info", "--output=json", image))
    return {"file_bytes": image.stat().st_size, "host_allocated_bytes": info["actual-size"],
            "virtual_bytes": info["virtual-size"],
            "data_bytes": sum(e["length"] for e in entries if e.get("present") and e["data"]),
            "zero_bytes": sum(e["length"] for e in entries
                              if e.get("present") and not e["data"])}


def installed_packages(root: Path) -> dict[str, dict]:
    """name -> {version, kib} from the guest's dpkg status file (no chroot needed)."""
    out: dict[str, dict] = {}
    for para in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status") == "install ok installed":
            out[fields["Package"]] = {"version": fields.get("Version", ""),
                                      "kib": int(fields.get("Installed-Size", "0") or 0)}
    return out


def ext4_usage(raw: Path) -> dict:
    text = run("dumpe2fs", "-h", raw)
    get = {k: int(v) for k, v in re.findall(r"^(Block count|Free blocks|Block size):\s+(\d+)",
                                            text, re.MULTILINE)}
    return {"fs_bytes": get["Block count"] * get["Block size"],
            "fs_used_bytes": (get["Block count"] - get["Free blocks"]) * get["Block size"]}


def write_json(path: Path, data: dict) -> None:
    """Write under a temporary name, then rename: a stamp is either complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_complete(stamp: Path, recipe: int = RECIPE) -> dict | None:
    """The stamp's facts if it is of `recipe` and its files are exactly as recorded."""
    try:
        info = json.loads(stamp.read_text())
        if info.get("recipe") != recipe:
            return None
        for name, state in info["files"].items():
            if file_state(stamp.parent / name) != state:
                return None
        return info
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def locked(work: Path) -> Iterator[None]:
    """One builder or checker per work directory at a time."""
    with open(work / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GuestError(f"another debian_guest.py is using {work}") from None
        yield


def require(tools: tuple[str, ...]) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        raise GuestError(f"missing {', '.join(missing)} (apt-get install -y debootstrap "
                         f"qemu-utils e2fsprogs fuse3 util-linux)")


# -- the base ---------------------------------------------------------------------------------

def configure_base(root: Path, logs: Path) -> dict:
    """Make the debootstrapped tree a bootable, quiet, offline guest with a ready line."""
    (root / "etc/hostname").write_text("vmsynth-base\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tvmsynth-base\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n")
    (root / "etc/fstab").write_text("# <file system> <mount point> <type> <options> <dump> <pass>\n"
                                    "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    resolv = root / "etc/resolv.conf"  # debootstrap copied the host's: not the guest's business
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# no network in this guest\n")
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")
    (root / "etc/systemd/system/vmsynth-ready.service").write_text(READY_UNIT)

    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(f"expected one kernel in {root / 'boot'}, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    chroot_log = logs / "base-chroot.log"
    with chroot_env(root):
        chroot(root, "passwd", "-d", "root", log_to=chroot_log)
        chroot(root, "systemctl", "enable", "vmsynth-ready.service", log_to=chroot_log)
        timers = [t for t in QUIET_TIMERS if (root / "usr/lib/systemd/system" / t).exists()
                  or (root / "lib/systemd/system" / t).exists()]
        if timers:
            chroot(root, "systemctl", "disable", *timers, log_to=chroot_log)
        # The root filesystem sits on virtio-blk: the initrd must carry its drivers. Debian's
        # MODULES=most normally includes them; add them explicitly only if it did not.
        initrd = f"/boot/initrd.img-{version}"
        needed = ("virtio_blk.ko", "virtio_pci.ko", "ext4.ko")

        def missing() -> list[str]:
            listing = chroot(root, "lsinitramfs", initrd)
            return [m for m in needed if f"/{m}" not in listing]

        added = missing()
        if added:
            with open(root / "etc/initramfs-tools/modules", "a") as f:
                f.write("".join(m.removesuffix(".ko") + "\n" for m in added))
            chroot(root, "update-initramfs", "-u", "-k", version, log_to=chroot_log)
            if missing():
                raise GuestError(f"the initrd still lacks {missing()} after update-initramfs")
        chroot(root, "apt-get", "clean", log_to=chroot_log)  # debootstrap leaves its .debs
    return {"kernel_version": version, "disabled_timers": timers,
            "initrd_modules_added": [m.removesuffix(".ko") for m in added]}


def build_base(work: Path, logs: Path) -> dict:
    rootfs, raw = work / "rootfs", work / "base.raw"
    started = time.monotonic()
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"debootstrap {SUITE} (minbase + {', '.join(INCLUDE)}) into {rootfs}; takes minutes")
    try:
        run(DEBOOTSTRAP, "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, rootfs,
            MIRROR, log_to=logs / "debootstrap.log")
    finally:
        unmount_under(rootfs)  # debootstrap mounts /proc and /sys inside; a failure may leave them
    debootstrap_s = time.monotonic() - started
    log(f"  debootstrap took {debootstrap_s:.0f} s; configuring the guest")
    facts = configure_base(rootfs, logs)
    packages = installed_packages(rootfs)
    rootfs_bytes = int(run("du", "-s", "--block-size=1", rootfs).split()[0])

    # Direct kernel boot wants the guest's own kernel and initrd outside the image.
    shutil.copy2(rootfs / "boot" / f"vmlinuz-{facts['kernel_version']}", work / "vmlinuz")
    shutil.copy2(rootfs / "boot" / f"initrd.img-{facts['kernel_version']}", work / "initrd.img")

    log(f"  mkfs.ext4 -d into a {DISK_SIZE // GiB} GiB disk, then qcow2")
    if mounts_under(rootfs):  # mkfs -d would copy the host's /proc, /dev, ...
        raise GuestError(f"{rootfs} still has mounts below it: {mounts_under(rootfs)}")
    raw.unlink(missing_ok=True)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "vmsynth-root", "-U", FS_UUID,
        "-E", f"hash_seed={FS_UUID},lazy_itable_init=0,lazy_journal_init=0", "-d", rootfs, raw,
        f"{DISK_SIZE // KiB}k", env=dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME))
    usage = ext4_usage(raw)
    tmp = work / "base.qcow2.tmp"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp)
    os.replace(tmp, work / "base.qcow2")
    raw.unlink()
    shutil.rmtree(rootfs)

    info = {
        "recipe": BASE_RECIPE,
        "built_at": dt.datetime.now().isoformat(timespec="seconds"),
        "debootstrap_seconds": round(debootstrap_s, 1),
        "build_seconds": round(time.monotonic() - started, 1),
        "suite": SUITE, "mirror": MIRROR, "include": list(INCLUDE),
        **facts,
        "rootfs_bytes": rootfs_bytes,
        **usage,
        "allocation": allocation(work / "base.qcow2", own_only=False),
        "file_sha256": sha256_file(work / "base.qcow2"),
        "packages": {k: v["version"] for k, v in sorted(packages.items())},
        "files": {n: file_state(work / n) for n in ("base.qcow2", "vmlinuz", "initrd.img")},
    }
    write_json(work / BASE_STAMP, info)
    log(f"  base built in {info['build_seconds']:.0f} s: {len(packages)} packages, "
        f"{usage['fs_used_bytes'] / MiB:.0f} MiB used in the filesystem, "
        f"{info['allocation']['data_bytes'] / MiB:.0f} MiB allocated in base.qcow2")
    return info


# -- the child --------------------------------------------------------------------------------

def customize(mnt: Path, logs: Path) -> None:
    """What an administrator would do in the running guest: install, add the app, clean up."""
    apt_log = logs / "app-apt.log"
    with chroot_env(mnt, network=True):
        chroot(mnt, "apt-get", "update", log_to=apt_log)
        chroot(mnt, "apt-get", "install", "-y", "--no-install-recommends", *APP_PACKAGES,
               log_to=apt_log)
        chroot(mnt, "apt-get", "clean", log_to=apt_log)
        app_dir = mnt / "opt/vmsynth-app"
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "app.py").write_text(APP_PY)
        (mnt / "etc/systemd/system/vmsynth-app.service").write_text(APP_UNIT)
        # The child announces readiness through its app, not through the base's unit.
        chroot(mnt, "systemctl", "disable", "vmsynth-ready.service", log_to=apt_log)
        chroot(mnt, "systemctl", "enable", "vmsynth-app.service", log_to=apt_log)
        (mnt / "etc/hostname").write_text("vmsynth-app\n")
        hosts = mnt / "etc/hosts"
        hosts.write_text(hosts.read_text().replace("vmsynth-base", "vmsynth-app"))
        # The app's imports must work before anyone waits minutes for a boot to find out.
        chroot(mnt, "python3", "-c", "import numpy, pandas", log_to=apt_log)


def build_app(work: Path, logs: Path, base_info: dict) -> dict:
    base, app = work / "base.qcow2", work / "app.qcow2"
    started = time.monotonic()
    app.unlink(missing_ok=True)
    for name in ("app-apt.log", "qemu-storage-daemon.log"):
        (logs / name).unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "app.qcow2",
        cwd=work)  # relative backing name: the directory can move as a whole
    log(f"installing {len(APP_PACKAGES)} packages and the app into app.qcow2 "
        f"(FUSE export + loop mount + chroot)")
    with guest_disk(app, work, logs / "qemu-storage-daemon.log") as mnt:
        before = installed_packages(mnt)
        used_before = shutil.disk_usage(mnt).used
        customize(mnt, logs)
        after = installed_packages(mnt)
        used_after_clean = shutil.disk_usage(mnt).used
        # Let ext4 commit the frees first: fstrim skips blocks freed in an open transaction.
        os.sync()
        trimmed = run("fstrim", "-v", mnt).strip()
    install_s = time.monotonic() - started
    check = subprocess.run(["qemu-img", "check", str(app)], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        raise GuestError(f"qemu-img check app.qcow2 failed: {check.stdout}{check.stderr}")
    if file_state(base) != base_info["files"]["base.qcow2"]:
        raise GuestError("base.qcow2 changed while the child was customized")
    new = {k: v for k, v in after.items() if k not in before or before[k] != v}
    info = {
        "build_seconds": round(install_s, 1),
        "requested_packages": list(APP_PACKAGES),
        "new_packages": {k: v["version"] for k, v in sorted(new.items())},
        "new_packages_installed_bytes": sum(v["kib"] for v in new.values()) * KiB,
        "fs_used_bytes_before": used_before,
        "fs_used_bytes_after": used_after_clean,
        "fstrim": trimmed,
        "allocation": allocation(app, own_only=True),
        "file_sha256": sha256_file(app),
    }
    log(f"  child built in {install_s:.0f} s: {len(new)} new packages, "
        f"{info['new_packages_installed_bytes'] / MiB:.0f} MiB installed; the child holds "
        f"{info['allocation']['data_bytes'] / MiB:.0f} MiB of data clusters")
    return info


# -- the public interface ---------------------------------------------------------------------

def paths(workdir: Path) -> dict[str, str]:
    work = Path(workdir).resolve()
    return {"workdir": str(work), "base_qcow2": str(work / "base.qcow2"),
            "app_qcow2": str(work / "app.qcow2"), "kernel": str(work / "vmlinuz"),
            "initrd": str(work / "initrd.img"), "stamp": str(work / STAMP)}


def build(workdir: Path = DEFAULT_WORKDIR, rebuild: bool = False) -> dict:
    """The cached Debian pair in `workdir`, built first if missing, incomplete or `rebuild`.

    Returns the stamp's facts (base, app: dicts of facts; build_seconds, check, ...) plus the
    paths (workdir, base_qcow2, app_qcow2, kernel, initrd, stamp) and `cached`.
    A caller that wants Ctrl-C/SIGTERM to clean up must let them unwind as exceptions (the
    script itself turns SIGTERM into SystemExit)."""
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with locked(work):
        if not rebuild and (info := load_complete(work / STAMP)) is not None:
            return info | paths(work) | {"cached": True}
        if os.geteuid() != 0:
            raise GuestError("building the Debian guests needs root (debootstrap, mount, chroot)")
        require((DEBOOTSTRAP, "mkfs.ext4", "dumpe2fs", "qemu-img", "qemu-storage-daemon",
                 "fstrim", "chroot", "losetup", "fusermount3"))
        if not Path("/dev/fuse").exists():
            raise GuestError("/dev/fuse is missing (qemu-storage-daemon's FUSE export needs it)")
        if mounts_under(work):
            raise GuestError(f"something is still mounted below {work} (an interrupted build?): "
                             f"{', '.join(mounts_under(work))}; unmount it first")
        (work / STAMP).unlink(missing_ok=True)  # from here on the pair is incomplete
        if rebuild:
            (work / BASE_STAMP).unlink(missing_ok=True)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        started = time.monotonic()
        base_info = None if rebuild else load_complete(work / BASE_STAMP, BASE_RECIPE)
        if base_info is None:
            for f in logs.iterdir():
                f.unlink()
            (work / "app.qcow2").unlink(missing_ok=True)
            base_info = build_base(work, logs)
        else:
            log(f"reusing base.qcow2 built {base_info['built_at']}")
        app_info = build_app(work, logs, base_info)
        info = {
            "recipe": RECIPE,
            "built_at": dt.datetime.now().isoformat(timespec="seconds"),
            "build_seconds": round(time.monotonic() - started, 1),
            "base": {k: v for k, v in base_info.items() if k not in ("recipe", "files")},
            "app": app_info,
            "boot_args": {w: boot_args(w, work) for w in READY},
            "files": {n: file_state(work / n)
                      for n in ("base.qcow2", "app.qcow2", "vmlinuz", "initrd.img")},
        }
        write_json(work / STAMP, info)  # last: only now does the pair look complete
        return info | paths(work) | {"cached": False}


def boot_args(which: str, workdir: Path = DEFAULT_WORKDIR) -> list[str]:
    """Arguments for `vmsynth boot` that boot `which` ("base" or "app") to its ready line.

    The first one is the disk: replace it with a throwaway child to keep the image intact."""
    if which not in READY:
        raise ValueError(f"which must be one of {sorted(READY)}, not {which!r}")
    p = paths(workdir)
    return [p[f"{which}_qcow2"], "--kernel", p["kernel"], "--initrd", p["initrd"], "--append", APPEND,
            "--memory", "1G", "--vnc", "none", "--ready", READY[which],
            "--timeout", str(BOOT_TIMEOUT), "--accel", "tcg"]


# -- --check ----------------------------------------------------------------------------------

def boot_once(which: str, work: Path, logs: Path) -> dict:
    """Boot a throwaway child of `which` until its ready line, then stop it; the timings."""
    image = work / f"{which}.qcow2"
    before = file_state(image)
    scratch = Path(tempfile.mkdtemp(prefix=f"vmsynth-debian-{which}-", dir="/tmp"))
    disk = scratch / "disk.qcow2"
    serial_path = logs / f"check-{which}.serial.log"
    proc = None
    try:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", disk)
        args = [str(VMSYNTH), "boot", str(disk), *boot_args(which, work)[1:], "--serial", "-"]
        seen = threading.Event()
        seen_at: list[float] = []
        stderr_lines: list[str] = []

        def read_serial(stream, sink) -> None:
            tail = b""
            for chunk in iter(lambda: stream.read1(65536), b""):
                sink.write(chunk)
                sink.flush()
                tail = (tail + chunk)[-4096:]
                if not seen.is_set() and READY[which].encode() in tail:
                    seen_at.append(time.monotonic())
                    seen.set()

        def read_stderr(stream) -> None:
            for line in stream:
                stderr_lines.append(line.decode(errors="replace").rstrip())

        started = time.monotonic()
        with open(serial_path, "wb") as sink:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            readers = [threading.Thread(target=read_serial, args=(proc.stdout, sink), daemon=True),
                       threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)]
            for t in readers:
                t.start()
            while not seen.wait(0.2):
                if proc.poll() is not None:
                    raise GuestError(
                        f"vmsynth boot {which} exited ({proc.returncode}) before "
                        f"{READY[which]!r}: {' | '.join(stderr_lines[-3:])} "
                        f"(serial log: {serial_path})")
                if time.monotonic() - started > BOOT_TIMEOUT + 30:
                    raise GuestError(f"no {READY[which]!r} within {BOOT_TIMEOUT + 30} s "
                                     f"(serial log: {serial_path})")
            ready_s = seen_at[0] - started
            # vmsynth polls its serial log, so it says "ready in X s" a moment after we see the
            # line: wait for it, which also shows that --ready matched on vmsynth's side.
            deadline = time.monotonic() + 15
            while not any("ready in" in ln for ln in stderr_lines) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # vmsynth powers the guest down (ACPI), then QEMU
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise GuestError(f"vmsynth boot {which} did not stop within 90 s of SIGTERM") \
                    from None
            stop_s = time.monotonic() - stopping
            for t in readers:
                t.join(timeout=5)
        (logs / f"check-{which}.vmsynth.log").write_text("\n".join(stderr_lines) + "\n")
        reported = next((float(m.group(1)) for ln in stderr_lines
                         if (m := re.search(r"ready in ([\d.]+) s", ln))), None)
        return {"ready_seconds": round(ready_s, 2), "vmsynth_ready_seconds": reported,
                "stop_seconds": round(stop_s, 2), "vmsynth_exit": code,
                "serial_log": str(serial_path)}
    finally:
        if proc is not None and proc.poll() is None:
            _stop_group(proc)
        # Any QEMU still using the throwaway disk is ours: it must not outlive the check.
        left = subprocess.run(["pgrep", "-f", str(disk)], capture_output=True, text=True,
                              check=False)
        pids = [int(p) for p in left.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)
        if file_state(image) != before:
            raise GuestError(f"{image} changed during the boot check")
        if pids:
            raise GuestError(f"QEMU processes outlived vmsynth boot {which}: {pids} (killed)")


def check(workdir: Path = DEFAULT_WORKDIR) -> dict:
    """Boot both images (throwaway children) to their ready lines; timings saved in the stamp."""
    work = Path(workdir).resolve()
    if not VMSYNTH.exists():
        raise GuestError(f"missing {VMSYNTH}: make the venv first (make test or make demo)")
    with locked(work):
        stamp = work / STAMP
        info = load_complete(stamp)
        if info is None:
            raise GuestError(f"{work} holds no complete Debian pair; build it first")
        results = {}
        for which, ready in READY.items():
            log(f"booting a throwaway child of {which}.qcow2 under TCG until {ready!r}")
            results[which] = boot_once(which, work, work / "logs")
            log(f"  {which}: ready after {results[which]['ready_seconds']:.1f} s, stopped in "
                f"{results[which]['stop_seconds']:.1f} s")
        info["check"] = {"at": dt.datetime.now().isoformat(timespec="seconds"),
                         "load_average": os.getloadavg(), **results}
        write_json(stamp, info)
        return info["check"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where the images go (default {DEFAULT_WORKDIR})")
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    ap.add_argument("--check", action="store_true",
                    help="boot throwaway children of both under TCG and time them to ready")
    args = ap.parse_args()

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks: unmount, stop

    signal.signal(signal.SIGTERM, on_term)
    try:
        info = build(args.workdir, args.rebuild)
        base, app = info["base"], info["app"]
        print(f"{'cached' if info['cached'] else 'built'} in {info['workdir']} "
              f"(built {info['built_at']}; base {base['build_seconds']:.0f} s of which "
              f"debootstrap {base['debootstrap_seconds']:.0f} s, app {app['build_seconds']:.0f} s)")
        print(f"  base.qcow2: {base['allocation']['data_bytes'] / MiB:.0f} MiB allocated, "
              f"{len(base['packages'])} packages, kernel {base['kernel_version']}")
        print(f"  app.qcow2:  {app['allocation']['data_bytes'] / MiB:.0f} MiB of data clusters, "
              f"{len(app['new_packages'])} new packages "
              f"({app['new_packages_installed_bytes'] / MiB:.0f} MiB installed)")
        if args.check:
            result = check(args.workdir)
            for which in READY:
                print(f"  boot {which}: ready in {result[which]['ready_seconds']:.1f} s (TCG), "
                      f"stopped in {result[which]['stop_seconds']:.1f} s")
    except (GuestError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the finally blocks have run: nothing is left mounted
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
