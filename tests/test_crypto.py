"""Encrypted overlays (SPEC.md section 8): round trips with key files and passphrases, wrong
and missing keys, what inspect shows without the key, tampering that only the authenticated
encryption can catch, private outputs, keygen, fresh file ids, scrypt limits, the encrypted
test vectors, and an independent implementation of section 8 that must agree with vmsynth."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import stat
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from helpers import Result
from vmsynth.formats.errors import CorruptError, UnsupportedError, WrongKeyError
from vmsynth.formats.layout import FRAME_HEAD_SIZE, HEADER, RECORD

from vmsynth import bases, errors
from vmsynth import create as create_mod
from vmsynth.apply import apply
from vmsynth.errors import ExitCode
from vmsynth.keys import Key, keygen
from vmsynth.qcow2 import Qcow2Image
from vmsynth.verify import describe, verify

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
DOC = json.loads((VECTORS / "vectors.json").read_text())
ENCRYPTED = sorted(n for n, v in DOC["vectors"].items() if "with_key" in v)
PASSPHRASE = "correct horse \u00e9 battery staple"  # not ASCII: UTF-8 per the spec


@pytest.fixture(autouse=True)
def _no_ambient_passphrase(monkeypatch):
    """A passphrase in the developer's environment must not leak into these tests."""
    monkeypatch.delenv("VMSYNTH_PASSPHRASE", raising=False)


# ------------------------------------------------------------------------------ running

def assert_one_line_error(r: Result) -> None:
    assert "Traceback" not in r.err + r.out
    lines = r.err.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{r.err}"
    assert lines[0].startswith("error: "), lines[0]


# ------------------------------------------------------------------------------ inputs

def encrypt(small_pair, key: Key, frame_data: int | None = 4096) -> bytes:
    """small_pair's change as an encrypted overlay (several frames with frame_data=4096)."""
    base = bases.load_path(small_pair.base_path)
    disk = Qcow2Image(small_pair.app_path)
    out = io.BytesIO()
    try:
        with mock.patch.object(create_mod, "FRAME_DATA", frame_data or create_mod.FRAME_DATA):
            create_mod.create(base, disk, out, 3, key=key)
    finally:
        disk.close()
        base.close()
    return out.getvalue()


@dataclass
class Enc:
    key_path: Path
    key: bytes
    other_key_path: Path
    overlay: bytes  # key file, several frames
    again: bytes  # the same input, key and frames, encrypted a second time
    other_key: bytes  # the same input under another key
    passphrase: bytes  # the same input sealed with PASSPHRASE


@pytest.fixture(scope="module")
def enc(small_pair, tmp_path_factory) -> Enc:
    d = tmp_path_factory.mktemp("keys")
    keygen(d / "app.key")
    keygen(d / "other.key")
    key, other = (d / "app.key").read_bytes(), (d / "other.key").read_bytes()
    return Enc(d / "app.key", key, d / "other.key",
               encrypt(small_pair, Key(key_file=key)), encrypt(small_pair, Key(key_file=key)),
               encrypt(small_pair, Key(key_file=other)),
               encrypt(small_pair, Key(passphrase=PASSPHRASE)))


@pytest.fixture
def files(enc, small_pair, tmp_path):
    """The overlays as files in tmp/in, and an empty tmp/out for outputs."""
    d = tmp_path / "in"
    d.mkdir()
    for name, data in (("enc.vmo", enc.overlay), ("pass.vmo", enc.passphrase),
                       ("plain.vmo", small_pair.multi)):
        (d / name).write_bytes(data)
    (tmp_path / "out").mkdir()
    return d


def manifest_of(data: bytes) -> dict:
    length = HEADER.unpack_from(data)[3]
    return json.loads(data[HEADER.size: length - 32])


# ------------------------------------------------------------------------------ round trips

def test_round_trip_with_a_key_file(cli, small_pair, tmp_path, h):
    key = tmp_path / "app.key"
    r = cli("keygen", "-o", key)
    assert r.code == 0, r.err
    vmo, out = tmp_path / "app.vmo", tmp_path / "synth.qcow2"
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path, "-o", vmo,
            "--encrypt", "--key-file", key, "--json")
    assert r.code == 0, r.err
    created = r.json()
    assert manifest_of(vmo.read_bytes())["encryption"]["kdf"] == {"name": "none"}
    assert small_pair.app_data[-4096:] not in vmo.read_bytes()  # new data is not in the clear

    r = cli("verify", vmo, "--key-file", key, "--json")
    assert r.code == 0, r.err
    assert r.json()["frames"] == len(h.parse_parts(vmo.read_bytes()).frames)
    r = cli("verify", vmo, "--key-file", key, "--base", small_pair.base_path, "--json")
    assert r.code == 0, r.err
    assert r.json()["result_digest"] == created["summary"]["result_digest"]

    r = cli("apply", vmo, "--base", small_pair.base_path, "-o", out, "--key-file", key)
    assert r.code == 0, r.err
    assert h.read_image(out) == small_pair.app_data


