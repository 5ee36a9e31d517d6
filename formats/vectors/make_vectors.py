#!/usr/bin/env python3
"""Generate the overlay test vectors in this folder.

    .venv/bin/python formats/vectors/make_vectors.py [OUTDIR]   (default: this folder)

A tiny base and a customized disk are built in pure Python (no qemu-img), and `vmsynth
create` diffs them into good.vmo. Each bad vector is good.vmo damaged in one way. vectors.json
says what a reader must do with each file: accept it (and rebuild the disk whose SHA-256 is
given), or refuse it with the named error and exit code.

The mem-*.vmo vectors (format 1.1) also carry a memory stream: the app's memory snapshot
against the base's, both made by `build_memory` (rebuilt by readers from the recipe, like the
disks), with one page of every memory record kind; `memory.digest` is the rebuilt snapshot's.

The mem-solid-*.vmo vectors are the same disk and memory as a solid overlay (incompat bit 1,
SPEC.md section 4.2: all frames one zstd stream), in several frames; the bad one declares one
byte less than its first frame's piece decodes to.

The enc-*.vmo vectors are encrypted (SPEC.md section 8), with the key file vectors.key
(committed beside them, 32 fixed bytes) or the passphrase PASSPHRASE. For them the top-level
outcome is what a reader given no key must do (refuse, exit 20); `key` names the key and
`with_key` is the outcome for a reader given it. The tampered ones are damaged so that only
the authenticated encryption can tell (frame digests, index and trailer are recomputed).

The output is deterministic: the images are made from fixed patterns, the manifest's
`created_by` is pinned so that a new vmsynth version does not change the files, and the
encrypted vectors use fixed file ids and salts (vmsynth.keys.Key's test-vector fields) instead
of random ones. The bytes do depend on the zstd library (frames are compressed);
tests/test_vectors.py checks that running this script reproduces the committed files exactly.
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

from vmsynth.formats.container import canonical_json
from vmsynth.formats.layout import (
    DIGEST_SIZE,
    FRAME,
    FRAME_HEAD_SIZE,
    FRAME_TAG,
    HEADER,
    INDEX_ENTRY,
    INDEX_TAG,
    MAJOR,
    SECTION,
    SUMMARY_TAG,
    TRAILER,
    TRAILER_MAGIC,
)

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

# Encrypted vectors: the key file beside this script, a passphrase (not ASCII, to pin down
# the UTF-8 encoding), and fixed file ids and salt instead of random ones.
KEY_FILE = "vectors.key"
PASSPHRASE = "vmsynth test vectors \u2713 passphrase"
FILE_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
OTHER_FILE_ID = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")  # the splice donor's
SALT = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
SCRYPT_TOO_COSTLY = 1 << 21  # above the n = 2^20 every reader must refuse (SPEC.md 8)

# What a reader must do with each vector (the format's contract, not this code's output).
EXPECTED = {
    "good.vmo": None,
    "mem-good.vmo": None,
    "mem-bad-memory-frame.vmo": ("CorruptOverlayError", 13),
    "mem-solid-good.vmo": None,
    "mem-solid-overrun.vmo": ("CorruptOverlayError", 13),
    "bad-magic.vmo": ("CorruptOverlayError", 13),
    "truncated.vmo": ("CorruptOverlayError", 13),
    "bad-digest.vmo": ("CorruptOverlayError", 13),
    "unknown-version.vmo": ("UnsupportedFormatError", 12),
    "unknown-feature.vmo": ("UnsupportedFormatError", 12),
}
NO_KEY = ("WrongKeyError", 20)  # any encrypted vector, read without its key
# Encrypted vectors: which key opens them, and what a reader given that key must do.
EXPECTED_ENCRYPTED = {
    "enc-key-good.vmo": ("key_file", None),
    "enc-key-bad-tag.vmo": ("key_file", ("CorruptOverlayError", 13)),
    "enc-key-swapped.vmo": ("key_file", ("CorruptOverlayError", 13)),
    "enc-key-dropped-last.vmo": ("key_file", ("CorruptOverlayError", 13)),
    "enc-key-spliced.vmo": ("key_file", ("CorruptOverlayError", 13)),
    "enc-pass-good.vmo": ("passphrase", None),
    "enc-pass-bad-tag.vmo": ("passphrase", ("CorruptOverlayError", 13)),
    "enc-pass-scrypt-too-costly.vmo": ("passphrase", ("UnsupportedFormatError", 12)),
}


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


def damaged(good: bytes) -> dict[str, bytes]:
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
    bad[8:10] = (MAJOR + 1).to_bytes(2, "little")  # major version, digest recomputed
    out["unknown-version.vmo"] = _reseal_header(bad)
    bad = bytearray(good)
    bad[16:24] = (1 << 63).to_bytes(8, "little")  # an incompatible-feature bit, resealed
    out["unknown-feature.vmo"] = _reseal_header(bad)
    return out


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


def with_scrypt_n(good: bytes, n: int) -> bytes:
    """The overlay with its manifest's scrypt `n` replaced (header digest recomputed)."""
    length = _header_length(good)
    manifest = json.loads(good[HEADER.size: length - DIGEST_SIZE])
    manifest["encryption"]["kdf"]["n"] = n
    body = canonical_json(manifest)
    fields = list(HEADER.unpack_from(good))
    fields[3], fields[6] = HEADER.size + len(body) + DIGEST_SIZE, len(body)
    head = HEADER.pack(*fields) + body
    rest = good[length:]
    header, frames, summary, targets = split_overlay(head + hashlib.sha256(head).digest() + rest)
    return join_overlay(header, frames, summary, targets)  # frame offsets moved


