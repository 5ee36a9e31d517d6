"""Verify and inspect: what an overlay is, and whether it is intact, fits a base and a budget."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmsynth.formats.container import (
    Footer,
    OverlayStream,
    check_summary,
    open_summary,
    read_footer,
)
from vmsynth.formats.layout import FEATURE_NAMES, MEDIA_TYPE, Stream

from .apply import rebuild
from .bases import Base
from .errors import CorruptOverlayError, OverBudgetError
from .keys import Key, sealer_for
from .store import scratch_dir
from .synth import Manifest, ReplayReport, read_manifest, replay

LINKS_MBPS = (10, 50, 1000)  # the seed chapter's calculator: LTE / busy Wi-Fi, Wi-Fi, LAN


@dataclass
class VerifyReport:
    overlay_bytes: int
    base_checked: bool
    replay: ReplayReport
    max_size: int | None


class _Counting:
    """Counts the bytes read through it: the overlay's size, even from a pipe."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data


def verify(source: BinaryIO, base: Base | None = None, max_size: int | None = None,
           progress: Callable[[int], None] | None = None, key: Key | None = None
           ) -> VerifyReport:
    """Check structure and every digest; with a base, rebuild into scratch space and check
    the result digest too; with `max_size`, the budget. Raises on the first failure."""
    counted = _Counting(source)
    overlay = OverlayStream(counted)  # type: ignore[arg-type]
    manifest = read_manifest(overlay.header.manifest)
    if base is not None:
        base.check_matches(manifest.base)
    sealer = sealer_for(overlay.header, key)
    if base is None:
        report = replay(overlay, manifest, None, None, progress, sealer)
    else:
        scratch = scratch_dir("verify")
        try:
            report, _ = rebuild(overlay, base, scratch / "check.qcow2", sealer, progress,
                                memory_out=scratch / "check.vmem")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if max_size is not None and counted.count > max_size:
        raise OverBudgetError(f"overlay is {counted.count:,} bytes, over the budget of "
                              f"{max_size:,} bytes by {counted.count - max_size:,}",
                              hint="`vmsynth inspect` shows where the bytes go")
    return VerifyReport(counted.count, base is not None, report, max_size)


def transfer_seconds(size: int) -> dict[str, float]:
    return {f"{mbps}Mbps": round(size * 8 / (mbps * 1e6), 3) for mbps in LINKS_MBPS}


def describe(path: Path, key: Key | None = None) -> dict[str, Any]:
    """What `inspect` shows, from the header and footer only (no frame is read).

    For an encrypted overlay without its key: only what is not content (sizes from the
    index, the base identity); block counts and the result digest stay sealed.
    """
    with open(path, "rb") as f:
        overlay = OverlayStream(f)
        footer = read_footer(f, overlay.header.encrypted)
        size = footer.file_length
    header = overlay.header
    manifest = read_manifest(header.manifest)
    encryption = header.manifest.get("encryption")
    if header.encrypted and not (isinstance(encryption, dict) and
                                 isinstance(encryption.get("cipher"), str) and
                                 isinstance(encryption.get("kdf"), dict) and
                                 isinstance(encryption["kdf"].get("name"), str)):
        raise CorruptOverlayError("overlay's encryption block is malformed")
    sealer = sealer_for(header, key) if key is not None or not header.encrypted else None
    summary: dict[str, Any] = check_summary(open_summary(footer, sealer), header) \
        if sealer or not header.encrypted \
        else {"payload_raw_bytes": sum(e.raw_length for e in footer.index),
              "payload_stored_bytes": sum(e.stored_length for e in footer.index)}
    try:
        raw = int(summary.get("payload_raw_bytes", 0))
        stored = int(summary.get("payload_stored_bytes", 0))
        blocks = {str(k): int(v) for k, v in dict(summary.get("blocks", {})).items()}
    except (TypeError, ValueError, OverflowError) as err:
        raise CorruptOverlayError(f"overlay summary has a malformed field ({err})") from err
    if min(raw, stored, *blocks.values(), 0) < 0:
        raise CorruptOverlayError("overlay summary has a negative size or count")
    return {
        "path": str(path),
        "format_version": f"{header.major}.{header.minor}",
        "media_type": MEDIA_TYPE,
        "features": _features(header.incompat | header.implied),
        "header_digest": header.digest_string,
        "base": _base_json(manifest),
        "sizes": {"overlay": size, "payload_uncompressed": raw, "payload_stored": stored,
                  "virtual_disk": manifest.virtual_size},
        "blocks": blocks,
        "block_size": manifest.block_size,
        "frames": len(footer.index),
        "solid": header.solid,
        "encrypted": header.encrypted,
        "encryption": {"cipher": encryption["cipher"], "kdf": encryption["kdf"]}
        if header.encrypted else None,
        "compression": header.manifest.get("compression", {}),
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "result_digest": summary.get("result_digest"),
        "transfer_seconds": {"overlay": transfer_seconds(size),
                             "full_disk": transfer_seconds(manifest.virtual_size)},
        "memory": _memory_part(manifest, footer, summary),
        "sections": [{"tag": e["tag"], "length": e["length"]}
                     for e in summary.get("sections", [])],  # optional: skipped by rebuilds
    }


def _features(incompat: int) -> list[str]:
    """The names of the incompatible features an overlay uses (all known: it was read)."""
    return [name for bit, name in FEATURE_NAMES["incompat"].items() if incompat & bit]


def _base_json(manifest: Manifest) -> dict[str, Any]:
    """The base identity as the manifest states it."""
    out = asdict(manifest.base)
    memory = out.pop("memory")
    if memory is not None:
        out["memory"] = {"size": memory["size"], "digest": memory["digest"]}
    return out


def _memory_part(manifest: Manifest, footer: Footer, summary: dict[str, Any]
                 ) -> dict[str, Any] | None:
    """The memory stream, if any: what it rebuilds and what it costs in the file."""
    if manifest.memory is None:
        return None
    machine = manifest.memory.machine
    assert machine is not None
    blocks = summary.get("memory_blocks")
    return {"size": manifest.memory.virtual_size, "ram_size": machine.ram_size,
            "machine": machine.to_json(),
            "frames": sum(1 for e in footer.index if e.stream == Stream.MEMORY),
            "stored_bytes": sum(e.stored_length for e in footer.index
                                if e.stream == Stream.MEMORY),
            "blocks": {str(k): v for k, v in blocks.items() if type(v) is int}
            if isinstance(blocks, dict) else None}  # informative: the digests decide
