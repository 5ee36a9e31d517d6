"""Reading an overlay back: verify every frame and rebuild (synthesize) the disk it describes.

`replay` is shared by apply (which writes the result) and verify (which only checks it): both
decode frames on worker threads, check every record against the manifest, recompute the
result digest, and compare it with the one create recorded.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

from vmsynth.formats.container import OverlayStream, is_digest
from vmsynth.formats.frames import FrameHead, Record, SolidDecompressor, decode_payload
from vmsynth.formats.layout import MAX_FRAME_RAW, RECORD, Kind, Stream
from vmsynth.formats.seal import Sealer

from .bases import Identity, MemoryIdentity
from .blocks import BLOCK, CHUNK
from .errors import CorruptOverlayError, UnsupportedFormatError
from .hashing import BackgroundHash
from .memory import MachineInfo

WORKERS = 2
LOOKAHEAD = 2  # decoded frames waiting: bounds memory (frames hold up to 4 MiB)


MAX_DISK = 1 << 48  # 256 TiB: beyond any real disk, and what a qcow2 writer can index cheaply
Read = Callable[[int, int], bytes]


@dataclass(frozen=True)
class StreamInfo:
    """One object an overlay rebuilds, and the size of the base object it is diffed against."""

    id: int
    virtual_size: int
    base_size: int
    machine: MachineInfo | None = None  # memory: what the rebuilt snapshot resumes on


@dataclass(frozen=True)
class Manifest:
    base: Identity
    block_size: int
    disk: StreamInfo
    memory: StreamInfo | None

    @property
    def virtual_size(self) -> int:
        return self.disk.virtual_size

    @property
    def streams(self) -> dict[int, StreamInfo]:
        return {s.id: s for s in (self.disk, self.memory) if s is not None}


def _size(value: object, what: str) -> int:
    """A size from the manifest: a true integer in range (no floats, bools or strings)."""
    if type(value) is not int or not 0 <= value <= MAX_DISK:
        raise CorruptOverlayError(f"overlay manifest has an invalid {what}: {str(value)[:40]!r}")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise CorruptOverlayError(f"overlay manifest has an invalid {what}")
    return value


def _digest(value: object, what: str) -> str:
    """A digest string (SPEC.md 12): `sha256:` and 64 lowercase hex digits, nothing else."""
    if not is_digest(value):
        raise CorruptOverlayError(f"overlay manifest has a malformed {what}: "
                                  f"{str(value)[:80]!r}")
    assert isinstance(value, str)
    return value


def read_manifest(manifest: dict) -> Manifest:
    """The manifest's fields that rebuilding needs, each checked for type and range."""
    try:
        streams = {s["kind"]: s for s in manifest["streams"]}
        disk, base = streams["disk"], manifest["base"]
        unknown = set(streams) - {"disk", "memory"}
        if unknown:
            raise UnsupportedFormatError(f"overlay holds streams this vmsynth cannot rebuild: "
                                         f"{sorted(map(str, unknown))}", hint="upgrade vmsynth")
        base_memory = None
        memory = None
        if "memory" in streams:
            mem, base_mem = streams["memory"], base["memory"]
            if not isinstance(base_mem, dict):
                raise TypeError("base.memory")
            base_memory = MemoryIdentity(_size(base_mem["size"], "base memory size"),
                                         _digest(base_mem["digest"], "base memory digest"))
            memory = StreamInfo(_stream_id(mem, Stream.MEMORY),
                                _size(mem["virtual_size"], "memory size"), base_memory.size,
                                MachineInfo.from_json(mem["machine"], "overlay manifest"))
            if memory.virtual_size < memory.machine.ram_size:
                raise CorruptOverlayError("overlay manifest's memory is smaller than its RAM")
        identity = Identity(_text(base["name"], "base name"),
                            _text(base["version"], "base version"),
                            _size(base["virtual_size"], "base size"),
                            _digest(base["digest"], "base digest"), base_memory)
        out = Manifest(identity, _size(manifest["block_size"], "block size"),
                       StreamInfo(_stream_id(disk, Stream.DISK),
                                  _size(disk["virtual_size"], "disk size"),
                                  identity.virtual_size), memory)
    except (KeyError, TypeError) as err:
        raise CorruptOverlayError(f"overlay manifest lacks a required field ({err})") from err
    if out.block_size != BLOCK:
        raise CorruptOverlayError("overlay manifest has an invalid block size")
    return out


