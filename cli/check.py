"""vmsynth check."""

from __future__ import annotations

from pathlib import Path

import click

from vmsynth import guest

from . import console
from .options import json_option


@click.command("check", epilog="""\b
Examples:
  vmsynth check synth.qcow2
  vmsynth check synth.qcow2 --json""")
@click.argument("disk", type=click.Path(dir_okay=False))
@json_option
def command(disk: str, as_json: bool) -> None:
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
    console.print_check(report)
