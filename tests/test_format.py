"""The overlay container and frame format: round trips, and every way a reader must refuse."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from vmsynth.formats import vmem
from vmsynth.formats.container import (
    OverlayStream,
    OverlayWriter,
    canonical_json,
    check_summary,
    parse_header,
    read_footer,
)
from vmsynth.formats.errors import CorruptError, FormatError, UnsupportedError
from vmsynth.formats.frames import (
    EncodedFrame,
    Record,
    SolidCompressor,
    SolidDecompressor,
    decode_payload,
    encode_frame,
    parse_frame_head,
)
from vmsynth.formats.layout import (
    DIGEST_SIZE,
    FEATURE_NAMES,
    FRAME,
    FRAME_HEAD_SIZE,
    FRAME_TAG,
    HEADER,
    MAGIC,
    MAJOR,
    MAX_FRAME_RAW,
    MAX_FRAME_RECORDS,
    MAX_HEADER,
    MAX_OPTIONAL,
    MAX_OPTIONAL_COUNT,
    MAX_SUMMARY,
    MEDIA_TYPE,
    MINOR,
    RECORD,
    SECTION,
    SUMMARY_TAG,
    TRAILER,
    TRAILER_MAGIC,
    Codec,
    Incompat,
    Kind,
    Stream,
)
from vmsynth.formats.seal import SCRYPT_DEFAULT, Sealer, check_scrypt

from vmsynth import bases
from vmsynth.errors import VmsynthError
from vmsynth.memory import MachineInfo
from vmsynth.synth import read_manifest
from vmsynth.verify import describe, verify

U64 = st.integers(0, 2**64 - 1)
REJECT = (CorruptError, UnsupportedError)


# ------------------------------------------------------------------------------ helpers

def split_blob(blob: bytes) -> tuple[bytes, bytes, bytes]:
    return blob[: FRAME.size], blob[FRAME.size: FRAME_HEAD_SIZE], blob[FRAME_HEAD_SIZE:]


def decode_blob(blob: bytes):
    head_bytes, digest, stored = split_blob(blob)
    head = parse_frame_head(head_bytes, digest)
    return head, *decode_payload(head, stored)


def disk_manifest_for(virtual_size: int, base_size: int = 1 << 20) -> dict:
    return {"block_size": 4096,
            "base": {"name": "b", "version": "1", "virtual_size": base_size,
                     "digest": "sha256:" + "0" * 64},
            "streams": [{"id": 0, "kind": "disk", "virtual_size": virtual_size}],
            "compression": {"codec": "zstd", "level": 3}, "created_by": "tests"}


def overlay_from_frames(frames: list[tuple[list[Record], list[bytes]]],
                        manifest: dict | None = None, summary: dict | None = None,
                        compress: bool = False) -> bytes:
    """An overlay assembled with the writer from explicit records (no create involved)."""
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(manifest if manifest is not None else disk_manifest_for(1 << 20))
    comp = zstandard.ZstdCompressor(level=3) if compress else None
    for seq, (records, data) in enumerate(frames):
        w.write_frame(encode_frame(seq, Stream.DISK, records, data, comp))
    w.finish(summary if summary is not None else {"result_digest": "sha256:" + "0" * 64})
    return out.getvalue()


def data_record(target: int, payload: bytes) -> tuple[Record, bytes]:
    return Record(Kind.DATA, target, len(payload), 0, len(payload)), payload


def check_rejected(data: bytes, error: type[Exception] = CorruptError) -> Exception:
    """The streaming reader (verify) refuses `data` with exactly `error`."""
    with pytest.raises(error) as info:
        verify(io.BytesIO(data))
    return info.value


@st.composite
def records_and_data(draw):
    count = draw(st.integers(0, 12))
    records, data = [], []
    for _ in range(count):
        kind = draw(st.sampled_from(list(Kind)))
        payload = b""
        if kind in (Kind.DATA, Kind.DELTA):
            payload = draw(st.one_of(st.binary(max_size=200),
                                     st.builds(lambda b, n: b * n, st.binary(min_size=1,
                                                                             max_size=8),
                                               st.integers(1, 500))))
        records.append(Record(kind, draw(U64), draw(U64), draw(U64), len(payload)))
        data.append(payload)
    return records, data


# ------------------------------------------------------------------------------ frames

@settings(max_examples=150)
@given(rd=records_and_data(), seq=st.integers(0, 2**32 - 1), level=st.none() | st.integers(1, 9))
def test_frame_round_trip(rd, seq, level):
    records, data = rd
    comp = zstandard.ZstdCompressor(level=level) if level is not None else None
    frame = encode_frame(seq, Stream.DISK, records, data, comp)
    head, decoded, area = decode_blob(frame.blob)
    assert head == frame.head
    assert (head.seq, head.stream, head.flags, head.record_count) == (seq, Stream.DISK, 0,
                                                                      len(records))
    assert decoded == records
    assert bytes(area) == b"".join(data)
    raw = len(records) * RECORD.size + sum(map(len, data))
    assert head.raw_length == raw
    stored = len(frame.blob) - FRAME_HEAD_SIZE
    assert head.stored_length == stored
    if head.codec == Codec.STORED:
        assert stored == raw
    else:
        assert comp is not None and stored < raw  # compressed only when that is smaller
    if records:
        assert (frame.target_start, frame.target_end) == (
            records[0].target, records[-1].target + records[-1].length)


def test_frame_compresses_compressible_data():
    rec, payload = data_record(0, b"abc" * 5000)
    frame = encode_frame(0, Stream.DISK, [rec], [payload], zstandard.ZstdCompressor(level=3))
    assert frame.head.codec == Codec.ZSTD
    assert frame.head.stored_length < frame.head.raw_length // 10
    _, records, area = decode_blob(frame.blob)
    assert records == [rec] and bytes(area) == payload


@settings(max_examples=200)
@given(rd=records_and_data(), level=st.none() | st.just(3), data=st.data())
def test_any_bit_flip_in_a_frame_is_refused(rd, level, data):
    records, payloads = rd
    comp = zstandard.ZstdCompressor(level=level) if level is not None else None
    blob = encode_frame(7, Stream.DISK, records, payloads, comp).blob
    bit = data.draw(st.integers(0, len(blob) * 8 - 1), label="bit")
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(REJECT):
        decode_blob(bytes(damaged))


def test_payload_bit_flip_is_a_digest_mismatch():
    rec, payload = data_record(0, bytes(range(256)) * 4)
    blob = encode_frame(0, Stream.DISK, [rec], [payload], None).blob
    for pos in (FRAME_HEAD_SIZE, FRAME_HEAD_SIZE + 40, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        head_bytes, digest, stored = split_blob(bytes(damaged))
        head = parse_frame_head(head_bytes, digest)  # the head itself is intact
        with pytest.raises(CorruptError, match="digest"):
            decode_payload(head, stored)


def frame_head_bytes(**kw) -> bytes:
    fields = {"tag": FRAME_TAG, "stream": 0, "codec": 0, "flags": 0, "seq": 0, "count": 1,
              "stored": 64, "raw": 64} | kw
    return FRAME.pack(*fields.values())


@pytest.mark.parametrize("kw", [
    {"raw": MAX_FRAME_RAW + 1, "stored": MAX_FRAME_RAW + 1},
    {"raw": 2**32 - 1, "stored": 2**32 - 1},
    {"raw": 2**32 - 1, "stored": 100, "codec": Codec.ZSTD},
    {"count": MAX_FRAME_RECORDS + 1, "raw": MAX_FRAME_RAW, "stored": MAX_FRAME_RAW},
    {"count": 3, "raw": 64, "stored": 64},  # 3 records need 96 bytes
    {"stored": 65, "raw": 64},  # stored frames store exactly raw bytes
    {"codec": Codec.ZSTD, "raw": 1000, "stored": 1000 + 7 + 1024 + 1},  # beyond zstd's bound
    {"tag": b"FRAN"},
], ids=["raw>max", "raw=4G", "zstd-raw=4G", "records>max", "records>raw", "stored!=raw",
        "zstd-stored>bound", "tag"])
def test_impossible_frame_sizes_are_refused(kw):
    with pytest.raises(CorruptError):
        parse_frame_head(frame_head_bytes(**kw), bytes(DIGEST_SIZE))


@pytest.mark.parametrize("kw", [{"flags": 2}, {"flags": 0x8000}, {"codec": 7},
                                {"stream": 9}])
def test_unknown_frame_features_are_unsupported(kw):
    with pytest.raises(UnsupportedError):
        parse_frame_head(frame_head_bytes(**kw), bytes(DIGEST_SIZE))


def test_unknown_record_kind_is_unsupported():
    bogus = Record(9, 0, 4096, 0, 0)  # type: ignore[arg-type]
    blob = encode_frame(0, Stream.DISK, [bogus], [b""], None).blob
    with pytest.raises(UnsupportedError):
        decode_blob(blob)


def test_records_claiming_more_data_than_the_frame_holds_are_corrupt():
    rec = Record(Kind.DATA, 0, 100, 0, 100)
    blob = encode_frame(0, Stream.DISK, [rec], [b"x" * 60], None).blob  # 40 bytes short
    with pytest.raises(CorruptError):
        decode_blob(blob)


def test_decompression_bomb_is_refused():
    """A zstd payload that inflates past the declared raw length must not be inflated."""
    rec = Record(Kind.DATA, 0, 64, 0, 32)
    raw = RECORD.pack(rec.kind, rec.stored, rec.target, rec.length, rec.source) + bytes(32)
    bomb = zstandard.ZstdCompressor(level=3).compress(raw + bytes(16 << 20))
    head = FRAME.pack(FRAME_TAG, 0, Codec.ZSTD, 0, 0, 1, len(bomb), len(raw))
    blob = head + hashlib.sha256(head + bomb).digest() + bomb
    with pytest.raises(CorruptError):
        decode_blob(blob)


# ------------------------------------------------------------------------------ solid frames

def solid_blobs(frames: list[tuple[list[Record], list[bytes]]], level: int = 3) -> list[bytes]:
    comp = SolidCompressor(level)
    return [encode_frame(seq, Stream.DISK, records, data, comp).blob
            for seq, (records, data) in enumerate(frames)]


def decode_solid(blob: bytes, solid: SolidDecompressor):
    head_bytes, digest, stored = split_blob(blob)
    head = parse_frame_head(head_bytes, digest)
    return decode_payload(head, stored, None, solid)


@settings(max_examples=60)
@given(frames=st.lists(records_and_data(), min_size=1, max_size=5),
       level=st.sampled_from([1, 3, 9]))
def test_solid_frames_round_trip_in_order(frames, level):
    """Every frame is compressed (a solid stream has taken its bytes) and decodes, in order,
    to exactly its records and data."""
    solid = SolidDecompressor()
    for (records, data), blob in zip(frames, solid_blobs(frames, level), strict=True):
        assert FRAME.unpack_from(blob)[2] == Codec.ZSTD
        decoded, area = decode_solid(blob, solid)
        assert decoded == records and bytes(area) == b"".join(data)


def text_frames(n: int) -> list[tuple[list[Record], list[bytes]]]:
    return [[list(r) for r in zip(*[data_record(i * 8192, (f"frame {i} " * 900).encode())],
                                  strict=True)] for i in range(n)]


def test_solid_frames_find_repeats_in_earlier_frames():
    """The point of solid: a frame repeating an earlier one costs almost nothing."""
    block = hashlib.shake_256(b"incompressible").digest(256 << 10)
    frames = [[[data_record(0, block)[0]], [block]], [[data_record(1 << 20, block)[0]], [block]]]
    _, second = solid_blobs(frames)
    framed = encode_frame(1, Stream.DISK, *frames[1], zstandard.ZstdCompressor(level=3)).blob
    assert len(second) < len(framed) // 4


def test_a_solid_frame_without_the_ones_before_it_is_refused():
    blobs = solid_blobs(text_frames(3))
    for blob in blobs[1:]:
        with pytest.raises(CorruptError):
            decode_solid(blob, SolidDecompressor())


@pytest.mark.parametrize("delta", [-1, 1], ids=["declares-less", "declares-more"])
def test_a_solid_frame_must_decode_to_exactly_its_raw_length(delta):
    blob = solid_blobs(text_frames(1))[0]
    fields = list(FRAME.unpack_from(blob))
    fields[7] += delta  # raw_length
    head = FRAME.pack(*fields)
    stored = blob[FRAME_HEAD_SIZE:]
    with pytest.raises(CorruptError, match="less than" if delta > 0 else "more than"):
        decode_payload(parse_frame_head(head, hashlib.sha256(head + stored).digest()), stored,
                       None, SolidDecompressor())


def test_a_solid_bomb_is_refused_without_inflating_it():
    """A piece that inflates to 64 MiB stops at the declared size (here 1 KiB)."""
    bomb = SolidCompressor(3).compress(bytes(64 << 20))
    with pytest.raises(CorruptError, match="more than"):
        SolidDecompressor().decompress(0, bomb, 1024)


def test_a_solid_window_beyond_the_limit_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    piece = stream.compress(b"x" * 1000) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(CorruptError, match="memory"):
        SolidDecompressor().decompress(0, piece, 1000)


def test_the_solid_bit_on_independent_frames_is_refused(small_pair, h):
    """Frames that are not one stream are refused (not decoded wrongly, not looped on)."""
    plain = overlay_from_frames(text_frames(3), compress=True)
    check_rejected(h.reheader(plain, incompat=Incompat.SOLID))
    check_rejected(h.reheader(small_pair.overlay, incompat=Incompat.SOLID))


# ------------------------------------------------------------------------------ header

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12)


@settings(max_examples=100)
@given(manifest=st.dictionaries(st.text(max_size=12), json_values, max_size=6), compat=U64)
def test_header_round_trip(manifest, compat):
    out = io.BytesIO()
    OverlayWriter(out).write_header(manifest, compat=compat)
    raw = out.getvalue()
    stream = io.BytesIO(raw + b"rest")
    header = parse_header(stream)
    assert header.manifest == manifest
    assert (header.major, header.minor, header.incompat, header.compat) == (MAJOR, MINOR, 0,
                                                                            compat)
    assert header.length == len(raw) == stream.tell()  # consumed exactly the header
    assert raw.startswith(MAGIC)


@given(items=st.dictionaries(st.text(max_size=6), st.integers(), max_size=8))
def test_canonical_json_ignores_key_order(items):
    forward = dict(items)
    backward = dict(reversed(list(items.items())))
    assert canonical_json(forward) == canonical_json(backward)
    assert json.loads(canonical_json(forward)) == items
    assert canonical_json(forward).isascii()


def test_canonical_json_non_ascii_is_escaped():
    assert canonical_json({"b": "é", "a": 1}) == b'{"a":1,"b":"\\u00e9"}'


# ------------------------------------------------------------------------------ footer

def test_footer_and_streaming_round_trip():
    frames = []
    for i in range(3):
        rec, payload = data_record(i * 8192, bytes([i + 1]) * (1000 + i))
        frames.append(encode_frame(i, Stream.DISK, [rec], [payload],
                                   zstandard.ZstdCompressor() if i % 2 else None))
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(disk_manifest_for(1 << 20))
    starts = []
    for f in frames:
        starts.append(w.bytes_written)
        w.write_frame(f)
    summary = {"result_digest": "sha256:" + "ab" * 32, "frames": 3, "nested": {"x": [1, 2]}}
    w.finish(summary)
    data = out.getvalue()
    assert w.bytes_written == len(data)

    footer = read_footer(io.BytesIO(data))
    # The writer binds the header to the summary (SPEC.md 5): the header's own digest.
    assert footer.summary == summary | {"header_digest": "sha256:" + w.header_digest.hex()}
    assert w.header_digest == hashlib.sha256(data[: HEADER.size + len(
        canonical_json(disk_manifest_for(1 << 20)))]).digest()
    assert footer.file_length == len(data)
    assert [e.offset for e in footer.index] == starts
    for e, f in zip(footer.index, frames, strict=True):
        assert (e.stored_length, e.raw_length, e.record_count, e.stream, e.codec, e.digest) == (
            f.head.stored_length, f.head.raw_length, f.head.record_count, f.head.stream,
            f.head.codec, f.head.digest)
        assert (e.target_start, e.target_end) == (f.target_start, f.target_end)

    ov = OverlayStream(io.BytesIO(data))
    seen = list(ov.frames())
    assert [fr.offset for fr in seen] == starts
    assert [fr.head for fr in seen] == [f.head for f in frames]
    assert [fr.stored for fr in seen] == [f.blob[FRAME_HEAD_SIZE:] for f in frames]
    assert ov.footer is not None and ov.footer.summary == footer.summary
    assert ov.footer.index == footer.index


def test_overlay_with_no_frames_round_trips():
    data = overlay_from_frames([])
    assert read_footer(io.BytesIO(data)).index == []
    report = verify(io.BytesIO(data))
    assert (report.replay.frames, report.replay.records) == (0, 0)
    assert report.overlay_bytes == len(data)


def test_dissector_agrees_with_writer(small_pair, h):
    """The tests' own parse/compose helpers reproduce a real overlay byte for byte."""
    for data in (small_pair.overlay, small_pair.multi):
        assert h.compose(h.parse_parts(data)) == data
    assert len(h.parse_parts(small_pair.multi).frames) >= 3


