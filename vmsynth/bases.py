"""Base images: their identity, their block index, and the local base cache.

A base's identity is what an overlay is bound to: name, version, virtual size and the SHA-256
of its virtual contents (the same as `qemu-img convert -O raw BASE - | sha256sum`). Computing
it reads the whole base once; the result and the block index are cached in $VMSYNTH_HOME,
keyed by the file's path and stat, so later commands cost nothing for an unchanged base.
A base may also carry a memory snapshot of its VM in a ready state (a .vmem): its contents
digest and machine description are then part of the identity, and its pages are indexed too.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import xxhash

from .blocks import BLOCK, CHUNK, ZERO_BLOCK, is_zero
from .errors import (
    BadInputError,
    BaseMismatchError,
    BusyError,
    DamagedSnapshotError,
    DigestMismatchError,
    UsageError,
    VmsynthError,
    WriteError,
)
from .memory import MachineInfo, VmemImage, open_vmem
from .qcow2 import Image, Qcow2Image
from .store import write_atomic

Progress = Callable[[int, int], None]
INDEX_MAGIC = b"VSBIDX01"


def home() -> Path:
    env = os.environ.get("VMSYNTH_HOME")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vmsynth"


def cache_dir(sub: str) -> Path:
    """$VMSYNTH_HOME/`sub`, made if needed.

    Raises:
        BadInputError: $VMSYNTH_HOME is a file or a dangling symlink.
        WriteError: it cannot be created or written.
    """
    root = home()
    folder = root / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_dir():
            return folder
    except (FileExistsError, NotADirectoryError):
        pass
    except OSError as err:
        raise WriteError(f"the vmsynth cache {root}: cannot create {folder}: {err.strerror}",
                         hint="set VMSYNTH_HOME to a directory you can write") from None
    if root.is_symlink() and not root.exists():
        why = f"a symlink to {os.readlink(root)}, which does not exist"
    else:
        why = "not a directory"
    raise BadInputError(f"the vmsynth cache {root} is {why}",
                        hint="set VMSYNTH_HOME to a directory (or remove what is there)")


@dataclass(frozen=True)
class MemoryIdentity:
    size: int  # bytes of contents: RAM, then device state
    digest: str  # "sha256:<hex>" of those contents
    machine: MachineInfo | None = None  # None where only the digest is known (a manifest)


@dataclass(frozen=True)
class Identity:
    name: str
    version: str
    virtual_size: int
    digest: str  # "sha256:<hex>" of the virtual contents
    memory: MemoryIdentity | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


class BlockIndex:
    """xxh3-64 of every non-zero 4 KiB block of a base, sorted, for dedupe against the base.

    Two flat arrays (16 bytes per block) searched with bisect: no per-entry Python objects,
    so an 8 GiB base costs at most 32 MiB here.
    """

    def __init__(self, hashes: array, offsets: array) -> None:
        self.hashes = hashes
        self.offsets = offsets

    def candidates(self, h: int) -> list[int]:
        i = bisect.bisect_left(self.hashes, h)
        out = []
        while i < len(self.hashes) and self.hashes[i] == h:
            out.append(self.offsets[i])
            i += 1
        return out

    def to_bytes(self) -> bytes:
        count = len(self.hashes).to_bytes(8, "little")
        return INDEX_MAGIC + count + self.hashes.tobytes() + self.offsets.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlockIndex:
        if raw[:8] != INDEX_MAGIC:
            raise ValueError("bad index magic")
        n = int.from_bytes(raw[8:16], "little")
        if len(raw) != 16 + 16 * n:
            raise ValueError("bad index length")
        hashes, offsets = array("Q"), array("Q")
        hashes.frombytes(raw[16: 16 + 8 * n])
        offsets.frombytes(raw[16 + 8 * n:])
        return cls(hashes, offsets)


def scan(image: Image, progress: Progress | None = None) -> tuple[str, BlockIndex]:
    """Read a base once: the digest of its virtual contents and its block index."""
    sha = hashlib.sha256()
    # 256 buckets by the hash's top byte: the final sort then never holds more than 1/256
    # of the entries as Python objects, so scanning a huge base stays small in memory.
    bucket_h = [array("Q") for _ in range(256)]
    bucket_o = [array("Q") for _ in range(256)]
    size = image.virtual_size
    for offset in range(0, size, CHUNK):
        chunk = image.read(offset, min(CHUNK, size - offset))
        sha.update(chunk)
        if not is_zero(chunk):
            for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
                block = chunk[i: i + BLOCK]
                if block != ZERO_BLOCK:
                    h = xxhash.xxh3_64_intdigest(block)
                    bucket_h[h >> 56].append(h)
                    bucket_o[h >> 56].append(offset + i)
        if progress:
            progress(min(offset + CHUNK, size), size)
    hashes, offsets = array("Q"), array("Q")
    for bh, bo in zip(bucket_h, bucket_o, strict=True):
        for h, o in sorted(zip(bh, bo)):
            hashes.append(h)
            offsets.append(o)
    return "sha256:" + sha.hexdigest(), BlockIndex(hashes, offsets)


@dataclass
class BaseMemory:
    """A base's memory snapshot, ready for use."""

    image: VmemImage
    identity: MemoryIdentity
    index: BlockIndex

    @property
    def path(self) -> Path:
        return self.image.path


