"""Byte layout of a vmsynth overlay, version 1. SPEC.md is the normative text; this mirrors it.

All integers are little-endian. Digests are SHA-256.
"""

from __future__ import annotations

import re
import struct
from enum import IntEnum, IntFlag

MAGIC = b"\x89VSO\r\n\x1a\n"  # like PNG's: catches text-mode and 7-bit transfers
MAJOR = 1
MINOR = 2  # the revision of SPEC.md this writer follows (readers never refuse a minor)
MINOR_LEGACY_MEMORY = 1  # 1.1 files had memory streams without the MEMORY bit (SPEC.md 10)
DIGEST_SIZE = 32
MEDIA_TYPE = "application/vnd.vmsynth.overlay.v1"  # an overlay file, any 1.x (SPEC.md 12)
# A digest string (SPEC.md 12): algorithm ":" lowercase hex; version 1 knows only sha256.
DIGEST_STRING = re.compile(r"sha256:[0-9a-f]{64}")

# Header: magic, major, minor, header_length, incompat, compat, manifest_length, reserved;
# then the manifest (canonical JSON) and the SHA-256 of everything before it.
HEADER = struct.Struct("<8sHHIQQII")
MAX_HEADER = 1 << 20

# Frame header; its digest covers these 24 bytes and the stored payload.
FRAME_TAG = b"FRAM"
FRAME = struct.Struct("<4sBBHIIII")
FRAME_HEAD_SIZE = FRAME.size + DIGEST_SIZE
MAX_FRAME_RAW = 32 << 20  # a reader refuses larger frames before allocating anything
MAX_FRAME_RECORDS = 1 << 20
SOLID_WINDOW_LOG = 27  # a solid overlay's zstd window: what a reader holds of earlier frames

# Record, 32 bytes: kind (1), reserved (3), stored, target, length, source. The first four
# bytes are read as one integer, so the reserved check costs one comparison per record:
# kind is its low byte, and anything above 0xFF is a non-zero reserved byte.
RECORD = struct.Struct("<IIQQQ")
RECORD_KIND_MAX = 0xFF

SUMMARY_TAG = b"SUMM"
SECTION = struct.Struct("<4sI")  # tag, length (summary) or count (index)
MAX_SUMMARY = 1 << 20

# Optional section: SECTION (tag, whose first byte is a-z; body length), the SHA-256 of those
# 8 bytes and the body, then the body. Readers verify and skip the ones they do not know.
OPTIONAL_HEAD_SIZE = SECTION.size + DIGEST_SIZE
MAX_OPTIONAL = 16 << 20  # one section's body: what a reader may have to hold
MAX_OPTIONAL_COUNT = 64  # sections in one overlay (the summary lists them)
INDEX_TAG = b"INDX"
# Index entry: frame offset, stored, raw, records, stream, codec, reserved, target range, digest.
INDEX_ENTRY = struct.Struct("<QIIIBBHQQ32s")

TRAILER_MAGIC = b"VSO-END\x00"
TRAILER = struct.Struct("<8sQQQ32s")  # magic, summary offset, index offset, file length, digest


class Stream(IntEnum):
    DISK = 0
    MEMORY = 1  # a memory snapshot's contents: RAM, then device state (1.1)


class Codec(IntEnum):
    STORED = 0
    ZSTD = 1


class Kind(IntEnum):
    DATA = 1  # `length` bytes from the frame's data area
    ZERO = 2  # `length` zero bytes
    BASE = 3  # `length` bytes of the base, from offset `source`
    COPY = 4  # `length` bytes of the result, from offset `source` (< target)
    DELTA = 5  # zstd frame decoded with base[source:source+length] as raw-content dictionary
    DISK = 6  # `length` bytes of the base's disk, from `source` (incompat MEMORY; memory frames)
    DISK_COPY = 7  # `length` bytes of the rebuilt disk, from `source` (incompat MEMORY; memory)


class Incompat(IntFlag):
    """Features a reader must understand to read the file; unknown bits: refuse."""

    NONE = 0
    ENCRYPTED = 1  # frames and summary sealed with AES-256-GCM (seal.py)
    SOLID = 2  # the frames' payloads are consecutive pieces of one zstd stream (frames.py)
    MEMORY = 4  # a memory stream, record kinds DISK and DISK_COPY (1.2; implied in 1.1 files)


class Compat(IntFlag):
    """Features a reader may ignore."""

    NONE = 0


FRAME_ENCRYPTED = 1  # frame flag: the stored payload is sealed

KNOWN_INCOMPAT = Incompat.ENCRYPTED | Incompat.SOLID | Incompat.MEMORY
KNOWN_COMPAT = Compat.NONE
# The manifest's `feature_names` entries for the bits this writer knows (SPEC.md 9).
FEATURE_NAMES = {"incompat": {Incompat.ENCRYPTED: "encryption", Incompat.SOLID: "solid",
                              Incompat.MEMORY: "memory"},
                 "compat": {}}
KNOWN_FRAME_FLAGS = FRAME_ENCRYPTED
TAG_SIZE = 16  # AES-GCM tag appended to a sealed payload
