"""vmsynth decide."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import click
from click.core import ParameterSource

from vmsynth import decision
from vmsynth.decision import Device, Site, Situation, Workload

from . import console
from .options import json_option


class Number(click.FloatRange):
    """A float in range that is also finite (click's FloatRange lets "nan" through)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


AT_LEAST_0 = Number(min=0)
POSITIVE = Number(min=0, min_open=True)

FRAMEWORK = ("latency_ms", "data_gb", "sensitive", "offline")
RUNTIME = ("rtt_ms", "bandwidth_mbps", "free_slots", "overlay_size", "cloud_rtt_ms",
           "cloud_bandwidth_mbps", "session_min", "rate", "server_ms", "local_ms",
           "cpu_budget", "battery")


@click.command("decide", epilog="""\b
Examples:
  vmsynth decide --latency-ms 15 --data-gb 0.5 --sensitive
  vmsynth decide --latency-ms 200 --data-gb 0.1 --json
  vmsynth decide --rtt-ms 4 --cloud-rtt-ms 90 --overlay-size 150M --battery 30
  vmsynth decide --rtt-ms 40 --bandwidth-mbps 10 --cloud-rtt-ms 60 --local-ms 30 --json

\b
Exit codes: 0 answered (the answer is in the output, not the code), 2 usage
error (a missing, negative or non-numeric value; options of both kinds).""")
@click.option("--latency-ms", type=AT_LEAST_0, metavar="MS",
              help="Deployment: the response time the application needs.")
@click.option("--data-gb", type=AT_LEAST_0, metavar="GB",
              help="Deployment: the data it produces per day.")
@click.option("--sensitive", is_flag=True, help="Deployment: the data must stay local.")
@click.option("--offline", is_flag=True,
              help="Deployment: the Internet may be unavailable.")
@click.option("--rtt-ms", type=AT_LEAST_0, metavar="MS",
              help="Session: measured round trip to the cloudlet.")
@click.option("--bandwidth-mbps", type=POSITIVE, default=decision.CLOUDLET_MBPS,
              show_default=True, metavar="MBPS", help="Session: bandwidth to the cloudlet.")
@click.option("--free-slots", type=click.IntRange(0), default=1, show_default=True, metavar="N",
              help="Session: the cloudlet's free slots.")
@click.option("--overlay-size", type=console.SizeParam(), default="150M", show_default=True,
              metavar="SIZE", help="Session: the overlay to send (as `inspect` shows it).")
@click.option("--cloud-rtt-ms", type=AT_LEAST_0, metavar="MS",
              help="Session: round trip to a cloud running `vmsynth serve` (none if absent).")
@click.option("--cloud-bandwidth-mbps", type=POSITIVE, default=decision.CLOUD_MBPS,
              show_default=True, metavar="MBPS", help="Session: bandwidth to the cloud.")
@click.option("--session-min", type=AT_LEAST_0, default=60.0, show_default=True,
              metavar="MIN", help="Session: how long it is expected to last.")
@click.option("--rate", type=AT_LEAST_0, default=1.0, show_default=True, metavar="HZ",
              help="Session: interactions (answers awaited) per second.")
@click.option("--server-ms", type=AT_LEAST_0, default=0.0, show_default=True, metavar="MS",
              help="Session: compute per interaction on a cloudlet or cloud server.")
@click.option("--local-ms", type=AT_LEAST_0, metavar="MS",
              help="Session: compute per interaction on this device at full CPU (local is "
                   "only the last resort without it).")
@click.option("--cpu-budget", type=Number(min=0, max=1, min_open=True), default=1.0,
              show_default=True, metavar="SHARE",
              help="Session: the share of the device's CPU the app may use.")
@click.option("--battery", type=Number(min=0, max=100), metavar="PERCENT",
              help="Session: the battery's charge (absent: on mains power).")
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **opts: Any) -> None:
    """Decide where an application runs: cloudlet, cloud or local.

    \b
    Deployment (--latency-ms, --data-gb, --sensitive, --offline): the
    chapter's scorer. Cloudlet +3 if the latency needed is under 50 ms, else
    +1 under 100 ms, else cloud +1; cloudlet +2 over 10 GB/day, else cloud +1;
    cloudlet +2 for sensitive data; cloudlet +3 offline. A cloudlet must score
    strictly higher: a tie goes to the cloud.

    \b
    Session (--rtt-ms, --cloud-rtt-ms, ...): the runtime model `offload
    --cloudlet auto` uses. Each tier's cost is the time the user waits
    (overlay transfer and synthesis, then round trip + server compute per
    interaction; local: compute at the CPU budget) plus the device's energy,
    priced higher as the battery empties. The cheapest tier that can serve
    wins; the output gives every tier's estimate and the round trip above
    which the cloudlet loses.
    """
    given = {name for name in (*FRAMEWORK, *RUNTIME)
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    framework, runtime = given & set(FRAMEWORK), given & set(RUNTIME)
    if framework and runtime:
        raise click.UsageError(
            f"{_flags(framework)} and {_flags(runtime)} do not mix: give the deployment "
            "options or the session options")
    if runtime:
        if opts["rtt_ms"] is None and opts["cloud_rtt_ms"] is None:
            raise click.UsageError("give --rtt-ms (the cloudlet), --cloud-rtt-ms (the cloud) "
                                   "or both")
        _runtime(opts, as_json)
        return
    missing = [name for name in ("latency_ms", "data_gb") if opts[name] is None]
    if missing:
        raise click.UsageError(f"missing {_flags(missing)} (or give the session options: "
                               "--rtt-ms ...)")
    _framework(opts, as_json)


def _flags(names: Any) -> str:
    return ", ".join(sorted("--" + n.replace("_", "-") for n in names))


def _framework(opts: dict[str, Any], as_json: bool) -> None:
    v = decision.score(opts["latency_ms"], opts["data_gb"], opts["sensitive"], opts["offline"])
    if as_json:
        console.emit_json({
            "ok": True, "model": "framework", "choice": v.choice,
            "scores": {"cloudlet": v.cloudlet, "cloud": v.cloud},
            "reasons": [asdict(r) for r in v.reasons], "summary": v.summary, "note": v.note,
            "inputs": {k: opts[k] for k in FRAMEWORK}})
        return
    console.out.print(f"{v.choice} ({v.summary})")
    for r in v.reasons:
        points = f"{r.tier} +{r.points}" if r.tier else "-"
        console.out.print(f"  {points:<12} {r.factor}: {r.why}")
    if v.note:
        console.out.print(f"note: {v.note}")


def _situation(opts: dict[str, Any]) -> Situation:
    battery = opts["battery"]
    workload = Workload(opts["overlay_size"], opts["session_min"] * 60, opts["rate"],
                        opts["server_ms"], opts["local_ms"])
    cloudlets = () if opts["rtt_ms"] is None else (
        Site("cloudlet", opts["rtt_ms"], opts["bandwidth_mbps"], opts["free_slots"]),)
    cloud = None if opts["cloud_rtt_ms"] is None else Site(
        "cloud", opts["cloud_rtt_ms"], opts["cloud_bandwidth_mbps"])
    return Situation(workload, Device(opts["cpu_budget"],
                                      None if battery is None else battery / 100),
                     cloudlets, cloud)


def _finite(x: float) -> float | None:
    """JSON has no infinity: an estimate that does not exist is null."""
    return round(x, 3) if math.isfinite(x) else None


def _runtime(opts: dict[str, Any], as_json: bool) -> None:
    situation = _situation(opts)
    d = decision.decide_runtime(situation)
    threshold = decision.rtt_threshold(situation, "cloudlet") if situation.cloudlets else None
    if as_json:
        console.emit_json({
            "ok": True, "model": "runtime", "choice": d.choice, "name": d.name,
            "reason": d.reason, "energy_price_s_per_j": round(d.energy_price, 4),
            "estimates": [e.to_json() for e in d.estimates],
            "threshold": None if threshold is None else {
                "against": threshold.against, "equal_ms": _finite(threshold.equal_ms),
                "leave_ms": _finite(threshold.leave_ms),
                "enter_ms": _finite(threshold.enter_ms)},
            "inputs": {k: opts[k] for k in RUNTIME}})
        return
    # the reason names the chosen tier first, except for the last resort
    console.out.print(d.reason if d.reason.startswith(d.choice) else f"{d.choice}: {d.reason}")
    console.out.print(f"  {'tier':<9} {'usable in':>10} {'per answer':>11} {'waiting':>9} "
                      f"{'energy':>8} {'cost':>8}")
    for e in d.estimates:
        if e.unavailable:
            console.out.print(f"  {e.tier:<9} {e.unavailable}")
            continue
        short = "  (the battery would run out)" if e.battery_short else ""
        console.out.print(f"  {e.tier:<9} {e.ready_s:>8.1f} s {e.response_ms:>8.1f} ms "
                          f"{e.wait_s:>7.0f} s {e.energy_j:>6.0f} J {e.cost_s:>6.0f} s{short}")
    if threshold is not None and math.isfinite(threshold.equal_ms):
        if threshold.equal_ms > 0:
            console.out.print(f"the cloudlet is chosen up to a round trip of "
                              f"{threshold.equal_ms:.1f} ms; above it, {threshold.against}")
        else:
            console.out.print(f"the cloudlet loses to {threshold.against} at any round trip")
