#!/usr/bin/env python3
"""Registry benchmark: publishing and fetching bases and overlays through a real OCI registry.

    sudo python3 bench/registry_bench.py [--workdir DIR] [--fixture]

The registry is Debian's docker-registry (CNCF distribution 2.8.2) on 127.0.0.1 (a config
written here, storage under WORKDIR, emptied at each run). Roles are separate base caches
(VMSYNTH_HOME): a publisher and two cloudlet sites. Measured, each command its own process
(wall time, peak RSS, CPU time), bytes from both ends (what vmsynth says it sent or received,
and what the registry's access log says it answered):

  publisher  base push debian@1          the Debian base: disk, kernel, initrd (zstd)
             base push debian@1 again    nothing to send
             push app.vmo                the Debian app's overlay (~135 MiB)
             push app.vmo again
  site       base pull debian:1          in full
             pull app:1 -o FILE
             apply oci://...app:1        rebuilt as it arrives (then qemu-img compare)
  publisher  base push debian@2          version 2 (an apt-get install of a few packages in
                                         the base, flattened) + the delta from version 1
  site       base sync --keep 1          version 2 by delta, version 1 removed
  site 2     base pull debian:2 --no-delta   the full re-pull the delta saves

Workload: the Debian pair of bench/debian_guest.py (built there, cached; needs root and
deb.debian.org) and its version 2, built here once (cached in WORKDIR). --fixture uses the
tiny fixture guest instead (fixtures/build-guest.sh; version 2 adds 2 MiB of new data): a
quick check that needs neither root nor the network.

Writes bench/results-registry.json and bench/REGISTRY.md (--fixture: the same names in
WORKDIR/fixture/). The registry is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python -P` (make bench) adds no dir
import debian_guest
from disk_bench import BenchError, exit_on, log, machine, measure_once, run

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VMSYNTH = REPO / ".venv" / "bin" / "vmsynth"
REGISTRY_BIN = "/usr/bin/docker-registry"
DEFAULT_WORKDIR = REPO / ".build" / "bench" / "registry"
MiB = 1 << 20
V2_RECIPE = 1  # bump when what version 2 holds changes: the cached one is rebuilt
# Version 2 of the Debian base: what a base update usually is, a few packages more.
V2_PACKAGES = ("openssh-server", "curl", "ca-certificates", "less", "vim-tiny", "rsync")
RATES_MBIT = (50, 100, 1000)


# -- the registry -----------------------------------------------------------------------------

class Registry:
    def __init__(self, work: Path) -> None:
        if not Path(REGISTRY_BIN).exists():
            raise BenchError(f"missing {REGISTRY_BIN} (apt-get install -y docker-registry)")
        self.storage = work / "registry-storage"
        shutil.rmtree(self.storage, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = work / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: {secrets.token_hex(16)}\n")
        self.log_path = work / "registry.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (the registry's lifetime)
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError("the registry did not start: " +
                                     self.log_path.read_text(errors="replace")[-1000:]) from None
                time.sleep(0.05)

    def ref(self, path: str) -> str:
        return f"oci://127.0.0.1:{self.port}/{path}"

    def mark(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size

    def served_since(self, mark: int) -> dict:
        """What the registry's access log says it answered since `mark`: requests, and the
        bytes of response bodies (blobs, manifests, tag lists)."""
        time.sleep(0.2)  # let the last lines reach the log
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        lines = re.findall(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)',
                           text)
        return {"requests": len(lines),
                "response_bytes": sum(int(n) for *_, n in lines if n != "-"),
                "blob_bytes": sum(int(n) for method, path, _, n in lines
                                  if method == "GET" and "/blobs/" in path and n != "-"),
                "writes": sum(1 for method, *_ in lines if method in ("PUT", "POST", "PATCH"))}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the workloads ----------------------------------------------------------------------------

def debian_workload(work: Path) -> dict:
    pair = debian_guest.build()
    v2 = work / "debian-v2.qcow2"
    stamp = work / "debian-v2.json"
    base_state = debian_guest.file_state(Path(pair["base_qcow2"]))
    try:
        cached = json.loads(stamp.read_text())
        if cached["recipe"] == V2_RECIPE and cached["base"] == base_state and \
                cached["v2"] == debian_guest.file_state(v2):
            log(f"reusing version 2 of the base built {cached['built_at']}")
            return debian_facts(pair, v2, cached)
    except (OSError, ValueError, KeyError):
        pass
    if os.geteuid() != 0:
        raise BenchError("building version 2 of the Debian base needs root (mount, chroot)")
    log(f"building version 2 of the Debian base: apt-get install {' '.join(V2_PACKAGES)}")
    child = work / "v2-child.qcow2"
    child.unlink(missing_ok=True)
    v2.unlink(missing_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", pair["base_qcow2"], "-F", "qcow2", child)
    started = time.monotonic()
    try:
        with debian_guest.guest_disk(child, work, logs / "v2-qemu-storage-daemon.log") as mnt:
            before = debian_guest.installed_packages(mnt)
            apt_log = logs / "v2-apt.log"
            with debian_guest.chroot_env(mnt, network=True):
                debian_guest.chroot(mnt, "apt-get", "update", log_to=apt_log)
                debian_guest.chroot(mnt, "apt-get", "install", "-y", "--no-install-recommends",
                                    *V2_PACKAGES, log_to=apt_log)
                debian_guest.chroot(mnt, "apt-get", "clean", log_to=apt_log)
            for lists in (mnt / "var/lib/apt/lists").glob("*_*"):  # as base images ship
                lists.unlink()
            after = debian_guest.installed_packages(mnt)
            os.sync()
            run("fstrim", mnt)
        run("qemu-img", "convert", "-O", "qcow2", child, v2)
    finally:
        child.unlink(missing_ok=True)
    new = {k: v["version"] for k, v in after.items() if before.get(k) != v}
    facts = {"recipe": V2_RECIPE, "built_at": dt.datetime.now().isoformat(timespec="seconds"),
             "build_seconds": round(time.monotonic() - started, 1), "base": base_state,
             "v2": debian_guest.file_state(v2), "new_packages": new,
             "new_packages_installed_bytes": sum(after[k]["kib"] for k in new) * 1024}
    debian_guest.write_json(stamp, facts)
    return debian_facts(pair, v2, facts)


def debian_facts(pair: dict, v2: Path, facts: dict) -> dict:
    boot = debian_guest.boot_args("base")
    return {"name": "debian", "v1": pair["base_qcow2"], "v2": str(v2), "app": pair["app_qcow2"],
            "kernel": pair["kernel"], "initrd": pair["initrd"],
            "append": boot[boot.index("--append") + 1], "ready": debian_guest.READY["base"],
            "ram": "1G", "v2_facts": facts,
            "describe": f"bench/debian_guest.py's Debian 12 pair (3 GiB disk); version 2 = "
                        f"version 1 + apt-get install {' '.join(V2_PACKAGES)} "
                        f"({len(facts['new_packages'])} packages, "
                        f"{facts['new_packages_installed_bytes'] / MiB:.0f} MiB installed), "
                        "flattened"}


def fixture_workload(work: Path) -> dict:
    guest = REPO / ".build" / "test-guest"
    run("bash", REPO / "fixtures" / "build-guest.sh", guest)
    v2 = work / "tiny-v2.qcow2"
    if not v2.exists():
        sys.path.insert(0, str(REPO / "tests"))
        import helpers  # the test suite's pure-Python qcow2 helpers

        data = bytearray(helpers.read_image(guest / "base.qcow2"))
        data[40 * MiB: 42 * MiB] = helpers.det_bytes("base v2", 2 * MiB)  # ext4 free space
        helpers.write_image(work / "tiny-v2.qcow2.tmp", bytes(data))
        os.replace(work / "tiny-v2.qcow2.tmp", v2)
    return {"name": "tiny", "v1": str(guest / "base.qcow2"), "v2": str(v2),
            "app": str(guest / "app.qcow2"), "kernel": str(guest / "kernel"),
            "initrd": str(guest / "initramfs.cpio.gz"), "append": "console=ttyS0 quiet panic=-1",
            "ready": "VMSYNTH-MARKER-END", "ram": "256M",
            "describe": "the fixture guest (fixtures/build-guest.sh: a 64 MiB ext4 disk and the "
                        "Debian kernel, uncompressed); version 2 = version 1 + 2 MiB of new "
                        "data in free blocks"}


# -- measuring --------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, registry: Registry) -> None:
        self.work, self.registry = work, registry
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {}

    def env(self, role: str) -> dict:
        return os.environ | {"VMSYNTH_HOME": str(self.work / "homes" / role)}

    def helper(self, role: str, *args: object) -> dict:
        """A command that is part of the set-up, not measured."""
        proc = run(VMSYNTH, *args, "--json", env=self.env(role))
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def measure(self, label: str, role: str, *args: object) -> dict:
        mark = self.registry.mark()
        log(f"{label}: vmsynth {' '.join(map(str, args))}")
        r, out = measure_once([str(VMSYNTH), *map(str, args), "--json"], self.logs, label,
                              self.env(role), self.work)
        if r.rc != 0:
            err = (self.logs / f"{label}.stderr").read_text(errors="replace")
            raise BenchError(f"{label} failed ({r.rc}): {err.strip()[-1500:]}")
        report = json.loads(out) if out.strip() else {}
        row = {"command": f"vmsynth {' '.join(map(str, args))}", "wall_s": r.wall,
               "cpu_s": r.cpu_s, "peak_rss_mib": r.rss_mib, "load1": r.load1,
               "registry": self.registry.served_since(mark), "report": report}
        self.rows[label] = row
        log(f"  {r.wall:.1f} s, registry answered {row['registry']['response_bytes']:,} bytes "
            f"in {row['registry']['requests']} requests")
        return report


def benchmark(work: Path, wl: dict) -> dict:
    homes = work / "homes"
    shutil.rmtree(homes, ignore_errors=True)
    name = wl["name"]
    registry = Registry(work)
    try:
        b = Bench(work, registry)
        boot = ["--kernel", wl["kernel"], "--initrd", wl["initrd"], "--append", wl["append"],
                "--ram", wl["ram"], "--ready", wl["ready"]]
        b.helper("publisher", "base", "add", wl["v1"], "--name", name, "--version", "1", *boot)
        overlay = work / "app.vmo"
        b.measure("create", "publisher", "create", "--base", f"{name}@1", "--disk", wl["app"],
                  "-o", overlay)
        repo, app = registry.ref(f"bases/{name}"), registry.ref("apps/app:1")
        b.measure("push_base_v1", "publisher", "base", "push", f"{name}@1", repo, "--plain-http")
        b.measure("push_base_v1_again", "publisher", "base", "push", f"{name}@1", repo,
                  "--plain-http")
        b.measure("push_overlay", "publisher", "push", overlay, app, "--plain-http")
        b.measure("push_overlay_again", "publisher", "push", overlay, app, "--plain-http")
        b.measure("pull_base_v1", "site", "base", "pull", f"{repo}:1", "--plain-http")
        pulled = work / "app-pulled.vmo"
        pulled.unlink(missing_ok=True)
        b.measure("pull_overlay", "site", "pull", app, "-o", pulled, "--plain-http")
        if pulled.read_bytes() != overlay.read_bytes():
            raise BenchError("the pulled overlay differs from the pushed one")
        synth = work / "synth.qcow2"
        synth.unlink(missing_ok=True)
        b.measure("apply_from_registry", "site", "apply", app, "--base", f"{name}@1", "-o",
                  synth, "--plain-http")
        run("qemu-img", "compare", wl["app"], synth)
        synth.unlink()
        b.helper("publisher", "base", "add", wl["v2"], "--name", name, "--version", "2", *boot)
        b.measure("push_base_v2", "publisher", "base", "push", f"{name}@2", repo,
                  "--plain-http")
        b.measure("sync_v2_by_delta", "site", "base", "sync", repo, "--keep", "1",
                  "--plain-http")
        b.measure("pull_v2_in_full", "site2", "base", "pull", f"{repo}:2", "--no-delta",
                  "--plain-http")
        for role in ("site", "site2"):
            [entry] = json.loads(run(VMSYNTH, "base", "list", "--json",
                                     env=b.env(role)).stdout)
            run("qemu-img", "compare", wl["v2"], entry["path"])
        return b.rows
    finally:
        registry.stop()


# -- the report -------------------------------------------------------------------------------

def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n / 1024:,.1f} KiB"


def at(n: float, mbit: int) -> str:
    s = n * 8 / (mbit * 1e6)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def report(results: dict) -> str:
    rows, wl = results["rows"], results["workload"]
    name = wl["name"]
    v1_layers = rows["push_base_v1"]["report"]["layers"]
    delta = rows["push_base_v2"]["report"]["delta"]
    sync = rows["sync_v2_by_delta"]
    full = rows["pull_v2_in_full"]
    lines = [
        "# Registry: bases and overlays through an OCI registry", "",
        f"Workload: {wl['describe']}. Registry: Debian's docker-registry (CNCF distribution "
        "2.8.2) on 127.0.0.1, plain HTTP, storage on the same disk; every command its own "
        f"process; one run each. Machine: {results['machine']['cores']} cores, "
        f"{results['machine']['cpu']}; load average {results['load'][0]:.1f} before, "
        f"{results['load'][1]:.1f} after. Date: {results['date']}; vmsynth at "
        f"`{results['commit']}`. `bench/registry_bench.py"
        + (" --fixture" if results["fixture"] else "") + "`.", "",
        f"Layers of {name}@1 as pushed (zstd level 3): " +
        ", ".join(f"{layer['file']} {mib(layer['size'])}" for layer in v1_layers) + ".", "",
        ("| step | wall s | CPU s | peak RSS MiB | sent by vmsynth | answered by the registry "
        "| at 50 / 100 / 1000 Mbit/s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for label, what in (
            ("create", f"create the app's overlay on {name}@1 (for reference)"),
            ("push_base_v1", f"base push {name}@1"),
            ("push_base_v1_again", f"base push {name}@1 again"),
            ("push_overlay", "push the app's overlay"),
            ("push_overlay_again", "push it again"),
            ("pull_base_v1", f"base pull {name}:1 (in full)"),
            ("pull_overlay", "pull the overlay to a file"),
            ("apply_from_registry", "apply oci://... (rebuilt as it arrives)"),
            ("push_base_v2", f"base push {name}@2 (+ the delta from @1)"),
            ("sync_v2_by_delta", "base sync --keep 1 (site with @1: by delta)"),
            ("pull_v2_in_full", f"base pull {name}:2 --no-delta (the full re-pull)")):
        r = rows[label]
        rep = r["report"]
        sent = rep.get("bytes_sent")
        served = r["registry"]["response_bytes"] if label != "create" else None
        moved = sent if label.startswith("push") else served
        lines.append(
            f"| {what} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{mib(sent) if sent is not None else '-'} | "
            f"{mib(served) + ' (' + str(r['registry']['requests']) + ' requests)' if served is not None else '-'} | "
            f"{' / '.join(at(moved, m) for m in RATES_MBIT) if moved else '-'} |")
    saved = full["registry"]["response_bytes"] / max(1, sync["registry"]["response_bytes"])
    lines += [
        "",
        (f"- **The delta**: {name}@2 published as an overlay on @1 is {mib(delta['size'])} "
        f"(made in the push above). A site holding @1 synced to @2 receiving "
        f"{mib(sync['registry']['response_bytes'])} from the registry, against "
        f"{mib(full['registry']['response_bytes'])} for the full re-pull: {saved:.1f}x less. "
        f"It took {sync['wall_s']:.1f} s (rebuilding @2 with `apply --flatten`, then the "
        f"identity scan) against {full['wall_s']:.1f} s."),
        ("- Pushing again sends nothing: the blobs are found (HEAD), the tag already names "
        "the same manifest; the registry saw "
        f"{rows['push_base_v1_again']['registry']['writes']} and "
        f"{rows['push_overlay_again']['registry']['writes']} write requests."),
        ("- *Sent by vmsynth*: request bodies (blobs, manifests) as vmsynth counts them. "
        "*Answered by the registry*: response bodies summed from the registry's own access "
        "log. The rates are those bytes' time on a link of that speed, not measured."),
        ("- Every rebuilt image is checked: the pulled overlay is byte-identical, the applied "
        f"disk and both sites' {name}@2 are `qemu-img compare`d with the originals, and "
        "every base is added only after its identity (SHA-256 of its virtual contents) "
        "matched."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--fixture", action="store_true",
                        help="the tiny fixture guest instead of the Debian pair")
    args = parser.parse_args()
    exit_on(signal.SIGTERM, signal.SIGHUP)
    work = (args.workdir / ("fixture" if args.fixture else "debian")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not VMSYNTH.exists():
        raise BenchError(f"missing {VMSYNTH}: make the venv first (make setup)")
    started = time.monotonic()
    wl = fixture_workload(work) if args.fixture else debian_workload(work)
    load_before = os.getloadavg()[0]
    rows = benchmark(work, wl)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    results = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": commit,
               "fixture": args.fixture, "machine": machine(),
               "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "workload": wl, "rows": rows,
               "seconds": round(time.monotonic() - started, 1)}
    # A --fixture run is a check, not the benchmark: its outputs stay in the work directory.
    out = work if args.fixture else SCRIPT.parent
    (out / "results-registry.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "REGISTRY.md").write_text(report(results))
    log(f"wrote {out / 'REGISTRY.md'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, debian_guest.GuestError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
