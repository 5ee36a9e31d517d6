"""Memory snapshots (.vmem files): capture a running VM's RAM and device state, resume it.

QEMU 7.2 has no mapped-ram, so `vmsynth boot` keeps guest RAM in a file (memory-backend-file,
share=on). A snapshot stops the VM and migrates only its device state (the x-ignore-shared
capability leaves the shared RAM out), then stores the RAM file page for page. A .vmem file
(formats/SPEC.md, section 11):

    [0, ram_size)                  the guest's RAM at its own offsets (holes where zero)
    [ram_size, ram_size+state)     QEMU's device-state migration stream
    header                         canonical JSON: machine, sizes, content digest
    trailer (64 bytes)             magic, header offset and length, header SHA-256

The RAM comes first so that a .vmem can itself back a resumed guest's memory: QEMU maps it
from offset 0 privately (share=off), so resuming never changes the file. The first
ram_size + state bytes are the snapshot's *contents*: what an overlay diffs and rebuilds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vmsynth.formats.container import canonical_json

from .blocks import BLOCK, CHUNK, ZERO_BLOCK, ZERO_CHUNK, is_zero
from .errors import BadInputError, CorruptOverlayError, SnapshotError
from .hashing import BackgroundHash
from .qmp import QMP, QMPError
from .store import Inputs, atomic_path, temp_path, write_error

MAGIC = b"VSMEM\r\n\x01"
TRAILER = struct.Struct("<8sQQ8x32s")  # magic, header offset, header length, header SHA-256
MAX_HEADER = 1 << 20
RAM_ID = "vmsynth.ram"  # the memory-backend object's id in every VM vmsynth starts
MACHINE_FILE = "machine.json"  # written by `vmsynth boot` beside its QMP socket
MIGRATE_TIMEOUT = 300.0


@dataclass(frozen=True)
class MachineInfo:
    """What resuming a snapshot needs from the QEMU that resumes it."""

    machine: str  # versioned machine type, e.g. pc-i440fx-7.2
    cpu: str  # CPU model, e.g. qemu64
    ram_size: int
    qemu_version: str  # major.minor.micro
    cpus: int = 1
    vga: bool = False  # a VGA device (each device's state is in the stream)
    kernel_boot: bool = False  # booted with -kernel: its option ROM is part of the state
    extra_args: tuple[str, ...] = ()  # --qemu-arg values: they may add devices
    accel: str = ""  # informative: what it ran under

    # What must be equal between a base's snapshot and one diffed against it.
    COMPARED = ("ram_size", "machine", "cpu", "qemu_version")

    def mismatch(self, other: MachineInfo) -> str | None:
        """How `other` differs from this one where it matters, or None."""
        for name in self.COMPARED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name.replace('_', ' ')} {theirs} (the base has {mine})"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"extra_args": list(self.extra_args)}

    @classmethod
    def from_json(cls, raw: object, where: str) -> MachineInfo:
        """Parse and type-check (the header may come from anywhere)."""
        types = {"machine": str, "cpu": str, "ram_size": int, "qemu_version": str, "cpus": int,
                 "vga": bool, "kernel_boot": bool, "extra_args": list, "accel": str}
        if not isinstance(raw, dict):
            raise CorruptOverlayError(f"{where}: machine description is malformed")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name)
            if type(value) is not types[f.name] or (isinstance(value, str) and len(value) > 256):
                raise CorruptOverlayError(f"{where}: machine description has an invalid "
                                          f"{f.name}")
            values[f.name] = value
        args = values["extra_args"]
        if len(args) > 64 or not all(isinstance(a, str) and len(a) <= 4096 for a in args):
            raise CorruptOverlayError(f"{where}: machine description has invalid extra_args")
        values["extra_args"] = tuple(args)
        if not 0 < values["ram_size"] <= 1 << 42 or values["ram_size"] % 4096 or \
                not 0 < values["cpus"] <= 256:
            raise CorruptOverlayError(f"{where}: machine description has an invalid size")
        return cls(**values)


@dataclass(frozen=True)
class Vmem:
    """A checked .vmem file's header."""

    path: Path
    machine: MachineInfo
    state_size: int
    digest: str  # "sha256:<hex>" of the contents (RAM, then device state)

    @property
    def ram_size(self) -> int:
        return self.machine.ram_size

    @property
    def size(self) -> int:
        """Bytes of contents: RAM then device state."""
        return self.machine.ram_size + self.state_size


def header_json(machine: MachineInfo, state_size: int, digest: str) -> bytes:
    return canonical_json({"format": "vmsynth-vmem", "version": 1,
                           "machine": machine.to_json(), "state_size": state_size,
                           "digest": digest})