def test_round_trip_with_a_passphrase(cli, small_pair, tmp_path, h, monkeypatch):
    vmo, out = tmp_path / "app.vmo", tmp_path / "synth.qcow2"
    monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE)
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path, "-o", vmo,
            "--encrypt")
    assert r.code == 0, r.err
    kdf = manifest_of(vmo.read_bytes())["encryption"]["kdf"]
    assert kdf["name"] == "scrypt" and len(bytes.fromhex(kdf["salt"])) == 16
    assert cli("verify", vmo).code == 0
    assert cli("verify", vmo, "--base", small_pair.base_path).code == 0
    r = cli("apply", vmo, "--base", small_pair.base_path, "-o", out)
    assert r.code == 0, r.err
    assert h.read_image(out) == small_pair.app_data
    # The passphrase is UTF-8 (SPEC.md 8): its NFD spelling is another passphrase.
    monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE.replace("\u00e9", "e\u0301"))
    assert cli("verify", vmo).code == ExitCode.KEY


def test_installed_command_round_trip(small_pair, tmp_path, h):
    """The same through the installed `vmsynth` (passphrase from the environment)."""
    env = os.environ | {"VMSYNTH_PASSPHRASE": "s3cret"}
    vmo, out = tmp_path / "app.vmo", tmp_path / "synth.qcow2"
    p = h.run(h.VMSYNTH, "create", "--base", small_pair.base_path, "--disk",
              small_pair.app_path, "-o", vmo, "--encrypt", env=env, check=False)
    assert p.returncode == 0, p.stderr
    p = h.run(h.VMSYNTH, "apply", vmo, "--base", small_pair.base_path, "-o", out, env=env,
              check=False)
    assert p.returncode == 0, p.stderr
    assert h.read_image(out) == small_pair.app_data


# ------------------------------------------------------------------------------ no key, wrong key

KEY_FAILURES = ["missing", "wrong-key-file", "wrong-passphrase", "passphrase-for-key-file",
                "key-file-for-passphrase"]


def key_args(how: str, enc: Enc, files: Path, monkeypatch) -> tuple[Path, list[object]]:
    """(overlay, extra args) for one way of not having the right key."""
    if how == "missing":
        return files / "enc.vmo", []
    if how == "wrong-key-file":
        return files / "enc.vmo", ["--key-file", enc.other_key_path]
    if how == "wrong-passphrase":
        monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE + "x")
        return files / "pass.vmo", []
    if how == "passphrase-for-key-file":
        monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE)
        return files / "enc.vmo", []
    return files / "pass.vmo", ["--key-file", enc.key_path]


@pytest.mark.parametrize("how", KEY_FAILURES)
@pytest.mark.parametrize("command", ["verify", "verify-base", "apply", "apply-flatten"])
def test_no_or_wrong_key_is_exit_20_and_writes_nothing(cli, enc, files, small_pair, monkeypatch,
                                                       how, command):
    vmo, extra = key_args(how, enc, files, monkeypatch)
    out = files.parent / "out"
    argv: list[object] = ["verify" if command.startswith("verify") else "apply", vmo, *extra]
    if command != "verify":
        argv += ["--base", small_pair.base_path]
    if command.startswith("apply"):
        argv += ["-o", out / "synth.qcow2"] + (["--flatten"] if command == "apply-flatten" else [])
    r = cli(*argv)
    assert r.code == ExitCode.KEY, r.err
    assert_one_line_error(r)
    assert list(out.iterdir()) == []  # neither the output nor a temporary file
    assert "authentication" not in r.err  # a wrong key is reported as such, not as damage


@pytest.mark.parametrize("how", [h for h in KEY_FAILURES if h != "missing"])
def test_inspect_with_a_wrong_key_is_exit_20(cli, enc, files, monkeypatch, how):
    vmo, extra = key_args(how, enc, files, monkeypatch)
    r = cli("inspect", vmo, *extra, "--json")
    assert r.code == ExitCode.KEY, r.err
    assert r.json()["error"]["exit_code"] == ExitCode.KEY


@pytest.mark.parametrize("how", ["missing", "wrong-key-file"])
def test_installed_command_key_errors(enc, files, small_pair, h, how):
    out = files.parent / "out"
    extra = [] if how == "missing" else ["--key-file", enc.other_key_path]
    p = h.run(h.VMSYNTH, "apply", files / "enc.vmo", "--base", small_pair.base_path, "-o",
              out / "synth.qcow2", *extra, check=False,
              env={k: v for k, v in os.environ.items() if k != "VMSYNTH_PASSPHRASE"})
    assert p.returncode == ExitCode.KEY
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("how", ["key-file", "passphrase"])
@pytest.mark.parametrize("command", ["verify", "apply", "inspect"])
def test_a_key_for_a_plain_overlay_is_refused(cli, enc, files, small_pair, monkeypatch, how,
                                              command):
    """SPEC.md 8: a plain file where a sealed one was expected may be a substitute."""
    extra: list[object] = []
    if how == "key-file":
        extra = ["--key-file", enc.key_path]
    else:
        monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE)
    out = files.parent / "out"
    argv: list[object] = [command, files / "plain.vmo", *extra]
    if command == "apply":
        argv += ["--base", small_pair.base_path, "-o", out / "synth.qcow2"]
    r = cli(*argv)
    assert r.code == ExitCode.KEY, r.err
    assert_one_line_error(r)
    assert list(out.iterdir()) == []
    # Control: without the key the plain overlay is fine.
    monkeypatch.delenv("VMSYNTH_PASSPHRASE", raising=False)
    assert cli(command, files / "plain.vmo", *argv[2 + len(extra):]).code == 0


