#!/usr/bin/env python3
"""Generate the overlay and .vmem test vectors in this folder (SPEC.md section 13).

    .venv/bin/python formats/vectors/make_vectors.py [OUTDIR]   (default: this folder)

A tiny base and a customized disk are built in pure Python, and `vmsynth create` diffs them
into good.vmo. The base's bytes are written beside the vectors (base.disk.zst: its virtual
contents, zstd-compressed; base.vmem.zst: its memory snapshot), so that another
implementation needs nothing of this code to use the vectors. vectors.json says what a
reader must do with each file, as a format-level outcome (ok, corrupt, unsupported,
wrong-key, base-mismatch) with the vmsynth CLI's exit code beside it, and which numbered
MUSTs of SPEC.md the file exercises (`covers`).

Most bad vectors are good.vmo damaged in one way with every other digest recomputed; the
ones about records and frames are small overlays written from explicit records for the
vectors' base (`crafted`). The mem-*.vmo vectors carry a memory stream (incompat bit 2); the
mem-solid-*.vmo are solid (incompat bit 1). The enc-*.vmo are encrypted with the key file
vectors.key (32 fixed bytes) or the passphrase PASSPHRASE: for them `outcome` is what a
reader given no key must do, `key` names the key and `with_key` the outcome with it. The
vmem-*.vmem are memory snapshot files (SPEC.md section 11).

The output is deterministic: fixed patterns, `created_by` pinned, fixed file ids and salts
for the encrypted vectors (vmsynth.keys.Key's test-vector fields). The bytes do depend on
the zstd library; tests/test_vectors.py checks that this script reproduces the committed
files exactly. The vectors of earlier versions stay in golden-*/ and are never regenerated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import zstandard
from vmsynth.formats import vmem as vmem_codec
from vmsynth.formats.container import OverlayWriter, canonical_json
from vmsynth.formats.frames import Record, SolidCompressor, encode_frame
from vmsynth.formats.layout import (
    DIGEST_SIZE,
    FRAME,
    FRAME_HEAD_SIZE,
    FRAME_TAG,
    HEADER,
    INDEX_ENTRY,
    INDEX_TAG,
    MAJOR,
    MAX_FRAME_RAW,
    MAX_FRAME_RECORDS,
    MAX_HEADER,
    MAX_OPTIONAL,
    MAX_OPTIONAL_COUNT,
    MAX_SUMMARY,
    MEDIA_TYPE,
    MINOR,
    SECTION,
    SUMMARY_TAG,
    TRAILER,
    TRAILER_MAGIC,
    Incompat,
    Kind,
    Stream,
)
from vmsynth.formats.seal import Sealer

from vmsynth import bases, memory
from vmsynth import create as create_mod
from vmsynth.keys import Key
from vmsynth.memory import MachineInfo
from vmsynth.qcow2 import Qcow2Image, Qcow2Writer

HERE = Path(__file__).resolve().parent
CLUSTER = 1 << 16
BLOCK = 4096
BASE_NAME, BASE_VERSION = "vectors-base", "1"
BASE_SIZE = 3 * CLUSTER - 1536  # not a multiple of the block size
APP_SIZE = BASE_SIZE + 5000  # the app grows the disk
CREATED_BY = "formats/vectors/make_vectors.py"
BASE_DISK_FILE, BASE_VMEM_FILE = "base.disk.zst", "base.vmem.zst"

# Encrypted vectors: the key file beside this script, a passphrase (not ASCII, to pin down
# the UTF-8 encoding), and fixed file ids and salt instead of random ones.
KEY_FILE = "vectors.key"
PASSPHRASE = "vmsynth test vectors \u2713 passphrase"
FILE_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
OTHER_FILE_ID = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")  # the splice donor's
SALT = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
SCRYPT_TOO_COSTLY = {"n": 1 << 21}  # above n = 2^20
SCRYPT_TOO_MUCH_MEMORY = {"n": 1 << 17, "r": 32}  # each in range, but 512 MiB together
ZERO_DIGEST = "sha256:" + "0" * 64

# The outcomes, as SPEC.md section 13 defines them, and the vmsynth CLI's exit codes for them.
OUTCOMES = {
    "ok": "the reader accepts the file and rebuilds exactly what vectors.json records",
    "corrupt": "the file breaks a rule of the format: damaged, truncated or malformed",
    "unsupported": "the file needs what the reader does not know: a newer major version, an "
                   "unknown incompatible feature, stream kind, record kind, codec or flag, "
                   "or derivation parameters beyond the bounds",
    "wrong-key": "the file is encrypted and the reader has no key, or the wrong one",
    "base-mismatch": "the file is intact but made for another base",
}
EXIT_CODES = {"ok": 0, "corrupt": 13, "unsupported": 12, "wrong-key": 20, "base-mismatch": 10}
VMEM_EXIT_CODES = EXIT_CODES | {"corrupt": 24}  # the CLI's code for a damaged snapshot

# Each vector: its outcome, the SPEC.md MUSTs it exercises, and (where it differs) what a
# reader that only checks the file, without the base, finds.
VECTORS: dict[str, tuple[str, list[str], str | None]] = {
    "good.vmo": ("ok", ["M13", "M26", "M28"], None),
    "mem-good.vmo": ("ok", ["M7", "M18", "M20"], None),
    "mem-solid-good.vmo": ("ok", ["M24"], None),
    "mem-bad-memory-frame.vmo": ("corrupt", ["M13"], None),
    "mem-solid-overrun.vmo": ("corrupt", ["M24"], None),
    "mem-no-memory-bit.vmo": ("corrupt", ["M7"], None),
    "bad-magic.vmo": ("corrupt", ["M2"], None),
    "truncated.vmo": ("corrupt", ["M31"], None),
    "bad-digest.vmo": ("corrupt", ["M13"], None),
    "header-bad-digest.vmo": ("corrupt", ["M5"], None),
    "header-reserved.vmo": ("corrupt", ["M1"], None),
    "header-spliced.vmo": ("corrupt", ["M27"], None),
    "unknown-version.vmo": ("unsupported", ["M3"], None),
    "unknown-feature.vmo": ("unsupported", ["M6"], None),
    "unknown-feature-named.vmo": ("unsupported", ["M6"], None),
    "future-minor.vmo": ("ok", ["M9"], None),
    "future-keys.vmo": ("ok", ["M9"], None),
    "future-compat.vmo": ("ok", ["M9"], None),
    "base-mismatch.vmo": ("base-mismatch", ["M8"], "ok"),
    "result-digest-mismatch.vmo": ("corrupt", ["M26"], "ok"),
    "manifest-bad-digest-string.vmo": ("corrupt", ["M11"], None),
    "summary-bad-digest-string.vmo": ("corrupt", ["M11"], None),
    "summary-without-header-digest.vmo": ("ok", ["M27"], None),
    "stream-unknown-kind.vmo": ("unsupported", ["M10"], None),
    "frame-seq-gap.vmo": ("corrupt", ["M15"], None),
    "frame-unknown-codec.vmo": ("unsupported", ["M16"], None),
    "frame-unknown-flag.vmo": ("unsupported", ["M16"], None),
    "frame-raw-mismatch.vmo": ("corrupt", ["M14"], None),
    "records-out-of-order.vmo": ("corrupt", ["M17"], None),
    "records-overlap.vmo": ("corrupt", ["M17"], None),
    "records-back-across-frames.vmo": ("corrupt", ["M17"], None),
    "record-zero-length.vmo": ("corrupt", ["M17"], None),
    "record-past-the-end.vmo": ("corrupt", ["M17"], None),
    "record-base-past-the-base.vmo": ("corrupt", ["M18"], None),
    "record-disk-in-disk-stream.vmo": ("corrupt", ["M18"], None),
    "record-copy-forward.vmo": ("corrupt", ["M19"], None),
    "record-reserved.vmo": ("corrupt", ["M1"], None),
    "record-unknown-kind.vmo": ("unsupported", ["M22"], None),
    "record-stored-mismatch.vmo": ("corrupt", ["M21"], None),
    "record-delta-wrong-size.vmo": ("corrupt", ["M23"], "ok"),
    "mem-streams-descending.vmo": ("corrupt", ["M20"], None),
    "index-mismatch.vmo": ("corrupt", ["M28"], None),
    "index-range-mismatch.vmo": ("corrupt", ["M28"], None),
    "index-reserved.vmo": ("corrupt", ["M1"], None),
    "trailer-bad-digest.vmo": ("corrupt", ["M29"], None),
    "trailing-bytes.vmo": ("corrupt", ["M30"], None),
    "bound-header-length.vmo": ("corrupt", ["M4"], None),
    "bound-frame-raw.vmo": ("corrupt", ["M12"], None),
    "bound-frame-records.vmo": ("corrupt", ["M12"], None),
    "bound-records-past-raw.vmo": ("corrupt", ["M12"], None),
    "bound-stored-not-raw.vmo": ("corrupt", ["M12"], None),
    "bound-stored-past-zstd-bound.vmo": ("corrupt", ["M12"], None),
    "bound-summary-length.vmo": ("corrupt", ["M25"], None),
    "bound-section-length.vmo": ("corrupt", ["M32"], None),
    "bound-section-count.vmo": ("corrupt", ["M32"], None),
    "bound-solid-window.vmo": ("corrupt", ["M24"], None),
    "section-unknown.vmo": ("ok", ["M9", "M32"], None),
    "section-bad-digest.vmo": ("corrupt", ["M32"], None),
    "section-critical-tag.vmo": ("corrupt", ["M32"], None),
    "section-unlisted.vmo": ("corrupt", ["M32"], None),
    "vmem-good.vmem": ("ok", ["M36"], None),
    "vmem-version-2.vmem": ("unsupported", ["M36"], None),
    "vmem-reserved.vmem": ("corrupt", ["M1", "M36"], None),
    "vmem-header-digest.vmem": ("corrupt", ["M36"], None),
    "vmem-layout.vmem": ("corrupt", ["M36"], None),
    "vmem-bad-digest-string.vmem": ("corrupt", ["M11", "M36"], None),
    "vmem-contents.vmem": ("corrupt", ["M36"], "ok"),
    "vmem-bound-header.vmem": ("corrupt", ["M36"], None),
}
# Encrypted vectors: the key that opens them, the outcome with it, and the MUSTs.
ENCRYPTED: dict[str, tuple[str, str, list[str]]] = {
    "enc-key-good.vmo": ("key_file", "ok", ["M33"]),
    "enc-key-bad-tag.vmo": ("key_file", "corrupt", ["M33"]),
    "enc-key-swapped.vmo": ("key_file", "corrupt", ["M15", "M33"]),
    "enc-key-dropped-last.vmo": ("key_file", "corrupt", ["M33"]),
    "enc-key-spliced.vmo": ("key_file", "corrupt", ["M33"]),
    "enc-key-section.vmo": ("key_file", "ok", ["M32", "M33"]),
    "enc-pass-good.vmo": ("passphrase", "ok", ["M33"]),
    "enc-pass-bad-tag.vmo": ("passphrase", "corrupt", ["M33"]),
    "enc-pass-scrypt-too-costly.vmo": ("passphrase", "unsupported", ["M34"]),
    "enc-pass-scrypt-memory.vmo": ("passphrase", "unsupported", ["M34"]),
}
UNKNOWN_FEATURE_NAME = "from-the-future"  # what unknown-feature-named.vmo calls its bit 40


def pattern_block(tag: str, n: int = BLOCK) -> bytes:
    """A compressible block, different for every tag."""
    unit = f"[{tag}] vmsynth test vector pattern 0123456789\n".encode()
    return (unit * (n // len(unit) + 1))[:n]


def base_contents() -> bytes:
    data = b"".join(pattern_block(f"base {i}") for i in range(-(-BASE_SIZE // BLOCK)))
    return data[:BASE_SIZE]


def app_contents(base: bytes) -> bytes:
    """The base with one change of every record kind, grown by APP_SIZE - BASE_SIZE."""
    app = bytearray(base) + bytes(APP_SIZE - BASE_SIZE)

    def put(block: int, data: bytes) -> None:
        app[block * BLOCK: block * BLOCK + len(data)] = data

    edited = bytearray(base[:BLOCK])
    edited[200:216] = b"a small in-place"
    put(0, edited)  # delta against the base block
    put(3, bytes(BLOCK))  # zero
    put(5, base[20 * BLOCK: 21 * BLOCK])  # a block found elsewhere in the base
    put(10, pattern_block("new"))  # new data ...
    put(12, pattern_block("new"))  # ... repeated: a copy of block 10
    tail = BASE_SIZE // BLOCK
    put(tail, pattern_block("tail", APP_SIZE - tail * BLOCK))  # new data past the old end
    return bytes(app)


def write_qcow2(path: Path, data: bytes, backing: Path | None = None,
                under: bytes | None = None) -> None:
    writer = Qcow2Writer(path, len(data), backing=None if backing is None else str(backing))
    for index in range(-(-len(data) // CLUSTER)):
        chunk = data[index * CLUSTER: (index + 1) * CLUSTER]
        if under is not None and chunk == under[index * CLUSTER:][: len(chunk)].ljust(
                len(chunk), b"\0"):
            continue
        if chunk.count(0) == len(chunk):
            if under is not None:
                writer.zero_cluster(index)
            continue
        writer.write_cluster(index, chunk)
    writer.finish()


def build_images(folder: Path) -> tuple[Path, Path]:
    """Write base.qcow2 and app.qcow2 (a child of the base) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_contents()
    base_path, app_path = folder / "base.qcow2", folder / "app.qcow2"
    write_qcow2(base_path, base)
    write_qcow2(app_path, app_contents(base), backing=base_path.resolve(), under=base)
    return base_path, app_path


