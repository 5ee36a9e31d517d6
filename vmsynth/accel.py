"""Does KVM really work here? Decided by booting a real kernel, not by looking for /dev/kvm.

On some hosts /dev/kvm opens but guests hang or QEMU aborts (nested or broken
virtualization). The probe boots the host's own Debian kernel with a tiny busybox initramfs
under KVM and waits for a line on the serial console; the answer is cached per host (QEMU
version, host kernel, CPU), so only the first VM on a host pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AccelError
from .store import write_atomic

PROBE_OK = "VMSYNTH-KVM-OK"
PROBE_TIMEOUT = 20.0
KVM_CPU = "host"


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why this one: shown to the user when it is a fallback

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", KVM_CPU]
        return ["-accel", "tcg"]


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format: (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += bytes(-len(out) % 4)  # header and name end on a 4-byte boundary
        out += data
        out += bytes(-len(out) % 4)  # and so does the data
    return bytes(out)


def probe_kernel() -> Path | None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime)
    readable = [k for k in kernels if os.access(k, os.R_OK)]
    return readable[-1] if readable else None


def _probe_initramfs(busybox: Path) -> bytes:
    init = f"#!/bin/busybox sh\n/bin/busybox echo {PROBE_OK}\n/bin/busybox poweroff -f\n"
    return _newc([("bin", 0o40755, b""), ("dev", 0o40755, b""),
                  ("bin/busybox", 0o100755, busybox.read_bytes()),
                  ("init", 0o100755, init.encode())])


def probe_kvm(timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a real kernel under KVM; (works, why)."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no permission on /dev/kvm (add the user to the kvm group)"
    if shutil.which("qemu-system-x86_64") is None:
        return False, "qemu-system-x86_64 is not installed"
    kernel, busybox = probe_kernel(), shutil.which("busybox")
    if kernel is None or busybox is None:
        return False, "cannot probe KVM (needs a kernel in /boot and busybox-static)"
    with tempfile.TemporaryDirectory(prefix="vmsynth-kvm-probe-") as tmp:
        initrd = Path(tmp) / "probe.cpio"
        initrd.write_bytes(_probe_initramfs(Path(busybox)))
        cmd = ["qemu-system-x86_64", *Accel("kvm", "").qemu_args(), "-m", "256", "-nodefaults",
               "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
               "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1"]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False, f"a test guest hung under KVM for {timeout:.0f} s"
        text = output.decode(errors="replace")
        if PROBE_OK in text:
            return True, f"KVM works (test guest booted in {time.monotonic() - started:.1f} s)"
        last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
        return False, f"a test guest failed under KVM: {last[0][:160]}"


def _host_key() -> str:
    qemu = shutil.which("qemu-system-x86_64") or ""
    st = os.stat(qemu) if qemu else None
    cpu = ""
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    raw = json.dumps([platform.release(), qemu, st.st_mtime_ns if st else 0, cpu])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def host_cache() -> Path:
    """Facts about this host, shared by every $VMSYNTH_HOME (they do not depend on it)."""
    env = os.environ.get("VMSYNTH_HOST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmsynth" / "host"


def choose(requested: str = "auto") -> Accel:
    """Pick the accelerator for `requested` in auto | kvm | tcg.

    Raises:
        AccelError: kvm was asked for explicitly and does not work here.
    """
    if requested == "tcg":
        return Accel("tcg", "asked for")
    cache = host_cache() / f"accel-{_host_key()}.json"
    try:
        works, why = json.loads(cache.read_text())
        if not isinstance(works, bool) or not isinstance(why, str):
            raise TypeError("malformed accelerator cache")
    except (OSError, ValueError, TypeError):
        works, why = probe_kvm()
        with contextlib.suppress(Exception):  # an unwritable cache only costs a re-probe
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps([works, why]).encode())
    if works:
        return Accel("kvm", why)
    if requested == "kvm":
        raise AccelError(f"KVM does not work on this host: {why}",
                         hint="use --accel tcg (slower) or --accel auto")
    return Accel("tcg", f"KVM unusable ({why}); using TCG, which is slower")
