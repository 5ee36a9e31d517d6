"""Bases on an OCI registry: publish a cached base, install one, keep a cloudlet in step.

A base version is one manifest (artifactType application/vnd.vmsynth.base.v1):

    config   application/vnd.vmsynth.base.config.v1+json: name, version, identity (virtual
             size, SHA-256 of the virtual contents, the memory snapshot's size and digest)
             and boot settings
    layers   the qcow2 image                   application/vnd.vmsynth.base.disk.v1.qcow2+zstd
             its memory snapshot, if any       application/vnd.vmsynth.vmem.v1+zstd
             kernel and initrd, if recorded    application/vnd.vmsynth.base.kernel.v1+zstd,
                                               application/vnd.vmsynth.base.initrd.v1+zstd
             (each zstd-compressed; the config records the kernel's and initrd's own
             SHA-256, checked like the disk's and memory's identity)

A new version is also published as a vmsynth overlay on the version before it (artifactType
application/vnd.vmsynth.base.delta.v1, `subject`: the new version's manifest), found through
the referrers API or, where a registry lacks it, the `sha256-<hex>` tag that lists them. A
cloudlet holding the earlier version fetches only that overlay and rebuilds the new one.

Installing never leaves half a base: files are fetched into a temporary folder in
$VMSYNTH_HOME/images, renamed to images/NAME@VERSION when complete, and the cache entry is
written only once the files have the identity the config states (a scan, as `base add`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from vmsynth.formats import errors as codec

from . import bases
from .apply import apply
from .bases import Base, BootConfig, Identity, MemoryIdentity
from .create import create
from .errors import (
    BaseMismatchError,
    BusyError,
    DigestMismatchError,
    RegistryNotFoundError,
    VmsynthError,
    WrongArtifactError,
)
from .memory import open_vmem
from .qcow2 import Qcow2Image
from .registry import (
    DIGEST,
    OCI_MANIFEST,
    Access,
    Client,
    Reference,
    canonical,
    file_digest,
    tag_for,
)
from .registry_overlays import (
    BASE,
    BASE_DELTA,
    EMPTY_DESCRIPTOR,
    OVERLAY,
    TITLE,
    RegistrySource,
    artifact_manifest,
    base_annotations,
    descriptor,
    expect_kind,
    kind_of,
    push_empty_config,
    push_file,
    push_manifest,
    single_layer,
)
from .store import pid_alive, remove_stale_temps, temp_path

CONFIG = "application/vnd.vmsynth.base.config.v1+json"
DISK = "application/vnd.vmsynth.base.disk.v1.qcow2+zstd"
MEMORY = "application/vnd.vmsynth.vmem.v1+zstd"
KERNEL = "application/vnd.vmsynth.base.kernel.v1+zstd"
INITRD = "application/vnd.vmsynth.base.initrd.v1+zstd"
FILES = {DISK: "disk.qcow2", MEMORY: "memory.vmem", KERNEL: "kernel", INITRD: "initrd"}
ZSTD_LEVEL = 3  # one thread: the same file always compresses to the same blob (dedup)
CHUNK = 1 << 20
SPARSE = 64 << 10  # zero runs this long (aligned) become holes in the files we write
_FALLBACK = re.compile(r"sha256-[0-9a-f]{64}")
_TEMP_DIR = re.compile(r"\.(.+)\.(\d{1,10})\.vmsynth-pull\.[A-Za-z0-9_]+")

Progress = Callable[[int], None]
Note = Callable[[str], None]


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Versions in their natural order: 12.9 < 12.10 < 13 (numbers as numbers)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p)
                 for p in re.findall(r"\d+|[A-Za-z]+", version))


# -- what a repository publishes ------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    """A base version in a repository, from its manifest's annotations."""

    tag: str
    digest: str  # the manifest's
    manifest: dict[str, Any]
    name: str
    version: str
    contents: str  # the identity's digest of the virtual contents
    virtual_size: int
    memory_digest: str | None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _published(tag: str, digest: str, manifest: dict[str, Any]) -> Published | None:
    ann = manifest.get("annotations")
    if not isinstance(ann, dict):
        return None
    try:
        name, version, contents = (ann["vmsynth.base.name"], ann["vmsynth.base.version"],
                                   ann["vmsynth.base.digest"])
        size = int(ann["vmsynth.base.virtual-size"])
    except (KeyError, TypeError, ValueError):
        return None
    memory = ann.get("vmsynth.base.memory-digest")
    if not all(isinstance(v, str) for v in (name, version, contents)) or \
            not DIGEST.fullmatch(contents) or (memory is not None and
                                               not DIGEST.fullmatch(str(memory))):
        return None
    return Published(tag, digest, manifest, name, version, contents, size, memory)


