"""vmsynth boot, run and check: VMs from synthesized disks."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmsynth import accel, guest, memory, session, signals
from vmsynth.apply import apply
from vmsynth.errors import SnapshotError
from vmsynth.memory import Vmem
from vmsynth.source import open_source
from vmsynth.store import Inputs
from vmsynth.vm import BootOptions, Machine, require_qemu

from . import console
from .options import (
    base_inputs,
    base_option,
    disk_inputs,
    json_option,
    key_file_option,
    limits,
    open_base,
    open_disk,
    overlay_input,
    read_key,
    transfer_options,
)


def boot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options boot and run share."""
    for option in reversed([
        click.option("--memory", default="1G", show_default=True,
                     help="Guest RAM (QEMU -m); a resumed snapshot keeps its own."),
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


def _machine(disk: Path, opts: dict[str, Any], as_json: bool, resume: Vmem | None = None
             ) -> Machine:
    require_qemu()  # before the accelerator notice: the one error line says what to install
    if resume is not None:
        memory.check_resumable(resume)  # before the accelerator probe: fail fast
    chosen = accel.choose(opts["accel"])
    if opts["accel"] == "auto" and chosen.name == "tcg" and not as_json:
        console.err.print(f"notice: {chosen.reason}")
    serial = opts["serial"]
    options = BootOptions(
        disk=disk, accel=chosen, memory=opts["memory"], cpus=opts["cpus"],
        kernel=Path(opts["kernel"]) if opts["kernel"] else None,
        initrd=Path(opts["initrd"]) if opts["initrd"] else None, append=opts["append"],
        vnc=opts["vnc"], serial_log=Path(serial) if serial and serial != "-" else None,
        ready=opts["ready"], timeout=opts["timeout"], extra_args=list(opts["qemu_args"]),
        resume=resume)
    echo = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if serial == "-" else None
    return Machine(options, on_serial=echo, grace=opts["grace"])


def _run_machine(machine: Machine, as_json: bool, extra: dict[str, Any],
                 snapshot_to: Path | None = None, inputs: Inputs | None = None) -> None:
    """Start, wait until ready, show how to reach it, wait until it ends.

    With `snapshot_to`, Ctrl-C or SIGTERM snapshots the VM's memory there instead of
    powering it down.
    """
    with machine:
        seconds = machine.wait_ready()
        info = machine.info() | extra | {"ready_seconds": round(seconds, 3)}
        if machine.resume_seconds is not None:
            info["resume_seconds"] = round(machine.resume_seconds, 3)
        verb = "resumed" if machine.resume_seconds is not None else "ready"
        if as_json:
            console.emit_json(info | {"event": "ready"})
        else:
            vnc = info["vnc"]
            console.err.print(
                f"{verb} in {seconds:.1f} s ({info['accel']}): pid {info['pid']}, "
                f"QMP {info['qmp_socket']}, serial log {info['serial_log']}"
                + (f", VNC {vnc['host']}:{vnc['port']} (display {vnc['display']})" if vnc
                   else ""))
        try:
            code = machine.wait()
        except KeyboardInterrupt:
            if snapshot_to is None:
                raise
            vmem = machine.snapshot(snapshot_to, inputs)
            _snapshot_taken(vmem, as_json)
            return
        if snapshot_to is not None:
            raise SnapshotError(f"the VM powered off by itself: no snapshot was written to "
                                f"{snapshot_to}",
                                hint="stop it with Ctrl-C or SIGTERM while it runs")
        if not as_json:
            console.err.print(f"the VM powered off (QEMU exit {code})")


def _snapshot_taken(vmem: Vmem, as_json: bool) -> None:
    if as_json:
        console.emit_json({"event": "snapshot", "path": str(vmem.path),
                           "machine": vmem.machine.to_json(), "state_size": vmem.state_size,
                           "digest": vmem.digest})
    else:
        m = vmem.machine
        console.err.print(f"{vmem.path}: memory snapshot of a {m.machine} VM "
                          f"({console.human(m.ram_size)} RAM, {m.cpu}, QEMU {m.qemu_version}); "
                          f"the VM was stopped")


BOOT_EPILOG = """\b
Examples:
  vmsynth boot synth.qcow2 --memory 2G --cpus 2
  vmsynth boot synth.qcow2 --kernel vmlinux --initrd initrd.gz \\
      --append "console=ttyS0" --ready "login:" --serial - --vnc none
  vmsynth boot app.qcow2 --ready "app started" --snapshot-on-exit app.vmem
  vmsynth boot synth.qcow2 --resume synth.vmem      # continue where the snapshot was"""


@click.command("boot", epilog=BOOT_EPILOG)
@click.argument("disk", type=click.Path(dir_okay=False))
@boot_options
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), metavar="VMEM",
              help="Resume this memory snapshot (taken with DISK in the same state) instead "
                   "of booting; RAM size, CPU and devices come from the snapshot.")
@click.option("--snapshot-on-exit", type=click.Path(dir_okay=False), metavar="VMEM",
              help="On Ctrl-C or SIGTERM, snapshot the VM's memory and device state to "
                   "VMEM instead of powering it down (DISK then matches the snapshot).")