def test_solid_and_encrypted_together(cli, h, enc, small_pair, tmp_path):
    """--solid --encrypt: sealed pieces of one stream; inspect says solid, and only the key
    rebuilds the app (one flipped bit of a piece is damage, exit 13)."""
    vmo = tmp_path / "s.vmo"
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path, "-o", vmo,
            "--solid", "--encrypt", "--key-file", enc.key_path, "--json")
    assert r.code == 0, r.err
    info = cli("inspect", vmo, "--json").json()
    assert info["solid"] is True and info["encrypted"] is True
    assert cli("verify", vmo, "--base", small_pair.base_path).code == ExitCode.KEY
    r = cli("apply", vmo, "--base", small_pair.base_path, "--key-file", enc.key_path, "-o",
            tmp_path / "s.qcow2", "--json")
    assert r.code == 0, r.err
    assert h.read_image(tmp_path / "s.qcow2") == small_pair.app_data
    damaged = bytearray(vmo.read_bytes())
    damaged[HEADER.unpack_from(damaged)[3] + FRAME_HEAD_SIZE + 3] ^= 0x01  # frame 0's piece
    (tmp_path / "bad.vmo").write_bytes(bytes(damaged))
    r = cli("apply", tmp_path / "bad.vmo", "--base", small_pair.base_path, "--key-file",
            enc.key_path, "-o", tmp_path / "bad.qcow2")
    assert r.code == ExitCode.CORRUPT
    assert_one_line_error(r)
    assert not (tmp_path / "bad.qcow2").exists()


def test_create_encrypt_without_a_key_is_a_usage_error(cli, small_pair, tmp_path):
    """No terminal to ask at, no key file, no $VMSYNTH_PASSPHRASE: refused, nothing written."""
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path, "-o",
            tmp_path / "a.vmo", "--encrypt")
    assert r.code == ExitCode.USAGE
    assert_one_line_error(r)
    assert not (tmp_path / "a.vmo").exists()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_the_wrong_size_is_refused(cli, small_pair, tmp_path, size):
    key = tmp_path / "bad.key"
    key.write_bytes(os.urandom(size))
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path, "-o",
            tmp_path / "a.vmo", "--encrypt", "--key-file", key)
    assert r.code == ExitCode.USAGE, r.err
    assert_one_line_error(r)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.key"]


# ------------------------------------------------------------------------------ inspect

def test_inspect_without_the_key_shows_sizes_and_base_but_no_content(cli, enc, files, h):
    vmo = files / "enc.vmo"
    r = cli("inspect", vmo, "--json")
    assert r.code == 0, r.err
    info = r.json()
    parts = h.parse_parts(enc.overlay)
    manifest = json.loads(parts.manifest)
    assert info["encrypted"] is True
    assert info["base"] == manifest["base"]  # the base identity, in full
    assert info["sizes"]["overlay"] == len(enc.overlay)
    assert info["sizes"]["virtual_disk"] == manifest["streams"][0]["virtual_size"]
    assert info["sizes"]["payload_stored"] == sum(f.stored_length for f in parts.frames)
    assert info["sizes"]["payload_uncompressed"] == sum(f.raw_length for f in parts.frames)
    assert info["frames"] == len(parts.frames)
    assert info["encryption"]["cipher"] == "aes-256-gcm"
    # Content stays sealed: no block counts, no result digest.
    assert info["blocks"] == {}
    assert info["result_digest"] is None
    keyed = cli("inspect", vmo, "--key-file", enc.key_path, "--json").json()
    assert keyed["result_digest"].startswith("sha256:")
    assert keyed["result_digest"] not in r.out
    # The human form says so too, and shows the sizes.
    r = cli("inspect", vmo)
    assert r.code == 0 and "sealed" in r.out and keyed["result_digest"] not in r.out


def test_inspect_with_the_key_shows_blocks_and_result_digest(cli, enc, files, small_pair,
                                                             monkeypatch):
    plain = cli("inspect", files / "plain.vmo", "--json").json()
    r = cli("inspect", files / "enc.vmo", "--key-file", enc.key_path, "--json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["blocks"] == small_pair.expected_blocks
    assert info["result_digest"] == plain["result_digest"]  # same frames, same result digest
    monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE)
    info = cli("inspect", files / "pass.vmo", "--json").json()
    assert info["blocks"] == small_pair.expected_blocks
    assert info["encryption"]["kdf"]["name"] == "scrypt"


# ------------------------------------------------------------------------------ tampering

def splice(h, enc: Enc) -> bytes:
    """Frame 1 of another overlay sealed with the same key (same seq, same sizes)."""
    parts, donor = h.parse_parts(enc.overlay), h.parse_parts(enc.again)
    assert h.frame_head(parts.frames[1]) == h.frame_head(donor.frames[1])
    assert parts.frames[1].payload != donor.frames[1].payload
    parts.frames[1] = donor.frames[1]  # its digest is right for its bytes
    return h.compose(parts)