def catalog(client: Client, repository: str) -> list[Published]:
    """Every base version a repository holds (one per manifest, whatever its tags), in
    version order."""
    found: dict[str, Published] = {}
    for tag in client.tags(repository):
        if _FALLBACK.fullmatch(tag):
            continue  # referrer lists, not bases
        got = client.get_manifest(Reference(client.host, repository, tag), missing_ok=True)
        if got is None or kind_of(got[0]) != BASE:
            continue
        pub = _published(tag, got[2], got[0])
        if pub is not None:
            found.setdefault(pub.digest, pub)
    return sorted(found.values(), key=lambda p: (p.name, version_key(p.version)))


# -- the config blob -------------------------------------------------------------------------

def config_blob(base: Base) -> bytes:
    ident = base.identity
    boot = {k: v for k, v in base.boot.to_json().items() if k not in ("kernel", "initrd")}
    value: dict[str, Any] = {"vmsynth_base": 1, "name": ident.name, "version": ident.version,
                             "virtual_size": ident.virtual_size, "digest": ident.digest,
                             "boot": boot}
    files = {what: path for what, path in (("kernel", base.boot.kernel),
                                           ("initrd", base.boot.initrd)) if path is not None}
    if files:
        value["files"] = {what: dict(zip(("digest", "size"), file_digest(path), strict=True))
                          for what, path in files.items()}
    if ident.memory is not None:
        value["memory"] = {"size": ident.memory.size, "digest": ident.memory.digest}
        if ident.memory.machine is not None:
            value["memory"]["machine"] = ident.memory.machine.to_json()
    return canonical(value)


def parse_config(raw: bytes, where: str
                 ) -> tuple[Identity, dict[str, Any], dict[str, tuple[str, int]]]:
    """The identity, boot settings and boot files (kernel, initrd: their SHA-256 and size)
    a base was published with, checked field by field."""
    def bad(why: str) -> WrongArtifactError:
        return WrongArtifactError(f"{where}: the base's config is malformed ({why})",
                                  hint="it was not published by vmsynth, or is damaged")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(value, dict) or value.get("vmsynth_base") != 1:
        raise bad("not a vmsynth base config, version 1")
    name, version, digest, size = (value.get(k) for k in ("name", "version", "digest",
                                                           "virtual_size"))
    if not all(isinstance(v, str) for v in (name, version, digest)) or type(size) is not int \
            or not DIGEST.fullmatch(str(digest)) or size <= 0:
        raise bad("name, version, digest or virtual size")
    memory = value.get("memory")
    mem = None
    if memory is not None:
        if not isinstance(memory, dict) or type(memory.get("size")) is not int or \
                not DIGEST.fullmatch(str(memory.get("digest"))):
            raise bad("memory")
        mem = MemoryIdentity(memory["size"], memory["digest"])
    boot = value.get("boot") or {}
    types = {"append": str, "memory": str, "cpus": int, "ready": str}
    if not isinstance(boot, dict) or any(k not in types or type(v) is not types[k]
                                         for k, v in boot.items()):
        raise bad("boot settings")
    files = value.get("files") or {}
    if not isinstance(files, dict) or any(
            k not in ("kernel", "initrd") or not isinstance(v, dict) or
            not DIGEST.fullmatch(str(v.get("digest"))) or type(v.get("size")) is not int
            for k, v in files.items()):
        raise bad("boot files")
    return Identity(str(name), str(version), size, str(digest), mem), boot, \
        {k: (v["digest"], v["size"]) for k, v in files.items()}


