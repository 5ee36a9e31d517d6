"""Writing files so that a crash or an error never leaves a half-written file under its name.

Outputs are written to a temporary name beside the final one (same filesystem, so the final
rename is atomic) and renamed only when complete and synced. A process killed mid-way leaves
only its temporary file, named with its PID; the next write to the same name removes such
leftovers of dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WriteError


def write_error(path: Path | str, err: OSError) -> WriteError:
    if err.errno == errno.ENOSPC:
        return WriteError(f"{path}: no space left on the device",
                          hint="free some space or write the output elsewhere")
    return WriteError(f"{path}: cannot write: {err.strerror or err}")


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


_TEMP_TAIL = re.compile(r"(\d{1,10})\.[A-Za-z0-9_]+(?:\.child)?\.tmp")


def remove_stale_temps(final: Path) -> None:
    """Delete temporary files for `final` left by processes that no longer exist.

    Only names of exactly our shape count (`.NAME.PID.RANDOM[.child].tmp`), so the
    temporaries of a longer output name beside it are never mistaken for ours.
    """
    prefix = f".{final.name}."
    for leftover in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        match = _TEMP_TAIL.fullmatch(leftover.name[len(prefix):])
        if match and not pid_alive(int(match.group(1))):
            leftover.unlink(missing_ok=True)


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


@contextlib.contextmanager
def atomic_path(final: Path, private: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    `private` keeps the result readable by its owner only (decrypted user data); `durable`
    syncs the directory after the rename (the caller syncs the file itself).
    """
    final = Path(final)
    folder = final.parent
    remove_stale_temps(final)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp",
                                        dir=folder)
    except OSError as err:
        raise write_error(final, err) from err
    os.close(fd)
    tmp = Path(tmp_name)
    if not private:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the usual mode
    try:
        yield tmp
        os.replace(tmp, final)
        if durable:
            _sync_dir(folder)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(final, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def scratch_dir(kind: str) -> Path:
    """A new private scratch directory in $TMPDIR, named with our PID.

    Scratch directories of processes that died without cleaning up (kill -9) are removed
    first, so they cannot pile up.
    """
    parent = Path(tempfile.gettempdir())
    pattern = re.compile(rf"vmsynth-{re.escape(kind)}-(\d{{1,10}})-[A-Za-z0-9_]+")
    for old in parent.glob(f"vmsynth-{kind}-*"):
        match = pattern.fullmatch(old.name)
        if match and old.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"vmsynth-{kind}-{os.getpid()}-"))
