"""Real images made and changed by qemu-img / qemu-io: create, apply, and let QEMU judge the
result (`qemu-img compare` exit 0, `qemu-img check` clean), for children, independent and
compressed images, tiny and 1 GiB disks, and disks that grow."""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmsynth import bases
from vmsynth.apply import apply
from vmsynth.create import create
from vmsynth.qcow2 import Qcow2Image
from vmsynth.verify import verify

pytestmark = pytest.mark.qemu_img

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 4096


@pytest.fixture(scope="session", autouse=True)
def _need_qemu(h):
    if not (h.which("qemu-img") and h.which("qemu-io")):
        pytest.skip("qemu-img / qemu-io not installed (apt-get install qemu-utils)")


@dataclass
class World:
    dir: Path
    images: dict[str, Path] = field(default_factory=dict)
    file_digests: dict[str, str] = field(default_factory=dict)  # of every base, when built

    def __getitem__(self, name: str) -> Path:
        return self.images[name]


def mixed_raw(seed: str, size: int) -> bytes:
    """A plausible disk: random, text-like and zero 4 KiB blocks."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(-(-size // BLOCK)):
        roll = rng.randrange(10)
        if roll < 3:
            out += bytes(BLOCK)
        elif roll < 6:
            unit = f"file {i} line {rng.randrange(99)}\n".encode()
            out += (unit * (BLOCK // len(unit) + 1))[:BLOCK]
        else:
            out += rng.randbytes(BLOCK)
    return bytes(out[:size])


@pytest.fixture(scope="session")
def world(tmp_path_factory, h) -> World:
    w = World(tmp_path_factory.mktemp("qemu-world"))
    d = w.dir

    def img(name: str) -> Path:
        w.images[name] = d / f"{name}.qcow2"
        return w.images[name]

    # The main base: 8 MiB + 3.5 KiB (a multiple of 512, not of 4 KiB), from raw bytes.
    base_size = 8 * MiB + 3584
    raw = d / "base.raw"
    base_bytes = mixed_raw("base", base_size)
    raw.write_bytes(base_bytes)
    h.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, img("base"))
    raw.unlink()
    moved = d / "moved-block.bin"  # a base block, to be written elsewhere by the guest
    src = next(i for i in range(100, base_size // BLOCK)
               if base_bytes[i * BLOCK: (i + 1) * BLOCK].count(0) < BLOCK)
    moved.write_bytes(base_bytes[src * BLOCK: (src + 1) * BLOCK])
    fresh = d / "fresh.bin"
    fresh.write_bytes(random.Random("fresh").randbytes(200 * KiB))

    guest_writes = [
        "write -q -P 0xab 100000 10000",  # unaligned, straddles blocks
        "write -q -z 1M 300k",  # zeroes over data
        "discard -q 3M 128k",  # a discard in a child reads as zeros
        "write -q -P 0x5a 5M 64k",  # the same pattern twice: dedupe within the app
        "write -q -P 0x5a 6M 64k",
        f"write -q -s {moved} 204800 4k",  # a block found elsewhere in the base
        f"write -q -s {fresh} 7M 200k",  # incompressible new data
        f"write -q -P 0x01 {base_size - 3584 + 100} 200",  # the partial last block
    ]
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", img("base"), "-F", "qcow2", img("child"))
    h.qemu_io(w["child"], *guest_writes)

    # A child larger than its base, written past the base's end.
    grown_size = 12 * MiB + 512
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", w["base"], "-F", "qcow2", img("grown"),
               str(grown_size))
    h.qemu_io(w["grown"], "write -q -P 0x77 9M 100k", "write -q -P 0x11 2M 8k",
              f"write -q -P 0x66 {grown_size - 1024} 1024", f"write -q -s {fresh} 10M 64k")

    # Independent images with the same contents (the general path), plain and compressed.
    h.qemu_img("convert", "-O", "qcow2", w["child"], img("flat"))
    h.qemu_img("convert", "-O", "qcow2", w["grown"], img("grown-flat"))
    h.qemu_img("convert", "-c", "-O", "qcow2", w["child"], img("child-compressed"))
    # Compressed bases (zlib and zstd): same contents as base, different files.
    h.qemu_img("convert", "-c", "-O", "qcow2", w["base"], img("base-zlib"))
    h.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", w["base"],
               img("base-zstd"))
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", w["base-zlib"], "-F", "qcow2",
               img("child-of-zlib"))
    h.qemu_io(w["child-of-zlib"], *guest_writes)

    # Tiny: a base under one block (3 sectors), its child grown to 7.5 KiB.
    (d / "tiny.raw").write_bytes(random.Random("tiny").randbytes(1536))
    h.qemu_img("convert", "-f", "raw", "-O", "qcow2", d / "tiny.raw", img("tiny-base"))
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", w["tiny-base"], "-F", "qcow2",
               img("tiny-child"), "7680")
    h.qemu_io(w["tiny-child"], "write -q -P 0x42 1000 3000", "write -q -P 0x43 5000 100")

    # 1 GiB, sparse: a base of 1 GiB - 512 bytes, its child of exactly 1 GiB.
    big = GiB - 512
    h.qemu_img("create", "-q", "-f", "qcow2", img("big-base"), str(big))
    h.qemu_io(w["big-base"], "write -q -P 0x10 0 1M", "write -q -P 0x20 512M 256k",
              f"write -q -s {fresh} 300M 200k", f"write -q -P 0x30 {big - 8192} 8192")
    h.qemu_img("create", "-q", "-f", "qcow2", "-b", w["big-base"], "-F", "qcow2",
               img("big-child"), str(GiB))
    h.qemu_io(w["big-child"], "write -q -P 0x99 700M 300k", "write -q -z 0 64k",
              "discard -q 512M 64k", f"write -q -P 0x31 {GiB - 4096} 4096",
              f"write -q -s {moved} 300M 4k")
    h.qemu_img("convert", "-O", "qcow2", w["big-child"], img("big-flat"))

    for name, path in w.images.items():
        if "base" in name:
            w.file_digests[name] = h.file_sha256(path)
    return w


CASES = [  # name, base, disk, fast path expected
    ("child", "base", "child", True),
    ("grown-child", "base", "grown", True),
    ("independent", "base", "flat", False),
    ("independent-grown", "base", "grown-flat", False),
    ("compressed-disk", "base", "child-compressed", False),
    ("child-of-zlib-base", "base-zlib", "child-of-zlib", True),
    ("zstd-base", "base-zstd", "flat", False),
    ("tiny", "tiny-base", "tiny-child", True),
    ("1GiB-child", "big-base", "big-child", True),
    ("1GiB-independent", "big-base", "big-flat", False),
]


def compare(h, a: Path, b: Path) -> None:
    proc = h.qemu_img("compare", a, b, check=False)
    assert proc.returncode == 0, f"qemu-img compare {a.name} {b.name}: {proc.stdout}{proc.stderr}"


def check(h, image: Path) -> None:
    proc = h.qemu_img("check", image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout


@pytest.mark.parametrize("name,base_name,disk_name,fast", CASES, ids=[c[0] for c in CASES])
def test_create_apply_matches_qemu(world, h, tmp_path, name, base_name, disk_name, fast):
    base_path, disk_path = world[base_name], world[disk_name]
    base = bases.load_path(base_path)
    try:
        disk = Qcow2Image(disk_path)
        try:
            out = io.BytesIO()
            report = create(base, disk, out)
            virtual_size = disk.virtual_size
        finally:
            disk.close()
        assert report.fast_path is fast
        overlay = out.getvalue()
        verify(io.BytesIO(overlay), base)

        synth = tmp_path / "synth.qcow2"
        result = apply(io.BytesIO(overlay), base, synth)
        assert result.virtual_size == virtual_size
        compare(h, disk_path, synth)
        check(h, synth)
        info = h.qemu_img("info", "--output=json", synth).stdout
        assert f'"backing-filename": "{base_path.resolve()}"' in info.replace("\\/", "/")

        flat = tmp_path / "synth-flat.qcow2"
        apply(io.BytesIO(overlay), base, flat, flatten=True)
        compare(h, disk_path, flat)
        check(h, flat)
        assert "backing-filename" not in h.qemu_img("info", "--output=json", flat).stdout
    finally:
        base.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth-flat.qcow2", "synth.qcow2"]
    assert h.file_sha256(base_path) == world.file_digests[base_name], "the base file changed"


def test_overlay_applies_on_any_file_with_the_same_contents(world, h, tmp_path):
    """Bases are bound by contents: an overlay made on base applies on its compressed copy."""
    base = bases.load_path(world["base"])
    disk = Qcow2Image(world["child"])
    try:
        out = io.BytesIO()
        create(base, disk, out)
    finally:
        disk.close()
        base.close()
    for copy in ("base-zlib", "base-zstd"):
        other = bases.load_path(world[copy])
        try:
            apply(io.BytesIO(out.getvalue()), other, tmp_path / f"{copy}.qcow2")
        finally:
            other.close()
        compare(h, world["child"], tmp_path / f"{copy}.qcow2")
        check(h, tmp_path / f"{copy}.qcow2")


@pytest.mark.parametrize("name", ["base", "child", "grown", "child-compressed", "base-zlib",
                                  "base-zstd", "tiny-child", "child-of-zlib"])
def test_reader_agrees_with_qemu_img_convert(world, h, tmp_path, name):
    raw = tmp_path / "image.raw"
    h.qemu_img("convert", "-O", "raw", world[name], raw)
    assert h.read_image(world[name]) == raw.read_bytes()


def test_base_identity_digest_is_the_raw_contents_digest(world, h, tmp_path):
    raw = tmp_path / "base.raw"
    h.qemu_img("convert", "-O", "raw", world["base"], raw)
    base = bases.load_path(world["base-zstd"])
    try:
        assert base.identity.digest == "sha256:" + hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        base.close()


def test_cli_end_to_end_with_qemu_images(world, h, tmp_path):
    """The installed command, as a user runs it: base add, create, verify, apply, compare."""
    env = os.environ.copy()
    run = lambda *args: h.run(h.VMSYNTH, *args, check=False, env=env, cwd=tmp_path)
    p = run("base", "add", world["base"], "--name", "e2e", "--version", "1")
    assert p.returncode == 0, p.stderr
    p = run("create", "--base", "e2e@1", "--disk", world["grown"], "-o", "app.vmo")
    assert p.returncode == 0, p.stderr
    p = run("verify", "app.vmo", "--base", "e2e@1")
    assert p.returncode == 0, p.stderr
    for flag in ([], ["--flatten"]):
        out = tmp_path / f"synth{'-flat' if flag else ''}.qcow2"
        p = run("apply", "app.vmo", "--base", "e2e@1", "-o", out.name, *flag)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
        compare(h, world["grown"], out)
        check(h, out)
    assert h.file_sha256(world["base"]) == world.file_digests["base"]


@pytest.mark.parametrize("shape", ["sparse", "zero-flags", "child", "odd-size-child"])
def test_pure_python_writer_output_passes_qemu_img_check(h, tmp_path, shape):
    data = bytearray(random.Random(shape).randbytes(5 * 65536))
    data[65536: 3 * 65536] = bytes(2 * 65536)
    if shape in ("sparse", "zero-flags"):
        image = h.write_image(tmp_path / "x.qcow2", bytes(data), zero_flags=shape == "zero-flags")
        expected = bytes(data)
    else:
        base = h.write_image(tmp_path / "b.qcow2", bytes(data))
        app = bytearray(data) + bytes(3 * 65536 + (1536 if shape == "odd-size-child" else 0))
        app[70000:80000] = b"\x07" * 10000
        app[0:65536] = bytes(65536)
        app[-600:] = b"\x09" * 600
        image = h.write_image(tmp_path / "x.qcow2", bytes(app), backing=base.resolve(),
                              base_data=bytes(data))
        expected = bytes(app)
    check(h, image)
    raw = tmp_path / "x.raw"
    h.qemu_img("convert", "-O", "raw", image, raw)
    assert raw.read_bytes() == expected
