"""Writing files so that nothing the user owns is ever destroyed, and nothing half-written
ever appears under a final name.

- No output may be an input: `Inputs` holds the identity (device, inode) of every file a
  command reads, however it was named (a symlink, a hard link, `..`), and `check_output`
  refuses an output that is one of them, or that is not a regular file (a device node or a
  FIFO is never replaced by a rename).
- Outputs are written to a temporary name beside the final one (same filesystem, so the
  rename is atomic) and renamed only when complete; several outputs of one command are
  renamed together with the stop signals held, so an interrupt cannot separate them.
- Temporary names carry the writer's PID. A process that is stopped removes its own; the
  next write into a folder removes those of dead processes (a `kill -9`), whatever output
  they were for, but never a file the command reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from . import signals
from .errors import BadInputError, UsageError, WriteError

TEMP_MARK = "vmsynth"  # in every temporary name: only files of exactly our shape are swept
_TEMP = re.compile(rf"\..+\.(\d{{1,10}})\.{TEMP_MARK}[A-Za-z0-9_]+(?:\.[a-z]+)?\.tmp")


def write_error(path: Path | str, err: OSError, doing: str = "write") -> WriteError:
    if err.errno == errno.ENOSPC:
        return WriteError(f"{path}: no space left on the device",
                          hint="free some space or write the output elsewhere")
    if err.errno == errno.EPIPE:
        return WriteError(f"{path} was closed before everything was written (the program "
                          "reading it stopped early)")
    return WriteError(f"{path}: cannot {doing}: {err.strerror or err}")


def read_error(path: Path | str, err: OSError) -> BadInputError:
    return BadInputError(f"{path}: cannot read: {err.strerror or err}")


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# -- inputs and outputs ---------------------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class Inputs:
    """The files a command reads, by identity, so that no output can be one of them."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, int], str] = {}

    def add(self, what: str, path: Path | str | None) -> None:
        """Remember `path` (following symlinks) as `what`; a missing file is no clash."""
        if path is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(path)
            self._ids.setdefault((st.st_dev, st.st_ino), f"the {what} {path}")

    def add_fd(self, what: str, fd: int) -> None:
        """An input known only by its open file (standard input redirected from a file)."""
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self._ids.setdefault((st.st_dev, st.st_ino), f"the {what}")

    def holds(self, path: Path | str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self._ids

    def check_output(self, option: str, path: Path | str, stream: bool = False) -> bool:
        """Refuse an output that is an input, or a file a rename would wrongly replace.

        Returns True when `path` is a character device or a FIFO and `stream` allows
        writing such a file in place (an overlay is written front to back, like to a pipe).

        Raises:
            UsageError: `path` is a file this command reads, or not a regular file.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False  # nothing there yet (or a dangling symlink: the rename replaces it)
        except OSError as err:
            raise UsageError(f"{option} {path}: cannot use it ({err.strerror})") from None
        clash = self._ids.get((st.st_dev, st.st_ino))
        if clash is not None:
            raise UsageError(f"{option} {path} is {clash}: refusing to overwrite it",
                             hint="write the output to another file")
        if stat.S_ISREG(st.st_mode):
            return False
        if stream and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            return True
        raise UsageError(f"{option} {path} is {_kind(st.st_mode)}, not a regular file: "
                         "refusing to replace it",
                         hint="write to a regular file" + (", or to standard output with -"
                                                           if stream else ""))


def check_distinct(outputs: list[tuple[str, Path]]) -> None:
    """Two outputs of one command must be two files."""
    seen: dict[str, str] = {}
    for option, path in outputs:
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(f"{option} and {seen[key]} name the same file {path}",
                             hint="give each output its own file")
        seen[key] = option


# -- temporary files ------------------------------------------------------------------------

def remove_stale_temps(folder: Path, keep: Inputs | None = None) -> None:
    """Delete the temporary files in `folder` of vmsynth processes that no longer exist.

    Only names of exactly our shape count (`.NAME.PID.vmsynthRANDOM[.kind].tmp`), never a
    file this command reads, and never one of a live process.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        leftover = folder / name
        if keep is not None and keep.holds(leftover):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(leftover).st_mode):
                leftover.unlink()