def _stream_id(entry: dict, want: Stream) -> int:
    if entry.get("id") != want or type(entry.get("id")) is not int:
        raise CorruptOverlayError(f"overlay manifest: the {want.name.lower()} stream must have "
                                  f"id {int(want)}")
    return int(want)


class Sink(Protocol):
    """Where rebuilt bytes go. `read_result` serves COPY records (earlier result bytes)."""

    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def read_result(self, offset: int, length: int) -> bytes: ...


@dataclass
class Decoded:
    head: FrameHead
    records: list[Record]
    data: list[bytes | memoryview | None]  # bytes of DATA / DELTA records, None for others


def _decode(head: FrameHead, stored: bytes, base_read: Read | None,
            sealer: Sealer | None, solid: SolidDecompressor | None) -> Decoded:
    """Open and check one frame; expand its DATA and DELTA records (`base_read`: the base
    object of the frame's stream, None when checking without a base)."""
    records, area = decode_payload(head, stored, sealer, solid)
    out: list[bytes | memoryview | None] = []
    pos = produced = 0
    for r in records:
        chunk = area[pos: pos + r.stored]  # a view: the rebuilt bytes are not copied here
        pos += r.stored
        if r.kind is Kind.DATA:
            if r.stored != r.length:
                raise CorruptOverlayError(f"frame {head.seq}: data record size mismatch")
            out.append(chunk)
        elif r.kind is Kind.DELTA:
            if base_read is None:  # checking without a base: the frame digest covered it
                out.append(None)
                continue
            produced += r.length  # what a frame's deltas expand to is held in memory: bound it
            if produced > MAX_FRAME_RAW:
                raise CorruptOverlayError(f"frame {head.seq}: delta records expand beyond "
                                          f"{MAX_FRAME_RAW} bytes")
            dictionary = zstandard.ZstdCompressionDict(
                base_read(r.source, r.length), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            try:
                block = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
                    chunk, max_output_size=r.length)
            except zstandard.ZstdError as err:
                raise CorruptOverlayError(f"frame {head.seq}: bad delta record: {err}") from err
            if len(block) != r.length:
                raise CorruptOverlayError(f"frame {head.seq}: delta decodes to the wrong size")
            out.append(block)
        else:
            if r.stored:
                raise CorruptOverlayError(f"frame {head.seq}: {r.kind.name} record carries data")
            out.append(None)
    return Decoded(head, records, out)


def decoded_frames(overlay: OverlayStream, bases: dict[int, Read] | None,
                   sealer: Sealer | None) -> Iterator[Decoded]:
    """Frames decoded on worker threads, yielded in file order."""
    # A solid overlay's frames continue one stream: one worker decodes them in order.
    solid = SolidDecompressor() if overlay.header.solid else None
    with ThreadPoolExecutor(1 if solid else WORKERS,
                            thread_name_prefix="vmsynth-decode") as pool:
        pending: deque = deque()
        try:
            for frame in overlay.frames():
                base_read = bases.get(frame.head.stream) if bases else None
                pending.append(pool.submit(_decode, frame.head, frame.stored, base_read,
                                           sealer, solid))
                while len(pending) > LOOKAHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


@dataclass
class ReplayReport:
    frames: int
    records: int
    changed_bytes: int
    result_digest: str | None  # None when checked without a base


def replay(overlay: OverlayStream, manifest: Manifest, bases: dict[int, Read] | None,
           sinks: dict[int, Sink] | None, progress: Callable[[int], None] | None = None,
           sealer: Sealer | None = None) -> ReplayReport:
    """Check every frame and record; with the base objects, rebuild each stream into its sink.

    `bases` and `sinks` are keyed by stream id (0 disk, 1 memory). Without bases only the
    structure and the frame digests are checked: the result digest needs the base's bytes.
    """
    digests = _ResultDigest()
    try:
        report = _replay(overlay, manifest, bases, sinks, progress, sealer, digests)
    finally:
        digests.close()
    if report.result_digest is None:
        return report
    summary = overlay.summary(sealer)  # sealed: authenticates the frame count
    if report.result_digest != summary["result_digest"]:
        raise CorruptOverlayError("the rebuilt disk's digest does not match the overlay's "
                                  "(wrong base contents, or a damaged overlay)",
                                  hint="check that the base file is intact, and fetch the "
                                       "overlay again")
    return report


