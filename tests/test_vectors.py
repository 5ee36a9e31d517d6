"""The committed test vectors (formats/vectors/, SPEC.md section 13): each file gives its
recorded outcome, the base's committed bytes are the base the vectors name, every numbered
MUST of SPEC.md is exercised, and the generator reproduces the files byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from vmsynth.cli.main import main
from vmsynth.formats import errors as codec
from vmsynth.formats import vmem as vmem_codec
from vmsynth.formats.layout import MEDIA_TYPE

from vmsynth import errors, memory
from vmsynth.apply import apply
from vmsynth.keys import Key
from vmsynth.verify import describe, verify

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "formats" / "vectors"
SPEC = (ROOT / "formats" / "SPEC.md").read_text()
DOC = json.loads((VECTORS / "vectors.json").read_text())
NAMES = sorted(DOC["vectors"])
OVERLAYS = [n for n in NAMES if n.endswith(".vmo")]
PLAIN = [n for n in OVERLAYS if "with_key" not in DOC["vectors"][n]]
ENCRYPTED = [n for n in OVERLAYS if "with_key" in DOC["vectors"][n]]
VMEMS = [n for n in NAMES if n.endswith(".vmem")]
REQUIRED = {"good.vmo", "bad-magic.vmo", "truncated.vmo", "bad-digest.vmo",
            "unknown-version.vmo", "unknown-feature.vmo"}
# The format-level outcomes, and what the codec (or, for base-mismatch, the engine) raises.
OUTCOME_CLASS = {"corrupt": codec.CorruptError, "unsupported": codec.UnsupportedError,
                 "wrong-key": codec.WrongKeyError, "base-mismatch": errors.BaseMismatchError}
MUST = re.compile(r"\[(M\d+)\]")


def load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load_generator()


def unzstd(name: str) -> bytes:
    return zstandard.ZstdDecompressor().decompress((VECTORS / name).read_bytes(),
                                                   max_output_size=1 << 24)


@pytest.fixture(scope="module")
def vector_base(tmp_path_factory, h):
    """The base the vectors name, from its committed bytes (not from our recipe): a qcow2 of
    base.disk.zst's contents and the snapshot base.vmem.zst holds."""
    folder = tmp_path_factory.mktemp("vector-base")
    base_path = h.write_image(folder / "base.qcow2", unzstd(DOC["base"]["file"]))
    base_vmem = folder / "base.vmem"
    base_vmem.write_bytes(unzstd(DOC["base"]["memory"]["file"]))
    return base_path, base_vmem


def open_base(gen, vector_base, name: str):
    base_path, base_vmem = vector_base
    return gen.open_base(base_path, base_vmem if name.startswith("mem-") else None)


def expect(outcome: str, exit_code: int | None, call, classes: dict | None = None) -> None:
    """`call()` gives `outcome`: returns for ok, else raises its class (with the CLI's exit
    code for it, when `exit_code` is given)."""
    if outcome == "ok":
        call()
        return
    with pytest.raises((classes or OUTCOME_CLASS)[outcome]) as info:
        call()
    if exit_code is not None:
        assert int(errors.exit_code(info.value)) == exit_code, info.value


# ------------------------------------------------------------------------------ the files

def test_vectors_json_lists_exactly_the_vector_files():
    on_disk = {p.name for p in VECTORS.glob("*.vmo")} | {p.name for p in VECTORS.glob("*.vmem")}
    assert on_disk == set(NAMES)
    assert REQUIRED <= on_disk


@pytest.mark.parametrize("name", NAMES)
def test_recorded_file_digest(name):
    data = (VECTORS / name).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == DOC["vectors"][name]["sha256"]