def swap(h, enc: Enc) -> bytes:
    parts = h.parse_parts(enc.overlay)
    a, b = parts.frames[0], parts.frames[1]
    parts.frames[0] = h.seal_frame(replace(b, seq=0))
    parts.frames[1] = h.seal_frame(replace(a, seq=1))
    parts.index[0], parts.index[1] = parts.index[1], parts.index[0]
    return h.compose(parts)


def drop_last(h, enc: Enc) -> bytes:
    parts = h.parse_parts(enc.overlay)
    parts.frames.pop()
    parts.index.pop()
    return h.compose(parts)


def flip_ciphertext(h, enc: Enc) -> bytes:
    parts = h.parse_parts(enc.overlay)
    f = parts.frames[-1]
    payload = bytearray(f.payload)
    payload[3] ^= 0x80
    parts.frames[-1] = h.seal_frame(replace(f, payload=bytes(payload)))
    return h.compose(parts)


TAMPERS = {"spliced": (splice, "frame 1 fails authentication"),
           "swapped": (swap, "frame 0 fails authentication"),
           "dropped-last": (drop_last, "summary fails authentication"),
           "flipped-ciphertext": (flip_ciphertext, "fails authentication")}


def test_fix_ups_alone_keep_the_overlay_valid(enc, h):
    """The dissector reassembles encrypted overlays byte for byte: a refusal below is due to
    the tampering, not to the fix-ups."""
    assert h.compose(h.parse_parts(enc.overlay)) == enc.overlay
    assert len(h.parse_parts(enc.overlay).frames) >= 3
    verify(io.BytesIO(h.compose(h.parse_parts(enc.overlay))), key=Key(key_file=enc.key))


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_tampering_only_the_aead_can_see_is_refused(enc, h, small_pair, tmp_path, how):
    tamper, message = TAMPERS[how]
    data = tamper(h, enc)
    with pytest.raises(CorruptError, match=message):
        verify(io.BytesIO(data), key=Key(key_file=enc.key))
    base = bases.load_path(small_pair.base_path)
    try:
        with pytest.raises(CorruptError, match=message):
            apply(io.BytesIO(data), base, tmp_path / "synth.qcow2", key=Key(key_file=enc.key))
    finally:
        base.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_tampering_exit_code(cli, enc, h, files, small_pair, how):
    bad = files / f"{how}.vmo"
    bad.write_bytes(TAMPERS[how][0](h, enc))
    out = files.parent / "out"
    r = cli("verify", bad, "--key-file", enc.key_path)
    assert r.code == ExitCode.CORRUPT, r.err
    assert_one_line_error(r)
    r = cli("apply", bad, "--key-file", enc.key_path, "--base", small_pair.base_path, "-o",
            out / "synth.qcow2")
    assert r.code == ExitCode.CORRUPT, r.err
    assert_one_line_error(r)
    assert list(out.iterdir()) == []
    # inspect reads no frame, but with the key it opens the summary, bound to the frame count.
    r = cli("inspect", bad, "--key-file", enc.key_path, "--json")
    assert r.code == (ExitCode.CORRUPT if how == "dropped-last" else 0), r.err


def test_a_frame_of_a_plain_overlay_is_not_accepted_in_an_encrypted_one(enc, small_pair, h):
    """Splicing an unsealed frame (flag 0) of the same change into the encrypted overlay."""
    parts, plain = h.parse_parts(enc.overlay), h.parse_parts(small_pair.multi)
    parts.frames[1] = plain.frames[1]
    with pytest.raises(CorruptError):
        verify(io.BytesIO(h.compose(parts)), key=Key(key_file=enc.key))


def test_index_that_lies_about_raw_sizes_is_refused(enc, h, tmp_path):
    """The index of an encrypted overlay is readable and protected only by an unkeyed digest,
    and inspect without the key reports sizes from it. SPEC.md 6: a reader MUST check that
    the index lists exactly the frames it read (offsets, sizes, digests); the raw size is one
    of those sizes, and the frame header (under the frame digest) says what it is."""
    parts = h.parse_parts(enc.overlay)
    entry = list(parts.index[0])
    entry[2] += 1 << 20  # raw_length: 1 MiB more than frame 0 decompresses to
    parts.index[0] = tuple(entry)
    data = h.compose(parts, reindex=False)
    (tmp_path / "honest.vmo").write_bytes(enc.overlay)
    (tmp_path / "lying.vmo").write_bytes(data)
    honest = describe(tmp_path / "honest.vmo")["sizes"]["payload_uncompressed"]
    assert describe(tmp_path / "lying.vmo")["sizes"]["payload_uncompressed"] == honest + (1 << 20)
    with pytest.raises(CorruptError):
        verify(io.BytesIO(data), key=Key(key_file=enc.key))


# ------------------------------------------------------------------------------ modes, keygen

def run_with_umask(h, umask: int, *args: object, env: dict | None = None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False,
                          env=env, preexec_fn=lambda: os.umask(umask))


