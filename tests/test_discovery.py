"""A user arrives (issue 12): cloudlets found by mDNS across a real network, confirmed over
HTTP, and the system's own mDNS stack (Avahi) on either side.

Two network namespaces joined by a veth pair, made and removed by the module: the cloudlet
(`vmsynth serve`) in one, the user's device (`vmsynth discover`, `vmsynth offload`) in the
other. Traffic stays between them. cgroups are not mounted inside `ip netns exec` (it
remounts /sys), so the cloudlet runs with --no-cgroups here; test_service.py covers them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cloudlet_world import next_json, running_event

from vmsynth.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
HANG = 240

pytestmark = pytest.mark.vm


def _need(h, *tools: str) -> None:
    missing = [t for t in tools if not h.which(t)]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the discovery tests: missing {missing}")
        pytest.skip(f"missing {missing}")


class Net:
    """Namespaces `<tag>-c` (the cloudlet, 10.93.0.1) and `<tag>-u` (the user, 10.93.0.2)."""

    def __init__(self) -> None:
        tag = f"vd{os.getpid() % 100000}"
        self.cloudlet, self.user = f"{tag}-c", f"{tag}-u"
        self.cloudlet_ip, self.user_ip = "10.93.0.1", "10.93.0.2"
        self.cif, self.uif = f"{tag}c", f"{tag}u"
        for ns in (self.cloudlet, self.user):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        run = lambda *a: subprocess.run(["ip", *a], check=True)
        run("link", "add", self.cif, "type", "veth", "peer", "name", self.uif)
        run("link", "set", self.cif, "netns", self.cloudlet)
        run("link", "set", self.uif, "netns", self.user)
        for ns, dev, ip in ((self.cloudlet, self.cif, self.cloudlet_ip),
                            (self.user, self.uif, self.user_ip)):
            run("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("-n", ns, "link", "set", "lo", "up")
            run("-n", ns, "link", "set", dev, "up")

    def exec(self, ns: str, *argv: object) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def down(self) -> None:
        for ns in (self.cloudlet, self.user):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True, check=False).stdout.split():
                os.kill(int(pid), signal.SIGKILL)  # only ours can be in these namespaces
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def net(h):
    _need(h, "ip", "qemu-system-x86_64")
    n = Net()
    yield n
    n.down()


@pytest.fixture(scope="module")
def env(world):
    return world.env()


def _json_docs(text: str) -> list:
    out, decoder, pos, text = [], json.JSONDecoder(), 0, text.strip()
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class Cloudlet:
    """`vmsynth serve` in the cloudlet namespace."""

    def __init__(self, h, net: Net, env: dict, *args: object, listen: str | None = None
                 ) -> None:
        self.net = net
        self.log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                net.exec(net.cloudlet, h.VMSYNTH, "serve", "--listen",
                         listen or f"{net.cloudlet_ip}:8750", "--open", "--no-cgroups",
                         "--accel", "tcg", "--grace", "2", "--json", *args),
                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        assert self.proc.stdout is not None
        buf = ""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"serve did not start: {self.log.read_text()[-2000:]}"
            buf += line
            try:
                self.event = json.loads(buf)
                break
            except ValueError:
                continue
        assert self.event["event"] == "serving", self.event
        self.started = time.monotonic()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=HANG)
        self.log.unlink(missing_ok=True)


@pytest.fixture
def cloudlets(h, net, env):
    made: list[Cloudlet] = []

    def start(*args: object, listen: str | None = None) -> Cloudlet:
        c = Cloudlet(h, net, env, *args, listen=listen)
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop(signal.SIGKILL)


def discover(h, net: Net, env: dict, *args: object) -> list[dict]:
    p = subprocess.run(net.exec(net.user, h.VMSYNTH, "discover", "--json", *args),
                       capture_output=True, text=True, env=env, timeout=HANG, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# ------------------------------------------------------------------------------ discovery

def test_a_cloudlet_is_found_within_3_s_and_confirmed(h, net, env, world, cloudlets):
    c = cloudlets()
    found, seconds = [], 0.0
    while not found:
        began = time.monotonic()
        found = discover(h, net, env, "--timeout", "0.5", "--for", world.overlay)
        seconds = time.monotonic() - c.started
        assert seconds < 10, "not found in 10 s"
    assert seconds <= 3.0, f"found after {seconds:.2f} s"
    first = found[0]
    assert first["url"] == f"https://{net.cloudlet_ip}:8750"
    assert first["fingerprint"] == c.event["fingerprint"]
    assert first["has_base"] is True and first["rtt_ms"] is not None
    assert first["advertised"]["api"] == "1"
    assert time.monotonic() - began < 5


def test_a_killed_cloudlet_is_not_listed(h, net, env, cloudlets):
    c = cloudlets()
    seen = discover(h, net, env, "--timeout", "1")
    assert len(seen) == 1
    c.stop(signal.SIGKILL)  # no goodbye: caches keep its records for minutes
    assert discover(h, net, env, "--timeout", "1") == []
    # A listener that heard it before still has its records: the HTTP confirmation is what
    # drops it (what `discover` does with every answer), asked from the user's namespace.
    stale = {"name": seen[0]["name"], "url": seen[0]["url"],
             "fingerprint": seen[0]["fingerprint"], "txt": seen[0]["advertised"]}
    code = ("import asyncio, json, sys\n"
            "from vmsynth.service.discovery import Found, confirm\n"
            "print(json.dumps(asyncio.run(confirm(Found(**json.loads(sys.argv[1])), None))"
            " is None))")
    p = subprocess.run(net.exec(net.user, Path(h.VMSYNTH).parent / "python", "-P", "-c", code,
                                json.dumps(stale)), capture_output=True, text=True, env=env,
                       timeout=60, check=False)
    assert p.stdout.strip() == "true", (p.stdout, p.stderr)


def test_free_slots_seen_through_discovery_follow_the_sessions(h, net, env, world, cloudlets):
    cloudlets("--slots", "2")
    before = discover(h, net, env, "--timeout", "1")[0]
    assert before["advertised"]["slots"] == "2" and before["slots"]["free"] == 2
    p = subprocess.Popen(net.exec(net.user, h.VMSYNTH, "offload", world.overlay, "--cloudlet",
                                  "auto", "--json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        running_event(p)
        deadline = time.monotonic() + 60
        while True:
            now = discover(h, net, env, "--timeout", "1")
            if now and now[0]["advertised"]["slots"] == "1":
                break
            assert time.monotonic() < deadline, now
        assert now[0]["slots"]["free"] == 1
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=HANG)
    assert p.returncode == 0


def test_offload_auto_runs_the_vm_and_ctrl_c_wipes_it(h, net, env, world, cloudlets):
    cloudlets()
    p = subprocess.Popen(net.exec(net.user, h.VMSYNTH, "offload", world.overlay, "--cloudlet",
                                  "auto", "--json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    event = running_event(p)
    assert event["vnc"]["host"] == net.cloudlet_ip, event
    assert h.alive(event["pid"])
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=HANG)
    assert p.returncode == 0, err
    assert _json_docs(out)[-1]["state"] == "ended"
    assert not h.alive(event["pid"])
    assert not list((world.home / "sessions").iterdir()), "the session was wiped"


def test_with_no_cloudlet_offload_says_which_tier_to_fall_to(h, net, env, world):
    p = subprocess.run(net.exec(net.user, h.VMSYNTH, "offload", world.overlay, "--cloudlet",
                                "auto", "--discover-timeout", "1", "--fallback",
                                f"https://{net.cloudlet_ip}:9"), capture_output=True,
                       text=True, env=env, timeout=HANG, check=False)
    assert p.returncode == ExitCode.NO_CLOUDLET, p.stderr
    assert "no cloudlet answered nearby" in p.stderr and "run it locally" in p.stderr
    assert "trying running locally" in p.stderr  # the fallback tier was tried, then local


# ------------------------------------------------------------------------------ the decision

DELAY_PROXY = """
import asyncio, sys
listen, port, to_host, to_port, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
    int(sys.argv[4]), float(sys.argv[5]) / 1000

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            await asyncio.sleep(delay)  # each way: a round trip gains twice this
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def serve(reader, writer):
    up_reader, up_writer = await asyncio.open_connection(to_host, to_port)
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                         return_exceptions=True)