@dataclass(frozen=True)
class BootConfig:
    """How a VM of this base starts, recorded at `base add` so that `run` and the cloudlet
    need nothing but the overlay: a direct-boot kernel, initrd and command line (which a
    resumed snapshot of a kernel-booted VM needs again), RAM and vCPUs for a boot, and the
    serial text that means a booted VM is ready."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    memory: str | None = None  # QEMU -m syntax, e.g. 1G
    cpus: int | None = None
    ready: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()
                if v is not None}


@dataclass
class Base:
    """A base ready for use: its image, identity and block index (and memory, if any)."""

    path: Path
    image: Image
    identity: Identity
    index: BlockIndex
    memory: BaseMemory | None = None
    lock: int | None = None  # fd holding a shared lock on the cache entry, if any
    boot: BootConfig = BootConfig()

    def close(self) -> None:
        self.image.close()
        if self.memory is not None:
            self.memory.image.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def check_matches(self, want: Identity) -> None:
        """Refuse unless this base's contents are the ones an overlay was made for."""
        if want.digest != self.identity.digest or \
                want.virtual_size != self.identity.virtual_size:
            raise BaseMismatchError(
                f"overlay was made for base {want.label} ({want.digest[:19]}...), but "
                f"{self.identity.label} ({self.identity.digest[:19]}...) has different contents",
                hint=f"apply it on {want.label}: `vmsynth base list` shows the cached bases")
        if want.memory is None:
            return
        mine = self.identity.memory
        if mine is None:
            raise BaseMismatchError(
                f"overlay holds a memory snapshot, but base {self.identity.label} has none",
                hint="add the base with its ready-state snapshot: `vmsynth base add IMAGE "
                     "--memory BASE.vmem ...`")
        if (mine.digest, mine.size) != (want.memory.digest, want.memory.size):
            raise BaseMismatchError(
                f"overlay was made for another memory snapshot of base {want.label} "
                f"({want.memory.digest[:19]}...) than {self.identity.label}'s "
                f"({mine.digest[:19]}...)",
                hint="add the base with the snapshot the overlay was made against")


def _stat_key(path: Path) -> tuple[str, dict[str, int]]:
    st = path.stat()
    stat = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps([str(path), stat]).encode()).hexdigest()[:32]
    return key, stat


def _open_checked(path: Path) -> Qcow2Image:
    image = Qcow2Image(path)
    if image.backing is not None:
        image.close()
        raise BadInputError(f"{path}: a base must be a standalone image, but this one is a child "
                            f"of {image.backing_name}",
                            hint="flatten it first: `qemu-img convert -O qcow2 CHILD BASE`")
    return image


def _scan_cached(image: Image, path: Path, progress: Progress | None) -> tuple[str, BlockIndex]:
    """`scan`, cached in $VMSYNTH_HOME/scans by the file's path and stat."""
    key, _ = _stat_key(path)
    scans = home() / "scans"
    meta_file, index_file = scans / f"{key}.json", scans / f"{key}.idx"
    try:
        meta = json.loads(meta_file.read_text())
        index = BlockIndex.from_bytes(index_file.read_bytes())
        digest = meta["digest"]
        if not isinstance(digest, str):
            raise TypeError("digest")
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: scan again
        digest, index = scan(image, progress)
        try:
            cache_dir("scans")
            write_atomic(index_file, index.to_bytes())
            write_atomic(meta_file, json.dumps({"path": str(path), "digest": digest}).encode())
        except VmsynthError:
            pass  # a read-only cache only costs the next command a rescan
    return digest, index


