"""Running the real QEMU tools, with errors that name the package to install."""

from __future__ import annotations

import shutil
import subprocess

from .errors import ToolError, WriteError

PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
            "qemu-system-x86_64": "qemu-system-x86"}


def run(*args: str) -> str:
    """Run a tool, return its stdout; any failure becomes a ToolError with its stderr."""
    tool = args[0]
    if shutil.which(tool) is None:
        package = PACKAGES.get(tool, tool)
        raise ToolError(f"{tool} is not installed",
                        hint=f"install it: apt-get install {package}")
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit {proc.returncode}"
        if "No space left on device" in last:
            raise WriteError(f"{tool}: no space left on the device ({last})",
                             hint="free some space or write the output elsewhere")
        raise ToolError(f"{tool} failed: {last}")
    return proc.stdout