def make_encrypted(base_path: Path, app_path: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    """The enc-*.vmo files and, for the good ones, their info (as for good.vmo)."""
    files, infos = {}, {}
    for kind, prefix in (("key_file", "enc-key"), ("passphrase", "enc-pass")):
        good, info = _create(base_path, app_path, key_for(kind), frame_data=BLOCK)
        files[f"{prefix}-good.vmo"], infos[f"{prefix}-good.vmo"] = good, info
        if kind == "key_file":
            donor, _ = _create(base_path, app_path, key_for(kind, OTHER_FILE_ID),
                               frame_data=BLOCK)
            for how, data in tampered(good, donor).items():
                files[f"{prefix}-{how}.vmo"] = data
        else:
            files[f"{prefix}-bad-tag.vmo"] = tampered(good, good)["bad-tag"]
            files[f"{prefix}-scrypt-too-costly.vmo"] = with_scrypt_n(good, SCRYPT_TOO_COSTLY)
    return files, infos


def encrypted_entry(name: str, infos: dict[str, dict]) -> dict:
    kind, with_key = EXPECTED_ENCRYPTED[name]
    key = {"key_file": KEY_FILE} if kind == "key_file" else {"passphrase": PASSPHRASE}
    return {"outcome": "error", "error": NO_KEY[0], "exit_code": NO_KEY[1], "key": key,
            "with_key": dict(infos[name]) if with_key is None else {
                "outcome": "error", "error": with_key[0], "exit_code": with_key[1]}}


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
        finally:
            if saved_home is None:
                os.environ.pop("VMSYNTH_HOME", None)
            else:
                os.environ["VMSYNTH_HOME"] = saved_home
    files = {"good.vmo": good} | damaged(good) | with_memory | solid
    good_info = {"good.vmo": info, "mem-good.vmo": memory_info,
                 "mem-solid-good.vmo": solid_info}
    assert set(files) == set(EXPECTED)
    assert set(encrypted) == set(EXPECTED_ENCRYPTED)
    vectors = {}
    for name in sorted(files):
        expected = EXPECTED[name]
        vectors[name] = good_info[name] if expected is None else {
            "outcome": "error", "error": expected[0], "exit_code": expected[1]}
    for name in sorted(encrypted):
        vectors[name] = encrypted_entry(name, enc_infos)
    files |= encrypted
    for name in sorted(files):
        (outdir / name).write_bytes(files[name])
        vectors[name]["sha256"] = "sha256:" + hashlib.sha256(files[name]).hexdigest()
    doc = {
        "about": "vmsynth overlay test vectors; regenerate with "
                 "formats/vectors/make_vectors.py (see its docstring). For the encrypted "
                 "enc-*.vmo, outcome is what a reader given no key must do; key names the "
                 "key (a key file in this folder, or a passphrase) and with_key is the "
                 "outcome for a reader given it",
        "base": {"name": BASE_NAME, "version": BASE_VERSION, "virtual_size": BASE_SIZE,
                 "recipe": "make_vectors.build_images",
                 "memory_recipe": "make_vectors.build_memory (for the mem-*.vmo)"},
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
        keyed = f"  with key: {with_key['outcome']} {with_key.get('error', '')}" if with_key else ""
        print(f"{name:32} {size:6} bytes  {v['outcome']} {v.get('error', '')}{keyed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
