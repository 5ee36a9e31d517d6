"""vmsynth base add | list | rm: the local cache of base images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmsynth import bases
from vmsynth.bases import BootConfig
from vmsynth.vm import ram_bytes

from . import console
from .options import json_option, limits, registry_access, transfer_options


@click.group("base", epilog="""\b
Examples:
  vmsynth base add ubuntu.qcow2 --name ubuntu-22.04 --version 2.3.1
  vmsynth base list
  vmsynth base rm ubuntu-22.04@2.3.1
  vmsynth base push debian@12.5 oci://registry.example.com/bases/debian
  vmsynth base sync oci://registry.example.com/bases/debian --keep 2""")
def command() -> None:
    """Manage the base cache ($VMSYNTH_HOME, default ~/.cache/vmsynth).

    The cache records each base's identity (name, version, virtual size, SHA-256 of its
    contents), computed once; the image itself stays where it is and must not change.
    Bases are published on an OCI registry with `base push` and installed from one with
    `base pull` or `base sync` (their files then live in $VMSYNTH_HOME/images).
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
    """Forget a cached base (its image file is left alone, unless the base was pulled from
    a registry: then its folder in $VMSYNTH_HOME/images is removed with it)."""
    name, sep, version = spec.partition("@")
    if not sep:
        raise click.BadParameter("give the base as NAME@VERSION", param_hint="NAME@VERSION")
    bases.remove(name, version)
    if as_json:
        console.emit_json({"removed": spec})
    else:
        console.err.print(f"removed {spec} from the cache")


# -- registries -----------------------------------------------------------------------------

_REGISTRY_CODES = """\b
Exit codes: 0 ok, 10 the cache has this version with other contents, 21 base
busy, 28 not found in the registry, 29 unauthorized by the registry, 30 not a
vmsynth base, 31 digest mismatch (nothing installed), 32 registry unreachable,
2 usage error."""


def _say(as_json: bool) -> Any:
    return (lambda _: None) if as_json else (lambda text: console.err.print(text))


@command.command("push", epilog="""\b
Examples:
  vmsynth base push debian@12.5 oci://registry.example.com/bases/debian
  vmsynth base push debian@12.6 oci://registry.example.com/bases/debian  # + delta
  vmsynth base push tiny@1 oci://127.0.0.1:5000/bases/tiny:1 --plain-http --json

