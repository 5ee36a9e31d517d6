"""What the codec raises when a file is not what the format allows.

The codec stands alone: it knows nothing of exit codes or of the engine that uses it. Each
error says what is wrong with the file and, where it helps, what to do (`hint`); the engine
maps the three kinds to its own outcomes (vmsynth.errors.exit_code).

    FormatError            the root: nothing else escapes the codec on bad input
     +-- CorruptError      damaged, truncated, malformed, a digest that does not match
     +-- UnsupportedError  a newer version, an unknown required feature, kind or codec
     +-- WrongKeyError     encrypted, and no key or the wrong one
"""

from __future__ import annotations


class FormatError(Exception):
    """The file breaks a rule of the format (SPEC.md)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class CorruptError(FormatError):
    """Damaged, truncated or malformed: a reader must refuse the file."""


class UnsupportedError(FormatError):
    """Valid, perhaps, but needs what this reader does not know (a newer version, an
    unknown incompatible feature, stream, record kind or codec)."""


class WrongKeyError(FormatError):
    """An encrypted file, and no key or the wrong key."""
