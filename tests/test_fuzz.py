"""Mutation fuzzing of overlays: the committed test vectors and overlays made here (plain and
encrypted), damaged at random and in structured ways.

The property, for every mutation: it either verifies and applies to exactly the original
disk, or it is refused with a vmsynth error (a VmsynthError subclass with a documented exit
code; through the CLI, that code and one line on stderr, no traceback). Never another
exception, never a hang (each example runs under an alarm), never a memory blow-up (each
example's peak of traced allocations is bounded, and the process's address space is capped
while fuzzing so that a runaway allocation fails fast instead of taking the machine down).

Families of mutations, each its own test so that each reports its own counts:
  raw       bit flips, byte overwrites, truncations, extensions, insertions, deletions, frames
            duplicated/swapped/deleted as raw bytes, huge sizes written into frame headers,
            summary, index, trailer and header (no digest recomputed)
  frames    frames duplicated, swapped, deleted, spliced from another overlay, or with header
            fields set to huge or odd values, with frame digests, index and trailer recomputed
  records   (plain overlays) one record field set to a huge or odd value, records added or
            dropped, inside a re-encoded frame with every digest recomputed
  summary   summary fields set to huge or odd values (plain) or sealed bytes damaged
            (encrypted), trailer digest recomputed
  manifest  manifest fields set to huge or odd values, header digest recomputed

Only the manifest family may legitimately change the result (a plain overlay's header is
protected by an unkeyed digest, and a changed disk size is not covered by the result digest):
there a successful apply must give the original disk cut or zero-extended to the new size.

Environment: VMSYNTH_FUZZ_EXAMPLES, mutations per family (default 100: the file runs in
well under a minute; `make fuzz` sets thousands); VMSYNTH_FUZZ_SEED, a seed for a new
exploration (unset: derandomized, the same examples every run); VMSYNTH_FUZZ_TIMEOUT, seconds
one example may take before it counts as a hang (default 60); VMSYNTH_FUZZ_CENSUS=1, count
examples that break the property (as "BUG: ...") and go on instead of failing at the first, to
see how often each bug is hit. Counts are printed (pytest -s) and written to
.build/fuzz-report.json (or VMSYNTH_FUZZ_REPORT).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import pytest
import zstandard
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from vmsynth.cli.main import main
from vmsynth.formats import seal
from vmsynth.formats.container import canonical_json
from vmsynth.formats.errors import FormatError
from vmsynth.formats.layout import (
    FRAME_HEAD_SIZE,
    HEADER,
    MAX_FRAME_RAW,
    MAX_HEADER,
    RECORD,
    SECTION,
    TRAILER,
)

from vmsynth import bases
from vmsynth import create as create_mod
from vmsynth.apply import apply
from vmsynth.errors import ExitCode, VmsynthError, exit_code
from vmsynth.keys import Key, keygen
from vmsynth.qcow2 import Qcow2Image
from vmsynth.verify import describe, verify

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "formats" / "vectors"
REPORT = Path(os.environ.get("VMSYNTH_FUZZ_REPORT") or REPO / ".build" / "fuzz-report.json")

EXAMPLES = int(os.environ.get("VMSYNTH_FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("VMSYNTH_FUZZ_SEED")
TIMEOUT = float(os.environ.get("VMSYNTH_FUZZ_TIMEOUT", "60"))
CENSUS = bool(os.environ.get("VMSYNTH_FUZZ_CENSUS"))  # count property failures, do not stop
PEAK_LIMIT = 256 << 20  # traced bytes one example may hold at once
ADDRESS_SPACE_MARGIN = 2 << 30  # while fuzzing: what the process may map beyond its start

# What refusing a damaged overlay may look like (exit codes): corrupt, unsupported, wrong
# key, or (for a damaged manifest naming another base) base mismatch. Never 1 (a bug).
ALLOWED = {ExitCode.CORRUPT, ExitCode.UNSUPPORTED, ExitCode.KEY, ExitCode.BASE_MISMATCH}


def fuzz_settings(test):
    """max_examples from the environment; derandomized unless a seed is given."""
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None,
                    database=None if SEED is None else settings.default.database,
                    suppress_health_check=list(HealthCheck), print_blob=True)(test)
    return seed(int(SEED))(test) if SEED is not None else test


# ------------------------------------------------------------------------------ sources

class Source:
    """An overlay to mutate, and what it takes to read it. (Not a dataclass: hypothesis
    prints a failing example's arguments, and dataclasses are printed field by field.)"""

    def __init__(self, name: str, data: bytes, base: bases.Base, expected: bytes,
                 key: Key | None = None, cli_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.data, self.base, self.expected = name, data, base, expected
        self.key, self.cli_args, self.env = key, cli_args or [], env or {}

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def __repr__(self) -> str:  # hypothesis prints its arguments: keep that readable
        return f"<{self.name}: {len(self.data)} bytes>"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encrypted_overlay(small_pair, key: Key) -> bytes:
    base = bases.load_path(small_pair.base_path)
    disk = Qcow2Image(small_pair.app_path)
    out = io.BytesIO()
    try:
        with mock.patch.object(create_mod, "FRAME_DATA", 4096), \
                mock.patch.dict(seal.SCRYPT_DEFAULT, {"n": 1 << 10}):  # cheap to derive
            create_mod.create(base, disk, out, 3, key=key)
    finally:
        disk.close()
        base.close()
    return out.getvalue()


@pytest.fixture(scope="module")
def sources(small_pair, tmp_path_factory, h) -> Iterator[dict[str, Source]]:
    d = tmp_path_factory.mktemp("fuzz-sources")
    gen = load_generator()
    vector_base_path, vector_app = gen.build_images(d / "vector-images")
    vector_base = gen.open_base(vector_base_path)
    pair_base = bases.load_path(small_pair.base_path)
    keygen(d / "fuzz.key")
    key = (d / "fuzz.key").read_bytes()
    vector_key = VECTORS / DOC_KEY_FILE
    out = {
        "vector-good": Source("vector-good", (VECTORS / "good.vmo").read_bytes(), vector_base,
                              h.read_image(vector_app)),
        "vector-enc-key": Source("vector-enc-key", (VECTORS / "enc-key-good.vmo").read_bytes(),
                                 vector_base, h.read_image(vector_app),
                                 Key(key_file=vector_key.read_bytes()),
                                 ["--key-file", str(vector_key)]),
        "plain-multi": Source("plain-multi", small_pair.multi, pair_base, small_pair.app_data),
        "plain-single": Source("plain-single", small_pair.overlay, pair_base,
                               small_pair.app_data),
        "enc-key": Source("enc-key", encrypted_overlay(small_pair, Key(key_file=key)), pair_base,
                          small_pair.app_data, Key(key_file=key),
                          ["--key-file", str(d / "fuzz.key")]),
        "enc-pass": Source("enc-pass", encrypted_overlay(small_pair, Key(passphrase="fuzz")),
                           pair_base, small_pair.app_data, Key(passphrase="fuzz"), [],
                           {"VMSYNTH_PASSPHRASE": "fuzz"}),
    }
    # Sanity: every source is valid as it is, or the property below means nothing.
    for src in out.values():
        verify(io.BytesIO(src.data), key=src.key)
    yield Corpus(out)
    vector_base.close()
    pair_base.close()


class Corpus(dict):
    def __repr__(self) -> str:
        return f"<{len(self)} sources>"


DOC_KEY_FILE = json.loads((VECTORS / "vectors.json").read_text())["key_file"]["name"]
PLAIN = ["vector-good", "plain-multi", "plain-single"]
ALL = PLAIN + ["vector-enc-key", "enc-key", "enc-pass"]
MULTI = ["plain-multi", "vector-enc-key", "enc-key", "enc-pass"]  # several frames


# ------------------------------------------------------------------------------ bookkeeping

@dataclass
class Stats:
    tried: int = 0
    accepted: int = 0  # verified, applied, and the result is the original disk
    verify_only: int = 0  # verified without a base, then refused by apply
    rejected: Counter = field(default_factory=Counter)  # by the first error class
    by_mutation: Counter = field(default_factory=Counter)
    accepted_by_mutation: Counter = field(default_factory=Counter)
    max_peak_mib: float = 0.0
    max_seconds: float = 0.0
    failure: str | None = None
    wall_seconds: float = 0.0


STATS: dict[str, Stats] = {}


@pytest.fixture(autouse=True)
def _no_ambient_passphrase(monkeypatch):
    monkeypatch.delenv("VMSYNTH_PASSPHRASE", raising=False)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not STATS:
        return
    doc = {"examples_per_family": EXAMPLES, "seed": SEED or "derandomized", "census": CENSUS,
           "timeout_seconds": TIMEOUT, "peak_limit_mib": PEAK_LIMIT >> 20, "families": {}}
    total = Stats()
    lines = ["", f"fuzz: {EXAMPLES} examples per family, seed {SEED or 'derandomized'}"]
    for family, s in sorted(STATS.items()):
        doc["families"][family] = {
            "tried": s.tried, "accepted": s.accepted, "verify_only_then_refused": s.verify_only,
            "rejected": dict(sorted(s.rejected.items())),
            "mutations": dict(sorted(s.by_mutation.items())),
            "accepted_mutations": dict(sorted(s.accepted_by_mutation.items())),
            "max_peak_mib": round(s.max_peak_mib, 1), "max_example_seconds":
                round(s.max_seconds, 3), "wall_seconds": round(s.wall_seconds, 1),
            "failure": s.failure}
        total.tried += s.tried
        total.accepted += s.accepted
        total.verify_only += s.verify_only
        total.rejected.update(s.rejected)
        lines.append(f"  {family:9} tried {s.tried:6}  accepted {s.accepted:5}  rejected "
                     f"{sum(s.rejected.values()):6} {dict(sorted(s.rejected.items()))}"
                     + (f"  FAILED: {s.failure[:100]}" if s.failure else ""))
    doc["total"] = {"tried": total.tried, "accepted": total.accepted,
                    "verify_only_then_refused": total.verify_only,
                    "rejected": dict(sorted(total.rejected.items()))}
    lines.append(f"  {'total':9} tried {total.tried:6}  accepted {total.accepted:5}  rejected "
                 f"{sum(total.rejected.values()):6} {dict(sorted(total.rejected.items()))}")
    print("\n".join(lines))
    try:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass


class Hang(Exception):
    """An example ran longer than VMSYNTH_FUZZ_TIMEOUT."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def ring(signum, frame):
        raise Hang(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def guarded() -> Iterator[None]:
    """Trace allocations and cap the address space while the fuzz tests run."""
    tracemalloc.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + ADDRESS_SPACE_MARGIN
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        tracemalloc.stop()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Examples write to tmpfs when there is one: fsync costs nothing there."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="vmsynth-fuzz-", dir=parent))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ the property

def _attempt(what: str, fn: Callable[[], object]) -> VmsynthError | FormatError | None:
    try:
        fn()
    except (VmsynthError, FormatError) as err:
        assert exit_code(err) in ALLOWED, (
            f"{what}: {type(err).__name__} (exit {int(exit_code(err))}) is not how a damaged "
            f"overlay should be refused: {err}")
        return err
    except MemoryError as err:
        raise AssertionError(f"{what}: memory blow-up (MemoryError under the address-space cap)"
                             ) from err
    except Hang:
        raise
    except Exception as err:
        raise AssertionError(f"{what}: not a vmsynth error: {type(err).__name__}: {err}"
                             ) from err
    return None


def _cli(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 0
    return code, err.getvalue()


def check_mutation(src: Source, data: bytes, family: str, label: str, folder: Path,
                   same_size: bool = True) -> None:
    stats = STATS.setdefault(family, Stats())
    if data == src.data:
        label += " (no-op)"  # e.g. a byte overwritten with its own value
    stats.tried += 1
    stats.by_mutation[label] += 1
    folder.mkdir()
    started = time.monotonic()
    try:
        path = folder / "mutated.vmo"
        path.write_bytes(data)
        out_dir = folder / "out"
        out_dir.mkdir()
        out = out_dir / "synth.qcow2"
        tracemalloc.reset_peak()
        base_traced = tracemalloc.get_traced_memory()[0]
        with alarm(TIMEOUT):
            v_err = _attempt("verify", lambda: verify(io.BytesIO(data), key=src.key))
            a_err = _attempt("apply", lambda: apply(io.BytesIO(data), src.base, out,
                                                    key=src.key))
            _attempt("inspect", lambda: describe(path, src.key))
            code, stderr = _cli(["verify", str(path), *src.cli_args], src.env)
            i_code, i_stderr = _cli(["inspect", str(path), *src.cli_args], src.env)
        peak = tracemalloc.get_traced_memory()[1] - base_traced
        stats.max_peak_mib = max(stats.max_peak_mib, peak / (1 << 20))
        assert peak < PEAK_LIMIT, f"memory blow-up: {peak >> 20} MiB traced at once"

        # The CLI says what the library says, in one line, with the documented code.
        assert code == (0 if v_err is None else int(exit_code(v_err))), (code, stderr)
        for c, e in ((code, stderr), (i_code, i_stderr)):
            assert c == 0 or c in ALLOWED, f"exit {c}: {e}"
            if c:
                assert "Traceback" not in e and e.startswith("error: ") and e.count("\n") == 1, e
        if a_err is None:
            assert v_err is None, f"apply accepted what verify refused: {v_err}"
            rebuilt = Qcow2Image(out)
            try:
                size = rebuilt.virtual_size
                head = rebuilt.read(0, min(size, len(src.expected) + (1 << 16)))
            finally:
                rebuilt.close()
            if same_size:
                assert size == len(src.expected) and head == src.expected, \
                    "accepted, but the rebuilt disk is not the original"
            else:  # the declared size changed: the original, cut or zero-extended
                assert head == src.expected[: len(head)].ljust(len(head), b"\0"), \
                    "accepted, but the rebuilt disk differs from the original"
            stats.accepted += 1
            stats.accepted_by_mutation[label] += 1
        else:
            assert list(out_dir.iterdir()) == [], "a refused apply left files behind"
            if v_err is None:
                stats.verify_only += 1
            stats.rejected[type(v_err or a_err).__name__] += 1
    except AssertionError as err:
        first = f"{err}".splitlines()[0]
        stats.failure = stats.failure or f"{src.name} {label}: {first}"
        if not CENSUS:
            raise
        stats.rejected["BUG: " + re.sub(r"\d+", "N", first)[:80]] += 1
    except BaseException as err:
        stats.failure = stats.failure or f"{src.name} {label}: {err}".splitlines()[0]
        raise
    finally:
        elapsed = time.monotonic() - started
        stats.max_seconds = max(stats.max_seconds, elapsed)
        stats.wall_seconds += elapsed
        shutil.rmtree(folder, ignore_errors=True)


EXAMPLE_NUMBERS = itertools.count()


def next_folder(scratch: Path) -> Path:
    return scratch / f"ex{next(EXAMPLE_NUMBERS)}"


# ------------------------------------------------------------------------------ layout

@dataclass
class Layout:
    header: int  # header length = first frame's offset
    frames: list[tuple[int, int]]  # (offset, total length) of each frame
    summary: int
    index: int
    trailer: int


def layout(h, data: bytes) -> Layout:
    parts = h.parse_parts(data)
    pos = HEADER.unpack_from(data)[3]
    header = pos
    frames = []
    for f in parts.frames:
        frames.append((pos, FRAME_HEAD_SIZE + f.stored_length))
        pos += FRAME_HEAD_SIZE + f.stored_length
    index = pos + SECTION.size + len(parts.summary)
    return Layout(header, frames, pos, index, len(data) - TRAILER.size)


HUGE_U32 = [2**32 - 1, 2**31, MAX_FRAME_RAW + 1, 1 << 20 | 1, 0]
HUGE_U64 = [2**64 - 1, 2**63, 2**40, 2**32, 0]


# ------------------------------------------------------------------------------ raw mutations

BYTE_MUTATIONS = ["bitflip", "overwrite", "truncate", "extend", "insert", "delete"]
FRAME_BYTES_MUTATIONS = ["frame-dup", "frame-swap", "frame-delete", "huge-field"]


@st.composite
def raw_mutation(draw, h, data: bytes, whole_overlay: bool = True) -> tuple[str, bytes]:
    """One raw mutation of `data` (an overlay, or with whole_overlay=False any bytes)."""
    n = len(data)
    kind = draw(st.sampled_from(BYTE_MUTATIONS + (FRAME_BYTES_MUTATIONS if whole_overlay
                                                  else [])))
    out = bytearray(data)
    if kind == "bitflip":
        for bit in draw(st.lists(st.integers(0, 8 * n - 1), min_size=1, max_size=4,
                                 unique=True)):
            out[bit // 8] ^= 1 << (bit % 8)
    elif kind == "overwrite":
        pos = draw(st.integers(0, n - 1))
        value = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            [b"\0", b"\xff", b"\x7f", b"\x80", b"\xff" * 4, b"\0" * 8]))
        out[pos: pos + len(value)] = value
        del out[n:]
    elif kind == "truncate":
        del out[draw(st.integers(0, n - 1)):]
    elif kind == "extend":
        out += draw(st.binary(min_size=1, max_size=64) | st.just(data[-TRAILER.size:]))
    elif kind == "insert":
        pos = draw(st.integers(0, n))
        out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        pos = draw(st.integers(0, n - 1))
        del out[pos: pos + draw(st.integers(1, 64))]
    else:
        lay = layout(h, data)
        frames = lay.frames
        i = draw(st.integers(0, len(frames) - 1))
        start, length = frames[i]
        if kind == "frame-dup":
            out[start + length: start + length] = data[start: start + length]
        elif kind == "frame-delete":
            del out[start: start + length]
        elif kind == "frame-swap":
            j = draw(st.integers(0, len(frames) - 1))
            (a, la), (b, lb) = sorted([frames[i], frames[j]])
            out[a: b + lb] = data[b: b + lb] + data[a + la: b] + data[a: a + la] \
                if a != b else data[a: b + lb]
        else:  # a huge value in a size field, nothing recomputed
            where = draw(st.sampled_from(["frame-count", "frame-stored", "frame-raw",
                                          "frame-seq", "summary-length", "index-count",
                                          "header-length", "manifest-length",
                                          "trailer-summary", "trailer-index",
                                          "trailer-length"]))
            if where.startswith("frame"):
                offset = start + {"frame-seq": 8, "frame-count": 12, "frame-stored": 16,
                                  "frame-raw": 20}[where]
                struct.pack_into("<I", out, offset, draw(st.sampled_from(HUGE_U32)))
            elif where == "summary-length":
                struct.pack_into("<I", out, lay.summary + 4, draw(st.sampled_from(HUGE_U32)))
            elif where == "index-count":
                struct.pack_into("<I", out, lay.index + 4, draw(st.sampled_from(HUGE_U32)))
            elif where == "header-length":
                struct.pack_into("<I", out, 12, draw(st.sampled_from(HUGE_U32 + [MAX_HEADER])))
            elif where == "manifest-length":
                struct.pack_into("<I", out, 32, draw(st.sampled_from(HUGE_U32)))
            else:
                offset = lay.trailer + {"trailer-summary": 8, "trailer-index": 16,
                                        "trailer-length": 24}[where]
                struct.pack_into("<Q", out, offset, draw(st.sampled_from(HUGE_U64)))
            kind = f"huge-{where}"
    return kind, bytes(out)


@fuzz_settings
@given(data=st.data())
def test_fuzz_raw(sources, guarded, scratch, h, data):
    src = sources[data.draw(st.sampled_from(ALL), label="source")]
    label, mutated = data.draw(raw_mutation(h, src.data), label="mutation")
    check_mutation(src, mutated, "raw", label, next_folder(scratch))


def test_raw_huge_sizes_are_refused_before_reading_them(sources, h):
    """A stream reader never asks for more than one frame's worth of bytes at once, whatever
    the sizes in the file say (the checks come before the allocation)."""
    limit = MAX_FRAME_RAW + (MAX_FRAME_RAW >> 7) + 1024 + FRAME_HEAD_SIZE
    for src in sources.values():
        lay = layout(h, src.data)
        for value in HUGE_U32:
            for offset in [lay.frames[0][0] + o for o in (12, 16, 20)] + \
                    [lay.summary + 4, lay.index + 4, 12, 32]:
                bad = bytearray(src.data)
                struct.pack_into("<I", bad, offset, value)
                reader = h.GuardedReader(bytes(bad), limit=limit)
                try:
                    verify(reader, key=src.key)
                except (VmsynthError, FormatError) as err:
                    assert exit_code(err) in ALLOWED
                assert reader.largest <= limit


# ------------------------------------------------------------------------------ frames, fixed up

FRAME_FIELDS = {"raw_length": HUGE_U32 + [1, 32], "count": HUGE_U32 + [1],
                "stored_length": HUGE_U32, "codec": [0, 1, 2, 255], "flags": [0, 1, 2, 0x8000],
                "stream": [0, 1, 2, 255], "seq": [1, 2, 2**32 - 1]}


@st.composite
def frame_mutation(draw, h, src: Source, donors: list[bytes]) -> tuple[str, bytes]:
    parts = h.parse_parts(src.data)
    frames = parts.frames
    kind = draw(st.sampled_from(["dup", "swap", "delete", "reverse", "splice", "field"]))
    i = draw(st.integers(0, len(frames) - 1))
    if kind == "dup":
        frames.insert(i, frames[i])
        parts.index.insert(i, parts.index[i])
    elif kind == "swap":
        j = draw(st.integers(0, len(frames) - 1))
        frames[i], frames[j] = frames[j], frames[i]
        parts.index[i], parts.index[j] = parts.index[j], parts.index[i]
    elif kind == "delete":
        del frames[i]
        del parts.index[i]
    elif kind == "reverse":
        frames.reverse()
        parts.index.reverse()
    elif kind == "splice":  # the same frame number from another overlay of the same change
        donor = h.parse_parts(draw(st.sampled_from(donors)))
        if i < len(donor.frames):
            frames[i] = donor.frames[i]
    if kind != "field" and kind != "splice":
        for n, f in enumerate(frames):  # renumber: only deeper checks may catch it
            frames[n] = h.seal_frame(replace(f, seq=n))
    if kind == "field":
        name = draw(st.sampled_from(sorted(FRAME_FIELDS)))
        value = draw(st.sampled_from(FRAME_FIELDS[name]) | st.integers(0, 2**32 - 1))
        if name in ("codec", "flags", "stream"):
            value &= 0xFF if name != "flags" else 0xFFFF
        f = replace(frames[i], **{name: value})
        frames[i] = replace(f, digest=hashlib.sha256(h.frame_head(f) + f.payload).digest())
        kind = f"field-{name}"
    return kind, h.compose(parts)


@pytest.fixture(scope="module")
def donors(small_pair, sources) -> dict[str, list[bytes]]:
    """For each source, other overlays of the same change (sealed under the same key)."""
    key = sources["enc-key"].key
    return Corpus({"plain-multi": [small_pair.overlay],
            "plain-single": [small_pair.multi],
            "vector-good": [sources["plain-single"].data],
            "enc-key": [encrypted_overlay(small_pair, key)],
            "enc-pass": [encrypted_overlay(small_pair, Key(passphrase="fuzz"))],
            "vector-enc-key": [sources["enc-key"].data]})


@fuzz_settings
@given(data=st.data())
def test_fuzz_frames(sources, donors, guarded, scratch, h, data):
    src = sources[data.draw(st.sampled_from(ALL), label="source")]
    label, mutated = data.draw(frame_mutation(h, src, donors[src.name]), label="mutation")
    check_mutation(src, mutated, "frames", label, next_folder(scratch))


# ------------------------------------------------------------------------------ records, fixed up

RECORD_FIELDS = ("kind", "stored", "target", "length", "source")
INTERESTING = [0, 1, 4095, 4096, 4097, 1 << 16, MAX_FRAME_RAW, MAX_FRAME_RAW + 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]


def decode_frame(f) -> tuple[list[list[int]], bytes]:
    raw = f.payload
    if f.codec == 1:
        raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=f.raw_length)
    table = raw[: f.count * RECORD.size]
    return [list(r) for r in RECORD.iter_unpack(table)], raw[f.count * RECORD.size:]


def encode_frame(h, f, records: list[list[int]], area: bytes, compress: bool):
    raw = b"".join(RECORD.pack(*r) for r in records) + area
    payload = zstandard.ZstdCompressor().compress(raw) if compress else raw
    return h.seal_frame(replace(f, codec=1 if compress else 0, count=len(records),
                                raw_length=len(raw), payload=payload))


@st.composite
def record_mutation(draw, h, src: Source) -> tuple[str, bytes]:
    parts = h.parse_parts(src.data)
    i = draw(st.integers(0, len(parts.frames) - 1))
    records, area = decode_frame(parts.frames[i])
    r = draw(st.integers(0, len(records) - 1))
    kind = draw(st.sampled_from(["field", "field", "field", "drop", "duplicate", "append"]))
    if kind == "field":
        name = draw(st.sampled_from(RECORD_FIELDS))
        col = RECORD_FIELDS.index(name)
        limit = 2**8 - 1 if name == "kind" else 2**32 - 1 if name == "stored" else 2**64 - 1
        value = draw(st.sampled_from([v for v in INTERESTING if v <= limit])
                     | st.integers(0, limit) | st.just(records[r][col] + 1)
                     | st.just(max(records[r][col] - 1, 0)))
        records[r][col] = min(value, limit)
        kind = f"field-{name}"
    elif kind == "drop":
        del records[r]
    elif kind == "duplicate":
        records.insert(r, list(records[r]))
    else:
        records.append([draw(st.integers(1, 5)), 0, draw(st.sampled_from(INTERESTING)),
                        draw(st.sampled_from(INTERESTING[1:])), draw(st.sampled_from(INTERESTING))])
    if not records:
        records = [[2, 0, 0, 4096, 0]]
    if records == decode_frame(parts.frames[i])[0]:
        kind += " (same records)"  # e.g. a field set to the value it had; re-encoded only
    parts.frames[i] = encode_frame(h, parts.frames[i], records, area, draw(st.booleans()))
    return kind, h.compose(parts)


@fuzz_settings
@given(data=st.data())
def test_fuzz_records(sources, guarded, scratch, h, data):
    src = sources[data.draw(st.sampled_from(PLAIN), label="source")]
    label, mutated = data.draw(record_mutation(h, src), label="mutation")
    check_mutation(src, mutated, "records", label, next_folder(scratch))


# ------------------------------------------------------------------------------ JSON, fixed up

# Special values get most of the weight: they are what a reader of JSON forgets.
ODD_JSON = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    st.sampled_from([0, -1, 1, 4096, 2**31, 2**53 + 1, 2**62, 2**63, 2**64, 10**30, 1.5]),
    st.sampled_from([True, False, None, "", "x", "sha256:", [], {}, [1], {"a": 1}]),
    st.integers(), st.text(max_size=8), st.floats())


@st.composite
def json_mutation(draw, doc: dict, paths: list[tuple]) -> tuple[str, dict]:
    """Set one (nested) field to an odd value, drop it, or add an unknown one."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from(paths))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    op = draw(st.sampled_from(["set", "set", "set", "drop", "add"]))
    label = "/".join(str(p) for p in path)
    if op == "drop" and isinstance(parent, dict):
        parent.pop(path[-1], None)
        return f"drop {label}", doc
    if op == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6))] = draw(ODD_JSON)
        return f"add-in {label}", doc
    parent[path[-1]] = draw(ODD_JSON)
    return f"set {label}", doc


