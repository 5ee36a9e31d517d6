"""The committed overlay test vectors (formats/vectors/): each must give its recorded outcome,
and the generator must reproduce them byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
from vmsynth.cli.main import main
from vmsynth.formats import errors as codec

from vmsynth import errors, memory
from vmsynth.apply import apply
from vmsynth.keys import Key
from vmsynth.verify import describe, verify

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
DOC = json.loads((VECTORS / "vectors.json").read_text())
NAMES = sorted(DOC["vectors"])
BAD = [n for n in NAMES if DOC["vectors"][n]["outcome"] != "ok"]
REQUIRED = {"good.vmo", "bad-magic.vmo", "truncated.vmo", "bad-digest.vmo",
            "unknown-version.vmo", "unknown-feature.vmo"}


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
    """The base the vectors were made for, rebuilt from the generator's recipe."""
    folder = tmp_path_factory.mktemp("vector-images")
    base_path, app_path = gen.build_images(folder)
    base_vmem, _ = gen.build_memory(folder)
    return base_path, app_path, base_vmem


def error_class(name: str) -> type[Exception]:
    """The error a reader raises for a vector's recorded outcome (the codec's own classes
    for what the codec decides; the engine's subclasses are caught by them too)."""
    return {"CorruptOverlayError": codec.CorruptError, "UnsupportedFormatError":
            codec.UnsupportedError, "WrongKeyError": codec.WrongKeyError}.get(
        name, getattr(errors, name, None))


def test_vectors_json_lists_exactly_the_vector_files():
    on_disk = {p.name for p in VECTORS.glob("*.vmo")}
    assert on_disk == set(NAMES)
    assert REQUIRED <= on_disk


@pytest.mark.parametrize("name", NAMES)
def test_recorded_file_digest(name):
    data = (VECTORS / name).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == DOC["vectors"][name]["sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_verify_without_base_gives_recorded_outcome(name):
    expected = DOC["vectors"][name]
    with open(VECTORS / name, "rb") as f:
        if expected["outcome"] == "ok":
            report = verify(f)
            assert report.overlay_bytes == (VECTORS / name).stat().st_size
        else:
            cls = error_class(expected["error"])
            with pytest.raises(cls) as info:
                verify(f)
            assert int(errors.exit_code(info.value)) == expected["exit_code"]


@pytest.mark.parametrize("name", NAMES)
def test_cli_verify_exit_code(name, capsys):
    expected = DOC["vectors"][name]
    with pytest.raises(SystemExit) as info:
        main(["verify", str(VECTORS / name)])
    want = 0 if expected["outcome"] == "ok" else expected["exit_code"]
    assert info.value.code == want
    err = capsys.readouterr().err
    if want:
        assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name", NAMES)
def test_apply_on_the_right_base(name, vector_base, gen, tmp_path, h):
    base_path, _, base_vmem = vector_base
    expected = DOC["vectors"][name]
    base = gen.open_base(base_path, base_vmem if name.startswith("mem-") else None)
    out = tmp_path / "synth.qcow2"
    try:
        with open(VECTORS / name, "rb") as f:
            if expected["outcome"] == "ok":
                report = apply(f, base, out)
                assert report.replay.result_digest == expected["result_digest"]
                assert report.virtual_size == expected["virtual_size"]
            else:
                with pytest.raises(error_class(expected["error"])):
                    apply(f, base, out)
    finally:
        base.close()
    if expected["outcome"] == "ok":
        rebuilt = h.read_image(out)
        assert len(rebuilt) == expected["virtual_size"]
        assert "sha256:" + hashlib.sha256(rebuilt).hexdigest() == expected["disk_sha256"]
        if "memory" in expected:
            vmem = memory.read_vmem(tmp_path / "synth.vmem")
            memory.check(vmem)
            assert vmem.digest == expected["memory"]["digest"]
    else:
        assert list(tmp_path.iterdir()) == []  # nothing, not even a temporary file


def test_good_vector_matches_the_generators_app(vector_base, h):
    """The recorded disk digest is the digest of the app the recipe builds."""
    _, app_path, _ = vector_base
    digest = "sha256:" + hashlib.sha256(h.read_image(app_path)).hexdigest()
    assert digest == DOC["vectors"]["good.vmo"]["disk_sha256"]


def test_good_vector_verifies_against_its_base(vector_base, gen):
    base = gen.open_base(vector_base[0])  # good.vmo has no memory: a disk-only base
    try:
        with open(VECTORS / "good.vmo", "rb") as f:
            report = verify(f, base)
    finally:
        base.close()
    assert report.base_checked
    assert report.replay.result_digest == DOC["vectors"]["good.vmo"]["result_digest"]


def test_good_vector_is_refused_on_another_base(vector_base, gen, tmp_path, h):
    base_path, _, _ = vector_base
    other = bytearray(h.read_image(base_path))
    other[5000] ^= 0xFF
    other_path = h.write_image(tmp_path / "other.qcow2", bytes(other))
    base = gen.open_base(other_path)
    try:
        with open(VECTORS / "good.vmo", "rb") as f, pytest.raises(errors.BaseMismatchError):
            apply(f, base, tmp_path / "synth.qcow2")
    finally:
        base.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.qcow2"]


def test_inspect_good_vector():
    info = describe(VECTORS / "good.vmo")
    good = DOC["vectors"]["good.vmo"]
    assert info["blocks"] == good["blocks"]
    assert info["result_digest"] == good["result_digest"]
    assert info["sizes"]["virtual_disk"] == good["virtual_size"]
    assert info["base"]["name"] == DOC["base"]["name"]
    assert info["base"]["virtual_size"] == DOC["base"]["virtual_size"]


def test_good_vector_uses_every_record_kind():
    assert all(n > 0 for n in DOC["vectors"]["good.vmo"]["blocks"].values())
    assert set(DOC["vectors"]["good.vmo"]["blocks"]) == {"data", "delta", "zero", "base", "copy"}
    pages = DOC["vectors"]["mem-good.vmo"]["memory"]["blocks"]
    assert set(pages) == {"data", "delta", "zero", "base", "copy", "disk", "disk_copy"}
    assert all(n > 0 for n in pages.values()), pages


def test_vectors_are_format_1_2_and_memory_sets_its_bit():
    for name in ("good.vmo", "mem-good.vmo"):
        major, minor, _, incompat = struct.unpack_from("<HHIQ", (VECTORS / name).read_bytes(), 8)
        assert (major, minor) == (1, 2)
        assert incompat == (4 if name.startswith("mem-") else 0)
        assert describe(VECTORS / name)["format_version"] == "1.2"


def test_memory_vector_matches_the_generators_snapshot(vector_base, gen, tmp_path):
    _, app_vmem = gen.build_memory(tmp_path)
    assert memory.read_vmem(app_vmem).digest == DOC["vectors"]["mem-good.vmo"]["memory"]["digest"]


def test_regenerating_gives_identical_files(gen, tmp_path):
    doc = gen.generate(tmp_path)
    assert doc == DOC
    produced = sorted(p.name for p in tmp_path.iterdir())
    assert produced == sorted(NAMES + ["vectors.json"])
    for name in produced:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), (
            f"{name} differs from a fresh run of make_vectors.py: the writer changed (or the "
            "zstd library did); if intended, regenerate the vectors and review the diff")


