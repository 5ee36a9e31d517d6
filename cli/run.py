"""vmsynth run."""

from __future__ import annotations

import time
from typing import Any

import click

from vmsynth import session, signals
from vmsynth.apply import apply
from vmsynth.source import open_source

from . import console
from .launch import boot_inputs, boot_options, check_serial, machine, run_machine
from .options import (
    base_inputs,
    base_option,
    json_option,
    key_file_option,
    limits,
    open_base,
    overlay_input,
    read_key,
    registry_access,
    transfer_options,
)


@click.command("run", epilog="""\b
Examples:
  vmsynth run app.vmo --base ubuntu-22.04@2.3.1 --memory 2G
  vmsynth run app.vmo --base base.qcow2 --kernel vmlinux --initrd initrd.gz --keep
  vmsynth run http://depot:8080/app.vmo --base debian@12
  vmsynth run oci://registry.example.com/apps/app:1.0 --base debian@12""")
@click.argument("overlay")
@base_option
@click.option("--keep", is_flag=True,
              help="Keep the session's disk (and memory snapshot) when the VM ends.")
@boot_options
@key_file_option
@transfer_options
@json_option
def command(overlay: str, base_spec: str, keep: bool, key_file: str | None, as_json: bool,
            **opts: Any) -> None:
    """Rebuild the VM from OVERLAY on a base, boot or resume it, and scrub it when it ends.

    OVERLAY is a file, - (standard input), an http(s) URL or an oci:// registry reference,
    rebuilt as it arrives.
    An overlay with a memory snapshot is resumed where it was snapshotted (no boot); the
    disk and memory are rebuilt into a private session directory under $VMSYNTH_HOME/sessions;
    when the VM ends (or on Ctrl-C / SIGTERM / failure) its files are overwritten and
    deleted, so nothing of the user remains, unless --keep is given.
    """
    started = time.monotonic()
    transfer = limits(opts)
    access = registry_access(opts)
    inputs = boot_inputs(opts)
    overlay_input(inputs, overlay)
    inputs.add("key file", key_file)
    check_serial(inputs, opts)
    sess = None
    try:
        with signals.deferred():  # a session exists only inside the try that removes it
            sess = session.new(keep=inputs)
        with open_base(base_spec, as_json) as base, \
                open_source(overlay, transfer, access) as source, \
                console.advancing("rebuilding", source.size, enabled=not as_json) as advance:
            base_inputs(inputs, base)
            check_serial(inputs, opts)
            # Not synced to disk: a session never outlives its VM (after a crash it is
            # scrubbed, not resumed), and a sync would delay the VM's start.
            report = apply(source, base, sess.disk, progress=advance, key=read_key(key_file),
                           memory_output=sess.memory, durable=False, inputs=inputs)
        synthesized = time.monotonic() - started
        vm = machine(sess.disk, opts, as_json, report.memory, base.boot)
        run_machine(vm, as_json, {"session": sess.id,
                                  "synthesis_seconds": round(synthesized, 3)})
    finally:
        # The scrub must finish: a Ctrl-C or SIGTERM now takes effect right after it.
        with signals.deferred():
            if sess is not None and keep:
                if not as_json:
                    console.err.print(f"kept the session: {sess.dir}")
            elif sess is not None:
                session.destroy(sess)