# -- publishing ------------------------------------------------------------------------------

def push_base(spec: str, ref: Reference, access: Access, delta: bool = True,
              level: int = 3, progress: Progress | None = None,
              note: Note | None = None) -> dict[str, Any]:
    """Publish cached base NAME@VERSION to `ref` (tagged VERSION unless a tag is given),
    then an overlay of it on the repository's previous version, when that one is cached
    here too."""
    note = note or (lambda _: None)
    base = bases.resolve(spec)
    try:
        client = Client(ref.host, access)
        target = ref.with_tag(ref.tag or tag_for(base.identity.version))
        report: dict[str, Any] = {"reference": str(target), "base": base.identity.label}
        existing = client.get_manifest(target, missing_ok=True)
        if existing is not None:
            pub = _published(target.tag or "", existing[2], existing[0]) \
                if kind_of(existing[0]) == BASE else None
            if pub is None or (pub.contents, pub.memory_digest) != \
                    (base.identity.digest, base.identity.memory.digest
                     if base.identity.memory else None):
                raise BaseMismatchError(
                    f"{target} already holds "
                    + (f"base {pub.label} with other contents" if pub else "something else"),
                    hint="a published version never changes: push it as a new version")
            digest, size, layers_sent = existing[2], len(existing[1]), []
            note(f"{target} already holds {base.identity.label}")
            report |= {"digest": digest, "manifest_uploaded": False}
        else:
            layers, layers_sent = _push_layers(client, ref.repository, base, progress, note)
            config = config_blob(base)
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            client.push_blob(ref.repository, config_digest, len(config),
                             lambda: io.BytesIO(config))
            raw = artifact_manifest(BASE, descriptor(CONFIG, config_digest, len(config)),
                                    layers, base_annotations(base.identity) |
                                    {TITLE: base.identity.label})
            digest, sent, _ = push_manifest(client, target, raw)
            size = len(raw)
            report |= {"digest": digest, "manifest_uploaded": sent}
        report["layers"] = layers_sent
        report["delta"] = _push_delta(client, ref.repository, base,
                                      descriptor(OCI_MANIFEST, digest, size), level, progress,
                                      note) if delta else {"skipped": "--no-delta"}
        report["bytes_sent"] = client.sent
        return report
    finally:
        base.close()


def _push_layers(client: Client, repository: str, base: Base, progress: Progress | None,
                 note: Note) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    files: list[tuple[str, Path]] = [(DISK, base.path)]
    if base.memory is not None:
        files.append((MEMORY, base.memory.path))
    for media_type, path in ((KERNEL, base.boot.kernel), (INITRD, base.boot.initrd)):
        if path is not None:
            files.append((media_type, path))
    layers, report = [], []
    for media_type, path in files:
        note(f"pushing {FILES[media_type]} ({path})")
        layer, sent = _push_compressed(client, repository, path, media_type, progress)
        layer["annotations"] = {TITLE: FILES[media_type]}
        layers.append(layer)
        report.append({"file": FILES[media_type], "digest": layer["digest"],
                       "size": layer["size"], "uploaded": sent})
    return layers, report


