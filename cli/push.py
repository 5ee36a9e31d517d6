"""vmsynth push: publish an overlay on an OCI registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmsynth.registry import Reference
from vmsynth.registry_overlays import push_overlay

from . import console
from .options import json_option, registry_access, registry_options


@click.command("push", epilog="""\b
Examples:
  vmsynth push app.vmo oci://registry.example.com/apps/app:1.0
  vmsynth push app.vmo oci://127.0.0.1:5000/apps/app:1.0 --plain-http --json
  oras manifest fetch registry.example.com/apps/app:1.0   # shows the base it needs

\b
Exit codes: 0 ok, 13 corrupt overlay, 16 missing file, 29 unauthorized by the
registry, 31 digest mismatch, 32 registry unreachable, 2 usage error.""")
@click.argument("overlay", type=click.Path(dir_okay=False))
@click.argument("reference", metavar="oci://HOST/REPOSITORY:TAG")
@registry_options
@json_option
def command(overlay: str, reference: str, as_json: bool, **opts: Any) -> None:
    """Publish OVERLAY on an OCI registry as a vmsynth artifact, under TAG.

    The manifest's annotations name the base the overlay needs (name, version, digest)
    and its format version, so a registry's UI or `oras manifest fetch` shows them. What
    the registry has already is not sent again: pushing an overlay twice uploads nothing.
    Credentials: those `docker login` / `oras login` stored, or --registry-token-file.
    """
    ref = Reference.parse(reference, need="tag")
    path = Path(overlay)
    size = path.stat().st_size if path.is_file() else 0
    with console.advancing("pushing", size, enabled=not as_json) as advance:
        report = push_overlay(path, ref, registry_access(opts), advance)
    if as_json:
        console.emit_json(report)
        return
    layer = report["overlay"]
    sent = "uploaded" if layer["uploaded"] else "already there"
    console.err.print(f"pushed {overlay} to {report['reference']}: overlay "
                      f"{console.human(layer['size'])} ({sent}), manifest {report['digest']}"
                      + ("" if report["manifest_uploaded"] else " (unchanged)"))
