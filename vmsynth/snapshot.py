"""Memory snapshots of running VMs: take one, resume one.

QEMU 7.2 has no mapped-ram, so `vmsynth boot` keeps guest RAM in a file (memory-backend-file,
share=on). A snapshot stops the VM and migrates only its device state (the x-ignore-shared
capability leaves the shared RAM out), then stores the RAM file page for page in a .vmem
(vmsynth.memory, vmsynth.formats.vmem). Resuming maps the .vmem itself as guest RAM,
privately (share=off: the file never changes), and loads the device state.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInputError, QMPError, SnapshotError, UsageError
from .memory import MachineInfo, Vmem, write_vmem
from .store import Inputs, temp_path, write_error

if TYPE_CHECKING:
    from .qmp import QMP

RAM_ID = "vmsynth.ram"  # the memory-backend object's id in every VM vmsynth starts
MACHINE_FILE = "machine.json"  # written by `vmsynth boot` beside its QMP socket
MIGRATE_TIMEOUT = 300.0


@functools.cache  # one QEMU per process: asking once is enough
def qemu_version() -> str:
    """This host's QEMU version (major.minor.micro), as a resumed snapshot must match it."""
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return f"{match[1]}.{match[2]}.{match[3] or 0}" if match else "unknown"


def describe_machine(qmp: QMP, launch: dict[str, Any]) -> MachineInfo:
    """The running VM's machine description: QEMU's own answers, plus how vmsynth launched it."""
    try:
        machine = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
        cpus = qmp.execute("query-cpus-fast")
        cpu = str(qmp.execute("qom-get", {"path": cpus[0]["qom-path"], "property": "type"}))
        size = int(qmp.execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "size"}))
        v = qmp.execute("query-version")["qemu"]
    except (QMPError, KeyError, IndexError, TypeError, ValueError) as err:
        raise SnapshotError(f"cannot read the VM's machine description: {err}") from err
    return MachineInfo(machine.removesuffix("-machine"), cpu.removesuffix("-x86_64-cpu"), size,
                       f"{v['major']}.{v['minor']}.{v['micro']}", len(cpus),
                       bool(launch.get("vga")), bool(launch.get("kernel_boot")),
                       tuple(launch.get("extra_args", ())), str(launch.get("accel", "")),
                       bool(launch.get("entropy")))


MIGRATION_ENDS = ("completed", "failed", "cancelled")


def _migrate(qmp: QMP, command: str, uri: str) -> None:
    """Run `migrate` or `migrate-incoming` and wait for QEMU's MIGRATION event that says it
    ended (the `events` capability): no polling, and a bounded wait."""
    with qmp.listen("MIGRATION") as events:  # before the command: no event can be missed
        qmp.execute(command, {"uri": uri})
        event = events.wait(lambda e: e.get("data", {}).get("status") in MIGRATION_ENDS,
                            timeout=MIGRATE_TIMEOUT)
    if event is None:
        try:
            qmp.execute("migrate_cancel")
        except QMPError:
            pass  # the error below says what matters
        raise SnapshotError(f"QEMU's migration did not finish in {MIGRATE_TIMEOUT:.0f} s")
    state = event["data"]["status"]
    if state != "completed":
        status = qmp.execute("query-migrate")  # the event does not say why
        raise SnapshotError(f"QEMU's migration {state}: "
                            f"{status.get('error-desc', 'no reason given')}")


def _capabilities(qmp: QMP) -> None:
    qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True},  # RAM is the shared file: not sent
        {"capability": "events", "state": True}]})  # MIGRATION events, which _migrate awaits