def open_base(path: Path, memory_path: Path | None = None) -> bases.Base:
    return bases.load_path(path, BASE_NAME, BASE_VERSION, memory=memory_path)


# ---------------------------------------------------------------- memory (format 1.1)

RAM_PAGES = 16
MACHINE = MachineInfo("pc-i440fx-7.2", "qemu64", RAM_PAGES * BLOCK, "7.2.0", 1, False, True,
                      (), "tcg")


def base_ram() -> bytes:
    return b"".join(bytes(BLOCK) if i % 4 == 3 else pattern_block(f"ram {i}")
                    for i in range(RAM_PAGES))


def app_ram(base_ram: bytes, base_disk: bytes) -> bytes:
    """The base's RAM with one page of every kind a memory stream has."""
    ram = bytearray(base_ram)

    def put(page: int, data: bytes) -> None:
        ram[page * BLOCK:(page + 1) * BLOCK] = data

    edited = bytearray(base_ram[:BLOCK])
    edited[100:120] = b"edited in guest RAM!"
    put(0, edited)  # delta against the base's page
    put(1, bytes(BLOCK))  # zero
    put(2, base_ram[9 * BLOCK:10 * BLOCK])  # another page of the base's memory
    put(4, base_disk[7 * BLOCK:8 * BLOCK])  # a block of the base's disk (page cache)
    put(5, pattern_block("new"))  # a block the app wrote to its disk
    put(6, pattern_block("new in RAM"))  # new data ...
    put(8, pattern_block("new in RAM"))  # ... repeated: a copy of page 6
    return bytes(ram)


