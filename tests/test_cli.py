"""The `vmsynth` command: every exit code, one-line errors, --json everywhere, no debris after
a failure, the base cache, and help texts with examples."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Result
from vmsynth.cli.app import EPILOG
from vmsynth.formats.layout import FRAME_HEAD_SIZE, HEADER, MAJOR

from vmsynth import bases
from vmsynth.errors import ExitCode

KiB, MiB = 1 << 10, 1 << 20


# ------------------------------------------------------------------------------ running

def assert_one_line_error(r: Result) -> None:
    assert "Traceback" not in r.err and "Traceback" not in r.out
    lines = r.err.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{r.err}"
    assert lines[0].startswith("error: "), lines[0]


# ------------------------------------------------------------------------------ inputs

@dataclass
class Ctx:
    tmp: Path
    base: Path  # standalone base
    app: Path  # qcow2 child of base
    flat: Path  # the same disk, independent
    overlay: Path  # app.vmo, several frames
    other_base: Path  # same size as base, different contents
    small: Path  # smaller than base
    text: Path  # not an image at all
    corrupt: Path  # one bit flipped in the last frame's payload
    truncated: Path
    v2: Path  # major version 2
    feature: Path  # unknown incompatible feature bit
    out: Path  # an empty folder for outputs

    def output(self, name: str = "synth.qcow2") -> Path:
        return self.out / name


@pytest.fixture(scope="session")
def shared_inputs(small_pair, h, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-inputs")
    other = bytearray(small_pair.base_data)
    other[10_000] ^= 0xFF
    other_base = h.write_image(d / "other-base.qcow2", bytes(other))
    small = h.write_image(d / "small.qcow2", small_pair.base_data[: 2 * 65536])
    text = d / "notes.txt"
    text.write_text("this is not a disk image\n" * 100)
    return other_base, small, text


def last_frame_payload_offset(h, data: bytes) -> int:
    parts = h.parse_parts(data)
    pos = HEADER.unpack_from(data)[3]
    for f in parts.frames[:-1]:
        pos += FRAME_HEAD_SIZE + f.stored_length
    return pos + FRAME_HEAD_SIZE + parts.frames[-1].stored_length // 2


@pytest.fixture
def ctx(small_pair, shared_inputs, h, tmp_path) -> Ctx:
    other_base, small, text = shared_inputs
    data = small_pair.multi
    files = tmp_path / "in"
    files.mkdir()
    (files / "app.vmo").write_bytes(data)
    (files / "corrupt.vmo").write_bytes(h.flip_bit(data, last_frame_payload_offset(h, data) * 8))
    (files / "truncated.vmo").write_bytes(data[: len(data) * 2 // 3])
    (files / "v2.vmo").write_bytes(h.reheader(data, major=MAJOR + 1))
    (files / "feature.vmo").write_bytes(h.reheader(data, incompat=1 << 40))
    out = tmp_path / "out"
    out.mkdir()
    return Ctx(tmp_path, small_pair.base_path, small_pair.app_path, small_pair.flat_path,
               files / "app.vmo", other_base, small, text, files / "corrupt.vmo",
               files / "truncated.vmo", files / "v2.vmo", files / "feature.vmo", out)


def damaged_qcow2(c: Ctx, how: str) -> Path:
    """A copy of the app (a qcow2 child) damaged in one way."""
    data = bytearray(c.app.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "cluster-bits":
        struct.pack_into(">I", data, 20, 40)
    elif how in ("dirty", "extended-l2"):  # qcow2 v3 incompatible-feature bits at byte 72
        (bits,) = struct.unpack_from(">Q", data, 72)
        struct.pack_into(">Q", data, 72, bits | (1 if how == "dirty" else 16))
    elif how == "encrypted":
        struct.pack_into(">I", data, 32, 1)  # crypt_method: AES
    else:  # the backing file name points nowhere
        offset, length = struct.unpack_from(">QI", data, 8)
        data[offset: offset + length] = b"x" * length
    path = c.tmp / "in" / f"{how}.qcow2"
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------------------ failure table

@dataclass
class Case:
    id: str
    cmd: list[str]  # the command words (--json goes right after them)
    args: Callable[[Ctx], list[object]]
    code: int


CASES = [
    # 2: usage (click)
    Case("usage-unknown-option", ["verify"], lambda c: ["--bogus", c.overlay], 2),
    Case("usage-missing-option", ["create"], lambda c: ["--base", c.base], 2),
    Case("usage-bad-size", ["verify"], lambda c: [c.overlay, "--max-size", "lots"], 2),
    Case("usage-rm-without-version", ["base", "rm"], lambda c: ["justaname"], 2),
    Case("usage-unknown-command", ["frobnicate"], lambda c: [], 2),
    # 10: base mismatch / base not found
    Case("mismatch-verify", ["verify"], lambda c: [c.overlay, "--base", c.other_base], 10),
    Case("mismatch-apply", ["apply"],
         lambda c: [c.overlay, "--base", c.other_base, "-o", c.output()], 10),
    # 11: over budget
    Case("budget-verify", ["verify"], lambda c: [c.overlay, "--max-size", "100"], 11),
    Case("budget-create", ["create"],
         lambda c: ["--base", c.base, "--disk", c.app, "-o", c.output("a.vmo"), "--max-size",
                    "100"], 11),
    # 12: unsupported
    Case("version-verify", ["verify"], lambda c: [c.v2], 12),
    Case("version-apply", ["apply"], lambda c: [c.v2, "--base", c.base, "-o", c.output()], 12),
    Case("version-inspect", ["inspect"], lambda c: [c.v2], 12),
    Case("feature-verify", ["verify"], lambda c: [c.feature], 12),
    # 13: corrupt, truncated
    Case("corrupt-verify", ["verify"], lambda c: [c.corrupt], 13),
    Case("corrupt-verify-with-base", ["verify"], lambda c: [c.corrupt, "--base", c.base], 13),
    Case("corrupt-apply", ["apply"],
         lambda c: [c.corrupt, "--base", c.base, "-o", c.output()], 13),
    Case("truncated-verify", ["verify"], lambda c: [c.truncated], 13),
    Case("truncated-apply", ["apply"],
         lambda c: [c.truncated, "--base", c.base, "-o", c.output()], 13),
    Case("truncated-inspect", ["inspect"], lambda c: [c.truncated], 13),
    Case("not-an-overlay-inspect", ["inspect"], lambda c: [c.text], 13),
    Case("not-an-overlay-verify", ["verify"], lambda c: [c.base], 13),
    # 16: bad input
    Case("missing-overlay-verify", ["verify"], lambda c: [c.tmp / "nope.vmo"], 16),
    Case("missing-overlay-apply", ["apply"],
         lambda c: [c.tmp / "nope.vmo", "--base", c.base, "-o", c.output()], 16),
    Case("missing-overlay-inspect", ["inspect"], lambda c: [c.tmp / "nope.vmo"], 16),
    Case("missing-disk", ["create"],
         lambda c: ["--base", c.base, "--disk", c.tmp / "nope.qcow2", "-o", c.output("a.vmo")],
         16),
    Case("missing-base-path", ["verify"],
         lambda c: [c.overlay, "--base", c.tmp / "nope.qcow2"], 16),
    Case("disk-not-qcow2", ["create"],
         lambda c: ["--base", c.base, "--disk", c.text, "-o", c.output("a.vmo")], 16),
    Case("base-not-qcow2", ["create"],
         lambda c: ["--base", c.text, "--disk", c.app, "-o", c.output("a.vmo")], 16),
    Case("base-is-a-child", ["create"],
         lambda c: ["--base", c.app, "--disk", c.flat, "-o", c.output("a.vmo")], 16),
    Case("disk-smaller-than-base", ["create"],
         lambda c: ["--base", c.base, "--disk", c.small, "-o", c.output("a.vmo")], 16),
    Case("disk-truncated-qcow2", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "truncated"), "-o",
                    c.output("a.vmo")], 16),
    Case("disk-bad-cluster-size", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "cluster-bits"), "-o",
                    c.output("a.vmo")], 16),
    Case("disk-backing-file-missing", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "no-backing"), "-o",
                    c.output("a.vmo")], 16),
    Case("disk-in-use", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "dirty"), "-o",
                    c.output("a.vmo")], 16),
    Case("disk-encrypted", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "encrypted"), "-o",
                    c.output("a.vmo")], 12),
    Case("disk-subclusters", ["create"],
         lambda c: ["--base", c.base, "--disk", damaged_qcow2(c, "extended-l2"), "-o",
                    c.output("a.vmo")], 12),
    Case("base-add-not-qcow2", ["base", "add"],
         lambda c: [c.text, "--name", "x", "--version", "1"], 16),
    Case("base-add-a-child", ["base", "add"],
         lambda c: [c.app, "--name", "x", "--version", "1"], 16),
]
IDS = [c.id for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exit_code(cli, ctx, case):
    r = cli(*case.cmd, *case.args(ctx))
    assert r.code == case.code, r.err


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_error_is_one_line_without_traceback(cli, ctx, case):
    r = cli(*case.cmd, *case.args(ctx))
    assert r.code != 0
    assert_one_line_error(r)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_json_on_failure(cli, ctx, case):
    r = cli(*case.cmd, "--json", *case.args(ctx))
    assert r.code != 0
    doc = json.loads(r.out)
    assert doc["ok"] is False
    assert doc["error"]["exit_code"] == r.code
    assert doc["error"]["message"]


@pytest.mark.parametrize("case", [c for c in CASES if c.cmd in (["apply"], ["create"])],
                         ids=[c.id for c in CASES if c.cmd in (["apply"], ["create"])])
def test_failed_command_leaves_no_files(cli, ctx, case):
    cli(*case.cmd, *case.args(ctx))
    assert list(ctx.out.iterdir()) == []


def test_unknown_base_name_is_base_not_found(cli, ctx):
    """errors.py documents BASE_MISMATCH (10) as 'overlay made for another base, or base not
    found'; an unknown NAME@VERSION is a base not found."""
    for argv in (["verify", ctx.overlay, "--base", "nosuch@1"],
                 ["apply", ctx.overlay, "--base", "nosuch@1", "-o", ctx.output()],
                 ["create", "--base", "nosuch@1", "--disk", ctx.app, "-o", ctx.output("a.vmo")],
                 ["base", "rm", "nosuch@1"]):
        r = cli(*argv)
        assert r.code == ExitCode.BASE_MISMATCH, (argv, r.err)
        assert_one_line_error(r)
    assert list(ctx.out.iterdir()) == []