def _push_compressed(client: Client, repository: str, path: Path, media_type: str,
                     progress: Progress | None) -> tuple[dict[str, Any], bool]:
    """A file as a zstd blob. Its digest is remembered per file (path and status), so a
    second push of an unchanged base asks the registry (HEAD) without compressing again."""
    memo = _memo_file(path, media_type)
    try:
        known = json.loads(memo.read_text())
        digest, size = known["digest"], int(known["size"])
        if DIGEST.fullmatch(digest) and client.has_blob(repository, digest):
            return descriptor(media_type, digest, size), False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    folder = bases.cache_dir("tmp")
    remove_stale_temps(folder)
    tmp = temp_path(folder / (path.name + ".zst"))
    try:
        digest, size = _compress(path, tmp)
        with contextlib.suppress(OSError, VmsynthError):
            bases.cache_dir("scans")
            memo.write_text(json.dumps({"digest": digest, "size": size}))
        sent = client.push_blob(repository, digest, size,
                                lambda: open(tmp, "rb"), progress)  # noqa: SIM115 (closed there)
    finally:
        tmp.unlink(missing_ok=True)
    return descriptor(media_type, digest, size), sent


def _memo_file(path: Path, media_type: str) -> Path:
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size,
                                     st.st_mtime_ns, media_type, ZSTD_LEVEL]).encode())
    return bases.home() / "scans" / f"{key.hexdigest()[:32]}.blob.json"


