"""vmsynth pull: fetch an overlay from an OCI registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmsynth.registry import Reference
from vmsynth.registry_overlays import pull_overlay
from vmsynth.store import Inputs

from . import console
from .options import json_option, limits, registry_access, transfer_options


@click.command("pull", epilog="""\b
Examples:
  vmsynth pull oci://registry.example.com/apps/app:1.0 -o app.vmo
  vmsynth pull oci://127.0.0.1:5000/apps/app@sha256:3f1c... -o app.vmo --plain-http
  vmsynth apply oci://registry.example.com/apps/app:1.0 --base debian@12 -o synth.qcow2

\b
Exit codes: 0 ok, 17 cannot write output, 28 not found in the registry, 29
unauthorized by the registry, 30 not a vmsynth overlay, 31 digest mismatch,
32 registry unreachable, 2 usage error.""")
@click.argument("reference", metavar="oci://HOST/REPOSITORY:TAG")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the overlay.")
@transfer_options
@json_option
def command(reference: str, output: str, as_json: bool, **opts: Any) -> None:
    """Fetch the overlay REFERENCE names into OUTPUT.

    The file appears under OUTPUT only once its SHA-256 is the one the registry's manifest
    names; a dropped connection is resumed from where it broke (an HTTP Range request).
    To rebuild straight from the registry, give the reference to `apply`, `run`,
    `verify` or `offload` instead: they rebuild as the bytes arrive.
    """
    ref = Reference.parse(reference)
    Inputs().check_output("-o/--output", output)
    access = registry_access(opts, limits(opts))
    with console.advancing("pulling", 0, enabled=not as_json) as advance:
        report = pull_overlay(ref, Path(output), access, advance, announce=True)
    if as_json:
        console.emit_json(report)
        return
    layer = report["overlay"]
    console.err.print(f"pulled {report['reference']} into {output}: "
                      f"{console.human(layer['size'])}, {layer['digest']} verified"
                      + (f" (resumed {report['resumed']} times)" if report["resumed"] else ""))
