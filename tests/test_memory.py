"""Memory snapshots without a VM: the .vmem file, and overlays with a memory stream.

Snapshots here are assembled from synthetic RAM images with the same writer `vmsynth
snapshot` uses, so every page kind can be placed on purpose. tests/test_vm.py takes real
snapshots of a running guest and resumes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmsynth.formats import vmem as vmem_format
from vmsynth.formats.errors import CorruptError
from vmsynth.formats.layout import Stream

from vmsynth import bases, create, memory, snapshot
from vmsynth.apply import apply
from vmsynth.errors import BadInputError, DamagedSnapshotError, ExitCode, SnapshotError
from vmsynth.memory import MachineInfo, Vmem
from vmsynth.qcow2 import Qcow2Image

BLOCK = 4096
RAM = 512 * BLOCK  # 2 MiB of guest RAM
MACHINE = MachineInfo("pc-i440fx-7.2", "qemu64", RAM, "7.2.22", 1, False, True, (), "tcg")


def write_snapshot(h, path: Path, ram: bytes, state: bytes, machine: MachineInfo = MACHINE
                   ) -> Vmem:
    ram_file = path.with_suffix(".ram")
    ram_file.write_bytes(ram)
    try:
        return memory.write_vmem(path, ram_file, machine, state)
    finally:
        ram_file.unlink()


def contents(path: Path) -> bytes:
    vmem = memory.read_vmem(path)
    with open(path, "rb") as f:
        return f.read(vmem.size)


@dataclass
class MemoryPair:
    base_vmem: Path
    app_vmem: Path
    app_contents: bytes
    expected: dict[str, int]  # memory pages by record kind


def build_memory_pair(h, folder: Path, disk_data: bytes, new_disk_block: bytes) -> MemoryPair:
    """A base RAM image and an app's, with one page of every kind the differ tells apart.

    Most pages are zero, as in a freshly booted guest; the state streams differ in content
    and size, as they do between two snapshots.
    """
    base = bytearray(RAM)
    for i in range(200):
        base[i * BLOCK:(i + 1) * BLOCK] = h.text_block(f"ram-{i}")
    app = bytearray(base)
    expected = dict.fromkeys(("data", "delta", "zero", "base", "copy", "disk", "disk_copy"), 0)

    def put(page: int, data: bytes, kind: str) -> None:
        app[page * BLOCK:(page + 1) * BLOCK] = data
        expected[kind] += 1

    put(1, bytes(BLOCK), "zero")
    put(2, base[40 * BLOCK:41 * BLOCK], "base")
    put(3, disk_data[7 * BLOCK:8 * BLOCK], "disk")  # page cache holding a base disk block
    put(6, new_disk_block, "disk_copy")  # ... or a block the app wrote to its disk
    new = h.text_block("app-page")
    put(4, new, "data")
    put(300, new, "copy")
    edited = bytearray(base[5 * BLOCK:6 * BLOCK])
    edited[200:216] = b"edited-in-memory"
    put(5, bytes(edited), "delta")
    put(400, h.det_bytes("random page", BLOCK), "data")
    base_state, app_state = h.det_bytes("state-a", 5000), h.det_bytes("state-b", 7000)
    # The state region: 7000 new bytes = one full block and one partial one, both data.
    expected["data"] += 2
    base_vmem = folder / "base.vmem"
    app_vmem = folder / "app.vmem"
    write_snapshot(h, base_vmem, bytes(base), base_state)
    write_snapshot(h, app_vmem, bytes(app), app_state)
    return MemoryPair(base_vmem, app_vmem, bytes(app) + app_state, expected)


@pytest.fixture
def pair(h, small_pair, tmp_path) -> MemoryPair:
    new = small_pair.app_data[17 * BLOCK:18 * BLOCK]  # new data in the small pair's disk
    return build_memory_pair(h, tmp_path, small_pair.base_data, new)


@pytest.fixture
def cached(cli, small_pair, pair):
    """The small disk pair's base in the cache with its memory snapshot, as test@1."""
    r = cli("base", "add", small_pair.base_path, "--name", "test", "--version", "1",
            "--memory", pair.base_vmem)
    assert r.code == 0, r.err
    return "test@1"


def make(cli, small_pair, pair, out: Path, *extra) -> None:
    r = cli("create", "--base", "test@1", "--disk", small_pair.app_path, "--memory",
            pair.app_vmem, "-o", out, *extra)
    assert r.code == 0, r.err