@pytest.mark.parametrize("flatten", [False, True], ids=["child", "flatten"])
def test_apply_of_an_encrypted_overlay_is_private(enc, files, small_pair, h, flatten):
    if flatten and not h.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    out = files.parent / "out"
    extra = ["--flatten"] if flatten else []
    p = run_with_umask(h, 0o000, h.VMSYNTH, "apply", files / "enc.vmo", "--base",
                       small_pair.base_path, "-o", out / "secret.qcow2", "--key-file",
                       enc.key_path, *extra)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE((out / "secret.qcow2").stat().st_mode) == 0o600
    rebuilt = h.read_image(out / "secret.qcow2")
    whole = len(small_pair.app_data) // 512 * 512  # see test_flatten_keeps_the_whole_disk
    assert rebuilt[:whole] == small_pair.app_data[:whole]
    # Control: a plain overlay's result gets the usual mode, so the check above can fail.
    p = run_with_umask(h, 0o022, h.VMSYNTH, "apply", files / "plain.vmo", "--base",
                       small_pair.base_path, "-o", out / "plain.qcow2", *extra)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE((out / "plain.qcow2").stat().st_mode) == 0o644


@pytest.mark.qemu_img
def test_flatten_keeps_the_whole_disk(enc, files, small_pair, h):
    """small_pair's disk is 336,680 bytes, not a whole number of 512-byte sectors. `apply
    --flatten` hands the child to `qemu-img convert`, which sees whole sectors only: the
    flattened result must still hold every byte the overlay rebuilds (as the child does)."""
    if not h.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    assert len(small_pair.app_data) % 512
    out = files.parent / "out"
    p = h.run(h.VMSYNTH, "apply", files / "enc.vmo", "--base", small_pair.base_path, "-o",
              out / "flat.qcow2", "--key-file", enc.key_path, "--flatten", "--json", check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual_size"] == len(small_pair.app_data)
    rebuilt = h.read_image(out / "flat.qcow2")
    assert len(rebuilt) >= len(small_pair.app_data), "the flattened disk lost its last bytes"
    assert rebuilt[: len(small_pair.app_data)] == small_pair.app_data


def test_replacing_an_existing_output_makes_it_private(enc, files, small_pair, h):
    out = files.parent / "out" / "synth.qcow2"
    out.write_bytes(b"old")
    out.chmod(0o644)
    p = run_with_umask(h, 0o022, h.VMSYNTH, "apply", files / "enc.vmo", "--base",
                       small_pair.base_path, "-o", out, "--key-file", enc.key_path)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_writes_32_private_bytes_and_never_overwrites(h, tmp_path):
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    for path in (first, second):
        p = run_with_umask(h, 0o000, h.VMSYNTH, "keygen", "-o", path)
        assert p.returncode == 0, p.stderr
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_bytes()) == 32
    assert first.read_bytes() != second.read_bytes()
    before = first.read_bytes()
    p = run_with_umask(h, 0o022, h.VMSYNTH, "keygen", "-o", first)
    assert p.returncode == ExitCode.USAGE
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert first.read_bytes() == before
    # Not through a symlink to an existing file either.
    link = tmp_path / "link.key"
    link.symlink_to(first)
    p = run_with_umask(h, 0o022, h.VMSYNTH, "keygen", "-o", link)
    assert p.returncode != 0
    assert first.read_bytes() == before


# ------------------------------------------------------------------------------ fresh file ids

def test_two_encryptions_of_the_same_input_differ_and_agree(enc, small_pair, h, tmp_path):
    one, two = h.parse_parts(enc.overlay), h.parse_parts(enc.again)
    ids = {json.loads(p.manifest)["encryption"]["file_id"] for p in (one, two)}
    assert len(ids) == 2 and all(len(bytes.fromhex(i)) == 16 for i in ids)
    assert enc.overlay != enc.again
    assert len(one.frames) == len(two.frames)
    for a, b in zip(one.frames, two.frames, strict=True):
        # Same plaintext, same seq (the nonce): equal ciphertexts would mean a reused key
        # and nonce, i.e. a reused keystream. They must all differ.
        assert h.frame_head(a) == h.frame_head(b)
        assert a.payload != b.payload
        assert bytes(x ^ y for x, y in zip(a.payload, b.payload)) != bytes(len(a.payload))
    assert one.summary != two.summary
    base = bases.load_path(small_pair.base_path)
    try:
        for i, data in enumerate((enc.overlay, enc.again)):
            apply(io.BytesIO(data), base, tmp_path / f"r{i}.qcow2", key=Key(key_file=enc.key))
    finally:
        base.close()
    assert h.read_image(tmp_path / "r0.qcow2") == h.read_image(tmp_path / "r1.qcow2") \
        == small_pair.app_data


def test_passphrase_overlays_get_fresh_salts(small_pair):
    a = manifest_of(encrypt(small_pair, Key(passphrase="p"), None))["encryption"]
    b = manifest_of(encrypt(small_pair, Key(passphrase="p"), None))["encryption"]
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["file_id"] != b["file_id"]


# ------------------------------------------------------------------------------ scrypt limits

