"""Every error a user can see, and the exit code each one ends the program with.

The codes are part of the interface (scripts and CI steps branch on them): never reuse or
renumber one. README.md tables them; tests/test_cli.py checks the table against this enum.
The codec (vmsynth.formats) has errors of its own that know nothing of exit codes; the
engine's overlay errors are also theirs, and `exit_code` maps both.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

from vmsynth.formats import errors as codec


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected: a bug, reported with --debug for a traceback
    USAGE = 2  # bad command line (click's own code)
    BASE_MISMATCH = 10  # overlay made for another base, or base not found
    OVER_BUDGET = 11  # overlay larger than --max-size
    UNSUPPORTED = 12  # newer format version or unknown required feature
    CORRUPT = 13  # bad magic, truncated, digest mismatch, malformed structure
    TOOL = 14  # an external tool (qemu-img ...) is missing or failed
    BOOT_FAILED = 15  # the VM did not become ready in time, or QEMU exited early
    BAD_INPUT = 16  # an input file is missing, unreadable, not an image, or unusable
    WRITE_FAILED = 17  # could not write the output (disk full, permissions)
    ACCEL_UNAVAILABLE = 18  # the requested accelerator (KVM) is missing or does not work here
    CHECK_FAILED = 19  # an image failed its check: no filesystem, or fsck found errors
    KEY = 20  # an encrypted overlay and no key, or the wrong key
    BUSY = 21  # a cached base is in use by another vmsynth process
    SNAPSHOT = 22  # a memory snapshot cannot be taken, or does not fit this base or this QEMU
    QEMU = 23  # QEMU refused a command over QMP, or its QMP socket failed
    DAMAGED_SNAPSHOT = 24  # a memory snapshot file is damaged (trailer, header or contents)
    FULL = 25  # the cloudlet has no free slot (try again after its Retry-After)
    UNAUTHORIZED = 26  # the cloudlet refused the token (none, wrong, another session's)
    CLOUDLET = 27  # the cloudlet could not be reached or trusted, or lost the session
    REGISTRY_NOT_FOUND = 28  # the registry has no such repository, tag or digest
    REGISTRY_UNAUTHORIZED = 29  # the registry wants credentials, or refused the ones given
    WRONG_ARTIFACT = 30  # the reference names something else than the vmsynth artifact asked
    DIGEST_MISMATCH = 31  # what the registry sent does not match its digest, size or identity
    REGISTRY_UNREACHABLE = 32  # the registry could not be reached, failed or broke the protocol
    NO_CLOUDLET = 40  # no cloudlet (nor fallback) can serve the overlay: run it locally
    HANGUP = 129  # SIGHUP (the terminal went away): stopped as carefully as by Ctrl-C
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM


class VmsynthError(Exception):
    """Base of every error shown to users as one line `error: ...`.

    The message says what is wrong; `hint` says what to do about it.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(VmsynthError):
    """A bad argument that only the engine can judge (a base name, an output path)."""

    exit_code = ExitCode.USAGE


class BaseMismatchError(VmsynthError):
    exit_code = ExitCode.BASE_MISMATCH


class OverBudgetError(VmsynthError):
    exit_code = ExitCode.OVER_BUDGET


class UnsupportedFormatError(VmsynthError, codec.UnsupportedError):
    exit_code = ExitCode.UNSUPPORTED


class CorruptOverlayError(VmsynthError, codec.CorruptError):
    exit_code = ExitCode.CORRUPT


class ToolError(VmsynthError):
    exit_code = ExitCode.TOOL


class BadInputError(VmsynthError):
    exit_code = ExitCode.BAD_INPUT


class WriteError(VmsynthError):
    exit_code = ExitCode.WRITE_FAILED


class BootError(VmsynthError):
    exit_code = ExitCode.BOOT_FAILED


class AccelError(VmsynthError):
    exit_code = ExitCode.ACCEL_UNAVAILABLE


class CheckFailedError(VmsynthError):
    exit_code = ExitCode.CHECK_FAILED


class WrongKeyError(VmsynthError, codec.WrongKeyError):
    """An encrypted overlay, and no key or the wrong one."""

    exit_code = ExitCode.KEY


class BusyError(VmsynthError):
    exit_code = ExitCode.BUSY


class SnapshotError(VmsynthError):
    """A VM cannot be snapshotted, or a memory snapshot does not fit a base or this host
    (machine type, CPU model, RAM size, QEMU version)."""

    exit_code = ExitCode.SNAPSHOT


class QMPError(VmsynthError):
    """QEMU refused a command, or its QMP socket did not answer."""

    exit_code = ExitCode.QEMU


class DamagedSnapshotError(VmsynthError):
    """A memory snapshot (.vmem) whose trailer, header or contents fail their checks."""

    exit_code = ExitCode.DAMAGED_SNAPSHOT


class CloudletFullError(VmsynthError):
    exit_code = ExitCode.FULL


class UnauthorizedError(VmsynthError):
    exit_code = ExitCode.UNAUTHORIZED


class CloudletError(VmsynthError):
    """The cloudlet cannot be reached or trusted, answered nonsense, or lost the session."""

    exit_code = ExitCode.CLOUDLET


class NoCloudletError(VmsynthError):
    """No cloudlet nearby (nor any fallback) can serve the overlay: the next tier is the
    device itself (degraded local mode)."""

    exit_code = ExitCode.NO_CLOUDLET


class RegistryNotFoundError(VmsynthError):
    """The registry has no such repository, tag or digest."""

    exit_code = ExitCode.REGISTRY_NOT_FOUND


class RegistryAuthError(VmsynthError):
    """The registry wants credentials and has none, or refused the ones given."""

    exit_code = ExitCode.REGISTRY_UNAUTHORIZED


class WrongArtifactError(VmsynthError):
    """A registry reference that names another kind of artifact (a container image, a base
    where an overlay was asked for)."""

    exit_code = ExitCode.WRONG_ARTIFACT


class DigestMismatchError(VmsynthError):
    """Bytes from a registry that are not what their descriptor names: another digest or
    size, or a base whose contents are not the identity it was published with."""

    exit_code = ExitCode.DIGEST_MISMATCH


class RegistryError(VmsynthError):
    """The registry cannot be reached or trusted, failed, or broke the protocol (a transfer
    that cannot be resumed, a byte range ignored)."""

    exit_code = ExitCode.REGISTRY_UNREACHABLE


_CODEC = ((codec.CorruptError, ExitCode.CORRUPT), (codec.UnsupportedError, ExitCode.UNSUPPORTED),
          (codec.WrongKeyError, ExitCode.KEY))


def exit_code(err: BaseException) -> ExitCode:
    """The exit code for an error a user can see (ERROR for anything else: a bug)."""
    if isinstance(err, VmsynthError):
        return err.exit_code
    return next((code for kind, code in _CODEC if isinstance(err, kind)), ExitCode.ERROR)


def is_user_error(err: BaseException) -> bool:
    """An error with its own message for the user (not a bug)."""
    return isinstance(err, (VmsynthError, codec.FormatError))
