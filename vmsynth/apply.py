"""Apply: rebuild a disk from a base and an overlay, as a copy-on-write qcow2 child.

The base is opened read-only and never copied: the result's backing file is the base itself,
and only the clusters the overlay changes are written, each exactly once. An overlay with a
memory stream also rebuilds a memory snapshot (.vmem) from the base's, front to back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from vmsynth.formats.container import OverlayStream
from vmsynth.formats.seal import Sealer

from .bases import Base
from .blocks import is_zero
from .errors import BaseMismatchError, UsageError
from .keys import Key, sealer_for
from .memory import Vmem, VmemBuilder
from .qcow2 import Qcow2Writer
from .store import Inputs, atomic_outputs, check_distinct, temp_path
from .synth import ReplayReport, read_manifest, replay
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

    def write(self, offset: int, data: bytes | memoryview) -> None:
        pos, view, size = 0, memoryview(data), len(data)
        while pos < size:
            index, within = divmod(offset + pos, self.cs)
            whole = (size - pos) // self.cs if within == 0 and index != self.index else 0
            if whole:  # a run of whole clusters: straight to the file, in one call
                self.writer.write_clusters(index, view[pos: pos + whole * self.cs])
                pos += whole * self.cs
                continue
            n = min(self.cs - within, size - pos)
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
            data = bytes(self.buf)
            if is_zero(data):
                self.writer.zero_cluster(self.index)
            else:
                self.writer.write_cluster(self.index, data)
        self.buf = None
        self.index = -1


@dataclass
class ApplyReport:
    output: str
    virtual_size: int
    flattened: bool
    replay: ReplayReport
    memory: Vmem | None = None


def rebuild(overlay: OverlayStream, base: Base, child: Path, sealer: Sealer | None = None,
            progress: Callable[[int], None] | None = None, whole_sectors: bool = False,
            memory_out: Path | None = None, durable: bool = True
            ) -> tuple[ReplayReport, Vmem | None]:
    """Write the overlay's disk to `child`, a qcow2 whose backing file is the base, and its
    memory snapshot (if it has one) to `memory_out`.

    `whole_sectors` rounds the disk size up to 512 bytes (zeros), for qemu-img, which
    would otherwise cut a disk's last partial sector.
    """
    manifest = read_manifest(overlay.header.manifest)
    base.check_matches(manifest.base)
    size = -(-manifest.virtual_size // 512) * 512 if whole_sectors else manifest.virtual_size
    writer = Qcow2Writer(child, size, backing=str(base.path), durable=durable)
    builder = None
    try:
        sinks: dict = {0: ClusterSink(writer, base.image.read, base.identity.virtual_size)}
        reads = {0: base.image.read}
        if manifest.memory is not None:
            assert base.memory is not None and manifest.memory.machine is not None
            if memory_out is None:
                raise UsageError("this overlay holds a memory snapshot: say where to write it")
            builder = VmemBuilder(memory_out, base.memory.image, manifest.memory.machine,
                                  manifest.memory.virtual_size, durable)
            sinks[1], reads[1] = builder, base.memory.image.read
        report = replay(overlay, manifest, reads, sinks, progress, sealer)
        sinks[0].flush()
        writer.finish()
        vmem = builder.finish() if builder is not None else None
    except BaseException:
        writer.abort()
        if builder is not None:
            builder.close()
        raise
    return report, vmem


def memory_path_for(output: Path) -> Path:
    """Where apply puts the rebuilt memory snapshot unless told: beside the disk."""
    return output.with_name(output.stem + ".vmem")


def apply(source: BinaryIO, base: Base, output: Path, flatten: bool = False,
          progress: Callable[[int], None] | None = None, key: Key | None = None,
          memory_output: Path | None = None, durable: bool = True,
          inputs: Inputs | None = None, announce: bool = False) -> ApplyReport:
    """Rebuild the overlay read from `source` on `base` into `output` (temp name, then rename),
    and its memory snapshot, if any, into `memory_output` (default: OUTPUT's name, .vmem).

    An encrypted overlay needs its `key`; its decrypted result is readable by its owner only.
    `durable=False` skips syncing the results to disk: for a session that is thrown away
    after its VM ends, where the sync would only delay the VM's start. `inputs` are the
    files the caller read (the overlay, a key file): no output may be one of them, nor a
    file of the base. `announce`: the results are the user's (store.completed lists them).

    Raises:
        UsageError: an output is an input, not a regular file, or both outputs are one file.
    """
    inputs = inputs or Inputs()
    inputs.add("base image", base.path)
    if base.memory is not None:
        inputs.add("base's memory snapshot", base.memory.path)
    if hasattr(source, "fileno"):
        with contextlib.suppress(OSError, ValueError):
            inputs.add_fd("overlay", source.fileno())
    overlay = OverlayStream(source)
    manifest = read_manifest(overlay.header.manifest)
    memory_out = None
    if manifest.memory is not None:
        memory_out = memory_output or memory_path_for(output)
    inputs.check_output("-o/--output", output)
    if memory_out is not None:
        inputs.check_output("--memory-output", memory_out)
        check_distinct([("-o/--output", output), ("--memory-output", memory_out)])
    base.check_matches(manifest.base)  # before anything is written
    if manifest.memory is not None and base.memory is None:
        raise BaseMismatchError("overlay holds a memory snapshot, but the base has none")
    sealer = sealer_for(overlay.header, key)
    private = sealer is not None
    with atomic_outputs(durable, keep=inputs, announce=announce) as outputs:
        tmp = outputs.add(output, private)
        mem_tmp = outputs.add(memory_out, private=True) if memory_out is not None else None
        if not flatten:
            report, vmem = rebuild(overlay, base, tmp, sealer, progress, memory_out=mem_tmp,
                                   durable=durable)
        else:
            child = temp_path(output, "child")  # swept like any temporary if we are killed
            try:
                report, vmem = rebuild(overlay, base, child, sealer, progress,
                                       whole_sectors=True, memory_out=mem_tmp)
                run("qemu-img", "convert", "-O", "qcow2", str(child), str(tmp))
                if sealer is not None:
                    os.chmod(tmp, 0o600)  # qemu-img recreated it with the usual mode
            finally:
                child.unlink(missing_ok=True)
    if vmem is not None:
        vmem = replace(vmem, path=memory_out)  # its final name
    return ApplyReport(str(output), manifest.virtual_size, flatten, report, vmem)
