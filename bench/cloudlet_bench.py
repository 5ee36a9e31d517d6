#!/usr/bin/env python3
"""The cloudlet benchmark: the seed's timeline, measured on a real `vmsynth serve`.

    sudo python3 bench/cloudlet_bench.py [--workdir DIR] [--rates 50,1000] [--runs 3]
                                         [--debian] [--arrive]

Two network namespaces joined by a veth pair (bench/e2e_bench.py's): the cloudlet
(`vmsynth serve`) in one, the user's device (`vmsynth offload`) in the other; the device's
side of the link is limited with tc (tbf) to each rate in turn (the overlay goes up).

1. **The timeline**, per workload and rate, RUNS rounds: `vmsynth offload OVERLAY
   --cloudlet URL --json` (with `--arrive`: `--cloudlet auto`, so discovery by mDNS is
   timed too) until the VM runs; then, from the device's namespace, a connection to the
   VM's VNC address until its RFB greeting. Phases: discover, negotiate (one round trip
   before any overlay byte), transfer (the cloudlet's first to last overlay byte),
   synthesis after the last byte, resume, and the last byte to VNC answering; beside the
   chapter's 7 + 3 + 24 + 45 + 8 = 87 s. Ctrl-C ends each session (the cloudlet wipes it).
2. **Ten at once on three slots** (not with --arrive): ten `vmsynth offload` of the fixture
   overlay started together against `vmsynth serve --slots 3` on loopback (cgroups on);
   a client told "full" (exit 25) tries again a second later; each holds its VM for HOLD
   seconds. Time to running for each, and the service's own CPU seconds and peak memory.

Workloads: the fixture guest (fixtures/build-guest.sh, 256 MiB RAM) always; with --debian
the Debian pair of bench/debian_guest.py (1 GiB RAM, a python3 app). Both are snapshotted
with a VGA display (the cloudlet serves VNC), cached under WORKDIR.

Writes bench/results-cloudlet.json and bench/CLOUDLET.md (with --arrive:
bench/results-arrive.json and bench/ARRIVE.md). Needs root (ip netns, tc, cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python -P` (make bench) adds no dir
import disk_bench
import e2e_bench
import memory_bench
from disk_bench import BenchError, exit_on, missing_prerequisite
from e2e_bench import CLI_IF, CLI_NS, SRV_IP, SRV_NS, Network, log, one_line, parse_rates

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
VMSYNTH = REPO / ".venv" / "bin" / "vmsynth"
PYTHON = REPO / ".venv" / "bin" / "python"
DEFAULT_WORKDIR = REPO / ".build" / "bench" / "cloudlet"
PORT = 8750
MiB = 1 << 20
CHAPTER = {"discover": 7, "negotiate": 3, "transfer": 24, "synthesize": 45, "boot": 8}
HOLD = 5.0  # seconds each of the ten concurrent clients keeps its VM
CONCURRENT, SLOTS = 10, 3
RETRY = 1.0  # seconds a client told "full" waits before it asks again
STOP_TIMEOUT = 120.0
VNC_PROBE = (  # run in the device's namespace: the moment the VM's VNC server greets
    "import socket, sys, time\n"
    "host, port = sys.argv[1], int(sys.argv[2])\n"
    "with socket.create_connection((host, port), timeout=30) as c:\n"
    "    assert c.recv(12).startswith(b'RFB ')\n"
    "print(time.time())\n")


@dataclass
class Workload:
    key: str
    title: str
    overlay: Path
    home: Path  # the cloudlet's VMSYNTH_HOME, with the base
    ram: str


class VgaGuest(memory_bench.Guest):
    """memory_bench's guest, snapshotted with a VGA display: a cloudlet serves VNC."""

    def boot_args(self, ready: str, resume: bool = False) -> list[str]:
        args = super().boot_args(ready, resume)
        return [*args[:args.index("--vnc")], "--vnc", "auto", *args[args.index("--vnc") + 2:]]


