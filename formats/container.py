"""The overlay container: header, frames, optional sections, summary, index, trailer (SPEC.md
sections 2-6).

`OverlayWriter` writes front to back, so it can write to a pipe. `OverlayStream` reads front
to back too (streaming apply), verifies and skips optional sections it does not know, and
checks, at the end, that the summary, index and trailer agree with what it saw. `read_footer`
reads only the end of a seekable file (inspect, on-demand fetch).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import CorruptError, UnsupportedError, WrongKeyError
from .frames import EncodedFrame, FrameHead, parse_frame_head
from .layout import (
    DIGEST_SIZE,
    DIGEST_STRING,
    FEATURE_NAMES,
    FRAME,
    FRAME_TAG,
    HEADER,
    INDEX_ENTRY,
    INDEX_TAG,
    KNOWN_INCOMPAT,
    MAGIC,
    MAJOR,
    MAX_HEADER,
    MAX_OPTIONAL,
    MAX_OPTIONAL_COUNT,
    MAX_SUMMARY,
    MINOR,
    MINOR_LEGACY_MEMORY,
    OPTIONAL_HEAD_SIZE,
    SECTION,
    SUMMARY_TAG,
    TRAILER,
    TRAILER_MAGIC,
    Incompat,
)
from .seal import TAG_SIZE, Sealer


def canonical_json(value: Any) -> bytes:
    """The one JSON encoding used inside overlays: same value, same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    incompat: int
    compat: int
    manifest: dict[str, Any]
    length: int
    digest: bytes  # SHA-256 of the header: sealed frames are bound to it
    implied: int = 0  # incompat bits a 1.1 file has without setting them (SPEC.md 10)

    @property
    def encrypted(self) -> bool:
        return bool(self.incompat & Incompat.ENCRYPTED)

    @property
    def solid(self) -> bool:
        return bool(self.incompat & Incompat.SOLID)

    @property
    def memory(self) -> bool:
        """May hold a memory stream and DISK / DISK_COPY records."""
        return bool((self.incompat | self.implied) & Incompat.MEMORY)

    @property
    def digest_string(self) -> str:
        return "sha256:" + self.digest.hex()


@dataclass(frozen=True)
class Section:
    """An optional section (SPEC.md 2.1) as read: where it is, and its body when known."""

    tag: str
    offset: int
    length: int  # of the stored body (sealed in an encrypted overlay: with its 16-byte tag)
    digest: bytes

    def to_json(self) -> dict[str, Any]:
        """Its entry in the summary's `sections` list."""
        return {"tag": self.tag, "offset": self.offset, "length": self.length,
                "digest": "sha256:" + self.digest.hex()}


@dataclass(frozen=True)
class IndexEntry:
    offset: int
    stored_length: int
    raw_length: int
    record_count: int
    stream: int
    codec: int
    target_start: int
    target_end: int
    digest: bytes


@dataclass(frozen=True)
class Footer:
    summary: dict[str, Any] | None  # None while sealed: see `open_summary`
    sealed_summary: bytes | None
    index: list[IndexEntry]
    summary_offset: int
    file_length: int


def feature_names(incompat: int, compat: int) -> dict[str, dict[str, str]]:
    """The manifest's `feature_names` for the bits set that this writer knows (SPEC.md 9)."""
    out: dict[str, dict[str, str]] = {}
    for kind, bits in (("incompat", incompat), ("compat", compat)):
        names = {str(bit.bit_length() - 1): name for bit, name in FEATURE_NAMES[kind].items()
                 if bits & bit}
        if names:
            out[kind] = names
    return out


_OPTIONAL_TAG = re.compile(rb"[a-z][A-Za-z0-9]{3}")


