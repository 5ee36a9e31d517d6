#!/usr/bin/env python3
"""Generate the overlay test vectors in this folder.

    .venv/bin/python formats/vectors/make_vectors.py [OUTDIR]   (default: this folder)

A tiny base and a customized disk are built in pure Python (no qemu-img), and `vmsynth
create` diffs them into good.vmo. Each bad vector is good.vmo damaged in one way. vectors.json
says what a reader must do with each file: accept it (and rebuild the disk whose SHA-256 is
given), or refuse it with the named error and exit code.

The output is deterministic: the images are made from fixed patterns, and the manifest's
`created_by` is pinned so that a new vmsynth version does not change the files. The bytes do
depend on the zstd library (frames are compressed); tests/test_vectors.py checks that running
this script reproduces the committed files exactly.
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

from vmsynth.formats.layout import DIGEST_SIZE, FRAME_HEAD_SIZE, HEADER, MAJOR

from vmsynth import bases
from vmsynth import create as create_mod
from vmsynth.qcow2 import Qcow2Image, Qcow2Writer

HERE = Path(__file__).resolve().parent
CLUSTER = 1 << 16
BLOCK = 4096
BASE_NAME, BASE_VERSION = "vectors-base", "1"
BASE_SIZE = 3 * CLUSTER - 1536  # not a multiple of the block size
APP_SIZE = BASE_SIZE + 5000  # the app grows the disk
CREATED_BY = "formats/vectors/make_vectors.py"

# What a reader must do with each vector (the format's contract, not this code's output).
EXPECTED = {
    "good.vmo": None,
    "bad-magic.vmo": ("CorruptOverlayError", 13),
    "truncated.vmo": ("CorruptOverlayError", 13),
    "bad-digest.vmo": ("CorruptOverlayError", 13),
    "unknown-version.vmo": ("UnsupportedFormatError", 12),
    "unknown-feature.vmo": ("UnsupportedFormatError", 12),
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


def open_base(path: Path) -> bases.Base:
    return bases.load_path(path, BASE_NAME, BASE_VERSION)


def make_good(folder: Path) -> tuple[bytes, dict]:
    base_path, app_path = build_images(folder)
    original = create_mod.manifest

    def pinned(*args, **kwargs) -> dict:
        return original(*args, **kwargs) | {"created_by": CREATED_BY}

    base = open_base(base_path)
    disk = Qcow2Image(app_path)
    try:
        out = io.BytesIO()
        with mock.patch.object(create_mod, "manifest", pinned):
            report = create_mod.create(base, disk, out, level=3)
        app_sha = hashlib.sha256(disk.read(0, disk.virtual_size)).hexdigest()
    finally:
        disk.close()
        base.close()
    info = {"outcome": "ok", "result_digest": report.summary["result_digest"],
            "disk_sha256": "sha256:" + app_sha, "virtual_size": APP_SIZE,
            "blocks": report.summary["blocks"]}
    return out.getvalue(), info


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


def generate(outdir: Path) -> dict:
    """Write every vector and vectors.json into `outdir`; return the vectors.json content."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    saved_home = os.environ.get("VMSYNTH_HOME")
    with tempfile.TemporaryDirectory(prefix="vmsynth-vectors-") as scratch:
        os.environ["VMSYNTH_HOME"] = str(Path(scratch) / "home")  # never touch a real cache
        try:
            good, info = make_good(Path(scratch))
        finally:
            if saved_home is None:
                os.environ.pop("VMSYNTH_HOME", None)
            else:
                os.environ["VMSYNTH_HOME"] = saved_home
    files = {"good.vmo": good} | damaged(good)
    assert set(files) == set(EXPECTED)
    vectors = {}
    for name in sorted(files):
        (outdir / name).write_bytes(files[name])
        expected = EXPECTED[name]
        vectors[name] = info if expected is None else {
            "outcome": "error", "error": expected[0], "exit_code": expected[1]}
        vectors[name]["sha256"] = "sha256:" + hashlib.sha256(files[name]).hexdigest()
    doc = {
        "about": "vmsynth overlay test vectors; regenerate with "
                 "formats/vectors/make_vectors.py (see its docstring)",
        "base": {"name": BASE_NAME, "version": BASE_VERSION, "virtual_size": BASE_SIZE,
                 "recipe": "make_vectors.build_images"},
        "vectors": vectors,
    }
    (outdir / "vectors.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def main(argv: list[str]) -> int:
    outdir = Path(argv[1]) if len(argv) > 1 else HERE
    doc = generate(outdir)
    for name, v in doc["vectors"].items():
        size = (outdir / name).stat().st_size
        print(f"{name:24} {size:6} bytes  {v['outcome']} {v.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
