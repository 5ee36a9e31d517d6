"""Overlays and bases on an OCI registry (issue 13), against a real registry process.

The registry is Debian's `docker-registry` (CNCF distribution 2.8.2), started by these tests
on 127.0.0.1 with a configuration they write (the packaged one listens on all interfaces),
its storage in a temporary directory: plain HTTP for most tests, basic auth with an
htpasswd file, a bearer-token service (real JWTs the registry verifies), and TLS. No
registry behaviour is imitated: where a test needs a misbehaving network it puts a small
HTTP middlebox (`Proxy`) in front of the real registry, which counts the bytes it passes
on, cuts a transfer, strips Range headers or trickles; to damage a blob it edits the
registry's own storage. Every process and server a test starts is stopped.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import io
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vmsynth import bases
from vmsynth.errors import ExitCode, UsageError
from vmsynth.registry import Access, Client, Reference
from vmsynth.registry_bases import version_key

REPO = Path(__file__).resolve().parents[1]
REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
GUEST_DIR = REPO / ".build" / "test-guest"  # shared with test_vm.py; the build is idempotent
APPEND = "console=ttyS0 quiet panic=-1"
MARKER = "customized by vmsynth fixtures"
HANG = 240  # hang guards only, never a measure
MIB = 1 << 20

# External tools (docker-registry, qemu-img): not for `make test-fast`.
pytestmark = pytest.mark.qemu_img


def _need_registry() -> None:
    if not Path(REGISTRY_BIN).exists():
        if os.environ.get("CI"):
            pytest.fail("docker-registry missing: CI must run the registry tests")
        pytest.skip("docker-registry not installed (make setup installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ the registry

class Registry:
    """`docker-registry serve CONFIG` on 127.0.0.1 and a free port, storage in `root`."""

    def __init__(self, root: Path, auth: str = "", tls: tuple[Path, Path] | None = None,
                 ) -> None:
        _need_registry()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.storage = root / "storage"
        self.port = _free_port()
        self.tls = tls
        tls_text = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else ""
        # No blob descriptor cache: a blob damaged on disk is served as it is now.
        (root / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: {secrets.token_hex(16)}\n"
            + tls_text + auth)
        self.log = open(root / "registry.log", "wb")  # noqa: SIM115 (the registry's lifetime)
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("the registry did not start: " +
                                (root / "registry.log").read_text(errors="replace")[-2000:])
                time.sleep(0.05)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, path: str) -> str:
        return f"oci://{self.host}/{path}"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _raw_get(url: str, accept: str = "application/vnd.oci.image.manifest.v1+json",
             auth: str | None = None) -> tuple[int, bytes, dict]:
    """A request made without vmsynth's client (what `oras manifest fetch` would see)."""
    request = urllib.request.Request(url, headers={"Accept": accept})
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


# ------------------------------------------------------------------------------ a middlebox

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


