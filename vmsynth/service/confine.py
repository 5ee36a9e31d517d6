"""Each session's VM in a cgroup of its own, holding it to the CPU and RAM it was given.

Both cgroup versions are handled. Groups are made below the cgroup the service itself runs
in (what systemd or a container delegated to it), named `vmsynth-<session>`:

- v1 (one hierarchy per controller): the cpu and memory hierarchies each get the group;
  the limits are cpu.cfs_quota_us / cpu.cfs_period_us and memory.limit_in_bytes.
- v2 (one unified hierarchy): a cgroup with processes may not also hold children with
  controllers, so the service first moves itself into a leaf `vmsynth-service`, enables
  cpu and memory for its children, and makes each session's group beside that leaf; the
  limits are cpu.max and memory.max.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

PERIOD_US = 100_000
QEMU_OVERHEAD = 256 << 20  # QEMU's own memory beyond the guest's RAM


class ConfineError(Exception):
    """Cgroups cannot be used here (not root, not delegated, not mounted)."""


def _own_path(root: Path, controller: str | None) -> Path:
    """This process's cgroup in `controller`'s hierarchy (None: the unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else []
        if (controller is None and not controllers) or controller in names:
            return Path(str(root / (controller or "")) + path.rstrip("/"))
    raise ConfineError(f"not in a cgroup{f' with the {controller} controller' * bool(controller)}")


class Group:
    """One session's cgroup (one directory per hierarchy)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def add(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def remove(self, wait: float = 5.0) -> None:
        """Remove the group once its processes are gone (they may take a moment to exit)."""
        deadline = time.monotonic() + wait
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)


class Cgroups:
    """Makes session groups in whichever cgroup version this host runs."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.v2 = (root / "cgroup.controllers").exists()
        if not self.v2 and not (root / "cpu").is_dir():
            raise ConfineError(f"no cgroup filesystem is mounted at {root}")
        try:
            if self.v2:
                own = _own_path(root, None)
                self.parents = [self._delegate_v2(own)]
            else:
                self.parents = [_own_path(root, c) for c in ("cpu", "memory")]
            for parent in self.parents:
                probe = parent / f"vmsynth-probe-{os.getpid()}"
                probe.mkdir(exist_ok=True)
                probe.rmdir()
        except OSError as err:
            raise ConfineError(f"cannot make cgroups: {err.strerror or err}") from err

    @staticmethod
    def _delegate_v2(own: Path) -> Path:
        """Move this process into a leaf so that its cgroup can hold session groups."""
        leaf = own / "vmsynth-service"
        if own.name != "vmsynth-service":
            leaf.mkdir(exist_ok=True)
            leaf.joinpath("cgroup.procs").write_text(str(os.getpid()))
        else:
            own = own.parent
        (own / "cgroup.subtree_control").write_text("+cpu +memory")
        return own

    def create(self, name: str, cpus: float, memory: int) -> Group:
        """A group named `vmsynth-NAME` holding its processes to `cpus` and `memory` + QEMU's."""
        dirs = [parent / f"vmsynth-{name}" for parent in self.parents]
        limit = memory + QEMU_OVERHEAD
        quota = max(1000, int(cpus * PERIOD_US))
        for d in dirs:
            d.mkdir(exist_ok=True)
        group = Group(dirs)
        try:
            if self.v2:
                (dirs[0] / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                (dirs[0] / "memory.max").write_text(str(limit))
            else:
                cpu, mem = dirs
                (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(quota))
                (mem / "memory.limit_in_bytes").write_text(str(limit))
        except OSError:
            group.remove(wait=0)
            raise
        return group

    def sweep(self, alive: set[str]) -> None:
        """Remove the empty session groups of sessions that no longer exist (a killed
        service's)."""
        for parent in self.parents:
            for d in parent.glob("vmsynth-*"):
                if d.name in ("vmsynth-service",) or d.name.removeprefix("vmsynth-") in alive:
                    continue
                with contextlib.suppress(OSError):
                    d.rmdir()