class OverlayWriter:
    """Writes one overlay to a binary stream, front to back, never seeking."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._offset = 0
        self._index: list[IndexEntry] = []
        self._sections: list[Section] = []
        self.header_digest = b""

    @property
    def bytes_written(self) -> int:
        return self._offset

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def write_header(self, manifest: dict[str, Any], incompat: int = 0, compat: int = 0,
                     minor: int = MINOR) -> None:
        names = feature_names(incompat, compat)
        if names:  # so that a reader refusing a bit can name it
            manifest = manifest | {"feature_names": names}
        body = canonical_json(manifest)
        length = HEADER.size + len(body) + DIGEST_SIZE
        head = HEADER.pack(MAGIC, MAJOR, minor, length, incompat, compat, len(body), 0) + body
        self.header_digest = hashlib.sha256(head).digest()
        self._write(head + self.header_digest)

    def write_frame(self, frame: EncodedFrame) -> None:
        h = frame.head
        self._index.append(IndexEntry(self._offset, h.stored_length, h.raw_length, h.record_count,
                                      h.stream, h.codec, frame.target_start, frame.target_end,
                                      h.digest))
        self._write(frame.blob)

    def write_section(self, tag: bytes, body: bytes, sealer: Sealer | None = None) -> None:
        """An optional section (SPEC.md 2.1), sealed when the overlay is encrypted."""
        ordinal = len(self._sections)
        size = len(body) + (TAG_SIZE if sealer is not None else 0)
        if not _OPTIONAL_TAG.fullmatch(tag) or size > MAX_OPTIONAL or \
                ordinal >= MAX_OPTIONAL_COUNT:
            raise ValueError(f"not a valid optional section: {tag!r}, {size} bytes, "
                             f"number {ordinal}")
        head = SECTION.pack(tag, size)
        if sealer is not None:
            body = sealer.seal_section(head, ordinal, body)
        digest = hashlib.sha256(head + body).digest()
        self._sections.append(Section(tag.decode(), self._offset, size, digest))
        self._write(head + digest + body)

    def finish(self, summary: dict[str, Any], sealer: Sealer | None = None) -> None:
        # The header's digest binds the header to this body (SPEC.md 5); the section list
        # lets a reader with random access find the sections.
        summary = summary | {"header_digest": "sha256:" + self.header_digest.hex()}
        if self._sections:
            summary["sections"] = [s.to_json() for s in self._sections]
        body = canonical_json(summary)
        if sealer is not None:
            body = sealer.seal_summary(body, len(self._index))
        summary_offset = self._offset
        tail = bytearray(SECTION.pack(SUMMARY_TAG, len(body)) + body)
        index_offset = summary_offset + len(tail)
        tail += SECTION.pack(INDEX_TAG, len(self._index))
        for e in self._index:
            tail += INDEX_ENTRY.pack(e.offset, e.stored_length, e.raw_length, e.record_count,
                                     e.stream, e.codec, 0, e.target_start, e.target_end, e.digest)
        file_length = summary_offset + len(tail) + TRAILER.size
        prefix = TRAILER.pack(TRAILER_MAGIC, summary_offset, index_offset, file_length,
                              bytes(DIGEST_SIZE))[:-DIGEST_SIZE]
        digest = hashlib.sha256(bytes(tail) + prefix).digest()
        self._write(bytes(tail) + prefix + digest)


def _read_exact(stream: BinaryIO, n: int, offset: int, what: str) -> bytes:
    chunks = []
    need = n
    while need:
        chunk = stream.read(need)
        if not chunk:
            raise CorruptError(f"overlay is truncated: {what} at byte {offset} is cut short",
                                      hint="the file was not completely copied; fetch it again")
        chunks.append(chunk)
        need -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_upto(stream: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes: fewer only at the end of the stream (a network read may be short)."""
    chunks, need = [], n
    while need:
        chunk = stream.read(need)
        if not chunk:
            break
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def parse_header(stream: BinaryIO) -> Header:
    first = _read_upto(stream, HEADER.size)
    if len(first) < len(MAGIC) or first[: len(MAGIC)] != MAGIC:
        raise CorruptError("not a vmsynth overlay (bad magic)",
                                  hint="check the file name; overlays are made by `vmsynth create`")
    if len(first) < HEADER.size:
        raise CorruptError("overlay is truncated inside its header")
    _, major, minor, length, incompat, compat, manifest_len, reserved = HEADER.unpack(first)
    if major != MAJOR:
        raise UnsupportedError(
            f"overlay format version {major}.{minor} is not supported (this vmsynth reads {MAJOR}.x)",
            hint="upgrade vmsynth" if major > MAJOR else None)
    if not HEADER.size + DIGEST_SIZE <= length <= MAX_HEADER or \
            manifest_len != length - HEADER.size - DIGEST_SIZE:
        raise CorruptError(f"overlay header declares an impossible length {length}")
    rest = _read_exact(stream, length - HEADER.size, HEADER.size, "the header")
    body, digest = rest[:-DIGEST_SIZE], rest[-DIGEST_SIZE:]
    if hashlib.sha256(first + body).digest() != digest:
        raise CorruptError("overlay header digest mismatch (the header is damaged)")
    # Unknown incompatible bits first: such a file may give reserved fields a meaning.
    unknown = incompat & ~int(KNOWN_INCOMPAT)
    if unknown:
        raise UnsupportedError(f"overlay needs {_describe_bits(unknown, body)}, which this "
                               "vmsynth does not know", hint="upgrade vmsynth")
    if reserved:
        raise CorruptError("overlay header's reserved bytes are not zero")
    manifest = _json_object(body, "manifest")
    implied = 0
    if _lists_memory(manifest) and not incompat & Incompat.MEMORY:
        # 1.1 wrote memory streams without the bit; from 1.2 on the bit must come with them.
        if minor != MINOR_LEGACY_MEMORY:
            raise CorruptError("overlay manifest lists a memory stream, but the header does "
                               "not set the memory feature bit")
        implied = Incompat.MEMORY
    return Header(major, minor, incompat, compat, manifest, length, digest, implied)


