"""The cloudlet tests' world: the fixture guest, its base with a memory snapshot in a cache
(with boot settings), and overlays for it (plain, encrypted, for a foreign base).

Built once per test run (the `world` fixture in conftest.py), shared by test_service.py and
test_discovery.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = REPO / ".build" / "test-guest"  # shared with test_vm.py; the build is idempotent
APPEND = "console=ttyS0 quiet panic=-1 vmsynth.mode=counter"
HANG = 240  # hang guards only, never a measure


@dataclass
class World:
    dir: Path
    home: Path  # VMSYNTH_HOME with the base tiny@1 (disk, memory snapshot, boot settings)
    overlay: Path  # disk + memory: resumed
    encrypted: Path  # the same, sealed with `key`
    key: Path
    foreign: Path  # an overlay for a base this cloudlet does not have

    def env(self, **extra: str) -> dict[str, str]:
        return os.environ | {"VMSYNTH_HOME": str(self.home), "TMPDIR": str(self.dir)} | extra


def vmsynth(h, *args: object) -> list[str]:
    return [str(h.VMSYNTH), *map(str, args)]


def next_json(stream) -> dict:
    """The next JSON document on a text stream (vmsynth's --json output is indented)."""
    buf = ""
    while True:
        line = stream.readline()
        assert line, f"the stream ended inside {buf!r}"
        buf += line
        try:
            return json.loads(buf)
        except ValueError:
            continue


def running_event(p: subprocess.Popen) -> dict:
    """`vmsynth offload --json`'s events, read until the VM runs."""
    assert p.stdout is not None
    while True:
        try:
            event = next_json(p.stdout)
        except AssertionError:
            pytest.fail(f"offload ended ({p.wait()}): {p.stderr.read() if p.stderr else ''}")
        if event.get("event") == "running":
            return event


def until(what: str, check, timeout: float = HANG, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def snapshot(h, env: dict[str, str], d: Path, image: Path, name: str, tick: int) -> Path:
    """Boot a child of `image` counting, with a VGA and VNC (the cloudlet serves VNC), and
    snapshot it at `tick`."""
    disk, vmem, serial = d / f"{name}-run.qcow2", d / f"{name}.vmem", d / f"{name}.serial"
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", disk)
    p = subprocess.Popen(vmsynth(h, "boot", disk, "--kernel", GUEST_DIR / "kernel", "--initrd",
                                  GUEST_DIR / "initramfs.cpio.gz", "--append", APPEND,
                                  "--memory", "256M", "--vnc", "auto", "--accel", "tcg",
                                  "--serial", serial, "--ready", f"tick {tick}", "--grace", "1",
                                  "--json", "--snapshot-on-exit", vmem),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert p.stdout is not None
    assert next_json(p.stdout)["event"] == "ready"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=HANG)
    assert p.returncode == 0, err
    return vmem


def build_world(h) -> World:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if not h.which(tool):
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing: CI must run the service tests")
            pytest.skip(f"{tool} not installed")
    build = subprocess.run(["bash", str(REPO / "fixtures" / "build-guest.sh"), str(GUEST_DIR)],
                           capture_output=True, text=True, timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    d = Path(tempfile.mkdtemp(prefix="vms-", dir="/tmp"))  # short: QMP socket path limit
    home = d / "home"
    env = os.environ | {"VMSYNTH_HOME": str(home), "TMPDIR": str(d)}
    base_vmem = snapshot(h, env, d, GUEST_DIR / "base.qcow2", "base", 2)
    h.run(*vmsynth(h, "base", "add", GUEST_DIR / "base.qcow2", "--memory", base_vmem,
                    "--name", "tiny", "--version", "1", "--kernel", GUEST_DIR / "kernel",
                    "--initrd", GUEST_DIR / "initramfs.cpio.gz", "--append", APPEND), env=env)
    app_vmem = snapshot(h, env, d, GUEST_DIR / "app.qcow2", "app", 3)
    overlay, encrypted, key = d / "app.vmo", d / "app-sealed.vmo", d / "app.key"
    h.run(*vmsynth(h, "create", "--base", "tiny@1", "--disk", d / "app-run.qcow2", "--memory",
                    app_vmem, "-o", overlay), env=env)
    h.run(*vmsynth(h, "keygen", "-o", key), env=env)
    h.run(*vmsynth(h, "create", "--base", "tiny@1", "--disk", d / "app-run.qcow2", "--memory",
                    app_vmem, "-o", encrypted, "--encrypt", "--key-file", key), env=env)
    foreign_base = d / "foreign.qcow2"
    h.write_image(foreign_base, h.text_block("another base") * 64)
    foreign_app = d / "foreign-app.qcow2"
    h.write_image(foreign_app, h.text_block("another app") * 64)
    foreign = d / "foreign.vmo"
    h.run(*vmsynth(h, "create", "--base", foreign_base, "--disk", foreign_app, "-o", foreign),
          env=env)
    return World(d, home, overlay, encrypted, key, foreign)


