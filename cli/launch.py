"""Starting a VM from the command line: the options boot and run share, the accelerator
notice, and how a running VM is shown and stopped (`boot`, `run`, `snapshot` use these)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmsynth import accel, snapshot
from vmsynth.bases import BootConfig
from vmsynth.errors import SnapshotError
from vmsynth.memory import Vmem
from vmsynth.store import Inputs
from vmsynth.vm import BootOptions, Machine, require_qemu

from . import console


def boot_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options boot and run share."""
    for option in reversed([
        click.option("--memory", help="Guest RAM (QEMU -m) [default: the base's, else 1G]; "
                                       "a resumed snapshot keeps its own."),
        click.option("--cpus", type=click.IntRange(1, 256),
                     help="Virtual CPUs [default: the base's, else 1]."),
        click.option("--kernel", type=click.Path(dir_okay=False),
                     help="Boot this kernel directly instead of from the disk [default: "
                          "the base's, if `base add --kernel` recorded one]."),
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


def machine(disk: Path, opts: dict[str, Any], as_json: bool, resume: Vmem | None = None,
            base: BootConfig | None = None) -> Machine:
    """The VM to start: the command's options, else the base's recorded boot settings."""
    base = base or BootConfig()
    require_qemu()  # before the accelerator notice: the one error line says what to install
    if resume is not None:
        snapshot.check_resumable(resume)  # before the accelerator probe: fail fast
    chosen = accel.choose(opts["accel"])
    if opts["accel"] == "auto" and chosen.name == "tcg" and not as_json:
        console.err.print(f"notice: {chosen.reason}")
    serial = opts["serial"]
    kernel = Path(opts["kernel"]) if opts["kernel"] else base.kernel
    initrd = Path(opts["initrd"]) if opts["initrd"] else base.initrd if not opts["kernel"] \
        else None
    options = BootOptions(
        disk=disk, accel=chosen, memory=opts["memory"] or base.memory or "1G",
        cpus=opts["cpus"] or base.cpus or 1, kernel=kernel, initrd=initrd,
        append=opts["append"] or (base.append if not opts["kernel"] else None),
        vnc=opts["vnc"], serial_log=Path(serial) if serial and serial != "-" else None,
        ready=opts["ready"] or (base.ready if resume is None else None),
        timeout=opts["timeout"], extra_args=list(opts["qemu_args"]), resume=resume)
    echo = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if serial == "-" else None
    return Machine(options, on_serial=echo, grace=opts["grace"])


def run_machine(machine: Machine, as_json: bool, extra: dict[str, Any],
                 snapshot_to: Path | None = None, inputs: Inputs | None = None) -> None:
    """Start, wait until ready, show how to reach it, wait until it ends.

    With `snapshot_to`, Ctrl-C or SIGTERM snapshots the VM's memory there instead of
    powering it down.
    """
    with machine:
        seconds = machine.wait_ready()
        try:  # from here a stop signal snapshots: even one sent as soon as "ready" shows
            _show_ready(machine, seconds, extra, as_json)
            code = machine.wait()
        except KeyboardInterrupt:
            if snapshot_to is None:
                raise
            vmem = machine.snapshot(snapshot_to, inputs)
            snapshot_taken(vmem, as_json)
            return
        if snapshot_to is not None:
            raise SnapshotError(f"the VM powered off by itself: no snapshot was written to "
                                f"{snapshot_to}",
                                hint="stop it with Ctrl-C or SIGTERM while it runs")
        if not as_json:
            console.err.print(f"the VM powered off (QEMU exit {code})")


def _show_ready(machine: Machine, seconds: float, extra: dict[str, Any], as_json: bool) -> None:
    info = machine.info() | extra | {"ready_seconds": round(seconds, 3)}
    if machine.resume_seconds is not None:
        info["resume_seconds"] = round(machine.resume_seconds, 3)
    if as_json:
        console.emit_json(info | {"event": "ready"})
        return
    verb = "resumed" if machine.resume_seconds is not None else "ready"
    vnc = info["vnc"]
    console.err.print(f"{verb} in {seconds:.1f} s ({info['accel']}): pid {info['pid']}, "
                      f"QMP {info['qmp_socket']}, serial log {info['serial_log']}"
                      + (f", VNC {vnc['host']}:{vnc['port']} (display {vnc['display']})"
                         if vnc else ""))


def snapshot_taken(vmem: Vmem, as_json: bool) -> None:
    if as_json:
        console.emit_json({"event": "snapshot", "path": str(vmem.path),
                           "machine": vmem.machine.to_json(), "state_size": vmem.state_size,
                           "digest": vmem.digest})
    else:
        m = vmem.machine
        console.err.print(f"{vmem.path}: memory snapshot of a {m.machine} VM "
                          f"({console.human(m.ram_size)} RAM, {m.cpu}, QEMU {m.qemu_version}); "
                          f"the VM was stopped")




def boot_inputs(opts: dict[str, Any]) -> Inputs:
    """The files a VM launch reads besides its disk: no output may be one of them."""
    inputs = Inputs()
    inputs.add("kernel", opts["kernel"])
    inputs.add("initrd", opts["initrd"])
    return inputs


def check_serial(inputs: Inputs, opts: dict[str, Any]) -> None:
    """QEMU truncates the serial log file: it must not be an input (a device is fine)."""
    if opts["serial"] and opts["serial"] != "-":
        inputs.check_output("--serial", opts["serial"], stream=True)