class Proxy:
    """An HTTP middlebox in front of a registry. It counts every byte it sends back (status
    line, headers, bodies), records the requests, and on demand cuts a blob's transfer
    after `cut_after` bytes (`cuts` times), strips Range headers, or trickles."""

    def __init__(self, upstream: Registry) -> None:
        self.upstream = upstream.port
        self.lock = threading.Lock()
        self.sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: int | None = None
        self.cuts = 0
        self.strip_range = False
        self.trickle: float | None = None  # seconds to wait after each 64 KiB
        self.server = _Quiet(("127.0.0.1", 0), _Handler)
        self.server.proxy = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def ref(self, path: str) -> str:
        return f"oci://{self.host}/{path}"

    def reset(self) -> None:
        with self.lock:
            self.sent = 0
            self.requests = []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Quiet(ThreadingHTTPServer):
    """A client that hangs up (as vmsynth does on refusing a transfer) is no error here."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


class _Counting:
    def __init__(self, raw, proxy: Proxy) -> None:
        self.raw, self.proxy = raw, proxy

    def write(self, data) -> int:
        n = self.raw.write(data)
        with self.proxy.lock:
            self.proxy.sent += len(data)
        return n

    def flush(self) -> None:
        self.raw.flush()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.wfile = _Counting(self.wfile, self.server.proxy)  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        p: Proxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        with p.lock:
            p.requests.append((self.command, self.path, headers.get("Range")))
        if p.strip_range:
            headers.pop("Range", None)
        upstream = http.client.HTTPConnection("127.0.0.1", p.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return
            blob = "/blobs/sha256:" in self.path and answer.status in (200, 206)
            cut = p.cut_after if blob else None
            sent = 0
            while chunk := answer.read(64 << 10):
                if cut is not None and sent + len(chunk) > cut and self._take_cut(p):
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the link drops
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                if p.trickle:
                    time.sleep(p.trickle)
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            upstream.close()

    @staticmethod
    def _take_cut(p: Proxy) -> bool:
        """Whether this transfer is one of the `cuts` to drop (counted when it happens)."""
        with p.lock:
            if p.cuts <= 0:
                return False
            p.cuts -= 1
            return True

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward


@pytest.fixture
def proxy(registry):
    p = Proxy(registry)
    yield p
    p.close()


# ------------------------------------------------------------------------------ overlays

@dataclass
class Pair:
    dir: Path
    base: Path
    app: Path
    overlay: Path
    app_data: bytes


def _pair(h, folder: Path, seed: str, new: int = 2 * MIB) -> Pair:
    """A base of 1 MiB of text and an app that adds `new` bytes of random data after it:
    an overlay about that big (big enough to cut a transfer in the middle)."""
    folder.mkdir(parents=True, exist_ok=True)
    base_data = b"".join(h.text_block(f"{seed}-{i}") for i in range(256))
    app_data = base_data + h.det_bytes(seed, new)
    base = h.write_image(folder / "base.qcow2", base_data)
    app = h.write_image(folder / "app.qcow2", app_data)
    overlay = folder / "app.vmo"
    h.run(h.VMSYNTH, "create", "--base", base, "--disk", app, "-o", overlay)
    return Pair(folder, base, app, overlay, app_data)


@pytest.fixture(scope="module")
def pair(h, tmp_path_factory):
    return _pair(h, tmp_path_factory.mktemp("pair"), "pair")


def _next_json(stream) -> dict:
    """The next JSON document on a text stream (vmsynth's --json output is indented)."""
    buf = ""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        line = stream.readline()
        assert line, f"the stream ended inside {buf!r}"
        buf += line
        with contextlib.suppress(ValueError):
            return json.loads(buf)
    raise AssertionError("no JSON document in time")


def test_push_then_push_again_sends_nothing(cli, registry, pair, proxy):
    """Blobs are looked up (HEAD) before they are sent, and the manifest is written the same
    way for the same overlay: the second push makes no write request at all."""
    ref = proxy.ref("apps/twice:1")
    first = cli("push", pair.overlay, ref, "--plain-http", "--json")
    assert first.code == 0, first.err
    report = first.json()
    assert report["overlay"]["uploaded"] and report["manifest_uploaded"]
    assert report["bytes_sent"] >= pair.overlay.stat().st_size
    writes = [r for r in proxy.requests if r[0] in ("POST", "PUT", "PATCH")]
    assert len(writes) >= 3  # overlay blob, empty config, manifest
    proxy.reset()
    second = cli("push", pair.overlay, ref, "--plain-http", "--json")
    assert second.code == 0, second.err
    again = second.json()
    assert again["digest"] == report["digest"]
    assert not again["overlay"]["uploaded"] and not again["manifest_uploaded"]
    assert again["bytes_sent"] == 0
    assert [r for r in proxy.requests if r[0] not in ("GET", "HEAD")] == []


def test_the_manifest_names_the_base_and_the_format(cli, registry, pair):
    """What `oras manifest fetch` shows: our artifact type and media types, the base's name,
    version and digest, the overlay's format version (read without vmsynth's client)."""
    assert cli("push", pair.overlay, registry.ref("apps/shown:1"), "--plain-http").code == 0
    status, raw, headers = _raw_get(f"http://{registry.host}/v2/apps/shown/manifests/1")
    assert status == 200, raw
    manifest = json.loads(raw)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == "application/vnd.vmsynth.overlay.v1"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.vmsynth.overlay.v1"
    data = pair.overlay.read_bytes()
    assert layer["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer["size"] == len(data)
    info = cli("inspect", pair.overlay, "--json").json()
    ann = manifest["annotations"]
    assert ann["vmsynth.base.digest"] == info["base"]["digest"]
    assert ann["vmsynth.base.name"] == info["base"]["name"] == "base.qcow2"
    assert ann["vmsynth.base.version"] == info["base"]["version"]
    assert ann["vmsynth.base.virtual-size"] == str(info["base"]["virtual_size"])
    assert ann["vmsynth.overlay.format-version"] == info["format_version"]
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_pull_apply_verify_and_inspect_from_the_registry(cli, h, registry, pair, tmp_path):
    ref = registry.ref("apps/app:1")
    assert cli("push", pair.overlay, ref, "--plain-http").code == 0
    pulled = tmp_path / "pulled.vmo"
    r = cli("pull", ref, "-o", pulled, "--plain-http", "--json")
    assert r.code == 0, r.err
    assert pulled.read_bytes() == pair.overlay.read_bytes()
    assert r.json()["overlay"]["digest"] == "sha256:" + h.file_sha256(pair.overlay)
    synth = tmp_path / "synth.qcow2"
    r = cli("apply", ref, "--base", pair.base, "-o", synth, "--plain-http")
    assert r.code == 0, r.err
    assert h.qemu_img("compare", pair.app, synth, check=False).returncode == 0
    r = cli("verify", ref, "--base", pair.base, "--plain-http", "--json")
    assert r.code == 0, r.err
    assert r.json()["checks"]["base"] == "ok"
    info = cli("inspect", ref, "--plain-http", "--json")
    assert info.code == 0, info.err
    assert info.json()["sizes"]["overlay"] == pair.overlay.stat().st_size
    assert info.json()["registry"]["annotations"]["vmsynth.base.name"] == "base.qcow2"
    by_digest = f"{registry.ref('apps/app')}@{info.json()['registry']['digest']}"
    assert cli("verify", by_digest, "--plain-http").code == 0


def test_a_dropped_connection_is_resumed_with_a_range_request(cli, h, registry, pair, proxy,
                                                              tmp_path):
    """The link drops after 700 KB of the overlay: apply carries on from that byte (a Range
    request the registry answers 206) and the result is exact."""
    assert cli("push", pair.overlay, registry.ref("apps/resume:1"), "--plain-http").code == 0
    proxy.cut_after, proxy.cuts = 700_000, 1
    synth = tmp_path / "synth.qcow2"
    r = cli("apply", proxy.ref("apps/resume:1"), "--base", pair.base, "-o", synth,
            "--plain-http")
    assert r.code == 0, r.err
    assert h.read_image(synth) == pair.app_data
    ranges = [rng for method, path, rng in proxy.requests if "/blobs/" in path and rng]
    assert ranges == ["bytes=700000-"], proxy.requests
    proxy.reset()
    proxy.cut_after, proxy.cuts = 300_000, 2  # twice: pull resumes twice
    out = tmp_path / "pulled.vmo"
    r = cli("pull", proxy.ref("apps/resume:1"), "-o", out, "--plain-http", "--json")
    assert r.code == 0, r.err
    assert r.json()["resumed"] == 2
    assert out.read_bytes() == pair.overlay.read_bytes()


def test_a_registry_that_ignores_range_is_detected(cli, registry, pair, proxy, tmp_path):
    """A middlebox drops the Range header, so the rest comes back as the whole blob (200):
    vmsynth refuses it rather than appending it, and writes nothing."""
    assert cli("push", pair.overlay, registry.ref("apps/norange:1"), "--plain-http").code == 0
    proxy.cut_after, proxy.cuts, proxy.strip_range = 500_000, 1, True
    synth = tmp_path / "synth.qcow2"
    r = cli("apply", proxy.ref("apps/norange:1"), "--base", pair.base, "-o", synth,
            "--plain-http")
    assert r.code == ExitCode.REGISTRY_UNREACHABLE, r.err
    assert "200, not 206" in r.err and r.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    proxy.cuts = 1
    r = cli("pull", proxy.ref("apps/norange:1"), "-o", tmp_path / "x.vmo", "--plain-http")
    assert r.code == ExitCode.REGISTRY_UNREACHABLE, r.err
    assert list(tmp_path.iterdir()) == []


def _own_overlay(h, tmp_path: Path, seed: str) -> Pair:
    """An overlay no other test pushes (the registry stores a blob once for all)."""
    return _pair(h, tmp_path / seed, seed, new=MIB)


def test_a_damaged_blob_is_refused_by_its_digest(cli, h, registry, tmp_path):
    """Bit rot in the registry's storage: pull, apply and verify all say the blob does not
    match its digest (exit 31) and leave nothing."""
    own = _own_overlay(h, tmp_path, "rot")
    ref = registry.ref("apps/rot:1")
    r = cli("push", own.overlay, ref, "--plain-http", "--json")
    assert r.code == 0, r.err
    blob = registry.blob_file(r.json()["overlay"]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["pull", ref, "-o", out / "x.vmo"],
                 ["apply", ref, "--base", own.base, "-o", out / "x.qcow2"],
                 ["verify", ref]):
        r = cli(*argv, "--plain-http")
        assert r.code == ExitCode.DIGEST_MISMATCH, (argv, r.err)
        assert "does not match its digest" in r.err and r.err.count("\n") == 1
    assert list(out.iterdir()) == []


def test_a_truncated_blob_is_refused(cli, h, registry, tmp_path):
    own = _own_overlay(h, tmp_path, "cut")
    ref = registry.ref("apps/cut:1")
    r = cli("push", own.overlay, ref, "--plain-http", "--json")
    assert r.code == 0, r.err
    blob = registry.blob_file(r.json()["overlay"]["digest"])
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size - 4096)
    r = cli("pull", ref, "-o", tmp_path / "x.vmo", "--plain-http")
    assert r.code == ExitCode.DIGEST_MISMATCH, r.err
    assert "truncated" in r.err
    assert not (tmp_path / "x.vmo").exists()


def test_a_missing_tag_another_artifact_and_no_registry(cli, h, registry, pair, tmp_path):
    assert cli("push", pair.overlay, registry.ref("apps/kinds:1"), "--plain-http").code == 0
    r = cli("apply", registry.ref("apps/kinds:nope"), "--base", pair.base, "-o",
            tmp_path / "x.qcow2", "--plain-http")
    assert r.code == ExitCode.REGISTRY_NOT_FOUND, r.err
    assert "apps/kinds:nope" in r.err and r.err.count("\n") == 1
    r = cli("pull", registry.ref("nothing/here:1"), "-o", tmp_path / "x.vmo", "--plain-http")
    assert r.code == ExitCode.REGISTRY_NOT_FOUND, r.err
    # A container image (an OCI image config, one layer) where an overlay is expected.
    client = Client(registry.host, Access(plain_http=True))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = b"not an overlay"
    for data in (config, layer):
        client.push_blob("apps/image", "sha256:" + hashlib.sha256(data).hexdigest(),
                         len(data), lambda d=data: io.BytesIO(d))
    image = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": len(layer),
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest()}]}).encode()
    client.put_manifest(Reference.parse(registry.ref("apps/image:1")), image,
                        "application/vnd.oci.image.manifest.v1+json")
    for argv in (["apply", registry.ref("apps/image:1"), "--base", pair.base, "-o",
                  tmp_path / "x.qcow2"],
                 ["pull", registry.ref("apps/image:1"), "-o", tmp_path / "x.vmo"],
                 ["base", "pull", registry.ref("apps/image:1")],
                 ["base", "pull", registry.ref("apps/kinds:1")]):
        r = cli(*argv, "--plain-http")
        assert r.code == ExitCode.WRONG_ARTIFACT, (argv, r.err)
        assert "not a vmsynth" in r.err and r.err.count("\n") == 1
    assert "container image" in cli("pull", registry.ref("apps/image:1"), "-o",
                                     tmp_path / "x.vmo", "--plain-http").err
    assert bases.entries() == []
    assert not list(tmp_path.glob("x.*"))
    # Nothing listens there; and a plain-HTTP registry asked for TLS.
    r = cli("pull", f"oci://127.0.0.1:{_free_port()}/apps/app:1", "-o", tmp_path / "x.vmo",
            "--plain-http")
    assert r.code == ExitCode.REGISTRY_UNREACHABLE and "connection refused" in r.err, r.err
    r = cli("pull", registry.ref("apps/kinds:1"), "-o", tmp_path / "x.vmo")
    assert r.code == ExitCode.REGISTRY_UNREACHABLE and "--plain-http" in r.err, r.err



