"""Soft-state sessions: a per-user working directory that leaves nothing behind.

`vmsynth run` rebuilds the user's disk into a session directory, boots it, and when the VM
ends scrubs the directory: every file is overwritten with zeros and synced before it is
unlinked (QEMU has exited by then, so no open handle keeps the old bytes alive).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import bases
from .store import Inputs, pid_alive, write_error

SCRUB_CHUNK = 1 << 20


@dataclass
class Session:
    id: str
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def memory(self) -> Path:
        return self.dir / "memory.vmem"


_SESSION = re.compile(r"(\d{1,10})-[0-9a-f]{12}")


def scrub_stale(keep: Inputs | None = None) -> list[str]:
    """Scrub the sessions of processes that no longer exist (a vmsynth killed with -9, or a
    host that crashed, could not scrub its own), except one that holds a file of `keep`
    (what this command is about to read). Returns the ids scrubbed."""
    folder = bases.cache_dir("sessions")
    scrubbed = []
    for old in folder.iterdir():
        match = _SESSION.fullmatch(old.name)
        if match and old.is_dir() and not old.is_symlink() and \
                not pid_alive(int(match.group(1))) and \
                not (keep and any(keep.holds(p) for p in old.rglob("*"))):
            destroy(Session(old.name, old))
            scrubbed.append(old.name)
    return scrubbed


def new(keep: Inputs | None = None) -> Session:
    """A new session, named with our PID, once dead processes' sessions are scrubbed."""
    scrub_stale(keep)
    folder = bases.cache_dir("sessions")
    sid = f"{os.getpid()}-{secrets.token_hex(6)}"
    try:
        (folder / sid).mkdir(mode=0o700)
        os.chmod(folder / sid, 0o700)  # the user's data: nobody else reads it while it runs
    except OSError as err:
        raise write_error(folder / sid, err, "create the session directory") from err
    return Session(sid, folder / sid)


def _data_extents(fd: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a file that hold data (everything, where holes are unknown)."""
    size = os.fstat(fd).st_size
    extents, pos = [], 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: no data after pos
            return [(0, size)]
    return extents


def scrub_file(path: Path) -> None:
    """Overwrite a file's bytes with zeros, sync, then unlink it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        zeros = bytes(SCRUB_CHUNK)
        for start, end in _data_extents(fd):  # holes hold nothing: a sparse RAM image is fast
            for offset in range(start, end, SCRUB_CHUNK):
                os.pwrite(fd, zeros[: min(SCRUB_CHUNK, end - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def destroy(session: Session) -> None:
    """Scrub and remove everything in the session directory."""
    if not session.dir.exists():
        return
    for path in sorted(session.dir.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            path.unlink()  # never follow a link out of the session
        elif path.is_dir():
            path.rmdir()
        else:
            scrub_file(path)
    session.dir.rmdir()