def load_memory(path: Path, progress: Progress | None = None) -> BaseMemory:
    """Open a base's memory snapshot, checking its contents against its header once."""
    path = Path(path).resolve()
    image = open_vmem(path)
    try:
        digest, index = _scan_cached(image, path, progress)
        if digest != image.vmem.digest:
            raise DamagedSnapshotError(f"{path}: memory snapshot contents are damaged "
                                      "(digest mismatch)",
                                      hint="take the base's snapshot again")
    except BaseException:
        image.close()
        raise
    return BaseMemory(image, MemoryIdentity(image.virtual_size, digest, image.vmem.machine),
                      index)


def load_path(path: Path, name: str | None = None, version: str = "",
              progress: Progress | None = None, memory: Path | None = None) -> Base:
    """Open a base by path, scanning it once and caching the scan keyed by path and stat."""
    path = Path(path).resolve()
    image = _open_checked(path)
    try:
        digest, index = _scan_cached(image, path, progress)
        mem = load_memory(memory, progress) if memory is not None else None
    except BaseException:
        image.close()
        raise
    identity = Identity(name or path.name, version, image.virtual_size, digest,
                        mem.identity if mem else None)
    return Base(path, image, identity, index, mem)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _entry_file(name: str, version: str) -> Path:
    for part in (name, version):
        if not _NAME.fullmatch(part):
            shown = part if len(part) <= 40 else part[:40] + "..."
            raise UsageError(f"invalid base name or version {shown!r}",
                             hint="use up to 100 letters, digits and . _ + -, starting with a "
                                  "letter or digit")
    return home() / "bases" / f"{name}@{version}.json"