def prepare(g: memory_bench.Guest, work: Path, tmp: Path) -> Workload:
    """Snapshots with VGA (cached), the base in a cache of its own, the overlay."""
    guest = VgaGuest(**{f: getattr(g, f) for f in g.__dataclass_fields__})
    gdir = work / g.name
    gdir.mkdir(parents=True, exist_ok=True)
    snaps = memory_bench.take_snapshots(guest, gdir, tmp, rebuild=False)
    sdir = gdir / "snapshots"
    home, overlay = gdir / "home", gdir / "app.vmo"
    stamp = gdir / "overlay-stamp.json"
    inputs = {"taken_at": snaps["taken_at"], "vmsynth": memory_bench.code_hash()}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == inputs and overlay.exists():
            log(f"{g.name}: reusing {overlay}")
            return Workload(g.name, g.title, overlay, home, g.memory)
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(home))
    e2e_bench.run(VMSYNTH, "base", "add", g.base, "--memory", sdir / "base.vmem", "--name",
                  f"bench-{g.name}", "--version", "1", "--kernel", g.kernel, "--initrd",
                  g.initrd, "--append", g.append, env=env, timeout=3600)
    e2e_bench.run(VMSYNTH, "create", "--base", f"bench-{g.name}@1", "--disk",
                  sdir / "app-disk.qcow2", "--memory", sdir / "app.vmem", "-o", overlay,
                  env=env, timeout=3600)
    stamp.write_text(json.dumps(inputs))
    return Workload(g.name, g.title, overlay, home, g.memory)


def read_events(proc: subprocess.Popen, until: str, timeout: float) -> list[dict]:
    """`offload --json`'s events, read until one named `until` (or the process ends)."""
    assert proc.stdout is not None
    events, buf, deadline = [], "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"offload ended ({proc.wait()}) before {until!r}: "
                             f"{proc.stderr.read()[-800:] if proc.stderr else ''}")
        buf += line
        try:
            events.append(json.loads(buf))
        except ValueError:
            continue
        buf = ""
        if events[-1].get("event") == until:
            return events
    raise BenchError(f"no {until!r} event within {timeout:.0f} s")


class Cloudlet:
    """`vmsynth serve` (in the cloudlet's namespace, or on loopback)."""

    def __init__(self, home: Path, tmp: Path, logs: Path, label: str, *args: str,
                 netns: bool = True) -> None:
        env = dict(os.environ, TMPDIR=str(tmp), VMSYNTH_HOME=str(home))
        listen = f"{SRV_IP}:{PORT}" if netns else "127.0.0.1:0"
        argv = [str(VMSYNTH), "serve", "--listen", listen, "--accel", "tcg", "--json", *args]
        if netns:  # /sys is remounted in the namespace: no cgroup filesystem there
            argv = ["ip", "netns", "exec", SRV_NS, *argv, "--open", "--no-cgroups"]
        self.err = logs / f"{label}.stderr"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env,
                                         text=True, start_new_session=True)
        event = read_events(self.proc, "serving", 600)[-1]
        self.url, self.fingerprint = event["url"], event["fingerprint"]

    def pid(self) -> int:
        """The vmsynth process itself (under `ip netns exec`, its child)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in kids.read_text().split():
                return int(pid)
        return self.proc.pid

    def usage(self) -> dict:
        pid = self.pid()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        hwm = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if ln.startswith("VmHWM:"))
        return {"cpu_s": (int(stat[11]) + int(stat[12])) / ticks, "peak_rss_mib":
                round(hwm / 1024, 1)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise BenchError("vmsynth serve did not stop after SIGTERM (killed)") from None


def one_session(w: Workload, cloudlet: Cloudlet, arrive: bool, timeout: float) -> dict:
    """One offload from the device's namespace until the VM runs, then VNC, then Ctrl-C."""
    target = ["--cloudlet", "auto"] if arrive else \
        ["--cloudlet", cloudlet.url, "--fingerprint", cloudlet.fingerprint]
    began = time.time()
    proc = subprocess.Popen(["ip", "netns", "exec", CLI_NS, str(VMSYNTH), "offload",
                             str(w.overlay), *target, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, VMSYNTH_HOME=str(w.home)),
                            start_new_session=True)
    try:
        events = read_events(proc, "running", timeout)
        running = events[-1]
        vnc = running["vnc"]
        probe = e2e_bench.run("ip", "netns", "exec", CLI_NS, PYTHON, "-c", VNC_PROBE,
                              vnc["host"], str(vnc["port"]))
        greeted = float(probe.stdout.strip())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"offload ended {proc.returncode}: {one_line(err)[-500:]}")
    timeline, at = running["timeline"], running.get("at", {})
    rec = {"timeline": timeline, "wall_to_running_s": round(at["running"] - began, 3),
           "last_byte_to_vnc_s": round(greeted - at["last_byte"], 3),
           "vnc_after_running_s": round(greeted - at["running"], 3)}
    discovered = next((e for e in events if e.get("event") == "discovered"), None)
    if discovered is not None:
        rec["discover_s"] = discovered.get("seconds")
    return rec