def _compress(path: Path, out: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    with open(path, "rb") as src, open(out, "wb") as dst:
        while chunk := src.read(4 * CHUNK):
            data = compressor.compress(chunk)
            sha.update(data)
            size += len(data)
            dst.write(data)
        data = compressor.flush()
        sha.update(data)
        size += len(data)
        dst.write(data)
    return "sha256:" + sha.hexdigest(), size



def _push_delta(client: Client, repository: str, base: Base, subject: dict[str, Any],
                level: int, progress: Progress | None, note: Note) -> dict[str, Any]:
    """An overlay of `base` on the repository's version before it, as a referrer of the
    new version's manifest."""
    ident = base.identity
    earlier = [p for p in catalog(client, repository) if p.name == ident.name and
               version_key(p.version) < version_key(ident.version)]
    if not earlier:
        return {"skipped": f"no earlier version of {ident.name} in the repository"}
    prev = earlier[-1]
    for ref in client.referrers(repository, subject["digest"], BASE_DELTA):
        ann = ref.get("annotations") or {}
        if ann.get("vmsynth.delta.from.digest") == prev.contents and \
                ann.get("vmsynth.delta.from.memory-digest") == prev.memory_digest:
            return {"from": prev.label, "digest": ref["digest"], "uploaded": False,
                    "skipped": "already published"}
    entry = bases.find(prev.contents, prev.virtual_size, prev.memory_digest)
    if entry is None:
        return {"skipped": f"{prev.label} is not in the local cache (`vmsynth base pull` it "
                           "to publish deltas from it)"}
    old = bases.resolve(f"{entry['name']}@{entry['version']}")
    folder = bases.cache_dir("tmp")
    tmp = temp_path(folder / f"{ident.name}@{ident.version}.delta.vmo")
    try:
        note(f"making the delta from {prev.label}")
        memory = None
        if base.memory is not None and old.memory is not None and \
                old.memory.identity.machine is not None and \
                not old.memory.identity.machine.mismatch(base.memory.image.vmem.machine):
            memory = open_vmem(base.memory.path)
        disk = Qcow2Image(base.path)
        try:
            with open(tmp, "wb") as out:
                made = create(old, disk, out, level, memory=memory)
        finally:
            disk.close()
            if memory is not None:
                memory.close()
        note(f"pushing the delta from {prev.label} ({made.overlay_bytes:,} bytes)")
        layer, sent = push_file(client, repository, tmp, OVERLAY, progress)
    finally:
        old.close()
        tmp.unlink(missing_ok=True)
    layer["annotations"] = {TITLE: f"{ident.name}@{prev.version}-to-{ident.version}.vmo"}
    push_empty_config(client, repository)
    annotations = base_annotations(ident) | base_annotations(
        prev_identity(prev), "vmsynth.delta.from.") | {
        "vmsynth.delta.memory": "true" if memory is not None else "false"}
    raw = artifact_manifest(BASE_DELTA, dict(EMPTY_DESCRIPTOR), [layer], annotations, subject)
    digest, _, answer = push_manifest(client, Reference(client.host, repository), raw)
    if not answer.get("subject"):  # no referrers API: list it on the subject's tag
        client.add_referrer(repository, subject["digest"],
                            descriptor(OCI_MANIFEST, digest, len(raw), annotations) |
                            {"artifactType": BASE_DELTA})
    return {"from": prev.label, "digest": digest, "size": layer["size"], "uploaded": sent,
            "memory": memory is not None}


def prev_identity(p: Published) -> Identity:
    mem = MemoryIdentity(0, p.memory_digest) if p.memory_digest else None
    return Identity(p.name, p.version, p.virtual_size, p.contents, mem)


# -- installing ------------------------------------------------------------------------------

def pull_base(ref: Reference, access: Access, delta: bool = True,
              progress: Progress | None = None, note: Note | None = None) -> dict[str, Any]:
    """Install the base `ref` names into the cache (by delta from a cached version when the
    repository has one)."""
    client = Client(ref.host, access)
    got = client.get_manifest(ref)
    assert got is not None
    manifest, _, digest = got
    expect_kind(ref, manifest, BASE)
    report = install(client, ref.repository, manifest, digest, delta, progress, note)
    return report | {"reference": str(ref), "bytes_received": client.received}


def install(client: Client, repository: str, manifest: dict[str, Any], digest: str,
            delta: bool = True, progress: Progress | None = None,
            note: Note | None = None) -> dict[str, Any]:
    """Fetch a base version into $VMSYNTH_HOME/images/NAME@VERSION and add it to the cache,
    checked against its identity; nothing is left of it if anything fails."""
    note = note or (lambda _: None)
    where = f"{client.name(repository)}@{digest}"
    config_desc = manifest.get("config")
    if not isinstance(config_desc, dict) or config_desc.get("mediaType") != CONFIG or \
            not isinstance(config_desc.get("size"), int) or config_desc["size"] > 1 << 20:
        raise WrongArtifactError(f"{where}: the base's manifest has no vmsynth config")
    reader = client.open_blob(repository, config_desc)
    try:
        raw = b"".join(iter(lambda: reader.read(CHUNK), b""))
    finally:
        reader.close()
    identity, boot, boot_files = parse_config(raw, where)
    pub = _published("", digest, manifest)
    if pub is None or (pub.name, pub.version, pub.contents, pub.memory_digest) != \
            (identity.name, identity.version, identity.digest,
             identity.memory.digest if identity.memory else None):
        raise WrongArtifactError(f"{where}: the manifest's annotations disagree with its "
                                 "config", hint="it was not published by vmsynth")
    label = identity.label
    outcome = {"base": label, "digest": digest, "contents": identity.digest}
    if _cached(identity):
        return outcome | {"action": "present"}
    layers = _layers(manifest, identity, boot_files, where)
    with bases.changing(identity.name, identity.version):
        if _cached(identity):  # installed meanwhile by another process
            return outcome | {"action": "present"}
        images = bases.images()
        _sweep(images)
        final = images / label
        if final.exists():  # a leftover without an entry (killed between rename and add)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{label}.{os.getpid()}.vmsynth-pull.",
                                    dir=images))
        try:
            how = _by_delta(client, repository, digest, identity, layers, boot_files, tmp,
                            progress, note) if delta else None
            if how is None:
                how = _in_full(client, repository, layers, tmp, progress, note)
            _check_boot_files(tmp, boot_files, identity.label)
            for f in tmp.iterdir():
                f.chmod(0o444)  # a base never changes
            _sync(tmp)
            os.rename(tmp, final)
            _sync(images)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            note(f"checking {label}'s identity")
            added = bases.add(
                final / FILES[DISK], identity.name, identity.version,
                memory=final / FILES[MEMORY] if identity.memory else None,
                boot=BootConfig(final / FILES[KERNEL] if KERNEL in layers else None,
                                final / FILES[INITRD] if INITRD in layers else None,
                                boot.get("append"), boot.get("memory"), boot.get("cpus"),
                                boot.get("ready")),
                expect=identity, locked=True,
                origin={"registry": client.name(repository), "manifest": digest,
                        "dir": str(final)})
            added.close()
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    return outcome | how | {"action": "installed", "path": str(final)}