def temp_path(final: Path, kind: str = "") -> Path:
    """A new empty file beside `final`, named as a temporary of this process."""
    suffix = f".{kind}.tmp" if kind else ".tmp"
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.{TEMP_MARK}",
                                    suffix=suffix, dir=final.parent)
    except OSError as err:
        raise write_error(final, err, "create a temporary file beside it") from err
    os.close(fd)
    return Path(name)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The user-facing results (Outputs made with `announce`) renamed into place, when the caller
# asked to know: the CLI, to report truthfully on an interrupt that came after them.
completed: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar(
    "completed", default=None)


class Outputs:
    """The results of one command, written under temporary names, renamed as one set."""

    def __init__(self, durable: bool = True, keep: Inputs | None = None,
                 announce: bool = False) -> None:
        self.durable = durable
        self.keep = keep
        self.announce = announce
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)
        self.committed: list[Path] = []

    def add(self, final: Path, private: bool = False) -> Path:
        """A temporary path for `final`; `private` keeps it readable by its owner only."""
        final = Path(final)
        remove_stale_temps(final.parent, self.keep)
        tmp = temp_path(final)
        self._pending.append((tmp, final))
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual mode
        return tmp

    def commit(self) -> None:
        """Rename every result into place, with the stop signals held meanwhile."""
        with signals.deferred():
            while self._pending:
                tmp, final = self._pending[0]
                try:
                    os.replace(tmp, final)
                except OSError as err:
                    raise write_error(final, err, "rename the finished file into place") \
                        from err
                self._pending.pop(0)
                self.committed.append(final)
                record = completed.get()
                if record is not None and self.announce:
                    record.append(final)
        if self.durable:
            for folder in {final.parent for final in self.committed}:
                _sync_dir(folder)

    def abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []


@contextlib.contextmanager
def atomic_outputs(durable: bool = True, keep: Inputs | None = None,
                   announce: bool = False) -> Iterator[Outputs]:
    """Outputs renamed into place together when the block succeeds, removed if it fails.

    An OSError in the block is a failure to write (reading errors are the inputs' to
    report): it becomes a WriteError naming the final file. `announce`: these are results
    the user asked for (not caches or session files), listed in `completed`.
    """
    outputs = Outputs(durable, keep, announce)
    try:
        yield outputs
        outputs.commit()
    except OSError as err:
        outputs.abort()
        final = outputs._pending[0][1] if outputs._pending else "the output"
        raise write_error(final, err) from err
    except BaseException:
        outputs.abort()
        raise


@contextlib.contextmanager
def atomic_path(final: Path, private: bool = False, durable: bool = True,
                keep: Inputs | None = None, announce: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place if the block succeeds."""
    final = Path(final)
    with atomic_outputs(durable, keep, announce) as outputs:
        tmp = outputs.add(final, private)
        try:
            yield tmp
        except OSError as err:
            raise write_error(final, err) from err


def write_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class StreamOutput:
    """A write-only stream (standard output, a FIFO) whose failures are WriteErrors."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self.raw, self.name = raw, name

    def write(self, data: bytes) -> int:
        try:
            return self.raw.write(data)
        except OSError as err:
            raise write_error(self.name, err) from err

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as err:
            raise write_error(self.name, err) from err


def scratch_dir(kind: str) -> Path:
    """A new private scratch directory in $TMPDIR, named with our PID.

    Scratch directories of processes that died without cleaning up (kill -9) are removed
    first, so they cannot pile up.
    """
    parent = Path(tempfile.gettempdir())
    pattern = re.compile(rf"vmsynth-{re.escape(kind)}-(\d{{1,10}})-[A-Za-z0-9_]+")
    for old in parent.glob(f"vmsynth-{kind}-*"):
        match = pattern.fullmatch(old.name)
        if match and old.is_dir() and not old.is_symlink() and \
                not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f"vmsynth-{kind}-{os.getpid()}-"))
    except OSError as err:
        raise write_error(parent, err, "create a scratch directory in") from err
