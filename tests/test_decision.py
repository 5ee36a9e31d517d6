"""vmsynth.decision and `vmsynth decide`: the chapter's scorer (its cases, scenarios,
boundaries and ties), the runtime model (monotone in RTT and bandwidth, its threshold, the
battery, hysteresis), the fallback tiers, and the command's output and errors."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsynth import decision
from vmsynth.decision import (
    Cause,
    Decider,
    Device,
    Site,
    Situation,
    Workload,
    decide_runtime,
    fallback,
    rtt_threshold,
    score,
    transfer_s,
)
from vmsynth.errors import ExitCode, NoCloudletError

MB = 1_000_000  # the chapter's megabyte (Exercise 1: MB x 8 = Mb)


# ------------------------------------------------------------------------------ the scorer

# docs/CLOUDLET.md: Exercise 2's five cases and their exact scores.
EXERCISE_2 = [
    ("AR museum tour", 15, 0.5, True, False, "cloudlet", 5, 1),
    ("video analytics", 500, 50, False, False, "cloudlet", 2, 1),
    ("emergency drone", 30, 5, True, True, "cloudlet", 8, 1),
    ("smart home", 200, 0.1, False, False, "cloud", 0, 2),
    ("factory QC", 20, 10, False, False, "cloudlet", 3, 1),
]


@pytest.mark.parametrize(("name", "latency", "data", "sensitive", "offline", "choice", "cl",
                          "co"), EXERCISE_2, ids=[c[0] for c in EXERCISE_2])
def test_exercise_2_cases(name, latency, data, sensitive, offline, choice, cl, co):
    v = score(latency, data, sensitive, offline)
    assert (v.choice, v.cloudlet, v.cloud) == (choice, cl, co)
    assert sum(r.points for r in v.reasons if r.tier == "cloudlet") == cl
    assert sum(r.points for r in v.reasons if r.tier == "cloud") == co
    assert [r.factor for r in v.reasons] == ["latency", "data", "sensitive", "offline"]


# The chapter's scenarios A-C (37.8, cloudlets vs fog gateways) give no numbers for the
# scorer's inputs, so each is read from what the chapter does say about it:
# A, factory vibration monitoring: fixed sensors, "simple aggregation", fog gateway latency
#   of 10-100 ms: not latency-bound (100 ms), little data, not sensitive, connected. The
#   chapter recommends a fog gateway; the scorer has no mobility input and can only say
#   "not a cloudlet": cloud.
# B, AR museum tour: "sub-20ms latency for AR rendering": a cloudlet whatever the rest is
#   (under 50 ms gives it 3 points and the cloud at most 1).
# C, autonomous vehicles at intersections: "High-res map updates" (over 10 GB/day) and
#   "quick compute availability" (under 50 ms): a cloudlet; either one alone suffices.
@pytest.mark.parametrize("data", [0, 10, 1000])
@pytest.mark.parametrize("sensitive", [False, True])
@pytest.mark.parametrize("offline", [False, True])
def test_scenario_b_ar_museum_is_a_cloudlet_whatever_else(data, sensitive, offline):
    v = score(19, data, sensitive, offline)
    assert v.choice == "cloudlet" and v.cloudlet >= 3 and v.cloud <= 1


def test_scenario_a_factory_vibration_is_not_a_cloudlet():
    v = score(100, 1, False, False)
    assert (v.choice, v.cloudlet, v.cloud) == ("cloud", 0, 2)
    assert v.note is None


@pytest.mark.parametrize("latency", [5, 49, 150])
def test_scenario_c_vehicles_are_a_cloudlet(latency):
    v = score(latency, 50, False, False)  # high-res maps: over 10 GB/day
    assert v.choice == "cloudlet"
    assert score(10, 1, False, False).choice == "cloudlet"  # or quick compute alone


@pytest.mark.parametrize(("latency", "points"), [
    (0, ("cloudlet", 3)), (49.999, ("cloudlet", 3)), (50, ("cloudlet", 1)),
    (99.999, ("cloudlet", 1)), (100, ("cloud", 1)), (100.001, ("cloud", 1))])
def test_latency_boundaries(latency, points):
    first = score(latency, 0).reasons[0]
    assert (first.factor, first.tier, first.points) == ("latency", *points)


@pytest.mark.parametrize(("data", "points"), [
    (0, ("cloud", 1)), (10, ("cloud", 1)), (10.000001, ("cloudlet", 2)), (11, ("cloudlet", 2))])
def test_data_boundaries(data, points):
    second = score(500, data).reasons[1]
    assert (second.factor, second.tier, second.points) == ("data", *points)


@pytest.mark.parametrize(("latency", "data", "sensitive", "offline", "tie"), [
    (75, 5, False, False, 1),  # helps (+1) against little data (+1)
    (50, 10, False, False, 1),  # both boundaries at once
    (200, 5, True, False, 2),  # sensitive (+2) against latency and data (+1 +1)
    (100, 10, True, False, 2),
])
def test_ties_go_to_the_cloud(latency, data, sensitive, offline, tie):
    v = score(latency, data, sensitive, offline)
    assert (v.choice, v.cloudlet, v.cloud) == ("cloud", tie, tie)
    assert "tie" in v.summary


def test_offline_always_wins_a_cloudlet():
    for latency in (0, 60, 1000):
        for data in (0, 10, 100):
            assert score(latency, data, offline=True).choice == "cloudlet"


@pytest.mark.parametrize("latency", [0, 49, 50, 99, 100, 500])
@pytest.mark.parametrize("data", [0, 10, 11])
@pytest.mark.parametrize("sensitive", [False, True])
@pytest.mark.parametrize("offline", [False, True])
def test_note_only_where_the_decision_tree_disagrees(latency, data, sensitive, offline):
    """The tree (any one criterion -> cloudlet) and the scorer differ exactly when the data
    is sensitive and nothing else favours a cloudlet; `decide` follows the scorer."""
    v = score(latency, data, sensitive, offline)
    alone = sensitive and not offline and latency >= 100 and data <= 10
    assert (v.note is not None) == alone
    if alone:
        assert v.choice == "cloud"


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, -math.inf])
def test_scorer_refuses_impossible_numbers(bad):
    with pytest.raises(ValueError, match="latency_ms"):
        score(bad, 1)
    with pytest.raises(ValueError, match="data_gb"):
        score(10, bad)


# ------------------------------------------------------------------------------ runtime

@pytest.mark.parametrize(("mbps", "seconds"), [(1000, 1.2), (50, 24), (10, 120), (2, 600)])
def test_transfer_times_are_exercise_1s(mbps, seconds):
    assert transfer_s(150 * MB, mbps) == pytest.approx(seconds)


def test_cloudlet_estimate_adds_negotiation_transfer_and_synthesis():
    s = Situation(Workload(150 * MB, session_s=600, rate_hz=2, server_ms=10),
                  cloudlets=(Site("a", 5),))
    e = decide_runtime(s).estimate("cloudlet:a")
    assert e.ready_s == pytest.approx(3 + 24 + 2)
    assert e.response_ms == 15
    assert e.wait_s == pytest.approx(29 + 1200 * 0.015)
    assert e.energy_j == pytest.approx(24 * 1.0 + 1200 * 0.015 * 0.5)
    assert e.cost_s == e.wait_s  # on mains power energy is not priced
    spent = decide_runtime(replace(s, running="cloudlet:a")).estimate("cloudlet:a")
    assert spent.ready_s == 0 and spent.energy_j == pytest.approx(1200 * 0.015 * 0.5)


def test_threshold_by_hand():
    """Mains power, an always-on cloud 100 ms away, a cloudlet needing 29 s of setup, 3600
    interactions: the cloudlet pays off while its RTT is under 100 - 29000/3600 ms."""
    s = Situation(Workload(150 * MB), cloudlets=(Site("a", 20),),
                  cloud=Site("cloud", 100, synthesizes=False))
    t = rtt_threshold(s, "a")
    assert t.against == "cloud"
    assert t.equal_ms == pytest.approx(100 - 29000 / 3600)
    assert t.enter_ms < t.equal_ms < t.leave_ms
    assert decide_runtime(s).choice == "cloudlet"


def _with_rtt(s: Situation, name: str, rtt: float) -> Situation:
    return replace(s, cloudlets=tuple(replace(c, rtt_ms=rtt) if c.name == name else c
                                      for c in s.cloudlets))


@st.composite
def situations(draw):
    n_cloudlets = draw(st.integers(1, 3))
    cloudlets = tuple(
        Site(f"c{i}", draw(st.floats(0, 300)), draw(st.floats(0.5, 1000)),
             draw(st.integers(0, 2)), draw(st.booleans()) or i == 0,
             synthesis_s=draw(st.sampled_from([2.0, 45.0])))
        for i in range(n_cloudlets))
    cloud = draw(st.none() | st.builds(
        lambda rtt, mbps, synth: Site("cloud", rtt, mbps, synthesizes=synth),
        st.floats(0, 500), st.floats(0.5, 100), st.booleans()))
    workload = Workload(draw(st.integers(0, 2000 * MB)), draw(st.floats(1, 4 * 3600)),
                        draw(st.just(0.0) | st.floats(0.01, 30)), draw(st.floats(0, 100)),
                        draw(st.none() | st.floats(0, 1000)))
    device = Device(draw(st.floats(0.05, 1)), draw(st.none() | st.floats(0, 1)))
    running = draw(st.sampled_from([None, "cloudlet:c0", "cloud", "local"]))
    return Situation(workload, device, cloudlets, cloud, running)


@given(situations(), st.floats(0, 500), st.floats(0.01, 1))
def test_more_rtt_or_less_bandwidth_never_makes_the_cloudlet_more_attractive(s, more, less):
    before = decide_runtime(s)
    c0 = s.cloudlets[0]
    worse = replace(s, cloudlets=(replace(c0, rtt_ms=c0.rtt_ms + more,
                                          bandwidth_mbps=c0.bandwidth_mbps * less),
                                  *s.cloudlets[1:]))
    for after in (decide_runtime(_with_rtt(s, "c0", c0.rtt_ms + more)), decide_runtime(worse)):
        a, b = before.estimate("cloudlet:c0"), after.estimate("cloudlet:c0")
        assert b.cost_s >= a.cost_s and b.wait_s >= a.wait_s and b.energy_j >= a.energy_j
        if before.key != "cloudlet:c0":
            assert after.key != "cloudlet:c0"
        others = [e.cost_s for e in before.estimates if e.key != "cloudlet:c0"]
        assert others == [e.cost_s for e in after.estimates if e.key != "cloudlet:c0"]


@given(situations())
def test_the_threshold_is_where_the_choice_changes(s):
    t = rtt_threshold(s, "c0")
    if t is None or not math.isfinite(t.equal_ms):
        return
    eps = max(1e-6 * t.equal_ms, 1e-3)  # a cost difference well above rounding
    if t.equal_ms < 2 * eps:
        return
    below = decide_runtime(_with_rtt(s, "c0", max(t.equal_ms - eps, 0)))
    above = decide_runtime(_with_rtt(s, "c0", t.equal_ms + eps))
    assert below.key == "cloudlet:c0"
    assert above.key == t.against


@given(situations())
def test_a_decider_leaves_above_leave_ms_and_enters_below_enter_ms(s):
    """Unsmoothed (gain 1), so each update's RTT is the smoothed one."""
    t = rtt_threshold(s, "c0")
    if t is None or not all(map(math.isfinite, (t.enter_ms, t.equal_ms, t.leave_ms))):
        return
    eps = max(1e-6 * t.leave_ms, 1e-3)
    if t.enter_ms < 2 * eps:
        return

    def second(first: float, then: float) -> str:
        d = Decider(gain=1)
        d.update(_with_rtt(s, "c0", first))
        return d.update(_with_rtt(s, "c0", then)).key

    on, off = t.equal_ms - eps, t.equal_ms + eps  # where a fresh Decider starts
    assert second(on, t.leave_ms - eps) == "cloudlet:c0"
    assert second(on, t.leave_ms + eps) == t.against
    assert second(off, t.enter_ms - eps) == "cloudlet:c0"
    if t.enter_ms + eps < t.equal_ms:
        assert second(off, t.enter_ms + eps) == t.against


