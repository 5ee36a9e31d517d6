"""vmsynth verify."""

from __future__ import annotations

import contextlib

import click

from vmsynth.source import open_source, redact
from vmsynth.verify import verify

from . import console
from .options import (
    json_option,
    key_file_option,
    limits,
    open_base,
    read_key,
    registry_access,
    transfer_options,
)


@click.command("verify", epilog="""\b
Examples:
  vmsynth verify app.vmo
  vmsynth verify app.vmo --base ubuntu-22.04@2.3.1 --max-size 250M --json
  vmsynth verify oci://registry.example.com/apps/app:1.0 --max-size 250M

\b
Exit codes: 0 ok, 10 base mismatch, 11 over budget, 12 unsupported format
version, 13 corrupt or truncated, 16 missing file, 20 key missing or
wrong, 2 usage error; from a registry: 28 not found, 29 unauthorized,
30 not a vmsynth overlay, 31 digest mismatch, 32 registry unreachable.""")
@click.argument("overlay")
@click.option("--base", "base_spec", metavar="BASE",
              help="Also check the overlay fits this base and rebuilds to the recorded digest.")
@click.option("--max-size", type=console.SizeParam(), default=None,
              help="Fail (exit 11) if the overlay is larger than this, e.g. 250M.")
@key_file_option
@transfer_options
@json_option
def command(overlay: str, base_spec: str | None, max_size: int | None, key_file: str | None,
            as_json: bool, **transfer: object) -> None:
    """Check an overlay: structure and every digest; optionally its base and a size budget.

    This is the step a CI pipeline gates on: each failure has its own exit code.
    """
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(open_base(base_spec, as_json)) if base_spec else None
        source = stack.enter_context(open_source(overlay, limits(transfer),
                                                 registry_access(transfer)))
        advance = stack.enter_context(console.advancing("verifying", source.size,
                                                        not as_json))
        report = verify(source, base, max_size, advance, read_key(key_file))
    checks = {"structure": "ok", "digests": "ok",
              "base": "ok" if report.base_checked else "skipped (no --base)",
              "budget": "ok" if max_size is not None else "skipped (no --max-size)"}
    if as_json:
        console.emit_json({"ok": True, "overlay": redact(overlay), "overlay_bytes": report.overlay_bytes,
                           "max_size": max_size, "checks": checks,
                           "frames": report.replay.frames, "records": report.replay.records,
                           "result_digest": report.replay.result_digest})
        return
    budget = f" (budget {console.human(max_size)})" if max_size is not None else ""
    console.out.print(f"{redact(overlay)}: ok, {console.human(report.overlay_bytes)}{budget}, "
                      f"{report.replay.frames} frames; " +
                      ", ".join(f"{k} {v}" for k, v in checks.items()))