def timelines(workloads: list[Workload], rates: list[int], runs: int, arrive: bool,
              net: Network, tmp: Path, logs: Path) -> dict:
    out: dict = {}
    for w in workloads:
        cloudlet = Cloudlet(w.home, tmp, logs, f"serve-{w.key}")
        try:
            for mbit in rates:
                shaped = net.shape(mbit, CLI_NS, CLI_IF)
                size = w.overlay.stat().st_size
                wire = size * 8 / (mbit * 1e6 * e2e_bench.PAYLOAD_FRACTION)
                rounds = []
                for i in range(runs):
                    r = one_session(w, cloudlet, arrive, wire * 2 + 600)
                    rounds.append(r)
                    t = r["timeline"]
                    log(f"  {w.key} at {mbit} Mbit/s, round {i + 1}: transfer "
                        f"{t['transfer']:.2f} s, synthesis after the last byte "
                        f"{t['after_last_byte']:.2f} s, resume {t.get('resume', 0):.2f} s; "
                        f"last byte to VNC {r['last_byte_to_vnc_s']:.2f} s; wall "
                        f"{r['wall_to_running_s']:.2f} s")
                out.setdefault(w.key, {})[str(mbit)] = {
                    "overlay_bytes": size, "tc": shaped, "rounds": rounds,
                    "median": medians(rounds), "wire_s": round(wire, 3)}
        finally:
            cloudlet.stop()
    return out


def medians(rounds: list[dict]) -> dict:
    def med(get) -> float | None:
        vals = [v for r in rounds if (v := get(r)) is not None]
        return round(statistics.median(vals), 3) if vals else None

    keys = ("negotiate", "transfer", "after_last_byte", "resume", "boot")
    out = {k: med(lambda r, k=k: r["timeline"].get(k)) for k in keys}
    out |= {k: med(lambda r, k=k: r.get(k)) for k in
            ("discover_s", "wall_to_running_s", "last_byte_to_vnc_s", "vnc_after_running_s")}
    return out