def test_low_battery_pushes_a_heavy_app_off_the_device():
    """30 ms of local compute per interaction against a cloudlet 40 ms away at 10 Mbps: on
    mains power, local (no setup); at 20 % charge, the cloudlet (4 W computing against
    0.5 W of radio, Exercise 3)."""
    s = Situation(Workload(150 * MB, local_ms=30), Device(), cloudlets=(Site("a", 40, 10),))
    assert decide_runtime(s).choice == "local"
    low = decide_runtime(replace(s, device=Device(battery=0.2)))
    assert (low.choice, low.name) == ("cloudlet", "a")
    assert low.energy_price == pytest.approx(1 / (1.5 * 0.2))
    loc, cl = low.estimate("local"), low.estimate("cloudlet:a")
    assert loc.energy_j == pytest.approx(3600 * 0.030 * 4.0)
    assert cl.energy_j == pytest.approx(120 * 1.0 + 3600 * 0.040 * 0.5)


def test_a_tier_the_battery_cannot_last_through_is_dropped():
    """Local would cost less (the cloudlet takes hours to synthesize) but needs 432 J, and
    200 J are left: the cloudlet, which needs 73 J, is the answer."""
    s = Situation(Workload(150 * MB, local_ms=30), Device(battery=0.005),
                  cloudlets=(Site("a", 40, 1000, synthesis_s=10_000),))
    d = decide_runtime(s)
    loc, cl = d.estimate("local"), d.estimate("cloudlet:a")
    assert loc.battery_short and not cl.battery_short and loc.cost_s < cl.cost_s
    assert d.choice == "cloudlet"
    assert decide_runtime(replace(s, device=Device(battery=1.0))).choice == "local"


