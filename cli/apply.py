"""vmsynth apply."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from vmsynth import guest
from vmsynth.apply import apply
from vmsynth.source import open_source
from vmsynth.store import Inputs

from . import console
from .options import (
    base_option,
    json_option,
    key_file_option,
    limits,
    open_base,
    overlay_input,
    read_key,
    registry_access,
    transfer_options,
)


@click.command("apply", epilog="""\b
Examples:
  vmsynth apply app.vmo --base base.qcow2 -o synth.qcow2
  vmsynth apply app.vmo --base ubuntu-22.04@2.3.1 -o synth.qcow2 --flatten
  qemu-img compare app.qcow2 synth.qcow2      # identical contents
  vmsynth apply app.vmo --base debian@12 -o synth.qcow2    # with memory: also synth.vmem
  vmsynth apply http://depot:8080/app.vmo --base debian@12 -o synth.qcow2
  vmsynth apply oci://registry.example.com/apps/app:1.0 --base debian@12 -o synth.qcow2""")
@click.argument("overlay")
@base_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The rebuilt disk (qcow2).")
@click.option("--memory-output", type=click.Path(dir_okay=False), metavar="VMEM",
              help="Where to write the rebuilt memory snapshot, if the overlay has one "
                   "[default: OUTPUT with the suffix .vmem].")
@click.option("--flatten", is_flag=True,
              help="Write a standalone image instead of a copy-on-write child of the base.")
@click.option("--check", "check_image", is_flag=True,
              help="Then check the result with libguestfs, as `vmsynth check` does (exit 19 "
                   "if it fails; the result is kept for inspection).")
@key_file_option
@transfer_options
@json_option
def command(overlay: str, base_spec: str, output: str, memory_output: str | None,
            flatten: bool, check_image: bool, key_file: str | None, as_json: bool,
            **transfer: object) -> None:
    """Rebuild a disk from a base and an overlay (a file, - for standard input, an
    http(s) URL or an oci:// registry reference: rebuilding proceeds as the bytes arrive).

    By default the result is a qcow2 child whose backing file is the base: the base is only
    read, never copied or changed. Every frame's digest and the rebuilt data's digest are
    checked; nothing appears under the output name unless all of them match.
    """
    started = time.monotonic()
    inputs = Inputs()
    overlay_input(inputs, overlay)
    inputs.add("key file", key_file)
    with open_base(base_spec, as_json) as base, \
            open_source(overlay, limits(transfer), registry_access(transfer)) as source, \
            console.advancing("rebuilding", source.size, enabled=not as_json) as advance:
        report = apply(source, base, Path(output), flatten, advance, read_key(key_file),
                       Path(memory_output) if memory_output else None, inputs=inputs,
                       announce=True)
    elapsed = time.monotonic() - started
    checked = guest.check(Path(output)) if check_image else None
    if as_json:
        extra = {"check": {"ok": checked.ok, "filesystems": [vars(f) for f in checked.filesystems],
                           "operating_systems": checked.operating_systems}} if checked else {}
        memory = {"memory": {"path": str(report.memory.path), "digest": report.memory.digest,
                             "machine": report.memory.machine.to_json()}} \
            if report.memory else {"memory": None}
        console.emit_json(dataclasses.asdict(report) | {"seconds": round(elapsed, 3)} | extra
                          | memory)
        return
    kind = "standalone image" if flatten else f"child of {base.path}"
    console.err.print(f"{output}: {console.human(report.virtual_size)} disk ({kind}), "
                      f"{report.replay.frames} frames verified in {elapsed:.2f} s")
    if report.memory:
        console.err.print(f"{report.memory.path}: memory snapshot "
                          f"({console.human(report.memory.ram_size)} RAM); resume it with "
                          f"`vmsynth boot {output} --resume {report.memory.path}`")
    if checked:
        console.print_check(checked)
