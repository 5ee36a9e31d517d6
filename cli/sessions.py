"""vmsynth sessions."""

from __future__ import annotations

import asyncio
from typing import Any

import click
from rich.table import Table

from . import console
from .options import cloudlet_client, cloudlet_options, json_option


@click.command("sessions", epilog="""\b
Examples:
  vmsynth sessions --cloudlet https://127.0.0.1:8750 --fingerprint sha256:3f1c...
  vmsynth sessions --cloudlet http://127.0.0.1:8750 --json | jq '.sessions[].state'""")
@cloudlet_options
@json_option
def command(url: str, token_file: str | None, fingerprint: str | None, cacert: str | None,
             as_json: bool) -> None:
    """List a cloudlet's sessions and their state (for its operator)."""
    client = cloudlet_client(url, token_file, fingerprint, cacert)

    async def fetch() -> dict[str, Any]:
        async with client:
            return await client.sessions()

    found = asyncio.run(fetch())
    if as_json:
        console.emit_json(found)
        return
    table = Table("session", "state", "base", "VNC", "timeline")
    for s in found.get("sessions", []):
        vnc = s.get("vnc")
        table.add_row(s["id"], s["state"], s["base"],
                      f"{vnc['host']}:{vnc['port']}" if vnc else "-",
                      ", ".join(f"{k} {v:.1f}s" for k, v in s.get("timeline", {}).items()))
    console.out.print(table)