def test_cpu_budget_slows_local_but_not_its_energy():
    s = Situation(Workload(0, local_ms=20), Device(cpu_budget=0.25))
    e = decide_runtime(s).estimate("local")
    assert e.response_ms == 80
    assert e.energy_j == pytest.approx(3600 * 0.020 * 4.0)


def test_full_or_baseless_cloudlets_are_not_chosen():
    s = Situation(Workload(150 * MB), cloudlets=(Site("full", 1, free_slots=0),
                                                 Site("other-base", 1, has_base=False),
                                                 Site("far", 60)),
                  cloud=Site("cloud", 90))
    d = decide_runtime(s)
    assert (d.choice, d.name) == ("cloudlet", "far")
    assert "full" in d.estimate("cloudlet:full").unavailable
    assert "base" in d.estimate("cloudlet:other-base").unavailable
    # a session already on the full cloudlet holds its slot
    assert decide_runtime(replace(s, running="cloudlet:full")).name == "full"


def test_ranked_is_the_order_to_try():
    s = Situation(Workload(150 * MB), cloudlets=(Site("far", 60), Site("full", 1, free_slots=0),
                                                 Site("near", 3)),
                  cloud=Site("cloud", 90, synthesizes=False))
    assert [e.key for e in decision.ranked(s)] == ["cloudlet:near", "cloudlet:far", "cloud"]
    assert decide_runtime(s).key == "cloudlet:near"


