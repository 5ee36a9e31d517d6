"""Memory snapshots as images: read a .vmem's contents, rebuild one, check its digest.

The file format (header, trailer, machine description) is the codec's, in
vmsynth.formats.vmem; taking a snapshot of a running VM and resuming one are the VM code's
(vmsynth.snapshot). A `Vmem` is a checked header bound to its file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from vmsynth.formats.errors import CorruptError, UnsupportedError
from vmsynth.formats.vmem import MachineInfo, NotAVmemError, VmemHeader, encode_tail, read_tail

from .blocks import BLOCK, CHUNK, ZERO_BLOCK, ZERO_CHUNK, is_zero
from .errors import BadInputError, DamagedSnapshotError, SnapshotError, UnsupportedFormatError
from .hashing import BackgroundHash
from .store import Inputs, atomic_path, read_error

__all__ = ["MachineInfo", "Vmem", "VmemBuilder", "VmemImage", "check", "open_vmem",
           "read_vmem", "write_sparse", "write_vmem"]


@dataclass(frozen=True)
class Vmem(VmemHeader):
    """A .vmem file whose trailer and header were checked: its header, bound to the file."""

    path: Path

    @property
    def header(self) -> VmemHeader:
        return VmemHeader(self.machine, self.state_size, self.digest)


def read_vmem(path: Path) -> Vmem:
    """Open a .vmem and check its trailer and header (not its contents: see `check`).

    Raises:
        BadInputError: missing, unreadable, or not a memory snapshot.
        DamagedSnapshotError: a damaged trailer or header.
        UnsupportedFormatError: a header version this vmsynth does not know.
    """
    try:
        with open(path, "rb") as f:
            head = read_tail(f, str(path))
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory") from None
    except OSError as err:
        raise read_error(path, err) from None
    except NotAVmemError as err:
        raise BadInputError(str(err), hint="take one with `vmsynth snapshot` or "
                                           "`vmsynth boot --snapshot-on-exit`") from None
    except UnsupportedError as err:
        raise UnsupportedFormatError(str(err), err.hint) from None
    except CorruptError as err:
        raise DamagedSnapshotError(str(err), hint="take the snapshot again, or rebuild it "
                                                  "from its overlay") from None
    return Vmem(head.machine, head.state_size, head.digest, Path(path))


class VmemImage:
    """A .vmem's contents as an image (RAM then device state), for diffing and scanning."""

    def __init__(self, vmem: Vmem) -> None:
        self.vmem = vmem
        self.path = vmem.path
        self.virtual_size = vmem.size
        self.fd = os.open(vmem.path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.virtual_size)
        try:
            data = os.pread(self.fd, max(0, end - offset), offset) if end > offset else b""
        except OSError as err:
            raise read_error(self.path, err) from err
        return data + bytes(length - len(data))  # past the end: zeros

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_vmem(path: Path) -> VmemImage:
    return VmemImage(read_vmem(path))


def write_sparse(fd: int, offset: int, data: bytes | memoryview) -> None:
    """pwrite `data` but leave its zero pages as holes (most of a guest's RAM is zero)."""
    # Compare bytes with bytes (memcmp): comparing a memoryview goes byte by byte in Python's
    # generic buffer code, over a hundred times slower.
    data = bytes(data) if isinstance(data, memoryview) else data
    if is_zero(data):
        return
    view = memoryview(data)
    start = None  # first page of the current run of non-zero pages
    for pos in range(0, len(data), BLOCK):
        page = data[pos: pos + BLOCK]
        zero = page == ZERO_BLOCK or (len(page) < BLOCK and is_zero(page))
        if zero and start is not None:
            os.pwrite(fd, view[start:pos], offset + start)
            start = None
        elif not zero and start is None:
            start = pos
    if start is not None:
        os.pwrite(fd, view[start:], offset + start)


class VmemBuilder:
    """Writes a .vmem front to back: rebuilt bytes, with the base's in every gap between them.

    The records of an overlay's memory stream ascend, so the file is written once, in order,
    and its contents digest is computed on the way. Zero chunks become holes.
    """

    def __init__(self, path: Path, base: VmemImage, machine: MachineInfo, size: int,
                 durable: bool = True) -> None:
        self.path, self.base, self.machine, self.size = path, base, machine, size
        self.durable = durable
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.pos = 0
        self.sha = BackgroundHash()  # the contents digest, beside the writes

    def _put(self, offset: int, data: bytes | memoryview) -> None:
        self.sha.update(data)
        write_sparse(self.fd, offset, data)

    def _fill(self, until: int) -> None:
        """The base's bytes from the current position to `until`."""
        while self.pos < until:
            n = min(CHUNK - self.pos % CHUNK, until - self.pos)
            self._put(self.pos, self.base.read(self.pos, n))
            self.pos += n

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._fill(offset)
        self._put(offset, data)
        self.pos = offset + len(data)

    def zero(self, offset: int, length: int) -> None:
        self._fill(offset)
        for pos in range(offset, offset + length, CHUNK):
            self.sha.update(ZERO_CHUNK[:min(CHUNK, offset + length - pos)])
        self.pos = offset + length

    def read_result(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))  # a trailing hole reads short

    def finish(self) -> Vmem:
        self._fill(self.size)
        state_size = self.size - self.machine.ram_size
        tail = encode_tail(VmemHeader(self.machine, state_size, "sha256:" + self.sha.hexdigest()))
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, tail, self.size)
        if self.durable:
            os.fsync(self.fd)
        self.close()
        return read_vmem(self.path)

    def close(self) -> None:
        self.sha.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def digest_contents(image: VmemImage) -> str:
    sha = BackgroundHash()  # reading and hashing overlap
    try:
        for pos in range(0, image.virtual_size, CHUNK):
            sha.update(image.read(pos, min(CHUNK, image.virtual_size - pos)))
        return "sha256:" + sha.hexdigest()
    finally:
        sha.close()


def check(vmem: Vmem) -> None:
    """Verify a .vmem's contents against its header's digest (reads all of it)."""
    image = VmemImage(vmem)
    try:
        if digest_contents(image) != vmem.digest:
            raise DamagedSnapshotError(f"{vmem.path}: memory snapshot contents are damaged",
                                       hint="take the snapshot again, or rebuild it from its "
                                            "overlay")
    finally:
        image.close()


def write_vmem(out: Path, ram_file: Path, machine: MachineInfo, state: bytes,
               keep: Inputs | None = None) -> Vmem:
    """Assemble a .vmem from a RAM file and a device-state stream (atomically, holes kept)."""
    sha = hashlib.sha256()
    size = machine.ram_size
    # Owner only: a RAM image may hold secrets.
    with atomic_path(out, private=True, keep=keep, announce=True) as tmp:
        try:
            with open(ram_file, "rb") as src, open(tmp, "r+b") as dst:
                for pos in range(0, size, CHUNK):
                    want = min(CHUNK, size - pos)
                    chunk = src.read(want)
                    chunk += bytes(want - len(chunk))
                    sha.update(chunk)
                    write_sparse(dst.fileno(), pos, chunk)
                sha.update(state)
                head = VmemHeader(machine, len(state), "sha256:" + sha.hexdigest())
                dst.truncate(size)
                dst.seek(size)
                dst.write(state + encode_tail(head))
                dst.flush()
                os.fsync(dst.fileno())
        except FileNotFoundError:
            raise SnapshotError(f"the VM's RAM file {ram_file} is gone") from None
    return read_vmem(out)