def _cached(identity: Identity) -> bool:
    """Whether NAME@VERSION is cached already with this identity.

    Raises:
        BaseMismatchError: it is cached with other contents.
    """
    for e in bases.entries():
        if (e.get("name"), e.get("version")) != (identity.name, identity.version):
            continue
        mem = e.get("memory")
        if "damaged" not in e and (e.get("digest"), e.get("virtual_size")) == \
                (identity.digest, identity.virtual_size) and \
                (mem.get("digest") if isinstance(mem, dict) else None) == \
                (identity.memory.digest if identity.memory else None):
            return True
        raise BaseMismatchError(f"the cache already has a base {identity.label} with other "
                                "contents", hint=f"`vmsynth base rm {identity.label}` first, "
                                                 "if the registry's is the one you want")
    return False


def _layers(manifest: dict[str, Any], identity: Identity,
            boot_files: dict[str, tuple[str, int]], where: str) -> dict[str, dict[str, Any]]:
    """The base's files by media type, each once; the memory layer exactly when the
    identity has a memory snapshot, the kernel and initrd exactly when the config has
    their digests."""
    out: dict[str, dict[str, Any]] = {}
    for layer in manifest.get("layers") or []:
        media_type = layer.get("mediaType") if isinstance(layer, dict) else None
        if media_type in FILES:
            if media_type in out:
                raise WrongArtifactError(f"{where}: the manifest lists {FILES[media_type]} "
                                         "twice")
            out[media_type] = layer
    if DISK not in out or (MEMORY in out) != (identity.memory is not None) or \
            (KERNEL in out) != ("kernel" in boot_files) or \
            (INITRD in out) != ("initrd" in boot_files):
        raise WrongArtifactError(f"{where}: the manifest's layers do not match its config "
                                 "(disk, memory snapshot, kernel, initrd)")
    return out


def _check_boot_files(folder: Path, boot_files: dict[str, tuple[str, int]], label: str
                      ) -> None:
    """The kernel and initrd are the files the base was published with."""
    for what, (digest, size) in boot_files.items():
        got = file_digest(folder / what)
        if got != (digest, size):
            raise DigestMismatchError(f"base {label}: its {what} is not the one it was "
                                      f"published with ({got[0][:19]}...)",
                                      hint="nothing was added; the published base is "
                                           "damaged: push it again")


def _in_full(client: Client, repository: str, layers: dict[str, dict[str, Any]], folder: Path,
             progress: Progress | None, note: Note) -> dict[str, Any]:
    for media_type, layer in layers.items():
        note(f"fetching {FILES[media_type]} ({layer['size']:,} bytes)")
        _fetch(client, repository, layer, folder / FILES[media_type], progress)
    return {"method": "full", "fetched_bytes": sum(layer["size"] for layer in layers.values())}