def read_vmem(path: Path) -> Vmem:
    """Open a .vmem and check its trailer and header (not its contents: see `check`).

    Raises:
        BadInputError: missing, or not a memory snapshot.
        CorruptOverlayError: a damaged trailer or header.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size >= TRAILER.size:
                f.seek(size - TRAILER.size)
                magic, h_off, h_len, h_digest = TRAILER.unpack(f.read(TRAILER.size))
            else:
                magic = b""
            if magic != MAGIC:
                raise BadInputError(f"{path}: not a vmsynth memory snapshot",
                                    hint="take one with `vmsynth snapshot` or "
                                         "`vmsynth boot --snapshot-on-exit`")
            if h_len > MAX_HEADER or h_off + h_len != size - TRAILER.size:
                raise CorruptOverlayError(f"{path}: memory snapshot trailer is damaged")
            f.seek(h_off)
            raw = f.read(h_len)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory") from None
    if hashlib.sha256(raw).digest() != h_digest:
        raise CorruptOverlayError(f"{path}: memory snapshot header digest mismatch")
    try:
        head = json.loads(raw)
        machine = MachineInfo.from_json(head["machine"], str(path))
        vmem = Vmem(Path(path), machine, head["state_size"], head["digest"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptOverlayError(f"{path}: memory snapshot header is malformed") from err
    if type(vmem.state_size) is not int or not isinstance(vmem.digest, str) or \
            vmem.size != h_off:
        raise CorruptOverlayError(f"{path}: memory snapshot layout is inconsistent")
    return vmem


class VmemImage:
    """A .vmem's contents as an image (RAM then device state), for diffing and scanning."""

    def __init__(self, vmem: Vmem) -> None:
        self.vmem = vmem
        self.path = vmem.path
        self.virtual_size = vmem.size
        self.fd = os.open(vmem.path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.virtual_size)
        data = os.pread(self.fd, max(0, end - offset), offset) if end > offset else b""
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
        raw = header_json(self.machine, state_size, "sha256:" + self.sha.hexdigest())
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, raw + TRAILER.pack(MAGIC, self.size, len(raw),
                                              hashlib.sha256(raw).digest()), self.size)
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
            raise CorruptOverlayError(f"{vmem.path}: memory snapshot contents are damaged",
                                      hint="take the snapshot again, or rebuild it from its "
                                           "overlay")
    finally:
        image.close()


# -- taking a snapshot ---------------------------------------------------------------------


@functools.cache  # one QEMU per process: asking once is enough
def qemu_version() -> str:
    """This host's QEMU version (major.minor.micro), as a resumed snapshot must match it."""
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return f"{match[1]}.{match[2]}.{match[3] or 0}" if match else "unknown"


def describe_machine(qmp: QMP, launch: dict[str, Any]) -> MachineInfo:
    """The running VM's machine description: QEMU's own answers, plus how vmsynth launched it."""
    try:
        machine = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
        cpus = qmp.execute("query-cpus-fast")
        cpu = str(qmp.execute("qom-get", {"path": cpus[0]["qom-path"], "property": "type"}))
        size = int(qmp.execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "size"}))
        v = qmp.execute("query-version")["qemu"]
    except (QMPError, KeyError, IndexError, TypeError, ValueError) as err:
        raise SnapshotError(f"cannot read the VM's machine description: {err}") from err
    return MachineInfo(machine.removesuffix("-machine"), cpu.removesuffix("-x86_64-cpu"), size,
                       f"{v['major']}.{v['minor']}.{v['micro']}", len(cpus),
                       bool(launch.get("vga")), bool(launch.get("kernel_boot")),
                       tuple(launch.get("extra_args", ())), str(launch.get("accel", "")))


def _wait_migration(qmp: QMP) -> None:
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while True:
        status = qmp.execute("query-migrate")
        state = status.get("status")
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            raise SnapshotError(f"QEMU's migration {state}: "
                                f"{status.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise SnapshotError(f"QEMU's migration did not finish in {MIGRATE_TIMEOUT:.0f} s")
        time.sleep(0.01)


def _ignore_shared(qmp: QMP) -> None:
    qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})


