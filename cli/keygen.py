"""vmsynth keygen."""

from __future__ import annotations

from pathlib import Path

import click

from vmsynth.keys import keygen

from . import console
from .options import json_option


@click.command("keygen", epilog="""\b
Examples:
  vmsynth keygen -o app.key
  vmsynth create --base base.qcow2 --disk app.qcow2 -o app.vmo --encrypt --key-file app.key""")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The new key file (never overwritten; mode 0600).")
@json_option
def command(output: str, as_json: bool) -> None:
    """Make a key file for encrypted overlays: 32 random bytes.

    Keep it apart from the overlays: whoever has the key can read them.
    """
    keygen(Path(output))
    if as_json:
        console.emit_json({"key_file": output})
    else:
        console.err.print(f"wrote a new key to {output} (mode 0600)")
