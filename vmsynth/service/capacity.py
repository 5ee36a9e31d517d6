"""Admission control: how many sessions this cloudlet can run at once, and whether one more
fits.

A session needs vCPUs, RAM (the guest's, plus what synthesis and QEMU themselves take) and
disk (the rebuilt disk and memory image). What the host has is measured once, at start;
slots are the minimum over the three resources for a session of the default size, capped by
`--slots`. A session asking for more than the default counts for more. Admission is one
synchronous step on the event loop, so N+1 simultaneous requests for N slots give exactly
N sessions.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SESSION_OVERHEAD = 384 << 20  # apply peaks under 300 MB (bench), QEMU itself ~60 MB
HOST_RESERVE = 512 << 20  # RAM the host keeps for itself and the service
DISK_PER_OVERLAY_BYTE = 10  # a rebuilt disk's new data: overlays compress about 3-5x
CPU_OVERCOMMIT = 2.0  # vCPUs per host core: guests mostly wait (on their user, on I/O)


@dataclass(frozen=True)
class Need:
    cpus: float
    memory: int
    disk: int

    def __add__(self, other: Need) -> Need:
        return Need(self.cpus + other.cpus, self.memory + other.memory, self.disk + other.disk)

    def __sub__(self, other: Need) -> Need:
        return Need(self.cpus - other.cpus, self.memory - other.memory, self.disk - other.disk)

    def fits_in(self, room: Need) -> bool:
        return self.cpus <= room.cpus and self.memory <= room.memory and self.disk <= room.disk

    def times_in(self, room: Need) -> int:
        """How many of this fit in `room`."""
        return max(0, min(math.floor(room.cpus / self.cpus) if self.cpus else 1 << 30,
                          room.memory // self.memory if self.memory else 1 << 30,
                          room.disk // self.disk if self.disk else 1 << 30))


def session_need(ram: int, cpus: int, overlay_size: int) -> Need:
    """What one session takes: its guest, synthesis and QEMU, its rebuilt files."""
    return Need(cpus, ram + SESSION_OVERHEAD, overlay_size * DISK_PER_OVERLAY_BYTE + ram)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class Capacity:
    """What the host can give to sessions, and what running sessions hold of it."""

    def __init__(self, total: Need, default: Need, cap: int | None = None) -> None:
        self.total, self.default = total, default
        self.slots = default.times_in(total) if cap is None else min(cap, default.times_in(total))
        self.used = Need(0, 0, 0)
        self.sessions = 0

    @classmethod
    def measure(cls, folder: Path, default: Need, cap: int | None = None) -> Capacity:
        total = Need((os.cpu_count() or 1) * CPU_OVERCOMMIT,
                     max(0, _available_memory() - HOST_RESERVE),
                     shutil.disk_usage(folder).free)
        return cls(total, default, cap)

    def admit(self, need: Need) -> bool:
        """Reserve `need` for a new session, if a slot and the resources are free."""
        if self.sessions >= self.slots or not (self.used + need).fits_in(self.total):
            return False
        self.used += need
        self.sessions += 1
        return True

    def release(self, need: Need) -> None:
        self.used -= need
        self.sessions -= 1

    @property
    def free(self) -> int:
        """How many more sessions of the default size would be admitted now."""
        return max(0, min(self.slots - self.sessions,
                          self.default.times_in(self.total - self.used)))

    def to_json(self) -> dict[str, Any]:
        return {"total": self.slots, "free": self.free, "used": self.sessions,
                "host": {"vcpus": self.total.cpus, "memory": self.total.memory,
                         "disk": self.total.disk}}