def json_paths(doc, prefix: tuple = ()) -> list[tuple]:
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) \
        if isinstance(doc, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(json_paths(v, prefix + (k,)))
    return out


@fuzz_settings
@given(data=st.data())
def test_fuzz_manifest(sources, guarded, scratch, h, data):
    src = sources[data.draw(st.sampled_from(ALL), label="source")]
    manifest = json.loads(h.parse_parts(src.data).manifest)
    label, changed = data.draw(json_mutation(manifest, json_paths(manifest)), label="mutation")
    mutated = h.reheader(src.data, manifest=canonical_json(changed))
    check_mutation(src, mutated, "manifest", label, next_folder(scratch), same_size=False)


@fuzz_settings
@given(data=st.data())
def test_fuzz_summary(sources, guarded, scratch, h, data):
    src = sources[data.draw(st.sampled_from(ALL), label="source")]
    parts = h.parse_parts(src.data)
    if src.encrypted:  # sealed: damage the bytes, the trailer digest is recomputed
        label, parts.summary = data.draw(raw_mutation(h, parts.summary, whole_overlay=False),
                                         label="mutation")
        label = f"sealed-{label}"
    else:
        summary = json.loads(parts.summary)
        label, changed = data.draw(json_mutation(summary, json_paths(summary)),
                                   label="mutation")
        parts.summary = canonical_json(changed) if data.draw(st.booleans()) else \
            json.dumps(changed).encode()
    check_mutation(src, h.compose(parts), "summary", label, next_folder(scratch))


def test_fuzz_census_found_no_bug():
    """With VMSYNTH_FUZZ_CENSUS=1 the families above count property failures instead of
    stopping at the first; this fails if any was counted."""
    if not CENSUS:
        pytest.skip("only with VMSYNTH_FUZZ_CENSUS=1 (otherwise each family fails by itself)")
    bugs = {f: {k: n for k, n in s.rejected.items() if k.startswith("BUG")}
            for f, s in STATS.items()}
    assert not any(bugs.values()), json.dumps(bugs, indent=1)


# ------------------------------------------------------------------------------ what the fuzzers found

def crafted_manifest(h, data: bytes, edit: Callable[[dict], None]) -> bytes:
    manifest = json.loads(h.parse_parts(data).manifest)
    edit(manifest)
    return h.reheader(data, manifest=canonical_json(manifest))


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        for step in path[:-1]:
            doc = doc[step]
        doc[path[-1]] = value
    return edit


MANIFEST_CASES = {
    "disk-size-infinite": _set(("streams", 0, "virtual_size"), float("inf")),
    "disk-size-text": _set(("streams", 0, "virtual_size"), "big"),
    "base-size-text": _set(("base", "virtual_size"), "abc"),
    "base-size-list": _set(("base", "virtual_size"), [1]),
    "base-size-infinite": _set(("base", "virtual_size"), float("inf")),
    "base-size-null": _set(("base", "virtual_size"), None),
    "block-size-infinite": _set(("block_size",), float("inf")),
    "streams-null-entry": _set(("streams", 0), None),
}


@pytest.mark.parametrize("command", ["verify", "verify-base", "apply", "inspect"])
def test_crafted_manifest_values_are_format_errors(small_pair, h, tmp_path, command):
    """Odd JSON values in a plain overlay's manifest (header digest recomputed): each refused
    with a one-line vmsynth error (inspect may also just show them), never an internal error
    (exit 1)."""
    out = tmp_path / "out"
    out.mkdir()
    wrong = []
    for case, edit in sorted(MANIFEST_CASES.items()):
        bad = tmp_path / f"{case}.vmo"
        bad.write_bytes(crafted_manifest(h, small_pair.multi, edit))
        argv: list[object] = [command.partition("-")[0], bad]
        if command in ("verify-base", "apply"):
            argv += ["--base", small_pair.base_path]
        if command == "apply":
            argv += ["-o", out / "synth.qcow2"]
        code, err = _cli([str(a) for a in argv], {})
        if code == 0 and command == "inspect":
            continue  # showing an odd value is fine; crashing on it is not
        if code not in ALLOWED or "internal" in err or err.count("\n") != 1:
            wrong.append(f"{case}: exit {code}: {err.strip()}")
        assert list(out.iterdir()) == [], case
    assert not wrong, "\n".join(wrong)


def test_crafted_summary_numbers_are_format_errors_for_inspect(small_pair, h, tmp_path):
    """A plain overlay's summary is JSON under an unkeyed digest, and `1e999` parses as
    infinity: inspect must refuse such numbers as a format error, not crash (exit 1)."""
    wrong = []
    for field_name in ("payload_raw_bytes", "payload_stored_bytes", "blocks"):
        parts = h.parse_parts(small_pair.multi)
        summary = json.loads(parts.summary)
        summary[field_name] = {"data": float("inf")} if field_name == "blocks" else float("inf")
        parts.summary = json.dumps(summary).encode()
        bad = tmp_path / f"{field_name}.vmo"
        bad.write_bytes(h.compose(parts))
        assert verify(io.BytesIO(bad.read_bytes())).replay.frames  # only inspect reads these
        code, err = _cli(["inspect", str(bad), "--json"], {})
        if code not in ALLOWED or "internal" in err:
            wrong.append(f"{field_name}: exit {code}: {err.strip()}")
    assert not wrong, "\n".join(wrong)


def zero_frame_overlay(h, data: bytes, virtual_size: int) -> bytes:
    """The overlay's header with another disk size, no frames, and a right result digest."""
    parts = h.parse_parts(data)
    manifest = json.loads(parts.manifest)
    manifest["streams"][0]["virtual_size"] = virtual_size
    parts.manifest = canonical_json(manifest)
    parts.frames, parts.index = [], []
    parts.summary = canonical_json({"blocks": {}, "frames": 0, "payload_raw_bytes": 0,
                                    "payload_stored_bytes": 0, "result_digest": "sha256:"
                                    + hashlib.sha256(b"").hexdigest()})
    return h.compose(parts)


def run_measured(h, argv: list[object], cap: int, cpu_seconds: int | None = None
                 ) -> tuple[int, str, int]:
    """Run `vmsynth ARGV` with its address space capped at `cap` (and its CPU time at
    `cpu_seconds`: past it the kernel kills it); reap it here to read its peak RSS.
    Returns (exit code, negative for a signal; stderr; peak RSS in bytes)."""
    with tempfile.TemporaryFile() as err_file:
        pid = os.fork()
        if pid == 0:  # child
            try:
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                if cpu_seconds is not None:
                    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
                os.dup2(err_file.fileno(), 2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.execv(str(h.VMSYNTH), [str(h.VMSYNTH), *map(str, argv)])
            finally:
                os._exit(127)
        _, status, usage = os.wait4(pid, 0)
        err_file.seek(0)
        stderr = err_file.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), stderr, usage.ru_maxrss * 1024


CAP = 2 << 30  # address space for the child: enough for any honest run, far from the host's


@pytest.mark.parametrize("exponent", [56, 63])
@pytest.mark.parametrize("command", ["apply", "verify-base"])
def test_huge_declared_disk_size_is_refused_without_a_memory_blow_up(small_pair, h, tmp_path,
                                                                     exponent, command):
    """A 400-byte overlay that declares a disk of 2^N bytes and changes nothing in it. A qcow2
    with 64 KiB clusters holds at most 2^51 bytes (QEMU's L1 limit); vmsynth's writer builds
    its L1 and L2 tables in memory, so an absurd size must be refused up front, not become a
    multi-gigabyte allocation (or MemoryError, exit 1)."""
    bad = tmp_path / "huge.vmo"
    bad.write_bytes(zero_frame_overlay(h, small_pair.multi, 1 << exponent))
    out = tmp_path / "out"
    out.mkdir()
    argv: list[object] = ["verify", bad, "--base", small_pair.base_path]
    if command == "apply":
        argv = ["apply", bad, "--base", small_pair.base_path, "-o", out / "synth.qcow2"]
    code, err, rss = run_measured(h, argv, CAP)
    assert code in ALLOWED | {0}, f"exit {code}: {err}"
    assert "internal error" not in err and "Traceback" not in err
    assert rss < 512 << 20, f"peak RSS {rss >> 20} MiB for a {bad.stat().st_size}-byte overlay"
    if code:
        assert list(out.iterdir()) == []


def test_a_large_but_sane_disk_size_still_applies(small_pair, h, tmp_path):
    """Control for the test above: 1 TiB, nothing changed, is a fine overlay."""
    bad = tmp_path / "tib.vmo"
    bad.write_bytes(zero_frame_overlay(h, small_pair.multi, 1 << 40))
    code, err, _ = run_measured(h, ["apply", bad, "--base", small_pair.base_path, "-o",
                                    tmp_path / "synth.qcow2"], CAP)
    assert code == 0, err
    image = Qcow2Image(tmp_path / "synth.qcow2")
    try:
        assert image.virtual_size == 1 << 40
        assert image.read(0, len(small_pair.base_data)) == small_pair.base_data
    finally:
        image.close()


def delta_bomb(h, data: bytes, records: int, length: int) -> bytes:
    """A valid overlay (every digest right) of one frame holding `records` DELTA records of
    `length` bytes each; each delta is a ~20-byte zstd frame that decodes to zeros."""
    parts = h.parse_parts(data)
    manifest = json.loads(parts.manifest)
    manifest["streams"][0]["virtual_size"] = records * length
    parts.manifest = canonical_json(manifest)
    delta = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(length))
    table = b"".join(RECORD.pack(5, len(delta), i * length, length, 0) for i in range(records))
    raw = table + delta * records
    result = hashlib.sha256()
    for i in range(records):
        result.update(RECORD.pack(5, 0, i * length, length, 0))
        result.update(bytes(length))
    frame = h.seal_frame(replace(parts.frames[0], seq=0, codec=1, flags=0, count=records,
                                 raw_length=len(raw),
                                 payload=zstandard.ZstdCompressor().compress(raw)))
    parts.frames = [frame]
    parts.index = [(0,) * 7 + (0, records * length, b"")]
    parts.summary = canonical_json({"result_digest": "sha256:" + hashlib.sha256(
        result.digest()).hexdigest()})
    return h.compose(parts)


