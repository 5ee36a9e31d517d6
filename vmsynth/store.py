"""Writing files so that a crash or an error never leaves a half-written file under its name."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WriteError


def write_error(path: Path | str, err: OSError) -> WriteError:
    if err.errno == errno.ENOSPC:
        return WriteError(f"{path}: no space left on the device",
                          hint="free some space or write the output elsewhere")
    return WriteError(f"{path}: cannot write: {err.strerror or err}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp",
                                        dir=final.parent or ".")
    except OSError as err:
        raise write_error(final, err) from err
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result gets the usual mode
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(final, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
