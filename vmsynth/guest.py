"""Looking inside disk images with libguestfs: filesystems, fsck, guest OS, changed files.

libguestfs boots a small appliance VM to read images safely; it is imported lazily (only
`check` and `inspect --files` need it) and runs under TCG where KVM does not work. Every
drive is added read-only: the image files are never changed.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import accel
from .errors import BadInputError, CheckFailedError, ToolError

CHECKABLE = {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"}
STAT_BATCH = 1000


def _guestfs() -> Any:
    try:
        import guestfs  # type: ignore[import-not-found]
    except ImportError as err:
        raise ToolError("the libguestfs Python binding (guestfs) is not importable",
                        hint="apt-get install python3-guestfs libguestfs-tools, and make the "
                             "virtualenv from /usr/bin/python3 with --system-site-packages "
                             "(`make setup` does)") from err
    return guestfs


def open_images(*paths: Path) -> Any:
    """A launched libguestfs handle with `paths` attached read-only, in order."""
    guestfs = _guestfs()
    g = guestfs.GuestFS(python_return_dict=True)
    if accel.choose("auto").name != "kvm":
        g.set_backend_settings(["force_tcg"])  # its default KVM launch hangs where KVM is broken
    for path in paths:
        if not Path(path).is_file():
            raise BadInputError(f"{path}: no such file")
        g.add_drive_opts(str(path), readonly=1, format="qcow2")
    try:
        g.launch()
    except RuntimeError as err:
        g.close()
        raise ToolError(f"libguestfs could not start its appliance: {err}",
                        hint="run libguestfs-test-tool to see why") from err
    return g


@dataclass
class FilesystemCheck:
    device: str
    fstype: str
    status: str  # "clean", "errors (fsck status N)", "not mountable", "not checked"


@dataclass
class CheckReport:
    image: str
    filesystems: list[FilesystemCheck] = field(default_factory=list)
    operating_systems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.filesystems) and all(
            f.status in ("clean", "not checked") for f in self.filesystems)


def check(image: Path) -> CheckReport:
    """Find the filesystems, fsck each one (read-only), and identify the guest OS.

    Raises:
        CheckFailedError: no filesystem was found, or one failed its check.
    """
    g = open_images(image)
    report = CheckReport(str(image))
    try:
        for device, fstype in sorted(g.list_filesystems().items()):
            if fstype in ("unknown", "swap", ""):
                continue
            report.filesystems.append(FilesystemCheck(device, fstype, _fsck(g, device, fstype)))
        for root in g.inspect_os():
            report.operating_systems.append(_describe_os(g, root))
    finally:
        g.close()
    if not report.filesystems:
        raise CheckFailedError(f"{image}: no filesystem found",
                               hint="the image is empty or its partition table is damaged")
    bad = [f for f in report.filesystems if f.status not in ("clean", "not checked")]
    if bad:
        detail = ", ".join(f"{f.device} ({f.fstype}): {f.status}" for f in bad)
        raise CheckFailedError(f"{image}: filesystem check failed: {detail}",
                               hint="do not boot it; rebuild it from a good overlay")
    return report


def _fsck(g: Any, device: str, fstype: str) -> str:
    try:
        g.mount_ro(device, "/")
        g.umount_all()
    except RuntimeError:
        return "not mountable"
    if fstype not in CHECKABLE:
        return "not checked"
    try:
        # The drive is read-only: any repair fsck attempts lands in a throwaway overlay, and
        # a non-zero status means it found something to repair.
        status = g.fsck(fstype, device)
    except RuntimeError as err:
        return f"errors ({str(err).splitlines()[0][:120]})"
    return "clean" if status == 0 else f"errors (fsck status {status})"


def _describe_os(g: Any, root: str) -> dict[str, Any]:
    info: dict[str, Any] = {"root": root}
    for key, call in (("type", g.inspect_get_type), ("distro", g.inspect_get_distro),
                      ("product", g.inspect_get_product_name),
                      ("major", g.inspect_get_major_version),
                      ("minor", g.inspect_get_minor_version),
                      ("hostname", g.inspect_get_hostname)):
        try:
            info[key] = call(root)
        except RuntimeError:
            info[key] = None
    return info


@dataclass
class ChangedFile:
    path: str
    size: int
    change: str  # "added" or "modified"


def changed_files(base: Path, synth: Path) -> list[ChangedFile]:
    """Regular files added or modified in `synth` relative to `base`, largest first.

    A file-level diff: both images are mounted read-only side by side, every file of the
    synthesized one is compared by size, mtime and inode with the base's same path.
    """
    g = open_images(base, synth)
    try:
        base_fs, synth_fs = g.list_filesystems(), g.list_filesystems()
        pairs = []
        for device, fstype in sorted(synth_fs.items()):
            if not device.startswith("/dev/sdb") or fstype in ("unknown", "swap", ""):
                continue
            twin = "/dev/sda" + device[len("/dev/sdb"):]
            pairs.append((twin if base_fs.get(twin) == fstype else None, device))
        out: list[ChangedFile] = []
        for index, (base_dev, synth_dev) in enumerate(pairs):
            out += _diff_pair(g, base_dev, synth_dev, index)
    finally:
        g.close()
    return sorted(out, key=lambda f: (-f.size, f.path))


def _diff_pair(g: Any, base_dev: str | None, synth_dev: str, index: int) -> list[ChangedFile]:
    b, s = f"/b{index}", f"/s{index}"
    g.mkmountpoint(b)
    g.mkmountpoint(s)
    try:
        g.mount_ro(synth_dev, s)
        if base_dev:
            g.mount_ro(base_dev, b)
    except RuntimeError:
        g.umount_all()
        return []
    names = _find(g, s)
    synth_stat = _stats(g, s, names)
    base_stat = _stats(g, b, names) if base_dev else {}
    g.umount_all()
    out = []
    for name, st in synth_stat.items():
        if (st["st_mode"] & 0o170000) != 0o100000:  # regular files only
            continue
        old = base_stat.get(name)
        if old is None or old["st_ino"] < 0:
            out.append(ChangedFile(name, st["st_size"], "added"))
        elif (old["st_size"], old["st_mtime_sec"], old["st_mtime_nsec"], old["st_ino"]) != \
                (st["st_size"], st["st_mtime_sec"], st["st_mtime_nsec"], st["st_ino"]):
            out.append(ChangedFile(name, st["st_size"], "modified"))
    return out


def _find(g: Any, root: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="vmsynth-find-") as tmp:
        listing = os.path.join(tmp, "names")
        g.find0(root, listing)
        with open(listing, "rb") as f:
            raw = f.read()
    return [n.decode("utf-8", "surrogateescape") for n in raw.split(b"\0") if n]


def _stats(g: Any, root: str, names: list[str]) -> dict[str, dict[str, int]]:
    """lstat of every path, one call per directory batch (lstatnslist takes plain names)."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for name in names:
        parent, _, leaf = name.rpartition("/")
        by_dir[parent].append(leaf)
    out: dict[str, dict[str, int]] = {}
    for parent, leaves in by_dir.items():
        directory = root + parent if parent else root
        for i in range(0, len(leaves), STAT_BATCH):
            batch = leaves[i: i + STAT_BATCH]
            try:
                stats = g.lstatnslist(directory, batch)
            except RuntimeError:
                continue  # the directory does not exist on this side
            for leaf, st in zip(batch, stats, strict=True):
                out[f"{parent}/{leaf}"] = st
    return out
