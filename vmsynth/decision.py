"""Where to run: the chapter's deployment scorer, a per-session runtime model, and fallbacks.

Pure functions and small dataclasses, no I/O: `vmsynth decide` prints them, and
`vmsynth offload --cloudlet auto` feeds them what discovery measured.

- `score()`: at design time, cloudlet or cloud for an application (the seed chapter's
  Exercise 2 scorer, exactly as docs/CLOUDLET.md states its rules).
- `decide_runtime()` and `Decider`: at session time, local, which cloudlet, or cloud, with the
  estimated time and device energy of each; `Decider` smooths the RTTs and adds hysteresis so
  noisy measurements do not flip the answer. `rtt_threshold()` gives the RTT at which a
  cloudlet stops being the answer.
- `fallback()`: no cloudlet can serve; which tier comes next, and the exit code.

"The chapter" is shared/seed/cloudlets-chapter.txt; section numbers are its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

from vmsynth.errors import ExitCode, NoCloudletError

# ---------------------------------------------------------------- the deployment scorer

# Exercise 2's rules (docs/CLOUDLET.md): the thresholds are strict comparisons.
LATENCY_MUST_MS = 50.0  # latency < 50 ms: "must be local", cloudlet +3
LATENCY_HELPS_MS = 100.0  # else < 100 ms: "helps but not required", cloudlet +1; else cloud +1
DATA_GB_PER_DAY = 10.0  # data > 10 GB/day: cloudlet +2; else cloud +1


@dataclass(frozen=True)
class Reason:
    """One criterion's points: `tier` gets `points` (None and 0 when nobody does)."""

    factor: str
    tier: str | None
    points: int
    why: str


@dataclass(frozen=True)
class Verdict:
    """The scorer's answer: `choice` is "cloudlet" or "cloud"."""

    choice: str
    cloudlet: int
    cloud: int
    reasons: tuple[Reason, ...]
    summary: str
    note: str | None = None  # where the chapter's decision tree answers otherwise