""" + _REGISTRY_CODES)
@click.argument("spec", metavar="NAME@VERSION")
@click.argument("reference", metavar="oci://HOST/REPOSITORY[:TAG]")
@click.option("--no-delta", is_flag=True,
              help="Do not publish the overlay on the repository's previous version.")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True,
              help="zstd level of that overlay (made once, fetched by every cloudlet).")
@transfer_options
@json_option
def push(spec: str, reference: str, no_delta: bool, level: int, as_json: bool,
         **opts: Any) -> None:
    """Publish cached base NAME@VERSION on an OCI registry (tagged VERSION unless a tag is
    given): its disk and memory snapshot (zstd-compressed), kernel and initrd, identity
    and boot settings.

    When the repository holds an earlier version of the base, and that version is in the
    local cache too, an overlay of this version on it is published as well (a referrer of
    this version's manifest): a cloudlet that has the earlier version fetches only that.
    What the registry already has is not sent again.
    """
    from vmsynth.registry import Reference
    from vmsynth.registry_bases import push_base

    if "@" not in spec:
        raise click.BadParameter("give the base as NAME@VERSION", param_hint="NAME@VERSION")
    ref = Reference.parse(reference, need="repository or tag")
    access = registry_access(opts, limits(opts))
    with console.advancing("pushing", 0, enabled=not as_json) as advance:
        report = push_base(spec, ref, access, not no_delta, level, advance, _say(as_json))
    if as_json:
        console.emit_json(report)
        return
    sent = sum(layer["size"] for layer in report["layers"] if layer["uploaded"])
    console.err.print(f"pushed {spec} to {report['reference']} ({report['digest']}): "
                      f"{console.human(sent)} of layers uploaded")
    delta = report["delta"]
    if "size" in delta:
        console.err.print(f"  delta from {delta['from']}: {console.human(delta['size'])}"
                          + ("" if delta["uploaded"] else " (already there)"))
    elif "skipped" in delta:
        console.err.print(f"  no delta: {delta['skipped']}")


@command.command("pull", epilog="""\b
Examples:
  vmsynth base pull oci://registry.example.com/bases/debian:12.5
  vmsynth base pull oci://127.0.0.1:5000/bases/tiny:1 --plain-http --json

""" + _REGISTRY_CODES)
@click.argument("reference", metavar="oci://HOST/REPOSITORY:TAG")
@click.option("--no-delta", is_flag=True,
              help="Fetch the base in full even when a delta from a cached version exists.")
@transfer_options
@json_option
def pull(reference: str, no_delta: bool, as_json: bool, **opts: Any) -> None:
    """Install a published base into the cache (files in $VMSYNTH_HOME/images/NAME@VERSION).

    The files are fetched under temporary names, each checked against its digest, and the
    base is added only once its contents are the identity it was published with: an
    interrupted or failed pull leaves nothing. With an earlier version of it in the cache,
    only the published overlay between the two is fetched, and the new version rebuilt.
    """
    from vmsynth.registry import Reference
    from vmsynth.registry_bases import pull_base

    ref = Reference.parse(reference)
    access = registry_access(opts, limits(opts))
    with console.advancing("pulling", 0, enabled=not as_json) as advance:
        report = pull_base(ref, access, not no_delta, advance, _say(as_json))
    if as_json:
        console.emit_json(report)
        return
    console.err.print(_installed(report) + f"; {console.human(report['bytes_received'])} "
                      "received")


def _installed(r: dict[str, Any]) -> str:
    if r["action"] == "present":
        return f"{r['base']}: already in the cache"
    how = f"by delta from {r['from']}" if r.get("method") == "delta" else "in full"
    return f"{r['base']}: installed {how} ({console.human(r['fetched_bytes'])} of blobs)"


@command.command("sync", epilog="""\b
Examples:
  vmsynth base sync oci://registry.example.com/bases/debian --keep 2
  vmsynth base sync oci://127.0.0.1:5000/bases/tiny --plain-http --json
  systemctl enable --now vmsynth-sync.timer   # off-peak, see the README

""" + _REGISTRY_CODES)
@click.argument("reference", metavar="oci://HOST/REPOSITORY")
@click.option("--keep", type=click.IntRange(1), metavar="N",
              help="Keep the newest N versions of each base: fetch only those, and remove "
                   "pulled versions beyond them that no session uses [default: fetch all, "
                   "remove none].")
@click.option("--no-delta", is_flag=True, help="Fetch every version in full.")
@transfer_options
@json_option
def sync(reference: str, keep: int | None, no_delta: bool, as_json: bool,
         **opts: Any) -> None:
    """Bring the cache in step with a repository of bases: the cloudlet's update step.

    Versions the cache lacks are installed as `base pull` does (by delta from a version
    held here when the registry has one); with --keep N, versions this command pulled
    earlier that are no longer among the newest N are removed, except those a running
    session or command uses (they are kept, and removed by a later sync).
    """
    from vmsynth.registry import Reference
    from vmsynth.registry_bases import sync as sync_bases

    ref = Reference.parse(reference, need="")
    access = registry_access(opts, limits(opts))
    with console.advancing("syncing", 0, enabled=not as_json) as advance:
        report = sync_bases(ref, access, keep, not no_delta, advance, _say(as_json))
    if as_json:
        console.emit_json(report)
        return
    for r in report["bases"]:
        console.err.print(_installed(r))
    for label in report["removed"]:
        console.err.print(f"{label}: removed")
    for label in report["kept_in_use"]:
        console.err.print(f"{label}: kept (in use)")
    console.err.print(f"{console.human(report['bytes_received'])} received from the registry")