def test_cached_base_whose_image_is_gone_is_bad_input(cli, ctx, tmp_path):
    copy = tmp_path / "base-copy.qcow2"
    shutil.copyfile(ctx.base, copy)
    assert cli("base", "add", copy, "--name", "gone", "--version", "1").code == 0
    copy.unlink()
    r = cli("verify", ctx.overlay, "--base", "gone@1")
    assert r.code == ExitCode.BAD_INPUT
    assert_one_line_error(r)


def test_cached_base_that_changed_is_refused(cli, ctx, tmp_path, h):
    copy = tmp_path / "base-copy.qcow2"
    shutil.copyfile(ctx.base, copy)
    assert cli("base", "add", copy, "--name", "moving", "--version", "1").code == 0
    changed = bytearray(h.read_image(copy))
    changed[0] ^= 1
    h.write_image(copy, bytes(changed))
    r = cli("verify", ctx.overlay, "--base", "moving@1")
    assert r.code == ExitCode.BASE_MISMATCH
    assert_one_line_error(r)


@pytest.mark.parametrize("name,version", [("bad name", "1"), ("ok", "1/2"), ("../x", "1"),
                                          ("", "1")])
def test_invalid_base_name_is_a_user_error_not_an_internal_one(cli, ctx, name, version):
    """Exit 1 means 'unexpected: a bug' (errors.py); a bad name is the user's input."""
    r = cli("base", "add", ctx.base, "--name", name, "--version", version)
    assert r.code in (ExitCode.USAGE, ExitCode.BAD_INPUT), r.err
    assert_one_line_error(r)
    assert bases.entries() == []


