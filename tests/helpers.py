"""Helpers shared by the tests: building images, overlays, and taking overlays apart.

The overlay dissector here (`parse_parts` / `compose`) is written from the byte layout in
vmsynth/formats/layout.py, independently of the reader and writer under test, so that tests
can craft files that are damaged in exactly one way (with every other digest recomputed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

from vmsynth.formats.container import canonical_json
from vmsynth.formats.layout import (
    DIGEST_SIZE,
    FRAME,
    FRAME_TAG,
    HEADER,
    INDEX_ENTRY,
    INDEX_TAG,
    SECTION,
    SUMMARY_TAG,
    TRAILER,
    TRAILER_MAGIC,
)

from vmsynth import bases
from vmsynth import create as create_mod
from vmsynth.qcow2 import Qcow2Image, Qcow2Writer

CS = 1 << 16  # Qcow2Writer's cluster size
BLOCK = 4096
VENV_BIN = Path(sys.executable).parent
VMSYNTH = VENV_BIN / "vmsynth"


def which(tool: str) -> str | None:
    return shutil.which(tool)


# ---------------------------------------------------------------- deterministic contents

def det_bytes(seed: object, n: int) -> bytes:
    """`n` pseudo-random (incompressible) bytes, the same for the same seed."""
    return random.Random(repr(seed)).randbytes(n)


def text_block(tag: object, n: int = BLOCK) -> bytes:
    """A compressible block, unique per tag (keeps small overlays small)."""
    unit = f"<{tag}> the quick brown fox jumps over the lazy dog {tag!r}\n".encode()
    return (unit * (n // len(unit) + 1))[:n]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- images

def write_image(path: Path, data: bytes, virtual_size: int | None = None,
                backing: Path | None = None, base_data: bytes | None = None,
                zero_flags: bool = False) -> Path:
    """Write `data` as a qcow2 (pure Python).

    With `backing`, only the clusters that differ from `base_data` are stored (a child as a
    guest would leave it); all-zero changed clusters become qcow2 zero clusters. Without it,
    all-zero clusters are left unallocated (sparse), or marked zero with `zero_flags`.
    """
    size = len(data) if virtual_size is None else virtual_size
    data = data[:size].ljust(size, b"\0")
    writer = Qcow2Writer(Path(path), size, backing=None if backing is None else str(backing))
    for index in range(-(-size // CS)):
        chunk = data[index * CS: (index + 1) * CS]
        zero = chunk.count(0) == len(chunk)
        if backing is not None:
            assert base_data is not None
            old = base_data[index * CS: index * CS + len(chunk)].ljust(len(chunk), b"\0")
            if chunk == old:
                continue
            if zero:
                writer.zero_cluster(index)
            else:
                writer.write_cluster(index, chunk)
        elif zero:
            if zero_flags:
                writer.zero_cluster(index)
        else:
            writer.write_cluster(index, chunk)
    writer.finish()
    return Path(path)


def read_image(path: Path) -> bytes:
    image = Qcow2Image(Path(path))
    try:
        return image.read(0, image.virtual_size)
    finally:
        image.close()


class MemImage:
    """An in-memory disk that satisfies vmsynth.qcow2.Image."""

    def __init__(self, data: bytes, virtual_size: int | None = None,
                 path: str = "<memory>") -> None:
        self.path = Path(path)
        self.virtual_size = len(data) if virtual_size is None else virtual_size
        self.data = bytes(data[: self.virtual_size]).ljust(self.virtual_size, b"\0")
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset: offset + length].ljust(length, b"\0")

    def close(self) -> None:
        self.closed = True


def make_overlay(base: bases.Base, disk, level: int = 3, frame_data: int | None = None,
                 solid: bool = False) -> tuple[bytes, object]:
    """Create an overlay in memory; `frame_data` shrinks frames to get several in a small file."""
    out = io.BytesIO()
    if frame_data is None:
        report = create_mod.create(base, disk, out, level, solid=solid)
    else:
        with mock.patch.object(create_mod, "FRAME_DATA", frame_data):
            report = create_mod.create(base, disk, out, level, solid=solid)
    return out.getvalue(), report


# ---------------------------------------------------------------- the small shared case

@dataclass
class SmallPair:
    dir: Path
    base_path: Path
    app_path: Path  # a qcow2 child of base_path
    flat_path: Path  # the same contents as app_path, as an independent image
    base_data: bytes
    app_data: bytes
    expected_blocks: dict[str, int]
    overlay: bytes  # one frame
    multi: bytes  # the same change, several frames
    report: object = None


def build_small_pair(folder: Path) -> SmallPair:
    """A base of 5 clusters minus 1000 bytes, and an app 10,000 bytes larger.

    The app's changes, block by block (4 KiB), and the record kind each one should give:
    an edit of 12 bytes in place (delta), a zeroed block (zero), a block that equals another
    base block (base), two new blocks each repeated once (2 data + 2 copy), a changed
    partial block at the old end of the base (data) and new data past it (data).
    """
    base_size = 5 * CS - 1000
    app_size = base_size + 10_000
    base = bytearray()
    for i in range(-(-base_size // BLOCK)):
        base += text_block(f"base-{i}")
    base = base[:base_size]
    app = bytearray(base) + bytes(app_size - base_size)
    expected = {"data": 0, "delta": 0, "zero": 0, "base": 0, "copy": 0}

    def put(block_no: int, data: bytes) -> None:
        app[block_no * BLOCK: block_no * BLOCK + len(data)] = data

    edited = bytearray(base[0:BLOCK])
    edited[100:112] = b"EDITED-HERE!"
    put(0, edited)
    expected["delta"] += 1
    put(1, bytes(BLOCK))
    expected["zero"] += 1
    put(2, base[40 * BLOCK: 41 * BLOCK])
    expected["base"] += 1
    n1, n2 = text_block("new-1"), text_block("new-2")
    put(17, n1)
    put(18, n2)
    put(30, n1)
    put(45, n2)
    expected["data"] += 2
    expected["copy"] += 2
    last = base_size // BLOCK  # the partial block at the end of the base
    put(last, text_block("tail", app_size - last * BLOCK))
    expected["data"] += 1  # one block-sized or shorter record piece per 4 KiB block
    expected["data"] += -(-(app_size - (last + 1) * BLOCK) // BLOCK)
    folder.mkdir(parents=True, exist_ok=True)
    base_path = write_image(folder / "base.qcow2", bytes(base))
    app_path = write_image(folder / "app.qcow2", bytes(app), backing=base_path.resolve(),
                           base_data=bytes(base))
    flat_path = write_image(folder / "flat.qcow2", bytes(app))
    b = bases.load_path(base_path)
    disk = Qcow2Image(app_path)
    try:
        overlay, report = make_overlay(b, disk)
        multi, _ = make_overlay(b, disk, frame_data=BLOCK)
    finally:
        disk.close()
        b.close()
    return SmallPair(folder, base_path, app_path, flat_path, bytes(base), bytes(app), expected,
                     overlay, multi, report)


# ---------------------------------------------------------------- taking overlays apart

@dataclass
class FrameParts:
    stream: int
    codec: int
    flags: int
    seq: int
    count: int
    stored_length: int
    raw_length: int
    digest: bytes
    payload: bytes


@dataclass
class Parts:
    magic: bytes
    major: int
    minor: int
    incompat: int
    compat: int
    reserved: int
    manifest: bytes
    frames: list[FrameParts] = field(default_factory=list)
    summary: bytes = b""
    index: list[tuple] = field(default_factory=list)  # INDEX_ENTRY tuples, as stored


def parse_parts(data: bytes) -> Parts:
    """Split a well-formed overlay into its pieces (no checking: that is the reader's job)."""
    magic, major, minor, length, incompat, compat, mlen, reserved = HEADER.unpack_from(data)
    parts = Parts(magic, major, minor, incompat, compat, reserved,
                  data[HEADER.size: HEADER.size + mlen])
    pos = length
    while data[pos: pos + 4] == FRAME_TAG:
        _, stream, codec, flags, seq, count, stored, raw = FRAME.unpack_from(data, pos)
        digest = data[pos + FRAME.size: pos + FRAME.size + DIGEST_SIZE]
        start = pos + FRAME.size + DIGEST_SIZE
        parts.frames.append(FrameParts(stream, codec, flags, seq, count, stored, raw, digest,
                                       data[start: start + stored]))
        pos = start + stored
    tag, slen = SECTION.unpack_from(data, pos)
    assert tag == SUMMARY_TAG
    parts.summary = data[pos + SECTION.size: pos + SECTION.size + slen]
    pos += SECTION.size + slen
    tag, count = SECTION.unpack_from(data, pos)
    assert tag == INDEX_TAG
    pos += SECTION.size
    parts.index = [INDEX_ENTRY.unpack_from(data, pos + i * INDEX_ENTRY.size)
                   for i in range(count)]
    assert len(data) == pos + count * INDEX_ENTRY.size + TRAILER.size
    return parts


def frame_head(f: FrameParts) -> bytes:
    return FRAME.pack(FRAME_TAG, f.stream, f.codec, f.flags, f.seq, f.count, f.stored_length,
                      f.raw_length)


def seal_frame(f: FrameParts) -> FrameParts:
    """The frame with its stored length and digest recomputed from its fields and payload."""
    f = replace(f, stored_length=len(f.payload))
    return replace(f, digest=hashlib.sha256(frame_head(f) + f.payload).digest())


def rebind_summary(summary: bytes, header_digest: bytes) -> bytes:
    """A plain summary whose `header_digest` (format 1.2) names the given header."""
    try:
        doc = json.loads(summary)
    except ValueError:
        return summary
    want = "sha256:" + header_digest.hex()
    if not isinstance(doc, dict) or doc.get("header_digest") in (None, want):
        return summary
    return canonical_json(doc | {"header_digest": want})


def compose(parts: Parts, *, reindex: bool = True, trailer: dict | None = None,
            rebind: bool = True) -> bytes:
    """Reassemble an overlay; header digest, offsets and trailer digest are recomputed.

    With `rebind`, a plain summary's `header_digest` is made to name the new header.

    Frame heads and digests are written as they are in `parts` (use seal_frame to fix them).
    With `reindex`, index entries are rebuilt from the frames (keeping their target ranges);
    `trailer` overrides trailer fields (summary_offset, index_offset, file_length, digest).
    """
    hlen = HEADER.size + len(parts.manifest) + DIGEST_SIZE
    head = HEADER.pack(parts.magic, parts.major, parts.minor, hlen, parts.incompat,
                       parts.compat, len(parts.manifest), parts.reserved) + parts.manifest
    out = bytearray(head + hashlib.sha256(head).digest())
    summary = rebind_summary(parts.summary, out[-DIGEST_SIZE:]) if rebind else parts.summary
    offsets = []
    for f in parts.frames:
        offsets.append(len(out))
        out += frame_head(f) + f.digest + f.payload
    index = parts.index
    if reindex:
        index = []
        for i, (off, f) in enumerate(zip(offsets, parts.frames, strict=False)):
            old = parts.index[i] if i < len(parts.index) else (0,) * 7 + (0, 0, b"")
            index.append((off, f.stored_length, f.raw_length, f.count, f.stream, f.codec, 0,
                          old[7], old[8], f.digest))
    summary_offset = len(out)
    tail = SECTION.pack(SUMMARY_TAG, len(summary)) + summary
    index_offset = summary_offset + len(tail)
    tail += SECTION.pack(INDEX_TAG, len(index))
    for e in index:
        tail += INDEX_ENTRY.pack(*e)
    fields = {"summary_offset": summary_offset, "index_offset": index_offset,
              "file_length": summary_offset + len(tail) + TRAILER.size}
    fields.update(trailer or {})
    prefix = TRAILER.pack(TRAILER_MAGIC, fields["summary_offset"], fields["index_offset"],
                          fields["file_length"], bytes(DIGEST_SIZE))[:-DIGEST_SIZE]
    digest = fields.get("digest") or hashlib.sha256(tail + prefix).digest()
    return bytes(out + tail + prefix + digest)


def reheader(data: bytes, **changes) -> bytes:
    """The overlay with header fields changed (manifest as a dict or bytes), all else fixed."""
    parts = parse_parts(data)
    manifest = changes.pop("manifest", None)
    if manifest is not None:
        parts.manifest = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
    for key, value in changes.items():
        setattr(parts, key, value)
    return compose(parts)


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


class GuardedReader(io.RawIOBase):
    """A readable stream that fails the test if asked for more than `limit` bytes at once."""

    def __init__(self, data: bytes, limit: int = 1 << 20) -> None:
        self._buf = io.BytesIO(data)
        self.limit = limit
        self.largest = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.limit:
            raise AssertionError(f"reader asked for {n} bytes at once (limit {self.limit})")
        self.largest = max(self.largest, n)
        return self._buf.read(n)


# ---------------------------------------------------------------- processes

def run(*args: str | Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check,
                          **kw)


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    proc = run(*args, image)
    assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


# ---------------------------------------------------------------- QEMU processes

def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, Z...), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped-later zombie runs nothing)."""
    return process_state(pid) not in (None, "Z")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def qemu_processes(mentioning: str) -> list[int]:
    """Live qemu-system-* processes whose command line mentions `mentioning` (a path that is
    unique to one test, so that other users' VMs on the machine are never counted)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if args and Path(args[0]).name.startswith("qemu-system") and \
                any(mentioning in a for a in args) and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


@dataclass
class Result:
    """What one `vmsynth` run printed and returned."""

    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def dead_pid() -> int:
    """A PID that no process has right now."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(top - 1, 300, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("every PID is in use")