def test_nothing_can_serve_is_degraded_local():
    s = Situation(Workload(150 * MB), cloudlets=(Site("a", 1, free_slots=0),))
    d = decide_runtime(s)
    assert d.choice == "local"
    assert "degraded local" in d.reason and "full" in d.reason


@pytest.mark.parametrize("change", [
    {"cpu_budget": 0}, {"cpu_budget": 1.5}, {"battery": 1.2}, {"battery": -0.1}])
def test_runtime_refuses_impossible_devices(change):
    with pytest.raises(ValueError):
        decide_runtime(Situation(Workload(MB), Device(**change)))


def test_runtime_refuses_impossible_sites():
    with pytest.raises(ValueError, match="unique"):
        decide_runtime(Situation(Workload(MB), cloudlets=(Site("a", 1), Site("a", 2))))
    with pytest.raises(ValueError, match="synthesis_s"):
        decide_runtime(Situation(Workload(MB), cloudlets=(Site("a", 1, synthesis_s=-1),)))
    with pytest.raises(ValueError, match="rtt_ms"):
        decide_runtime(Situation(Workload(MB), cloudlets=(Site("a", -1),)))
    with pytest.raises(ValueError, match="bandwidth"):
        decide_runtime(Situation(Workload(MB), cloudlets=(Site("a", 1, 0),)))