# ------------------------------------------------------------------------------ rejections

def test_real_overlays_verify(small_pair):
    for data in (small_pair.overlay, small_pair.multi):
        report = verify(io.BytesIO(data))
        assert report.overlay_bytes == len(data)
        assert report.replay.result_digest is None  # no base: structure and digests only


@pytest.mark.parametrize("pos", range(len(MAGIC)))
def test_bad_magic(small_pair, pos):
    damaged = bytearray(small_pair.overlay)
    damaged[pos] ^= 0x20
    with pytest.raises(CorruptError, match="magic"):
        parse_header(io.BytesIO(bytes(damaged)))
    check_rejected(bytes(damaged))


@pytest.mark.parametrize("content", [b"", b"\x89", b"hello world\n" * 10, b"QFI\xfb" + bytes(200)],
                         ids=["empty", "one-byte", "text", "qcow2-like"])
def test_not_an_overlay(content):
    with pytest.raises(CorruptError):
        parse_header(io.BytesIO(content))
    check_rejected(content)


def test_a_qcow2_image_is_not_an_overlay(small_pair):
    check_rejected(small_pair.base_path.read_bytes())


def test_every_truncation_is_corrupt(small_pair):
    data = small_pair.multi
    for cut in range(len(data)):
        with pytest.raises(CorruptError):
            verify(io.BytesIO(data[:cut]))
        with pytest.raises(CorruptError):
            read_footer(io.BytesIO(data[:cut]))


