"""Authenticated encryption of overlays (SPEC.md section 8): AES-256-GCM per frame.

A 32-byte master key comes from a key file, or from a passphrase through scrypt. Each
overlay has a random 16-byte file id; the file key is HKDF-SHA256(master, salt=file id), so
nonces (the frame number) never repeat under one key. Every frame's associated data is the
header digest plus the frame's own header, which holds its number: frames cannot be
reordered, moved to another overlay, or altered unnoticed. The summary is sealed too and
names the frame count, so dropping frames is noticed as well. Optional sections are sealed
under nonces of their own (00000001 + their ordinal), and the sealed summary lists them.
"""

from __future__ import annotations

import hmac
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import CorruptError, UnsupportedError, WrongKeyError

CIPHER = "aes-256-gcm"
TAG_SIZE = 16
KEY_SIZE = 32
FILE_ID_SIZE = 16
SCRYPT_DEFAULT = {"n": 1 << 15, "r": 8, "p": 1}  # 32 MiB, well inside the limits below
SCRYPT_LIMITS = {"n": 1 << 20, "r": 32, "p": 16}  # refuse headers that ask for more work
# What a crafted header may make a reader spend once a passphrase is given (SPEC.md 8):
# scrypt holds 128*n*r bytes, and its time grows with n*r*p.
SCRYPT_MAX_MEMORY = 256 << 20
SCRYPT_MAX_WORK = 1 << 22  # n*r*p: 16 times the default's
_FRAME_INFO = b"vmsynth overlay v1 frame key"
_CHECK_INFO = b"vmsynth overlay v1 key check"
_SUMMARY_NONCE = b"\xff" * 12  # frames use 0x00000000 + their number: never equal
_SECTION_NONCE = b"\0\0\0\x01"  # + the section's ordinal: apart from frames and summary


def _hkdf(master: bytes, file_id: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=file_id, info=info).derive(master)


def master_from_passphrase(passphrase: str, kdf: dict[str, Any]) -> bytes:
    try:
        salt = bytes.fromhex(kdf["salt"])
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CorruptError(f"overlay's key derivation parameters are malformed ({err})")
    if len(salt) < 16:
        raise CorruptError("overlay's scrypt salt is shorter than 16 bytes")
    check_scrypt(n, r, p)
    return Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(passphrase.encode())


def check_scrypt(n: int, r: int, p: int) -> None:
    """Refuse scrypt parameters that would cost a reader more than a user accepts.

    Raises:
        UnsupportedError: out of bounds (too much memory or work, or not a power of two).
    """
    if not (2 <= n <= SCRYPT_LIMITS["n"] and n & (n - 1) == 0 and 1 <= r <= SCRYPT_LIMITS["r"]
            and 1 <= p <= SCRYPT_LIMITS["p"]):
        raise UnsupportedError("overlay asks for scrypt parameters outside the limits "
                               "this vmsynth accepts")
    if 128 * n * r > SCRYPT_MAX_MEMORY or n * r * p > SCRYPT_MAX_WORK:
        raise UnsupportedError(f"overlay's passphrase derivation would take "
                               f"{128 * n * r >> 20} MiB of memory and {n * r * p >> 18} "
                               "times the usual work: more than this vmsynth accepts")