def _fetch(client: Client, repository: str, layer: dict[str, Any], path: Path,
           progress: Progress | None) -> None:
    """A layer into `path` (decompressed if it is +zstd), sparse where it is zero."""
    reader = client.open_blob(repository, layer)
    try:
        counted = _Progress(reader, progress)
        with open(path, "wb") as out:
            if str(layer["mediaType"]).endswith("+zstd"):
                try:
                    with zstandard.ZstdDecompressor().stream_reader(
                            counted, read_across_frames=True, closefd=False) as data:
                        _write_sparse(data.read, out)
                except zstandard.ZstdError as err:
                    reader.drain()  # a damaged blob is told by its digest first
                    raise WrongArtifactError(f"{reader.name}: not zstd data ({err})") from None
                reader.drain()  # the digest is checked at the last byte
            else:
                _write_sparse(counted.read, out)
            out.flush()
            os.fsync(out.fileno())
    finally:
        reader.close()


class _Progress:
    def __init__(self, reader: Any, progress: Progress | None) -> None:
        self.reader, self.progress = reader, progress

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        if self.progress and data:
            self.progress(len(data))
        return data


def _write_sparse(read: Callable[[int], bytes], out: Any) -> None:
    zero = bytes(SPARSE)
    carry = b""
    while True:
        data = read(CHUNK)
        buf = carry + data if carry else data
        end = len(buf) if not data else len(buf) // SPARSE * SPARSE
        view = memoryview(buf)
        for i in range(0, end, SPARSE):
            piece = view[i: i + SPARSE]
            if len(piece) == SPARSE and piece == zero:
                out.seek(SPARSE, os.SEEK_CUR)
            else:
                out.write(piece)
        carry = bytes(view[end:])
        if not data:
            break
    out.truncate(out.tell())


def _by_delta(client: Client, repository: str, digest: str, identity: Identity,
              layers: dict[str, dict[str, Any]], boot_files: dict[str, tuple[str, int]],
              folder: Path, progress: Progress | None, note: Note) -> dict[str, Any] | None:
    """Rebuild the new version from a published overlay on a version cached here; None if
    there is none to use (or it fails: then the base is fetched in full)."""
    for ref in client.referrers(repository, digest, BASE_DELTA):
        ann = ref.get("annotations") or {}
        try:
            entry = bases.find(str(ann.get("vmsynth.delta.from.digest")),
                               int(ann.get("vmsynth.delta.from.virtual-size", -1)),
                               ann.get("vmsynth.delta.from.memory-digest"))
        except (TypeError, ValueError):
            continue
        if entry is None:
            continue
        spec = f"{entry['name']}@{entry['version']}"
        try:
            return _apply_delta(client, repository, digest, ref["digest"], spec, identity,
                                layers, boot_files, folder, progress, note)
        except (DigestMismatchError, WrongArtifactError, BaseMismatchError,
                RegistryNotFoundError, codec.FormatError) as err:
            note(f"the delta from {spec} cannot be used ({err}); fetching the base in full")
            for f in folder.iterdir():
                f.unlink()
            return None
    return None


def _apply_delta(client: Client, repository: str, digest: str, delta_digest: str, spec: str,
                 identity: Identity, layers: dict[str, dict[str, Any]],
                 boot_files: dict[str, tuple[str, int]], folder: Path,
                 progress: Progress | None, note: Note) -> dict[str, Any]:
    ref = Reference(client.host, repository, digest=delta_digest)
    got = client.get_manifest(ref)
    assert got is not None
    manifest = got[0]
    expect_kind(ref, manifest, BASE_DELTA)
    subject = manifest.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != digest:
        raise WrongArtifactError(f"{ref}: this delta is not for {identity.label}")
    layer = single_layer(ref, manifest, OVERLAY)
    note(f"fetching the delta from {spec} ({layer['size']:,} bytes) instead of the base")
    old = bases.resolve(spec)
    try:
        reader = client.open_blob(repository, layer)
        try:
            apply(RegistrySource(reader, reader.name, progress),  # type: ignore[arg-type]
                  old, folder / FILES[DISK], flatten=True,
                  memory_output=folder / FILES[MEMORY])
        except codec.CorruptError:
            reader.drain()  # a damaged registry copy is told by its digest
            raise
        finally:
            reader.close()
        fetched = layer["size"]
        for media_type, mine in ((KERNEL, old.boot.kernel), (INITRD, old.boot.initrd)):
            if media_type not in layers:
                continue
            if mine is not None and file_digest(mine) == boot_files[FILES[media_type]]:
                shutil.copyfile(mine, folder / FILES[media_type])  # the same file: no fetch
            else:
                _fetch(client, repository, layers[media_type], folder / FILES[media_type],
                       progress)
                fetched += layers[media_type]["size"]
    finally:
        old.close()
    if MEMORY in layers and not (folder / FILES[MEMORY]).exists():
        note("fetching the memory snapshot (the delta has none)")
        _fetch(client, repository, layers[MEMORY], folder / FILES[MEMORY], progress)
        fetched += layers[MEMORY]["size"]
    return {"method": "delta", "from": spec, "delta": delta_digest, "fetched_bytes": fetched}