@json_option
def boot(disk: str, resume_from: str | None, snapshot_on_exit: str | None, as_json: bool,
         **opts: Any) -> None:
    """Boot DISK with QEMU, wait until it is ready, and run it until it powers off.

    Ctrl-C or SIGTERM asks the guest to power down (ACPI), waits --grace seconds,
    then stops QEMU: no QEMU process is left behind. Guest RAM lives in a file in the
    VM's run directory, so `vmsynth snapshot` can capture it at any time.
    """
    inputs = _boot_inputs(opts)
    with open_disk(disk) as image:
        disk_inputs(inputs, image)
    inputs.add("memory snapshot to resume", resume_from)
    _check_serial(inputs, opts)
    if snapshot_on_exit:
        inputs.check_output("--snapshot-on-exit", snapshot_on_exit)
    resume = memory.read_vmem(Path(resume_from)) if resume_from else None
    if resume is not None:
        memory.check(resume)  # a file from anywhere: nothing is resumed from damaged data
    _run_machine(_machine(Path(disk), opts, as_json, resume), as_json, {},
                 Path(snapshot_on_exit) if snapshot_on_exit else None, inputs)


def _boot_inputs(opts: dict[str, Any]) -> Inputs:
    inputs = Inputs()
    inputs.add("kernel", opts["kernel"])
    inputs.add("initrd", opts["initrd"])
    return inputs


def _check_serial(inputs: Inputs, opts: dict[str, Any]) -> None:
    """QEMU truncates the serial log file: it must not be an input (a device is fine)."""
    if opts["serial"] and opts["serial"] != "-":
        inputs.check_output("--serial", opts["serial"], stream=True)


@click.command("snapshot", epilog="""\b
Examples:
  vmsynth snapshot --qmp /tmp/vmsynth-vm-1234-x/qmp.sock -o app.vmem
  vmsynth create --base debian@12 --disk app.qcow2 --memory app.vmem -o app.vmo""")
@click.option("--qmp", "qmp_socket", required=True, type=click.Path(), metavar="SOCKET",
              help="The VM's QMP socket, as `vmsynth boot` prints it.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              metavar="VMEM", help="Where to write the memory snapshot.")
@json_option
def snapshot(qmp_socket: str, output: str, as_json: bool) -> None:
    """Snapshot a running VM's memory and device state, then stop the VM.

    The VM must have been started by `vmsynth boot` (its RAM is in a shared file). It is
    stopped, its device state migrated out, its RAM copied page for page, and QEMU quits,
    so its disk stays exactly as the snapshot expects: diff both with `vmsynth create`.
    """
    _snapshot_taken(memory.snapshot(Path(qmp_socket), Path(output)), as_json)


@click.command("run", epilog="""\b
Examples:
  vmsynth run app.vmo --base ubuntu-22.04@2.3.1 --memory 2G
  vmsynth run app.vmo --base base.qcow2 --kernel vmlinux --initrd initrd.gz --keep
  vmsynth run http://depot:8080/app.vmo --base debian@12""")
@click.argument("overlay")
@base_option
@click.option("--keep", is_flag=True,
              help="Keep the session's disk (and memory snapshot) when the VM ends.")
@boot_options
@key_file_option
@transfer_options
@json_option
def run(overlay: str, base_spec: str, keep: bool, key_file: str | None, as_json: bool,
        **opts: Any) -> None:
    """Rebuild the VM from OVERLAY on a base, boot or resume it, and scrub it when it ends.

    OVERLAY is a file, - (standard input) or an http(s) URL, rebuilt as it arrives.
    An overlay with a memory snapshot is resumed where it was snapshotted (no boot); the
    disk and memory are rebuilt into a private session directory under $VMSYNTH_HOME/sessions;
    when the VM ends (or on Ctrl-C / SIGTERM / failure) its files are overwritten and
    deleted, so nothing of the user remains, unless --keep is given.
    """
    started = time.monotonic()
    transfer = limits(opts)
    inputs = _boot_inputs(opts)
    overlay_input(inputs, overlay)
    inputs.add("key file", key_file)
    _check_serial(inputs, opts)
    sess = None
    try:
        with signals.deferred():  # a session exists only inside the try that removes it
            sess = session.new(keep=inputs)
        with open_base(base_spec, as_json) as base, open_source(overlay, transfer) as source, \
                console.advancing("rebuilding", source.size, enabled=not as_json) as advance:
            base_inputs(inputs, base)
            _check_serial(inputs, opts)
            # Not synced to disk: a session never outlives its VM (after a crash it is
            # scrubbed, not resumed), and a sync would delay the VM's start.
            report = apply(source, base, sess.disk, progress=advance, key=read_key(key_file),
                           memory_output=sess.memory, durable=False, inputs=inputs)
        synthesized = time.monotonic() - started
        machine = _machine(sess.disk, opts, as_json, report.memory)
        _run_machine(machine, as_json, {"session": sess.id,
                                        "synthesis_seconds": round(synthesized, 3)})
    finally:
        # The scrub must finish: a Ctrl-C or SIGTERM now takes effect right after it.
        with signals.deferred():
            if sess is not None and keep:
                if not as_json:
                    console.err.print(f"kept the session: {sess.dir}")
            elif sess is not None:
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
