"""Encode and decode frames: a record table plus the data those records carry.

A frame is self-contained: it can be decoded without any other frame, which is what lets
apply stream front to back and lets a reader fetch one frame through the index. The
exception is a solid overlay (incompat bit SOLID): there every frame's payload continues one
zstd stream, so a frame decodes only after the frames before it, in exchange for matches
reaching back across frames (SPEC.md section 4.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import zstandard

from .errors import CorruptError, UnsupportedError
from .layout import (
    FRAME,
    FRAME_ENCRYPTED,
    FRAME_TAG,
    KNOWN_FRAME_FLAGS,
    MAX_FRAME_RAW,
    MAX_FRAME_RECORDS,
    RECORD,
    RECORD_KIND_MAX,
    SOLID_WINDOW_LOG,
    TAG_SIZE,
    Codec,
    Kind,
    Stream,
)
from .seal import Sealer


class Record(NamedTuple):
    kind: Kind
    target: int
    length: int
    source: int = 0
    stored: int = 0  # bytes this record takes from the frame's data area


@dataclass(frozen=True)
class FrameHead:
    stream: int
    codec: int
    flags: int
    seq: int
    record_count: int
    stored_length: int
    raw_length: int
    digest: bytes

    @property
    def packed(self) -> bytes:
        return FRAME.pack(FRAME_TAG, self.stream, self.codec, self.flags, self.seq,
                          self.record_count, self.stored_length, self.raw_length)


@dataclass(frozen=True)
class EncodedFrame:
    head: FrameHead
    blob: bytes  # frame header + digest + stored payload, ready to write
    target_start: int
    target_end: int


class SolidCompressor:
    """The one zstd stream of a solid overlay: each call compresses one frame's payload and
    flushes it to a block boundary, so the frame's bytes decode once the earlier ones have.
    Long-distance matching finds repeats anywhere in the window, not only nearby."""

    def __init__(self, level: int, window_log: int = SOLID_WINDOW_LOG) -> None:
        assert window_log <= SOLID_WINDOW_LOG  # what every reader can hold
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log, enable_ldm=True)
        self._stream = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def compress(self, raw: bytes) -> bytes:
        return self._stream.compress(raw) + self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


EMPTY_BLOCK = b"\0\0\0"  # a zstd block header: not the last block, raw, 0 bytes


class _Dry(Exception):
    """The decoder wants input past the end of the frame it is decoding."""


class _FrameFeed:
    """The solid stream's input, one frame at a time. The decoder pulls input only when it
    has used up what it holds; past the frame's bytes that is an error, not an end of
    input, so the stream stays open for the next frame."""

    def __init__(self) -> None:
        self.pending = b""

    def read(self, _size: int = -1) -> bytes:
        if not self.pending:
            raise _Dry
        data, self.pending = self.pending, b""
        return data


class SolidDecompressor:
    """Reads a solid overlay's zstd stream frame by frame, in file order."""

    def __init__(self) -> None:
        self._feed = _FrameFeed()
        self._started = False  # has the zstd frame header gone in yet?
        self._reader = zstandard.ZstdDecompressor(max_window_size=1 << SOLID_WINDOW_LOG
                                                  ).stream_reader(self._feed)

    def decompress(self, seq: int, stored: bytes, raw_length: int) -> bytes:
        """The frame's payload: exactly `raw_length` bytes, never more held in memory."""
        self._feed.pending = stored
        self._started = self._started or bool(stored)
        parts, size = [], 0
        try:
            try:
                while size < raw_length:
                    part = self._reader.read(raw_length - size)
                    if not part:  # the zstd frame ended: nothing more will come
                        raise _Dry
                    parts.append(part)
                    size += len(part)
            except _Dry:
                raise CorruptError(f"frame {seq}: decompresses to less than the "
                                          f"{raw_length} bytes it declares") from None
            # One byte more, with only an empty block as further input, must find nothing:
            # the decoder may hold input it took but has not yet put out.
            more = b""
            if self._started:  # (before the zstd frame header it would not be a no-op)
                self._feed.pending += EMPTY_BLOCK
                try:
                    more = self._reader.read(1)
                except _Dry:
                    pass
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            raise CorruptError(f"frame {seq}: decompresses to more than the "
                                      f"{raw_length} bytes it declares")
        except zstandard.ZstdError as err:
            raise CorruptError(f"frame {seq}: cannot decompress: {err}") from err


