"""Block geometry shared by create, apply and the base index."""

BLOCK = 4096  # dedupe and diff granularity: a guest page and the usual filesystem block
CHUNK = 1 << 20  # read size: large enough that per-call overhead vanishes
ZERO_BLOCK = bytes(BLOCK)
ZERO_CHUNK = bytes(CHUNK)


def is_zero(data: bytes) -> bool:
    """True if every byte is zero (compares against a preallocated zero buffer: fast in C)."""
    n = len(data)
    if n == BLOCK:
        return data == ZERO_BLOCK
    if n <= CHUNK:
        return data == ZERO_CHUNK[:n]
    return data.count(0) == n
