"""vmsynth inspect."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmsynth import guest
from vmsynth.apply import apply
from vmsynth.errors import BadInputError
from vmsynth.keys import Key
from vmsynth.verify import describe

from . import console
from .options import (
    json_option,
    key_file_option,
    open_base,
    read_key,
    registry_access,
    registry_options,
)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


@click.command("inspect", epilog="""\b
Examples:
  vmsynth inspect app.vmo
  vmsynth inspect app.vmo --files --base ubuntu-22.04@2.3.1 --top 10
  vmsynth inspect app.vmo --json | jq .sizes.overlay
  vmsynth inspect oci://registry.example.com/apps/app:1.0""")
@click.argument("overlay")
@click.option("--files", is_flag=True,
              help="Also list the guest files the overlay changes, largest first (needs --base; "
                   "uses libguestfs).")
@click.option("--base", "base_spec", metavar="BASE", help="The base, for --files.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1),
              help="How many files --files lists.")
@key_file_option
@registry_options
@json_option
def command(overlay: str, files: bool, base_spec: str | None, top: int, key_file: str | None,
            as_json: bool, **opts: Any) -> None:
    """Show what an overlay holds: version, base, sizes, block kinds, transfer times.

    Reads only the header and the index at the end of the file (use `verify` to check
    every digest). With --files --base BASE it rebuilds the disk in a scratch directory
    and compares the guest's files with the base's, to show which files make it big.
    An oci:// reference is pulled into a scratch file first (checked against its digest).
    """
    if files and not base_spec:
        raise click.UsageError("--files needs --base")
    access = registry_access(opts)
    with _local(overlay, access, as_json) as (path, registry):
        key = read_key(key_file)
        info = describe(path, key if key and (key.key_file or key.passphrase) else None)
        if registry:
            info["registry"] = registry
        if files:
            assert base_spec is not None
            info["files"] = [vars(f) for f in _changed_files(path, base_spec, key,
                                                             as_json)][:top]
    if as_json:
        console.emit_json(info)
        return
    sizes, blocks, base = info["sizes"], info["blocks"], info["base"]
    table = Table(title=f"{overlay} (format {info['format_version']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    label = f"{base.get('name')}@{base.get('version')}" if base.get("version") else base.get("name")
    table.add_row("base", f"{label}, {console.human(base.get('virtual_size', 0))}")
    table.add_row("base digest", str(base.get("digest")))
    table.add_row("virtual disk", console.human(sizes["virtual_disk"]))
    table.add_row("overlay", f"{console.human(sizes['overlay'])} ({sizes['overlay']:,} bytes)")
    table.add_row("payload", f"{console.human(sizes['payload_uncompressed'])} uncompressed, "
                  f"{console.human(sizes['payload_stored'])} stored "
                  f"(ratio {info['compression_ratio']})")
    if info["encrypted"] and not blocks:
        table.add_row("blocks (4 KiB)", "sealed (encrypted; give the key to see them)")
    else:
        table.add_row("blocks (4 KiB)", f"{blocks.get('data', 0)} new, {blocks.get('delta', 0)} delta, "
                      f"{blocks.get('copy', 0)} deduped, {blocks.get('base', 0)} from base, "
                      f"{blocks.get('zero', 0)} zero")
    table.add_row("frames", str(info["frames"]) +
                  (" (solid: one zstd stream, decoded in order)" if info["solid"] else ""))
    mem = info["memory"]
    if mem is not None:
        m = mem["machine"]
        table.add_row("memory", f"{console.human(mem['ram_size'])} RAM ({m['machine']}, "
                      f"{m['cpu']}, QEMU {m['qemu_version']}): {mem['frames']} frames, "
                      f"{console.human(mem['stored_bytes'])} stored")
        pages = mem["blocks"]
        if pages:
            table.add_row("memory pages", f"{pages.get('data', 0)} new, "
                          f"{pages.get('delta', 0)} delta, {pages.get('copy', 0)} deduped, "
                          f"{pages.get('base', 0)} from base memory, "
                          f"{pages.get('disk', 0)} from base disk, "
                          f"{pages.get('disk_copy', 0)} from the new disk, "
                          f"{pages.get('zero', 0)} zero")
    if info["encrypted"]:
        kdf = info["encryption"]["kdf"].get("name")
        table.add_row("encryption", f"{info['encryption']['cipher']}, "
                      f"{'key file' if kdf == 'none' else kdf + ' passphrase'}")
    ov, full = info["transfer_seconds"]["overlay"], info["transfer_seconds"]["full_disk"]
    for link in ov:
        table.add_row(f"transfer at {link.replace('Mbps', ' Mbps')}",
                      f"{_seconds(ov[link])} (full disk: {_seconds(full[link])})")
    console.out.print(table)
    if files:
        listing = Table("changed file", "size", "change", title="guest files, largest first")
        for f in info["files"]:
            listing.add_row(f["path"], console.human(f["size"]), f["change"])
        console.out.print(listing)


@contextlib.contextmanager
def _local(overlay: str, access: Any, as_json: bool
           ) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """The overlay as a seekable file: itself, or a registry's pulled into scratch space."""
    if not overlay.startswith("oci://"):
        if Path(overlay).is_dir():
            raise click.BadParameter(f"{overlay!r} is a directory", param_hint="OVERLAY")
        if not Path(overlay).exists():
            raise BadInputError(f"{overlay}: no such file")
        yield Path(overlay), None
        return
    from vmsynth.registry import Reference
    from vmsynth.registry_overlays import pull_overlay
    from vmsynth.store import scratch_dir

    scratch = scratch_dir("inspect")
    try:
        path = scratch / "overlay.vmo"
        with console.advancing("pulling", 0, enabled=not as_json) as advance:
            pulled = pull_overlay(Reference.parse(overlay), path, access, advance)
        yield path, {k: pulled[k] for k in ("reference", "digest", "annotations")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _changed_files(overlay: Path, base_spec: str, key: Key | None,
                   as_json: bool) -> list[guest.ChangedFile]:
    with open_base(base_spec, as_json) as base, tempfile.TemporaryDirectory(
            prefix="vmsynth-files-") as scratch:
        synth = Path(scratch) / "synth.qcow2"
        with open(overlay, "rb") as source:
            apply(source, base, synth, key=key, memory_output=Path(scratch) / "synth.vmem")
        return guest.changed_files(base.path, synth)