def test_generator_leaves_the_environment_alone(gen, tmp_path, vmsynth_home):
    gen.generate(tmp_path / "out")
    assert os.environ["VMSYNTH_HOME"] == str(vmsynth_home)
    assert list(vmsynth_home.iterdir()) == []  # scanned its base in a private cache


def test_vectors_folder_is_small():
    total = sum(p.stat().st_size for p in VECTORS.iterdir() if p.is_file())
    assert total < 100 * 1024
    for p in VECTORS.glob("*.vmo"):
        assert p.stat().st_size <= 4 * 1024


def test_generator_script_runs_standalone(tmp_path, h):
    """`python formats/vectors/make_vectors.py OUTDIR`, as its docstring says to run it."""
    p = h.run(h.VENV_BIN / "python", VECTORS / "make_vectors.py", tmp_path, check=False,
              cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for name in NAMES + ["vectors.json"]:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes()


# ------------------------------------------------------------------------------ golden old files
# vmsynth 0.1's vectors (formats 1.0 and 1.1), kept as they were written: every later reader
# must still give their recorded outcomes (never regenerate or delete them).

GOLDEN = VECTORS / "golden-0.1"
GOLDEN_DOC = json.loads((GOLDEN / "vectors.json").read_text())
GOLDEN_NAMES = sorted(GOLDEN_DOC["vectors"])
OLD_OUTCOME = {"CorruptOverlayError": codec.CorruptError,
               "UnsupportedFormatError": codec.UnsupportedError,
               "WrongKeyError": codec.WrongKeyError}


def test_golden_files_are_as_recorded():
    assert {p.name for p in GOLDEN.glob("*.vmo")} == set(GOLDEN_NAMES)
    for name in GOLDEN_NAMES:
        data = (GOLDEN / name).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == GOLDEN_DOC["vectors"][name][
            "sha256"], name
    key = (GOLDEN / GOLDEN_DOC["key_file"]["name"]).read_bytes()
    assert "sha256:" + hashlib.sha256(key).hexdigest() == GOLDEN_DOC["key_file"]["sha256"]


def golden_key(expected: dict) -> Key | None:
    if "key_file" in expected["key"]:
        return Key(key_file=(GOLDEN / expected["key"]["key_file"]).read_bytes())
    return Key(passphrase=expected["key"]["passphrase"])


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_file_gives_its_recorded_outcome(name, vector_base, gen, tmp_path, h):
    """Rebuilt on the recipe's base (with the key when it has one): the recorded outcome."""
    expected = GOLDEN_DOC["vectors"][name]
    key = None
    if "with_key" in expected:
        with open(GOLDEN / name, "rb") as f, pytest.raises(codec.WrongKeyError):
            verify(f)
        key, expected = golden_key(expected), expected["with_key"]
    base_path, _, base_vmem = vector_base
    base = gen.open_base(base_path, base_vmem if name.startswith("mem-") else None)
    out = tmp_path / "synth.qcow2"
    try:
        with open(GOLDEN / name, "rb") as f:
            if expected["outcome"] == "ok":
                report = apply(f, base, out, key=key)
                assert report.replay.result_digest == expected["result_digest"]
            else:
                with pytest.raises(OLD_OUTCOME[expected["error"]]) as info:
                    apply(f, base, out, key=key)
                assert int(errors.exit_code(info.value)) == expected["exit_code"]
    finally:
        base.close()
    if expected["outcome"] == "ok":
        assert h.sha256(h.read_image(out)) == expected["disk_sha256"]
        if "memory" in expected:
            vmem = memory.read_vmem(tmp_path / "synth.vmem")
            memory.check(vmem)
            assert vmem.digest == expected["memory"]["digest"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_golden_memory_file_is_1_1_without_the_memory_bit():
    """The legacy rule's case (SPEC.md 10): 1.1 wrote memory streams without bit 2."""
    data = (GOLDEN / "mem-good.vmo").read_bytes()
    major, minor, _, incompat = struct.unpack_from("<HHIQ", data, 8)
    assert (major, minor, incompat) == (1, 1, 0)
    assert describe(GOLDEN / "mem-good.vmo")["memory"]["frames"] >= 1