def test_invalid_base_spec_is_a_user_error(cli, ctx):
    r = cli("verify", ctx.overlay, "--base", "no such@1")
    assert r.code in (ExitCode.USAGE, ExitCode.BAD_INPUT, ExitCode.BASE_MISMATCH), r.err
    assert_one_line_error(r)


# ------------------------------------------------------------------------------ 14, 17, 1, 130

def test_flatten_without_qemu_img_is_a_tool_error(cli, ctx, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = cli("apply", ctx.overlay, "--base", ctx.base, "-o", ctx.output(), "--flatten")
    assert r.code == ExitCode.TOOL
    assert_one_line_error(r)
    assert "qemu-img" in r.err
    assert list(ctx.out.iterdir()) == []  # neither the output nor the temporary child


def test_flatten_without_qemu_img_subprocess(ctx, h, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = os.environ | {"PATH": str(empty)}
    p = h.run(h.VMSYNTH, "apply", ctx.overlay, "--base", ctx.base, "-o", ctx.output(),
              "--flatten", check=False, env=env)
    assert p.returncode == ExitCode.TOOL
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert list(ctx.out.iterdir()) == []


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture(scope="session")
def big_inputs(h, tmp_path_factory):
    """A base, and independent disks holding 3 MiB and 1.5 MiB of incompressible data."""
    d = tmp_path_factory.mktemp("big-inputs")
    base = h.write_image(d / "base.qcow2", h.det_bytes("big-base", 256 * KiB))
    app3 = h.write_image(d / "app3.qcow2", h.det_bytes("app3", 3 * MiB))
    app15 = h.write_image(d / "app15.qcow2", h.det_bytes("app15", 3 * MiB // 2))
    return base, app3, app15


def test_create_on_a_full_disk(cli, big_inputs, tmp_path):
    base, app3, _ = big_inputs
    with tmpfs(tmp_path / "full", "1m") as full:
        r = cli("create", "--base", base, "--disk", app3, "-o", full / "app.vmo")
        leftovers = list(full.iterdir())
    assert r.code == ExitCode.WRITE_FAILED, r.err
    assert_one_line_error(r)
    assert leftovers == []


def test_apply_on_a_full_disk(cli, big_inputs, tmp_path):
    base, app3, _ = big_inputs
    overlay = tmp_path / "app.vmo"
    assert cli("create", "--base", base, "--disk", app3, "-o", overlay).code == 0
    with tmpfs(tmp_path / "full", "1m") as full:
        r = cli("apply", overlay, "--base", base, "-o", full / "synth.qcow2")
        leftovers = list(full.iterdir())
    assert r.code == ExitCode.WRITE_FAILED, r.err
    assert_one_line_error(r)
    assert leftovers == []


@pytest.mark.qemu_img
def test_apply_flatten_on_a_full_disk_is_a_write_error(cli, big_inputs, tmp_path, h):
    """The child fits in 3 MiB, the child plus its flattened copy do not: the disk is full
    while qemu-img writes. That is 'could not write the output' (17), not a tool failure."""
    if not h.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    base, _, app15 = big_inputs
    overlay = tmp_path / "app.vmo"
    assert cli("create", "--base", base, "--disk", app15, "-o", overlay).code == 0
    with tmpfs(tmp_path / "full", "3m") as full:
        r = cli("apply", overlay, "--base", base, "-o", full / "synth.qcow2", "--flatten")
        leftovers = list(full.iterdir())
    assert r.code == ExitCode.WRITE_FAILED, r.err
    assert_one_line_error(r)
    assert leftovers == []


def test_internal_error_is_exit_1_without_traceback(cli, ctx, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("vmsynth.cli.verify.verify", boom)
    r = cli("verify", ctx.overlay)
    assert r.code == ExitCode.ERROR
    assert_one_line_error(r)
    assert "simulated bug" in r.err
    r = cli("--debug", "verify", ctx.overlay)
    assert r.code == ExitCode.ERROR and "Traceback" in r.err  # asked for


def test_interrupt_is_exit_130(cli, ctx, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vmsynth.cli.apply.apply", interrupted)
    r = cli("apply", ctx.overlay, "--base", ctx.base, "-o", ctx.output())
    assert r.code == ExitCode.INTERRUPTED
    assert_one_line_error(r)
    assert list(ctx.out.iterdir()) == []


# ------------------------------------------------------------------------------ success, JSON

def test_json_for_every_successful_command(cli, ctx, small_pair):
    r = cli("base", "add", ctx.base, "--name", "demo", "--version", "1.0", "--json")
    assert r.code == 0
    added = r.json()
    assert (added["name"], added["version"]) == ("demo", "1.0")
    assert added["virtual_size"] == len(small_pair.base_data)

    r = cli("base", "list", "--json")
    assert r.code == 0
    assert [(e["name"], e["version"], e["digest"]) for e in r.json()] == [
        ("demo", "1.0", added["digest"])]

    vmo = ctx.output("new.vmo")
    r = cli("create", "--base", "demo@1.0", "--disk", ctx.app, "-o", vmo, "--json")
    assert r.code == 0, r.err
    created = r.json()
    assert created["overlay_bytes"] == vmo.stat().st_size
    assert created["fast_path"] is True
    assert created["summary"]["blocks"] == small_pair.expected_blocks

    r = cli("verify", vmo, "--base", "demo@1.0", "--max-size", "1M", "--json")
    assert r.code == 0
    verified = r.json()
    assert verified["ok"] is True
    assert verified["result_digest"] == created["summary"]["result_digest"]
    assert verified["overlay_bytes"] == vmo.stat().st_size

    r = cli("inspect", vmo, "--json")
    assert r.code == 0
    info = r.json()
    assert info["sizes"]["overlay"] == vmo.stat().st_size
    assert info["base"]["name"] == "demo" and info["base"]["version"] == "1.0"
    assert info["blocks"] == small_pair.expected_blocks

    synth = ctx.output("synth.qcow2")
    r = cli("apply", vmo, "--base", "demo@1.0", "-o", synth, "--json")
    assert r.code == 0
    applied = r.json()
    assert applied["output"] == str(synth)
    assert applied["replay"]["result_digest"] == created["summary"]["result_digest"]

    r = cli("base", "rm", "demo@1.0", "--json")
    assert r.code == 0
    assert r.json() == {"removed": "demo@1.0"}
    assert cli("base", "list", "--json").json() == []


def test_human_output_of_every_command(cli, ctx):
    """Without --json, success goes to the terminal as text (stdout holds no JSON)."""
    vmo = ctx.output("a.vmo")
    for argv in (["create", "--base", ctx.base, "--disk", ctx.app, "-o", vmo],
                 ["verify", vmo], ["inspect", vmo],
                 ["apply", vmo, "--base", ctx.base, "-o", ctx.output()],
                 ["base", "add", ctx.base, "--name", "n", "--version", "1"],
                 ["base", "list"], ["base", "rm", "n@1"]):
        r = cli(*argv)
        assert r.code == 0, (argv, r.err)
        assert not r.out.lstrip().startswith("{")
        assert "error" not in r.err.lower()


def test_apply_failure_keeps_an_existing_output_untouched(cli, ctx):
    existing = ctx.output()
    existing.write_bytes(b"previous contents")
    for bad in (ctx.corrupt, ctx.truncated, ctx.v2):
        r = cli("apply", bad, "--base", ctx.base, "-o", existing)
        assert r.code != 0
        assert existing.read_bytes() == b"previous contents"
    assert [p.name for p in ctx.out.iterdir()] == [existing.name]


def test_apply_failure_at_the_final_digest_leaves_nothing(cli, ctx, h):
    """The summary's result digest is only checked after every frame is written."""
    parts = h.parse_parts(ctx.overlay.read_bytes())
    summary = json.loads(parts.summary)
    summary["result_digest"] = "sha256:" + "0" * 64
    parts.summary = json.dumps(summary).encode()
    bad = ctx.tmp / "in" / "wrong-result.vmo"
    bad.write_bytes(h.compose(parts))
    assert cli("verify", bad).code == 0  # structure and frame digests are fine
    r = cli("apply", bad, "--base", ctx.base, "-o", ctx.output())
    assert r.code == ExitCode.CORRUPT
    assert list(ctx.out.iterdir()) == []


def test_apply_refuses_to_overwrite_its_base(cli, ctx, tmp_path, h):
    """`-o` naming the base would replace the base by a child that backs onto itself."""
    base = tmp_path / "mybase.qcow2"
    shutil.copyfile(ctx.base, base)
    before = h.file_sha256(base)
    for spelling in (base, tmp_path / "in" / ".." / base.name):
        r = cli("apply", ctx.overlay, "--base", base, "-o", spelling)
        assert r.code in (ExitCode.USAGE, ExitCode.BAD_INPUT), r.err
        assert_one_line_error(r)
        assert h.file_sha256(base) == before


@pytest.mark.parametrize("target", ["base", "disk"])
def test_create_refuses_to_overwrite_its_inputs(cli, ctx, tmp_path, h, target):
    base, disk = tmp_path / "b.qcow2", tmp_path / "d.qcow2"
    shutil.copyfile(ctx.base, base)
    shutil.copyfile(ctx.flat, disk)
    victim = base if target == "base" else disk
    before = h.file_sha256(victim)
    r = cli("create", "--base", base, "--disk", disk, "-o", victim)
    assert r.code in (ExitCode.USAGE, ExitCode.BAD_INPUT), r.err
    assert_one_line_error(r)
    assert h.file_sha256(victim) == before


def test_create_to_stdout_over_budget_writes_nothing(ctx, h):
    """--max-size promises to 'fail instead of writing an overlay larger than this'."""
    p = subprocess.run([str(h.VMSYNTH), "create", "--base", str(ctx.base), "--disk", str(ctx.app),
                        "-o", "-", "--max-size", "100"], capture_output=True, check=False)
    assert p.returncode == ExitCode.OVER_BUDGET
    assert p.stdout == b""


def test_create_over_budget_writes_nothing(cli, ctx):
    r = cli("create", "--base", ctx.base, "--disk", ctx.app, "-o", ctx.output("a.vmo"),
            "--max-size", "10")
    assert r.code == ExitCode.OVER_BUDGET
    assert list(ctx.out.iterdir()) == []
    r = cli("create", "--base", ctx.base, "--disk", ctx.app, "-o", ctx.output("a.vmo"),
            "--max-size", "1M")
    assert r.code == 0 and ctx.output("a.vmo").exists()


def test_budget_boundary(cli, ctx):
    size = ctx.overlay.stat().st_size
    assert cli("verify", ctx.overlay, "--max-size", str(size)).code == 0
    assert cli("verify", ctx.overlay, "--max-size", str(size - 1)).code == ExitCode.OVER_BUDGET


# ------------------------------------------------------------------------------ base cache

def test_base_add_list_rm_round_trip(cli, ctx, vmsynth_home, small_pair, h):
    assert cli("base", "list", "--json").json() == []
    assert cli("base", "add", ctx.base, "--name", "ubuntu-22.04", "--version", "2.3.1").code == 0
    listed = cli("base", "list", "--json").json()
    assert len(listed) == 1
    entry = listed[0]
    assert entry["path"] == str(ctx.base.resolve())
    assert entry["digest"] == h.sha256(small_pair.base_data)
    assert entry["virtual_size"] == len(small_pair.base_data)
    assert str(vmsynth_home) in str(list(vmsynth_home.rglob("*.json")))

    vmo = ctx.output("a.vmo")
    assert cli("create", "--base", "ubuntu-22.04@2.3.1", "--disk", ctx.app, "-o", vmo).code == 0
    info = cli("inspect", vmo, "--json").json()
    assert (info["base"]["name"], info["base"]["version"]) == ("ubuntu-22.04", "2.3.1")
    synth = ctx.output()
    assert cli("apply", vmo, "--base", "ubuntu-22.04@2.3.1", "-o", synth).code == 0
    assert h.read_image(synth) == small_pair.app_data

    assert cli("base", "rm", "ubuntu-22.04@2.3.1").code == 0
    assert cli("base", "list", "--json").json() == []
    assert ctx.base.exists()  # rm forgets the base; the image stays
    r = cli("apply", vmo, "--base", "ubuntu-22.04@2.3.1", "-o", ctx.output("again.qcow2"))
    assert r.code == ExitCode.BASE_MISMATCH
    assert cli("base", "rm", "ubuntu-22.04@2.3.1").code == ExitCode.BASE_MISMATCH


def test_versions_are_bound_by_contents(cli, ctx, tmp_path, small_pair, h):
    vmo = ctx.output("a.vmo")
    assert cli("base", "add", ctx.base, "--name", "img", "--version", "1").code == 0
    assert cli("create", "--base", "img@1", "--disk", ctx.app, "-o", vmo).code == 0

    assert cli("base", "add", ctx.other_base, "--name", "img", "--version", "2").code == 0
    r = cli("apply", vmo, "--base", "img@2", "-o", ctx.output("on2.qcow2"))
    assert r.code == ExitCode.BASE_MISMATCH
    assert_one_line_error(r)
    assert "img@1" in r.err  # says which base the overlay wants
    assert cli("verify", vmo, "--base", "img@2").code == ExitCode.BASE_MISMATCH

    same = tmp_path / "same-contents.qcow2"
    shutil.copyfile(ctx.base, same)
    assert cli("base", "add", same, "--name", "img", "--version", "3").code == 0
    assert cli("verify", vmo, "--base", "img@3").code == 0
    out = ctx.output("on3.qcow2")
    assert cli("apply", vmo, "--base", "img@3", "-o", out).code == 0
    assert h.read_image(out) == small_pair.app_data


def test_base_add_twice_replaces_the_entry(cli, ctx):
    assert cli("base", "add", ctx.base, "--name", "twice", "--version", "1").code == 0
    assert cli("base", "add", ctx.other_base, "--name", "twice", "--version", "1").code == 0
    listed = cli("base", "list", "--json").json()
    assert [e["path"] for e in listed] == [str(ctx.other_base.resolve())]


# ------------------------------------------------------------------------------ help

COMMANDS = [[], ["create"], ["apply"], ["verify"], ["inspect"], ["base"], ["base", "add"],
            ["base", "list"], ["base", "rm"], ["push"], ["pull"], ["base", "push"],
            ["base", "pull"], ["base", "sync"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "vmsynth")
def test_help_shows_an_example(cli, cmd):
    r = cli(*cmd, "--help")
    assert r.code == 0
    assert "Example" in r.out, r.out
    examples = r.out[r.out.index("Example"):]
    prefix = " ".join(["vmsynth", *cmd])
    assert any(line.strip().startswith(prefix) for line in examples.splitlines()), (
        f"no example line starting with {prefix!r}")


def exit_code_table(text: str) -> dict[int, str]:
    section = " ".join(text[text.index("Exit codes:") + len("Exit codes:"):].split())
    return {int(n): desc.strip() for n, desc in re.findall(r"(\d+) ([^,.]+)", section)}


def test_epilog_lists_every_exit_code():
    table = exit_code_table(EPILOG)
    assert set(table) == {int(m) for m in ExitCode}, table
    for member in ExitCode:
        words = set(member.name.lower().split("_"))
        assert words & set(table[member.value].lower().split()), (
            f"exit {member.value} is described as {table[member.value]!r}, "
            f"expected it to mention {member.name}")


def test_readme_exit_code_table_matches_the_enum(repo):
    """errors.py: 'README.md tables them; tests/test_cli.py checks the table'."""
    text = (repo / "README.md").read_text()
    section = text[text.index("## Exit codes"):]
    section = section[: section.find("\n## ", 4) if "\n## " in section[4:] else len(section)]
    rows = dict(re.findall(r"^\|\s*(\d+)\s*\|\s*(.+?)\s*\|\s*$", section, re.MULTILINE))
    assert {int(code) for code in rows} == {int(m) for m in ExitCode}, rows


def test_command_epilogs_use_real_exit_codes(cli):
    for cmd in COMMANDS:
        r = cli(*cmd, "--help")
        if "Exit codes:" in r.out:
            assert set(exit_code_table(r.out)) <= {int(m) for m in ExitCode}, cmd


def test_version(cli):
    import vmsynth

    r = cli("--version")
    assert r.code == 0 and vmsynth.__version__ in r.out


# ------------------------------------------------------------------------------ processes

def test_pipe_create_to_apply(ctx, h, small_pair):
    """create -o - | apply - : the overlay never touches the disk."""
    env = os.environ.copy()
    create = subprocess.Popen([str(h.VMSYNTH), "create", "--base", str(ctx.base), "--disk",
                               str(ctx.app), "-o", "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
    synth = ctx.output()
    apply = subprocess.run([str(h.VMSYNTH), "apply", "-", "--base", str(ctx.base), "-o",
                            str(synth)], stdin=create.stdout, capture_output=True, env=env,
                           check=False)
    assert create.stdout is not None
    create.stdout.close()
    assert create.wait() == 0, create.stderr.read() if create.stderr else ""
    assert apply.returncode == 0, apply.stderr
    assert h.read_image(synth) == small_pair.app_data


def test_verify_from_stdin(ctx, h):
    with open(ctx.overlay, "rb") as f:
        p = subprocess.run([str(h.VMSYNTH), "verify", "-", "--json"], stdin=f,
                           capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["overlay_bytes"] == ctx.overlay.stat().st_size
    with open(ctx.truncated, "rb") as f:
        p = subprocess.run([str(h.VMSYNTH), "verify", "-"], stdin=f, capture_output=True,
                           text=True, check=False)
    assert p.returncode == ExitCode.CORRUPT
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


@pytest.mark.parametrize("which", ["corrupt", "v2", "missing"])
def test_installed_command_errors(ctx, h, which):
    path = {"corrupt": ctx.corrupt, "v2": ctx.v2, "missing": ctx.tmp / "nope.vmo"}[which]
    want = {"corrupt": ExitCode.CORRUPT, "v2": ExitCode.UNSUPPORTED,
            "missing": ExitCode.BAD_INPUT}[which]
    p = h.run(h.VMSYNTH, "verify", path, "--json", check=False)
    assert p.returncode == want
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert json.loads(p.stdout)["error"]["exit_code"] == want


def test_a_signal_during_the_session_scrub_waits_for_it(cli, small_pair, tmp_path,
                                                        vmsynth_home, monkeypatch):
    """SIGTERM while `run` scrubs its session: the scrub finishes, then the signal ends the
    command (exit 130); no file of the user's session is left."""
    import signal as signals

    from vmsynth import session

    scrubbed: list[str] = []
    real_scrub = session.scrub_file

    def scrub_and_get_signalled(path):
        if not scrubbed:
            os.kill(os.getpid(), signals.SIGTERM)  # arrives mid-scrub
        real_scrub(path)
        scrubbed.append(path.name)

    monkeypatch.setattr(session, "scrub_file", scrub_and_get_signalled)
    overlay = tmp_path / "app.vmo"
    overlay.write_bytes(small_pair.multi)
    r = cli("run", overlay, "--base", small_pair.base_path, "--kernel", tmp_path / "no-kernel",
            "--vnc", "none", "--accel", "tcg")
    assert r.code == 143, r.err  # 128 + SIGTERM
    assert "disk.qcow2" in scrubbed
    assert list((vmsynth_home / "sessions").iterdir()) == []


def test_a_dead_processs_session_is_scrubbed_by_the_next_run(h, vmsynth_home):
    """A vmsynth killed with -9 cannot scrub its session; the next one does."""
    from vmsynth import session

    dead = h.dead_pid()
    stale = vmsynth_home / "sessions" / f"{dead}-0123456789ab"
    stale.mkdir(parents=True)
    (stale / "disk.qcow2").write_bytes(b"user data" * 1000)
    live = vmsynth_home / "sessions" / f"{os.getpid()}-ba9876543210"
    live.mkdir()
    sess = session.new()
    try:
        assert not stale.exists()
        assert live.is_dir(), "a live process's session is not touched"
        assert sess.id.startswith(f"{os.getpid()}-")
    finally:
        session.destroy(sess)
        session.destroy(session.Session(live.name, live))