async def main():
    server = await asyncio.start_server(serve, listen, port)
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@pytest.fixture
def delay(h, net):
    """A TCP proxy in the cloudlet's namespace that delays every chunk each way."""
    running: list[subprocess.Popen] = []

    def start(port: int, to_port: int, ms: float) -> None:
        p = subprocess.Popen(net.exec(net.cloudlet, Path(h.VMSYNTH).parent / "python", "-c",
                                      DELAY_PROXY, net.cloudlet_ip, port, "127.0.0.1", to_port,
                                      ms), stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        running.append(p)

    def stop_all() -> None:
        for p in running:
            p.kill()
            p.wait()
        running.clear()

    start.stop_all = stop_all  # type: ignore[attr-defined]
    yield start
    stop_all()


def _ca(folder: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for `ip`: the cloud endpoint's real-world trust."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloud")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address(ip))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "cloud.pem", folder / "cloud.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def decided(h, net: Net, env: dict, overlay: Path, cloud: str, ca: Path) -> dict:
    """offload --cloudlet auto's decision (then it is stopped: no VM needed here)."""
    p = subprocess.Popen(net.exec(net.user, h.VMSYNTH, "offload", overlay, "--cloudlet", "auto",
                                  "--fallback", cloud, "--cacert", ca, "--json"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            try:
                event = next_json(p.stdout)
            except AssertionError:
                pytest.fail(f"offload ended ({p.wait()}): {p.stderr.read()}")
            if event.get("event") == "decided":
                return event
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=HANG)


def test_round_trip_time_moves_the_choice_from_cloudlet_to_cloud_at_the_threshold(
        h, net, env, world, cloudlets, delay, tmp_path):
    """The cloudlet is reached through a proxy that delays it; the cloud (a `vmsynth serve`
    with a CA-signed certificate, the first --fallback) through one that adds 40 ms. Below
    the model's RTT threshold (vmsynth.decision.rtt_threshold, from what offload measured)
    offload chooses the cloudlet, above it the cloud."""
    from vmsynth.decision import Device, Site, Situation, Workload, rtt_threshold

    ca, cert, key = _ca(tmp_path, net.cloudlet_ip)
    cloudlets("--advertise", f"{net.cloudlet_ip}:8750", listen="127.0.0.1:8760")
    cloudlets("--no-advertise", "--tls-cert", cert, "--tls-key", key, listen="127.0.0.1:8780")
    cloud = f"https://{net.cloudlet_ip}:8770"
    delay(8770, 8780, 20)  # the cloud: ~40 ms more per round trip

    def measure(ms: float) -> tuple[dict, float]:
        delay(8750, 8760, ms)
        event = decided(h, net, env, world.overlay, cloud, ca)
        delay.stop_all()  # type: ignore[attr-defined]
        delay(8770, 8780, 20)
        inputs = event["inputs"]
        site = next(c for c in inputs["cloudlets"] if c["name"].endswith(":8750"))
        situation = Situation(Workload(inputs["overlay_bytes"]), Device(),
                              (Site(**site),), Site(**inputs["cloud"]))
        threshold = rtt_threshold(situation, site["name"])
        assert threshold is not None and threshold.against == "cloud", threshold
        return event, site["rtt_ms"] - threshold.equal_ms

    near, below = measure(2)  # ~4 ms per round trip: well under the cloud's 40
    assert below < 0 and near["choice"] == "cloudlet", near["reason"]
    far, above = measure(40)  # ~80 ms
    assert above > 0 and far["choice"] == "cloud", far["reason"]


# ------------------------------------------------------------------------------ Avahi

class Avahi:
    """The system's mDNS daemon in one namespace: its own D-Bus, /run and services dir."""

    BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/>
<allow receive_sender="*"/></policy></busconfig>"""

    def __init__(self, net: Net, ns: str, dev: str, services: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="avahi-"))
        self.bus = self.dir / "bus"
        (self.dir / "bus.conf").write_text(self.BUS.format(path=self.bus))
        (self.dir / "avahi.conf").write_text(
            f"[server]\nuse-ipv6=no\nallow-interfaces={dev}\nenable-dbus=yes\n"
            "[publish]\npublish-workstation=no\n")
        (self.dir / "services").mkdir()
        for name, xml in services.items():
            (self.dir / "services" / name).write_text(xml)
        self.env = os.environ | {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus}"}
        self.dbus = subprocess.Popen(net.exec(ns, "dbus-daemon", "--config-file",
                                              self.dir / "bus.conf", "--nofork", "--nopidfile"),
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.bus.exists():
            assert time.monotonic() < deadline, "dbus-daemon did not start"
            time.sleep(0.05)
        # A mount namespace of its own: a private /run/avahi-daemon, its services folder.
        script = ("mount -t tmpfs tmpfs /run/avahi-daemon && "
                  f"mount --bind {self.dir}/services /etc/avahi/services && "
                  f"exec avahi-daemon --no-chroot --no-drop-root -f {self.dir}/avahi.conf")
        self.log = self.dir / "avahi.log"
        with open(self.log, "wb") as log:
            self.daemon = subprocess.Popen(net.exec(ns, "unshare", "--mount", "sh", "-c",
                                                    script),
                                           stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 20
        while b"Server startup complete" not in self.log.read_bytes():
            assert self.daemon.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        for p in (self.daemon, self.dbus):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def avahi(h, net):
    _need(h, "avahi-daemon", "avahi-browse", "dbus-daemon", "unshare")
    started: list[Avahi] = []

    def start(ns: str, dev: str, services: dict[str, str] | None = None) -> Avahi:
        a = Avahi(net, ns, dev, services or {})
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def test_avahi_browse_on_another_host_lists_a_vmsynth_cloudlet(h, net, env, cloudlets,
                                                                  avahi):
    c = cloudlets()
    a = avahi(net.user, net.uif)
    deadline = time.monotonic() + 15
    while True:
        p = subprocess.run(net.exec(net.user, "avahi-browse", "-rpt", "_cloudlet._tcp"),
                           capture_output=True, text=True, env=a.env, timeout=60, check=False)
        resolved = [ln.split(";") for ln in p.stdout.splitlines() if ln.startswith("=")]
        if resolved:
            break
        assert time.monotonic() < deadline, (p.stdout, p.stderr)
        time.sleep(0.5)
    fields = resolved[0]
    assert fields[7] == net.cloudlet_ip and fields[8] == "8750", fields
    assert f'"fp={c.event["fingerprint"]}"' in fields[9] and '"api=1"' in fields[9]


def test_vmsynth_discovers_a_cloudlet_advertised_by_an_avahi_service_file(h, net, env, cloudlets,
                                                                         avahi):
    c = cloudlets("--no-advertise")
    service = f"""<?xml version="1.0" standalone='no'?>
<!DOCTYPE service-group SYSTEM "avahi-service.dtd">
<service-group><name>a cloudlet Avahi announces</name>
<service><type>_cloudlet._tcp</type><port>8750</port>
<txt-record>api=1</txt-record><txt-record>tls=1</txt-record>
<txt-record>fp={c.event["fingerprint"]}</txt-record></service></service-group>"""
    avahi(net.cloudlet, net.cif, {"cloudlet.service": service})
    deadline = time.monotonic() + 15
    while not (found := discover(h, net, env, "--timeout", "1")):
        assert time.monotonic() < deadline, "not found"
    assert found[0]["name"] == "a cloudlet Avahi announces"
    assert found[0]["slots"]["total"] >= 1, "confirmed over HTTP"