def ten_on_three(w: Workload, tmp: Path, logs: Path) -> dict:
    """Ten clients at once on three slots, each retrying a second after "full"."""
    cloudlet = Cloudlet(w.home, tmp, logs, "serve-ten", "--slots", str(SLOTS), netns=False)
    before = cloudlet.usage()
    results: list[dict] = [{} for _ in range(CONCURRENT)]
    start = threading.Event()
    t0 = time.monotonic()

    def client(i: int) -> None:
        start.wait()
        attempts = 0
        while True:
            attempts += 1
            proc = subprocess.Popen([str(VMSYNTH), "offload", str(w.overlay), "--cloudlet",
                                     cloudlet.url, "--fingerprint", cloudlet.fingerprint,
                                     "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=dict(os.environ, VMSYNTH_HOME=str(w.home)))
            try:
                read_events(proc, "running", 600)
            except BenchError:
                proc.wait(timeout=STOP_TIMEOUT)
                if proc.returncode == 25 and time.monotonic() - t0 < 600:  # full: again
                    time.sleep(RETRY)
                    continue
                results[i] = {"error": f"exit {proc.returncode}"}
                return
            results[i] = {"running_after_s": round(time.monotonic() - t0, 3),
                          "attempts": attempts}
            time.sleep(HOLD)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=STOP_TIMEOUT)
            results[i]["exit"] = proc.returncode
            return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    after = cloudlet.usage()
    cloudlet.stop()
    failed = [r for r in results if "error" in r or r.get("exit") != 0]
    if failed:
        raise BenchError(f"ten on three: {failed}")
    times = sorted(r["running_after_s"] for r in results)
    return {"clients": CONCURRENT, "slots": SLOTS, "hold_s": HOLD, "retry_s": RETRY,
            "running_after_s": times, "attempts": [r["attempts"] for r in results],
            "service_cpu_s": round(after["cpu_s"] - before["cpu_s"], 2),
            "service_peak_rss_mib": after["peak_rss_mib"], "total_s": round(max(times), 2)}


def write_markdown(path: Path, data: dict, arrive: bool) -> None:
    m = data["meta"]
    title = "A user arrives: discover, negotiate, transfer, synthesize, resume" if arrive \
        else "The cloudlet: the seed's timeline on `vmsynth serve`"
    lines = [f"# {title}", "",
             (f"`{m['command']}`, {m['date']}, {m['git']['describe']}; "
              f"{m['machine']['cores']} cores, load {m['loadavg_before']} before. Accelerator "
              f"TCG (KVM does not work on this machine). Medians of {m['runs']} rounds; "
              "seconds."), "",
             ("| workload | link | discover | negotiate | transfer | synthesis after the last "
              "byte | resume | last byte to VNC answering | total to running | chapter |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rates in data["timelines"].items():
        for mbit, r in rates.items():
            md = r["median"]
            lines.append(
                f"| {key} ({r['overlay_bytes'] / MiB:.1f} MiB) | {mbit} Mbit/s | "
                f"{_cell(md['discover_s'])} | {_cell(md['negotiate'])} | "
                f"{_cell(md['transfer'])} | {_cell(md['after_last_byte'])} | "
                f"{_cell(md['resume'] or md['boot'])} | {_cell(md['last_byte_to_vnc_s'])} | "
                f"{_cell(md['wall_to_running_s'])} | {sum(CHAPTER.values())} |")
    lines += ["", ("The chapter's timeline (section 37.5.3): discover 7 s, negotiate 3 s, "
                   "transfer 24 s (150 MB at 50 Mbps), synthesize 45 s, boot 8 s: 87 s. "
                   "`transfer` is the cloudlet's first to last overlay byte; `total to running` "
                   "is from starting `vmsynth offload` to the cloudlet's answer that the VM "
                   "runs (same clock: the namespaces share it).")]
    if "ten_on_three" in data:
        t = data["ten_on_three"]
        lines += ["", f"## {t['clients']} sessions at once on {t['slots']} slots", "",
                  (f"Fixture overlay, `vmsynth serve --slots {t['slots']}` on loopback "
                   f"(cgroups on); a client told \"full\" (exit 25) asks again "
                   f"{t['retry_s']:g} s later; each holds its VM {t['hold_s']:g} s, then "
                   "Ctrl-C."), "",
                  "| | |", "|---|---|",
                  f"| time to running, each (s) | {', '.join(f'{x:.1f}' for x in t['running_after_s'])} |",
                  f"| attempts per client | {', '.join(map(str, t['attempts']))} |",
                  f"| the service's CPU time over the run | {t['service_cpu_s']} s |",
                  f"| the service's peak memory | {t['service_peak_rss_mib']} MiB |"]
    path.write_text("\n".join(lines) + "\n")


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--rates", type=parse_rates, default=[50, 1000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--debian", action="store_true", help="also the Debian pair")
    ap.add_argument("--arrive", action="store_true",
                    help="--cloudlet auto: discovery timed too (50 Mbit/s, the Debian pair)")
    args = ap.parse_args()
    why = missing_prerequisite("cloudlet_bench.py", "ip netns, tc, cgroups",
                               ("ip", "tc", "qemu-system-x86_64", "qemu-img"),
                               "iproute2 qemu-system-x86 qemu-utils")
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    exit_on(signal.SIGTERM, signal.SIGHUP)
    work = args.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="vmc-", dir="/tmp"))  # short: QMP socket paths
    net = Network()
    code = 0
    started = time.monotonic()
    try:
        load_before = [round(x, 2) for x in os.getloadavg()]
        git = e2e_bench.git_state()
        guests = [memory_bench.fixture_guest(work)]
        if args.debian or args.arrive:
            guests.append(memory_bench.debian_pair())
        workloads = [prepare(g, work, tmp) for g in guests]
        if args.arrive:  # the user arrives with the Debian app
            workloads = [w for w in workloads if w.key == "debian"]
        net.up()
        data: dict = {"timelines": timelines(workloads, [50] if args.arrive else args.rates,
                                             args.runs, args.arrive, net, tmp, logs)}
        problems = net.down()
        if problems:
            raise BenchError("; ".join(problems))
        if not args.arrive:
            data["ten_on_three"] = ten_on_three(workloads[0], tmp, logs)
        name = "arrive" if args.arrive else "cloudlet"
        argv = " ".join(sys.argv[1:])
        data["meta"] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                        "command": f"sudo python3 bench/cloudlet_bench.py {argv}".strip(),
                        "runs": args.runs, "loadavg_before": load_before,
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                        "machine": disk_bench.machine(), "git": git,
                        "total_s": round(time.monotonic() - started, 1)}
        (SCRIPT.parent / f"results-{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(SCRIPT.parent / f"{name.upper()}.md", data, args.arrive)
        log(f"wrote bench/results-{name}.json and bench/{name.upper()}.md")
    except BenchError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, SystemExit):
        print("error: interrupted", file=sys.stderr)
        code = 1
    except Exception as err:  # noqa: BLE001 (one error line, whatever went wrong)
        print(f"error: {type(err).__name__}: {one_line(str(err))}", file=sys.stderr)
        code = 1
    finally:
        net.down()
        for pid in memory_bench.qemu_pids(tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
