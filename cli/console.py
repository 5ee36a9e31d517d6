"""Output for humans (rich, on stderr/stdout) and for machines (--json on stdout)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from vmsynth.guest import CheckReport

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'250M', '1.5G', '100MiB', '4096': suffixes are powers of 1024, as in qemu-img."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (examples: 250M, 1.5G, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class SizeParam(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        return value if isinstance(value, int) else parse_size(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True
             ) -> Iterator[Callable[[int, int], None]]:
    """Yields update(done, total). A bar only when stderr is a terminal and output is for humans."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int) -> None:
            bar.update(task, completed=done, total=new_total)

        yield update


@contextlib.contextmanager
def advancing(description: str, total: int, enabled: bool = True
              ) -> Iterator[Callable[[int], None]]:
    """Yields advance(n): a bar over `total` bytes (0 when unknown) that grows by n."""
    done = 0
    with progress(description, total, enabled) as update:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            update(done, max(total, done))

        yield advance


def print_check(report: CheckReport) -> None:
    """What `check` (and `apply --check`) found, a line per filesystem and guest OS."""
    for f in report.filesystems:
        out.print(f"{report.image}: {f.device} {f.fstype}: {f.status}")
    for o in report.operating_systems or [{}]:
        if not o:
            out.print(f"{report.image}: no operating system found on the disk "
                              "(fine for a data disk or a direct-kernel guest)")
            continue
        version = ".".join(str(o[k]) for k in ("major", "minor") if o.get(k) is not None)
        out.print(f"{report.image}: {o.get('type')} {o.get('distro')} {version} "
                          f"({o.get('product')}), hostname {o.get('hostname')}")