def build_memory(folder: Path) -> tuple[Path, Path]:
    """Write base.vmem and app.vmem (snapshots with RAM_PAGES pages) into `folder`."""
    folder = Path(folder)
    out = []
    base = base_ram()
    for name, ram, state in (("base", base, b"base device state " * 20),
                             ("app", app_ram(base, base_contents()),
                              b"app device state, a little longer " * 20)):
        ram_file = folder / f"{name}.ram"
        ram_file.write_bytes(ram)
        out.append(memory.write_vmem(folder / f"{name}.vmem", ram_file, MACHINE, state).path)
        ram_file.unlink()
    return out[0], out[1]


def read_key_file() -> bytes:
    return (HERE / KEY_FILE).read_bytes()


def key_for(kind: str, file_id: bytes = FILE_ID) -> Key:
    """The Key the encrypted vectors are made with (fixed file id and salt)."""
    if kind == "key_file":
        return Key(key_file=read_key_file(), file_id=file_id, salt=SALT)
    return Key(passphrase=PASSPHRASE, file_id=file_id, salt=SALT)


def _create(base_path: Path, app_path: Path, key: Key | None = None,
            frame_data: int | None = None,
            memory_paths: tuple[Path, Path] | None = None,
            solid: bool = False) -> tuple[bytes, dict]:
    """An overlay of app over base (several small frames with `frame_data`; with
    `memory_paths`, the app's memory snapshot against the base's too), and its info."""
    original = create_mod.manifest

    def pinned(*args, **kwargs) -> dict:
        return original(*args, **kwargs) | {"created_by": CREATED_BY}

    base = open_base(base_path, memory_paths[0] if memory_paths else None)
    disk = Qcow2Image(app_path)
    snapshot = memory.open_vmem(memory_paths[1]) if memory_paths else None
    try:
        out = io.BytesIO()
        with mock.patch.object(create_mod, "manifest", pinned), \
                mock.patch.object(create_mod, "FRAME_DATA", frame_data or create_mod.FRAME_DATA):
            report = create_mod.create(base, disk, out, level=3, key=key, memory=snapshot,
                                       solid=solid)
        app_sha = hashlib.sha256(disk.read(0, disk.virtual_size)).hexdigest()
    finally:
        if snapshot is not None:
            snapshot.close()
        disk.close()
        base.close()
    info = {"outcome": "ok", "result_digest": report.summary["result_digest"],
            "disk_sha256": "sha256:" + app_sha, "virtual_size": APP_SIZE,
            "blocks": report.summary["blocks"]}
    if memory_paths:
        info["memory"] = {"digest": memory.read_vmem(memory_paths[1]).digest,
                          "blocks": report.summary["memory_blocks"]}
    return out.getvalue(), info


def make_good(folder: Path) -> tuple[bytes, dict]:
    base_path, app_path = build_images(folder)
    return _create(base_path, app_path)


