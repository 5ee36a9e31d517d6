"""Apply: rebuild a disk from a base and an overlay, as a copy-on-write qcow2 child.

The base is opened read-only and never copied: the result's backing file is the base itself,
and only the clusters the overlay changes are written, each exactly once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmsynth.formats.container import OverlayStream
from vmsynth.formats.seal import Sealer

from .bases import Base
from .blocks import is_zero
from .errors import UsageError
from .keys import Key, sealer_for
from .qcow2 import Qcow2Writer
from .store import atomic_path
from .synth import ReplayReport, disk_manifest, replay
from .tools import run

Read = Callable[[int, int], bytes]


class ClusterSink:
    """Assembles rebuilt bytes into whole clusters for a Qcow2Writer.

    Records arrive in ascending order, so one cluster is open at a time; the parts of it the
    overlay does not change are filled from the base before it is written.
    """

    def __init__(self, writer: Qcow2Writer, base_read: Read, base_size: int) -> None:
        self.writer = writer
        self.base_read = base_read
        self.base_size = base_size
        self.cs = writer.cluster_size
        self.index = -1
        self.buf: bytearray | None = None

    def _open(self, index: int, whole: bool) -> bytearray:
        if index != self.index:
            self.flush()
            self.index = index
            self.buf = bytearray(self.cs) if whole else bytearray(self.base_read(index * self.cs,
                                                                                 self.cs))
        assert self.buf is not None
        return self.buf

    def write(self, offset: int, data: bytes) -> None:
        pos, view = 0, memoryview(data)
        while pos < len(data):
            index, within = divmod(offset + pos, self.cs)
            n = min(self.cs - within, len(data) - pos)
            buf = self._open(index, within == 0 and n == self.cs)
            buf[within: within + n] = view[pos: pos + n]
            pos += n

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        # Whole clusters past the base's end already read as zeros in a fresh child: skip
        # them in one step (a huge zero run there must cost nothing).
        past = -(-self.base_size // self.cs) * self.cs
        if end > past and offset < end:
            tail_start = max(offset, past)
            whole_from = -(-tail_start // self.cs) * self.cs
            whole_to = end // self.cs * self.cs
            if whole_to > whole_from and (self.index < 0 or self.index * self.cs < whole_from):
                self.zero(offset, whole_from - offset)
                offset = whole_to
        while offset < end:
            index, within = divmod(offset, self.cs)
            n = min(self.cs - within, end - offset)
            if within == 0 and n == self.cs and index != self.index:
                self.flush()
                self.writer.zero_cluster(index)  # a whole zero cluster costs no data
            else:
                self._open(index, False)[within: within + n] = bytes(n)
            offset += n

    def read_result(self, offset: int, length: int) -> bytes:
        parts = []
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self.cs)
            n = min(self.cs - within, end - offset)
            if index == self.index and self.buf is not None:
                cluster = bytes(self.buf)
            else:
                cluster = self.writer.read_cluster(index) or self.base_read(index * self.cs,
                                                                            self.cs)
            parts.append(cluster[within: within + n])
            offset += n
        return b"".join(parts)

    def flush(self) -> None:
        if self.buf is not None:
            if is_zero(bytes(self.buf)):
                self.writer.zero_cluster(self.index)
            else:
                self.writer.write_cluster(self.index, bytes(self.buf))
        self.buf = None
        self.index = -1


@dataclass
class ApplyReport:
    output: str
    virtual_size: int
    flattened: bool
    replay: ReplayReport


def rebuild(overlay: OverlayStream, base: Base, child: Path, sealer: Sealer | None = None,
            progress: Callable[[int], None] | None = None, whole_sectors: bool = False
            ) -> ReplayReport:
    """Write the overlay's result to `child`, a qcow2 whose backing file is the base.

    `whole_sectors` rounds the disk size up to 512 bytes (zeros), for qemu-img, which
    would otherwise cut a disk's last partial sector.
    """
    manifest = disk_manifest(overlay.header.manifest)
    base.check_matches(manifest.base)
    size = -(-manifest.virtual_size // 512) * 512 if whole_sectors else manifest.virtual_size
    writer = Qcow2Writer(child, size, backing=str(base.path))
    try:
        sink = ClusterSink(writer, base.image.read, base.identity.virtual_size)
        report = replay(overlay, manifest, base.image.read, sink, progress, sealer)
        sink.flush()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return report


def apply(source: BinaryIO, base: Base, output: Path, flatten: bool = False,
          progress: Callable[[int], None] | None = None, key: Key | None = None) -> ApplyReport:
    """Rebuild the overlay read from `source` on `base` into `output` (temp name, then rename).

    An encrypted overlay needs its `key`; its decrypted result is readable by its owner only.
    """
    if output.exists() and os.path.samefile(output, base.path):
        raise UsageError(f"{output} is the base image: refusing to overwrite it",
                         hint="write the rebuilt disk to another file")
    overlay = OverlayStream(source)
    manifest = disk_manifest(overlay.header.manifest)
    base.check_matches(manifest.base)  # before anything is written
    sealer = sealer_for(overlay.header, key)
    with atomic_path(output, private=sealer is not None) as tmp:
        if not flatten:
            report = rebuild(overlay, base, tmp, sealer, progress)
        else:
            # Named like atomic_path's temporaries, so a killed run's leftover is cleaned too.
            fd, child_name = tempfile.mkstemp(prefix=f".{output.name}.{os.getpid()}.",
                                              suffix=".child.tmp", dir=output.parent)
            os.close(fd)
            child = Path(child_name)
            try:
                report = rebuild(overlay, base, child, sealer, progress, whole_sectors=True)
                run("qemu-img", "convert", "-O", "qcow2", str(child), str(tmp))
                if sealer is not None:
                    os.chmod(tmp, 0o600)  # qemu-img recreated it with the usual mode
            finally:
                child.unlink(missing_ok=True)
    return ApplyReport(str(output), manifest.virtual_size, flatten, report)