def test_constants_are_the_chapters():
    """Each figure as the chapter (or docs/CLOUDLET.md, or README) gives it."""
    assert (decision.LATENCY_MUST_MS, decision.LATENCY_HELPS_MS,
            decision.DATA_GB_PER_DAY) == (50, 100, 10)
    assert (decision.LOCAL_W, decision.RADIO_W) == (4.0, 0.5)  # Exercise 3
    assert decision.BATTERY_WH == pytest.approx(3.0 * 3.7)  # 3,000 mAh at 3.7 V
    # 11.1 Wh over 266 minutes offloading to a cloudlet, less the 1.5 W baseline
    assert decision.TRANSFER_W == pytest.approx(11.1 / (266 / 60) - 1.5, abs=0.01)


# ------------------------------------------------------------------------------ hysteresis

def _flips(decider: Decider, s: Situation, rtts: list[float]) -> list[str]:
    return [decider.update(_with_rtt(s, "a", r)).key for r in rtts]


def _changes(keys: list[str]) -> int:
    return sum(a != b for a, b in pairwise(keys))


HYST = Situation(Workload(150 * MB), cloudlets=(Site("a", 0),),
                 cloud=Site("cloud", 100, synthesizes=False))


def test_noise_around_the_threshold_does_not_flip_the_answer():
    t = rtt_threshold(HYST, "a")
    band = min(t.leave_ms - t.equal_ms, t.equal_ms - t.enter_ms)
    noise = 3 * band  # each raw sample alone is outside the band, on either side
    rtts = [t.equal_ms - 30] * 10 + [t.equal_ms + (noise if i % 2 else -noise)
                                     for i in range(60)]
    keys = _flips(Decider(), HYST, rtts)
    assert _changes(keys) == 0 and keys[-1] == "cloudlet:a"
    # each half of the rule is needed: without smoothing, or without the margin, it flaps
    steady = [t.equal_ms] + [t.equal_ms + (noise if i % 2 else -noise) for i in range(60)]
    assert _changes(_flips(Decider(gain=1), HYST, steady)) >= 50
    assert _changes(_flips(Decider(margin=0), HYST, steady)) >= 50


def test_a_sustained_change_switches_once_each_way():
    t = rtt_threshold(HYST, "a")
    up = [t.equal_ms - 30] * 10 + [t.leave_ms + 30] * 40
    keys = _flips(d := Decider(), HYST, up)
    assert keys[0] == "cloudlet:a" and keys[-1] == "cloud" and _changes(keys) == 1
    back = _flips(d, HYST, [t.enter_ms - 30] * 40)
    assert back[-1] == "cloudlet:a" and _changes(keys[-1:] + back) == 1


