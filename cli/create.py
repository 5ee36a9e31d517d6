"""vmsynth create."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from vmsynth.create import create
from vmsynth.errors import OverBudgetError
from vmsynth.store import atomic_path

from . import console
from .options import base_option, json_option, open_base, open_disk


@click.command("create", epilog="""\b
Examples:
  vmsynth create --base base.qcow2 --disk app.qcow2 -o app.vmo
  vmsynth create --base ubuntu-22.04@2.3.1 --disk app.qcow2 -o app.vmo --max-size 250M
  vmsynth create --base base.qcow2 --disk app.qcow2 -o - | ssh cloudlet vmsynth apply - ...""")
@base_option
@click.option("--disk", "disk", required=True, type=click.Path(dir_okay=False),
              help="The customized disk (qcow2): a child of the base, or a full image.")
@click.option("-o", "--output", required=True, metavar="OVERLAY",
              help="Where to write the overlay (- for standard output).")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True,
              help="zstd compression level (19 for the smallest overlay, slower).")
@click.option("--max-size", type=console.SizeParam(), default=None,
              help="Fail (exit 11) instead of writing an overlay larger than this, e.g. 250M.")
@json_option
def command(base_spec: str, disk: str, output: str, level: int, max_size: int | None,
            as_json: bool) -> None:
    """Make an overlay: the difference between a base disk and a customized disk.

    A qcow2 child of the base is diffed by reading only the clusters it allocated; any
    other disk is compared with the base block by block. Unchanged blocks cost nothing;
    zero blocks, blocks found in the base or earlier in the overlay cost a reference;
    edited blocks are stored as deltas against the base; the rest is zstd-compressed.
    """
    started = time.monotonic()
    with open_base(base_spec, as_json) as base, open_disk(disk) as image:
        with console.progress("diffing", 1, enabled=not as_json) as update:
            if output == "-":
                report = create(base, image, sys.stdout.buffer, level, update)
                if max_size is not None and report.overlay_bytes > max_size:
                    raise OverBudgetError(f"overlay was {report.overlay_bytes:,} bytes, over the "
                                          f"budget of {max_size:,}")
            else:
                with atomic_path(Path(output)) as tmp:
                    with open(tmp, "wb") as f:
                        report = create(base, image, f, level, update)
                    if max_size is not None and report.overlay_bytes > max_size:
                        raise OverBudgetError(
                            f"overlay would be {report.overlay_bytes:,} bytes, over the budget "
                            f"of {max_size:,}; nothing was written",
                            hint="`vmsynth inspect` on an overlay made without --max-size shows "
                                 "where the bytes go")
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
        f"  blocks: {blocks['data']} new, {blocks['delta']} delta, {blocks['copy']} deduped, "
        f"{blocks['base']} from base, {blocks['zero']} zero")