# ---------------------------------------------------------------- the .vmem file

def test_vmem_keeps_ram_at_its_offsets_with_holes_and_a_digest(h, tmp_path):
    ram = bytes(BLOCK) * 100 + h.text_block("x") + bytes(RAM - 101 * BLOCK)
    vmem = write_snapshot(h, tmp_path / "s.vmem", ram, b"STATE")
    assert vmem.size == RAM + 5 and vmem.machine == MACHINE
    assert contents(vmem.path) == ram + b"STATE"
    assert vmem.digest == "sha256:" + hashlib.sha256(ram + b"STATE").hexdigest()
    assert os.stat(vmem.path).st_blocks * 512 < RAM // 4  # zero RAM is not stored
    assert oct(os.stat(vmem.path).st_mode & 0o777) == "0o600"  # RAM may hold secrets
    memory.check(vmem)


def test_vmem_that_is_something_else_is_bad_input(tmp_path, small_pair):
    with pytest.raises(BadInputError, match="not a vmsynth memory snapshot"):
        memory.read_vmem(small_pair.base_path)
    with pytest.raises(BadInputError, match="no such file"):
        memory.read_vmem(tmp_path / "missing.vmem")


def test_vmem_damage_is_found(h, tmp_path):
    vmem = write_snapshot(h, tmp_path / "s.vmem", h.text_block("r") * (RAM // BLOCK), b"S" * 99)
    data = bytearray(vmem.path.read_bytes())
    data[-TRAILER_OFFSET_FROM_END] ^= 1  # inside the JSON header
    (tmp_path / "header.vmem").write_bytes(data)
    with pytest.raises(DamagedSnapshotError, match="header digest"):
        memory.read_vmem(tmp_path / "header.vmem")
    data = bytearray(vmem.path.read_bytes())
    data[12345] ^= 1  # a RAM byte
    (tmp_path / "ram.vmem").write_bytes(data)
    with pytest.raises(DamagedSnapshotError, match="contents are damaged"):
        memory.check(memory.read_vmem(tmp_path / "ram.vmem"))
    (tmp_path / "short.vmem").write_bytes(vmem.path.read_bytes()[:-10])
    with pytest.raises(BadInputError):
        memory.read_vmem(tmp_path / "short.vmem")


TRAILER_OFFSET_FROM_END = vmem_format.TRAILER.size + 20


def test_machine_description_is_type_checked():
    good = MACHINE.to_json()
    assert MachineInfo.from_json(good, "x") == MACHINE
    for field, value in (("ram_size", "1G"), ("ram_size", 4097), ("cpus", 0), ("vga", 1),
                         ("machine", 7), ("extra_args", "-nic user"), ("cpu", None)):
        with pytest.raises(CorruptError):
            MachineInfo.from_json(good | {field: value}, "x")


def test_machine_entropy_is_optional_for_snapshots_from_before_it():
    """`entropy` (vmgenid and virtio-rng present) is absent from earlier headers: read as
    False; written only when True, so a description without it keeps its old bytes."""
    old = MACHINE.to_json()
    assert "entropy" not in old and MachineInfo.from_json(old, "x").entropy is False
    new = replace(MACHINE, entropy=True)
    assert new.to_json() == old | {"entropy": True}
    assert MachineInfo.from_json(new.to_json(), "x") == new
    for value in (1, "yes", None):
        with pytest.raises(CorruptError, match="invalid entropy"):
            MachineInfo.from_json(old | {"entropy": value}, "x")
    assert MACHINE.mismatch(new) is None, "a base's snapshot may predate it"


def test_machine_mismatch_names_what_differs():
    assert MACHINE.mismatch(replace(MACHINE, accel="kvm", extra_args=("-nic", "user"))) is None
    assert "ram size" in MACHINE.mismatch(replace(MACHINE, ram_size=2 * RAM))
    assert "machine" in MACHINE.mismatch(replace(MACHINE, machine="pc-q35-7.2"))
    assert "cpu" in MACHINE.mismatch(replace(MACHINE, cpu="host"))
    assert "qemu version" in MACHINE.mismatch(replace(MACHINE, qemu_version="8.2.0"))


# ---------------------------------------------------------------- overlays with memory

def test_memory_roundtrip_rebuilds_the_snapshot_exactly(cli, h, small_pair, pair, cached,
                                                        tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    info = cli("inspect", overlay, "--json").json()
    assert info["format_version"] == "1.2"
    assert info["memory"]["blocks"] == pair.expected
    assert info["memory"]["ram_size"] == RAM and info["memory"]["frames"] >= 1
    assert info["base"]["memory"]["digest"] == memory.read_vmem(pair.base_vmem).digest
    assert info["blocks"] == small_pair.expected_blocks  # the disk stream is unchanged

    r = cli("apply", overlay, "--base", cached, "-o", tmp_path / "synth.qcow2", "--json")
    assert r.code == 0, r.err
    out = r.json()
    rebuilt = tmp_path / "synth.vmem"  # the default: beside the disk
    assert out["memory"]["path"] == str(rebuilt)
    assert contents(rebuilt) == pair.app_contents
    vmem = memory.read_vmem(rebuilt)
    assert vmem.machine == MACHINE and vmem.digest == memory.read_vmem(pair.app_vmem).digest
    memory.check(vmem)
    assert h.read_image(tmp_path / "synth.qcow2") == small_pair.app_data
    assert oct(os.stat(rebuilt).st_mode & 0o777) == "0o600"


def test_memory_output_can_be_named_and_verify_checks_both_streams(cli, small_pair, pair,
                                                                   cached, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    r = cli("apply", overlay, "--base", cached, "-o", tmp_path / "d.qcow2",
            "--memory-output", tmp_path / "m.vmem")
    assert r.code == 0, r.err
    assert contents(tmp_path / "m.vmem") == pair.app_contents
    assert not (tmp_path / "d.vmem").exists()
    r = cli("verify", overlay, "--base", cached, "--json")
    assert r.code == 0, r.err


def test_memory_pages_come_from_base_memory_and_base_disk(h, small_pair, pair, tmp_path):
    """The library call: DISK records point into the base disk, BASE into base memory."""
    base = bases.load_path(small_pair.base_path, memory=pair.base_vmem)
    app_mem = memory.open_vmem(pair.app_vmem)
    disk = Qcow2Image(small_pair.app_path)
    try:
        out = io.BytesIO()
        report = create.create(base, disk, out, memory=app_mem)
        assert report.summary["memory_blocks"] == pair.expected
        parts = h.parse_parts(out.getvalue())
        streams = [f.stream for f in parts.frames]
        assert streams == sorted(streams) and streams[-1] == Stream.MEMORY
        out.seek(0)
        result = apply(out, base, tmp_path / "x.qcow2")
        assert result.memory is not None and contents(result.memory.path) == pair.app_contents
    finally:
        disk.close()
        app_mem.close()
        base.close()


def test_snapshot_that_does_not_fit_the_base_is_refused(cli, h, small_pair, pair, cached,
                                                        tmp_path):
    cases = {"ram size": replace(MACHINE, ram_size=RAM * 2),
             "machine": replace(MACHINE, machine="pc-q35-7.2"),
             "cpu": replace(MACHINE, cpu="Skylake-Client"),
             "qemu version": replace(MACHINE, qemu_version="8.2.2")}
    for what, machine in cases.items():
        other = tmp_path / f"{what.replace(' ', '-')}.vmem"
        write_snapshot(h, other, bytes(machine.ram_size), b"state", machine)
        out = tmp_path / "x.vmo"
        r = cli("create", "--base", cached, "--disk", small_pair.app_path, "--memory", other,
                "-o", out)
        assert r.code == ExitCode.SNAPSHOT, r.err
        assert r.err.startswith("error: ") and what in r.err and len(r.err.splitlines()) == 1
        assert not out.exists()


def test_memory_needs_a_base_with_memory(cli, small_pair, pair, cached, tmp_path):
    r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path,
            "--memory", pair.app_vmem, "-o", tmp_path / "x.vmo")
    assert r.code == ExitCode.BASE_MISMATCH and "no memory snapshot" in r.err
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    r = cli("apply", overlay, "--base", small_pair.base_path, "-o", tmp_path / "s.qcow2")
    assert r.code == ExitCode.BASE_MISMATCH and "has none" in r.err, r.err
    assert not (tmp_path / "s.qcow2").exists() and not (tmp_path / "s.vmem").exists()


def test_another_base_memory_is_a_mismatch(cli, h, small_pair, pair, cached, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    other = tmp_path / "other.vmem"
    write_snapshot(h, other, h.text_block("other") * (RAM // BLOCK), b"state")
    r = cli("base", "add", small_pair.base_path, "--name", "test", "--version", "2",
            "--memory", other)
    assert r.code == 0, r.err
    r = cli("apply", overlay, "--base", "test@2", "-o", tmp_path / "s.qcow2")
    assert r.code == ExitCode.BASE_MISMATCH and "memory snapshot" in r.err, r.err


def test_changed_base_memory_is_refused(cli, small_pair, pair, cached, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    with open(pair.base_vmem, "r+b") as f:  # a base file must never change
        f.seek(BLOCK)
        f.write(b"changed")
    r = cli("apply", overlay, "--base", cached, "-o", tmp_path / "s.qcow2")
    assert r.code == ExitCode.BASE_MISMATCH and "changed since it was added" in r.err


def test_damaged_base_memory_is_refused_when_added(cli, small_pair, pair, tmp_path):
    data = bytearray(pair.base_vmem.read_bytes())
    data[3 * BLOCK + 7] ^= 0x40
    bad = tmp_path / "bad.vmem"
    bad.write_bytes(data)
    r = cli("base", "add", small_pair.base_path, "--name", "t", "--version", "1",
            "--memory", bad)
    assert r.code == ExitCode.DAMAGED_SNAPSHOT and "damaged" in r.err


def test_corrupt_memory_frame_writes_nothing(cli, h, small_pair, pair, cached, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    parts = h.parse_parts(overlay.read_bytes())
    index = next(i for i, f in enumerate(parts.frames) if f.stream == Stream.MEMORY)
    frame = parts.frames[index]
    payload = bytearray(frame.payload)
    payload[len(payload) // 2] ^= 1
    bad = tmp_path / "bad.vmo"
    bad.write_bytes(h.compose(replace(parts, frames=[
        *parts.frames[:index], replace(frame, payload=bytes(payload)), *parts.frames[index + 1:]])))
    r = cli("apply", bad, "--base", cached, "-o", tmp_path / "s.qcow2")
    assert r.code == ExitCode.CORRUPT, r.err
    assert len(r.err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.vmem", "app.vmo", "bad.vmo",
                                                          "base.vmem"]


def test_apply_never_overwrites_the_base_memory(cli, small_pair, pair, cached, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    before = pair.base_vmem.read_bytes()
    r = cli("apply", overlay, "--base", cached, "-o", tmp_path / "s.qcow2", "--memory-output",
            pair.base_vmem)
    assert r.code == ExitCode.USAGE and "is the base's memory snapshot" in r.err
    assert pair.base_vmem.read_bytes() == before


def test_memory_stream_manifest_is_checked(h, small_pair, pair, cached, cli, tmp_path):
    overlay = tmp_path / "app.vmo"
    make(cli, small_pair, pair, overlay)
    data = overlay.read_bytes()
    manifest = json.loads(h.parse_parts(data).manifest)
    mem = next(s for s in manifest["streams"] if s["kind"] == "memory")
    for change in ({"machine": {"ram_size": "big"}}, {"id": 0}, {"virtual_size": 4096}):
        broken = json.loads(json.dumps(manifest))
        entry = next(s for s in broken["streams"] if s["kind"] == "memory")
        for k, v in change.items():
            entry[k] = (mem[k] | v) if isinstance(v, dict) else v
        bad = tmp_path / "bad.vmo"
        bad.write_bytes(h.reheader(data, manifest=broken))
        r = cli("verify", bad, "--base", cached)
        assert r.code == ExitCode.CORRUPT, (change, r.err)


def test_snapshot_of_a_socket_that_is_missing_or_not_vmsynth(cli, tmp_path):
    r = cli("snapshot", "--qmp", tmp_path / "nope.sock", "-o", tmp_path / "x.vmem")
    assert r.code == ExitCode.BAD_INPUT and "no such file" in r.err
    sock = tmp_path / "qmp.sock"
    sock.write_text("not a socket")
    r = cli("snapshot", "--qmp", sock, "-o", tmp_path / "x.vmem")
    assert r.code == ExitCode.SNAPSHOT and "not started by `vmsynth boot`" in r.err
    (tmp_path / snapshot.MACHINE_FILE).write_text(json.dumps({"ram_file": "/nonexistent"}))
    r = cli("snapshot", "--qmp", sock, "-o", tmp_path / "x.vmem")
    assert r.code == ExitCode.SNAPSHOT and "not an answering QEMU QMP socket" in r.err, r.err
    assert not (tmp_path / "x.vmem").exists()


def test_resume_refuses_another_qemu_version(h, tmp_path, monkeypatch):
    vmem = write_snapshot(h, tmp_path / "s.vmem", bytes(RAM), b"state")
    monkeypatch.setattr(snapshot, "qemu_version", lambda: "9.1.0")
    with pytest.raises(SnapshotError, match="QEMU 7.2.22, but this host has QEMU 9.1.0"):
        snapshot.check_resumable(vmem)


PAGES = 64
page_edits = st.lists(st.tuples(st.integers(0, PAGES - 1),
                                 st.sampled_from(["zero", "base", "disk", "disk-new", "same-as",
                                                  "edit", "random"]),
                                 st.integers(0, 1 << 16)), max_size=40)


@given(edits=page_edits, state=st.integers(0, 3 * BLOCK), base_state=st.integers(0, 3 * BLOCK),
       solid=st.booleans())
def test_any_page_edits_rebuild_exactly(h, small_pair, tmp_path_factory, edits, state,
                                        base_state, solid):
    """Property: whatever happened to which pages (and whatever the device-state sizes),
    apply rebuilds the app snapshot's contents exactly, from a solid overlay too."""
    d = tmp_path_factory.mktemp("pages")
    ram = PAGES * BLOCK
    machine = replace(MACHINE, ram_size=ram)
    base_ram = b"".join(h.text_block(f"p{i}") if i % 3 else bytes(BLOCK) for i in range(PAGES))
    app = bytearray(base_ram)
    disk = small_pair.base_data
    for page, kind, n in edits:
        at = slice(page * BLOCK, (page + 1) * BLOCK)
        if kind == "zero":
            app[at] = bytes(BLOCK)
        elif kind == "base":
            other = n % PAGES
            app[at] = base_ram[other * BLOCK:(other + 1) * BLOCK]
        elif kind == "disk":
            block = n % (len(disk) // BLOCK)
            app[at] = disk[block * BLOCK:(block + 1) * BLOCK]
        elif kind == "disk-new":  # a block of the app's disk, new or not
            block = n % (len(small_pair.app_data) // BLOCK)
            app[at] = small_pair.app_data[block * BLOCK:(block + 1) * BLOCK]
        elif kind == "same-as":
            other = n % PAGES
            app[at] = app[other * BLOCK:(other + 1) * BLOCK]
        elif kind == "edit":
            edited = bytearray(app[at])
            edited[n % BLOCK] ^= 0x5A
            app[at] = edited
        else:
            app[at] = h.det_bytes(n, BLOCK)
    base_vmem = write_snapshot(h, d / "base.vmem", base_ram, h.det_bytes("bs", base_state),
                               machine)
    app_vmem = write_snapshot(h, d / "app.vmem", bytes(app), h.det_bytes("as", state), machine)
    base = bases.load_path(small_pair.base_path, memory=base_vmem.path)
    image, disk_image = memory.open_vmem(app_vmem.path), Qcow2Image(small_pair.app_path)
    try:
        out = io.BytesIO()
        create.create(base, disk_image, out, memory=image, solid=solid)
        out.seek(0)
        result = apply(out, base, d / "synth.qcow2")
    finally:
        image.close()
        disk_image.close()
        base.close()
    assert result.memory is not None
    assert contents(result.memory.path) == bytes(app) + h.det_bytes("as", state)
    assert result.memory.digest == app_vmem.digest


def test_a_kvm_host_cpu_snapshot_is_not_resumed_under_tcg(h, small_pair, tmp_path):
    from vmsynth.accel import Accel
    from vmsynth.vm import BootOptions, Machine

    machine = replace(MACHINE, cpu="host", qemu_version=snapshot.qemu_version())
    vmem = write_snapshot(h, tmp_path / "kvm.vmem", bytes(RAM), b"state", machine)
    m = Machine(BootOptions(disk=small_pair.app_path, accel=Accel("tcg", "test"), resume=vmem))
    try:
        with pytest.raises(SnapshotError, match="under KVM"):
            m.start()
        assert m.proc is None  # refused before QEMU was started
    finally:
        m.stop(grace=0)
