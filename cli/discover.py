"""vmsynth discover."""

from __future__ import annotations

import asyncio
from typing import Any

import click
from rich.table import Table

from vmsynth.service.discovery import discover

from . import console
from .options import json_option, wanted_base


@click.command("discover", epilog="""\b
Examples:
  vmsynth discover
  vmsynth discover --for app.vmo --timeout 3 --json""")
@click.option("--timeout", type=click.FloatRange(0.2, 60), default=2.0, show_default=True,
              metavar="SECONDS", help="How long to listen for answers.")
@click.option("--for", "overlay", metavar="OVERLAY",
              help="Rank first the cloudlets that have this overlay's base.")
@json_option
def command(timeout: float, overlay: str | None, as_json: bool) -> None:
    """List the cloudlets nearby: mDNS (_cloudlet._tcp), each confirmed over HTTP.

    A cloudlet that does not answer its confirmation is left out (mDNS caches keep a
    cloudlet that died silently for minutes). Best first: has the overlay's base, has a
    free slot, shortest round trip.
    """
    want = wanted_base(overlay) if overlay else None
    found = asyncio.run(discover(timeout, want))
    if as_json:
        console.emit_json([f.to_json() for f in found])
        return
    if not found:
        console.err.print(f"no cloudlet answered within {timeout:g} s")
        return
    table = Table("cloudlet", "address", "round trip", "free slots", "load", "bases",
                  *(["has the base"] if want else []))
    for f in found:
        slots: dict[str, Any] = f.info.get("slots", {})
        table.add_row(f.info.get("service_id", f.name), f.url, f"{f.rtt_ms:.1f} ms",
                      f"{slots.get('free')}/{slots.get('total')}",
                      str(f.info.get("load", {}).get("1m")),
                      ", ".join(f"{b['name']}@{b['version']}" for b in f.info.get("bases", [])),
                      *(["yes" if f.has_base else "no"] if want else []))
    console.out.print(table)
