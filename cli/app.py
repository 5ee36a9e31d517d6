"""The `vmsynth` click group and its commands: one module each, imported when used.

Importing only the command that runs keeps start-up short (the cloudlet's HTTP stack, rich
tables and QEMU code are not loaded for `vmsynth verify`).
"""

from __future__ import annotations

import importlib

import click

from vmsynth import __version__

EPILOG = """\b
Examples:
  vmsynth base add ubuntu.qcow2 --name ubuntu-22.04 --version 2.3.1
  vmsynth create --base ubuntu-22.04@2.3.1 --disk app.qcow2 -o app.vmo
  vmsynth verify app.vmo --base ubuntu-22.04@2.3.1 --max-size 250M
  vmsynth apply app.vmo --base ubuntu-22.04@2.3.1 -o synth.qcow2

Exit codes: 0 ok, 1 internal error, 2 usage, 10 base mismatch, 11 over budget,
12 unsupported format, 13 corrupt overlay, 14 tool missing or failed,
15 boot failed, 16 bad input, 17 cannot write output, 18 accelerator
unavailable, 19 image check failed, 20 key missing or wrong, 21 base busy,
22 memory snapshot incompatible or not possible, 23 QEMU refused a command
(QMP), 24 damaged memory snapshot, 25 cloudlet full, 26 unauthorized by the
cloudlet, 27 cloudlet unreachable or session lost, 28 not found in the
registry, 29 registry unauthorized, 30 not a vmsynth artifact (wrong artifact
type), 31 digest mismatch from the registry, 32 registry unreachable or
misbehaving, 40 no cloudlet can serve (run locally), 129 hangup (SIGHUP), 130
interrupted (Ctrl-C), 143 terminated (SIGTERM)."""


# Command name -> module in vmsynth.cli (each defines `command`), in the order --help lists.
COMMANDS = {name: name for name in (
    "create", "apply", "verify", "inspect", "push", "pull", "base", "keygen", "boot",
    "snapshot", "run", "check", "serve", "discover", "decide", "offload", "sessions")}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command: click.Command = importlib.import_module(f"vmsynth.cli.{module}").command
        return command


@click.group(cls=LazyGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmsynth")
@click.option("--debug", is_flag=True, envvar="VMSYNTH_DEBUG",
              help="Show a traceback on internal errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """vmsynth: small, verified VM overlays for cloudlets.

    An overlay is the difference between a cached base VM disk and a customized one.
    Create it once, ship it, and rebuild the customized disk on any machine with the base.
    """
    ctx.obj = {"debug": debug}

