"""A reader for qcow2 images (and raw backing files) and a writer of qcow2 child images.

Reading qcow2 ourselves gives the create fast path: the clusters a child allocated are right
there in its L2 tables, so diffing costs what changed, not the size of the disk. Writing the
child ourselves lets apply write each cluster once, sequentially, with no qemu process.
docs: QEMU's docs/interop/qcow2.rst. All qcow2 integers are big-endian.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zstandard

from .errors import BadInputError, UnsupportedFormatError
from .store import read_error

QCOW2_MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # through snapshots_offset (72 bytes)
_HEADER_V3 = struct.Struct(">QQQII")  # incompat, compat, autoclear, refcount_order, header_length
_EXT = struct.Struct(">II")
EXT_END, EXT_BACKING_FORMAT = 0, 0xE2792ACA

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1

UNALLOCATED, ZERO, DATA, COMPRESSED_DATA = range(4)


class Image(Protocol):
    """What the diff and rebuild code needs of a disk: its size and its guest-visible bytes."""

    path: Path
    virtual_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawImage:
    """A raw file seen as a disk (only used as a backing file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.virtual_size = os.fstat(self.fd).st_size
        self.backing: Qcow2Image | RawImage | None = None

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as err:
            raise read_error(self.path, err) from err
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        os.close(self.fd)


class Qcow2Image:
    """Read-only view of a qcow2 image's virtual contents, following its backing chain."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise BadInputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise BadInputError(f"{path}: is a directory, not a disk image") from None
        except OSError as err:
            raise BadInputError(f"{path}: cannot open: {err.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise
        self._l2_cache: dict[int, tuple[int, ...]] = {}
        self._last_compressed: tuple[int, bytes] | None = None
        self._lock = threading.Lock()

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as err:  # EIO and the like: the input's fault, named as such
            raise read_error(self.path, err) from err
        if len(data) != length:
            raise BadInputError(f"{self.path}: truncated qcow2 image (read past end at {offset})",
                                hint="check it with `qemu-img check`")
        return data

    def _parse_header(self) -> None:
        try:
            raw = os.pread(self.fd, 4096, 0)
        except OSError as err:
            raise read_error(self.path, err) from err
        if raw[:4] != QCOW2_MAGIC or len(raw) < _HEADER.size:
            raise BadInputError(f"{self.path}: not a qcow2 image",
                                hint="convert it with `qemu-img convert -O qcow2 IN OUT`")
        (_, version, backing_off, backing_len, self.cluster_bits, self.virtual_size, crypt,
         self.l1_size, self.l1_offset, *_rest) = _HEADER.unpack_from(raw)
        if version not in (2, 3):
            raise UnsupportedFormatError(f"{self.path}: qcow2 version {version} is not supported")
        if crypt:
            raise UnsupportedFormatError(f"{self.path}: encrypted qcow2 images are not supported",
                                         hint="decrypt it with `qemu-img convert` first")
        if not 9 <= self.cluster_bits <= 21:
            raise BadInputError(f"{self.path}: invalid qcow2 cluster size 2^{self.cluster_bits}")
        self.cluster_size = 1 << self.cluster_bits
        self.compression = "zlib"
        header_length = 72
        if version == 3:
            incompat, _, _, _, header_length = _HEADER_V3.unpack_from(raw, _HEADER.size)
            if incompat & INCOMPAT_CORRUPT:
                raise BadInputError(f"{self.path}: qcow2 image is marked corrupt",
                                    hint="repair it with `qemu-img check -r all`")
            if incompat & INCOMPAT_DIRTY:
                raise BadInputError(f"{self.path}: qcow2 image is in use or was not closed cleanly",
                                    hint="stop the VM using it, or run `qemu-img check -r all`")
            if incompat & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2):
                raise UnsupportedFormatError(
                    f"{self.path}: qcow2 external data files and subclusters are not supported",
                    hint="rewrite it with `qemu-img convert -O qcow2 IN OUT`")
            if incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE |
                            INCOMPAT_COMPRESSION | INCOMPAT_EXTL2):
                raise UnsupportedFormatError(f"{self.path}: unknown qcow2 features {incompat:#x}")
            if incompat & INCOMPAT_COMPRESSION and header_length > 104:
                self.compression = {0: "zlib", 1: "zstd"}.get(raw[104], "unknown")
        self.backing: Qcow2Image | RawImage | None = None
        self.backing_name: str | None = None
        if backing_off:
            self.backing_name = self._pread(backing_len, backing_off).decode("utf-8", "replace")
            self.backing = self._open_backing(self._backing_format(raw, header_length))
        self.l1 = struct.unpack(f">{self.l1_size}Q", self._pread(8 * self.l1_size, self.l1_offset))
        self.l2_entries = self.cluster_size // 8

    def _backing_format(self, raw: bytes, pos: int) -> str | None:
        while pos + _EXT.size <= len(raw):
            kind, length = _EXT.unpack_from(raw, pos)
            if kind == EXT_END:
                break
            if kind == EXT_BACKING_FORMAT:
                return raw[pos + 8: pos + 8 + length].decode()
            pos += 8 + (length + 7) // 8 * 8
        return None

    def _open_backing(self, fmt: str | None) -> Qcow2Image | RawImage:
        assert self.backing_name is not None
        if self.backing_name.startswith(("json:", "nbd:", "http")):
            raise UnsupportedFormatError(f"{self.path}: backing file {self.backing_name!r} is not "
                                         "a local file")
        path = Path(self.backing_name)
        if not path.is_absolute():
            path = self.path.parent / path
        if not path.exists():
            raise BadInputError(f"{self.path}: its backing file {path} does not exist")
        if fmt == "raw":
            return RawImage(path)
        return Qcow2Image(path)

    def chain(self) -> list[Qcow2Image | RawImage]:
        """This image and its backing files, top first."""
        out: list[Qcow2Image | RawImage] = []
        node: Qcow2Image | RawImage | None = self
        while node is not None:
            out.append(node)
            node = node.backing
        return out

    def _l2(self, l1_index: int) -> tuple[int, ...] | None:
        table = self._l2_cache.get(l1_index)
        if table is None:
            offset = self.l1[l1_index] & L1_OFFSET_MASK
            if not offset:
                return None
            table = struct.unpack(f">{self.l2_entries}Q", self._pread(self.cluster_size, offset))
            self._l2_cache[l1_index] = table
        return table

    def cluster_state(self, index: int) -> tuple[int, int]:
        """(UNALLOCATED | ZERO | DATA | COMPRESSED_DATA, raw L2 entry) of one cluster."""
        l1_index, l2_index = divmod(index, self.l2_entries)
        if l1_index >= self.l1_size:
            return UNALLOCATED, 0
        table = self._l2(l1_index)
        if table is None:
            return UNALLOCATED, 0
        entry = table[l2_index]
        if entry & COMPRESSED:
            return COMPRESSED_DATA, entry
        if entry & ZERO_FLAG:
            return ZERO, entry
        if entry & L1_OFFSET_MASK:
            return DATA, entry
        return UNALLOCATED, entry

    def _read_compressed(self, entry: int) -> bytes:
        cached = self._last_compressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        x = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
        try:
            blob = os.pread(self.fd, sectors * 512 - (host & 511), host)
        except OSError as err:
            raise read_error(self.path, err) from err
        try:
            if self.compression == "zstd":
                out = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
            else:
                out = zlib.decompressobj(-12).decompress(blob, self.cluster_size)
        except (zlib.error, zstandard.ZstdError) as err:
            raise BadInputError(f"{self.path}: damaged compressed cluster: {err}") from err
        out = out[: self.cluster_size].ljust(self.cluster_size, b"\0")
        self._last_compressed = (entry, out)
        return out

    def read(self, offset: int, length: int) -> bytes:
        """The guest-visible bytes [offset, offset+length); zeros past the end of the disk."""
        parts: list[bytes] = []
        end = offset + length
        cs = self.cluster_size
        pos = offset
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            if pos >= self.virtual_size:
                parts.append(bytes(end - pos))
                break
            n = min(n, self.virtual_size - pos)
            state, entry = self.cluster_state(index)
            if state == DATA:
                host = (entry & L1_OFFSET_MASK) + within
                # Merge runs of clusters stored back to back: one pread instead of many.
                while pos + n < end and (pos + n) % cs == 0 and pos + n < self.virtual_size:
                    s2, e2 = self.cluster_state((pos + n) // cs)
                    if s2 != DATA or (e2 & L1_OFFSET_MASK) != host + n:
                        break
                    n = min(n + cs, end - pos, self.virtual_size - pos)
                parts.append(self._pread(n, host))
            elif state == ZERO:
                parts.append(bytes(n))
            elif state == COMPRESSED_DATA:
                with self._lock:
                    parts.append(self._read_compressed(entry)[within: within + n])
            elif self.backing is not None:
                parts.append(self.backing.read(pos, n))
            else:
                parts.append(bytes(n))
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def allocated_clusters(self) -> list[int]:
        """Indexes of clusters this image itself defines (data or zero), ascending."""
        out = []
        for l1_index in range(self.l1_size):
            table = self._l2(l1_index)
            if table is None:
                continue
            base = l1_index * self.l2_entries
            for i, entry in enumerate(table):
                if entry & (COMPRESSED | ZERO_FLAG | L1_OFFSET_MASK):
                    out.append(base + i)
        return out

    def close(self) -> None:
        for node in self.chain():
            os.close(node.fd)


def changed_ranges(top: Qcow2Image, base_path: Path) -> list[tuple[int, int]] | None:
    """Byte ranges that the layers above `base_path` in top's chain define, merged.

    None when `base_path` is not in top's backing chain (then only a full compare works).
    """
    layers = []
    for node in top.chain():
        if os.path.samefile(node.path, base_path):
            break
        if not isinstance(node, Qcow2Image):
            return None
        layers.append(node)
    else:
        return None
    ranges: list[tuple[int, int]] = []
    for layer in layers:
        cs = layer.cluster_size
        for index in layer.allocated_clusters():
            start = index * cs
            ranges.append((start, min(start + cs, top.virtual_size) - start))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if length <= 0:
            continue
        if merged and start <= merged[-1][0] + merged[-1][1]:
            s, n = merged[-1]
            merged[-1] = (s, max(n, start + length - s))
        else:
            merged.append((start, length))
    return merged


@dataclass
class Qcow2Writer:
    """Writes a qcow2 v3 image cluster by cluster, in one pass; `finish` adds the metadata.

    Data clusters are appended in the order given; clusters never written read from the
    backing file (or as zeros without one).
    """

    path: Path
    virtual_size: int
    backing: str | None = None
    backing_format: str = "qcow2"
    cluster_bits: int = 16
    durable: bool = True  # fsync at the end (False: a throw-away session's disk)

    def __post_init__(self) -> None:
        self.cluster_size = 1 << self.cluster_bits
        self._file = open(self.path, "w+b")  # noqa: SIM115 (closed by finish/abort)
        self._file.write(bytes(self.cluster_size))  # header cluster, filled in by finish
        self._next = 1
        self._map: dict[int, int] = {}  # guest cluster -> host offset, or ZERO_FLAG

    def write_cluster(self, index: int, data: bytes) -> None:
        if len(data) < self.cluster_size:
            data = data + bytes(self.cluster_size - len(data))
        self._file.write(data)
        self._map[index] = self._next << self.cluster_bits
        self._next += 1

    def write_clusters(self, index: int, data: bytes | memoryview) -> None:
        """Whole clusters `index`, `index + 1`, ... from `data`, in one write call."""
        count = len(data) >> self.cluster_bits
        assert count << self.cluster_bits == len(data)
        self._file.write(data)
        for i in range(count):
            self._map[index + i] = (self._next + i) << self.cluster_bits
        self._next += count

    def zero_cluster(self, index: int) -> None:
        self._map[index] = ZERO_FLAG

    def read_cluster(self, index: int) -> bytes | None:
        """A cluster this writer already wrote (None if it did not)."""
        host = self._map.get(index)
        if host is None or host == ZERO_FLAG:
            return None if host is None else bytes(self.cluster_size)
        self._file.flush()
        return os.pread(self._file.fileno(), self.cluster_size, host)

    def finish(self) -> None:
        cs, bits = self.cluster_size, self.cluster_bits
        l2_entries = cs // 8
        clusters = -(-self.virtual_size // cs)
        l1_size = max(1, -(-clusters // l2_entries))
        l1 = [0] * l1_size
        tables: dict[int, list[int]] = {}
        for index, host in self._map.items():
            table = tables.setdefault(index // l2_entries, [0] * l2_entries)
            table[index % l2_entries] = host if host == ZERO_FLAG else host | COPIED
        f = self._file
        for l1_index in sorted(tables):
            l1[l1_index] = (self._next << bits) | COPIED
            f.write(struct.pack(f">{l2_entries}Q", *tables[l1_index]))
            self._next += 1
        l1_offset = self._next << bits
        l1_clusters = -(-(8 * l1_size) // cs)
        f.write(struct.pack(f">{l1_size}Q", *l1).ljust(l1_clusters * cs, b"\0"))
        self._next += l1_clusters
        # Refcount blocks must count themselves and the table: grow until it all fits.
        per_block = cs // 2  # 16-bit refcounts
        blocks = table_clusters = 1
        while True:
            total = self._next + table_clusters + blocks
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // cs)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        table_offset = self._next << bits
        first_block = self._next + table_clusters
        table = [(first_block + i) << bits for i in range(blocks)]
        f.write(struct.pack(f">{len(table)}Q", *table).ljust(table_clusters * cs, b"\0"))
        counts = bytearray(blocks * cs)
        struct.pack_into(f">{total}H", counts, 0, *([1] * total))
        f.write(counts)
        f.seek(0)
        f.write(self._header(l1_size, l1_offset, table_offset, table_clusters))
        f.flush()
        if self.durable:
            os.fsync(f.fileno())
        f.close()

    def _header(self, l1_size: int, l1_offset: int, rc_offset: int, rc_clusters: int) -> bytes:
        exts = b""
        if self.backing is not None:
            fmt = self.backing_format.encode()
            exts += _EXT.pack(EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust((len(fmt) + 7) // 8 * 8,
                                                                         b"\0")
        exts += _EXT.pack(EXT_END, 0)
        header_length = 104
        name = self.backing.encode() if self.backing is not None else b""
        name_offset = header_length + len(exts) if name else 0
        head = _HEADER.pack(QCOW2_MAGIC, 3, name_offset, len(name), self.cluster_bits,
                            self.virtual_size, 0, l1_size, l1_offset, rc_offset, rc_clusters, 0, 0)
        head += _HEADER_V3.pack(0, 0, 0, 4, header_length)
        out = head + exts + name
        if len(out) > self.cluster_size:
            raise BadInputError("backing file path is too long for a qcow2 header")
        return out

    def abort(self) -> None:
        self._file.close()
