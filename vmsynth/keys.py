"""Keys for encrypted overlays: key files, passphrases, and which one an overlay needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsynth.formats.container import Header
from vmsynth.formats.seal import FILE_ID_SIZE, KEY_SIZE, Sealer, new_encryption, open_sealer

from .errors import BadInputError, CorruptOverlayError, UsageError, WriteError, WrongKeyError


@dataclass(frozen=True)
class Key:
    """What the user gave: a key file's 32 bytes, or a passphrase (never on a command line)."""

    key_file: bytes | None = None
    passphrase: str | None = None
    # Asked only when an overlay turns out to be encrypted (an interactive prompt).
    ask: Callable[[], str] | None = None
    # Fixed values instead of random ones, for reproducible test vectors only.
    file_id: bytes | None = None
    salt: bytes | None = None


def read_key_file(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"key file {path}: no such file") from None
    except OSError as err:
        raise BadInputError(f"key file {path}: cannot read: {err.strerror}") from None
    if len(data) != KEY_SIZE:
        raise UsageError(f"key file {path} holds {len(data)} bytes, not {KEY_SIZE}",
                         hint="make one with `vmsynth keygen -o FILE`")
    return data


def keygen(path: Path) -> None:
    """Write 32 random bytes to a new file readable by its owner only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: refusing to overwrite a key",
                         hint="choose another file name") from None
    except OSError as err:
        raise WriteError(f"{path}: cannot create: {err.strerror}") from None
    try:
        os.write(fd, os.urandom(KEY_SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)


def encryption_for_new(key: Key) -> tuple[dict[str, Any], bytes, bytes]:
    """(manifest block, master key, file id) for an overlay about to be written."""
    file_id = key.file_id or os.urandom(FILE_ID_SIZE)
    block, master = new_encryption(key.key_file, key.passphrase, file_id,
                                   key.salt or os.urandom(16))
    return block, master, file_id


def sealer_for(header: Header, key: Key | None) -> Sealer | None:
    """The Sealer an overlay needs (None if it is not encrypted).

    Raises:
        WrongKeyError: encrypted and no or the wrong key; or a key for a plain overlay
            (refused: a plain file where an encrypted one was expected may be a substitute).
    """
    block = header.manifest.get("encryption")
    if not header.encrypted:
        if key is not None and (key.key_file is not None or key.passphrase is not None):
            raise WrongKeyError("a key was given, but this overlay is not encrypted",
                                hint="unset VMSYNTH_PASSPHRASE / drop --key-file if a plain "
                                     "overlay is expected")
        return None
    if not isinstance(block, dict):
        raise CorruptOverlayError("overlay is marked encrypted but has no encryption block")
    if key is None:
        raise WrongKeyError("overlay is encrypted and no key was given",
                            hint="pass --key-file FILE, or set VMSYNTH_PASSPHRASE")
    passphrase = key.passphrase
    if passphrase is None and key.key_file is None and key.ask is not None:
        passphrase = key.ask()
    return open_sealer(block, header.digest, key.key_file, passphrase)
