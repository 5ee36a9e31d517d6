"""vmsynth snapshot."""

from __future__ import annotations

from pathlib import Path

import click

from vmsynth import snapshot

from .launch import snapshot_taken
from .options import json_option


@click.command("snapshot", epilog="""\b
Examples:
  vmsynth snapshot --qmp /tmp/vmsynth-vm-1234-x/qmp.sock -o app.vmem
  vmsynth create --base debian@12 --disk app.qcow2 --memory app.vmem -o app.vmo""")
@click.option("--qmp", "qmp_socket", required=True, type=click.Path(), metavar="SOCKET",
              help="The VM's QMP socket, as `vmsynth boot` prints it.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              metavar="VMEM", help="Where to write the memory snapshot.")
@json_option
def command(qmp_socket: str, output: str, as_json: bool) -> None:
    """Snapshot a running VM's memory and device state, then stop the VM.

    The VM must have been started by `vmsynth boot` (its RAM is in a shared file). It is
    stopped, its device state migrated out, its RAM copied page for page, and QEMU quits,
    so its disk stays exactly as the snapshot expects: diff both with `vmsynth create`.
    """
    snapshot_taken(snapshot.snapshot(Path(qmp_socket), Path(output)), as_json)