@pytest.mark.parametrize(("spec", "need", "ok"), [
    ("oci://reg.example.com/a/b:1", "tag", ("reg.example.com", "a/b", "1", None)),
    ("oci://127.0.0.1:5000/apps/app@sha256:" + "a" * 64, "tag or digest",
     ("127.0.0.1:5000", "apps/app", None, "sha256:" + "a" * 64)),
    ("oci://127.0.0.1:5000/apps/app", "", ("127.0.0.1:5000", "apps/app", None, None)),
    ("oci://h:5000/a/b:v1.2_3@sha256:" + "b" * 64, "tag or digest",
     ("h:5000", "a/b", "v1.2_3", "sha256:" + "b" * 64)),
    ("oci://h/a", "tag or digest", None),  # nothing to fetch by
    ("oci://h/a:1", "", None),  # a repository was asked for
    ("oci://h/a@sha256:" + "c" * 64, "repository or tag", None),
    ("oci://h/Upper:1", "tag", None),
    ("oci://user:pw@h/a:1", "tag", None),
    ("oci://h/a:-bad", "tag", None),
    ("oci://h/a@sha256:abc", "tag or digest", None),
    ("https://h/a:1", "tag", None),
    ("oci://h", "tag", None),
])
def test_references(spec, need, ok):
    if ok is None:
        with pytest.raises(UsageError) as info:
            Reference.parse(spec, need)
        assert "pw" not in str(info.value)
        return
    ref = Reference.parse(spec, need)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == ok
    assert str(ref) == spec


