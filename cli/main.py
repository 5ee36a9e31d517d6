"""The `vmsynth` entry point: the one place where errors become exit codes.

The stop signals are routed through `Interrupted` before anything slow is imported (so the
imports below live inside the functions), and a Ctrl-C or SIGTERM at any moment ends the
command with one line and its clean-up done, never a traceback. Every message passes
through `redact`: no URL credential reaches the terminal.
"""

from __future__ import annotations

import sys

from vmsynth import signals  # the standard library's signal and threading, nothing more


def main(argv: list[str] | None = None) -> None:
    """Run the command; map every failure to one line and a documented code."""
    signals.install()
    try:
        code = _run(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt as exc:  # while the modules below were still loading
        code = _report("interrupted", None, _signal_code(exc), False)
    sys.exit(code)


def _run(args: list[str]) -> int:
    import os

    from vmsynth import store

    as_json = "--json" in args
    debug = "--debug" in args or bool(os.environ.get("VMSYNTH_DEBUG"))
    completed = store.completed.set([])
    try:
        return _invoke(args, as_json, debug)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP, or a prompt's Ctrl-C
        return _interrupted(exc, store.completed.get() or [], as_json)
    except Exception as exc:  # noqa: BLE001 (a broken installation: the import failed)
        return _report(f"internal error: {type(exc).__name__}: {exc}",
                       "rerun with --debug and report it", 1, as_json)
    finally:
        store.completed.reset(completed)


def _invoke(args: list[str], as_json: bool, debug: bool) -> int:
    import click

    from vmsynth.errors import ExitCode, exit_code, is_user_error

    from .app import cli

    try:
        # make_context + invoke rather than cli.main: click's main prints its own multi-line
        # usage errors and blank lines; here every failure is reported the same way.
        with cli.make_context("vmsynth", list(args)) as ctx:
            cli.invoke(ctx)
        return ExitCode.OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        return ExitCode.USAGE
    except click.UsageError as exc:
        where = f"vmsynth {exc.ctx.command_path.partition(' ')[2]}".strip() if exc.ctx else "vmsynth"
        return _report(exc.format_message(), f"see `{where} --help`", ExitCode.USAGE, as_json)
    except click.Abort:
        raise KeyboardInterrupt from None
    except click.ClickException as exc:
        return _report(exc.format_message(), None, exc.exit_code, as_json)
    except BrokenPipeError:  # a reader such as `head` stopped early: not a bug
        _quiet_stdout()
        return _report("standard output was closed before everything was written (the "
                       "program reading it stopped early)", None, ExitCode.WRITE_FAILED, False)
    except Exception as exc:  # noqa: BLE001 (one place decides: the user's error, or a bug)
        if is_user_error(exc):
            return _report(str(exc), getattr(exc, "hint", None), exit_code(exc), as_json)
        if debug:
            import traceback

            traceback.print_exc()
        return _report(f"internal error: {type(exc).__name__}: {exc}",
                       "rerun with --debug and report it", ExitCode.ERROR, as_json)


def _signal_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number; 130 (SIGINT) for a Ctrl-C at a prompt."""
    return exc.exit_code if isinstance(exc, signals.Interrupted) else 130


def _interrupted(exc: KeyboardInterrupt, completed: list[object], as_json: bool) -> int:
    code = _signal_code(exc)
    what = "interrupted" if code == 130 else f"stopped by {signals.Interrupted(code - 128)}"
    if completed:  # say what is true: these had been finished before the signal came
        what += f" after {' and '.join(map(str, completed))} " + \
            ("were" if len(completed) > 1 else "was") + " complete"
    return _report(what, None, code, as_json)


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so the exit does not fail flushing a dead pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _report(message: str, hint: str | None, code: int, as_json: bool) -> int:
    """One line on standard error; with --json, also {"ok": false, "error": {...}} on
    standard output, whose `kind` names the exit code (corrupt, base_mismatch, ...)."""
    import json

    from vmsynth.errors import ExitCode
    from vmsynth.source import redact

    try:
        kind = ExitCode(code).name.lower()
    except ValueError:  # a click exit code of its own
        kind = "error"

    message, hint = redact(message), redact(hint) if hint else None
    line = f"error: {message}" + (f" ({hint})" if hint else "")
    try:
        print(line, file=sys.stderr, flush=True)
        if as_json:
            print(json.dumps({"ok": False, "error": {"kind": kind, "message": message,
                                                     "hint": hint, "exit_code": int(code)}},
                             indent=2, sort_keys=True), flush=True)
    except BrokenPipeError:
        _quiet_stdout()
    except OSError:
        pass  # nowhere left to say it: the exit code still does
    return code