def test_the_decider_leaves_a_cloudlet_that_fills_up_or_dies_at_once():
    """b is only 1 ms worse than a (under the margin), yet the switch is immediate."""
    s = Situation(Workload(150 * MB), cloudlets=(Site("a", 5), Site("b", 6)),
                  cloud=Site("cloud", 90))
    full = replace(s, cloudlets=(Site("a", 5, free_slots=0), Site("b", 6)))
    gone = replace(s, cloudlets=(Site("b", 6),))
    for then in (full, gone):
        d = Decider()
        assert d.update(s).name == "a"
        assert d.update(then).name == "b"
    d = Decider()
    d.update(replace(s, cloudlets=(Site("a", 6), Site("b", 5))))  # b first, then a is better
    assert d.update(s).name == "b"  # by 1 ms: not enough to switch


def test_staying_says_why():
    t = rtt_threshold(HYST, "a")
    d = Decider()
    d.update(_with_rtt(HYST, "a", t.equal_ms - 1))
    for _ in range(30):  # the smoothed RTT settles above the threshold, inside the band
        kept = d.update(_with_rtt(HYST, "a", t.equal_ms + 5))
    assert d.srtt["cloudlet:a"] > t.equal_ms
    assert kept.key == "cloudlet:a" and kept.reason.startswith("staying on cloudlet a: cloud")


# ------------------------------------------------------------------------------ fallback

@pytest.mark.parametrize("cause", list(Cause))
def test_without_fallbacks_the_next_tier_is_local_with_exit_40(cause):
    f = fallback(cause, detail="base tiny@1")
    assert (f.tier, f.target, f.exit_code) == ("local", None, ExitCode.NO_CLOUDLET)
    assert int(ExitCode.NO_CLOUDLET) == 40
    err = f.error()
    assert isinstance(err, NoCloudletError) and err.exit_code == 40
    assert cause.value in str(err) and "tiny@1" in str(err) and err.hint


@pytest.mark.parametrize(("spec", "tier", "target"), [
    ("cloud:https://cloud.example:8750", "cloud", "https://cloud.example:8750"),
    ("cloudlet:http://10.0.0.2:8750", "cloudlet", "http://10.0.0.2:8750"),
    ("https://cloud.example:8750", "cloud", "https://cloud.example:8750")])
def test_a_fallback_endpoint_is_tried_next(spec, tier, target):
    f = fallback(Cause.ALL_FULL, [spec, "cloud:https://second"])
    assert (f.tier, f.target, f.exit_code) == (tier, target, None)
    assert Cause.ALL_FULL.value in f.reason and target in f.reason


# ------------------------------------------------------------------------------ the command

@pytest.mark.parametrize(("name", "latency", "data", "sensitive", "offline", "choice", "cl",
                          "co"), EXERCISE_2, ids=[c[0] for c in EXERCISE_2])
def test_decide_json(cli, name, latency, data, sensitive, offline, choice, cl, co):
    argv = ["decide", "--latency-ms", latency, "--data-gb", data, "--json"]
    argv += ["--sensitive"] * sensitive + ["--offline"] * offline
    r = cli(*argv)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["ok"] is True and doc["model"] == "framework"
    assert doc["choice"] == choice and doc["scores"] == {"cloudlet": cl, "cloud": co}
    assert [x["factor"] for x in doc["reasons"]] == ["latency", "data", "sensitive", "offline"]
    assert all(set(x) == {"factor", "tier", "points", "why"} for x in doc["reasons"])
    assert doc["inputs"] == {"latency_ms": latency, "data_gb": data, "sensitive": sensitive,
                             "offline": offline}


def test_decide_text(cli):
    r = cli("decide", "--latency-ms", 200, "--data-gb", 1, "--sensitive")
    assert r.code == 0
    assert r.out.startswith("cloud (cloudlet 2 = cloud 2")
    assert "cloudlet +2" in r.out and "note:" in r.out


