"""Cgroups for the cloudlet's VMs (vmsynth/service/confine.py), both versions, on a cgroup
tree laid out as the kernel does in a scratch folder (this machine runs v1 only; the VM
tests in test_service.py use the real v1 hierarchy).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsynth.service.confine import PERIOD_US, QEMU_OVERHEAD, Cgroups, ConfineError


def own(controller: str | None) -> str:
    """This process's cgroup path in a hierarchy, as /proc/self/cgroup gives it."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller is None and not names) or controller in names.split(","):
            return path
    pytest.skip(f"this process is in no {controller or 'unified'} cgroup")


def v1_tree(root: Path) -> dict[str, Path]:
    dirs = {}
    for c in ("cpu", "memory"):
        d = root / c / own(c).lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        dirs[c] = d
    return dirs


def v2_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    d = root / own(None).lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.subtree_control").write_text("")
    return d


def test_v1_groups_hold_cpu_and_memory_and_take_the_pid(tmp_path):
    dirs = v1_tree(tmp_path)
    group = Cgroups(tmp_path).create("abc", cpus=1.5, memory=512 << 20)
    cpu, mem = dirs["cpu"] / "vmsynth-abc", dirs["memory"] / "vmsynth-abc"
    assert (cpu / "cpu.cfs_quota_us").read_text() == str(int(1.5 * PERIOD_US))
    assert (cpu / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
    assert (mem / "memory.limit_in_bytes").read_text() == str((512 << 20) + QEMU_OVERHEAD)
    group.add(4242)
    assert (cpu / "cgroup.procs").read_text() == "4242"
    assert (mem / "cgroup.procs").read_text() == "4242"


def test_v2_moves_the_service_into_a_leaf_and_enables_the_controllers(tmp_path):
    parent = v2_tree(tmp_path)
    cg = Cgroups(tmp_path)
    assert (parent / "vmsynth-service" / "cgroup.procs").read_text() == str(os.getpid())
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory"
    cg.create("xyz", cpus=2, memory=1 << 30)
    d = parent / "vmsynth-xyz"
    assert (d / "cpu.max").read_text() == f"{2 * PERIOD_US} {PERIOD_US}"
    assert (d / "memory.max").read_text() == str((1 << 30) + QEMU_OVERHEAD)


def test_sweep_removes_groups_of_sessions_that_are_gone(tmp_path):
    dirs = v1_tree(tmp_path)
    cg = Cgroups(tmp_path)
    for name in ("old", "live"):
        for d in dirs.values():
            (d / f"vmsynth-{name}").mkdir()
    cg.sweep(alive={"live"})
    for d in dirs.values():
        assert not (d / "vmsynth-old").exists() and (d / "vmsynth-live").exists()


def test_no_cgroup_filesystem_is_a_clear_refusal(tmp_path):
    with pytest.raises(ConfineError, match="no cgroup filesystem is mounted"):
        Cgroups(tmp_path)