def _lists_memory(manifest: dict[str, Any]) -> bool:
    streams = manifest.get("streams")
    return isinstance(streams, list) and any(isinstance(s, dict) and s.get("kind") == "memory"
                                             for s in streams)


_FEATURE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # printable, never a control byte


def _describe_bits(bits: int, manifest: bytes) -> str:
    """'feature 'xyz' (bit 5)', named from the manifest's feature_names when it can be."""
    try:
        names = json.loads(manifest)["feature_names"]["incompat"]
        if not isinstance(names, dict):
            names = {}
    except (ValueError, KeyError, TypeError):
        names = {}
    parts = []
    for bit in range(64):
        if bits >> bit & 1:
            name = names.get(str(bit))
            parts.append(f"'{name}' (bit {bit})" if isinstance(name, str) and
                         _FEATURE_NAME.fullmatch(name) else f"bit {bit}")
    return ("feature " if len(parts) == 1 else "features ") + ", ".join(parts)


def _parse_footer(tail: bytes, summary_offset: int, file_length: int, sealed: bool) -> Footer:
    """Parse summary + index + trailer bytes (`tail` runs from the summary to EOF)."""
    body, trailer = tail[: -TRAILER.size], tail[-TRAILER.size:]
    magic, s_off, i_off, length, digest = TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC:
        raise CorruptError("overlay trailer is missing or damaged (truncated file?)")
    if (s_off, length) != (summary_offset, file_length):
        raise CorruptError("overlay trailer disagrees with the file's layout")
    if hashlib.sha256(body + trailer[:-DIGEST_SIZE]).digest() != digest:
        raise CorruptError("overlay summary/index digest mismatch (the end is damaged)")
    if len(body) < 2 * SECTION.size:
        raise CorruptError("overlay summary and index are cut short")
    tag, summary_len = SECTION.unpack_from(body, 0)
    if tag != SUMMARY_TAG or 2 * SECTION.size + summary_len > len(body) or \
            i_off != s_off + SECTION.size + summary_len:
        raise CorruptError("overlay summary section is malformed")
    summary_bytes = body[SECTION.size: SECTION.size + summary_len]
    summary = None if sealed else _json_object(summary_bytes, "summary")
    pos = SECTION.size + summary_len
    tag, count = SECTION.unpack_from(body, pos)
    pos += SECTION.size
    if tag != INDEX_TAG or pos + count * INDEX_ENTRY.size != len(body):
        raise CorruptError("overlay index section is malformed")
    index = []
    for off, stored, raw, recs, stream, codec, reserved, start, end, dg in \
            INDEX_ENTRY.iter_unpack(body[pos:]):
        if reserved:
            raise CorruptError("an overlay index entry's reserved bytes are not zero")
        index.append(IndexEntry(off, stored, raw, recs, stream, codec, start, end, dg))
    return Footer(summary, summary_bytes if sealed else None, index, summary_offset, file_length)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise CorruptError(f"overlay {what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CorruptError(f"overlay {what} is not a JSON object")
    return value


def open_summary(footer: Footer, sealer: Sealer | None) -> dict[str, Any]:
    """The summary, unsealing it with `sealer` when the overlay is encrypted (unchecked: see
    `check_summary`)."""
    if footer.summary is not None:
        return footer.summary
    assert footer.sealed_summary is not None
    if sealer is None:
        raise WrongKeyError("the overlay's summary is encrypted and no key was given")
    return _json_object(sealer.open_summary(footer.sealed_summary, len(footer.index)), "summary")


def is_digest(value: object) -> bool:
    """A digest string as version 1 writes them: `sha256:` and 64 lowercase hex digits."""
    return isinstance(value, str) and DIGEST_STRING.fullmatch(value) is not None


def check_summary(summary: dict[str, Any], header: Header,
                  sections: list[Section] | None = None) -> dict[str, Any]:
    """Check what the summary says about the rest of the file (SPEC.md 5): its digests are
    well-formed, it belongs to this header, and it lists the optional sections read
    (`sections`; None when they were not read, as with random access)."""
    if not is_digest(summary.get("result_digest")):
        raise CorruptError("overlay summary has no valid result_digest")
    bound = summary.get("header_digest")  # 1.2 writers add it; older files have none
    if bound is not None and not is_digest(bound):
        raise CorruptError("overlay summary has a malformed header_digest")
    if bound is not None and bound != header.digest_string:
        raise CorruptError("overlay summary belongs to another header (a header and body "
                           "from different overlays?)", hint="fetch the overlay again")
    listed = summary.get("sections", [])
    if not isinstance(listed, list) or len(listed) > MAX_OPTIONAL_COUNT or not all(
            isinstance(e, dict) and isinstance(e.get("tag"), str) and
            _OPTIONAL_TAG.fullmatch(e["tag"].encode()) and type(e.get("offset")) is int and
            type(e.get("length")) is int and is_digest(e.get("digest")) for e in listed):
        raise CorruptError("overlay summary has a malformed list of sections")
    if sections is not None and listed != [s.to_json() for s in sections]:
        raise CorruptError("overlay summary's list of optional sections disagrees with the "
                           "sections in the file")
    return summary


def read_footer(f: BinaryIO, sealed: bool = False) -> Footer:
    """Read summary and index from the end of a seekable overlay, without reading frames."""
    size = f.seek(0, 2)
    if size < TRAILER.size:
        raise CorruptError("overlay is truncated (no trailer)")
    f.seek(size - TRAILER.size)
    magic, s_off, _, length, _ = TRAILER.unpack(f.read(TRAILER.size))
    if magic != TRAILER_MAGIC or length != size:
        raise CorruptError("overlay is truncated or has trailing bytes (trailer not found)",
                                  hint="the file was not completely copied; fetch it again")
    if not 0 < s_off < size - TRAILER.size or size - s_off > MAX_SUMMARY + (64 << 20):
        raise CorruptError("overlay trailer points outside the file")
    f.seek(s_off)
    return _parse_footer(f.read(size - s_off), s_off, size, sealed)


@dataclass
class FrameRead:
    head: FrameHead
    stored: bytes
    offset: int


@dataclass
class OverlayStream:
    """Reads an overlay front to back: `header`, then `frames()` (verifying and skipping
    optional sections on the way), then `footer` is set and `summary()` opens it.

    `keep`: tags of optional sections whose stored bodies to keep in `section_bodies` (sealed
    in an encrypted overlay: `Sealer.open_section`); others are verified and dropped.
    """

    stream: BinaryIO
    keep: frozenset[str] = frozenset()
    header: Header = field(init=False)
    footer: Footer | None = field(init=False, default=None)
    sections: list[Section] = field(init=False, default_factory=list)
    section_bodies: dict[int, bytes] = field(init=False, default_factory=dict)  # by ordinal

    def __post_init__(self) -> None:
        self.header = parse_header(self.stream)
        self._offset = self.header.length
        self._summary: dict[str, Any] | None = None

    def frames(self) -> Iterator[FrameRead]:
        seen: list[tuple[int, FrameHead]] = []
        while True:
            tag = _read_exact(self.stream, 4, self._offset, "a section tag")
            if tag == FRAME_TAG:
                rest = _read_exact(self.stream, FRAME.size - 4 + DIGEST_SIZE, self._offset,
                                   "a frame header")
                head = parse_frame_head(tag + rest[: FRAME.size - 4], rest[FRAME.size - 4:])
                if head.seq != len(seen):
                    raise CorruptError(f"frame {len(seen)} is out of order "
                                              f"(found frame {head.seq})")
                offset = self._offset
                stored = _read_exact(self.stream, head.stored_length, offset, f"frame {head.seq}")
                self._offset += FRAME.size + DIGEST_SIZE + head.stored_length
                seen.append((offset, head))
                yield FrameRead(head, stored, offset)
            elif tag == SUMMARY_TAG:
                self.footer = self._read_tail(tag, seen)
                return
            elif _OPTIONAL_TAG.fullmatch(tag):
                self._read_section(tag)
            else:
                raise CorruptError(f"unexpected bytes at offset {self._offset} "
                                          f"(tag {tag!r}): the overlay is damaged")

    def _read_section(self, tag: bytes) -> None:
        """Verify an optional section; keep its body only if asked (SPEC.md 2.1)."""
        offset = self._offset
        rest = _read_exact(self.stream, OPTIONAL_HEAD_SIZE - 4, offset, "a section header")
        (length,) = SECTION.unpack(tag + rest[:4])[1:]
        if length > MAX_OPTIONAL or len(self.sections) >= MAX_OPTIONAL_COUNT:
            raise CorruptError(f"optional section {tag.decode()} at offset {offset} is too "
                               "large, or one too many")
        digest = hashlib.sha256(tag + rest[:4])
        kept = []
        for pos in range(0, length, 1 << 20):  # piece by piece: an unknown one is not held
            piece = _read_exact(self.stream, min(1 << 20, length - pos), offset, "a section")
            digest.update(piece)
            if tag.decode() in self.keep:
                kept.append(piece)
        if digest.digest() != rest[4:]:
            raise CorruptError(f"optional section {tag.decode()} at offset {offset}: digest "
                               "mismatch (the overlay is damaged)")
        if tag.decode() in self.keep:
            self.section_bodies[len(self.sections)] = b"".join(kept)
        self.sections.append(Section(tag.decode(), offset, length, rest[4:]))
        self._offset += OPTIONAL_HEAD_SIZE + length

    def summary(self, sealer: Sealer | None = None) -> dict[str, Any]:
        """The checked summary, once `frames()` is done (opened with `sealer` if sealed)."""
        if self._summary is None:
            assert self.footer is not None, "read the frames first"
            self._summary = check_summary(open_summary(self.footer, sealer), self.header,
                                          self.sections)
        return self._summary

    def _read_tail(self, tag: bytes, seen: list[tuple[int, FrameHead]]) -> Footer:
        start = self._offset
        (summary_len,) = SECTION.unpack(tag + _read_exact(self.stream, 4, start, "summary"))[1:]
        if summary_len > MAX_SUMMARY:
            raise CorruptError("overlay summary declares an impossible size")
        summary = _read_exact(self.stream, summary_len, start, "the summary")
        index_head = _read_exact(self.stream, SECTION.size, start, "the index")
        itag, count = SECTION.unpack(index_head)
        if itag != INDEX_TAG or count != len(seen):
            raise CorruptError(f"overlay index lists {count} frames, the file holds "
                                      f"{len(seen)}")
        entries = _read_exact(self.stream, count * INDEX_ENTRY.size, start, "the index")
        trailer = _read_exact(self.stream, TRAILER.size, start, "the trailer")
        if self.stream.read(1):
            raise CorruptError("overlay has unexpected bytes after its trailer")
        tail = SECTION.pack(tag, summary_len) + summary + index_head + entries + trailer
        footer = _parse_footer(tail, start, start + len(tail), self.header.encrypted)
        if footer.summary is not None:  # plain: checked now, whoever asks for it
            self._summary = check_summary(footer.summary, self.header, self.sections)
        for entry, (offset, head) in zip(footer.index, seen, strict=True):
            if (entry.offset, entry.digest, entry.stored_length, entry.raw_length,
                    entry.record_count, entry.stream, entry.codec) != \
                    (offset, head.digest, head.stored_length, head.raw_length,
                     head.record_count, head.stream, head.codec):
                raise CorruptError(f"overlay index disagrees with frame {head.seq}")
        return footer