def launch_info(qmp_path: Path) -> dict[str, Any]:
    """What `vmsynth boot` recorded about a VM beside its QMP socket."""
    try:
        info = json.loads((qmp_path.parent / MACHINE_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("ram_file"), str):
        raise SnapshotError(f"{qmp_path}: this VM was not started by `vmsynth boot`, so its "
                            "RAM is not in a file vmsynth can snapshot page by page",
                            hint="boot it with `vmsynth boot`")
    return info


def snapshot(qmp_path: Path, out: Path) -> Vmem:
    """Stop the VM behind `qmp_path`, write its RAM and device state to `out`, then quit it.

    The VM is not resumed: its disk must stay as it was at the snapshot for the two to
    match, so the caller diffs that disk next.

    Raises:
        BadInputError: no such socket.
        SnapshotError: not a vmsynth VM or not QEMU, or QEMU's migration failed.
    """
    if not qmp_path.exists():
        raise BadInputError(f"QMP socket {qmp_path}: no such file",
                            hint="`vmsynth boot` prints its VM's QMP socket")
    launch = launch_info(qmp_path)
    try:
        qmp = QMP(str(qmp_path))
    except QMPError as err:
        raise SnapshotError(f"{qmp_path}: not an answering QEMU QMP socket ({err})") from None
    try:
        return take(qmp, Path(launch["ram_file"]), launch, out)
    finally:
        qmp.close()


def take(qmp: QMP, ram_file: Path, launch: dict[str, Any], out: Path,
         inputs: Inputs | None = None) -> Vmem:
    """Snapshot the VM behind `qmp` (launched as `launch` says) into `out`, then quit it.

    `out` must not be the VM's RAM file or disk, nor any of `inputs`.
    """
    inputs = inputs or Inputs()
    inputs.add("VM's RAM file", ram_file)
    disk = launch.get("disk")
    inputs.add("VM's disk", disk if isinstance(disk, str) else None)
    inputs.check_output("-o/--output", out)  # before the VM is touched
    machine = describe_machine(qmp, launch)
    try:
        shared = qmp.execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "share"})
    except QMPError:
        shared = False
    if not shared or launch.get("resumed"):
        raise SnapshotError("this VM's RAM is not shared with a file (a resumed snapshot maps "
                            "its file privately), so it cannot be snapshotted page by page",
                            hint="snapshot a VM booted with `vmsynth boot`")
    state_file = temp_path(out, "state")
    try:
        qmp.execute("stop")
        _ignore_shared(qmp)
        qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state_file))}"})
        _wait_migration(qmp)
        state = state_file.read_bytes()
    except OSError as err:
        raise write_error(state_file, err) from err
    finally:
        state_file.unlink(missing_ok=True)
    vmem = write_vmem(out, ram_file, machine, state, inputs)
    try:
        qmp.execute("quit")
    except QMPError:
        pass  # it is going away either way
    return vmem


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
                raw = header_json(machine, len(state), "sha256:" + sha.hexdigest())
                dst.truncate(size)
                dst.seek(size)
                dst.write(state + raw + TRAILER.pack(MAGIC, size + len(state), len(raw),
                                                     hashlib.sha256(raw).digest()))
                dst.flush()
                os.fsync(dst.fileno())
        except FileNotFoundError:
            raise SnapshotError(f"the VM's RAM file {ram_file} is gone") from None
    return read_vmem(out)


# -- resuming ------------------------------------------------------------------------------


def check_resumable(vmem: Vmem) -> None:
    """Refuse a snapshot this host's QEMU cannot resume exactly."""
    here = qemu_version()
    if here != vmem.machine.qemu_version:
        raise SnapshotError(f"{vmem.path} was taken with QEMU {vmem.machine.qemu_version}, but "
                            f"this host has QEMU {here}",
                            hint="resume it on a host with the same QEMU version, or boot "
                                 "the disk instead")


def ram_args(ram_file: Path, size: int, machine: str, share: bool) -> list[str]:
    """QEMU arguments that put guest RAM in `ram_file`."""
    path = str(ram_file).replace(",", ",,")
    backend = (f"memory-backend-file,id={RAM_ID},size={size},mem-path={path},"
               f"share={'on' if share else 'off'}")
    return ["-m", f"{size // (1 << 20)}M", "-object", backend,
            "-machine", f"{machine},memory-backend={RAM_ID}"]


def resume(qmp: QMP, vmem: Vmem, rundir: Path) -> float:
    """Feed the device state to a QEMU started with `-incoming defer`, then run the guest.

    Returns the seconds it took.
    """
    started = time.monotonic()
    state = rundir / "state.bin"
    with open(vmem.path, "rb") as f:
        f.seek(vmem.ram_size)
        state.write_bytes(f.read(vmem.state_size))
    _ignore_shared(qmp)
    qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
    try:
        _wait_migration(qmp)
    except SnapshotError as err:
        raise SnapshotError(f"QEMU could not load {vmem.path}'s device state: {err}",
                            hint="resume with the same --kernel and --qemu-arg options the VM "
                                 "was booted with") from None
    qmp.execute("cont")
    return time.monotonic() - started