def make_memory(folder: Path) -> tuple[dict[str, bytes], dict]:
    """mem-good.vmo (disk and memory, format 1.1) and its one damaged variant."""
    good, info = _create(folder / "base.qcow2", folder / "app.qcow2",
                         memory_paths=build_memory(folder))
    pos = _header_length(good)
    while good[pos + 4] != 1:  # the frame header's stream byte: find the first memory frame
        pos += FRAME_HEAD_SIZE + FRAME.unpack_from(good, pos)[6]
    bad = bytearray(good)
    bad[pos + FRAME_HEAD_SIZE + FRAME.unpack_from(good, pos)[6] // 2] ^= 0x10  # its payload
    return {"mem-good.vmo": good, "mem-bad-memory-frame.vmo": bytes(bad)}, info


def make_solid(folder: Path) -> tuple[dict[str, bytes], dict]:
    """mem-solid-good.vmo (the same disk and memory, solid, several frames) and one bad
    variant whose first frame declares a byte less than its piece decodes to."""
    good, info = _create(folder / "base.qcow2", folder / "app.qcow2", frame_data=BLOCK,
                      memory_paths=(folder / "base.vmem", folder / "app.vmem"), solid=True)
    header, frames, summary, targets = split_overlay(good)
    assert len(frames) >= 3, "the solid vectors need several frames"
    fields = list(FRAME.unpack(frames[0][0]))
    fields[7] -= 1  # raw_length
    short = (FRAME.pack(*fields), frames[0][1])
    return {"mem-solid-good.vmo": good,
            "mem-solid-overrun.vmo": join_overlay(header, [short, *frames[1:]], summary,
                                                  targets)}, info


def _header_length(data: bytes) -> int:
    return HEADER.unpack_from(data)[3]


def _reseal_header(data: bytearray) -> bytes:
    length = _header_length(data)
    data[length - DIGEST_SIZE: length] = hashlib.sha256(data[: length - DIGEST_SIZE]).digest()
    return bytes(data)


# ---------------------------------------------------------------- encrypted vectors

def split_overlay(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes,
                                        list[tuple[int, int]]]:
    """(header, [(frame head, stored payload)], summary body, [(first target, end)])."""
    pos = _header_length(data)
    header, frames = data[:pos], []
    while data[pos: pos + 4] == FRAME_TAG:
        head = data[pos: pos + FRAME.size]
        stored = FRAME.unpack(head)[6]
        frames.append((head, data[pos + FRAME_HEAD_SIZE: pos + FRAME_HEAD_SIZE + stored]))
        pos += FRAME_HEAD_SIZE + stored
    tag, summary_len = SECTION.unpack_from(data, pos)
    assert tag == SUMMARY_TAG
    summary = data[pos + SECTION.size: pos + SECTION.size + summary_len]
    pos += SECTION.size + summary_len
    tag, count = SECTION.unpack_from(data, pos)
    assert tag == INDEX_TAG and count == len(frames)
    entries = [INDEX_ENTRY.unpack_from(data, pos + SECTION.size + i * INDEX_ENTRY.size)
               for i in range(count)]
    return header, frames, summary, [(e[7], e[8]) for e in entries]


def join_overlay(header: bytes, frames: list[tuple[bytes, bytes]], summary: bytes,
                 targets: list[tuple[int, int]]) -> bytes:
    """Reassemble: every frame digest, the index and the trailer are computed afresh."""
    out = bytearray(header)
    index = b""
    for (head, stored), (start, end) in zip(frames, targets, strict=True):
        _, stream, codec, _, _, count, stored_len, raw_len = FRAME.unpack(head)
        digest = hashlib.sha256(head + stored).digest()
        index += INDEX_ENTRY.pack(len(out), stored_len, raw_len, count, stream, codec, 0, start,
                                  end, digest)
        out += head + digest + stored
    summary_offset = len(out)
    tail = SECTION.pack(SUMMARY_TAG, len(summary)) + summary
    index_offset = summary_offset + len(tail)
    tail += SECTION.pack(INDEX_TAG, len(frames)) + index
    prefix = TRAILER.pack(TRAILER_MAGIC, summary_offset, index_offset,
                          summary_offset + len(tail) + TRAILER.size,
                          bytes(DIGEST_SIZE))[:-DIGEST_SIZE]
    return bytes(out + tail + prefix + hashlib.sha256(tail + prefix).digest())


def renumbered(head: bytes, seq: int) -> bytes:
    fields = list(FRAME.unpack(head))
    fields[4] = seq
    return FRAME.pack(*fields)


def tampered(good: bytes, donor: bytes) -> dict[str, bytes]:
    """Encrypted `good` damaged so that only the AEAD catches it (digests all recomputed).

    `donor` is the same disk encrypted with the same key under another file id.
    """
    header, frames, summary, targets = split_overlay(good)
    assert len(frames) >= 3, "the encrypted vectors need several frames"
    out = {}
    head, stored = frames[1]
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 0x10  # one bit of frame 1's ciphertext
    out["bad-tag"] = join_overlay(header, [frames[0], (head, bytes(bad)), *frames[2:]], summary,
                                  targets)
    swapped = [(renumbered(frames[1][0], 0), frames[1][1]),
               (renumbered(frames[0][0], 1), frames[0][1]), *frames[2:]]
    out["swapped"] = join_overlay(header, swapped, summary,
                                  [targets[1], targets[0], *targets[2:]])
    out["dropped-last"] = join_overlay(header, frames[:-1], summary, targets[:-1])
    _, donor_frames, _, _ = split_overlay(donor)
    assert donor_frames[1][0] == frames[1][0]  # same frame head: only the sealing differs
    out["spliced"] = join_overlay(header, [frames[0], donor_frames[1], *frames[2:]], summary,
                                  targets)
    return out


# ---------------------------------------------------------------- taking overlays apart

BINARY = bytes(range(256)) * 2  # an optional section's body: binary, every byte value


def _rebind(summary: bytes, header: bytes) -> bytes:
    """A plain summary naming `header` (its last 32 bytes: the header digest)."""
    doc = json.loads(summary)
    return canonical_json(doc | {"header_digest": "sha256:" + header[-DIGEST_SIZE:].hex()})


def reheader(data: bytes, manifest: dict | None = None, rebind: bool = True,
             **fields: int) -> bytes:
    """A plain overlay with header fields (major, minor, incompat, compat, reserved) or the
    manifest replaced, the header digest recomputed and, with `rebind`, the summary's
    header_digest made to match; frame offsets and the index follow."""
    header, frames, summary, targets = split_overlay(data)
    names = ["magic", "major", "minor", "length", "incompat", "compat", "mlen", "reserved"]
    values = dict(zip(names, HEADER.unpack_from(header), strict=True)) | fields
    body = header[HEADER.size: -DIGEST_SIZE] if manifest is None else canonical_json(manifest)
    values["length"], values["mlen"] = HEADER.size + len(body) + DIGEST_SIZE, len(body)
    head = HEADER.pack(*(values[n] for n in names)) + body
    header = head + hashlib.sha256(head).digest()
    return join_overlay(header, frames, _rebind(summary, header) if rebind else summary,
                        targets)


def manifest_of(data: bytes) -> dict:
    return json.loads(data[HEADER.size: _header_length(data) - DIGEST_SIZE])


def summary_of(data: bytes) -> dict:
    return json.loads(split_overlay(data)[2])


def with_summary(data: bytes, summary: dict | bytes) -> bytes:
    header, frames, _, targets = split_overlay(data)
    body = summary if isinstance(summary, bytes) else canonical_json(summary)
    return join_overlay(header, frames, body, targets)


def with_index(data: bytes, entry: int, **changes: object) -> bytes:
    """A plain overlay with one index entry's fields changed (trailer digest recomputed)."""
    names = ["offset", "stored", "raw", "records", "stream", "codec", "reserved", "start", "end",
             "digest"]
    s_off, i_off = TRAILER.unpack_from(data, len(data) - TRAILER.size)[1:3]
    pos = i_off + SECTION.size + entry * INDEX_ENTRY.size
    values = dict(zip(names, INDEX_ENTRY.unpack_from(data, pos), strict=True)) | changes
    out = bytearray(data)
    out[pos: pos + INDEX_ENTRY.size] = INDEX_ENTRY.pack(*(values[n] for n in names))
    return with_trailer_digest(bytes(out), s_off)


def with_trailer_digest(data: bytes, s_off: int) -> bytes:
    body = data[s_off: len(data) - DIGEST_SIZE]
    return body and data[: len(data) - DIGEST_SIZE] + hashlib.sha256(body).digest()


def with_frame(data: bytes, seq: int, **changes: int) -> bytes:
    """A plain overlay with one frame header's fields changed (its digest and the index
    recomputed)."""
    header, frames, summary, targets = split_overlay(data)
    names = ["tag", "stream", "codec", "flags", "seq", "count", "stored", "raw"]
    values = dict(zip(names, FRAME.unpack(frames[seq][0]), strict=True)) | changes
    frames[seq] = (FRAME.pack(*(values[n] for n in names)), frames[seq][1])
    return join_overlay(header, frames, summary, targets)


def insert_sections(data: bytes, sections: list[tuple[bytes, bytes]], sealer: Sealer | None
                    = None, listed: bool = True, declared: int | None = None) -> bytes:
    """The overlay with optional sections written after its header and, with `listed`, in
    its summary (opened and resealed with `sealer` when encrypted). `declared` overrides the
    length field (the body then stays as given)."""
    header, frames, summary, targets = split_overlay(data)
    raw, entries = b"", []
    for ordinal, (tag, body) in enumerate(sections):
        size = len(body) + (16 if sealer else 0)
        head = SECTION.pack(tag, size if declared is None else declared)
        stored = sealer.seal_section(head, ordinal, body) if sealer else body
        digest = hashlib.sha256(head + stored).digest()
        entries.append({"tag": tag.decode("latin-1"), "offset": len(header) + len(raw),
                        "length": size, "digest": "sha256:" + digest.hex()})
        raw += head + digest + stored
    if listed:
        plain = sealer.open_summary(summary, len(frames)) if sealer else summary
        plain = canonical_json(json.loads(plain) | {"sections": entries})
        summary = sealer.seal_summary(plain, len(frames)) if sealer else plain
    return join_overlay(header + raw, frames, summary, targets)


def crafted(frames: list[tuple[Stream, list[Record], list[bytes]]], manifest: dict,
            incompat: int = 0, seqs: list[int] | None = None, compress: bool = True) -> bytes:
    """A small overlay written from explicit records (most of them breaking a rule)."""
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(manifest, incompat=incompat)
    comp = zstandard.ZstdCompressor(level=3) if compress else None
    for i, (stream, records, data) in enumerate(frames):
        w.write_frame(encode_frame(seqs[i] if seqs else i, stream, records, data, comp))
    w.finish({"result_digest": ZERO_DIGEST})
    return out.getvalue()


def data_record(target: int, tag: str, n: int = BLOCK) -> tuple[Record, bytes]:
    payload = pattern_block(tag, n)
    return Record(Kind.DATA, target, n, 0, n), payload


# ---------------------------------------------------------------- the overlay vectors

def damaged(good: bytes, mem_good: bytes) -> dict[str, bytes]:
    """good.vmo (and mem-good.vmo) damaged in one way each, every other digest valid."""
    out = {}
    bad = bytearray(good)
    bad[1] ^= 0x01  # "V" of the magic becomes "W"
    out["bad-magic.vmo"] = bytes(bad)
    first_frame = _header_length(good)
    out["truncated.vmo"] = good[: first_frame + FRAME_HEAD_SIZE + 10]  # inside frame 0
    bad = bytearray(good)
    bad[first_frame + FRAME_HEAD_SIZE + 20] ^= 0x04  # one bit of frame 0's payload
    out["bad-digest.vmo"] = bytes(bad)
    bad = bytearray(good)
    bad[HEADER.size + 10] ^= 0x02  # one bit of the manifest, the header digest not redone
    out["header-bad-digest.vmo"] = bytes(bad)
    out["header-reserved.vmo"] = reheader(good, reserved=1)
    spliced = manifest_of(good) | {"created_by": "another writer"}
    out["header-spliced.vmo"] = reheader(good, manifest=spliced, rebind=False)
    out["unknown-version.vmo"] = reheader(good, major=MAJOR + 1)
    out["unknown-feature.vmo"] = reheader(good, incompat=1 << 63)
    named = manifest_of(good) | {"feature_names": {"incompat": {"40": UNKNOWN_FEATURE_NAME}}}
    out["unknown-feature-named.vmo"] = reheader(good, manifest=named, incompat=1 << 40)
    out["future-minor.vmo"] = reheader(good, minor=MINOR + 7)
    future = manifest_of(good) | {"x-future": {"anything": [1, 2]}}
    future["base"] = future["base"] | {"x-future": "ignored"}
    keys = reheader(good, manifest=future)
    out["future-keys.vmo"] = with_summary(keys, summary_of(keys) | {"x-future": [True]})
    out["future-compat.vmo"] = reheader(good, compat=1 << 7)
    other = manifest_of(good)
    other["base"] = other["base"] | {
        "digest": "sha256:" + hashlib.sha256(b"another base").hexdigest()}
    out["base-mismatch.vmo"] = reheader(good, manifest=other)
    summary = summary_of(good)
    out["result-digest-mismatch.vmo"] = with_summary(good, summary | {
        "result_digest": "sha256:" + hashlib.sha256(b"another result").hexdigest()})
    out["summary-bad-digest-string.vmo"] = with_summary(good, summary | {
        "result_digest": summary["result_digest"].upper().replace("SHA256", "sha256")})
    out["summary-without-header-digest.vmo"] = with_summary(
        good, {k: v for k, v in summary.items() if k != "header_digest"})
    upper = manifest_of(good)
    upper["base"] = upper["base"] | {"digest": "sha256:" + upper["base"]["digest"][7:].upper()}
    out["manifest-bad-digest-string.vmo"] = reheader(good, manifest=upper)
    gpu = manifest_of(good)
    gpu["streams"] = gpu["streams"] + [{"id": 2, "kind": "gpu", "virtual_size": BLOCK}]
    out["stream-unknown-kind.vmo"] = reheader(good, manifest=gpu)
    out["mem-no-memory-bit.vmo"] = reheader(mem_good, incompat=0)
    out["frame-unknown-codec.vmo"] = with_frame(good, 0, codec=2)
    out["frame-unknown-flag.vmo"] = with_frame(good, 0, flags=1 << 8)
    out["index-mismatch.vmo"] = with_index(good, 0, digest=bytes(DIGEST_SIZE))
    _, _, _, targets = split_overlay(good)
    out["index-range-mismatch.vmo"] = with_index(good, 0, end=targets[0][1] + BLOCK)
    out["index-reserved.vmo"] = with_index(good, 0, reserved=1)
    out["trailer-bad-digest.vmo"] = good[:-1] + bytes([good[-1] ^ 0x01])
    out["trailing-bytes.vmo"] = good + b"\0"
    return out


def bounds(good: bytes) -> dict[str, bytes]:
    """Declared sizes past the bounds a reader checks before allocating anything."""
    out = {}
    bad = bytearray(good)
    bad[12:16] = (MAX_HEADER + 1).to_bytes(4, "little")  # header_length ...
    bad[32:36] = (MAX_HEADER + 1 - HEADER.size - DIGEST_SIZE).to_bytes(4, "little")  # ... agreed
    out["bound-header-length.vmo"] = bytes(bad)
    out["bound-frame-raw.vmo"] = with_frame(good, 0, raw=MAX_FRAME_RAW + 1)
    out["bound-frame-records.vmo"] = with_frame(good, 0, count=MAX_FRAME_RECORDS + 1,
                                                raw=MAX_FRAME_RAW)
    raw = FRAME.unpack(split_overlay(good)[1][0][0])[7]
    out["bound-records-past-raw.vmo"] = with_frame(good, 0, count=raw // 32 + 1)
    manifest = manifest_of(good)
    stored = crafted([(Stream.DISK, *map(list, zip(data_record(0, "stored", 64), strict=True)))],
                     manifest, compress=False)
    size = FRAME.unpack(split_overlay(stored)[1][0][0])[7]
    out["bound-stored-not-raw.vmo"] = with_frame(stored, 0, raw=size - 1)
    head, frames, summary, targets = split_overlay(stored)
    # zstd, one record (32 raw bytes), but 2000 stored: past what zstd ever needs for 32.
    fields = list(FRAME.unpack(frames[0][0]))
    fields[2], fields[5], fields[6], fields[7] = 1, 1, 2000, 32
    frames[0] = (FRAME.pack(*fields), bytes(2000))
    out["bound-stored-past-zstd-bound.vmo"] = join_overlay(head, frames, summary, targets)
    bad = bytearray(good)
    s_off = TRAILER.unpack_from(good, len(good) - TRAILER.size)[1]
    bad[s_off + 4: s_off + 8] = (MAX_SUMMARY + 1).to_bytes(4, "little")
    out["bound-summary-length.vmo"] = with_trailer_digest(bytes(bad), s_off)
    out["bound-section-length.vmo"] = insert_sections(good, [(b"wset", BINARY)], listed=False,
                                                      declared=MAX_OPTIONAL + 1)
    out["bound-section-count.vmo"] = insert_sections(
        good, [(b"wset", b"")] * (MAX_OPTIONAL_COUNT + 1))
    return out


class _WideSolid(SolidCompressor):
    """A solid stream whose zstd window is wider than any reader holds (2^28)."""

    def __init__(self) -> None:  # not SolidCompressor's: its window is bounded
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
        self._stream = zstandard.ZstdCompressor(compression_params=params).compressobj()


def records(good: bytes, mem_good: bytes) -> dict[str, bytes]:
    """Small overlays for the vectors' base whose frames or records break one rule each."""
    m = manifest_of(good)
    d8, p8 = data_record(8 * BLOCK, "eight")
    d2, p2 = data_record(2 * BLOCK, "two")
    disk = Stream.DISK

    def one(recs: list[Record], data: list[bytes], **kw) -> bytes:
        return crafted([(disk, recs, data)], m, **kw)

    out = {
        "frame-seq-gap.vmo": crafted([(disk, [d2], [p2]), (disk, [d8], [p8])], m, seqs=[0, 2]),
        "records-out-of-order.vmo": one([d8, d2], [p8, p2]),
        "records-overlap.vmo": one([d8, d8._replace(target=d8.target + 100)], [p8, p8]),
        "records-back-across-frames.vmo": crafted([(disk, [d8], [p8]), (disk, [d2], [p2])], m),
        "record-zero-length.vmo": one([Record(Kind.ZERO, 0, 0)], [b""]),
        "record-past-the-end.vmo": one([d8._replace(target=APP_SIZE - 100)], [p8]),
        "record-base-past-the-base.vmo": one([Record(Kind.BASE, 0, BLOCK, BASE_SIZE - 100)],
                                             [b""]),
        "record-disk-in-disk-stream.vmo": one([Record(Kind.DISK, 0, BLOCK, 0)], [b""]),
        "record-copy-forward.vmo": one([d8, Record(Kind.COPY, 20 * BLOCK, BLOCK, 30 * BLOCK)],
                                       [p8, b""]),
        "record-reserved.vmo": one([Record(Kind.ZERO | 1 << 16, 0, BLOCK)], [b""]),  # type: ignore[arg-type]
        "record-unknown-kind.vmo": one([Record(9, 0, BLOCK)], [b""]),  # type: ignore[arg-type]
        "record-stored-mismatch.vmo": one([d8._replace(stored=BLOCK + 60)], [p8]),
    }
    base_block = base_contents()[:BLOCK]
    dictionary = zstandard.ZstdCompressionDict(base_block,
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    short = zstandard.ZstdCompressor(dict_data=dictionary).compress(base_block[:-100])
    out["record-delta-wrong-size.vmo"] = one([Record(Kind.DELTA, 0, BLOCK, 0, len(short))],
                                             [short])
    # A zstd frame that decodes to fewer bytes than its raw_length says.
    zipped = one([d8], [p8])
    raw = FRAME.unpack(split_overlay(zipped)[1][0][0])[7]
    out["frame-raw-mismatch.vmo"] = with_frame(zipped, 0, raw=raw + 64)
    mm = manifest_of(mem_good)
    mm.pop("feature_names", None)  # the writer names the bits it sets
    out["mem-streams-descending.vmo"] = crafted(
        [(Stream.MEMORY, [d2._replace(target=0)], [p2]), (disk, [d8], [p8])], mm,
        incompat=Incompat.MEMORY)
    wide = io.BytesIO()
    w = OverlayWriter(wide)
    w.write_header(m, incompat=Incompat.SOLID)
    w.write_frame(encode_frame(0, disk, [d8], [p8], _WideSolid()))
    w.finish({"result_digest": ZERO_DIGEST})
    out["bound-solid-window.vmo"] = wide.getvalue()
    return out


def sections(good: bytes) -> dict[str, bytes]:
    """Optional sections: one unknown (skipped), and three ways to break their rules."""
    out = {"section-unknown.vmo": insert_sections(good, [(b"wset", BINARY)])}
    bad = bytearray(out["section-unknown.vmo"])
    bad[_header_length(good) + 40 + 100] ^= 0x01  # a bit of the body
    out["section-bad-digest.vmo"] = bytes(bad)
    out["section-critical-tag.vmo"] = insert_sections(good, [(b"WSET", BINARY)], listed=False)
    out["section-unlisted.vmo"] = insert_sections(good, [(b"wset", BINARY)], listed=False)
    return out


def with_kdf(good: bytes, **changes: int) -> bytes:
    """An encrypted overlay with its manifest's scrypt parameters replaced (the header
    digest recomputed; the sealed parts are then bound to the old header, but a reader
    refuses the parameters before deriving anything)."""
    manifest = manifest_of(good)
    manifest["encryption"]["kdf"].update(changes)
    return reheader(good, manifest=manifest, rebind=False)


def make_encrypted(base_path: Path, app_path: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    """The enc-*.vmo files and, for the ones a key opens, their info (as for good.vmo)."""
    files, infos = {}, {}
    for kind, prefix in (("key_file", "enc-key"), ("passphrase", "enc-pass")):
        good, info = _create(base_path, app_path, key_for(kind), frame_data=BLOCK)
        files[f"{prefix}-good.vmo"], infos[f"{prefix}-good.vmo"] = good, info
        if kind == "key_file":
            donor, _ = _create(base_path, app_path, key_for(kind, OTHER_FILE_ID),
                               frame_data=BLOCK)
            for how, data in tampered(good, donor).items():
                files[f"{prefix}-{how}.vmo"] = data
            sealer = Sealer(read_key_file(), FILE_ID, good[_header_length(good) - DIGEST_SIZE:
                                                           _header_length(good)])
            files["enc-key-section.vmo"] = insert_sections(good, [(b"wset", BINARY)], sealer)
            infos["enc-key-section.vmo"] = info
        else:
            files[f"{prefix}-bad-tag.vmo"] = tampered(good, good)["bad-tag"]
            files[f"{prefix}-scrypt-too-costly.vmo"] = with_kdf(good, **SCRYPT_TOO_COSTLY)
            files[f"{prefix}-scrypt-memory.vmo"] = with_kdf(good, **SCRYPT_TOO_MUCH_MEMORY)
    return files, infos


# ---------------------------------------------------------------- .vmem vectors

VMEM_MACHINE = MachineInfo("pc-i440fx-7.2", "qemu64", BLOCK, "7.2.0", 1, False, True, (),
                           "tcg")


def vmem_file(ram: bytes, state: bytes, header: dict | None = None,
              reserved: bytes = bytes(8), digest: str | None = None) -> bytes:
    """A .vmem: contents, header (canonical JSON, or `header` as given) and trailer."""
    contents = ram + state
    if header is None:
        head = vmem_codec.VmemHeader(VMEM_MACHINE, len(state), digest or
                                     "sha256:" + hashlib.sha256(contents).hexdigest())
        tail = vmem_codec.encode_tail(head)
        raw = tail[: -vmem_codec.TRAILER.size]
    else:
        raw = canonical_json(header)
    trailer = vmem_codec.TRAILER.pack(vmem_codec.MAGIC, len(contents), len(raw), reserved,
                                      hashlib.sha256(raw).digest())
    return contents + raw + trailer


def make_vmem() -> dict[str, bytes]:
    ram, state = pattern_block("vmem ram"), b"device state of the vmem vectors\n" * 8
    good = vmem_file(ram, state)
    header = json.loads(good[len(ram) + len(state): -vmem_codec.TRAILER.size])
    out = {"vmem-good.vmem": good,
           "vmem-version-2.vmem": vmem_file(ram, state, header | {"version": 2}),
           "vmem-reserved.vmem": vmem_file(ram, state, reserved=b"\0" * 7 + b"\x01"),
           "vmem-layout.vmem": vmem_file(ram, state, header | {"state_size": len(state) + 1}),
           "vmem-bad-digest-string.vmem": vmem_file(
               ram, state, digest="sha256:" + header["digest"][7:].upper())}
    bad = bytearray(good)
    bad[len(ram) + len(state) + 5] ^= 0x01  # a bit of the header, its digest not redone
    out["vmem-header-digest.vmem"] = bytes(bad)
    bad = bytearray(good)
    bad[100] ^= 0x01  # a bit of the RAM: only a reader that checks the contents sees it
    out["vmem-contents.vmem"] = bytes(bad)
    bad = bytearray(good)  # a header length past 1 MiB, refused before reading it
    struct_at = len(bad) - vmem_codec.TRAILER.size + 16
    bad[struct_at: struct_at + 8] = (vmem_codec.MAX_HEADER + 1).to_bytes(8, "little")
    out["vmem-bound-header.vmem"] = bytes(bad)
    return out


# ---------------------------------------------------------------- vectors.json

def entry(name: str, data: bytes, infos: dict[str, dict]) -> dict:
    outcome, covers, structure_only = VECTORS[name]
    codes = VMEM_EXIT_CODES if name.endswith(".vmem") else EXIT_CODES
    out = {"outcome": outcome, "exit_code": codes[outcome], "covers": covers,
           "sha256": "sha256:" + hashlib.sha256(data).hexdigest()}
    if structure_only is not None:
        out["structure_only"] = structure_only
    if outcome == "ok":
        out |= infos[name] if name.endswith(".vmo") else {
            "digest": vmem_codec.read_tail(io.BytesIO(data), name).digest}
    if name == "unknown-feature-named.vmo":
        out["feature_name"] = UNKNOWN_FEATURE_NAME  # a reader should report it by name
    return out


def encrypted_entry(name: str, data: bytes, infos: dict[str, dict]) -> dict:
    kind, with_key, covers = ENCRYPTED[name]
    key = {"key_file": KEY_FILE} if kind == "key_file" else {"passphrase": PASSPHRASE}
    return {"outcome": "wrong-key", "exit_code": EXIT_CODES["wrong-key"], "covers": covers,
            "key": key, "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
            "with_key": {"outcome": with_key, "exit_code": EXIT_CODES[with_key]} |
            (infos[name] if with_key == "ok" else {})}


def base_files(folder: Path) -> tuple[dict[str, bytes], dict]:
    """The base's bytes, compressed, and vectors.json's description of them."""
    disk = base_contents()
    vmem_bytes = (folder / "base.vmem").read_bytes()
    vmem = memory.read_vmem(folder / "base.vmem")
    pack = zstandard.ZstdCompressor(level=19, write_checksum=True).compress
    files = {BASE_DISK_FILE: pack(disk), BASE_VMEM_FILE: pack(vmem_bytes)}
    doc = {"name": BASE_NAME, "version": BASE_VERSION, "virtual_size": len(disk),
           "digest": "sha256:" + hashlib.sha256(disk).hexdigest(),
           "file": BASE_DISK_FILE, "file_holds": "the base's virtual contents, raw, "
           "zstd-compressed (zstd -d, then qemu-img convert -f raw -O qcow2)",
           "recipe": "make_vectors.build_images",
           "memory": {"file": BASE_VMEM_FILE, "file_holds": "the base's memory snapshot "
                      "(a .vmem file, SPEC.md section 11), zstd-compressed; for the mem-*.vmo",
                      "size": vmem.size, "digest": vmem.digest,
                      "recipe": "make_vectors.build_memory"}}
    return files, doc


def generate(outdir: Path) -> dict:
    """Write every vector and vectors.json into `outdir`; return the vectors.json content."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    saved_home = os.environ.get("VMSYNTH_HOME")
    with tempfile.TemporaryDirectory(prefix="vmsynth-vectors-") as scratch:
        os.environ["VMSYNTH_HOME"] = str(Path(scratch) / "home")  # never touch a real cache
        try:
            good, info = make_good(Path(scratch))
            with_memory, memory_info = make_memory(Path(scratch))
            solid, solid_info = make_solid(Path(scratch))
            encrypted, enc_infos = make_encrypted(Path(scratch) / "base.qcow2",
                                                  Path(scratch) / "app.qcow2")
            base, base_doc = base_files(Path(scratch))
        finally:
            if saved_home is None:
                os.environ.pop("VMSYNTH_HOME", None)
            else:
                os.environ["VMSYNTH_HOME"] = saved_home
    mem_good = with_memory["mem-good.vmo"]
    files = {"good.vmo": good} | damaged(good, mem_good) | bounds(good) | \
        records(good, mem_good) | sections(good) | with_memory | solid | make_vmem()
    infos = {"good.vmo": info, "mem-good.vmo": memory_info, "mem-solid-good.vmo": solid_info}
    for name in ("future-minor.vmo", "future-keys.vmo", "future-compat.vmo",
                 "section-unknown.vmo", "summary-without-header-digest.vmo"):
        infos[name] = info  # good.vmo's contents, with what a reader must ignore
    assert set(files) == set(VECTORS), set(files) ^ set(VECTORS)
    assert set(encrypted) == set(ENCRYPTED), set(encrypted) ^ set(ENCRYPTED)
    vectors = {name: entry(name, files[name], infos) for name in sorted(files)}
    vectors |= {name: encrypted_entry(name, encrypted[name], enc_infos)
                for name in sorted(encrypted)}
    files |= encrypted | base
    for name in sorted(files):
        (outdir / name).write_bytes(files[name])
    doc = {
        "about": "vmsynth overlay and memory snapshot test vectors (SPEC.md section 13); "
                 "regenerate with formats/vectors/make_vectors.py (see its docstring). "
                 "outcome: what a reader given the base (and no key) must do; exit_code: the "
                 "vmsynth CLI's code for it; covers: the SPEC.md MUSTs the file exercises; "
                 "structure_only: the outcome for a reader that checks the file without "
                 "rebuilding (no base; for a .vmem, its trailer and header only), where it "
                 "differs; for the encrypted enc-*.vmo, key names the key (a key file in "
                 "this folder, or a passphrase) and with_key is the outcome given it",
        "format": {"overlay": f"{MAJOR}.{MINOR}", "overlay_media_type": MEDIA_TYPE,
                   "vmem": vmem_codec.VERSION, "vmem_media_type": vmem_codec.MEDIA_TYPE},
        "outcomes": {k: {"meaning": v, "exit_code": EXIT_CODES[k]} for k, v in OUTCOMES.items()},
        "base": base_doc,
        "key_file": {"name": KEY_FILE,
                     "sha256": "sha256:" + hashlib.sha256(read_key_file()).hexdigest()},
        "vectors": vectors,
    }
    (outdir / "vectors.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def main(argv: list[str]) -> int:
    outdir = Path(argv[1]) if len(argv) > 1 else HERE
    doc = generate(outdir)
    for name, v in doc["vectors"].items():
        size = (outdir / name).stat().st_size
        with_key = v.get("with_key")
        keyed = f"  with key: {with_key['outcome']}" if with_key else ""
        print(f"{name:34} {size:6} bytes  {v['outcome']}{keyed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