def test_outcomes_are_format_classes_with_the_clis_codes_beside():
    assert set(DOC["outcomes"]) == {"ok", "corrupt", "unsupported", "wrong-key", "base-mismatch"}
    for name, v in DOC["vectors"].items():
        for o in (v, v.get("with_key")):
            if o is None:
                continue
            assert o["outcome"] in DOC["outcomes"], name
            want = DOC["outcomes"][o["outcome"]]["exit_code"]
            if name.endswith(".vmem") and o["outcome"] == "corrupt":
                want = int(errors.ExitCode.DAMAGED_SNAPSHOT)  # the CLI's code for snapshots
            assert o["exit_code"] == want, name
        assert v.get("structure_only", v["outcome"]) in DOC["outcomes"]
        assert "error" not in v  # no class names of one implementation
    assert DOC["format"]["overlay_media_type"] == MEDIA_TYPE
    assert DOC["format"]["vmem_media_type"] == vmem_codec.MEDIA_TYPE


def test_every_outcome_has_vectors():
    seen = {v["outcome"] for v in DOC["vectors"].values()} | {
        v["with_key"]["outcome"] for v in DOC["vectors"].values() if "with_key" in v}
    assert seen == set(DOC["outcomes"])


# ------------------------------------------------------------------------------ the base

def test_the_committed_base_is_the_one_the_vectors_name(gen):
    disk = unzstd(DOC["base"]["file"])
    assert len(disk) == DOC["base"]["virtual_size"]
    assert "sha256:" + hashlib.sha256(disk).hexdigest() == DOC["base"]["digest"]
    assert disk == gen.base_contents()  # and our recipe still makes it


def test_the_committed_base_snapshot_is_the_one_the_vectors_name(vector_base):
    _, base_vmem = vector_base
    vmem = memory.read_vmem(base_vmem)
    memory.check(vmem)  # its contents match its own digest
    assert (vmem.size, vmem.digest) == (DOC["base"]["memory"]["size"],
                                        DOC["base"]["memory"]["digest"])


@pytest.mark.qemu_img
def test_the_base_with_plain_tools(tmp_path, h):
    """What vectors.json tells another implementation to do: zstd -d, qemu-img convert."""
    if not (h.which("zstd") and h.which("qemu-img")):
        pytest.skip("needs the zstd and qemu-img commands")
    h.run("zstd", "-q", "-d", VECTORS / DOC["base"]["file"], "-o", tmp_path / "base.raw")
    h.qemu_img("convert", "-f", "raw", "-O", "qcow2", tmp_path / "base.raw",
               tmp_path / "base.qcow2")
    assert h.sha256(h.read_image(tmp_path / "base.qcow2")) == DOC["base"]["digest"]


# ------------------------------------------------------------------------------ outcomes

@pytest.mark.parametrize("name", OVERLAYS)
def test_verify_without_base_gives_the_structure_outcome(name):
    v = DOC["vectors"][name]
    outcome = v.get("structure_only", v["outcome"])

    def run():
        with open(VECTORS / name, "rb") as f:
            report = verify(f)
        assert report.overlay_bytes == (VECTORS / name).stat().st_size

    expect("ok" if outcome == "base-mismatch" else outcome, v["exit_code"] if outcome ==
           v["outcome"] else DOC["outcomes"][outcome]["exit_code"], run)


@pytest.mark.parametrize("name", OVERLAYS)
def test_cli_verify_exit_code(name, capsys):
    v = DOC["vectors"][name]
    outcome = v.get("structure_only", v["outcome"])
    with pytest.raises(SystemExit) as info:
        main(["verify", str(VECTORS / name)])
    assert info.value.code == DOC["outcomes"][outcome]["exit_code"]
    err = capsys.readouterr().err
    if info.value.code:
        assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name", PLAIN)
def test_apply_on_the_vectors_base_gives_the_outcome(name, vector_base, gen, tmp_path, h):
    v = DOC["vectors"][name]
    base = open_base(gen, vector_base, name)
    out = tmp_path / "synth.qcow2"
    try:
        def run():
            with open(VECTORS / name, "rb") as f:
                report = apply(f, base, out)
            assert report.replay.result_digest == v["result_digest"]
            assert report.virtual_size == v["virtual_size"]

        expect(v["outcome"], v["exit_code"], run)
    finally:
        base.close()
    if v["outcome"] == "ok":
        rebuilt = h.read_image(out)
        assert len(rebuilt) == v["virtual_size"]
        assert "sha256:" + hashlib.sha256(rebuilt).hexdigest() == v["disk_sha256"]
        if "memory" in v:
            vmem = memory.read_vmem(tmp_path / "synth.vmem")
            memory.check(vmem)
            assert vmem.digest == v["memory"]["digest"]
    else:
        assert list(tmp_path.iterdir()) == []  # nothing, not even a temporary file