def test_delta_records_cannot_multiply_memory(small_pair, h, tmp_path):
    """SPEC.md 4 bounds what one frame may decompress to (raw_length <= 32 MiB) so that a
    reader's memory is bounded by the file, not by what it claims. A frame of 4096 DELTA
    records, each a 26-byte delta of 256 KiB of zeros (a 1 GiB disk from a 4 KB overlay), is
    valid; rebuilding it must not hold the whole frame's decoded output at once."""
    bomb = tmp_path / "bomb.vmo"
    bomb.write_bytes(delta_bomb(h, small_pair.multi, 4096, 256 << 10))
    assert bomb.stat().st_size < 8192
    # Control: it is a valid overlay (structure and digests) ...
    assert verify(io.BytesIO(bomb.read_bytes())).replay.records == 4096
    code, err, rss = run_measured(h, ["verify", bomb, "--base", small_pair.base_path], CAP)
    # ... which a reader may rebuild (or refuse as too expensive), in bounded memory.
    assert code in (0, ExitCode.CORRUPT, ExitCode.UNSUPPORTED), f"exit {code}: {err}"
    assert rss < 512 << 20, f"peak RSS {rss >> 20} MiB for a {bomb.stat().st_size}-byte overlay"


def test_small_delta_frames_rebuild_correctly(small_pair, h, tmp_path):
    """Control for the test above: the same construction, small, rebuilds to zeros."""
    data = delta_bomb(h, small_pair.multi, 8, 8192)
    base = bases.load_path(small_pair.base_path)
    try:
        apply(io.BytesIO(data), base, tmp_path / "synth.qcow2")
    finally:
        base.close()
    assert h.read_image(tmp_path / "synth.qcow2") == bytes(8 * 8192)