class Sealer:
    """Seals and opens one overlay's frames and summary."""

    def __init__(self, master: bytes, file_id: bytes, header_digest: bytes) -> None:
        self._aead = AESGCM(_hkdf(master, file_id, _FRAME_INFO, KEY_SIZE))
        self._header_digest = header_digest

    @staticmethod
    def key_check(master: bytes, file_id: bytes) -> str:
        """A value stored in the header that tells a wrong key from a damaged file."""
        return _hkdf(master, file_id, _CHECK_INFO, 16).hex()

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return b"\0\0\0\0" + seq.to_bytes(8, "big")

    def seal_frame(self, head_bytes: bytes, seq: int, payload: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(seq), payload, self._header_digest + head_bytes)

    def open_frame(self, head_bytes: bytes, seq: int, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(seq), sealed, self._header_digest + head_bytes)
        except InvalidTag:
            raise CorruptError(f"frame {seq} fails authentication (tampered with, or "
                                      "moved from another overlay)") from None

    def seal_section(self, head: bytes, ordinal: int, body: bytes) -> bytes:
        """An optional section's body; `head` is its tag and length, `ordinal` its place
        among the file's sections (SPEC.md 2.1)."""
        return self._aead.encrypt(_SECTION_NONCE + ordinal.to_bytes(8, "big"), body,
                                  self._header_digest + head)

    def open_section(self, head: bytes, ordinal: int, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(_SECTION_NONCE + ordinal.to_bytes(8, "big"), sealed,
                                      self._header_digest + head)
        except InvalidTag:
            raise CorruptError(f"optional section {ordinal} fails authentication") from None

    def seal_summary(self, body: bytes, frames: int) -> bytes:
        aad = self._header_digest + b"SUMM" + frames.to_bytes(8, "little")
        return self._aead.encrypt(_SUMMARY_NONCE, body, aad)

    def open_summary(self, sealed: bytes, frames: int) -> bytes:
        aad = self._header_digest + b"SUMM" + frames.to_bytes(8, "little")
        try:
            return self._aead.decrypt(_SUMMARY_NONCE, sealed, aad)
        except InvalidTag:
            raise CorruptError("overlay summary fails authentication (frames were "
                                      "added, dropped or altered)") from None


def open_sealer(encryption: dict[str, Any], header_digest: bytes, key_file: bytes | None,
                passphrase: str | None) -> Sealer:
    """The Sealer for an encrypted overlay's manifest `encryption` block and a key.

    Raises:
        WrongKeyError: no key was given, or the key does not match.
    """
    try:
        if encryption["cipher"] != CIPHER:
            raise UnsupportedError(f"unknown cipher {encryption['cipher']!r}")
        file_id = bytes.fromhex(encryption["file_id"])
        kdf = dict(encryption["kdf"])
        check = encryption["key_check"]
        if not isinstance(check, str) or not check.isascii():
            raise ValueError("key_check is not a hex string")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptError(f"overlay's encryption block is malformed ({err})") from err
    if kdf.get("name") == "scrypt":
        if passphrase is None:
            raise WrongKeyError("overlay is encrypted with a passphrase and none was given",
                                hint="set VMSYNTH_PASSPHRASE, or run in a terminal to be asked")
        master = master_from_passphrase(passphrase, kdf)
    elif kdf.get("name") == "none":
        if key_file is None:
            raise WrongKeyError("overlay is encrypted with a key file and none was given",
                                hint="pass --key-file FILE")
        master = key_file
    else:
        raise UnsupportedError(f"unknown key derivation {kdf.get('name')!r}")
    if not hmac.compare_digest(Sealer.key_check(master, file_id), check):
        raise WrongKeyError("wrong key for this overlay" if kdf["name"] == "none"
                            else "wrong passphrase for this overlay")
    return Sealer(master, file_id, header_digest)


def new_encryption(key_file: bytes | None, passphrase: str | None, file_id: bytes,
                   salt: bytes) -> tuple[dict[str, Any], bytes]:
    """(manifest `encryption` block, master key) for a new overlay."""
    if key_file is not None:
        kdf: dict[str, Any] = {"name": "none"}
        master = key_file
    else:
        assert passphrase is not None
        kdf = {"name": "scrypt", "salt": salt.hex(), **SCRYPT_DEFAULT}
        master = master_from_passphrase(passphrase, kdf)
    block = {"cipher": CIPHER, "file_id": file_id.hex(), "kdf": kdf,
             "key_check": Sealer.key_check(master, file_id)}
    return block, master
