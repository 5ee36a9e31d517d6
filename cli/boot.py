"""vmsynth boot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmsynth import memory

from .launch import boot_inputs, boot_options, check_serial, machine, run_machine
from .options import disk_inputs, json_option, open_disk

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
def command(disk: str, resume_from: str | None, snapshot_on_exit: str | None, as_json: bool,
            **opts: Any) -> None:
    """Boot DISK with QEMU, wait until it is ready, and run it until it powers off.

    Ctrl-C or SIGTERM asks the guest to power down (ACPI), waits --grace seconds,
    then stops QEMU: no QEMU process is left behind. Guest RAM lives in a file in the
    VM's run directory, so `vmsynth snapshot` can capture it at any time.
    """
    inputs = boot_inputs(opts)
    with open_disk(disk) as image:
        disk_inputs(inputs, image)
    inputs.add("memory snapshot to resume", resume_from)
    check_serial(inputs, opts)
    if snapshot_on_exit:
        inputs.check_output("--snapshot-on-exit", snapshot_on_exit)
    resume = memory.read_vmem(Path(resume_from)) if resume_from else None
    if resume is not None:
        memory.check(resume)  # a file from anywhere: nothing is resumed from damaged data
    run_machine(machine(Path(disk), opts, as_json, resume), as_json, {},
                Path(snapshot_on_exit) if snapshot_on_exit else None, inputs)