def _check(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


def score(latency_ms: float, data_gb: float, sensitive: bool = False,
          offline: bool = False) -> Verdict:
    """Score cloudlet against cloud for an application.

    latency_ms: the response time the application needs; data_gb: the data it produces per
    day; sensitive: the data must not cross the Internet; offline: connectivity to the
    Internet is not guaranteed. A cloudlet wins only with a strictly higher score: ties go
    to the cloud. Raises ValueError for a negative or non-finite number.
    """
    _check("latency_ms", latency_ms)
    _check("data_gb", data_gb)
    reasons = []
    if latency_ms < LATENCY_MUST_MS:
        reasons.append(Reason("latency", "cloudlet", 3, f"{latency_ms:g} ms is under "
                              f"{LATENCY_MUST_MS:g} ms: only a nearby cloudlet answers in time"))
    elif latency_ms < LATENCY_HELPS_MS:
        reasons.append(Reason("latency", "cloudlet", 1, f"{latency_ms:g} ms is under "
                              f"{LATENCY_HELPS_MS:g} ms but not {LATENCY_MUST_MS:g} ms: "
                              "a cloudlet helps, the cloud may do"))
    else:
        reasons.append(Reason("latency", "cloud", 1, f"{latency_ms:g} ms is not under "
                              f"{LATENCY_HELPS_MS:g} ms: the cloud's latency is acceptable"))
    if data_gb > DATA_GB_PER_DAY:
        reasons.append(Reason("data", "cloudlet", 2, f"{data_gb:g} GB/day is over "
                              f"{DATA_GB_PER_DAY:g} GB/day: process it where it is made"))
    else:
        reasons.append(Reason("data", "cloud", 1, f"{data_gb:g} GB/day is not over "
                              f"{DATA_GB_PER_DAY:g} GB/day: sending it is cheap"))
    reasons.append(Reason("sensitive", "cloudlet", 2, "sensitive data stays on the local "
                          "network (privacy, compliance)") if sensitive else
                   Reason("sensitive", None, 0, "not sensitive: no points"))
    reasons.append(Reason("offline", "cloudlet", 3, "the Internet may be unavailable: only a "
                          "local cloudlet keeps working") if offline else
                   Reason("offline", None, 0, "connectivity is reliable: no points"))
    cl = sum(r.points for r in reasons if r.tier == "cloudlet")
    co = sum(r.points for r in reasons if r.tier == "cloud")
    choice = "cloudlet" if cl > co else "cloud"
    if cl > co:
        summary = f"cloudlet {cl} > cloud {co}: cloudlet"
    elif cl == co:
        summary = f"cloudlet {cl} = cloud {co}: a tie goes to the cloud"
    else:
        summary = f"cloudlet {cl} < cloud {co}: cloud"
    # The chapter's decision tree (37.5.2) sends any one of low latency, sensitive data,
    # unreliable connectivity or high volume to a cloudlet. It disagrees with the scorer in
    # one case only, sensitive data alone, which the scorer ties 2-2. `decide` follows the
    # scorer (the chapter's executable rule) and says so.
    tree = latency_ms < LATENCY_MUST_MS or sensitive or offline or data_gb > DATA_GB_PER_DAY
    note = None
    if tree and choice == "cloud":
        note = ("the chapter's decision tree would pick a cloudlet for sensitive data alone; "
                "the scorer, followed here, gives the tie to the cloud")
    return Verdict(choice, cl, co, tuple(reasons), summary, note)


# ---------------------------------------------------------------- the runtime model

# Time (the chapter, 37.5.3, and this project's own measurements).
NEGOTIATE_S = 3.0  # step 2 "Negotiation (2-5 seconds)", 3 s in its end-to-end timeline
# From the overlay's last byte to a running VM. vmsynth rebuilds while the bytes arrive and
# resumes a memory snapshot: README "Performance" measures 1.2-2.0 s. The chapter's 30-60 s
# synthesis (step 4) is for one that starts after the transfer: pass it as synthesis_s then.
SYNTHESIS_S = 2.0
CLOUDLET_MBPS = 50.0  # step 3: "150 MB @ 50 Mbps Wi-Fi"
CLOUD_MBPS = 10.0  # the WAN of "106 minutes for full VM transfer over 10 Mbps" (Exercise 1's LTE)

# Energy on the device (watts). The baseline (display, CPU idle) is paid whichever tier runs
# the app, so it is left out of every estimate; only the difference between tiers counts.
LOCAL_W = 4.0  # Exercise 3: processing locally, "GPU + CPU"
# Exercise 3: offloaded, "Wi-Fi only". Charged while an answer is awaited (RTT + server
# compute), as MAUI charges the radio for the time it is busy; an idle radio is left out (the
# chapter gives no figure for it, and the device keeps its Wi-Fi on anyway). So an offloaded
# interaction costs less than a local one while it takes under 8x the local compute time:
# the chapter's "Battery savings: 8x vs local processing" (37.5.4).
RADIO_W = 0.5
# Sending the overlay flat out, derived from 37.6.1 (its worked lines are cut in the seed):
# offloading AR to a cloudlet, 11.1 Wh last 266 (minutes: only minutes fit its "nearly 4x"
# over local's 11.1 Wh / (8 + 1.5) W = 70 min), i.e. 2.5 W, of which 1.5 W is its baseline:
# the Wi-Fi radio streaming takes 1.0 W.
TRANSFER_W = 1.0
BASELINE_W = 1.5  # 37.6.1: "display + radios + CPU baseline"
BATTERY_WH = 11.1  # 37.6.1: "3,000 mAh @ 3.7V = 11.1 Wh"
MIN_CHARGE = 0.05  # the energy price stops growing below 5 % (bounded, for a nearly dead battery)

# Hysteresis.
SRTT_GAIN = 1 / 8  # TCP's smoothed RTT (RFC 6298): srtt += (rtt - srtt) / 8
MARGIN = 0.10  # leave the current answer only to save 10 % of its waiting


@dataclass(frozen=True)
class Site:
    """A cloudlet (confirmed by discovery) or a cloud endpoint, as measured now."""

    name: str
    rtt_ms: float
    bandwidth_mbps: float = CLOUDLET_MBPS
    free_slots: int = 1
    has_base: bool = True
    # True: a `vmsynth serve` that synthesizes the VM from the overlay (negotiation, transfer
    # and synthesis first); False: an always-on service, usable at once.
    synthesizes: bool = True
    negotiate_s: float = NEGOTIATE_S
    synthesis_s: float = SYNTHESIS_S
    radio_w: float = RADIO_W  # while awaiting answers (more over a cellular link)


@dataclass(frozen=True)
class Workload:
    """The session: its overlay, how long it lasts, how it uses the network and the CPU."""

    overlay_bytes: int
    session_s: float = 3600.0  # expected (remaining) session: 37.5.4 museum visit, 1-2 hours
    rate_hz: float = 1.0  # interactions (requests answered) per second
    server_ms: float = 0.0  # compute per interaction on a cloudlet or cloud server
    # compute per interaction on the device at its full CPU; None: not measured, and local is
    # then only the degraded last resort (the chapter's fallback tier 2), not estimated
    local_ms: float | None = None


@dataclass(frozen=True)
class Device:
    cpu_budget: float = 1.0  # the share of the device's CPU the app may use, (0, 1]
    battery: float | None = None  # state of charge in [0, 1]; None: on mains power
    battery_wh: float = BATTERY_WH


@dataclass(frozen=True)
class Situation:
    workload: Workload
    device: Device = Device()
    cloudlets: tuple[Site, ...] = ()
    cloud: Site | None = None  # None: no cloud endpoint (or no Internet)
    running: str | None = None  # the key of the tier this session already runs on: its
    # setup is spent (keys: "local", "cloud", "cloudlet:NAME")


@dataclass(frozen=True)
class Estimate:
    """One tier's estimated cost for the session."""

    tier: str  # local, cloudlet or cloud
    name: str | None  # the cloudlet's or cloud's name
    ready_s: float  # until the app is usable (negotiation, transfer, synthesis)
    response_ms: float  # per interaction: RTT + server compute, or local compute
    wait_s: float  # ready_s + interactions x response: the time the user waits
    energy_j: float  # on the device, beyond its baseline
    cost_s: float  # wait_s + energy_j x the energy price: what the choice minimizes
    unavailable: str | None = None  # why this tier cannot serve at all
    battery_short: bool = False  # the battery would run out before the session ends

    @property
    def key(self) -> str:
        return self.tier if self.tier != "cloudlet" else f"cloudlet:{self.name}"

    @property
    def label(self) -> str:
        return self.tier if self.name in (None, self.tier) else f"{self.tier} {self.name}"

    def to_json(self) -> dict[str, object]:
        """JSON has no infinity: an estimate that does not exist is null."""
        def finite(x: float) -> float | None:
            return round(x, 3) if math.isfinite(x) else None

        return {"tier": self.tier, "name": self.name, "ready_s": finite(self.ready_s),
                "response_ms": finite(self.response_ms), "wait_s": finite(self.wait_s),
                "energy_j": finite(self.energy_j), "cost_s": finite(self.cost_s),
                "unavailable": self.unavailable, "battery_short": self.battery_short}


@dataclass(frozen=True)
class RuntimeDecision:
    choice: str  # local, cloudlet or cloud
    name: str | None  # which cloudlet (or cloud endpoint)
    reason: str
    estimates: tuple[Estimate, ...]
    energy_price: float  # seconds of waiting one joule is worth now

    @property
    def key(self) -> str:
        return self.choice if self.choice != "cloudlet" else f"cloudlet:{self.name}"

    def estimate(self, key: str) -> Estimate | None:
        return next((e for e in self.estimates if e.key == key), None)


def transfer_s(overlay_bytes: float, mbps: float) -> float:
    """Seconds to send an overlay: bytes x 8 / Mbit/s (Exercise 1: 150 MB at 50 Mbps, 24 s)."""
    return overlay_bytes * 8 / (mbps * 1e6)


def energy_price(device: Device) -> float:
    """Seconds of waiting one joule is worth: 0 on mains power; on battery, the time the
    device's baseline (1.5 W) runs on a joule, divided by the charge left: a joule is dearer
    as the battery empties. The chapter's reason: processing locally drains a battery 4-8x
    faster (37.6.1), so a low battery should push the app off the device."""
    if device.battery is None:
        return 0.0
    return 1 / (BASELINE_W * max(device.battery, MIN_CHARGE))


def _validate(s: Situation) -> None:
    w, d = s.workload, s.device
    for name, value in (("overlay_bytes", w.overlay_bytes), ("session_s", w.session_s),
                        ("rate_hz", w.rate_hz), ("server_ms", w.server_ms),
                        ("battery_wh", d.battery_wh)):
        _check(name, value)
    if w.local_ms is not None:
        _check("local_ms", w.local_ms)
    if not 0 < d.cpu_budget <= 1:
        raise ValueError(f"cpu_budget must be in (0, 1], not {d.cpu_budget!r}")
    if d.battery is not None and not 0 <= d.battery <= 1:
        raise ValueError(f"battery must be in [0, 1], not {d.battery!r}")
    names = [c.name for c in s.cloudlets]
    if len(set(names)) != len(names):
        raise ValueError(f"cloudlet names must be unique: {names}")
    for site in (*s.cloudlets, *([s.cloud] if s.cloud else [])):
        for name, value in (("rtt_ms", site.rtt_ms), ("negotiate_s", site.negotiate_s),
                            ("synthesis_s", site.synthesis_s), ("radio_w", site.radio_w)):
            _check(f"{site.name}: {name}", value)
        if not site.bandwidth_mbps > 0 or not math.isfinite(site.bandwidth_mbps):
            raise ValueError(f"{site.name}: bandwidth_mbps must be > 0")


def _site(s: Situation, site: Site, tier: str, price: float) -> Estimate:
    w = s.workload
    n = w.rate_hz * w.session_s
    key = tier if tier == "cloud" else f"cloudlet:{site.name}"
    running = s.running == key
    sending = transfer_s(w.overlay_bytes, site.bandwidth_mbps) \
        if site.synthesizes and not running else 0.0
    ready = site.negotiate_s + sending + site.synthesis_s \
        if site.synthesizes and not running else 0.0
    response = site.rtt_ms + w.server_ms
    wait = ready + n * response / 1000
    energy = sending * TRANSFER_W + n * response / 1000 * site.radio_w
    why = None
    if not site.has_base:
        why = "does not have the overlay's base"
    elif site.free_slots <= 0 and not running:
        why = "is full (no free slot)"
    return Estimate(tier, site.name, ready, response, wait, energy, wait + price * energy, why)


def _local(s: Situation, price: float) -> Estimate:
    w, d = s.workload, s.device
    if w.local_ms is None:
        return Estimate("local", None, 0.0, math.inf, math.inf, math.inf, math.inf,
                        "not estimated: the app's local compute per interaction is unknown")
    n = w.rate_hz * w.session_s
    response = w.local_ms / d.cpu_budget
    # A smaller CPU budget stretches each interaction but draws proportionally less power:
    # the energy per interaction is the same.
    energy = n * w.local_ms / 1000 * LOCAL_W
    wait = n * response / 1000
    return Estimate("local", None, 0.0, response, wait, energy, wait + price * energy)


def estimates(s: Situation) -> tuple[Estimate, ...]:
    """Every tier's estimate: local, each cloudlet, the cloud (if any)."""
    _validate(s)
    price = energy_price(s.device)
    out = [_local(s, price), *(_site(s, c, "cloudlet", price) for c in s.cloudlets)]
    if s.cloud is not None:
        out.append(_site(s, s.cloud, "cloud", price))
    if s.device.battery is not None:
        left = s.device.battery * s.device.battery_wh * 3600
        out = [replace(e, battery_short=e.unavailable is None and e.energy_j > left)
               for e in out]
    return tuple(out)


def _order(e: Estimate, running: str | None) -> tuple[float, int, float]:
    """Cheapest first; on a tie the tier already running, then the chapter's tier order
    (cloudlet, degraded local, cloud; 37.7), nearest cloudlet first."""
    rank = {"cloudlet": 1, "local": 2, "cloud": 3}[e.tier]
    return (e.cost_s, 0 if e.key == running else rank,
            e.response_ms if e.tier == "cloudlet" else 0.0)


def _candidates(ests: tuple[Estimate, ...]) -> list[Estimate]:
    """The tiers the choice is made among: those that can serve, and of them those the
    battery lasts for (unless it lasts for none)."""
    able = [e for e in ests if e.unavailable is None and math.isfinite(e.cost_s)]
    lasting = [e for e in able if not e.battery_short]
    return lasting or able


def ranked(s: Situation) -> list[Estimate]:
    """The tiers that can serve this session, best first: the order to try them in when the
    first fails (`decide_runtime` takes the first)."""
    return sorted(_candidates(estimates(s)), key=lambda e: _order(e, s.running))


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def _explain(best: Estimate, runner: Estimate | None, s: Situation, price: float) -> str:
    n = s.workload.rate_hz * s.workload.session_s
    text = (f"{best.label}: usable in {_secs(best.ready_s)}, {best.response_ms:.0f} ms per "
            f"answer; over {n:.0f} interactions {_secs(best.wait_s)} of waiting and "
            f"{best.energy_j:.0f} J")
    if runner is not None:
        text += (f", against {runner.label}'s {_secs(runner.wait_s)} and "
                 f"{runner.energy_j:.0f} J")
    if price:
        text += f" (a joule is worth {price:.2f} s at {s.device.battery:.0%} charge)"
    else:
        text += " (on mains power: energy not counted)"
    if best.battery_short:
        text += "; the battery lasts for no tier: the cheapest is taken"
    return text


def decide_runtime(s: Situation) -> RuntimeDecision:
    """Local, which cloudlet, or cloud for this session, from the current measurements.

    Each tier's cost is the time the user waits over the session (setup, then RTT + server
    compute per interaction; local: compute at the CPU budget) plus its device energy priced
    by `energy_price`. The cheapest tier among those that can serve wins. With none (no
    cloudlet can serve, no cloud, no local estimate) the answer is degraded local mode.
    Raises ValueError for impossible inputs.
    """
    ests = estimates(s)
    price = energy_price(s.device)
    order = sorted(_candidates(ests), key=lambda e: _order(e, s.running))
    if not order:
        why = "; ".join(f"{e.label} {e.unavailable}" for e in ests if e.tier != "local")
        return RuntimeDecision("local", None, "no cloudlet or cloud can serve" +
                               (f" ({why})" if why else "") + ": degraded local mode",
                               ests, price)
    best = order[0]
    reason = _explain(best, order[1] if len(order) > 1 else None, s, price)
    return RuntimeDecision(best.tier, best.name, reason, ests, price)


def switches(held: Estimate, other: Estimate, margin: float = MARGIN) -> bool:
    """Hysteresis: leave `held` for `other` only when that saves at least `margin` of the
    time the user waits on `held` (10 %: from a 500 s wait, 50 s). Measured against the
    waiting, not the whole cost, so that the band is the same share of the RTT whether or not
    energy counts."""
    return other.cost_s < held.cost_s - margin * held.wait_s


@dataclass(frozen=True)
class Threshold:
    """Where a cloudlet's RTT changes the answer (all other inputs held)."""

    cloudlet: str
    against: str  # the tier that takes over above the threshold
    equal_ms: float  # the two cost the same: below, the cloudlet is chosen
    leave_ms: float  # a Decider on the cloudlet leaves it once the smoothed RTT is above
    enter_ms: float  # a Decider elsewhere moves to it once the smoothed RTT is below


def rtt_threshold(s: Situation, cloudlet: str, margin: float = MARGIN) -> Threshold | None:
    """The RTT to `cloudlet` at which `decide_runtime` stops choosing it.

    None when the RTT cannot change the answer: the cloudlet cannot serve, or no other tier
    can. A threshold <= 0 means the cloudlet is not chosen at any RTT. With no interactions
    (rate 0) the RTT costs nothing and the thresholds are +-inf. For a session already on
    the cloudlet, pass `running` in the situation (its setup is then spent).
    """
    ests = estimates(s)
    mine = next((e for e in ests if e.key == f"cloudlet:{cloudlet}"), None)
    if mine is None:
        raise ValueError(f"no cloudlet named {cloudlet!r}")
    able = [e for e in ests if e.unavailable is None and math.isfinite(e.cost_s)]
    others = [e for e in able if e.key != mine.key]
    if mine not in able or not others:
        return None
    site = next(c for c in s.cloudlets if c.name == cloudlet)
    n = s.workload.rate_hz * s.workload.session_s
    r = site.rtt_ms / 1000
    # The cloudlet's cost, waiting and energy are linear in its RTT r (seconds):
    #   cost = fixed + slope * r   (waiting n * r, radio energy n * r * radio_w at its price)
    #   wait = wait0 + n * r,  energy = energy0 + n * r * radio_w
    slope = n * (1 + energy_price(s.device) * site.radio_w)
    fixed, wait0 = mine.cost_s - slope * r, mine.wait_s - n * r
    energy0 = mine.energy_j - n * r * site.radio_w

    def ms(numerator: float, denominator: float) -> float:
        if denominator == 0:
            return math.inf if numerator >= 0 else -math.inf
        return numerator / denominator * 1000

    def crossing(rivals: list[Estimate]) -> tuple[str, float, float, float]:
        other = min(rivals, key=lambda e: _order(e, s.running))
        # equal: fixed + slope r = other;  leave (switches(mine, other)): other < cost -
        # m wait;  enter (switches(other, mine)): cost < other - m other.wait
        return (other.key, ms(other.cost_s - fixed, slope),
                ms(other.cost_s - fixed + margin * wait0, slope - margin * n),
                ms(other.cost_s - margin * other.wait_s - fixed, slope))

    if s.device.battery is None:
        return Threshold(cloudlet, *crossing(others))
    # On battery, the cloudlet's radio energy grows with the RTT too: past `short` the
    # battery would not last its session. Then, if another tier lasts, it is dropped (at
    # once, also by a Decider); if none lasts, every tier competes on cost alone.
    left = s.device.battery * s.device.battery_wh * 3600
    short = ms(left - energy0, n * site.radio_w)
    lasting = [e for e in others if not e.battery_short]
    if lasting:
        against, equal, leave, enter = crossing(lasting)
        return Threshold(cloudlet, against, min(equal, short), min(leave, short),
                         min(enter, short))
    against, equal, leave, enter = crossing(others)
    return Threshold(cloudlet, against, max(equal, short), max(leave, short),
                     max(enter, short))


class Decider:
    """Runtime decisions over a session's measurements, without flapping.

    Each RTT is smoothed like TCP's SRTT, and the current answer is kept until another tier
    saves `margin` (10 %) of the current one's waiting, on the smoothed values (`switches`),
    or the current one can no longer serve (full, gone, without the base, or the battery
    would not last): then the switch is immediate.
    """

    def __init__(self, margin: float = MARGIN, gain: float = SRTT_GAIN) -> None:
        if not 0 <= margin < 1 or not 0 < gain <= 1:
            raise ValueError("margin must be in [0, 1) and gain in (0, 1]")
        self.margin, self.gain = margin, gain
        self.srtt: dict[str, float] = {}
        self.current: str | None = None

    def _smooth(self, key: str, rtt: float) -> float:
        old = self.srtt.get(key)
        self.srtt[key] = rtt if old is None else old + self.gain * (rtt - old)
        return self.srtt[key]

    def update(self, s: Situation) -> RuntimeDecision:
        """The decision for a new set of measurements (raw RTTs: this smooths them)."""
        cloudlets = tuple(replace(c, rtt_ms=self._smooth(f"cloudlet:{c.name}", c.rtt_ms))
                          for c in s.cloudlets)
        cloud = replace(s.cloud, rtt_ms=self._smooth("cloud", s.cloud.rtt_ms)) \
            if s.cloud else None
        seen = {f"cloudlet:{c.name}" for c in s.cloudlets} | ({"cloud"} if cloud else set())
        self.srtt = {k: v for k, v in self.srtt.items() if k in seen}
        fresh = decide_runtime(replace(s, cloudlets=cloudlets, cloud=cloud))
        held = fresh.estimate(self.current) if self.current else None
        best = fresh.estimate(fresh.key)
        if held is None or best is None or held.key == best.key or \
                held not in _candidates(fresh.estimates):
            self.current = fresh.key
            return fresh
        saved = held.cost_s - best.cost_s
        if switches(held, best, self.margin):
            self.current = fresh.key
            return replace(fresh, reason=fresh.reason + f" (switching from {held.label}: "
                           f"saves {_secs(saved)})")
        return RuntimeDecision(held.tier, held.name, f"staying on {held.label}: {best.label} "
                               f"would save {_secs(saved)}, under {self.margin:.0%} of the "
                               f"{_secs(held.wait_s)} of waiting here", fresh.estimates,
                               fresh.energy_price)


# ---------------------------------------------------------------- fallback tiers

class Cause(Enum):
    """Why no cloudlet can serve (the issue's four situations)."""

    NONE_FOUND = "no cloudlet answered nearby"
    NO_BASE = "no cloudlet nearby has the overlay's base"
    ALL_FULL = "every cloudlet with the overlay's base is full"
    LOST = "the cloudlet died or lost the session"


@dataclass(frozen=True)
class Fallback:
    """The next tier: "cloud" or "cloudlet" means try `target` (a --fallback endpoint
    running `vmsynth serve`); "local" means vmsynth stops with `exit_code` so that the
    application runs its degraded local mode."""

    tier: str
    target: str | None
    reason: str
    exit_code: ExitCode | None

    def error(self) -> NoCloudletError:
        """The error to exit with when the next tier is local."""
        return NoCloudletError(f"no cloudlet can serve this overlay here: {self.reason}",
                               hint="run it locally (degraded mode), or give --fallback URL")


def fallback(cause: Cause, fallbacks: tuple[str, ...] | list[str] = (),
             detail: str | None = None) -> Fallback:
    """The tier to fall to when no cloudlet can serve.

    `fallbacks` are the --fallback endpoints not tried yet, in order: "cloudlet:URL" is
    another cloudlet, "cloud:URL" or a bare URL a cloud endpoint. `detail` adds to the reason
    (the base's name, the cloudlet's address). The chapter's tiers (37.7) are cloudlet, degraded local, cloud;
    vmsynth cannot run an application's degraded mode itself, so an endpoint the user named
    is tried first, and local (exit 40, ExitCode.NO_CLOUDLET) is where vmsynth stops.
    """
    reason = cause.value + (f" ({detail})" if detail else "")
    for spec in fallbacks:
        tier, _, url = spec.partition(":")
        if tier not in ("cloud", "cloudlet"):  # a bare http(s)://... URL
            tier, url = "cloud", spec
        if url:
            return Fallback(tier, url, f"{reason}: trying the {tier} at {url} next", None)
    return Fallback("local", None, reason, ExitCode.NO_CLOUDLET)