class ScryptSpy:
    """Stands in for cryptography's Scrypt, recording the parameters it is built with."""

    calls: ClassVar[list[tuple[int, int, int]]] = []

    def __init__(self, salt: bytes, length: int, n: int, r: int, p: int) -> None:
        ScryptSpy.calls.append((n, r, p))
        self._real = Scrypt(salt=salt, length=length, n=n, r=r, p=p)

    def derive(self, material: bytes) -> bytes:
        return self._real.derive(material)


def with_kdf(h, data: bytes, **changes) -> bytes:
    manifest = manifest_of(data)
    manifest["encryption"]["kdf"].update(changes)
    return h.reheader(data, manifest=manifest)


TOO_COSTLY = [{"n": 1 << 21}, {"n": 1 << 40}, {"r": 33}, {"p": 17},
              {"n": 1 << 20, "r": 32, "p": 17}, {"r": 1 << 30}]


@pytest.mark.parametrize("kdf", TOO_COSTLY, ids=lambda k: ",".join(f"{a}={b}" for a, b in
                                                                    k.items()))
def test_scrypt_above_the_limits_is_refused_before_deriving(enc, h, monkeypatch, kdf):
    data = with_kdf(h, enc.passphrase, **kdf)
    ScryptSpy.calls = []
    monkeypatch.setattr("vmsynth.formats.seal.Scrypt", ScryptSpy)
    with pytest.raises(UnsupportedError):
        verify(io.BytesIO(data), key=Key(passphrase=PASSPHRASE))
    assert ScryptSpy.calls == []
    # Control: parameters within the limits are derived (and then mismatch the key check).
    with pytest.raises(WrongKeyError):
        verify(io.BytesIO(with_kdf(h, enc.passphrase, n=1 << 12)),
               key=Key(passphrase=PASSPHRASE))
    assert ScryptSpy.calls == [(1 << 12, 8, 1)]


@pytest.mark.parametrize("kdf", TOO_COSTLY[:4], ids=lambda k: ",".join(f"{a}={b}" for a, b in
                                                                        k.items()))
def test_scrypt_above_the_limits_is_exit_12(cli, enc, h, files, small_pair, monkeypatch, kdf):
    bad = files / "costly.vmo"
    bad.write_bytes(with_kdf(h, enc.passphrase, **kdf))
    monkeypatch.setenv("VMSYNTH_PASSPHRASE", PASSPHRASE)
    for argv in (["verify", bad], ["inspect", bad],
                 ["apply", bad, "--base", small_pair.base_path, "-o",
                  files.parent / "out" / "s.qcow2"]):
        r = cli(*argv)
        assert r.code == ExitCode.UNSUPPORTED, (argv, r.err)
        assert_one_line_error(r)
    assert list((files.parent / "out").iterdir()) == []


@pytest.mark.parametrize("bad", [
    {"key_check": "\u00e9" * 32}, {"key_check": 12}, {"file_id": "zz"}, {"file_id": 5},
    {"kdf": "scrypt"}, {"kdf": {"name": "argon2"}}, {"cipher": "rot13"}, {"cipher": None}],
    ids=["key_check-not-ascii", "key_check-number", "file_id-not-hex", "file_id-number",
         "kdf-string", "kdf-unknown", "cipher-unknown", "cipher-null"])
def test_malformed_encryption_block_is_a_format_error(enc, h, bad):
    """A crafted encryption block (header digest recomputed) is refused with a vmsynth error:
    corrupt, unsupported or wrong key, never an internal error."""
    manifest = manifest_of(enc.overlay)
    manifest["encryption"].update(bad)
    data = h.reheader(enc.overlay, manifest=manifest)
    with pytest.raises((CorruptError, UnsupportedError, WrongKeyError)):
        verify(io.BytesIO(data), key=Key(key_file=enc.key))


@pytest.mark.parametrize("block", [["x"], "sealed", None, 7, {}, {"cipher": "aes-256-gcm"}],
                         ids=["list", "string", "null", "number", "empty", "no-kdf"])
def test_inspect_of_a_malformed_encryption_block_without_key(cli, enc, h, files, block):
    """inspect without a key reads the encryption block for display: a crafted one must give
    a one-line vmsynth error (or be shown), never an internal error (exit 1)."""
    manifest = manifest_of(enc.overlay)
    manifest["encryption"] = block
    bad = files / "crafted.vmo"
    bad.write_bytes(h.reheader(enc.overlay, manifest=manifest))
    for argv in (["inspect", bad, "--json"], ["inspect", bad]):
        r = cli(*argv)
        assert r.code in (0, ExitCode.CORRUPT, ExitCode.UNSUPPORTED), (argv, r.err)
        if r.code:
            assert "internal error" not in r.err
            assert r.err.startswith("error: ") and r.err.count("\n") == 1, r.err


# ------------------------------------------------------------------------------ independent spec reader

def spec_hkdf(master: bytes, file_id: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=file_id, info=info).derive(master)