def encode_frame(seq: int, stream: Stream, records: Sequence[Record], data: Sequence[bytes],
                 compressor: zstandard.ZstdCompressor | SolidCompressor | None,
                 sealer: Sealer | None = None) -> EncodedFrame:
    """Pack records and their data; compress unless that does not make it smaller; seal.

    A solid compressor always compresses: its stream has taken the bytes either way."""
    table = b"".join(RECORD.pack(r.kind, r.stored, r.target, r.length, r.source) for r in records)
    raw = table + b"".join(data)
    codec, stored = Codec.STORED, raw
    if compressor is not None:
        packed = compressor.compress(raw)
        if len(packed) < len(raw) or isinstance(compressor, SolidCompressor):
            codec, stored = Codec.ZSTD, packed
    flags = FRAME_ENCRYPTED if sealer else 0
    size = len(stored) + (TAG_SIZE if sealer else 0)
    head_bytes = FRAME.pack(FRAME_TAG, stream, codec, flags, seq, len(records), size, len(raw))
    if sealer:
        stored = sealer.seal_frame(head_bytes, seq, stored)
    digest = hashlib.sha256(head_bytes + stored).digest()
    head = FrameHead(stream, codec, flags, seq, len(records), size, len(raw), digest)
    start = records[0].target if records else 0
    end = records[-1].target + records[-1].length if records else 0
    return EncodedFrame(head, head_bytes + digest + stored, start, end)


def parse_frame_head(head_bytes: bytes, digest: bytes) -> FrameHead:
    """Check a frame header's declared sizes before anything is allocated for it."""
    tag, stream, codec, flags, seq, count, stored, raw = FRAME.unpack(head_bytes)
    if tag != FRAME_TAG:
        raise CorruptError(f"bad frame tag {tag!r}")
    if flags & ~KNOWN_FRAME_FLAGS:
        raise UnsupportedError(f"frame {seq} uses unknown flags {flags:#x}",
                                     hint="upgrade vmsynth to read this overlay")
    if stream not in Stream.__members__.values():
        raise UnsupportedError(f"frame {seq} belongs to unknown stream {stream}")
    if codec not in Codec.__members__.values():
        raise UnsupportedError(f"frame {seq} uses unknown codec {codec}")
    if raw > MAX_FRAME_RAW or count > MAX_FRAME_RECORDS or count * RECORD.size > raw:
        raise CorruptError(f"frame {seq} declares impossible sizes "
                                  f"(raw {raw}, records {count})")
    overhead = TAG_SIZE if flags & FRAME_ENCRYPTED else 0
    if codec == Codec.STORED and stored != raw + overhead:
        raise CorruptError(f"frame {seq}: stored size {stored} does not match raw size "
                                  f"{raw}")
    if stored > raw + (raw >> 7) + 1024:  # more than zstd's worst-case expansion
        raise CorruptError(f"frame {seq} declares a stored size larger than possible")
    return FrameHead(stream, codec, flags, seq, count, stored, raw, digest)


def decode_payload(head: FrameHead, stored: bytes, sealer: Sealer | None = None,
                   solid: SolidDecompressor | None = None) -> tuple[list[Record], memoryview]:
    """Verify the digest, open the seal, decompress, split into records and their data area.

    `sealer` must be given exactly for the frames of an encrypted overlay, `solid` for those
    of a solid one (and then every frame, in file order).
    """
    if hashlib.sha256(head.packed + stored).digest() != head.digest:
        raise CorruptError(f"frame {head.seq}: digest mismatch (the overlay is damaged)")
    if bool(head.flags & FRAME_ENCRYPTED) != (sealer is not None):
        raise CorruptError(f"frame {head.seq} is {'' if sealer is None else 'not '}"
                                  "encrypted, unlike the overlay's header says")
    if sealer is not None:
        stored = sealer.open_frame(head.packed, head.seq, stored)
    if solid is not None:
        if head.codec != Codec.ZSTD:
            raise CorruptError(f"frame {head.seq} of a solid overlay is not compressed")
        raw = solid.decompress(head.seq, stored, head.raw_length)
    elif head.codec == Codec.ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=head.raw_length)
        except zstandard.ZstdError as err:
            raise CorruptError(f"frame {head.seq}: cannot decompress: {err}") from err
    else:
        raw = stored
    if len(raw) != head.raw_length:
        raise CorruptError(f"frame {head.seq}: decompressed to {len(raw)} bytes, "
                                  f"expected {head.raw_length}")
    view = memoryview(raw)
    table_size = head.record_count * RECORD.size
    records = []
    data_total = 0
    for kind, stored_len, target, length, source in RECORD.iter_unpack(view[:table_size]):
        if kind > RECORD_KIND_MAX:  # the three bytes after the kind are reserved: zeros
            raise CorruptError(f"frame {head.seq}: a record's reserved bytes are not zero")
        try:
            kind = Kind(kind)
        except ValueError:
            raise UnsupportedError(f"frame {head.seq}: unknown record kind {kind}") from None
        records.append(Record(kind, target, length, source, stored_len))
        data_total += stored_len
    if data_total != head.raw_length - table_size:
        raise CorruptError(f"frame {head.seq}: records claim {data_total} data bytes, "
                                  f"frame holds {head.raw_length - table_size}")
    return records, view[table_size:]
