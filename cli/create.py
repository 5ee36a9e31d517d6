"""vmsynth create."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from vmsynth.create import CreateReport, create
from vmsynth.errors import OverBudgetError
from vmsynth.store import Inputs, StreamOutput, atomic_path, write_error

from . import console
from .options import (
    base_inputs,
    base_option,
    disk_inputs,
    json_option,
    key_file_option,
    new_key,
    open_base,
    open_disk,
    open_memory,
)


@click.command("create", epilog="""\b
Examples:
  vmsynth create --base base.qcow2 --disk app.qcow2 -o app.vmo
  vmsynth create --base ubuntu-22.04@2.3.1 --disk app.qcow2 -o app.vmo --max-size 250M
  vmsynth create --base base.qcow2 --disk app.qcow2 -o app.vmo --encrypt --key-file app.key
  vmsynth create --base base.qcow2 --disk app.qcow2 -o - | ssh cloudlet vmsynth apply - ...
  vmsynth create --base debian@12 --disk app.qcow2 --memory app.vmem -o app.vmo
  vmsynth create --base debian@12 --disk app.qcow2 -o app.vmo --level 19 --solid""")
@base_option
@click.option("--disk", "disk", required=True, type=click.Path(dir_okay=False),
              help="The customized disk (qcow2): a child of the base, or a full image.")
@click.option("--memory", type=click.Path(dir_okay=False), metavar="VMEM",
              help="The customized VM's memory snapshot (`vmsynth snapshot`), taken with the "
                   "disk in this state; diffed against the base's (`base add --memory`).")
@click.option("-o", "--output", required=True, metavar="OVERLAY",
              help="Where to write the overlay (- for standard output).")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True,
              help="zstd compression level (19 with --solid for the smallest overlay; "
                   "slower).")
@click.option("--solid", is_flag=True,
              help="Compress all frames as one stream with a 128 MiB window (64 MiB from "
                   "level 10): repeats far apart are found, so the overlay is smaller, but "
                   "zstd uses one core in create and apply, and frames cannot be fetched "
                   "alone.")
@click.option("--max-size", type=console.SizeParam(), default=None,
              help="Fail (exit 11) instead of writing an overlay larger than this, e.g. 250M.")
@click.option("--encrypt", is_flag=True,
              help="Encrypt with AES-256-GCM: key from --key-file, else a passphrase from "
                   "$VMSYNTH_PASSPHRASE or a prompt.")
@key_file_option
@json_option
def command(base_spec: str, disk: str, memory: str | None, output: str, level: int,
            solid: bool, max_size: int | None, encrypt: bool, key_file: str | None,
            as_json: bool) -> None:
    """Make an overlay: the difference between a base disk and a customized disk.

    A qcow2 child of the base is diffed by reading only the clusters it allocated; any
    other disk is compared with the base block by block. Unchanged blocks cost nothing;
    zero blocks, blocks found in the base or earlier in the overlay cost a reference;
    edited blocks are stored as deltas against the base; the rest is zstd-compressed.
    """
    started = time.monotonic()
    inputs = Inputs()
    inputs.add("key file", key_file)
    key = new_key(key_file) if encrypt or key_file else None
    with open_base(base_spec, as_json) as base, open_disk(disk) as image, \
            open_memory(memory) as snap:
        base_inputs(inputs, base)
        disk_inputs(inputs, image)
        inputs.add("memory snapshot", memory)
        # A device or a FIFO (/dev/null, a named pipe) is written in place, like standard
        # output; anything else gets a temporary file renamed into place.
        stream = output == "-" or inputs.check_output("-o/--output", output, stream=True)
        with console.progress("diffing", 1, enabled=not as_json) as update:
            def write(f: BinaryIO) -> CreateReport:
                return create(base, image, f, level, update, key, snap, solid)

            if stream:
                with _stream_output(output) as out:
                    if max_size is None:
                        report = write(out)
                    else:
                        # With a budget the overlay waits in a temporary file until its size
                        # is known: an oversized one never reaches the stream.
                        with tempfile.TemporaryFile() as f:
                            report = write(f)
                            _check_budget(report.overlay_bytes, max_size)
                            f.seek(0)
                            shutil.copyfileobj(f, out, 1 << 20)
                    out.flush()
            else:
                with atomic_path(Path(output), private=key is not None, keep=inputs,
                                 announce=True) as tmp, \
                        open(tmp, "wb") as f:
                    report = write(f)
                    _check_budget(report.overlay_bytes, max_size)
                    f.flush()
                    os.fsync(f.fileno())  # durable before the rename makes it visible
    elapsed = time.monotonic() - started
    result = dataclasses.asdict(report) | {"output": output, "seconds": round(elapsed, 3)}
    if as_json:
        console.emit_json(result)
        return
    blocks = report.summary["blocks"]
    path = "child of the base: read only its allocated clusters" if report.fast_path \
        else "independent image: compared block by block"
    console.err.print(
        f"{output}: {console.human(report.overlay_bytes)} in {elapsed:.2f} s ({path}, "
        f"{console.human(report.scanned_bytes)} examined)\n"
        f"  disk blocks: {blocks['data']} new, {blocks['delta']} delta, {blocks['copy']} "
        f"deduped, {blocks['base']} from base, {blocks['zero']} zero")
    pages = report.summary.get("memory_blocks")
    if pages:
        console.err.print(
            f"  memory pages: {pages['data']} new, {pages['delta']} delta, {pages['copy']} "
            f"deduped, {pages['base']} from base memory, {pages['disk']} from base disk, "
            f"{pages['disk_copy']} from the new disk, {pages['zero']} zero")


@contextlib.contextmanager
def _stream_output(output: str) -> Iterator[StreamOutput]:
    """Standard output, or a device or FIFO opened for writing in place."""
    if output == "-":
        yield StreamOutput(sys.stdout.buffer, "standard output")
        return
    try:
        # Unbuffered: a failed write is reported once, not again when the file is closed.
        raw = open(output, "wb", buffering=0)  # noqa: SIM115
    except OSError as err:
        raise write_error(output, err, "open") from err
    with raw:
        yield StreamOutput(raw, output)


def _check_budget(size: int, max_size: int | None) -> None:
    if max_size is not None and size > max_size:
        raise OverBudgetError(f"overlay would be {size:,} bytes, over the budget of "
                              f"{max_size:,}; nothing was written",
                              hint="`vmsynth inspect` on an overlay made without --max-size "
                                   "shows where the bytes go")