def _strict(text: str):
    def refuse(name: str):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_decide_runtime_json(cli):
    r = cli("decide", "--rtt-ms", 40, "--bandwidth-mbps", 10, "--cloud-rtt-ms", 60,
            "--local-ms", 30, "--overlay-size", "150M", "--json")
    assert r.code == 0, r.err
    doc = _strict(r.out)
    assert doc["model"] == "runtime" and doc["choice"] == "local"  # mains: local, no setup
    assert [e["tier"] for e in doc["estimates"]] == ["local", "cloudlet", "cloud"]
    assert set(doc["threshold"]) == {"against", "equal_ms", "leave_ms", "enter_ms"}
    low = _strict(cli("decide", "--rtt-ms", 40, "--bandwidth-mbps", 10, "--local-ms", 30,
                      "--battery", 20, "--json").out)
    assert low["choice"] == "cloudlet" and low["energy_price_s_per_j"] > 0


def test_decide_runtime_without_a_local_estimate(cli):
    r = cli("decide", "--cloud-rtt-ms", 80, "--json")
    doc = _strict(r.out)
    assert r.code == 0 and doc["choice"] == "cloud" and doc["threshold"] is None
    local = doc["estimates"][0]
    assert local["tier"] == "local" and local["cost_s"] is None and local["unavailable"]
    text = cli("decide", "--rtt-ms", 4, "--cloud-rtt-ms", 90)
    assert text.code == 0 and text.out.startswith("cloudlet: ")
    assert "chosen up to a round trip of" in text.out


@pytest.mark.parametrize("argv", [
    ["--latency-ms", "nan", "--data-gb", "1"],
    ["--latency-ms", "-1", "--data-gb", "1"],
    ["--latency-ms", "abc", "--data-gb", "1"],
    ["--latency-ms", "10"],
    [],
    ["--latency-ms", "10", "--data-gb", "1", "--rtt-ms", "3"],
    ["--rtt-ms", "inf"],
    ["--rtt-ms", "3", "--battery", "150"],
    ["--rtt-ms", "3", "--cpu-budget", "0"],
    ["--local-ms", "3"],
])
def test_decide_bad_input_is_one_line(cli, argv):
    r = cli("decide", *argv)
    assert r.code == ExitCode.USAGE
    assert "Traceback" not in r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    j = cli("decide", *argv, "--json")
    assert j.code == ExitCode.USAGE and j.json()["error"]["kind"] == "usage"


def test_decide_help_has_examples(cli):
    r = cli("decide", "--help")
    assert r.code == 0
    examples = r.out[r.out.index("Examples"):]
    assert sum(line.strip().startswith("vmsynth decide") for line in examples.splitlines()) >= 3
    assert "decide" in cli("--help").out


# -- how long `offload --cloudlet auto` listens before it decides -----------------------------

def _listened(settle: float | None, answers_at: list[float], window: float) -> float:
    """Seconds `_listen` took with answers arriving at `answers_at` (seconds from the start)."""
    from vmsynth.service.discovery import _listen

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        heard = asyncio.Event()
        for at in answers_at:
            loop.call_later(at, heard.set)
        began = loop.time()
        await asyncio.wait_for(_listen(heard, began + window, settle), window + 30)
        return loop.time() - began

    return asyncio.run(scenario())


def test_listening_without_settle_lasts_the_whole_window():
    assert _listened(None, [0.05, 0.1], window=0.6) >= 0.6


def test_listening_with_settle_ends_after_the_last_answer_goes_quiet():
    took = _listened(0.2, [0.05, 0.15], window=10)
    assert 0.35 <= took < 10  # the second answer restarted the quiet time; no window wait


def test_listening_with_settle_but_no_answer_lasts_the_whole_window():
    assert _listened(0.1, [], window=0.5) >= 0.5