def _replay(overlay: OverlayStream, manifest: Manifest, bases: dict[int, Read] | None,
            sinks: dict[int, Sink] | None, progress: Callable[[int], None] | None,
            sealer: Sealer | None, digests: _ResultDigest) -> ReplayReport:
    streams = manifest.streams
    rebuild = bases is not None and sinks is not None
    stream, end = -1, 0  # streams ascend; within one, records ascend without overlap
    frames = records = changed = 0
    ranges = []  # each frame's (first target, end of last record): the index must agree
    for dec in decoded_frames(overlay, bases, sealer):
        rs = dec.records
        ranges.append((rs[0].target, rs[-1].target + rs[-1].length) if rs else (0, 0))
        info = streams.get(dec.head.stream)
        if info is None:
            raise UnsupportedFormatError(f"frame {dec.head.seq} is for a stream the overlay's "
                                         f"manifest does not list ({dec.head.stream})")
        if info.id < stream:
            raise CorruptOverlayError(f"frame {dec.head.seq} goes back to an earlier stream")
        if info.id != stream:
            stream, end = info.id, 0
        digests.begin_frame()
        for r, data in zip(dec.records, dec.data, strict=True):
            where = f"frame {dec.head.seq}: record at {r.target}+{r.length}"
            if r.target < end or r.length <= 0 or r.target + r.length > info.virtual_size:
                raise CorruptOverlayError(f"{where} is out of order or outside its stream")
            if r.kind is Kind.BASE and r.source + r.length > info.base_size:
                raise CorruptOverlayError(f"{where} refers past the end of the base")
            if r.kind in (Kind.DISK, Kind.DISK_COPY) and info.id == Stream.DISK:
                raise CorruptOverlayError(f"{where}: a {r.kind.name} record in a disk frame")
            if r.kind is Kind.DISK and r.source + r.length > manifest.disk.base_size:
                raise CorruptOverlayError(f"{where} refers past the end of the base disk")
            if r.kind is Kind.DISK_COPY and r.source + r.length > manifest.disk.virtual_size:
                raise CorruptOverlayError(f"{where} refers past the end of the rebuilt disk")
            if r.kind is Kind.COPY and r.source + r.length > r.target:
                raise CorruptOverlayError(f"{where} copies from a region not yet rebuilt")
            end = r.target + r.length
            records += 1
            changed += r.length
            if not rebuild:
                continue
            assert sinks is not None and bases is not None
            sink = sinks[info.id]
            digests.update(RECORD.pack(r.kind, 0, r.target, r.length, 0))
            if r.kind is Kind.ZERO:
                sink.zero(r.target, r.length)
            elif r.kind in (Kind.BASE, Kind.DISK, Kind.COPY, Kind.DISK_COPY):
                read = {Kind.BASE: bases[info.id], Kind.DISK: bases[Stream.DISK],
                        Kind.COPY: sink.read_result,
                        Kind.DISK_COPY: sinks[Stream.DISK].read_result}[r.kind]
                # Piece by piece: a huge declared length must not become a huge allocation.
                for pos in range(0, r.length, CHUNK):
                    piece = read(r.source + pos, min(CHUNK, r.length - pos))
                    digests.update(piece)
                    sink.write(r.target + pos, piece)
            else:
                assert data is not None
                digests.update(data)
                sink.write(r.target, data)
        digests.end_frame()
        frames += 1
        if progress:
            progress(dec.head.stored_length)
    assert overlay.footer is not None
    if [(e.target_start, e.target_end) for e in overlay.footer.index] != ranges:
        raise CorruptOverlayError("the overlay's index gives frames target ranges their "
                                  "records do not have")
    if not rebuild:
        overlay.summary(sealer)  # sealed: authenticates the frame count
        return ReplayReport(frames, records, changed, None)
    return ReplayReport(frames, records, changed, "sha256:" + digests.total_hexdigest())


class _ResultDigest(BackgroundHash):
    """The result digest (SPEC.md section 5): the SHA-256 of the frames' own digests,
    each over its records and the bytes they define, hashed beside the rebuild's writes."""

    def __init__(self) -> None:
        super().__init__()
        self.total = hashlib.sha256()

    def begin_frame(self) -> None:
        self.switch(hashlib.sha256())

    def end_frame(self) -> None:
        frame, total = self.current, self.total
        self.then(lambda: total.update(frame.digest()))

    def total_hexdigest(self) -> str:
        self.wait()
        return self.total.hexdigest()
