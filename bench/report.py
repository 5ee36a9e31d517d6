#!/usr/bin/env python3
"""Assemble BENCHMARKS.md: the synthetic disk report (written by disk_bench.py), then the
reports of the other benchmarks, each kept in its own file under bench/ by its script.

    python3 bench/report.py        (`make bench` runs it last)

Whatever an earlier run appended below the marker is replaced, so running it again is safe;
a report that does not exist yet is listed as not run.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "BENCHMARKS.md"
MARKER = "<!-- bench/report.py: the reports below are copied from bench/*.md -->"
SECTIONS = [
    ("DISK-DEBIAN.md", "Disk: a real Debian 12 pair", "disk_bench.py --workload debian"),
    ("MEMORY.md", "Memory snapshots", "memory_bench.py"),
    ("E2E.md", "End to end: user arrives, app running", "e2e_bench.py"),
    ("CLOUDLET.md", "The cloudlet: the seed's timeline on `vmsynth serve`", "cloudlet_bench.py"),
    ("ARRIVE.md", "A user arrives: discovery to a running app", "cloudlet_bench.py --arrive"),
    ("REGISTRY.md", "Registry: bases and overlays through an OCI registry",
     "registry_bench.py"),
]


def main() -> int:
    head = TARGET.read_text() if TARGET.exists() else "# vmsynth benchmarks\n"
    head = head.split(MARKER)[0].rstrip() + "\n"
    parts = [head, "", MARKER, ""]
    for name, title, script in SECTIONS:
        path = REPO / "bench" / name
        if path.exists():
            # Headings go one level down: each report becomes a section of this file.
            lines = [("#" + ln if ln.startswith("#") else ln)
                     for ln in path.read_text().strip().splitlines()]
            parts += [*lines, ""]
        else:
            parts += [f"## {title}", "", f"Not run yet: `bench/{script}`.", ""]
    TARGET.write_text("\n".join(parts))
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
