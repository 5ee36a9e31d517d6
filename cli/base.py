"""vmsynth base add | list | rm: the local cache of base images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from rich.table import Table

from vmsynth import bases
from vmsynth.bases import BootConfig
from vmsynth.vm import ram_bytes

from . import console
from .options import json_option


@click.group("base", epilog="""\b
Examples:
  vmsynth base add ubuntu.qcow2 --name ubuntu-22.04 --version 2.3.1
  vmsynth base list
  vmsynth base rm ubuntu-22.04@2.3.1""")
def command() -> None:
    """Manage the base cache ($VMSYNTH_HOME, default ~/.cache/vmsynth).

    The cache records each base's identity (name, version, virtual size, SHA-256 of its
    contents), computed once; the image itself stays where it is and must not change.
    """


@command.command("add", epilog="""\b
Examples:
  vmsynth base add ubuntu.qcow2 --name ubuntu-22.04 --version 2.3.1
  vmsynth base add /srv/bases/debian12.qcow2 --name debian --version 12.5 --json
  vmsynth base add debian12.qcow2 --memory debian12-ready.vmem --name debian --version 12.5
  vmsynth base add tiny.qcow2 --name tiny --version 1 --kernel vmlinux \\
      --initrd initrd.gz --append "console=ttyS0" --ram 256M --ready login:""")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Base name, e.g. ubuntu-22.04.")
@click.option("--version", "version", required=True, help="Base version, e.g. 2.3.1.")
@click.option("--memory", type=click.Path(dir_okay=False), metavar="VMEM",
              help="The base VM's memory snapshot in a ready state (`vmsynth snapshot`): "
                   "overlays with memory are diffed against it.")
@click.option("--kernel", type=click.Path(dir_okay=False),
              help="Its VMs boot this kernel directly (and a snapshot of one resumes with it).")
@click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs for --kernel.")
@click.option("--append", help="Kernel command line for --kernel.")
@click.option("--ram", metavar="SIZE", help="Guest RAM for a boot (QEMU -m), e.g. 2G.")
@click.option("--cpus", type=click.IntRange(1, 256), help="Virtual CPUs for a boot.")
@click.option("--ready", metavar="TEXT",
              help="A booted VM is ready when its serial console prints TEXT.")
@json_option
def add(image: str, name: str, version: str, memory: str | None, kernel: str | None,
        initrd: str | None, append: str | None, ram: str | None, cpus: int | None,
        ready: str | None, as_json: bool) -> None:
    """Add IMAGE (a standalone qcow2) to the cache as NAME@VERSION.

    The boot settings (--kernel ... --ready) are what `vmsynth run` and `vmsynth serve`
    use to start its VMs, so a user needs nothing but an overlay; options given to `run`
    take precedence.
    """
    if ram is not None:
        ram_bytes(ram)  # checked now, not when a user's VM is started
    boot = BootConfig(Path(kernel) if kernel else None, Path(initrd) if initrd else None,
                      append, ram, cpus, ready)
    with console.progress("scanning base", 1, enabled=not as_json) as update:
        base = bases.add(Path(image), name, version, update,
                         Path(memory) if memory else None, boot)
    base.close()
    ident = base.identity
    if as_json:
        console.emit_json(dataclasses.asdict(ident) | {"path": str(base.path),
                                                       "boot": base.boot.to_json()})
        return
    console.err.print(f"added {ident.label}: {console.human(ident.virtual_size)}, "
                      f"{ident.digest}")
    if ident.memory is not None and ident.memory.machine is not None:
        m = ident.memory.machine
        console.err.print(f"  memory: {console.human(m.ram_size)} RAM, {m.machine}, {m.cpu}, "
                          f"QEMU {m.qemu_version}, {ident.memory.digest}")


@command.command("list", epilog="""\b
Examples:
  vmsynth base list
  vmsynth base list --json | jq -r '.[].name'""")
@json_option
def list_(as_json: bool) -> None:
    """List the cached bases."""
    found = bases.entries()
    if as_json:
        console.emit_json(found)
        return
    if not found:
        console.err.print(f"no bases in {bases.home()} (add one with `vmsynth base add`)")
        return
    table = Table("base", "virtual size", "digest", "image", "memory")
    for e in found:
        if "damaged" in e:
            table.add_row(f"{e['name']}@{e['version']}", "-", "damaged", e["damaged"],
                          e["hint"])
            continue
        mem = e.get("memory")
        table.add_row(f"{e['name']}@{e['version']}", console.human(int(e["virtual_size"])),
                      str(e["digest"])[:23] + "...", str(e["path"]),
                      f"{console.human(int(mem['size']))}: {mem['path']}"
                      if isinstance(mem, dict) else "-")
    console.out.print(table)


@command.command("rm", epilog="""\b
Examples:
  vmsynth base rm ubuntu-22.04@2.3.1""")
@click.argument("spec", metavar="NAME@VERSION")
@json_option
def rm(spec: str, as_json: bool) -> None:
    """Forget a cached base (its image file is left alone)."""
    name, sep, version = spec.partition("@")
    if not sep:
        raise click.BadParameter("give the base as NAME@VERSION", param_hint="NAME@VERSION")
    bases.remove(name, version)
    if as_json:
        console.emit_json({"removed": spec})
    else:
        console.err.print(f"removed {spec} from the cache")
