"""vmsynth boot, run and check: VMs from synthesized disks."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from vmsynth import accel, guest, session
from vmsynth.apply import apply
from vmsynth.vm import BootOptions, Machine, require_qemu

from . import console
from .options import base_option, file_size, json_option, open_base, open_input


def boot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options boot and run share."""
    for option in reversed([
        click.option("--memory", default="1G", show_default=True, help="Guest RAM (QEMU -m)."),
        click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 256),
                     help="Virtual CPUs."),
        click.option("--kernel", type=click.Path(dir_okay=False),
                     help="Boot this kernel directly instead of from the disk."),
        click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs for --kernel."),
        click.option("--append", help="Kernel command line for --kernel."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
                     show_default=True,
                     help="auto uses KVM only if a test boot shows it works on this host."),
        click.option("--vnc", default="auto", show_default=True,
                     help="auto (first free display on 127.0.0.1), :N, or none."),
        click.option("--serial", help="Keep the serial console log in FILE, or - to print it."),
        click.option("--ready", metavar="TEXT",
                     help="The VM is ready when its serial console prints TEXT."),
        click.option("--timeout", default=300.0, show_default=True, type=float,
                     help="Seconds to wait for --ready (exit 15 when it passes)."),
        click.option("--grace", default=10.0, show_default=True, type=float,
                     help="Seconds the guest gets to power down when stopped."),
        click.option("--qemu-arg", "qemu_args", multiple=True, metavar="ARG",
                     help="Extra argument for QEMU (repeatable), e.g. --qemu-arg=-nic "
                          "--qemu-arg=user."),
    ]):
        f = option(f)
    return f


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a VM the same careful way as Ctrl-C."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _machine(disk: Path, opts: dict[str, Any], as_json: bool) -> Machine:
    require_qemu()  # before the accelerator notice: the one error line says what to install
    chosen = accel.choose(opts["accel"])
    if opts["accel"] == "auto" and chosen.name == "tcg" and not as_json:
        console.err.print(f"notice: {chosen.reason}")
    serial = opts["serial"]
    options = BootOptions(
        disk=disk, accel=chosen, memory=opts["memory"], cpus=opts["cpus"],
        kernel=Path(opts["kernel"]) if opts["kernel"] else None,
        initrd=Path(opts["initrd"]) if opts["initrd"] else None, append=opts["append"],
        vnc=opts["vnc"], serial_log=Path(serial) if serial and serial != "-" else None,
        ready=opts["ready"], timeout=opts["timeout"], extra_args=list(opts["qemu_args"]))
    echo = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if serial == "-" else None
    return Machine(options, on_serial=echo, grace=opts["grace"])


def _run_machine(machine: Machine, as_json: bool, extra: dict[str, Any]) -> None:
    """Start, wait until ready, show how to reach it, wait until it ends."""
    with machine:
        seconds = machine.wait_ready()
        info = machine.info() | extra | {"ready_seconds": round(seconds, 3)}
        if as_json:
            console.emit_json(info | {"event": "ready"})
        else:
            vnc = info["vnc"]
            console.err.print(
                f"ready in {seconds:.1f} s ({info['accel']}): pid {info['pid']}, "
                f"QMP {info['qmp_socket']}, serial log {info['serial_log']}"
                + (f", VNC {vnc['host']}:{vnc['port']} (display {vnc['display']})" if vnc
                   else ""))
        code = machine.wait()
        if not as_json:
            console.err.print(f"the VM powered off (QEMU exit {code})")


BOOT_EPILOG = """\b
Examples:
  vmsynth boot synth.qcow2 --memory 2G --cpus 2
  vmsynth boot synth.qcow2 --kernel vmlinux --initrd initrd.gz \\
      --append "console=ttyS0" --ready "login:" --serial - --vnc none"""


@click.command("boot", epilog=BOOT_EPILOG)
@click.argument("disk", type=click.Path(dir_okay=False))
@boot_options
@json_option
def boot(disk: str, as_json: bool, **opts: Any) -> None:
    """Boot DISK with QEMU, wait until it is ready, and run it until it powers off.

    Ctrl-C or SIGTERM asks the guest to power down (ACPI), waits --grace seconds,
    then stops QEMU: no QEMU process is left behind.
    """
    with _sigterm_as_interrupt():
        _run_machine(_machine(Path(disk), opts, as_json), as_json, {})


@click.command("run", epilog="""\b
Examples:
  vmsynth run app.vmo --base ubuntu-22.04@2.3.1 --memory 2G
  vmsynth run app.vmo --base base.qcow2 --kernel vmlinux --initrd initrd.gz --keep""")
@click.argument("overlay")
@base_option
@click.option("--keep", is_flag=True, help="Keep the session's disk when the VM ends.")
@boot_options
@json_option
def run(overlay: str, base_spec: str, keep: bool, as_json: bool, **opts: Any) -> None:
    """Rebuild the VM from OVERLAY on a base, boot it, and scrub it when it ends.

    The disk is rebuilt into a private session directory under $VMSYNTH_HOME/sessions;
    when the VM ends (or on Ctrl-C / SIGTERM / failure) its files are overwritten and
    deleted, so nothing of the user remains, unless --keep is given.
    """
    started = time.monotonic()
    sess = session.new()
    try:
        with _sigterm_as_interrupt():
            with open_base(base_spec, as_json) as base, open_input(overlay) as source:
                total, done = file_size(overlay), 0
                with console.progress("rebuilding", total, enabled=not as_json) as update:
                    def advance(n: int) -> None:
                        nonlocal done
                        done += n
                        update(done, max(total, done))

                    apply(source, base, sess.disk, progress=advance)
            synthesized = time.monotonic() - started
            machine = _machine(sess.disk, opts, as_json)
            _run_machine(machine, as_json, {"session": sess.id,
                                            "synthesis_seconds": round(synthesized, 3)})
    finally:
        if keep:
            if not as_json:
                console.err.print(f"kept the session disk: {sess.disk}")
        else:
            session.destroy(sess)


@click.command("check", epilog="""\b
Examples:
  vmsynth check synth.qcow2
  vmsynth check synth.qcow2 --json""")
@click.argument("disk", type=click.Path(dir_okay=False))
@json_option
def check(disk: str, as_json: bool) -> None:
    """Check an image before booting it: filesystems, a read-only fsck, the guest OS.

    Uses libguestfs (an appliance VM; the image is opened read-only). Exit 19 when no
    filesystem is found or a check finds errors.
    """
    report = guest.check(Path(disk))
    if as_json:
        console.emit_json({"ok": report.ok, "image": report.image,
                           "filesystems": [vars(f) for f in report.filesystems],
                           "operating_systems": report.operating_systems})
        return
    print_check(report)


def print_check(report: guest.CheckReport) -> None:
    for f in report.filesystems:
        console.out.print(f"{report.image}: {f.device} {f.fstype}: {f.status}")
    for o in report.operating_systems or [{}]:
        if not o:
            console.out.print(f"{report.image}: no operating system found on the disk "
                              "(fine for a data disk or a direct-kernel guest)")
            continue
        version = ".".join(str(o[k]) for k in ("major", "minor") if o.get(k) is not None)
        console.out.print(f"{report.image}: {o.get('type')} {o.get('distro')} {version} "
                          f"({o.get('product')}), hostname {o.get('hostname')}")