def test_truncation_message_says_truncated(small_pair):
    data = small_pair.multi
    for cut in (len(data) // 3, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptError, match="truncated"):
            verify(io.BytesIO(data[:cut]))


def test_truncated_files_are_corrupt_for_inspect(small_pair, tmp_path):
    data = small_pair.multi
    for cut in sorted({0, 7, HEADER.size + 3, len(data) // 2, len(data) - TRAILER.size,
                       len(data) - 1}):
        path = tmp_path / f"cut-{cut}.vmo"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptError):
            describe(path)


def test_every_single_byte_damage_is_refused(small_pair):
    """Every byte is covered by a digest: damage anywhere is refused, never accepted."""
    data = small_pair.overlay
    for pos in range(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (pos % 8)
        with pytest.raises(REJECT):
            verify(io.BytesIO(bytes(damaged)))


def test_bad_frame_digest_in_each_frame(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    offset = HEADER.size + len(parts.manifest) + DIGEST_SIZE
    for f in parts.frames:
        middle = offset + FRAME_HEAD_SIZE + f.stored_length // 2
        with pytest.raises(CorruptError, match="digest"):
            verify(io.BytesIO(h.flip_bit(small_pair.multi, middle * 8 + 3)))
        offset += FRAME_HEAD_SIZE + f.stored_length


@pytest.mark.parametrize("major", [0, 2, 3, 255, 65535])
def test_unknown_major_version_is_unsupported(small_pair, h, major):
    data = h.reheader(small_pair.overlay, major=major)
    with pytest.raises(UnsupportedError):
        parse_header(io.BytesIO(data))
    check_rejected(data, UnsupportedError)


def test_unknown_major_version_is_unsupported_whatever_follows():
    """A future major version may lay its header out differently: only the version counts."""
    head = MAGIC + struct.pack("<HH", MAJOR + 1, 0) + b"\xff" * 200
    with pytest.raises(UnsupportedError):
        parse_header(io.BytesIO(head))


def test_newer_minor_version_is_accepted(small_pair, h):
    data = h.reheader(small_pair.overlay, minor=MINOR + 7)
    assert parse_header(io.BytesIO(data)).minor == MINOR + 7
    assert verify(io.BytesIO(data)).replay.frames == 1


@pytest.mark.parametrize("bit", [3, 5, 31, 32, 63])
def test_unknown_incompat_bit_is_unsupported(small_pair, h, bit):
    data = h.reheader(small_pair.overlay, incompat=1 << bit)
    with pytest.raises(UnsupportedError):
        parse_header(io.BytesIO(data))
    check_rejected(data, UnsupportedError)


@pytest.mark.parametrize("bit", [0, 17, 63])
def test_unknown_compat_bit_is_ignored(small_pair, h, bit):
    data = h.reheader(small_pair.overlay, compat=1 << bit)
    assert verify(io.BytesIO(data)).replay.records == verify(
        io.BytesIO(small_pair.overlay)).replay.records


def test_header_digest_mismatch(small_pair, h):
    parts = h.parse_parts(small_pair.overlay)
    data = bytearray(h.compose(parts))
    data[HEADER.size + 2] ^= 1  # inside the manifest
    with pytest.raises(CorruptError, match="digest"):
        parse_header(io.BytesIO(bytes(data)))


@pytest.mark.parametrize("length", [0, HEADER.size, HEADER.size + DIGEST_SIZE - 1,
                                    MAX_HEADER + 1, 2**32 - 1])
def test_impossible_header_length_is_refused_before_reading(small_pair, h, length):
    data = bytearray(small_pair.overlay)
    struct.pack_into("<I", data, 12, length)
    reader = h.GuardedReader(bytes(data), limit=MAX_HEADER)
    with pytest.raises(CorruptError):
        parse_header(reader)


def test_manifest_length_must_match_header_length(small_pair):
    data = bytearray(small_pair.overlay)
    (mlen,) = struct.unpack_from("<I", data, 32)
    struct.pack_into("<I", data, 32, mlen - 1)
    with pytest.raises(CorruptError):
        parse_header(io.BytesIO(bytes(data)))


@pytest.mark.parametrize("manifest", [b"not json", b"[1,2,3]", b'"text"', b"\xff\xfe"])
def test_manifest_must_be_a_json_object(small_pair, h, manifest):
    check_rejected(h.reheader(small_pair.overlay, manifest=manifest))


@pytest.mark.parametrize("drop", ["streams", "base", "block_size"])
def test_manifest_missing_required_fields_is_corrupt(small_pair, h, drop):
    manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
    del manifest[drop]
    check_rejected(h.reheader(small_pair.overlay, manifest=manifest))


def test_manifest_with_an_unknown_stream_is_unsupported(small_pair, h):
    manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
    manifest["streams"].append({"id": 2, "kind": "gpu-state", "virtual_size": 4096})
    check_rejected(h.reheader(small_pair.overlay, manifest=manifest), UnsupportedError)


def test_unknown_frame_flag_is_unsupported(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    parts.frames[1] = h.seal_frame(replace(parts.frames[1], flags=0x4))
    check_rejected(h.compose(parts), UnsupportedError)


def test_frames_out_of_order_are_corrupt(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    parts.frames[0], parts.frames[1] = parts.frames[1], parts.frames[0]
    check_rejected(h.compose(parts))


def test_frame_with_huge_raw_length_is_refused_before_allocation(small_pair, h):
    """A frame head declaring a 4 GiB frame (digest recomputed) is refused without reading."""
    parts = h.parse_parts(small_pair.multi)
    f = parts.frames[0]
    parts.frames[0] = replace(f, raw_length=2**32 - 1, stored_length=2**32 - 1, codec=0)
    parts.frames[0] = replace(parts.frames[0], digest=hashlib.sha256(
        h.frame_head(parts.frames[0]) + f.payload).digest())
    data = h.compose(parts)
    reader = h.GuardedReader(data, limit=MAX_HEADER)
    with pytest.raises(CorruptError):
        verify(reader)
    assert reader.largest < 1 << 20


def test_huge_summary_length_is_refused_before_reading(small_pair, h):
    data = bytearray(small_pair.overlay)
    s_off = data.rindex(SUMMARY_TAG)
    struct.pack_into("<I", data, s_off + 4, 2**32 - 1)
    reader = h.GuardedReader(bytes(data), limit=MAX_SUMMARY)
    with pytest.raises(CorruptError):
        verify(reader)


def test_huge_index_count_is_refused_before_reading(small_pair, h):
    parts = h.parse_parts(small_pair.overlay)
    data = bytearray(small_pair.overlay)
    i_off = data.rindex(SUMMARY_TAG) + SECTION.size + len(parts.summary)
    struct.pack_into("<I", data, i_off + 4, 2**32 - 1)
    reader = h.GuardedReader(bytes(data), limit=1 << 20)
    with pytest.raises(CorruptError):
        verify(reader)


# Index and trailer that disagree with the frames; the trailer digest is always recomputed,
# so each case is caught by a structural check, not by a digest.

def test_index_missing_an_entry(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    parts.index = parts.index[:-1]
    check_rejected(h.compose(parts, reindex=False))


def test_index_with_an_extra_entry(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    parts.index = parts.index + [parts.index[-1]]
    check_rejected(h.compose(parts, reindex=False))


@pytest.mark.parametrize("field,delta", [(0, 1), (1, 1), (9, None)],
                         ids=["offset", "stored_length", "digest"])
def test_index_entry_disagrees_with_frame(small_pair, h, field, delta):
    parts = h.parse_parts(small_pair.multi)
    entry = list(parts.index[2])
    entry[field] = entry[field] + delta if delta is not None else bytes(DIGEST_SIZE)
    parts.index[2] = tuple(entry)
    check_rejected(h.compose(parts, reindex=False))


@pytest.mark.parametrize("override", [
    {"summary_offset": 1}, {"index_offset": 5}, {"file_length": 10**6},
    {"digest": bytes(DIGEST_SIZE)}], ids=lambda o: next(iter(o)))
def test_trailer_disagrees_with_layout(small_pair, h, override):
    parts = h.parse_parts(small_pair.multi)
    data = h.compose(parts, trailer=override)
    check_rejected(data)
    with pytest.raises(CorruptError):
        read_footer(io.BytesIO(data))


def test_bad_trailer_magic(small_pair):
    data = bytearray(small_pair.overlay)
    data[-TRAILER.size] ^= 0xFF
    check_rejected(bytes(data))
    with pytest.raises(CorruptError):
        read_footer(io.BytesIO(bytes(data)))


@pytest.mark.parametrize("extra", [b"\0", b"garbage\n" * 10, "self"])
def test_trailing_garbage(small_pair, extra):
    data = small_pair.overlay + (small_pair.overlay if extra == "self" else extra)
    check_rejected(data)
    with pytest.raises(CorruptError):
        read_footer(io.BytesIO(data))


# Footers with a valid digest whose contents are malformed: someone crafted the file, or a
# buggy writer made it. Readers must still refuse with CorruptError, not crash.

def crafted_tail_overlay(h, small_pair, body: bytes, index_offset: int) -> bytes:
    whole = h.compose(h.parse_parts(small_pair.overlay))
    head_and_frames = whole[: whole.rindex(SUMMARY_TAG)]
    s_off = len(head_and_frames)
    size = s_off + len(body) + TRAILER.size
    prefix = TRAILER.pack(TRAILER_MAGIC, s_off, s_off + index_offset, size,
                          bytes(DIGEST_SIZE))[:-DIGEST_SIZE]
    return head_and_frames + body + prefix + hashlib.sha256(body + prefix).digest()


@pytest.mark.parametrize("body,index_offset", [
    (SUMMARY_TAG, 8),  # shorter than one section header
    (SECTION.pack(SUMMARY_TAG, 2) + b"{}" + b"IN", 10),  # index section header cut short
], ids=["summary-head-cut", "index-head-cut"])
def test_footer_too_short_for_its_sections_is_corrupt(small_pair, h, tmp_path, body,
                                                      index_offset):
    data = crafted_tail_overlay(h, small_pair, body, index_offset)
    with pytest.raises(CorruptError):
        read_footer(io.BytesIO(data))
    check_rejected(data)
    path = tmp_path / "crafted.vmo"
    path.write_bytes(data)
    with pytest.raises(CorruptError):
        describe(path)


@pytest.mark.parametrize("summary", [b"[1, 2]", b'"text"', b"null"])
def test_summary_must_be_a_json_object(small_pair, h, tmp_path, summary):
    parts = h.parse_parts(small_pair.overlay)
    parts.summary = summary
    data = h.compose(parts)
    path = tmp_path / "crafted.vmo"
    path.write_bytes(data)
    with pytest.raises(CorruptError):
        describe(path)
    base = bases.load_path(small_pair.base_path)
    try:
        with pytest.raises(CorruptError):
            verify(io.BytesIO(data), base)
    finally:
        base.close()


def test_summary_with_non_numeric_sizes_is_corrupt_for_inspect(small_pair, h, tmp_path):
    parts = h.parse_parts(small_pair.overlay)
    summary = json.loads(parts.summary)
    summary["payload_raw_bytes"] = "lots"
    parts.summary = canonical_json(summary)
    path = tmp_path / "crafted.vmo"
    path.write_bytes(h.compose(parts))
    with pytest.raises((VmsynthError, FormatError)):
        describe(path)


def test_summary_not_json_is_corrupt(small_pair, h):
    parts = h.parse_parts(small_pair.overlay)
    parts.summary = b"{not json"
    data = h.compose(parts)
    check_rejected(data)
    with pytest.raises(CorruptError):
        read_footer(io.BytesIO(data))


# ------------------------------------------------------------------------------ records

BLOCK = 4096


@pytest.mark.parametrize("case", [
    "out-of-order", "overlap", "past-disk-end", "zero-length", "base-past-base-end",
    "copy-forward", "copy-overlapping-itself", "zero-with-data", "data-size-mismatch"])
def test_records_are_checked_without_a_base(case):
    """verify without a base still checks that records ascend and stay inside the disk."""
    size = 64 * BLOCK
    r1, p1 = data_record(8 * BLOCK, b"a" * BLOCK)
    frames: list[tuple[list[Record], list[bytes]]]
    if case == "out-of-order":
        r0, p0 = data_record(2 * BLOCK, b"b" * BLOCK)
        frames = [([r1], [p1]), ([r0], [p0])]
    elif case == "overlap":
        r2, p2 = data_record(8 * BLOCK + 100, b"c" * BLOCK)
        frames = [([r1, r2], [p1, p2])]
    elif case == "past-disk-end":
        r2, p2 = data_record(size - 100, b"c" * BLOCK)
        frames = [([r2], [p2])]
    elif case == "zero-length":
        frames = [([Record(Kind.ZERO, 0, 0)], [b""])]
    elif case == "base-past-base-end":
        frames = [([Record(Kind.BASE, 0, BLOCK, 40 * BLOCK)], [b""])]
    elif case == "copy-forward":
        frames = [([r1, Record(Kind.COPY, 20 * BLOCK, BLOCK, 30 * BLOCK)], [p1, b""])]
    elif case == "copy-overlapping-itself":
        frames = [([r1, Record(Kind.COPY, 9 * BLOCK, 2 * BLOCK, 8 * BLOCK)], [p1, b""])]
    elif case == "zero-with-data":
        frames = [([Record(Kind.ZERO, 0, BLOCK, 0, 10)], [b"x" * 10])]
    else:  # data-size-mismatch: stored 10 bytes for a 4 KiB record
        frames = [([Record(Kind.DATA, 0, BLOCK, 0, 10)], [b"x" * 10])]
    data = overlay_from_frames(frames, manifest=disk_manifest_for(size, base_size=32 * BLOCK))
    check_rejected(data)


def test_well_formed_records_pass_without_a_base():
    """The counterpart of the test above: the same shapes, in order and in range, pass."""
    size = 64 * BLOCK
    r1, p1 = data_record(8 * BLOCK, b"a" * BLOCK)
    records = [Record(Kind.ZERO, 0, 2 * BLOCK), Record(Kind.BASE, 2 * BLOCK, BLOCK, 31 * BLOCK),
               r1, Record(Kind.COPY, 9 * BLOCK, BLOCK, 8 * BLOCK),
               Record(Kind.COPY, 20 * BLOCK, 2 * BLOCK, 8 * BLOCK)]
    data = overlay_from_frames([(records, [b"", b"", p1, b"", b""])],
                               manifest=disk_manifest_for(size, base_size=32 * BLOCK))
    report = verify(io.BytesIO(data))
    assert report.replay.records == len(records)
    assert report.replay.changed_bytes == sum(r.length for r in records)


@pytest.mark.parametrize("bad", [{"block_size": 512}, {"virtual_size": -1}])
def test_manifest_invalid_sizes_are_corrupt(bad):
    manifest = disk_manifest_for(1 << 20)
    if "block_size" in bad:
        manifest["block_size"] = bad["block_size"]
    else:
        manifest["streams"][0]["virtual_size"] = bad["virtual_size"]
    check_rejected(overlay_from_frames([], manifest=manifest))


def test_frame_for_another_stream_is_unsupported():
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(disk_manifest_for(1 << 20))
    rec, payload = data_record(0, b"m" * BLOCK)
    w.write_frame(encode_frame(0, Stream.MEMORY, [rec], [payload], None))
    w.finish({"result_digest": "sha256:" + "0" * 64})
    check_rejected(out.getvalue(), UnsupportedError)


# ------------------------------------------------------------------------------ SPEC.md
# What formats/SPEC.md requires of writers, checked on real overlays from `create`, with the
# reference computations written here from the spec's words.

def decoded_records(data: bytes):
    """(record, its bytes in the data area) for every record of every frame, in order."""
    stream = OverlayStream(io.BytesIO(data))
    out = []
    for frame in stream.frames():
        records, area = decode_payload(frame.head, frame.stored)
        pos = 0
        for r in records:
            out.append((frame.head.seq, r, bytes(area[pos: pos + r.stored])))
            pos += r.stored
    return stream, out


def test_result_digest_follows_the_spec(small_pair):
    """SHA-256 over the frames' result digests; a frame's is SHA-256 of each record with
    `stored` and `source` zeroed, followed (except ZERO) by the result bytes it defines."""
    for data in (small_pair.overlay, small_pair.multi):
        stream, records = decoded_records(data)
        frames: dict[int, hashlib._Hash] = {}
        for seq, r, _ in records:
            f = frames.setdefault(seq, hashlib.sha256())
            f.update(RECORD.pack(r.kind, 0, r.target, r.length, 0))
            if r.kind != Kind.ZERO:
                f.update(small_pair.app_data[r.target: r.target + r.length])
        total = hashlib.sha256(b"".join(frames[s].digest() for s in sorted(frames)))
        assert stream.footer is not None
        assert stream.footer.summary["result_digest"] == "sha256:" + total.hexdigest()


def test_records_rebuild_the_app_by_the_spec_alone(small_pair):
    """Apply the records as SPEC.md section 4.1 defines them, without vmsynth's apply."""
    _, records = decoded_records(small_pair.overlay)
    result = bytearray(small_pair.base_data) + bytes(len(small_pair.app_data)
                                                     - len(small_pair.base_data))
    base = small_pair.base_data
    for _, r, stored in records:
        if r.kind == Kind.DATA:
            piece = stored
        elif r.kind == Kind.ZERO:
            piece = bytes(r.length)
        elif r.kind == Kind.BASE:
            piece = base[r.source: r.source + r.length]
        elif r.kind == Kind.COPY:
            assert r.source + r.length <= r.target
            piece = bytes(result[r.source: r.source + r.length])
        else:
            dictionary = zstandard.ZstdCompressionDict(
                base[r.source: r.source + r.length].ljust(r.length, b"\0"),
                dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            piece = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(stored)
        assert len(piece) == r.length
        result[r.target: r.target + r.length] = piece
    assert bytes(result) == small_pair.app_data


def test_delta_frames_carry_their_content_size(small_pair):
    _, records = decoded_records(small_pair.overlay)
    deltas = [(r, stored) for _, r, stored in records if r.kind == Kind.DELTA]
    assert deltas
    for r, stored in deltas:
        assert zstandard.get_frame_parameters(stored).content_size == r.length
        assert len(stored) < r.length


def test_records_ascend_and_stay_inside_the_disk(small_pair):
    _, records = decoded_records(small_pair.multi)
    size = len(small_pair.app_data)
    end = 0
    for _, r, stored in records:
        assert r.target >= end and r.length > 0 and r.target + r.length <= size
        assert r.stored == (r.length if r.kind == Kind.DATA else
                            len(stored) if r.kind == Kind.DELTA else 0)
        end = r.target + r.length


def test_json_texts_are_canonical(small_pair, h):
    parts = h.parse_parts(small_pair.overlay)
    for text in (parts.manifest, parts.summary):
        assert canonical_json(json.loads(text)) == text


def test_summary_payload_sizes_add_up_the_frames(small_pair):
    footer = read_footer(io.BytesIO(small_pair.multi))
    assert footer.summary["frames"] == len(footer.index)
    assert footer.summary["payload_raw_bytes"] == sum(e.raw_length for e in footer.index)
    assert footer.summary["payload_stored_bytes"] == sum(e.stored_length for e in footer.index)


def test_index_ranges_cover_each_frames_records(small_pair):
    stream, records = decoded_records(small_pair.multi)
    assert stream.footer is not None
    for entry in stream.footer.index:
        seq = stream.footer.index.index(entry)
        mine = [r for s, r, _ in records if s == seq]
        assert entry.target_start == mine[0].target
        assert entry.target_end == mine[-1].target + mine[-1].length
        assert entry.record_count == len(mine)


def test_unknown_manifest_keys_are_ignored(small_pair, h, tmp_path):
    manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
    manifest["a_future_key"] = {"anything": [1, 2, 3]}
    manifest["base"]["another"] = "x"
    data = h.reheader(small_pair.overlay, manifest=manifest)
    base = bases.load_path(small_pair.base_path)
    try:
        assert verify(io.BytesIO(data), base).replay.result_digest
    finally:
        base.close()


def test_delta_decoding_to_the_wrong_size_is_corrupt(small_pair, h):
    """A DELTA whose zstd frame (digests all valid) decodes to fewer bytes than `length`."""
    base_block = small_pair.base_data[:BLOCK]
    dictionary = zstandard.ZstdCompressionDict(base_block,
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    for content in (base_block[:-100], base_block + b"more"):
        packed = zstandard.ZstdCompressor(dict_data=dictionary).compress(content)
        rec = Record(Kind.DELTA, 0, BLOCK, 0, len(packed))
        manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
        data = overlay_from_frames([([rec], [packed])], manifest=manifest)
        base = bases.load_path(small_pair.base_path)
        try:
            # caught at the record, not later by the result digest
            with pytest.raises(CorruptError, match="(?i)delta"):
                verify(io.BytesIO(data), base)
        finally:
            base.close()


# ------------------------------------------------------------------------------ format 1.2
# Reserved bytes, the memory feature bit and its legacy rule, feature names, the header bound
# to the summary, digest strings, optional sections (SPEC.md 2.1, 3, 5, 9, 12).

def test_header_reserved_bytes_must_be_zero(small_pair, h):
    for value in (1, 1 << 31):
        data = h.reheader(small_pair.overlay, reserved=value)
        with pytest.raises(CorruptError, match="reserved"):
            parse_header(io.BytesIO(data))
    # An unknown incompatible bit is judged first: such a file may use the reserved bytes.
    data = h.reheader(small_pair.overlay, reserved=1, incompat=1 << 9)
    with pytest.raises(UnsupportedError):
        parse_header(io.BytesIO(data))


@pytest.mark.parametrize("byte", [1, 2, 3])
def test_record_reserved_bytes_must_be_zero(byte):
    rec, payload = data_record(0, b"r" * 64)
    blob = bytearray(encode_frame(0, Stream.DISK, [rec], [payload], None).blob)
    blob[FRAME_HEAD_SIZE + byte] = 0x01  # the record table starts the payload
    head = bytes(blob[:FRAME.size])
    stored = bytes(blob[FRAME_HEAD_SIZE:])
    digest = hashlib.sha256(head + stored).digest()
    with pytest.raises(CorruptError, match="reserved"):
        decode_payload(parse_frame_head(head, digest), stored)


def test_index_reserved_bytes_must_be_zero(small_pair, h):
    parts = h.parse_parts(small_pair.multi)
    entry = list(parts.index[1])
    entry[6] = 0x0100
    parts.index[1] = tuple(entry)
    data = h.compose(parts, reindex=False)
    with pytest.raises(CorruptError, match="reserved"):
        read_footer(io.BytesIO(data))
    check_rejected(data)


@pytest.mark.parametrize("field", [7, 8], ids=["first-target", "end"])
def test_index_target_ranges_must_be_the_records(small_pair, h, field):
    parts = h.parse_parts(small_pair.multi)
    entry = list(parts.index[1])
    entry[field] += BLOCK
    parts.index[1] = tuple(entry)
    check_rejected(h.compose(parts, reindex=False))


def test_writer_names_the_feature_bits_it_sets():
    out = io.BytesIO()
    OverlayWriter(out).write_header(disk_manifest_for(4096),
                                    incompat=Incompat.ENCRYPTED | Incompat.MEMORY)
    manifest = parse_header(io.BytesIO(out.getvalue())).manifest
    assert manifest["feature_names"] == {"incompat": {"0": "encryption", "2": "memory"}}
    assert set(FEATURE_NAMES["incompat"]) == set(Incompat) - {Incompat.NONE}  # all named


@pytest.mark.parametrize("names,shown", [
    ({"5": "zstd-dictionary"}, "feature 'zstd-dictionary' (bit 5)"),
    ({}, "feature bit 5"),
    ({"5": "\x1b[31mred"}, "feature bit 5"),  # never echo control bytes from a file
    ({"5": 7}, "feature bit 5"),
], ids=["named", "unnamed", "escape", "not-text"])
def test_unknown_incompat_bit_is_reported_by_name(small_pair, h, names, shown):
    manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
    manifest["feature_names"] = {"incompat": names}
    data = h.reheader(small_pair.overlay, incompat=1 << 5, manifest=manifest)
    with pytest.raises(UnsupportedError) as info:
        parse_header(io.BytesIO(data))
    assert f"needs {shown}," in str(info.value)
    assert "\x1b" not in str(info.value)


def test_unknown_incompat_bits_with_malformed_names_are_still_unsupported(small_pair, h):
    manifest = json.loads(h.parse_parts(small_pair.overlay).manifest)
    for table in ([1, 2], {"incompat": [1]}, "x"):
        manifest["feature_names"] = table
        data = h.reheader(small_pair.overlay, incompat=(1 << 5) | (1 << 40), manifest=manifest)
        with pytest.raises(UnsupportedError, match="features bit 5, bit 40"):
            parse_header(io.BytesIO(data))


def memory_manifest() -> dict:
    manifest = disk_manifest_for(1 << 20)
    manifest["base"]["memory"] = {"size": 8192, "digest": "sha256:" + "1" * 64}
    manifest["streams"].append({"id": 1, "kind": "memory", "virtual_size": 8192, "machine": {
        "machine": "pc", "cpu": "qemu64", "ram_size": 4096, "qemu_version": "7.2.0", "cpus": 1,
        "vga": False, "kernel_boot": False, "extra_args": [], "accel": ""}})
    return manifest


@pytest.mark.parametrize("minor,incompat,outcome", [
    (2, Incompat.MEMORY, "ok"), (1, Incompat.MEMORY, "ok"), (7, Incompat.MEMORY, "ok"),
    (1, 0, "legacy"), (2, 0, "corrupt"), (0, 0, "corrupt"), (3, 0, "corrupt")])
def test_a_memory_stream_needs_the_memory_bit_except_in_1_1(minor, incompat, outcome):
    out = io.BytesIO()
    OverlayWriter(out).write_header(memory_manifest(), incompat=incompat, minor=minor)
    if outcome == "corrupt":
        with pytest.raises(CorruptError, match="memory feature bit"):
            parse_header(io.BytesIO(out.getvalue()))
        return
    header = parse_header(io.BytesIO(out.getvalue()))
    assert header.memory
    assert header.incompat == incompat  # the bits as stored; the legacy one is implied
    assert header.implied == (Incompat.MEMORY if outcome == "legacy" else 0)


def test_a_disk_only_header_does_not_imply_memory(small_pair, h):
    for minor in (0, 1, 2):
        header = parse_header(io.BytesIO(h.reheader(small_pair.overlay, minor=minor)))
        assert not header.memory


def test_a_header_spliced_onto_another_body_is_refused(small_pair, h):
    """Two overlays of the same change, differing only in their manifests: the header of one
    with the frames, summary and index of the other (all digests valid)."""
    parts = h.parse_parts(small_pair.overlay)
    manifest = json.loads(parts.manifest)
    manifest["created_by"] = "another writer"
    parts.manifest = canonical_json(manifest)
    spliced = h.compose(parts, rebind=False)
    with pytest.raises(CorruptError, match="another header"):
        verify(io.BytesIO(spliced))
    assert verify(io.BytesIO(h.compose(parts))).replay.frames == 1  # rebound: accepted


def test_a_summary_without_header_digest_is_read_as_before(small_pair, h):
    """Files of minor 0 and 1 have no header_digest: nothing to compare (SPEC.md 5)."""
    parts = h.parse_parts(small_pair.overlay)
    summary = json.loads(parts.summary)
    del summary["header_digest"]
    parts.summary = canonical_json(summary)
    for minor in (1, 2):
        parts.minor = minor
        assert verify(io.BytesIO(h.compose(parts))).replay.frames == 1


BAD_DIGESTS = ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "sha256:" + "0" * 65,
               "SHA256:" + "0" * 64, "sha512:" + "0" * 128, "md5:" + "0" * 32, "0" * 64,
               "sha256:" + "g" * 64, " sha256:" + "0" * 64, "sha256:" + "0" * 64 + "\n", 7,
               ["sha256:" + "0" * 64], {"sha256": "0" * 64}]


@pytest.mark.parametrize("key", ["result_digest", "header_digest"])
@pytest.mark.parametrize("value", BAD_DIGESTS, ids=lambda v: repr(v)[:24])
def test_malformed_digest_strings_in_the_summary_are_corrupt(small_pair, h, tmp_path, key,
                                                             value):
    parts = h.parse_parts(small_pair.overlay)
    summary = json.loads(parts.summary)
    summary[key] = value
    parts.summary = canonical_json(summary)
    data = h.compose(parts, rebind=False)
    check_rejected(data)
    path = tmp_path / "crafted.vmo"
    path.write_bytes(data)
    with pytest.raises(CorruptError):
        describe(path)


@pytest.mark.parametrize("where", ["base", "memory"])
@pytest.mark.parametrize("value", BAD_DIGESTS, ids=lambda v: repr(v)[:24])
def test_malformed_digest_strings_in_the_manifest_are_corrupt(where, value):
    manifest = memory_manifest() if where == "memory" else disk_manifest_for(1 << 20)
    (manifest["base"]["memory"] if where == "memory" else manifest["base"])["digest"] = value
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(manifest, incompat=Incompat.MEMORY if where == "memory" else 0)
    w.finish({"result_digest": "sha256:" + "0" * 64})
    check_rejected(out.getvalue())


def test_media_types():
    assert MEDIA_TYPE == "application/vnd.vmsynth.overlay.v1"
    assert vmem.MEDIA_TYPE == "application/vnd.vmsynth.vmem.v1"


# Optional sections (SPEC.md 2.1)

BINARY = bytes(range(256)) * 3  # every byte value: bodies are binary


def overlay_with_sections(place: dict[int, list[tuple[bytes, bytes]]], frames: int = 2,
                          sealer=None, manifest: dict | None = None) -> bytes:
    """An overlay of `frames` small frames with optional sections written before frame i
    (`place[i]`; i == frames: after the last frame)."""
    out = io.BytesIO()
    w = OverlayWriter(out)
    w.write_header(manifest or disk_manifest_for(1 << 20),
                   incompat=Incompat.ENCRYPTED if sealer else 0)
    if sealer is not None:
        sealer = sealer(w.header_digest)
    for seq in range(frames + 1):
        for tag, body in place.get(seq, []):
            w.write_section(tag, body, sealer)
        if seq < frames:
            rec, payload = data_record(seq * BLOCK, bytes([seq + 1]) * 100)
            w.write_frame(encode_frame(seq, Stream.DISK, [rec], [payload], None, sealer))
    w.finish({"result_digest": "sha256:" + "0" * 64}, sealer)
    return out.getvalue()


def test_optional_sections_are_verified_and_skipped():
    place = {0: [(b"wset", BINARY)], 1: [(b"aaaa", b""), (b"zZ09", b"x")], 2: [(b"tail", b"t")]}
    data = overlay_with_sections(place)
    report = verify(io.BytesIO(data))
    assert report.replay.frames == 2 and report.overlay_bytes == len(data)
    stream = OverlayStream(io.BytesIO(data), keep=frozenset({"wset", "tail"}))
    assert [f.head.seq for f in stream.frames()] == [0, 1]
    assert [(s.tag, s.length) for s in stream.sections] == [
        ("wset", len(BINARY)), ("aaaa", 0), ("zZ09", 1), ("tail", 1)]
    assert stream.section_bodies == {0: BINARY, 3: b"t"}  # only the ones asked for
    listed = stream.summary()["sections"]
    assert listed == [s.to_json() for s in stream.sections]
    for s in stream.sections:  # where the summary says, for a reader with random access
        head = data[s.offset: s.offset + SECTION.size + DIGEST_SIZE]
        body = data[s.offset + SECTION.size + DIGEST_SIZE:][: s.length]
        assert SECTION.unpack(head[:SECTION.size]) == (s.tag.encode(), s.length)
        assert hashlib.sha256(head[:SECTION.size] + body).digest() == head[SECTION.size:]
    assert read_footer(io.BytesIO(data)).summary["sections"] == listed


def test_an_overlay_without_sections_lists_none():
    data = overlay_with_sections({})
    assert "sections" not in read_footer(io.BytesIO(data)).summary


def test_a_rebuild_skips_an_unknown_section(small_pair):
    """The same change with a section in front of its frame rebuilds to the same disk."""
    data = with_section_in_front(small_pair.overlay, b"wset", BINARY)
    assert [e["tag"] for e in read_footer(io.BytesIO(data)).summary["sections"]] == ["wset"]
    base = bases.load_path(small_pair.base_path)
    try:
        report = verify(io.BytesIO(data), base)
    finally:
        base.close()
    assert report.replay.result_digest == small_pair.report.summary["result_digest"]


def with_section_in_front(data: bytes, tag: bytes, body: bytes) -> bytes:
    """A plain overlay rewritten by the writer with an optional section before its frames."""
    stream = OverlayStream(io.BytesIO(data))
    frames = [(f.head, data[f.offset: f.offset + FRAME_HEAD_SIZE + f.head.stored_length])
              for f in stream.frames()]
    assert stream.footer is not None and stream.footer.summary is not None
    out = io.BytesIO()
    w = OverlayWriter(out)
    h = stream.header
    w.write_header({k: v for k, v in h.manifest.items() if k != "feature_names"}, h.incompat,
                   h.compat, h.minor)
    w.write_section(tag, body)
    for (head, blob), entry in zip(frames, stream.footer.index, strict=True):
        w.write_frame(EncodedFrame(head, blob, entry.target_start, entry.target_end))
    w.finish({k: v for k, v in stream.footer.summary.items() if k != "header_digest"})
    return out.getvalue()


def test_a_damaged_section_is_corrupt():
    data = bytearray(overlay_with_sections({1: [(b"wset", BINARY)]}))
    pos = bytes(data).index(b"wset")
    data[pos + 40 + 100] ^= 0x01  # one bit of the body
    with pytest.raises(CorruptError, match="digest"):
        verify(io.BytesIO(bytes(data)))


def test_a_section_declaring_too_much_is_refused_before_reading(h):
    data = bytearray(overlay_with_sections({0: [(b"wset", BINARY)]}))
    pos = bytes(data).index(b"wset")
    struct.pack_into("<I", data, pos + 4, MAX_OPTIONAL + 1)
    head = bytes(data[pos: pos + 8])
    data[pos + 8: pos + 40] = hashlib.sha256(head + bytes(MAX_OPTIONAL + 1)).digest()
    reader = h.GuardedReader(bytes(data), limit=1 << 20)
    with pytest.raises(CorruptError, match="too large"):
        verify(reader)
    assert reader.largest <= 1 << 10


def test_too_many_sections_are_refused():
    many = {0: [(b"wset", b"")] * MAX_OPTIONAL_COUNT}
    assert verify(io.BytesIO(overlay_with_sections(many))).replay.frames == 2
    data = overlay_with_sections(many)
    pos = data.index(FRAME_TAG, len(data) // 100)
    extra = SECTION.pack(b"wset", 0)
    extra += hashlib.sha256(extra).digest()
    with pytest.raises(CorruptError, match="too many|one too many"):
        verify(io.BytesIO(data[:pos] + extra + data[pos:]))
    with pytest.raises(ValueError):
        overlay_with_sections({0: [(b"wset", b"")] * (MAX_OPTIONAL_COUNT + 1)})


def test_sections_the_summary_does_not_list_are_corrupt():
    data = overlay_with_sections({0: [(b"wset", b"body")], 1: [(b"more", b"x")]})
    summary = read_footer(io.BytesIO(data)).summary
    for listed in ([], summary["sections"][:1], summary["sections"][::-1],
                   [summary["sections"][0] | {"length": 5}, summary["sections"][1]],
                   summary["sections"] + [summary["sections"][1]]):
        with pytest.raises(CorruptError, match="sections"):
            verify(io.BytesIO(with_summary(data, summary | {"sections": listed})))


@pytest.mark.parametrize("listed", [{}, [1], [{"tag": "WSET", "offset": 1, "length": 0,
                                                "digest": "sha256:" + "0" * 64}],
                                    [{"tag": "wset", "offset": "1", "length": 0,
                                      "digest": "sha256:" + "0" * 64}]],
                         ids=["object", "number", "critical-tag", "offset-text"])
def test_a_malformed_section_list_is_corrupt(listed, tmp_path):
    data = with_summary(overlay_with_sections({}), {"result_digest": "sha256:" + "0" * 64,
                                                    "sections": listed})
    check_rejected(data)
    path = tmp_path / "crafted.vmo"
    path.write_bytes(data)
    with pytest.raises(CorruptError, match="sections"):
        describe_footer(path)


def describe_footer(path):
    with open(path, "rb") as f:
        header = parse_header(f)
        return check_summary(read_footer(f).summary, header)


def with_summary(data: bytes, summary: dict) -> bytes:
    """A plain overlay with its summary replaced (header digest kept bound), all else fixed."""
    s_off = read_footer(io.BytesIO(data)).summary_offset
    header = parse_header(io.BytesIO(data))
    summary = summary | {"header_digest": header.digest_string}
    body = canonical_json(summary)
    tail = SECTION.pack(SUMMARY_TAG, len(body)) + body
    index_offset = s_off + len(tail)
    old_index = data.index(b"INDX", s_off)
    tail += data[old_index: len(data) - TRAILER.size]
    prefix = TRAILER.pack(TRAILER_MAGIC, s_off, index_offset, s_off + len(tail) + TRAILER.size,
                          bytes(DIGEST_SIZE))[:-DIGEST_SIZE]
    return data[:s_off] + tail + prefix + hashlib.sha256(tail + prefix).digest()


@pytest.mark.parametrize("tag", [b"ABCD", b"Wset", b"a-bc", b"a\0\0\0", b"\xe9abc"])
def test_an_unknown_critical_or_malformed_tag_is_corrupt(tag):
    data = overlay_with_sections({1: [(b"wset", b"body")]})
    pos = data.index(b"wset")
    body = b"body"
    section = tag + struct.pack("<I", len(body))
    section += hashlib.sha256(section + body).digest() + body
    with pytest.raises(CorruptError, match="unexpected bytes"):
        verify(io.BytesIO(data[:pos] + section + data[pos + len(section):]))


def test_sealed_sections_open_only_with_their_key_and_place():
    master, file_id = bytes(range(32)), bytes(16)
    data = overlay_with_sections({0: [(b"wset", BINARY)], 2: [(b"tail", b"t")]},
                                 sealer=lambda hd: Sealer(master, file_id, hd),
                                 manifest=disk_manifest_for(1 << 20) | {"encryption": {}})
    stream = OverlayStream(io.BytesIO(data), keep=frozenset({"wset", "tail"}))
    sealer = Sealer(master, file_id, stream.header.digest)
    for frame in stream.frames():
        decode_payload(frame.head, frame.stored, sealer)
    assert [s.length for s in stream.sections] == [len(BINARY) + 16, 1 + 16]
    assert BINARY not in data  # sealed
    heads = [SECTION.pack(s.tag.encode(), s.length) for s in stream.sections]
    assert sealer.open_section(heads[0], 0, stream.section_bodies[0]) == BINARY
    assert sealer.open_section(heads[1], 1, stream.section_bodies[1]) == b"t"
    with pytest.raises(CorruptError, match="authentication"):  # the ordinal is in the nonce
        sealer.open_section(heads[0], 1, stream.section_bodies[0])
    with pytest.raises(CorruptError, match="authentication"):  # the head is associated data
        sealer.open_section(SECTION.pack(b"wsex", len(BINARY) + 16), 0, stream.section_bodies[0])
    assert stream.summary(sealer)["sections"] == [s.to_json() for s in stream.sections]


# scrypt (SPEC.md 8): what a crafted header may make a reader spend once a passphrase is given

@pytest.mark.parametrize("n,r,p", [(1 << 15, 8, 1), (1 << 18, 8, 1), (1 << 16, 32, 1),
                                   (1 << 15, 8, 16), (2, 1, 1), (1 << 20, 2, 1)],
                         ids=["default", "256MiB", "256MiB-r32", "work-16x", "least", "n-max"])
def test_scrypt_within_the_bounds_is_accepted(n, r, p):
    check_scrypt(n, r, p)
    assert 128 * n * r <= 256 << 20 and n * r * p <= 16 * (1 << 15) * 8


@pytest.mark.parametrize("n,r,p", [
    (1 << 19, 8, 1),  # 512 MiB
    (1 << 17, 32, 1),  # 512 MiB, each within the old per-parameter limits
    (1 << 20, 32, 16),  # the old limits' 4 GiB
    (1 << 16, 8, 16),  # 64 MiB, but 32 times the default's work
    (1 << 18, 8, 3),  # 256 MiB, and 1.5 times the work bound
    (1 << 21, 1, 1), (3 << 10, 8, 1), (1, 8, 1), (1 << 15, 0, 1), (1 << 15, 8, 0),
    (1 << 15, 33, 1), (1 << 15, 8, 17)])
def test_scrypt_beyond_the_bounds_is_unsupported(n, r, p):
    with pytest.raises(UnsupportedError):
        check_scrypt(n, r, p)


def test_scrypt_default_is_what_writers_use():
    assert SCRYPT_DEFAULT == {"n": 1 << 15, "r": 8, "p": 1}
    check_scrypt(**SCRYPT_DEFAULT)


# ------------------------------------------------------------------------------ SPEC.md's examples
# Every ```json block of SPEC.md is tagged with what it shows and the vector it comes from;
# each is checked against the code and that vector, so the examples cannot drift.

SPEC_PATH = Path(__file__).resolve().parents[1] / "formats" / "SPEC.md"
VECTOR_DIR = SPEC_PATH.parent / "vectors"
SPEC_JSON = re.findall(r"^```json([^\n]*)\n(.*?)^```$", SPEC_PATH.read_text(),
                       re.MULTILINE | re.DOTALL)


def spec_examples(kind: str) -> list[tuple[str, object]]:
    return [(info.split()[1], json.loads(body)) for info, body in SPEC_JSON
            if info.split()[0] == kind]


def test_every_spec_json_example_is_tagged_and_checked():
    kinds = {"manifest", "summary", "encryption", "vmem-header", "descriptor", "vector"}
    assert len(SPEC_JSON) >= 7
    for info, body in SPEC_JSON:
        words = info.split()
        assert len(words) == 2 and words[0] in kinds, f"untagged example: ```json{info}"
        assert (VECTOR_DIR / words[1]).is_file(), words[1]
        json.loads(body)  # each is one JSON text
    assert {info.split()[0] for info, _ in SPEC_JSON} == kinds  # each kind is shown


def vector_parts(name: str):
    data = (VECTOR_DIR / name).read_bytes()
    header = parse_header(io.BytesIO(data))
    return data, header, read_footer(io.BytesIO(data), header.encrypted)


@pytest.mark.parametrize("name,example", spec_examples("manifest"))
def test_spec_manifest_example(name, example):
    _, header, _ = vector_parts(name)
    assert example == header.manifest
    manifest = read_manifest(example)  # the engine's checks
    assert manifest.base.digest == example["base"]["digest"]
    assert (manifest.memory is not None) == header.memory


@pytest.mark.parametrize("name,example", spec_examples("summary"))
def test_spec_summary_example(name, example):
    _, header, footer = vector_parts(name)
    assert example == footer.summary
    assert check_summary(example, header) == example
    assert example["header_digest"] == header.digest_string


@pytest.mark.parametrize("name,example", spec_examples("encryption"))
def test_spec_encryption_example(name, example):
    _, header, _ = vector_parts(name)
    assert example == {"encryption": header.manifest["encryption"]}
    kdf = example["encryption"]["kdf"]
    check_scrypt(kdf["n"], kdf["r"], kdf["p"])


@pytest.mark.parametrize("name,example", spec_examples("vmem-header"))
def test_spec_vmem_header_example(name, example):
    with open(VECTOR_DIR / name, "rb") as f:
        head = vmem.read_tail(f, name)
    assert example["digest"] == head.digest and example["state_size"] == head.state_size
    assert example["version"] == vmem.VERSION and example["format"] == vmem.FORMAT
    assert MachineInfo.from_json(example["machine"], "SPEC.md") == head.machine
    assert canonical_json(example) == (VECTOR_DIR / name).read_bytes()[
        head.size: -vmem.TRAILER.size]


@pytest.mark.parametrize("name,example", spec_examples("descriptor"))
def test_spec_descriptor_example(name, example):
    data = (VECTOR_DIR / name).read_bytes()
    assert example == {"digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                       "mediaType": MEDIA_TYPE, "size": len(data)}


@pytest.mark.parametrize("name,example", spec_examples("vector"))
def test_spec_vector_example(name, example):
    doc = json.loads((VECTOR_DIR / "vectors.json").read_text())
    assert example == doc["vectors"][name]


def test_spec_names_the_media_types_and_feature_bits():
    text = SPEC_PATH.read_text()
    assert f"`{MEDIA_TYPE}`" in text and f"`{vmem.MEDIA_TYPE}`" in text
    for bit, name in FEATURE_NAMES["incompat"].items():
        assert f"| {bit.bit_length() - 1} | `{name}` |" in text