def test_reference_mistakes_are_told_in_words(cli, tmp_path):
    """One line that says what to write (every message passes the URL redactor: a pattern
    like HOST[:PORT] in it would come out as "a malformed URL")."""
    for argv, words in ((["pull"], "Missing argument 'oci://HOST/REPOSITORY:TAG'"),
                        (["push", tmp_path / "x.vmo", "oci://h/a"], "write oci://HOST/"),
                        (["base", "sync", "oci://h/a:1"], "without a tag"),
                        (["pull", "oci://h/A:1", "-o", tmp_path / "x"], "not a repository")):
        r = cli(*argv)
        assert r.code == ExitCode.USAGE, (argv, r.err)
        assert words in r.err and "malformed" not in r.err and r.err.count("\n") == 1, r.err


def test_versions_sort_naturally():
    """Which versions `base sync --keep N` keeps, and which one a delta starts from."""
    versions = ["12.10", "2", "12.9", "12.9.1", "1.0", "10", "2024.01.15", "2023.12.31"]
    assert sorted(versions, key=version_key) == ["1.0", "2", "10", "12.9", "12.9.1", "12.10",
                                                 "2023.12.31", "2024.01.15"]


# ------------------------------------------------------------------------------ auth

USER, PASSWORD = "cloudlet-ops", "s3cret-" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-registry")
    if not shutil.which("htpasswd"):
        pytest.skip("htpasswd (apache2-utils) not installed")
    line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True,
                          text=True, check=True).stdout.strip()
    (root / "htpasswd").write_text(line + "\n")
    reg = Registry(root, auth=f"auth:\n  htpasswd:\n    realm: vmsynth-test\n"
                              f"    path: {root / 'htpasswd'}\n")
    yield reg
    reg.stop()


def _docker_config(folder: Path, entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(entries))
    return folder


def test_basic_auth_from_docker_login_or_a_token_file(cli, h, auth_registry, pair, tmp_path,
                                                      monkeypatch):
    ref = auth_registry.ref("private/app:1")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    r = cli("push", pair.overlay, ref, "--plain-http")
    assert r.code == ExitCode.REGISTRY_UNAUTHORIZED, r.err
    assert "wants credentials" in r.err and "docker login" in r.err
    wrong = tmp_path / "wrong"
    wrong.write_text(f"{USER}:not-{PASSWORD}\n")
    r = cli("push", pair.overlay, ref, "--plain-http", "--registry-token-file", wrong, "--json")
    assert r.code == ExitCode.REGISTRY_UNAUTHORIZED, r.err
    assert "refused the credentials" in r.err
    assert "not-" + PASSWORD not in r.err + r.out
    token = tmp_path / "token"
    token.write_text(f"{USER}:{PASSWORD}\n")
    r = cli("push", pair.overlay, ref, "--plain-http", "--registry-token-file", token)
    assert r.code == 0, r.err
    # What `docker login` writes: auths[host].auth = base64(user:password).
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    monkeypatch.setenv("DOCKER_CONFIG", str(_docker_config(
        tmp_path / "docker", {"auths": {auth_registry.host: {"auth": auth}}})))
    out = tmp_path / "pulled.vmo"
    r = cli("pull", ref, "-o", out, "--plain-http")
    assert r.code == 0, r.err
    assert out.read_bytes() == pair.overlay.read_bytes()
    synth = tmp_path / "synth.qcow2"
    assert cli("apply", ref, "--base", pair.base, "-o", synth, "--plain-http").code == 0
    assert h.read_image(synth) == pair.app_data
    # A credential helper (credsStore), as Docker Desktop and `pass` users have.
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-vmstest"
    helper.write_text("#!/bin/sh\nread host\n"
                      f"[ \"$host\" = \"{auth_registry.host}\" ] || exit 1\n"
                      f"echo '{{\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(_docker_config(tmp_path / "docker-helper",
                                                           {"credsStore": "vmstest"})))
    r = cli("verify", ref, "--plain-http", "--json")
    assert r.code == 0, r.err
    for text in (r.out, r.err):
        assert PASSWORD not in text