def zero_region_overlay(h, data: bytes, virtual_size: int, start: int, length: int) -> bytes:
    """A valid overlay of one ZERO record [start, start+length) on a disk of virtual_size."""
    parts = h.parse_parts(data)
    manifest = json.loads(parts.manifest)
    manifest["streams"][0]["virtual_size"] = virtual_size
    parts.manifest = canonical_json(manifest)
    record = RECORD.pack(2, 0, start, length, 0)
    parts.frames = [h.seal_frame(replace(parts.frames[0], seq=0, codec=0, flags=0, count=1,
                                         raw_length=len(record), payload=record))]
    parts.index = [(0,) * 7 + (start, start + length, b"")]
    digest = hashlib.sha256(hashlib.sha256(record).digest()).hexdigest()
    parts.summary = canonical_json({"result_digest": "sha256:" + digest})
    return h.compose(parts)


def test_a_zero_record_past_the_base_is_not_a_hang(small_pair, h, tmp_path):
    """A 700-byte valid overlay: a 1 TiB disk whose last TiB but 1 GiB is one ZERO record,
    wholly past the end of the base (where a qcow2 child reads zeros anyway). Apply visits
    and records every 64 KiB cluster of it (~0.6 s and ~1 MiB per GiB here: ten minutes and
    a gigabyte); it must finish within 10 s of CPU, ten times what starting vmsynth takes."""
    bad = tmp_path / "zeros.vmo"
    bad.write_bytes(zero_region_overlay(h, small_pair.multi, 1 << 40, 1 << 30,
                                        (1 << 40) - (1 << 30)))
    code, err, rss = run_measured(h, ["apply", bad, "--base", small_pair.base_path, "-o",
                                      tmp_path / "synth.qcow2"], CAP, cpu_seconds=10)
    assert code != -signal.SIGXCPU and code != -signal.SIGKILL, \
        "apply used 10 s of CPU on a ZERO record past the base (a hang, for a 700-byte file)"
    assert code == 0, err
    assert rss < 512 << 20
    image = Qcow2Image(tmp_path / "synth.qcow2")
    try:
        assert image.virtual_size == 1 << 40
        assert image.read(0, len(small_pair.base_data)) == small_pair.base_data
        assert image.read((1 << 40) - 4096, 4096) == bytes(4096)
    finally:
        image.close()


def test_a_small_zero_record_past_the_base_applies(small_pair, h, tmp_path):
    """Control for the test above: the same construction over 64 MiB."""
    data = zero_region_overlay(h, small_pair.multi, 1 << 30, 1 << 29, 64 << 20)
    base = bases.load_path(small_pair.base_path)
    try:
        apply(io.BytesIO(data), base, tmp_path / "synth.qcow2")
    finally:
        base.close()
    image = Qcow2Image(tmp_path / "synth.qcow2")
    try:
        assert image.read((1 << 29) - 4096, 8192) == bytes(8192)
        assert image.read(0, len(small_pair.base_data)) == small_pair.base_data
    finally:
        image.close()