def spec_open(data: bytes, key_file: bytes | None = None, passphrase: str | None = None
              ) -> tuple[dict, list[list[tuple]], list[bytes]]:
    """Open an encrypted overlay following SPEC.md section 8 alone (no vmsynth code besides
    the byte layout): (summary, records per frame, data area per frame)."""
    length = HEADER.unpack_from(data)[3]
    header_digest = data[length - 32: length]
    assert hashlib.sha256(data[: length - 32]).digest() == header_digest
    enc_block = json.loads(data[HEADER.size: length - 32])["encryption"]
    kdf = enc_block["kdf"]
    if kdf["name"] == "none":
        master = key_file
    else:
        master = Scrypt(salt=bytes.fromhex(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"],
                        p=kdf["p"]).derive(passphrase.encode("utf-8"))
    file_id = bytes.fromhex(enc_block["file_id"])
    assert spec_hkdf(master, file_id, b"vmsynth overlay v1 key check", 16).hex() == \
        enc_block["key_check"]
    aead = AESGCM(spec_hkdf(master, file_id, b"vmsynth overlay v1 frame key", 32))
    pos, records, areas, count = length, [], [], 0
    while data[pos: pos + 4] == b"FRAM":
        head = data[pos: pos + 24]
        seq, n_records, stored, raw_len = (int.from_bytes(head[8:12], "little"),
                                           int.from_bytes(head[12:16], "little"),
                                           int.from_bytes(head[16:20], "little"),
                                           int.from_bytes(head[20:24], "little"))
        assert seq == count and head[6] & 1  # sealed flag
        sealed = data[pos + 56: pos + 56 + stored]
        plain = aead.decrypt(b"\0\0\0\0" + seq.to_bytes(8, "big"), sealed, header_digest + head)
        if head[5] == 1:
            plain = zstandard.ZstdDecompressor().decompress(plain, max_output_size=raw_len)
        assert len(plain) == raw_len
        records.append(list(RECORD.iter_unpack(plain[: 32 * n_records])))
        areas.append(plain[32 * n_records:])
        pos += 56 + stored
        count += 1
    summary_len = int.from_bytes(data[pos + 4: pos + 8], "little")
    sealed = data[pos + 8: pos + 8 + summary_len]
    body = aead.decrypt(b"\xff" * 12, sealed, header_digest + b"SUMM" + count.to_bytes(8, "little"))
    return json.loads(body), records, areas


def spec_rebuild(base: bytes, size: int, records: list[list[tuple]], areas: list[bytes]) -> bytes:
    """SPEC.md 4.1, applied naively to whole byte strings."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    for frame_records, area in zip(records, areas, strict=True):
        pos = 0
        for kind, stored, target, length, source in frame_records:
            chunk = area[pos: pos + stored]
            pos += stored
            if kind == 1:
                piece = chunk
            elif kind == 2:
                piece = bytes(length)
            elif kind == 3:
                piece = base[source: source + length]
            elif kind == 4:
                piece = bytes(out[source: source + length])
            else:
                d = zstandard.ZstdCompressionDict(base[source: source + length],
                                                  dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                piece = zstandard.ZstdDecompressor(dict_data=d).decompress(chunk)
            assert len(piece) == length
            out[target: target + length] = piece
    return bytes(out)


@pytest.mark.parametrize("which", ["key_file", "passphrase"])
def test_independent_reader_agrees_with_vmsynth(enc, small_pair, which):
    data = enc.overlay if which == "key_file" else enc.passphrase
    summary, records, areas = spec_open(data, key_file=enc.key, passphrase=PASSPHRASE)
    assert summary["blocks"] == small_pair.expected_blocks
    assert summary["frames"] == len(records) >= 3
    size = manifest_of(data)["streams"][0]["virtual_size"]
    assert spec_rebuild(small_pair.base_data, size, records, areas) == small_pair.app_data


def test_vmsynth_reads_what_the_independent_writer_seals(enc, small_pair, h, tmp_path):
    """Reseal the overlay's frames under a new file id with section 8 alone: vmsynth must
    open the result (the construction is the spec's, not just self-consistent)."""
    parts = h.parse_parts(enc.overlay)
    summary, records, areas = spec_open(enc.overlay, key_file=enc.key)
    manifest = json.loads(parts.manifest)
    file_id = bytes(range(16))
    manifest["encryption"]["file_id"] = file_id.hex()
    manifest["encryption"]["key_check"] = spec_hkdf(enc.key, file_id,
                                                    b"vmsynth overlay v1 key check", 16).hex()
    parts.manifest = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    head = HEADER.pack(parts.magic, parts.major, parts.minor, HEADER.size + len(parts.manifest)
                       + 32, parts.incompat, parts.compat, len(parts.manifest), 0) + parts.manifest
    header_digest = hashlib.sha256(head).digest()
    summary["header_digest"] = "sha256:" + header_digest.hex()  # binds header and body (5)
    aead = AESGCM(spec_hkdf(enc.key, file_id, b"vmsynth overlay v1 frame key", 32))
    for i, (f, recs, area) in enumerate(zip(parts.frames, records, areas, strict=True)):
        raw = b"".join(RECORD.pack(*r) for r in recs) + area
        new = replace(f, codec=0, raw_length=len(raw), stored_length=len(raw) + 16)
        sealed = aead.encrypt(b"\0\0\0\0" + i.to_bytes(8, "big"), raw,
                              header_digest + h.frame_head(new))
        parts.frames[i] = h.seal_frame(replace(new, payload=sealed))
    parts.summary = aead.encrypt(b"\xff" * 12, json.dumps(summary).encode(),
                                 header_digest + b"SUMM" + len(parts.frames).to_bytes(8, "little"))
    data = h.compose(parts)
    base = bases.load_path(small_pair.base_path)
    try:
        apply(io.BytesIO(data), base, tmp_path / "synth.qcow2", key=Key(key_file=enc.key))
    finally:
        base.close()
    assert h.read_image(tmp_path / "synth.qcow2") == small_pair.app_data


# ------------------------------------------------------------------------------ vectors

def load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load_generator()


@pytest.fixture(scope="module")
def vector_base(gen, tmp_path_factory):
    base_path, _ = gen.build_images(tmp_path_factory.mktemp("enc-vector-images"))
    return base_path


def vector_key(name: str) -> tuple[Key, list[str], dict[str, str]]:
    """(Key, CLI args, environment additions) for an encrypted vector."""
    spec = DOC["vectors"][name]["key"]
    if "key_file" in spec:
        path = VECTORS / spec["key_file"]
        return Key(key_file=path.read_bytes()), ["--key-file", str(path)], {}
    return Key(passphrase=spec["passphrase"]), [], {"VMSYNTH_PASSPHRASE": spec["passphrase"]}


def test_encrypted_vectors_are_listed():
    """A key file and a passphrase, each good and tampered."""
    assert {"enc-key-good.vmo", "enc-pass-good.vmo"} <= set(ENCRYPTED)
    kinds = {(("key_file" in DOC["vectors"][n]["key"]),
              DOC["vectors"][n]["with_key"]["outcome"] == "ok") for n in ENCRYPTED}
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    for name in ENCRYPTED:
        data = (VECTORS / name).read_bytes()
        assert int.from_bytes(data[16:24], "little") & 1, f"{name} is not marked encrypted"
    key = (VECTORS / DOC["key_file"]["name"]).read_bytes()
    assert len(key) == 32
    assert "sha256:" + hashlib.sha256(key).hexdigest() == DOC["key_file"]["sha256"]


@pytest.mark.parametrize("name", ENCRYPTED)
def test_encrypted_vector_with_its_key(name, vector_base, gen, tmp_path, h):
    expected = DOC["vectors"][name]["with_key"]
    key, _, _ = vector_key(name)
    base = gen.open_base(vector_base)
    out = tmp_path / "synth.qcow2"
    try:
        with open(VECTORS / name, "rb") as f:
            if expected["outcome"] == "ok":
                assert verify(f, key=key).replay.frames >= 3
                f.seek(0)
                report = apply(f, base, out, key=key)
                assert report.replay.result_digest == expected["result_digest"]
            else:
                cls = {"corrupt": CorruptError, "wrong-key": WrongKeyError,
                       "unsupported": UnsupportedError}[expected["outcome"]]
                with pytest.raises(cls) as info:
                    verify(f, key=key)
                assert int(errors.exit_code(info.value)) == expected["exit_code"]
                f.seek(0)
                with pytest.raises(cls):
                    apply(f, base, out, key=key)
    finally:
        base.close()
    if expected["outcome"] == "ok":
        assert h.sha256(h.read_image(out)) == expected["disk_sha256"]
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ENCRYPTED)
def test_encrypted_vector_cli_exit_codes(name, cli, monkeypatch, tmp_path):
    expected = DOC["vectors"][name]
    _, args, env = vector_key(name)
    r = cli("verify", VECTORS / name)
    assert r.code == expected["exit_code"] == ExitCode.KEY  # no key
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = cli("verify", VECTORS / name, *args)
    want = 0 if expected["with_key"]["outcome"] == "ok" else expected["with_key"]["exit_code"]
    assert r.code == want, r.err
    # A wrong key is a key error whatever else is wrong with the file (it is checked first),
    # except that a passphrase overlay asking for too costly a derivation is refused first.
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(32))
    monkeypatch.setenv("VMSYNTH_PASSPHRASE", "not the passphrase")
    r = cli("verify", VECTORS / name, *(["--key-file", wrong] if args else []))
    assert r.code == (ExitCode.UNSUPPORTED if "-scrypt-" in name else ExitCode.KEY), r.err


def test_encrypted_vectors_use_the_generators_fixed_ids(gen):
    for name in ENCRYPTED:
        block = manifest_of((VECTORS / name).read_bytes())["encryption"]
        assert block["file_id"] == gen.FILE_ID.hex()
        if block["kdf"]["name"] == "scrypt":
            assert block["kdf"]["salt"] == gen.SALT.hex()


def test_encrypted_vector_opens_with_the_independent_reader(vector_base, h):
    for name in ("enc-key-good.vmo", "enc-pass-good.vmo"):
        data = (VECTORS / name).read_bytes()
        key, _, _ = vector_key(name)
        summary, records, areas = spec_open(data, key.key_file, key.passphrase)
        size = manifest_of(data)["streams"][0]["virtual_size"]
        rebuilt = spec_rebuild(h.read_image(vector_base), size, records, areas)
        assert h.sha256(rebuilt) == DOC["vectors"][name]["with_key"]["disk_sha256"]
        assert summary["result_digest"] == DOC["vectors"][name]["with_key"]["result_digest"]