def _lock(entry: Path, exclusive: bool, what: str) -> int:
    """Lock a cache entry: shared while a base is in use, exclusive to change or remove it.

    flock locks vanish with their process, so a killed vmsynth never leaves one behind.
    """
    cache_dir("bases")
    try:
        fd = os.open(entry.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(f"{entry.with_suffix('.lock')}: cannot open the base's lock: "
                         f"{err.strerror}",
                         hint="set VMSYNTH_HOME to a directory you can write") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BusyError(f"base {entry.stem} is {what}",
                        hint="wait for the other vmsynth command to finish") from None
    return fd


def add(path: Path, name: str, version: str, progress: Progress | None = None,
        memory: Path | None = None, boot: BootConfig = BootConfig(),
        expect: Identity | None = None, origin: dict[str, str] | None = None,
        locked: bool = False) -> Base:
    """Record a base in the cache (the image stays where it is; the cache keeps its identity).

    `memory`: the base VM's memory snapshot in a ready state, which overlays with memory
    are diffed against. `boot`: how its VMs start (the kernel and initrd, like the image,
    must not change afterwards). `expect`: the identity the files must have (a base pulled
    from a registry): no entry is written otherwise. `origin`: where a pulled base came
    from, and the folder of its files (removed with the entry). `locked`: the caller holds
    the entry's lock (`changing`).

    Raises:
        DigestMismatchError: the contents are not `expect`.
    """
    entry = _entry_file(name, version)
    boot = _absolute(boot)
    for what, file in (("kernel", boot.kernel), ("initrd", boot.initrd)):
        if file is not None and not file.is_file():
            raise BadInputError(f"{what} {file}: no such file")
    lock = None if locked else _lock(entry, exclusive=True,
                                     what="in use by another vmsynth process")
    try:
        base = load_path(path, name, version, progress, memory)
        if expect is not None:
            _check_expected(base, expect)
        base.boot = boot
        _, stat = _stat_key(base.path)
        record = asdict(base.identity) | {"path": str(base.path), "stat": stat}
        if base.memory is not None:
            record["memory"] |= {"path": str(base.memory.path),
                                 "stat": _stat_key(base.memory.path)[1]}
        record["boot"] = boot.to_json() | {
            f"{what}_stat": _stat_key(file)[1]
            for what, file in (("kernel", boot.kernel), ("initrd", boot.initrd)) if file}
        if origin is not None:
            record["origin"] = origin
        write_atomic(entry, json.dumps(record, indent=2).encode())
    finally:
        if lock is not None:
            os.close(lock)
    return base


def _check_expected(base: Base, want: Identity) -> None:
    got = base.identity
    mine = (got.memory.size, got.memory.digest) if got.memory else None
    theirs = (want.memory.size, want.memory.digest) if want.memory else None
    if (got.virtual_size, got.digest, mine) != (want.virtual_size, want.digest, theirs):
        base.close()
        raise DigestMismatchError(
            f"base {want.label}: its files are not the base it was published as (contents "
            f"{got.digest[:19]}..., published {want.digest[:19]}...)",
            hint="nothing was added; the published base is damaged: push it again")


@contextlib.contextmanager
def changing(name: str, version: str) -> Iterator[Path]:
    """Hold NAME@VERSION's entry locked (exclusive) while it is installed or removed;
    yields the entry's path.

    Raises:
        BusyError: another vmsynth process uses or changes it.
    """
    entry = _entry_file(name, version)
    lock = _lock(entry, exclusive=True, what="in use by another vmsynth process")
    try:
        yield entry
    finally:
        os.close(lock)


def images() -> Path:
    """Where bases pulled from a registry keep their files: one folder per NAME@VERSION."""
    return cache_dir("images")


def find(digest: str, virtual_size: int, memory_digest: str | None = None
         ) -> dict[str, Any] | None:
    """A cached base with this identity (and this memory snapshot, when given), if any."""
    for e in entries():
        mem = e.get("memory")
        if "damaged" in e or (e.get("digest"), e.get("virtual_size")) != (digest, virtual_size):
            continue
        if memory_digest is None or (isinstance(mem, dict) and
                                     mem.get("digest") == memory_digest):
            return e
    return None


def _absolute(boot: BootConfig) -> BootConfig:
    return replace(boot, kernel=boot.kernel.resolve() if boot.kernel else None,
                   initrd=boot.initrd.resolve() if boot.initrd else None)


def _boot_config(spec: str, raw: object) -> BootConfig:
    """An entry's boot settings, its kernel and initrd checked as unchanged since `add`."""
    if raw is None:
        return BootConfig()
    _need(raw, {})
    assert isinstance(raw, dict)
    types = {"kernel": str, "initrd": str, "append": str, "memory": str, "cpus": int,
             "ready": str}
    values = {k: raw[k] for k in types if raw.get(k) is not None}
    if any(type(v) is not types[k] for k, v in values.items()):
        raise TypeError("a boot setting has the wrong type")
    for what in ("kernel", "initrd"):
        if what in values:
            file = Path(values[what])
            _check_unchanged(spec, file, raw.get(f"{what}_stat"))
            values[what] = file
    return BootConfig(**values)


def _check_unchanged(spec: str, path: Path, stat: object) -> None:
    if not path.exists():
        raise BadInputError(f"base {spec}: its file {path} is gone",
                            hint=f"restore it, or `vmsynth base rm {spec}`")
    if _stat_key(path)[1] != stat:
        raise BaseMismatchError(f"base {spec}: {path} changed since it was added",
                                hint="a base must never change; add the new file as a new "
                                     "version with `vmsynth base add`")


_STAT_FIELDS = ("dev", "ino", "size", "mtime_ns")


def _read_entry(entry: Path) -> dict[str, Any]:
    """A cache entry, checked field by field (a damaged one is reported, never half-used).

    Raises:
        BadInputError: the entry is damaged.
        FileNotFoundError: there is no such entry.
    """
    spec = entry.stem
    try:
        record = json.loads(entry.read_bytes().decode("utf-8"))
        _need(record, {"name": str, "version": str, "path": str, "digest": str,
                       "virtual_size": int, "stat": dict})
        _need(record["stat"], dict.fromkeys(_STAT_FIELDS, int))
        memory = record.get("memory")
        if memory is not None:
            _need(memory, {"path": str, "digest": str, "size": int, "stat": dict})
            _need(memory["stat"], dict.fromkeys(_STAT_FIELDS, int))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError) as err:
        why = err.strerror if isinstance(err, OSError) else str(err) or type(err).__name__
        raise BadInputError(f"base cache entry {entry} is damaged ({why})",
                            hint=f"`vmsynth base rm {spec}`, then add the base again with "
                                 "`vmsynth base add`") from None
    return record