def _sync(path: Path) -> None:
    for f in [path, *path.iterdir()] if path.is_dir() else [path]:
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _sweep(images: Path) -> None:
    """Remove the temporary folders of pulls whose process is gone (a kill -9)."""
    for d in images.iterdir():
        m = _TEMP_DIR.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink() and not pid_alive(int(m.group(2))):
            shutil.rmtree(d, ignore_errors=True)


# -- keeping a cloudlet in step --------------------------------------------------------------

def sync(ref: Reference, access: Access, keep: int | None = None, delta: bool = True,
         progress: Progress | None = None, note: Note | None = None) -> dict[str, Any]:
    """Install the versions the repository has and the cache lacks (the newest `keep` of
    each base, or all), by delta when possible; then remove pulled versions that are no
    longer among the newest `keep`, unless a session uses them."""
    note = note or (lambda _: None)
    client = Client(ref.host, access)
    published = catalog(client, ref.repository)
    if not published:
        raise RegistryNotFoundError(f"{ref}: no vmsynth base in this repository")
    wanted: list[Published] = []
    for name in sorted({p.name for p in published}):
        versions = [p for p in published if p.name == name]
        wanted += versions[-keep:] if keep else versions
    results = []
    for p in wanted:
        note(f"{p.label}: {p.tag}")
        results.append(install(client, ref.repository, p.manifest, p.digest, delta,
                               progress, note))
    removed, in_use = [], []
    if keep:
        keep_set = {(p.name, p.version) for p in wanted}
        names = {p.name for p in published}
        for e in bases.entries():
            origin = e.get("origin")
            if e.get("name") not in names or (e.get("name"), e.get("version")) in keep_set \
                    or not isinstance(origin, dict) or \
                    origin.get("registry") != client.name(ref.repository):
                continue
            label = f"{e['name']}@{e['version']}"
            try:
                with bases.changing(e["name"], e["version"]):
                    bases.remove_locked(e["name"], e["version"])
                removed.append(label)
                note(f"removed {label}")
            except BusyError:
                in_use.append(label)
                note(f"kept {label}: a session uses it")
    return {"repository": str(ref), "bases": results, "removed": removed,
            "kept_in_use": in_use, "bytes_received": client.received}


def fetch_identity(ref: Reference, access: Access, digest: str, virtual_size: int,
                   memory_digest: str | None, cancel: Any = None) -> dict[str, Any]:
    """Install the repository's base with these contents (the cloudlet, for a client that
    asks for a base it lacks).

    Raises:
        RegistryNotFoundError: the repository has no such base.
    """
    client = Client(ref.host, access, cancel)
    match = [p for p in catalog(client, ref.repository)
             if (p.contents, p.virtual_size) == (digest, virtual_size) and
             (memory_digest is None or p.memory_digest == memory_digest)]
    if not match:
        raise RegistryNotFoundError(f"{ref}: no base with contents {digest[:19]}... there")
    p = match[-1]
    return install(client, ref.repository, p.manifest, p.digest) | {"tag": p.tag}

