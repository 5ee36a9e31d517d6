"""The `vmsynth` command: a click group, and the one place errors become exit codes."""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from vmsynth import __version__
from vmsynth.errors import ExitCode, VmsynthError

from . import apply, base, boot, create, inspect, keygen, verify

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
22 memory snapshot incompatible or not possible, 130 interrupted."""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
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


for module in (create, apply, verify, inspect, keygen):
    cli.add_command(module.command)
cli.add_command(base.group)
for command in (boot.boot, boot.snapshot, boot.run, boot.check):
    cli.add_command(command)


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, map every failure to one line and a documented code."""
    argv = sys.argv[1:] if argv is None else argv
    as_json = _wants_json(argv)
    debug = "--debug" in argv or bool(os.environ.get("VMSYNTH_DEBUG"))
    try:
        # make_context + invoke rather than cli.main: click's main prints its own multi-line
        # usage errors and blank lines; here every failure is reported the same way.
        with cli.make_context("vmsynth", list(argv)) as ctx:
            cli.invoke(ctx)
        code = ExitCode.OK
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        code = ExitCode.USAGE
    except click.UsageError as exc:
        where = f"vmsynth {exc.ctx.command_path.partition(' ')[2]}".strip() if exc.ctx else "vmsynth"
        _report(exc.format_message(), f"see `{where} --help`", ExitCode.USAGE, "UsageError",
                as_json)
        code = ExitCode.USAGE
    except click.ClickException as exc:
        _report(exc.format_message(), None, exc.exit_code, type(exc).__name__, as_json)
        code = exc.exit_code
    except (KeyboardInterrupt, click.Abort):
        _report("interrupted", None, ExitCode.INTERRUPTED, "Interrupted", as_json)
        code = ExitCode.INTERRUPTED
    except VmsynthError as exc:
        _report(str(exc), exc.hint, exc.exit_code, type(exc).__name__, as_json)
        code = exc.exit_code
    except Exception as exc:  # a bug: say so plainly, traceback only when asked
        if debug:
            traceback.print_exc()
        _report(f"internal error: {type(exc).__name__}: {exc}",
                "rerun with --debug and report it", ExitCode.ERROR, "InternalError", as_json)
        code = ExitCode.ERROR
    sys.exit(int(code))


def _report(message: str, hint: str | None, code: int, kind: str, as_json: bool) -> None:
    line = f"error: {message}"
    if hint:
        line += f" ({hint})"
    click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "error": {"kind": kind, "message": message,
                                                      "hint": hint, "exit_code": int(code)}},
                              indent=2, sort_keys=True))