def launch_info(qmp_path: Path) -> dict[str, Any]:
    """What `vmsynth boot` recorded about a VM beside its QMP socket."""
    try:
        info = json.loads((qmp_path.parent / MACHINE_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("ram_file"), str):
        raise SnapshotError(f"{qmp_path}: this VM was not started by `vmsynth boot`, so its "
                            "RAM is not in a file vmsynth can snapshot page by page",
                            hint="boot it with `vmsynth boot`")
    return info


def snapshot(qmp_path: Path, out: Path) -> Vmem:
    """Stop the VM behind `qmp_path`, write its RAM and device state to `out`, then quit it.

    The VM is not resumed: its disk must stay as it was at the snapshot for the two to
    match, so the caller diffs that disk next.

    Raises:
        BadInputError: no such socket.
        SnapshotError: not a vmsynth VM or not QEMU, or QEMU's migration failed.
    """
    if not qmp_path.exists():
        raise BadInputError(f"QMP socket {qmp_path}: no such file",
                            hint="`vmsynth boot` prints its VM's QMP socket")
    launch = launch_info(qmp_path)
    from .qmp import QMP  # asyncio and qemu.qmp: only when there is a VM to talk to

    try:
        qmp = QMP(str(qmp_path))
    except QMPError as err:
        raise SnapshotError(f"{qmp_path}: not an answering QEMU QMP socket ({err})") from None
    try:
        return take(qmp, Path(launch["ram_file"]), launch, out)
    finally:
        qmp.close()


def take(qmp: QMP, ram_file: Path, launch: dict[str, Any], out: Path,
         inputs: Inputs | None = None) -> Vmem:
    """Snapshot the VM behind `qmp` (launched as `launch` says) into `out`, then quit it.

    `out` must not be the VM's RAM file or disk, nor any of `inputs`.
    """
    inputs = inputs or Inputs()
    inputs.add("VM's RAM file", ram_file)
    disk = launch.get("disk")
    inputs.add("VM's disk", disk if isinstance(disk, str) else None)
    inputs.check_output("-o/--output", out)  # before the VM is touched
    machine = describe_machine(qmp, launch)
    try:
        shared = qmp.execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "share"})
    except QMPError:
        shared = False
    if not shared or launch.get("resumed"):
        raise SnapshotError("this VM's RAM is not shared with a file (a resumed snapshot maps "
                            "its file privately), so it cannot be snapshotted page by page",
                            hint="snapshot a VM booted with `vmsynth boot`")
    state_file = temp_path(out, "state")
    try:
        qmp.execute("stop")
        _capabilities(qmp)
        _migrate(qmp, "migrate", f"exec:cat > {shlex.quote(str(state_file))}")
        state = state_file.read_bytes()
    except OSError as err:
        raise write_error(state_file, err) from err
    finally:
        state_file.unlink(missing_ok=True)
    vmem = write_vmem(out, ram_file, machine, state, inputs)
    try:
        qmp.execute("quit")
    except QMPError:
        pass  # it is going away either way
    return vmem


# -- resuming ------------------------------------------------------------------------------


def check_resumable(vmem: Vmem) -> None:
    """Refuse a snapshot this host's QEMU cannot resume exactly."""
    here = qemu_version()
    if here != vmem.machine.qemu_version:
        raise SnapshotError(f"{vmem.path} was taken with QEMU {vmem.machine.qemu_version}, but "
                            f"this host has QEMU {here}",
                            hint="resume it on a host with the same QEMU version, or boot "
                                 "the disk instead")


def ram_args(ram_file: Path, size: int, machine: str, share: bool) -> list[str]:
    """QEMU arguments that put guest RAM in `ram_file`."""
    path = str(ram_file).replace(",", ",,")
    backend = (f"memory-backend-file,id={RAM_ID},size={size},mem-path={path},"
               f"share={'on' if share else 'off'}")
    return ["-m", f"{size // (1 << 20)}M", "-object", backend,
            "-machine", f"{machine},memory-backend={RAM_ID}"]


def entropy_args(generation_id: str = "auto") -> list[str]:
    """QEMU arguments for a VM generation ID device and a virtio RNG.

    Every VM `vmsynth boot` starts has both, so its snapshots do, and a resume adds them
    again (the device set must match the migration stream), the generation ID new each time
    (guid=auto is fresh on every QEMU start): a Linux guest (CONFIG_VMGENID) reseeds its RNG
    when the ID changes, so VMs resumed from one snapshot do not share random numbers.
    virtio-rng lets the guest draw the host's entropy from then on.
    """
    if generation_id != "auto":
        try:
            generation_id = str(uuid.UUID(generation_id))
        except ValueError:
            raise UsageError(f"generation ID {generation_id!r}: give auto or a UUID") from None
    return ["-device", f"vmgenid,guid={generation_id}", "-device", "virtio-rng-pci"]


def resume(qmp: QMP, vmem: Vmem, rundir: Path) -> float:
    """Feed the device state to a QEMU started with `-incoming defer`, then run the guest.

    Returns the seconds it took.
    """
    started = time.monotonic()
    state = rundir / "state.bin"
    with open(vmem.path, "rb") as f:
        f.seek(vmem.ram_size)
        state.write_bytes(f.read(vmem.state_size))
    _capabilities(qmp)
    try:
        _migrate(qmp, "migrate-incoming", f"exec:cat {shlex.quote(str(state))}")
    except SnapshotError as err:
        raise SnapshotError(f"QEMU could not load {vmem.path}'s device state: {err}",
                            hint="resume with the same --kernel and --qemu-arg options the VM "
                                 "was booted with") from None
    qmp.execute("cont")
    return time.monotonic() - started
