"""create then apply gives back the disk, exactly: a property over random bases and apps,
through both the fast path (a qcow2 child of the base) and the general path (any image)."""

from __future__ import annotations

import io
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from vmsynth.formats.container import parse_header

from vmsynth import bases
from vmsynth.apply import apply
from vmsynth.create import create
from vmsynth.errors import BadInputError
from vmsynth.qcow2 import Qcow2Image
from vmsynth.verify import verify

BLOCK = 4096
CS = 1 << 16
KINDS = ("data", "delta", "zero", "base", "copy")


# ------------------------------------------------------------------------------ scenarios

@dataclass
class Scenario:
    seed: int
    base_size: int
    app_size: int
    zero_share: int  # percent of the base's blocks that are zero (sparse); the rest is data
    ops: list[tuple]
    frame_data: int | None  # None: the real frame size; else tiny frames, to get many
    zero_flags: bool  # mark zero clusters of the base (else leave them unallocated)


SCALES = [200, 3000, 5 * BLOCK, 20 * BLOCK, CS, 5 * CS, 1 << 20, 3 << 20]
sizes = st.one_of(
    # from under one block up to a few MiB, mostly not multiples of anything
    st.sampled_from(SCALES).flatmap(lambda n: st.integers(max(1, n // 2), n + n // 3)),
    st.sampled_from([BLOCK, CS, 3 * CS, CS - 1, CS + 1, 5 * CS + 512, (2 << 20) + 1000]),
)
fractions = st.integers(0, 10**6)
ops = st.one_of(
    st.tuples(st.just("zero"), fractions, st.integers(1, 250_000)),  # length: share of size
    st.tuples(st.just("write"), fractions, st.integers(1, 2 * CS)),  # unaligned new bytes
    st.tuples(st.just("dup"), fractions, fractions),  # a block repeated within the app
    st.tuples(st.just("from_base"), fractions, fractions),  # a base block moved elsewhere
    st.tuples(st.just("edit"), fractions, st.integers(0, BLOCK - 1), st.integers(1, 24)),
    st.tuples(st.just("grow_write"), fractions, st.integers(1, CS)),  # past the base's end
)


@st.composite
def scenarios(draw) -> Scenario:
    base_size = draw(sizes)
    grow = draw(st.one_of(st.just(0), st.integers(1, 64), st.integers(1, 300_000)))
    return Scenario(
        seed=draw(st.integers(0, 2**32)),
        base_size=base_size,
        app_size=base_size + grow,
        zero_share=draw(st.sampled_from([0, 30, 70, 95, 100])),
        ops=draw(st.lists(ops, min_size=1, max_size=16)),
        frame_data=draw(st.sampled_from([None, None, BLOCK, 3 * BLOCK])),
        zero_flags=draw(st.booleans()),
    )


def contents(s: Scenario) -> tuple[bytes, bytes]:
    """Base and app bytes for a scenario (deterministic in its seed)."""
    rng = random.Random(s.seed)
    base = bytearray()
    for i in range(-(-s.base_size // BLOCK)):
        roll = rng.randrange(100)
        if roll < s.zero_share:
            base += bytes(BLOCK)
        elif roll % 2:
            unit = f"text block {i} of {s.seed} ".encode()  # compressible, unique
            base += (unit * (BLOCK // len(unit) + 1))[:BLOCK]
        else:
            base += rng.randbytes(BLOCK)
    del base[s.base_size:]
    app = bytearray(base) + bytes(s.app_size - s.base_size)
    size = s.app_size
    full_blocks = size // BLOCK
    base_blocks = s.base_size // BLOCK
    for op in s.ops:
        kind, a = op[0], op[1]
        if kind == "zero":
            start = a * size // 10**6
            n = min(max(1, op[2] * size // 10**6), size - start)
            app[start: start + n] = bytes(n)
        elif kind == "write":
            start = a * size // 10**6
            n = min(op[2], size - start)
            app[start: start + n] = rng.randbytes(n)
        elif kind == "dup" and full_blocks >= 2:
            src, dst = a * full_blocks // 10**6, op[2] * full_blocks // 10**6
            src, dst = min(src, full_blocks - 1), min(dst, full_blocks - 1)
            if src != dst:
                if app[src * BLOCK: (src + 1) * BLOCK].count(0) == BLOCK:
                    app[src * BLOCK: (src + 1) * BLOCK] = rng.randbytes(BLOCK)
                app[dst * BLOCK: (dst + 1) * BLOCK] = app[src * BLOCK: (src + 1) * BLOCK]
        elif kind == "from_base" and base_blocks >= 1:
            src = min(a * base_blocks // 10**6, base_blocks - 1)
            dst = min(op[2] * full_blocks // 10**6, max(full_blocks - 1, 0))
            if full_blocks:
                app[dst * BLOCK: (dst + 1) * BLOCK] = base[src * BLOCK: (src + 1) * BLOCK]
        elif kind == "edit":
            start = (a * size // 10**6) // BLOCK * BLOCK + op[2]
            n = min(op[3], size - start)
            if n > 0:
                app[start: start + n] = bytes((b + 1 + i) % 256 for i, b in
                                              enumerate(app[start: start + n]))
        elif kind == "grow_write" and s.app_size > s.base_size:
            start = s.base_size + a * (s.app_size - s.base_size) // 10**6
            n = min(op[2], size - start)
            app[start: start + n] = rng.randbytes(n)
    return bytes(base), bytes(app)


def make(h, base: bases.Base, disk, level: int = 3, frame_data: int | None = None,
         solid: bool = False):
    return h.make_overlay(base, disk, level, frame_data, solid)


def rebuild(h, overlay: bytes, base: bases.Base, out: Path) -> bytes:
    report = apply(io.BytesIO(overlay), base, out)
    assert report.output == str(out)
    return h.read_image(out)


# ------------------------------------------------------------------------------ the property

@settings(max_examples=40)
@given(s=scenarios())
@example(s=Scenario(1, 1000, 1000, 0, [("edit", 0, 10, 5)], None, False))
@example(s=Scenario(2, 3 * CS + 100, 5 * CS + 7, 30,
                    [("dup", 0, 999_999), ("from_base", 500_000, 10), ("zero", 300_000, 9000),
                     ("grow_write", 0, 5000), ("edit", 10, 100, 3)], BLOCK, True))
@example(s=Scenario(3, (3 << 20) + 777, (4 << 20) + 1234, 20,
                    [("write", 123_456, 100_001), ("dup", 10, 900_000), ("edit", 500_000, 7, 9),
                     ("zero", 700_000, 150_000), ("from_base", 5, 600_000),
                     ("grow_write", 50_000, 60_000)], None, False))
def test_apply_of_create_reproduces_the_app(h, s):
    base_data, app_data = contents(s)
    with tempfile.TemporaryDirectory(prefix="vmsynth-rt-") as tmp:
        d = Path(tmp)
        base_path = h.write_image(d / "base.qcow2", base_data, zero_flags=s.zero_flags)
        child_path = h.write_image(d / "child.qcow2", app_data, backing=base_path.resolve(),
                                   base_data=base_data)
        flat_path = h.write_image(d / "flat.qcow2", app_data, zero_flags=not s.zero_flags)
        assert h.read_image(child_path) == app_data  # the fixtures themselves are right
        base = bases.load_path(base_path)
        try:
            results = {}
            for label, path, fast in (("child", child_path, True), ("flat", flat_path, False)):
                disk = Qcow2Image(path)
                try:
                    overlay, report = make(h, base, disk, frame_data=s.frame_data)
                    again, _ = make(h, base, disk, frame_data=s.frame_data)
                    solid, solid_report = make(h, base, disk, frame_data=s.frame_data,
                                               solid=True)
                finally:
                    disk.close()
                assert report.fast_path is fast
                assert again == overlay, "create is not deterministic"
                checked = verify(io.BytesIO(overlay), base)
                assert checked.replay.result_digest == report.summary["result_digest"]
                assert verify(io.BytesIO(overlay)).overlay_bytes == len(overlay)
                rebuilt = rebuild(h, overlay, base, d / f"synth-{label}.qcow2")
                assert len(rebuilt) == len(app_data)
                assert rebuilt == app_data, first_difference(rebuilt, app_data)
                synth = Qcow2Image(d / f"synth-{label}.qcow2")
                try:
                    assert synth.backing is not None and synth.virtual_size == s.app_size
                    assert Path(synth.backing_name).resolve() == base_path.resolve()
                finally:
                    synth.close()
                results[label] = rebuilt
                # Solid: the same frames and records, compressed as one stream.
                assert solid_report.summary["result_digest"] == report.summary["result_digest"]
                assert parse_header(io.BytesIO(solid)).solid
                assert not parse_header(io.BytesIO(overlay)).solid
                assert rebuild(h, solid, base, d / f"solid-{label}.qcow2") == app_data
            assert results["child"] == results["flat"]
            # The overlay is a function of the contents: an in-memory disk gives the same bytes.
            mem, _ = make(h, base, h.MemImage(app_data, path=str(flat_path)),
                          frame_data=s.frame_data)
            flat = Qcow2Image(flat_path)
            try:
                assert mem == make(h, base, flat, frame_data=s.frame_data)[0]
            finally:
                flat.close()
        finally:
            base.close()


def first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at byte {i} (block {i // BLOCK}, cluster {i // CS})"
    return f"lengths differ: {len(a)} != {len(b)}"


# ------------------------------------------------------------------------------ block kinds

def test_block_counts_of_the_small_pair(small_pair, h):
    """Each crafted change is classified as the record kind it is (both paths)."""
    base = bases.load_path(small_pair.base_path)
    try:
        for path in (small_pair.app_path, small_pair.flat_path):
            disk = Qcow2Image(path)
            try:
                _, report = make(h, base, disk)
            finally:
                disk.close()
            assert report.summary["blocks"] == small_pair.expected_blocks
    finally:
        base.close()


@pytest.mark.parametrize("zeros,dups,base_refs,edits,new", [
    (3, 0, 0, 0, 0), (0, 4, 0, 0, 2), (0, 0, 5, 0, 0), (0, 0, 0, 6, 0), (2, 3, 4, 5, 6),
    (7, 1, 1, 2, 1)])
def test_block_counts_match_a_crafted_change(h, tmp_path, zeros, dups, base_refs, edits, new):
    rng = random.Random(f"{zeros}-{dups}-{base_refs}-{edits}-{new}")
    nblocks = 96
    base_data = bytearray(rng.randbytes(nblocks * BLOCK))
    app = bytearray(base_data)
    slots = rng.sample(range(nblocks), zeros + dups + base_refs + edits + new + (1 if dups else 0))
    slot = iter(slots)
    for _ in range(zeros):
        b = next(slot)
        app[b * BLOCK: (b + 1) * BLOCK] = bytes(BLOCK)
    if dups:
        repeated = rng.randbytes(BLOCK)
        for _ in range(dups + 1):  # the first occurrence is data, the rest are copies
            b = next(slot)
            app[b * BLOCK: (b + 1) * BLOCK] = repeated
    for _ in range(base_refs):
        b = next(slot)
        src = (b + 37) % nblocks  # a base block from elsewhere
        app[b * BLOCK: (b + 1) * BLOCK] = base_data[src * BLOCK: (src + 1) * BLOCK]
    for _ in range(edits):
        b = next(slot)
        at = b * BLOCK + rng.randrange(600, 3000)
        app[at: at + 8] = rng.randbytes(8)
    for _ in range(new):
        b = next(slot)
        app[b * BLOCK: (b + 1) * BLOCK] = rng.randbytes(BLOCK)
    # A base reference must not point at a block the app also changed: that is still legal,
    # but would make the expected count depend on which block the index finds first.
    base_path = h.write_image(tmp_path / "base.qcow2", bytes(base_data))
    flat = h.write_image(tmp_path / "flat.qcow2", bytes(app))
    child = h.write_image(tmp_path / "child.qcow2", bytes(app), backing=base_path.resolve(),
                          base_data=bytes(base_data))
    expected = {"zero": zeros, "copy": dups, "base": base_refs, "delta": edits,
                "data": new + (1 if dups else 0)}
    base = bases.load_path(base_path)
    try:
        for path in (child, flat):
            disk = Qcow2Image(path)
            try:
                overlay, report = make(h, base, disk)
            finally:
                disk.close()
            assert report.summary["blocks"] == expected
            assert rebuild(h, overlay, base, tmp_path / "synth.qcow2") == bytes(app)
    finally:
        base.close()


def test_deltas_are_much_smaller_than_the_blocks(h, tmp_path):
    rng = random.Random(5)
    base_data = rng.randbytes(64 * BLOCK)
    app = bytearray(base_data)
    for b in range(0, 64, 2):
        app[b * BLOCK + 700: b * BLOCK + 704] = b"EDIT"
    base_path = h.write_image(tmp_path / "base.qcow2", base_data)
    base = bases.load_path(base_path)
    try:
        overlay, report = make(h, base, h.MemImage(bytes(app)))
    finally:
        base.close()
    assert report.summary["blocks"]["delta"] == 32
    assert len(overlay) < 32 * BLOCK // 4  # random blocks: only deltas make this possible


# ------------------------------------------------------------------------------ edge cases

def test_identical_disk_gives_an_empty_overlay(h, small_pair, tmp_path):
    base = bases.load_path(small_pair.base_path)
    try:
        overlay, report = make(h, base, h.MemImage(small_pair.base_data))
        assert report.summary["frames"] == 0
        assert sum(report.summary["blocks"].values()) == 0
        rebuilt = rebuild(h, overlay, base, tmp_path / "synth.qcow2")
    finally:
        base.close()
    assert rebuilt == small_pair.base_data


def test_the_base_itself_as_disk_gives_an_empty_overlay(small_pair, tmp_path, h):
    base = bases.load_path(small_pair.base_path)
    disk = Qcow2Image(small_pair.base_path)
    try:
        overlay, report = make(h, base, disk)
        assert sum(report.summary["blocks"].values()) == 0
        assert rebuild(h, overlay, base, tmp_path / "synth.qcow2") == small_pair.base_data
    finally:
        disk.close()
        base.close()


def test_disk_smaller_than_base_is_refused(h, small_pair):
    base = bases.load_path(small_pair.base_path)
    try:
        with pytest.raises(BadInputError):
            create(base, h.MemImage(small_pair.base_data[:-1]), io.BytesIO())
    finally:
        base.close()


def test_child_of_a_child_uses_the_fast_path(h, small_pair, tmp_path):
    """Two layers above the base: both layers' clusters are diffed."""
    app = bytearray(small_pair.app_data)
    app[3 * CS + 5: 3 * CS + 905] = b"second layer" * 75
    top = h.write_image(tmp_path / "top.qcow2", bytes(app), backing=small_pair.app_path,
                        base_data=small_pair.app_data)
    base = bases.load_path(small_pair.base_path)
    disk = Qcow2Image(top)
    try:
        overlay, report = make(h, base, disk)
        assert report.fast_path
        assert rebuild(h, overlay, base, tmp_path / "synth.qcow2") == bytes(app)
    finally:
        disk.close()
        base.close()


def test_compression_level_changes_size_not_result(h, small_pair, tmp_path):
    base = bases.load_path(small_pair.base_path)
    disk = h.MemImage(small_pair.app_data)
    try:
        low, r1 = make(h, base, disk, level=1)
        high, r19 = make(h, base, disk, level=19)
        assert r1.summary["result_digest"] == r19.summary["result_digest"]
        assert rebuild(h, low, base, tmp_path / "a.qcow2") == rebuild(h, high, base,
                                                                   tmp_path / "b.qcow2")
    finally:
        base.close()
