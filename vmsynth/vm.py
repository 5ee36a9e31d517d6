"""Launch, watch and stop one QEMU virtual machine.

A Machine owns a run directory (QMP socket, serial log, QEMU's own log, the guest's RAM
file) and its QEMU process. QEMU runs in its own session so a Ctrl-C at the terminal reaches
us, not it: we then ask the guest to power down over QMP, wait a grace period, quit QEMU,
and kill it if it still lingers. Used as a context manager, no QEMU process outlives the
Machine. Guest RAM always lives in a shared file, so any VM can be snapshotted page by page
(snapshot.py); a Machine can also resume a memory snapshot instead of booting.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from . import snapshot
from .accel import Accel
from .errors import BadInputError, BootError, QMPError, SnapshotError, UsageError
from .memory import Vmem
from .store import Inputs, scratch_dir
from .tools import PACKAGES, ToolError

if TYPE_CHECKING:
    from .qmp import QMP

QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1
TAIL_LINES = 15


@dataclass
class BootOptions:
    disk: Path
    accel: Accel
    memory: str = "1G"
    cpus: int = 1
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    vnc: str = "auto"  # auto: first free display from :0; :N; or none
    serial_log: Path | None = None  # default: serial.log in the run directory
    ready: str | None = None  # text on the serial console that means "ready"
    timeout: float = 120.0
    extra_args: list[str] = field(default_factory=list)
    resume: Vmem | None = None  # resume this memory snapshot instead of booting
    # For a cloudlet's sessions: VNC on the service's address behind a password set over
    # QMP, guest TCP ports forwarded (guest port -> host port), QEMU's seccomp sandbox.
    vnc_host: str = "127.0.0.1"
    vnc_password: bool = False
    forwards: dict[int, int] = field(default_factory=dict)
    sandbox: bool = False
    # The generation ID a resumed VM's vmgenid device gets: "auto", a new one per resume, so
    # that no two resumed VMs share random numbers; a fixed UUID only to show the hazard.
    generation_id: str = "auto"


def ram_bytes(text: str) -> int:
    """QEMU's -m syntax: a number of MiB, or a number with a K, M, G or T suffix."""
    match = re.fullmatch(r"(\d+)([KMGT]?)[Bb]?", text.strip().upper())
    if not match:
        raise UsageError(f"--memory {text!r}: give a size like 256M or 2G")
    size = int(match[1]) << {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[match[2]]
    if size < 16 << 20 or size % 4096:
        raise UsageError(f"--memory {text!r}: at least 16M, in whole pages")
    return size


class Machine:
    def __init__(self, options: BootOptions, on_serial: Callable[[str], None] | None = None,
                 grace: float = 10.0, on_spawn: Callable[[int], None] | None = None) -> None:
        self.options = options
        self.grace = grace  # seconds the guest gets to power down when we stop it
        self.on_serial = on_serial  # gets serial output as it arrives (e.g. --serial -)
        self.on_spawn = on_spawn  # gets QEMU's PID as soon as it exists (e.g. into a cgroup)
        self.rundir = scratch_dir("vm")
        # QMP serves one client per socket: ours, and one for the user (`vmsynth snapshot`).
        self.control_path = self.rundir / "control.sock"
        self.qmp_path = self.rundir / "qmp.sock"
        self.serial_log = options.serial_log or self.rundir / "serial.log"
        self.qemu_log = self.rundir / "qemu.log"
        self.ram_file = self.rundir / "ram"
        self.resume_seconds: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self._serial_pos = 0
        self._serial_text = ""

    # -- starting ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        o = self.options
        vmem = o.resume
        if vmem is None:
            size, vga = ram_bytes(o.memory), o.vnc != "none"
            args = [QEMU, *o.accel.qemu_args(), "-smp", str(o.cpus),
                    *snapshot.ram_args(self.ram_file, size, "pc", share=True)]
        else:
            # The snapshot decides the machine: the same CPU model, RAM and devices.
            size, vga = vmem.ram_size, vmem.machine.vga
            args = [QEMU, "-accel", o.accel.name, "-cpu", vmem.machine.cpu,
                    "-smp", str(vmem.machine.cpus),
                    *snapshot.ram_args(vmem.path, size, vmem.machine.machine, share=False),
                    "-incoming", "defer"]
        args += ["-nodefaults", "-no-user-config",
                 "-qmp", f"unix:{self.control_path},server=on,wait=off",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-serial", f"file:{self.serial_log}",
                 "-drive", f"file={_escape(o.disk)},format=qcow2,if=virtio,discard=unmap"]
        if vmem is None or vmem.machine.entropy:  # a snapshot taken without them has none
            args += snapshot.entropy_args("auto" if vmem is None else o.generation_id)
        if vga:
            args += ["-vga", "std", "-display", "none"]
            if o.vnc != "none":
                display = "0,to=99" if o.vnc == "auto" else o.vnc.lstrip(":")
                args += ["-vnc", f"{o.vnc_host}:{display}" +
                         (",password=on" if o.vnc_password else "")]
        else:
            args += ["-display", "none"]
        if o.kernel:
            args += ["-kernel", str(o.kernel)]
            if o.initrd:
                args += ["-initrd", str(o.initrd)]
            args += ["-append", o.append or "console=ttyS0"]
        if o.sandbox:  # spawn stays allowed: migration to and from files runs `cat`
            args += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny"]
        return args + self._forwarded(self.extra_args())

    def extra_args(self) -> list[str]:
        """--qemu-arg values; a resumed snapshot's own unless new ones are given."""
        o = self.options
        if o.resume is not None and not o.extra_args:
            return list(o.resume.machine.extra_args)
        return o.extra_args

    def _forwarded(self, args: list[str]) -> list[str]:
        """`args` with the forwarded ports added to the user-mode network, or a new one.

        A resumed snapshot's devices are fixed: it needs a user-mode NIC of its own (the
        host side of user-mode networking is not part of the migrated state)."""
        o = self.options
        if not o.forwards:
            return args
        rules = ",".join(f"hostfwd=tcp:{o.vnc_host}:{host}-:{guest}"
                         for guest, host in o.forwards.items())
        out = list(args)
        for i, arg in enumerate(out[:-1]):
            if arg in ("-nic", "--nic") and out[i + 1].startswith("user"):
                out[i + 1] += "," + rules
                return out
        if o.resume is not None:
            raise UsageError("this snapshot's VM has no user-mode network device, so no port "
                             "can be forwarded to it",
                             hint="snapshot the base with --qemu-arg=-nic "
                                  "--qemu-arg=user,model=virtio-net-pci")
        return [*out, "-nic", f"user,model=virtio-net-pci,{rules}"]

    def set_vnc_password(self, password: str) -> None:
        """The password a VNC client must give (VNC uses its first 8 characters)."""
        if self.qmp is None:
            raise BootError("the VM is not running")
        self.qmp.execute("set_password", {"protocol": "vnc", "password": password})

    def _record_launch(self) -> None:
        """What `vmsynth snapshot` needs to know about this VM, beside its QMP socket."""
        o = self.options
        vga = o.resume.machine.vga if o.resume else o.vnc != "none"
        info = {"ram_file": str(self.ram_file if o.resume is None else o.resume.path),
                "disk": str(Path(o.disk).resolve()),
                "vga": vga, "kernel_boot": o.kernel is not None,
                "extra_args": self.extra_args(), "accel": o.accel.name,
                "resumed": o.resume is not None,
                "entropy": o.resume.machine.entropy if o.resume else True}
        (self.rundir / snapshot.MACHINE_FILE).write_text(json.dumps(info))

    def start(self) -> None:
        require_qemu()
        o = self.options
        for path, what in ((o.disk, "disk"), (o.kernel, "kernel"), (o.initrd, "initrd")):
            if path is not None and not Path(path).is_file():
                raise BadInputError(f"{what} {path}: no such file")
        if o.resume is not None:
            snapshot.check_resumable(o.resume)
            if o.resume.machine.cpu == "host" and o.accel.name != "kvm":
                raise SnapshotError(f"{o.resume.path} was taken under KVM with the host's own "
                                    f"CPU model, which {o.accel.name.upper()} cannot provide",
                                    hint="resume it under KVM on the same kind of CPU")
            if o.resume.machine.kernel_boot and o.kernel is None:
                raise SnapshotError(f"{o.resume.path} is of a VM booted with --kernel: QEMU "
                                    "needs the same kernel option to resume it",
                                    hint="pass the --kernel (and --initrd) it was booted with")
        self._record_launch()
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        self.serial_log.write_bytes(b"")
        from .qmp import QMP, on_qmp_thread  # asyncio and qemu.qmp: only once a VM starts

        command = self.command()
        with open(self.qemu_log, "wb") as log:
            # Forked from the long-lived QMP thread: QEMU dies with the thread that started
            # it (_die_with_parent), and the caller's thread may end before the VM does.
            self.proc = on_qmp_thread(lambda: subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent))  # noqa: PLW1509 (no locks)
        if self.on_spawn is not None:
            self.on_spawn(self.proc.pid)
        deadline = time.monotonic() + 10
        while not self.control_path.exists():
            if self.proc.poll() is not None:
                raise BootError(f"QEMU exited at start: {self._qemu_error()}",
                                hint=self._hint_for(self._qemu_error()))
            if time.monotonic() > deadline:
                raise BootError("QEMU did not open its QMP socket within 10 s")
            time.sleep(0.02)
        try:
            self.qmp = QMP(str(self.control_path))
        except QMPError:
            if self.proc.wait(timeout=5) is not None:  # QEMU gave up right after starting
                raise BootError(f"QEMU exited at start: {self._qemu_error()}",
                                hint=self._hint_for(self._qemu_error())) from None
            raise
        if o.resume is not None:
            try:
                self.resume_seconds = snapshot.resume(self.qmp, o.resume, self.rundir)
            except QMPError as err:
                if self.proc.wait(timeout=5) is not None:  # QEMU refused the state and quit
                    raise SnapshotError(f"QEMU could not resume {o.resume.path}: "
                                        f"{self._qemu_error()}",
                                        hint="resume with the --kernel and --qemu-arg options "
                                             "the VM was booted with") from None
                raise SnapshotError(f"resuming {o.resume.path} failed: {err}") from None

    def snapshot(self, out: Path, inputs: Inputs | None = None) -> Vmem:
        """Snapshot this VM's memory and device state into `out`; QEMU then quits.

        `inputs`: files the caller read, which `out` must not be (nor the VM's own files).
        """
        if self.qmp is None or not self.qmp.connected or self.proc is None or \
                self.proc.poll() is not None:
            raise SnapshotError("the VM is no longer running: nothing to snapshot")
        launch = json.loads((self.rundir / snapshot.MACHINE_FILE).read_text())
        vmem = snapshot.take(self.qmp, Path(launch["ram_file"]), launch, out, inputs)
        self.wait(10)
        return vmem

    def _qemu_error(self) -> str:
        lines = [ln for ln in self.qemu_log.read_text(errors="replace").splitlines() if ln]
        return lines[-1] if lines else f"exit code {self.proc.returncode if self.proc else '?'}"

    @staticmethod
    def _hint_for(error: str) -> str | None:
        if "Address already in use" in error or "Failed to find an available port" in error:
            return "that VNC display is taken: use --vnc auto, or another :N"
        if "Could not open" in error:
            return "check the disk path and that its backing file exists"
        return None

    # -- watching ---------------------------------------------------------------------------

    def poll_serial(self) -> str:
        """New serial output since the last call (also passed to on_serial)."""
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(self._serial_pos)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._serial_pos += len(data)
        text = data.decode(errors="replace")
        self._serial_text = (self._serial_text + text)[-65536:]
        if text and self.on_serial:
            self.on_serial(text)
        return text

    def serial_tail(self, lines: int = TAIL_LINES) -> str:
        """The last serial lines, joined with " | " so an error stays one line."""
        self.poll_serial()
        tail = [ln.strip() for ln in self._serial_text.replace("\r", "").splitlines()]
        return " | ".join([ln for ln in tail if ln][-lines:]) or "(nothing)"

    def wait_ready(self) -> float:
        """Wait for the ready text on the serial console; seconds it took.

        Raises:
            BootError: QEMU exited first, or the timeout passed (the serial tail is in the
                message).
        """
        assert self.proc is not None
        started = time.monotonic()
        ready = self.options.ready
        while True:
            self.poll_serial()
            if ready is None or ready in self._serial_text:
                return time.monotonic() - started
            if self.proc.poll() is not None:
                raise BootError(f"the VM stopped before it was ready ({self._qemu_error()}); "
                                f"last serial output: {self.serial_tail()}")
            if time.monotonic() - started > self.options.timeout:
                raise BootError(f"the VM was not ready after {self.options.timeout:.0f} s "
                                f"(waiting for {ready!r}); last serial output: "
                                f"{self.serial_tail()}",
                                hint="raise --timeout, or check that the image boots")
            time.sleep(0.05)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit (the guest powered off); its exit code, None on timeout."""
        assert self.proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.proc.poll() is None:
            self.poll_serial()
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        self.poll_serial()
        return self.proc.returncode

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.proc.pid if self.proc else None,
                               "qmp_socket": str(self.qmp_path),
                               "serial_log": str(Path(self.serial_log).resolve()),
                               "accel": self.options.accel.name, "vnc": None}
        if self.qmp is not None and self.qmp.connected and self.options.vnc != "none":
            try:
                vnc = self.qmp.execute("query-vnc")
                if vnc.get("enabled"):
                    port = int(vnc["service"])
                    out["vnc"] = {"host": vnc["host"], "port": port, "display": f":{port - 5900}"}
            except QMPError:
                pass
        return out

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> None:
        """Power down politely, then firmly; always leaves no QEMU process behind."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                if self.qmp is not None and self.qmp.connected:  # else QEMU is going
                    try:
                        self.qmp.execute("system_powerdown")
                    except QMPError:
                        pass
                    if self.wait(grace) is None:
                        try:
                            self.qmp.execute("quit")
                        except QMPError:
                            pass
                if self.wait(5) is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        finally:
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            if proc is not None and proc.poll() is None:  # an exception above: still certain
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=self.grace)


try:  # looked up now: in the forked child, dlopen could wait on a lock another thread held
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None  # not Linux: the context manager's clean-up still applies


def _die_with_parent() -> None:
    """In the QEMU child: be killed if vmsynth itself is killed (even by SIGKILL).

    The kernel sends the signal when the *thread* that forked the child ends (prctl(2)).
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def require_qemu() -> None:
    if shutil.which(QEMU) is None:
        raise ToolError(f"{QEMU} is not installed",
                        hint=f"install it: apt-get install {PACKAGES[QEMU]}")


def _escape(path: Path) -> str:
    """QEMU option values use ',' as separator; a literal comma is written twice."""
    return str(path).replace(",", ",,")