@pytest.mark.parametrize("name", ENCRYPTED)
def test_encrypted_vector_without_and_with_its_key(name, vector_base, gen, tmp_path, h):
    v = DOC["vectors"][name]
    spec = v["key"]
    key = Key(key_file=(VECTORS / spec["key_file"]).read_bytes()) if "key_file" in spec \
        else Key(passphrase=spec["passphrase"])
    base = open_base(gen, vector_base, name)
    out = tmp_path / "synth.qcow2"
    try:
        def without():
            with open(VECTORS / name, "rb") as f:
                apply(f, base, out)

        expect(v["outcome"], v["exit_code"], without)
        w = v["with_key"]

        def with_key():
            with open(VECTORS / name, "rb") as f:
                report = apply(f, base, out, key=key)
            assert report.replay.result_digest == w["result_digest"]

        expect(w["outcome"], w["exit_code"], with_key)
    finally:
        base.close()
    if v["with_key"]["outcome"] == "ok":
        assert h.sha256(h.read_image(out)) == v["with_key"]["disk_sha256"]
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", VMEMS)
def test_vmem_vector_gives_its_outcome(name, tmp_path):
    """The codec on the trailer and header; the engine on the contents too (and the CLI's
    exit codes through the engine's errors)."""
    v = DOC["vectors"][name]
    path = tmp_path / name
    shutil.copyfile(VECTORS / name, path)
    structure = v.get("structure_only", v["outcome"])
    with open(path, "rb") as f:  # the codec knows no exit codes
        expect(structure, None, lambda: vmem_codec.read_tail(f, name))

    def whole():
        vmem = memory.read_vmem(path)
        memory.check(vmem)
        assert vmem.digest == v["digest"]

    # The engine's error for a damaged snapshot is its own (exit 24), not an overlay's.
    expect(v["outcome"], v["exit_code"], whole,
           OUTCOME_CLASS | {"corrupt": errors.DamagedSnapshotError})


def test_the_unknown_feature_is_reported_by_name(capsys):
    v = DOC["vectors"]["unknown-feature-named.vmo"]
    with pytest.raises(SystemExit):
        main(["verify", str(VECTORS / "unknown-feature-named.vmo")])
    assert f"'{v['feature_name']}' (bit 40)" in capsys.readouterr().err


def test_inspect_good_vector():
    info = describe(VECTORS / "good.vmo")
    good = DOC["vectors"]["good.vmo"]
    assert info["blocks"] == good["blocks"]
    assert info["result_digest"] == good["result_digest"]
    assert info["sizes"]["virtual_disk"] == good["virtual_size"]
    assert info["base"]["name"] == DOC["base"]["name"]
    assert info["base"]["digest"] == DOC["base"]["digest"]
    assert info["media_type"] == MEDIA_TYPE
    assert describe(VECTORS / "section-unknown.vmo")["sections"] == [
        {"tag": "wset", "length": 512}]
    assert describe(VECTORS / "mem-good.vmo")["features"] == ["memory"]


def test_good_vectors_use_every_record_kind():
    assert all(n > 0 for n in DOC["vectors"]["good.vmo"]["blocks"].values())
    assert set(DOC["vectors"]["good.vmo"]["blocks"]) == {"data", "delta", "zero", "base", "copy"}
    pages = DOC["vectors"]["mem-good.vmo"]["memory"]["blocks"]
    assert set(pages) == {"data", "delta", "zero", "base", "copy", "disk", "disk_copy"}
    assert all(n > 0 for n in pages.values()), pages