class TokenService:
    """A registry's token service, as Docker Hub, GHCR or Harbor run one: it answers
    GET /token?service=...&scope=... for a known user with a JWT (RS256, the signing
    certificate in x5c) that the registry verifies against its root certificate."""

    ISSUER, SERVICE = "vmsynth-test-issuer", "vmsynth-test-registry"

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmsynth test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = root / "token-root.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        self.asked: list[tuple[str | None, str]] = []  # (user, scope)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = service.user(self.headers.get("Authorization", ""))
                scope = " ".join(query.get("scope", []))
                service.asked.append((user, scope))
                if user is None or query.get("service") != [service.SERVICE]:
                    body, status = b'{"errors":[{"code":"UNAUTHORIZED"}]}', 401
                else:
                    body, status = json.dumps({"token": service.jwt(user, scope),
                                               "expires_in": 300}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    @staticmethod
    def user(header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return user if (user, password) == (USER, PASSWORD) else None

    def jwt(self, user: str, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for item in scope.split():
            kind, name, actions = item.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        claims = {"iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + 300,
                  "nbf": now - 30, "iat": now - 30, "jti": secrets.token_hex(8),
                  "access": access}
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _scopes(tokens: TokenService) -> list[tuple[str | None, str, set[str]]]:
    """(user, repository, actions) of every token asked for."""
    out = []
    for user, scope in tokens.asked:
        for item in scope.split():
            kind, name, actions = item.split(":")
            assert kind == "repository"
            out.append((user, name, set(actions.split(","))))
    return out


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenService(root)
    reg = Registry(root, auth=f"auth:\n  token:\n    realm: {tokens.realm}\n"
                              f"    service: {tokens.SERVICE}\n    issuer: {tokens.ISSUER}\n"
                              f"    rootcertbundle: {tokens.pem}\n")
    yield reg, tokens
    reg.stop()
    tokens.close()


def test_the_bearer_token_flow(cli, h, token_registry, pair, tmp_path, monkeypatch):
    """The registry answers 401 with `WWW-Authenticate: Bearer realm=...,service=...,
    scope=...`: vmsynth asks the realm for a token for that scope (with the user's
    credentials) and repeats the request with it."""
    reg, tokens = token_registry
    ref = reg.ref("bearer/app:1")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    r = cli("push", pair.overlay, ref, "--plain-http")
    assert r.code == ExitCode.REGISTRY_UNAUTHORIZED, r.err
    assert "token service refused an anonymous token" in r.err
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    monkeypatch.setenv("DOCKER_CONFIG", str(_docker_config(
        tmp_path / "docker", {"auths": {f"http://{reg.host}": {"auth": auth}}})))
    tokens.asked.clear()
    r = cli("push", pair.overlay, ref, "--plain-http")
    assert r.code == 0, r.err
    assert (USER, "bearer/app", {"pull", "push"}) in _scopes(tokens), tokens.asked
    synth = tmp_path / "synth.qcow2"
    r = cli("apply", ref, "--base", pair.base, "-o", synth, "--plain-http")
    assert r.code == 0, r.err
    assert h.read_image(synth) == pair.app_data
    assert (USER, "bearer/app", {"pull"}) in _scopes(tokens), tokens.asked


def test_tls_with_a_private_ca(cli, pair, tmp_path, tmp_path_factory, monkeypatch):
    """HTTPS by default: a registry with a certificate from a private CA is trusted through
    SSL_CERT_FILE, and refused (32, with the hint) without it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("tls-registry")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    reg = Registry(root, tls=(root / "cert.pem", root / "key.pem"))
    try:
        ref = reg.ref("tls/app:1")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
        r = cli("push", pair.overlay, ref)
        assert r.code == ExitCode.REGISTRY_UNREACHABLE, r.err
        assert "certificate" in r.err.lower()
        monkeypatch.setenv("SSL_CERT_FILE", str(root / "cert.pem"))
        r = cli("push", pair.overlay, ref)
        assert r.code == 0, r.err
        out = tmp_path / "pulled.vmo"
        assert cli("pull", ref, "-o", out).code == 0
        assert out.read_bytes() == pair.overlay.read_bytes()
    finally:
        reg.stop()


# ------------------------------------------------------------------------------ bases

@pytest.fixture(scope="module")
def guest(h):
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if not h.which(tool):
            if os.environ.get("CI"):
                pytest.fail(f"{tool} missing: CI must run the registry tests")
            pytest.skip(f"{tool} not installed")
    build = subprocess.run(["bash", str(REPO / "fixtures" / "build-guest.sh"), str(GUEST_DIR)],
                           capture_output=True, text=True, timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    return GUEST_DIR


@dataclass
class Versions:
    dir: Path
    v1: Path  # the fixture's base
    v2: Path  # the same with 2 MiB of new data in free space: an update of the base
    overlay: Path  # the fixture's app, made for v1


@pytest.fixture(scope="module")
def versions(h, guest, tmp_path_factory) -> Versions:
    d = tmp_path_factory.mktemp("versions")
    data = bytearray(h.read_image(guest / "base.qcow2"))
    data[40 * MIB: 42 * MIB] = h.det_bytes("base v2", 2 * MIB)  # free blocks of the ext4
    v2 = h.write_image(d / "base-v2.qcow2", bytes(data))
    overlay = d / "app.vmo"
    h.run(h.VMSYNTH, "create", "--base", guest / "base.qcow2", "--disk", guest / "app.qcow2",
          "-o", overlay)
    return Versions(d, guest / "base.qcow2", v2, overlay)


def _identity(path: Path) -> bases.Identity:
    base = bases.load_path(path)
    base.close()
    return base.identity


class Homes:
    """Several base caches (a publisher, cloudlet sites), one VMSYNTH_HOME each."""

    def __init__(self, root: Path, cli, monkeypatch) -> None:
        self.root, self.cli, self.monkeypatch = root, cli, monkeypatch

    def home(self, name: str) -> Path:
        return self.root / name

    def __call__(self, name: str, *argv):
        self.monkeypatch.setenv("VMSYNTH_HOME", str(self.home(name)))
        return self.cli(*argv)

    def entries(self, name: str) -> list[dict]:
        self.monkeypatch.setenv("VMSYNTH_HOME", str(self.home(name)))
        return bases.entries()


@pytest.fixture
def homes(cli, monkeypatch, tmp_path):
    return Homes(tmp_path, cli, monkeypatch)


def _add(homes: Homes, home: str, image: Path, version: str, guest: Path, name: str = "tiny",
         append: str = APPEND, ready: str = "VMSYNTH-MARKER-END") -> None:
    r = homes(home, "base", "add", image, "--name", name, "--version", version, "--kernel",
              guest / "kernel", "--initrd", guest / "initramfs.cpio.gz", "--append", append,
              "--ram", "256M", "--ready", ready)
    assert r.code == 0, r.err


@pytest.mark.vm
def test_three_sites_pull_run_and_sync_by_delta(h, homes, registry, proxy, versions, guest,
                                                tmp_path):
    """One publisher, three cloudlet sites, one registry. Each site installs tiny@1 and
    runs the app's overlay from the registry. Then tiny@2 is published: each site's sync
    fetches only the overlay between the versions (the middlebox counts every byte it
    passes on: at most that overlay + 1 MB), rebuilds tiny@2 with its identity checked,
    and drops tiny@1 (--keep 1); the app's overlay, made for tiny@1, is refused on tiny@2."""
    repo = "bases/tiny"
    _add(homes, "publisher", versions.v1, "1", guest)
    r = homes("publisher", "base", "push", "tiny@1", registry.ref(repo), "--plain-http",
              "--json")
    assert r.code == 0, r.err
    v1 = r.json()
    assert v1["reference"] == registry.ref(f"{repo}:1")
    assert {layer["file"] for layer in v1["layers"]} == {"disk.qcow2", "kernel", "initrd"}
    r = homes("publisher", "push", versions.overlay, registry.ref("apps/tiny-app:1"),
              "--plain-http")
    assert r.code == 0, r.err
    sites = ["site-a", "site-b", "site-c"]
    for site in sites:
        proxy.reset()
        r = homes(site, "base", "pull", proxy.ref(f"{repo}:1"), "--plain-http", "--json")
        assert r.code == 0, r.err
        assert r.json()["method"] == "full" and r.json()["base"] == "tiny@1"
        [entry] = homes.entries(site)
        assert entry["digest"] == _identity(versions.v1).digest
        assert Path(entry["path"]).parent == homes.home(site) / "images" / "tiny@1"
        serial = tmp_path / f"{site}.serial"
        r = homes(site, "run", registry.ref("apps/tiny-app:1"), "--base", "tiny@1",
                  "--plain-http", "--accel", "tcg", "--vnc", "none", "--serial", serial)
        assert r.code == 0, r.err
        assert MARKER in serial.read_text(errors="replace")
    full_v1 = sum(layer["size"] for layer in v1["layers"])

    _add(homes, "publisher", versions.v2, "2", guest)
    r = homes("publisher", "base", "push", "tiny@2", registry.ref(repo), "--plain-http",
              "--json")
    assert r.code == 0, r.err
    v2 = r.json()
    delta = v2["delta"]
    assert delta["from"] == "tiny@1" and delta["uploaded"], delta
    # The kernel and initrd are the same blobs: the registry had them.
    assert [layer["file"] for layer in v2["layers"] if layer["uploaded"]] == ["disk.qcow2"]
    v2_identity = _identity(versions.v2)
    measured = {}
    for site in sites:
        proxy.reset()
        r = homes(site, "base", "sync", proxy.ref(repo), "--keep", "1", "--plain-http",
                  "--json")
        assert r.code == 0, r.err
        report = r.json()
        [installed] = report["bases"]
        assert (installed["base"], installed["method"], installed["from"]) == \
            ("tiny@2", "delta", "tiny@1"), installed
        assert report["removed"] == ["tiny@1"]
        measured[site] = proxy.sent
        assert proxy.sent <= delta["size"] + 1_000_000, (proxy.sent, delta["size"])
        assert report["bytes_received"] <= proxy.sent
        [entry] = homes.entries(site)
        assert (entry["version"], entry["digest"]) == ("2", v2_identity.digest)
        assert h.qemu_img("compare", versions.v2, entry["path"], check=False).returncode == 0
        assert not (homes.home(site) / "images" / "tiny@1").exists()
        r = homes(site, "verify", registry.ref("apps/tiny-app:1"), "--base", "tiny@2",
                  "--plain-http")
        assert r.code == ExitCode.BASE_MISMATCH, r.err
        # A second sync has nothing to do.
        proxy.reset()
        r = homes(site, "base", "sync", proxy.ref(repo), "--keep", "1", "--plain-http",
                  "--json")
        assert r.code == 0 and r.json()["bases"][0]["action"] == "present", r.err
    print(f"\nsync by delta: {measured} bytes through the middlebox; delta "
          f"{delta['size']:,} bytes; a full pull of tiny@1 was {full_v1:,} bytes of blobs")
    assert max(measured.values()) < full_v1 / 2


def test_sync_keeps_a_version_in_use_and_removes_it_later(h, homes, registry, versions,
                                                          guest, monkeypatch):
    repo = "bases/busy"
    for version, image in (("1", versions.v1), ("2", versions.v2)):
        _add(homes, "publisher", image, version, guest)
        r = homes("publisher", "base", "push", f"tiny@{version}", registry.ref(repo),
                  "--plain-http")
        assert r.code == 0, r.err
    assert homes("site", "base", "pull", registry.ref(f"{repo}:1"), "--plain-http").code == 0
    monkeypatch.setenv("VMSYNTH_HOME", str(homes.home("site")))
    in_use = bases.resolve("tiny@1")  # what a running session holds: a shared lock
    try:
        r = homes("site", "base", "sync", registry.ref(repo), "--keep", "1", "--plain-http",
                  "--json")
        assert r.code == 0, r.err
        assert r.json()["kept_in_use"] == ["tiny@1"] and r.json()["removed"] == []
        assert sorted(e["version"] for e in homes.entries("site")) == ["1", "2"]
    finally:
        in_use.close()
    r = homes("site", "base", "sync", registry.ref(repo), "--keep", "1", "--plain-http",
              "--json")
    assert r.code == 0 and r.json()["removed"] == ["tiny@1"], r.err
    assert [e["version"] for e in homes.entries("site")] == ["2"]
    assert sorted(p.name for p in (homes.home("site") / "images").iterdir()) == ["tiny@2"]
    # A pulled base's files belong to the cache: `base rm` takes them too.
    assert homes("site", "base", "rm", "tiny@2").code == 0
    assert list((homes.home("site") / "images").iterdir()) == []


def test_an_interrupted_or_killed_pull_leaves_nothing(h, homes, registry, proxy, versions,
                                                      guest):
    """SIGTERM in the middle of a base pull: exit 143, no entry, no files. kill -9: the
    temporary folder stays until the next pull, which removes it and installs the base."""
    repo = "bases/slow"
    _add(homes, "publisher", versions.v1, "1", guest)
    assert homes("publisher", "base", "push", "tiny@1", registry.ref(repo),
                 "--plain-http").code == 0
    home = homes.home("site")
    env = os.environ | {"VMSYNTH_HOME": str(home)}
    proxy.trickle = 0.05  # ~1.3 MB/s: the pull takes ~12 s
    argv = [str(h.VMSYNTH), "base", "pull", proxy.ref(f"{repo}:1"), "--plain-http"]
    images = home / "images"
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGKILL, -9)):
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        deadline = time.monotonic() + 60
        while not any(images.glob(".tiny@1.*")) or proxy.sent < 2 * MIB:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the pull did not start"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == code, err
        assert homes.entries("site") == []
        leftovers = [q.name for q in images.iterdir()]
        if sig == signal.SIGTERM:
            assert leftovers == [], leftovers
            assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM", err
            assert err.count("error:") == 1, err
        else:
            assert len(leftovers) == 1 and leftovers[0].startswith(".tiny@1."), leftovers
        proxy.reset()
    proxy.trickle = None
    r = homes("site", "base", "pull", proxy.ref(f"{repo}:1"), "--plain-http")
    assert r.code == 0, r.err
    assert [q.name for q in images.iterdir()] == ["tiny@1"]
    assert [e["version"] for e in homes.entries("site")] == ["1"]


def test_a_base_pull_resumes_a_dropped_link_and_refuses_a_damaged_blob(h, homes, registry,
                                                                       proxy, tmp_path):
    """A base of its own (no other test shares its blobs): a pull through a link that drops
    twice is resumed and installs the base; once its disk blob rots in the registry, a pull
    refuses it (31) and the cache stays as it was."""
    data = b"".join(h.text_block(f"own base {i}") for i in range(64)) + \
        h.det_bytes("own base", 3 * MIB)
    disk = h.write_image(tmp_path / "own.qcow2", data)
    assert homes("publisher", "base", "add", disk, "--name", "own", "--version",
                 "1").code == 0
    r = homes("publisher", "base", "push", "own@1", registry.ref("bases/own"), "--plain-http",
              "--json")
    assert r.code == 0, r.err
    [layer] = r.json()["layers"]
    proxy.cut_after, proxy.cuts = 1_000_000, 2
    r = homes("site", "base", "pull", proxy.ref("bases/own:1"), "--plain-http", "--json")
    assert r.code == 0, r.err
    ranges = [rng for _, path, rng in proxy.requests if layer["digest"] in path and rng]
    assert ranges == ["bytes=1000000-", "bytes=2000000-"], proxy.requests
    [entry] = homes.entries("site")
    assert entry["digest"] == _identity(disk).digest
    blob = registry.blob_file(layer["digest"])
    rotten = bytearray(blob.read_bytes())
    rotten[-100] ^= 1
    blob.write_bytes(bytes(rotten))
    r = homes("site2", "base", "pull", registry.ref("bases/own:1"), "--plain-http", "--json")
    assert r.code == ExitCode.DIGEST_MISMATCH, r.err
    assert r.json()["error"]["kind"] == "digest_mismatch"
    assert homes.entries("site2") == []
    assert list((homes.home("site2") / "images").iterdir()) == []


def test_a_base_whose_files_are_not_its_identity_is_not_installed(h, homes, registry,
                                                                  versions, guest):
    """A base published with a config that states other contents than its disk holds (a
    damaged or forged publication): every blob matches its digest, but the identity check
    refuses the base (31) and the cache is left as it was."""
    repo = "bases/forged"
    _add(homes, "publisher", versions.v1, "1", guest)
    assert homes("publisher", "base", "push", "tiny@1", registry.ref(repo),
                 "--plain-http").code == 0
    client = Client(registry.host, Access(plain_http=True))
    manifest, _, _ = client.get_manifest(Reference.parse(registry.ref(f"{repo}:1")))
    reader = client.open_blob(repo, manifest["config"])
    config = json.loads(b"".join(iter(lambda: reader.read(1 << 20), b"")))
    reader.close()
    v2 = _identity(versions.v2)
    config |= {"version": "9", "digest": v2.digest}  # claims v2's contents, holds v1's disk
    raw = json.dumps(config).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    client.push_blob(repo, digest, len(raw), lambda: io.BytesIO(raw))
    manifest["config"] |= {"digest": digest, "size": len(raw)}
    manifest["annotations"] |= {"vmsynth.base.version": "9", "vmsynth.base.digest": v2.digest}
    client.put_manifest(Reference.parse(registry.ref(f"{repo}:9")),
                        json.dumps(manifest).encode(), manifest["mediaType"])
    r = homes("site", "base", "pull", registry.ref(f"{repo}:9"), "--plain-http", "--json")
    assert r.code == ExitCode.DIGEST_MISMATCH, r.err
    assert "not the base it was published as" in r.err and r.err.count("\n") == 1
    assert r.json()["error"]["kind"] == "digest_mismatch"
    assert homes.entries("site") == []
    assert list((homes.home("site") / "images").iterdir()) == []


def test_a_base_with_a_memory_snapshot_travels_and_its_delta_carries_memory(
        h, homes, registry, tmp_path):
    """A base with a ready-state memory snapshot (synthetic, written by the same writer
    `vmsynth snapshot` uses): pushed with its .vmem, pulled with the snapshot's digest
    checked, and the next version's delta rebuilds disk and memory both."""
    from vmsynth import memory

    machine = memory.MachineInfo("pc-i440fx-7.2", "qemu64", 2 * MIB, "7.2.22", 1, False, True,
                                 (), "tcg")
    ram1 = b"".join(h.text_block(f"page {i}") for i in range(512))
    ram2 = bytearray(ram1)
    ram2[MIB: MIB + 64 * 4096] = h.det_bytes("ram v2", 64 * 4096)
    images = {}
    for version, ram, extra in (("1", ram1, b""), ("2", bytes(ram2), b"v2")):
        raw = tmp_path / f"ram{version}.raw"
        raw.write_bytes(ram)
        vmem = tmp_path / f"mem{version}.vmem"
        memory.write_vmem(vmem, raw, machine, b"device state " + extra)
        data = b"".join(h.text_block(f"disk {i} {extra!r}") for i in range(128))
        disk = h.write_image(tmp_path / f"disk{version}.qcow2", data)
        images[version] = (disk, vmem)
        r = homes("publisher", "base", "add", disk, "--memory", vmem, "--name", "warm",
                  "--version", version)
        assert r.code == 0, r.err
        r = homes("publisher", "base", "push", f"warm@{version}", registry.ref("bases/warm"),
                  "--plain-http", "--json")
        assert r.code == 0, r.err
        pushed = r.json()
        assert [layer["file"] for layer in pushed["layers"]] == ["disk.qcow2", "memory.vmem"]
    assert pushed["delta"]["from"] == "warm@1" and pushed["delta"]["memory"] is True
    r = homes("site", "base", "pull", registry.ref("bases/warm:1"), "--plain-http", "--json")
    assert r.code == 0 and r.json()["method"] == "full", r.err
    r = homes("site", "base", "sync", registry.ref("bases/warm"), "--plain-http", "--json")
    assert r.code == 0, r.err
    assert [(b["base"], b["action"], b.get("method")) for b in r.json()["bases"]] == \
        [("warm@1", "present", None), ("warm@2", "installed", "delta")]
    published = {e["version"]: e for e in homes.entries("publisher")}
    for e in homes.entries("site"):
        assert e["memory"]["digest"] == published[e["version"]]["memory"]["digest"]
        assert e["digest"] == published[e["version"]]["digest"]
        vmem = images[e["version"]][1]
        assert Path(e["memory"]["path"]).read_bytes() == vmem.read_bytes()


@pytest.mark.vm
def test_serve_fetches_a_base_a_client_asks_for(h, homes, registry, versions, guest, pair,
                                                 tmp_path):
    """`serve --registry`: a cloudlet without the overlay's base answers "fetching" (202,
    Retry-After) instead of refusing, installs the base from the registry, and the client,
    asking again, gets its VM."""
    repo = "bases/served"
    counter = APPEND + " vmsynth.mode=counter"
    _add(homes, "publisher", versions.v1, "1", guest, name="counting", append=counter,
         ready="VMSYNTH-READY")
    assert homes("publisher", "base", "push", "counting@1", registry.ref(repo),
                 "--plain-http").code == 0
    assert homes("publisher", "push", versions.overlay, registry.ref("apps/served:1"),
                 "--plain-http").code == 0  # offloaded straight from the registry
    d = Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))  # short: QMP socket paths
    env = os.environ | {"VMSYNTH_HOME": str(d / "cloudlet"), "TMPDIR": str(d)}
    log = open(d / "serve.log", "w")  # noqa: SIM115 (the service's lifetime)
    serve = subprocess.Popen(
        [str(h.VMSYNTH), "serve", "--listen", "127.0.0.1:0", "--no-tls", "--accel", "tcg",
         "--no-advertise", "--grace", "1", "--registry", registry.ref(repo), "--plain-http",
         "--json"], env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        start_new_session=True)
    offload = None
    try:
        assert serve.stdout is not None
        event = _next_json(serve.stdout)
        assert event["event"] == "serving" and event["bases"] == [], event
        offload = subprocess.Popen(
            [str(h.VMSYNTH), "offload", registry.ref("apps/served:1"), "--plain-http",
             "--cloudlet", event["url"], "--json"],
            env=os.environ | {"TMPDIR": str(d)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        seen: list[dict] = []
        assert offload.stdout is not None
        while not seen or seen[-1].get("event") != "running":
            seen.append(_next_json(offload.stdout))
        kinds = [e["event"] for e in seen]
        assert kinds[0] == "fetching" and kinds[-2:] == ["negotiated", "running"], kinds
        assert seen[0]["registry"] == registry.ref(repo) and seen[0]["retry_after"] == 3
        offload.send_signal(signal.SIGINT)
        _, err = offload.communicate(timeout=HANG)
        assert offload.returncode == 0, err
        env_home = {"VMSYNTH_HOME": str(d / "cloudlet")}
        listed = subprocess.run([str(h.VMSYNTH), "base", "list", "--json"],
                                env=os.environ | env_home, capture_output=True, text=True,
                                check=True)
        assert [e["name"] for e in json.loads(listed.stdout)] == ["counting"]
        # A base the registry does not publish: told so after the lookup (exit 10).
        foreign = subprocess.run(
            [str(h.VMSYNTH), "offload", pair.overlay, "--cloudlet", event["url"], "--json"],
            env=os.environ | {"TMPDIR": str(d)}, capture_output=True, text=True, timeout=HANG,
            check=False)
        assert foreign.returncode == ExitCode.BASE_MISMATCH, foreign.stderr
        assert "does not publish it" in foreign.stderr, foreign.stderr
        assert foreign.stderr.count("\n") == 1
    finally:
        for p in (offload, serve):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        log.close()
        for pid in h.qemu_processes(str(d)):  # only after a failed test: never leak a VM
            os.kill(pid, signal.SIGKILL)
        service_log = (d / "serve.log").read_text(errors="replace")
        shutil.rmtree(d, ignore_errors=True)
    assert serve.returncode == 0, service_log[-3000:]
    assert "fetching base" in service_log and "is installed" in service_log


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
