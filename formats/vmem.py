"""The memory snapshot file (.vmem, SPEC.md section 11): its header and trailer.

    [0, ram_size)                  the guest's RAM at its own offsets (holes where zero)
    [ram_size, ram_size+state)     QEMU's device-state migration stream
    header                         canonical JSON: machine, sizes, content digest
    trailer (64 bytes)             magic, header offset and length, reserved, header SHA-256

RAM comes first so that QEMU can map the file itself as a resumed guest's memory. The first
ram_size + state_size bytes are the snapshot's *contents*, which `digest` covers; checking
them is the reader's (it means reading them all), the layout and header are checked here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO

from .container import canonical_json
from .errors import CorruptError, FormatError, UnsupportedError

MAGIC = b"VSMEM\r\n\x01"
TRAILER = struct.Struct("<8sQQ8s32s")  # magic, header offset, header length, reserved, digest
MAX_HEADER = 1 << 20
FORMAT = "vmsynth-vmem"
VERSION = 1  # readers refuse another (section 11)
MEDIA_TYPE = "application/vnd.vmsynth.vmem.v1"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class NotAVmemError(FormatError):
    """The file is not a memory snapshot at all (its trailer magic is missing)."""


@dataclass(frozen=True)
class MachineInfo:
    """What resuming a snapshot needs from the QEMU that resumes it."""

    machine: str  # versioned machine type, e.g. pc-i440fx-7.2
    cpu: str  # CPU model, e.g. qemu64
    ram_size: int
    qemu_version: str  # major.minor.micro
    cpus: int = 1
    vga: bool = False  # a VGA device (each device's state is in the stream)
    kernel_boot: bool = False  # booted with -kernel: its option ROM is part of the state
    extra_args: tuple[str, ...] = ()  # --qemu-arg values: they may add devices
    accel: str = ""  # informative: what it ran under
    # A vmgenid and a virtio-rng-pci device, which a resume adds too (the generation ID new).
    # Optional in headers, absent meaning False: snapshots from before it have neither.
    entropy: bool = False

    # What must be equal between a base's snapshot and one diffed against it.
    COMPARED = ("ram_size", "machine", "cpu", "qemu_version")
    # Written only when true, read as False when absent: earlier headers stay as they were.
    OPTIONAL = ("entropy",)

    def mismatch(self, other: MachineInfo) -> str | None:
        """How `other` differs from this one where it matters, or None."""
        for name in self.COMPARED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name.replace('_', ' ')} {theirs} (the base has {mine})"
        return None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self) | {"extra_args": list(self.extra_args)}
        return {k: v for k, v in out.items() if k not in self.OPTIONAL or v}

    @classmethod
    def from_json(cls, raw: object, where: str) -> MachineInfo:
        """Parse and type-check (the header may come from anywhere).

        Raises:
            CorruptError: a field is missing, of the wrong type or out of range.
        """
        types = {"machine": str, "cpu": str, "ram_size": int, "qemu_version": str, "cpus": int,
                 "vga": bool, "kernel_boot": bool, "extra_args": list, "accel": str,
                 "entropy": bool}
        if not isinstance(raw, dict):
            raise CorruptError(f"{where}: machine description is malformed")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name, f.default if f.name in cls.OPTIONAL else None)
            if type(value) is not types[f.name] or (isinstance(value, str) and len(value) > 256):
                raise CorruptError(f"{where}: machine description has an invalid {f.name}")
            values[f.name] = value
        args = values["extra_args"]
        if len(args) > 64 or not all(isinstance(a, str) and len(a) <= 4096 for a in args):
            raise CorruptError(f"{where}: machine description has invalid extra_args")
        values["extra_args"] = tuple(args)
        if not 0 < values["ram_size"] <= 1 << 42 or values["ram_size"] % 4096 or \
                not 0 < values["cpus"] <= 256:
            raise CorruptError(f"{where}: machine description has an invalid size")
        return cls(**values)


@dataclass(frozen=True)
class VmemHeader:
    """What a snapshot's header says."""

    machine: MachineInfo
    state_size: int
    digest: str  # "sha256:<hex>" of the contents (RAM, then device state)

    @property
    def ram_size(self) -> int:
        return self.machine.ram_size

    @property
    def size(self) -> int:
        """Bytes of contents: RAM then device state; the header starts here."""
        return self.machine.ram_size + self.state_size


def encode_tail(head: VmemHeader) -> bytes:
    """The header and trailer, to be written at offset `head.size`."""
    raw = canonical_json({"format": FORMAT, "version": VERSION, "machine": head.machine.to_json(),
                          "state_size": head.state_size, "digest": head.digest})
    return raw + TRAILER.pack(MAGIC, head.size, len(raw), bytes(8), hashlib.sha256(raw).digest())


def read_tail(f: BinaryIO, where: str) -> VmemHeader:
    """Check a snapshot's trailer and header (not its contents) and return the header.

    Raises:
        NotAVmemError: no trailer magic: not a memory snapshot.
        CorruptError: a damaged trailer or header, or an inconsistent layout.
        UnsupportedError: a header version this reader does not know.
    """
    size = f.seek(0, os.SEEK_END)
    if size < TRAILER.size:
        raise NotAVmemError(f"{where}: not a vmsynth memory snapshot")
    f.seek(size - TRAILER.size)
    magic, h_off, h_len, reserved, h_digest = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC:
        raise NotAVmemError(f"{where}: not a vmsynth memory snapshot")
    if reserved != bytes(8) or h_len > MAX_HEADER or h_off + h_len != size - TRAILER.size:
        raise CorruptError(f"{where}: memory snapshot trailer is damaged")
    f.seek(h_off)
    raw = f.read(h_len)
    if hashlib.sha256(raw).digest() != h_digest:
        raise CorruptError(f"{where}: memory snapshot header digest mismatch")
    try:
        head = json.loads(raw)
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise ValueError("format")
        if head.get("version") != VERSION:
            raise UnsupportedError(f"{where}: memory snapshot version {head.get('version')!r} "
                                   f"is not supported (this vmsynth reads {VERSION})",
                                   hint="upgrade vmsynth")
        out = VmemHeader(MachineInfo.from_json(head["machine"], where), head["state_size"],
                         head["digest"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptError(f"{where}: memory snapshot header is malformed") from err
    if type(out.state_size) is not int or out.state_size < 0 or \
            not isinstance(out.digest, str) or not _DIGEST.fullmatch(out.digest) or \
            out.size != h_off:
        raise CorruptError(f"{where}: memory snapshot layout is inconsistent")
    return out