def test_vectors_are_format_1_2_and_memory_sets_its_bit():
    for name in ("good.vmo", "mem-good.vmo", "mem-solid-good.vmo"):
        major, minor, _, incompat = struct.unpack_from("<HHIQ", (VECTORS / name).read_bytes(), 8)
        assert (major, minor) == (1, 2)
        assert incompat == {"good.vmo": 0, "mem-good.vmo": 4, "mem-solid-good.vmo": 6}[name]
        assert describe(VECTORS / name)["format_version"] == "1.2"


def test_good_vector_matches_the_generators_app(gen, tmp_path, h):
    _, app_path = gen.build_images(tmp_path)
    digest = "sha256:" + hashlib.sha256(h.read_image(app_path)).hexdigest()
    assert digest == DOC["vectors"]["good.vmo"]["disk_sha256"]


def test_memory_vector_matches_the_generators_snapshot(gen, tmp_path):
    _, app_vmem = gen.build_memory(tmp_path)
    assert memory.read_vmem(app_vmem).digest == DOC["vectors"]["mem-good.vmo"]["memory"]["digest"]


# ------------------------------------------------------------------------------ SPEC.md's MUSTs

# MUSTs that no file can show (what writers do, what the engine does with a rebuilt snapshot):
# the tests that check them instead, by file and name.
TESTED_BY = {
    "M35": [("test_crypto.py", "test_two_encryptions_of_the_same_input_differ_and_agree"),
            ("test_crypto.py", "test_passphrase_overlays_get_fresh_salts")],
    "M37": [("test_memory.py", "test_resume_refuses_another_qemu_version")],
    "M38": [("test_format.py", "test_delta_frames_carry_their_content_size")],
    "M39": [("test_memory.py", "test_snapshot_that_does_not_fit_the_base_is_refused")],
}


def test_every_must_of_the_spec_has_a_vector_or_a_test():
    musts = set(MUST.findall(SPEC))
    assert len(musts) >= 30
    covered = {m for v in DOC["vectors"].values() for m in v["covers"]}
    assert covered <= musts, f"vectors cover MUSTs the spec lacks: {covered - musts}"
    for must, tests in TESTED_BY.items():
        assert must in musts
        for file, test in tests:
            assert f"def {test}(" in (ROOT / "tests" / file).read_text(), (must, file, test)
    assert musts - covered - set(TESTED_BY) == set()


def test_spec_numbers_each_must_once():
    """Each number is stated (in bold) exactly once, and they run 1, 2, ... without gaps."""
    defined = re.findall(r"\*\*\[(M\d+)\]\*\*", SPEC)
    assert len(defined) == len(set(defined)), "a MUST number is stated twice"
    assert set(MUST.findall(SPEC)) == set(defined), "a reference to a MUST never stated"
    assert sorted(int(m[1:]) for m in defined) == list(range(1, len(defined) + 1))


# ------------------------------------------------------------------------------ the generator

def test_regenerating_gives_identical_files(gen, tmp_path):
    doc = gen.generate(tmp_path)
    assert doc == DOC
    produced = sorted(p.name for p in tmp_path.iterdir())
    assert produced == sorted(NAMES + ["vectors.json", DOC["base"]["file"],
                                       DOC["base"]["memory"]["file"]])
    for name in produced:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), (
            f"{name} differs from a fresh run of make_vectors.py: the writer changed (or the "
            "zstd library did); if intended, regenerate the vectors and review the diff")


def test_generator_leaves_the_environment_alone(gen, tmp_path, vmsynth_home):
    gen.generate(tmp_path / "out")
    assert os.environ["VMSYNTH_HOME"] == str(vmsynth_home)
    assert list(vmsynth_home.iterdir()) == []  # scanned its base in a private cache


def test_vectors_folder_is_small():
    """Many small files, old ones kept forever: the folder stays a few hundred KiB."""
    files = [p for p in VECTORS.rglob("*") if p.is_file() and p.suffix != ".py"]
    assert sum(p.stat().st_size for p in files) < 320 * 1024
    for p in files:
        limit = 32 * 1024 if p.suffix == ".json" else 12 * 1024
        assert p.stat().st_size <= limit, p


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
    base = open_base(gen, vector_base, name)
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