def _need(record: object, fields: dict[str, type]) -> None:
    if not isinstance(record, dict):
        raise TypeError(f"a {type(record).__name__} where an object belongs")
    for name, kind in fields.items():
        if type(record.get(name)) is not kind:
            raise TypeError(f"field {name!r} is missing or not a {kind.__name__}")


def entries() -> list[dict[str, Any]]:
    """Every cached base; a damaged entry appears with its name and a `damaged` reason."""
    folder = home() / "bases"
    out: list[dict[str, Any]] = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(_read_entry(f))
        except FileNotFoundError:
            continue  # removed meanwhile
        except BadInputError as err:
            name, _, version = f.stem.partition("@")
            out.append({"name": name, "version": version, "damaged": str(err),
                        "hint": err.hint})
    return out


def remove(name: str, version: str) -> None:
    """Forget a base; refused while another vmsynth process uses it."""
    entry = _entry_file(name, version)
    if not entry.exists():
        raise BaseMismatchError(f"no base {name}@{version} in the cache ({home()})",
                                hint="`vmsynth base list` shows what is there")
    lock = _lock(entry, exclusive=True, what="in use by another vmsynth process; not removed")
    try:
        _remove_locked(entry)
    finally:
        os.close(lock)


def _remove_locked(entry: Path) -> None:
    """Remove an entry (its lock held), and the files of a pulled base with it: those live
    in the cache's images folder and belong to no one else."""
    folder = None
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        origin = json.loads(entry.read_bytes()).get("origin")
        folder = Path(origin["dir"]) if isinstance(origin, dict) else None
    entry.unlink(missing_ok=True)
    if folder is not None and folder.parent == home() / "images" and \
            folder.name == entry.stem and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


def remove_locked(name: str, version: str) -> None:
    """`remove` for a caller that holds the entry's lock (`changing`)."""
    _remove_locked(_entry_file(name, version))


def resolve(spec: str, progress: Progress | None = None) -> Base:
    """`--base` accepts NAME@VERSION from the cache, or a path to an image.

    A cached base stays locked (shared) until the returned Base is closed, so `base rm`
    cannot remove it while it is in use.
    """
    path = Path(spec)
    try:
        st: os.stat_result | None = path.stat()
    except OSError:  # no such file, or a name no file can have (too long): maybe NAME@VER
        st = None
    if st is not None and path.is_dir():
        raise BadInputError(f"base {spec}: is a directory, not a disk image")
    if "@" in spec and st is None:
        name, _, version = spec.partition("@")
        entry = _entry_file(name, version)
        if not entry.exists():
            raise _not_cached(spec)
        lock = _lock(entry, exclusive=False, what="being changed by another vmsynth process")
        try:
            base = _open_entry(spec, entry, name, version, progress)
        except BaseException:
            os.close(lock)
            raise
        base.lock = lock
        return base
    if st is None:
        raise BadInputError(f"base {spec}: no such file, and not a NAME@VERSION in the cache")
    return load_path(path, progress=progress)


def _not_cached(spec: str) -> BaseMismatchError:
    return BaseMismatchError(f"no base {spec} in the cache ({home()})",
                             hint="add it with `vmsynth base add IMAGE --name N --version V`, "
                                  "or pass the image's path")


def _open_entry(spec: str, entry: Path, name: str, version: str,
                progress: Progress | None) -> Base:
    try:
        record = _read_entry(entry)
    except FileNotFoundError:
        raise _not_cached(spec) from None  # removed just before we locked it
    image_path = Path(record["path"])
    memory = record.get("memory")
    memory_path = Path(memory["path"]) if memory else None
    _check_unchanged(spec, image_path, record["stat"])
    if memory_path is not None:
        _check_unchanged(spec, memory_path, memory["stat"])
    try:
        boot = _boot_config(spec, record.get("boot"))
    except TypeError as err:
        raise BadInputError(f"base cache entry {entry} is damaged ({err})",
                            hint=f"`vmsynth base rm {spec}`, then add the base again") from None
    base = load_path(image_path, name, version, progress, memory_path)
    base.boot = boot
    if base.identity.digest != record["digest"] or \
            (base.memory and base.memory.identity.digest != memory["digest"]):
        base.close()
        raise BaseMismatchError(f"base {spec}: contents differ from when it was added")
    return base
