"""Create: diff a disk (and a memory snapshot) against its base into an overlay.

The main thread reads and classifies 4 KiB blocks (unchanged, zero, equal to a base block,
equal to a block already in the overlay, or new) and groups records into frames; two worker
threads compress frames (zstandard releases the GIL). Frame boundaries depend only on the
input, never on timing, so the same inputs give the same bytes. The disk stream comes first,
then the memory stream, diffed page by page the same way: against the base's memory at the
same offset, any page of the base's memory or disk, and the memory's own earlier pages.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash
import zstandard

from vmsynth.formats.container import OverlayWriter
from vmsynth.formats.frames import EncodedFrame, Record, SolidCompressor, encode_frame
from vmsynth.formats.layout import (
    RECORD,
    SOLID_WINDOW_LOG,
    Incompat,
    Kind,
    Stream,
)
from vmsynth.formats.seal import Sealer

from . import __version__
from .bases import Base, BlockIndex
from .blocks import BLOCK, CHUNK, ZERO_BLOCK, is_zero
from .errors import BadInputError, BaseMismatchError, DamagedSnapshotError, SnapshotError
from .hashing import BackgroundHash
from .keys import Key, encryption_for_new
from .memory import VmemImage
from .qcow2 import Image, Qcow2Image, changed_ranges

Progress = Callable[[int, int], None]
Read = Callable[[int, int], bytes]
KINDS = ("data", "delta", "zero", "base", "copy", "disk", "disk_copy")

FRAME_DATA = 4 << 20  # new data per frame: 4 MiB frames are ~4% smaller than 1 MiB ones on a
# real Debian pair at the same speed (a wider window) ...
HIGH_LEVEL = 10  # ... but from this level on, zstd's tables for a 4 MiB input take ~100 MB
HIGH_LEVEL_FRAME_DATA = 1 << 20  # per worker: 1 MiB frames keep create's peak under 300 MB
# Solid at high levels: zstd's tables plus a 128 MiB window would pass 300 MB; 64 MiB fits.
HIGH_LEVEL_SOLID_WINDOW_LOG = 26
FRAME_COVER = 8 << 20  # bytes a frame may describe, so references stay cheap to verify
FRAME_RECORDS = 16384
SELF_INDEX_LIMIT = 500_000  # blocks remembered for dedupe within one overlay (~50 MB at most)
DELTA_KEEP = 4  # keep a delta only if it is under a quarter of the block
WORKERS = 2
LOOKAHEAD = 2  # frames queued beyond the workers': bounds memory (4 MiB frames)


@dataclass
class _Item:
    """A record being built, with the bytes it stands for (for the result digest)."""

    kind: Kind
    target: int
    length: int
    source: int = 0
    blocks: list[bytes] = field(default_factory=list)
    base_block: bytes | None = None  # DELTA candidates: the base block at the same offset


def _similar(new: bytes, old: bytes) -> bool:
    """Cheap guess whether `new` is an edit of `old`: some sampled 64-byte slices still match."""
    hits = 0
    for pos in (0, 512, 1024, 1536, 2048, 2560, 3072, 4032):
        if new[pos: pos + 64] == old[pos: pos + 64]:
            hits += 1
    return hits >= 2


def _build_frame(seq: int, stream: Stream, items: list[_Item], level: int,
                 sealer: Sealer | None, solid: SolidCompressor | None
                 ) -> tuple[EncodedFrame, bytes, dict]:
    """Worker: choose DELTA or DATA for candidates, pack, compress, digest the result."""
    compressor = solid or zstandard.ZstdCompressor(level=level)
    records: list[Record] = []
    data: list[bytes] = []
    result = hashlib.sha256()
    stats = dict.fromkeys(KINDS, 0)
    for it in items:
        kind = it.kind
        if kind is Kind.DELTA:
            assert it.base_block is not None
            block = it.blocks[0]
            dictionary = zstandard.ZstdCompressionDict(
                it.base_block, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            delta = zstandard.ZstdCompressor(level=level, dict_data=dictionary,
                                             write_content_size=True).compress(block)
            if len(delta) * DELTA_KEEP <= len(block):
                records.append(Record(Kind.DELTA, it.target, it.length, it.source, len(delta)))
                data.append(delta)
            else:
                kind = Kind.DATA
        # One buffer per record: hashing it is one call that releases the GIL once.
        payload = it.blocks[0] if len(it.blocks) == 1 else b"".join(it.blocks)
        if kind is Kind.DATA:
            records.append(Record(Kind.DATA, it.target, it.length, 0, len(payload)))
            data.append(payload)
        elif kind is not Kind.DELTA:
            records.append(Record(kind, it.target, it.length, it.source, 0))
        result.update(RECORD.pack(records[-1].kind, 0, it.target, it.length, 0))
        result.update(payload)
        stats[kind.name.lower()] += -(-it.length // BLOCK)
    frame = encode_frame(seq, stream, records, data, compressor, sealer)
    return frame, result.digest(), stats


class _FrameQueue:
    """Groups items into frames, hands them to workers, writes results in order."""

    def __init__(self, writer: OverlayWriter, level: int, sealer: Sealer | None,
                 solid: bool) -> None:
        self.writer = writer
        self.level = level
        high = level >= HIGH_LEVEL
        self.frame_data = min(FRAME_DATA, HIGH_LEVEL_FRAME_DATA) if high else FRAME_DATA
        self.sealer = sealer
        # Solid: one stream, so one worker, which takes the frames in order.
        self.solid = SolidCompressor(level, HIGH_LEVEL_SOLID_WINDOW_LOG if high
                                     else SOLID_WINDOW_LOG) if solid else None
        self.pool = ThreadPoolExecutor(1 if solid else WORKERS,
                                       thread_name_prefix="vmsynth-compress")
        self.pending: deque[Future] = deque()
        self.items: list[_Item] = []
        self.data_bytes = self.cover_bytes = 0
        self.seq = 0
        self.stream = Stream.DISK
        self.result_digests = hashlib.sha256()
        self.stats = {s: dict.fromkeys(KINDS, 0) for s in Stream}
        self.raw_bytes = self.stored_bytes = 0

    def add(self, item: _Item) -> None:
        last = self.items[-1] if self.items else None
        # Coalesce runs: contiguous zero, base-copy and self-copy runs become one record.
        if last is not None and last.kind is item.kind and \
                last.target + last.length == item.target and item.kind is not Kind.DELTA and \
                (item.kind in (Kind.ZERO, Kind.DATA) or last.source + last.length == item.source):
            last.length += item.length
            last.blocks.extend(item.blocks)
        else:
            self.items.append(item)
        if item.kind in (Kind.DATA, Kind.DELTA):
            self.data_bytes += item.length
        if item.kind is not Kind.ZERO:
            self.cover_bytes += item.length
        if self.data_bytes >= self.frame_data or self.cover_bytes >= FRAME_COVER or \
                len(self.items) >= FRAME_RECORDS:
            self.flush()

    def begin(self, stream: Stream) -> None:
        """Start the next stream: a frame never mixes two."""
        self.flush()
        self.stream = stream

    def flush(self) -> None:
        if not self.items:
            return
        self.pending.append(self.pool.submit(_build_frame, self.seq, self.stream, self.items,
                                             self.level, self.sealer, self.solid))
        self.seq += 1
        self.items = []
        self.data_bytes = self.cover_bytes = 0
        while len(self.pending) > LOOKAHEAD:
            self._write_one()

    def _write_one(self) -> None:
        frame, digest, stats = self.pending.popleft().result()
        self.writer.write_frame(frame)
        self.result_digests.update(digest)
        for k, v in stats.items():
            self.stats[Stream(frame.head.stream)][k] += v
        self.raw_bytes += frame.head.raw_length
        self.stored_bytes += frame.head.stored_length

    def close(self) -> None:
        self.flush()
        try:
            while self.pending:
                self._write_one()
        finally:
            for fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)


class _OwnBlocks:
    """The blocks a differ found nowhere else, as a lookup for the next stream's differ: a
    page of the page cache often holds a file block the disk stream just stored."""

    def __init__(self, own: dict[int, int]) -> None:
        self.own = own

    def candidates(self, h: int) -> list[int]:
        src = self.own.get(h)
        return [] if src is None else [src]


class _Differ:
    """Classifies the changed blocks of one stream and feeds the frame queue.

    `new` reads the object being diffed, `old` the base object at the same offsets;
    `lookups` are where an identical block may already be: (record kind, index, reader).
    """

    def __init__(self, new: Read, old: Read,
                 lookups: list[tuple[Kind, BlockIndex | _OwnBlocks, Read]],
                 queue: _FrameQueue) -> None:
        self.new, self.old, self.lookups, self.queue = new, old, lookups, queue
        self.own: dict[int, int] = {}  # xxh3 of blocks already in this stream -> target

    def block(self, target: int, new: bytes, old: bytes) -> None:
        n = len(new)
        if new == ZERO_BLOCK or (n < BLOCK and is_zero(new)):
            self.queue.add(_Item(Kind.ZERO, target, n))
            return
        if n == BLOCK:
            h = xxhash.xxh3_64_intdigest(new)
            src = self.own.get(h)
            if src is not None and self.new(src, BLOCK) == new:
                self.queue.add(_Item(Kind.COPY, target, n, src, [new]))
                return
            for kind, index, read in self.lookups:
                for src in index.candidates(h):
                    if read(src, BLOCK) == new:
                        self.queue.add(_Item(kind, target, n, src, [new]))
                        return
            if len(self.own) < SELF_INDEX_LIMIT:
                self.own.setdefault(h, target)
            if old != ZERO_BLOCK and _similar(new, old):
                self.queue.add(_Item(Kind.DELTA, target, n, target, [new], old))
                return
        self.queue.add(_Item(Kind.DATA, target, n, 0, [new]))

    def region(self, start: int, length: int, progress: Callable[[int], None],
               seen: Callable[[bytes], None] | None = None) -> None:
        """Diff [start, start+length); `seen` gets every byte of the new object, in order."""
        end = start + length
        for offset in range(start, end, CHUNK):
            n = min(CHUNK, end - offset)
            new = self.new(offset, n)
            if seen is not None:
                seen(new)
            old = self.old(offset, n)
            if new != old:
                for i in range(0, n, BLOCK):
                    nb, ob = new[i: i + BLOCK], old[i: i + BLOCK]
                    if nb != ob:
                        self.block(offset + i, nb, ob)
            progress(n)


@dataclass
class CreateReport:
    path: str
    fast_path: bool
    scanned_bytes: int
    summary: dict
    overlay_bytes: int


def create(base: Base, disk: Image, out: BinaryIO, level: int = 3,
           progress: Progress | None = None, key: Key | None = None,
           memory: VmemImage | None = None, solid: bool = False) -> CreateReport:
    """Write to `out` an overlay that turns `base` into `disk` (encrypted if `key` is given),
    and, with `memory`, the base's memory snapshot into that one. `solid` compresses all
    frames as one stream: smaller, but one core and no frame decodable on its own.

    Raises:
        BadInputError: the disk is smaller than the base.
        BaseMismatchError: a memory snapshot, and the base has none.
        SnapshotError: the memory snapshot does not fit the base's (RAM size, machine...).
        OSError: writing `out` failed.
    """
    if disk.virtual_size < base.identity.virtual_size:
        raise BadInputError(
            f"{disk.path}: disk ({disk.virtual_size} bytes) is smaller than its base "
            f"({base.identity.virtual_size} bytes); shrinking is not supported",
            hint="an overlay can only grow a disk")
    if memory is not None:
        _check_memory(base, memory)
    ranges = changed_ranges(disk, base.path) if isinstance(disk, Qcow2Image) else None
    fast = ranges is not None
    if ranges is None:
        ranges = [(0, disk.virtual_size)]
    total = sum(n for _, n in ranges) + (memory.virtual_size if memory else 0)
    writer = OverlayWriter(out)
    head = manifest(base, disk.virtual_size, level, memory, solid)
    incompat = Incompat.SOLID if solid else Incompat.NONE
    if memory is not None:
        incompat |= Incompat.MEMORY
    sealer = None
    if key is None:
        writer.write_header(head, incompat=incompat)
    else:
        head["encryption"], master, file_id = encryption_for_new(key)
        writer.write_header(head, incompat=incompat | Incompat.ENCRYPTED)
        sealer = Sealer(master, file_id, writer.header_digest)
    queue = _FrameQueue(writer, level, sealer, solid)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    try:
        differ = _Differ(disk.read, base.image.read,
                         [(Kind.BASE, base.index, base.image.read)], queue)
        for start, length in ranges:
            differ.region(start, length, advance)
        if memory is not None:
            assert base.memory is not None
            queue.begin(Stream.MEMORY)
            mem = base.memory
            differ = _Differ(memory.read, mem.image.read,
                             [(Kind.BASE, mem.index, mem.image.read),
                              (Kind.DISK, base.index, base.image.read),
                              (Kind.DISK_COPY, _OwnBlocks(differ.own), disk.read)], queue)
            # The snapshot is read whole anyway: check it against its own digest on the way,
            # before the overlay is finished (nothing is made from damaged memory).
            contents = BackgroundHash()
            try:
                differ.region(0, memory.virtual_size, advance, contents.update)
                if "sha256:" + contents.hexdigest() != memory.vmem.digest:
                    raise DamagedSnapshotError(f"{memory.path}: memory snapshot contents are "
                                               "damaged (they do not match its digest)",
                                               hint="take the snapshot again")
            finally:
                contents.close()
    finally:
        queue.close()
    summary = {
        "blocks": {k: v for k, v in queue.stats[Stream.DISK].items()
                   if k not in ("disk", "disk_copy")},
        "payload_raw_bytes": queue.raw_bytes,
        "payload_stored_bytes": queue.stored_bytes,
        "frames": queue.seq,
        "result_digest": "sha256:" + queue.result_digests.hexdigest(),
    }
    if memory is not None:
        summary["memory_blocks"] = queue.stats[Stream.MEMORY]
    writer.finish(summary, sealer)
    return CreateReport(str(disk.path), fast, total, summary, writer.bytes_written)


def _check_memory(base: Base, memory: VmemImage) -> None:
    if base.memory is None:
        raise BaseMismatchError(
            f"base {base.identity.label} has no memory snapshot to diff {memory.path} against",
            hint="add the base with its ready-state snapshot: `vmsynth base add IMAGE "
                 "--memory BASE.vmem ...`")
    assert base.memory.identity.machine is not None
    wrong = base.memory.identity.machine.mismatch(memory.vmem.machine)
    if wrong:
        raise SnapshotError(f"{memory.path} does not fit base {base.identity.label}'s memory "
                            f"snapshot: {wrong}",
                            hint="snapshot the VM on the same QEMU, machine type, CPU model "
                                 "and RAM size as the base's snapshot")


def manifest(base: Base, virtual_size: int, level: int, memory: VmemImage | None = None,
             solid: bool = False) -> dict:
    ident = base.identity
    head: dict = {
        "block_size": BLOCK,
        "base": {"name": ident.name, "version": ident.version,
                 "virtual_size": ident.virtual_size, "digest": ident.digest},
        "streams": [{"id": int(Stream.DISK), "kind": "disk", "virtual_size": virtual_size}],
        "compression": {"codec": "zstd", "level": level},
        "created_by": f"vmsynth {__version__}",
    }
    if solid:
        head["compression"]["solid"] = True
    if memory is not None:
        assert ident.memory is not None
        head["base"]["memory"] = {"size": ident.memory.size, "digest": ident.memory.digest}
        head["streams"].append({"id": int(Stream.MEMORY), "kind": "memory",
                                "virtual_size": memory.virtual_size,
                                "machine": memory.vmem.machine.to_json()})
    return head
