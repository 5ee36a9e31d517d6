"""Streaming synthesis: `apply` and `verify` read an overlay from an http(s) URL or a pipe
and rebuild while the bytes arrive, with the same result as from a file."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vmsynth import bases
from vmsynth.errors import ExitCode
from vmsynth.qcow2 import Qcow2Image

BLOCK = 4096


class Server(http.server.ThreadingHTTPServer):
    """Serves one overlay's bytes at /app.vmo; `hold_at` stops sending there until released."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.data = data
        self.hold_at: int | None = None
        self.release = threading.Event()
        self.cut_at: int | None = None  # close the connection there (a broken transfer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/app.vmo"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/app.vmo":
            self.send_error(404, "Not Found")
            return
        data, srv = self.server.data, self.server
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        end = srv.cut_at if srv.cut_at is not None else len(data)
        hold = srv.hold_at if srv.hold_at is not None else end
        self.wfile.write(data[:hold])
        self.wfile.flush()
        if hold < end:
            srv.release.wait(60)
            self.wfile.write(data[hold:end])
        self.wfile.flush()


@contextmanager
def serving(data: bytes) -> Iterator[Server]:
    srv = Server(data)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def test_apply_from_a_url_equals_apply_from_the_file(cli, h, small_pair, tmp_path):
    overlay = tmp_path / "app.vmo"
    overlay.write_bytes(small_pair.multi)
    with serving(small_pair.multi) as srv:
        r = cli("apply", srv.url, "--base", small_pair.base_path, "-o", tmp_path / "u.qcow2",
                "--json")
        assert r.code == 0, r.err
        r = cli("verify", srv.url, "--base", small_pair.base_path, "--json")
        assert r.code == 0, r.err
        assert r.json()["overlay_bytes"] == len(small_pair.multi)
    r = cli("apply", overlay, "--base", small_pair.base_path, "-o", tmp_path / "f.qcow2")
    assert r.code == 0, r.err
    assert h.read_image(tmp_path / "u.qcow2") == h.read_image(tmp_path / "f.qcow2") \
        == small_pair.app_data


def test_apply_from_a_pipe_equals_apply_from_the_file(h, small_pair, tmp_path):
    r = subprocess.run([h.VMSYNTH, "apply", "-", "--base", small_pair.base_path, "-o",
                        tmp_path / "p.qcow2"], input=small_pair.multi, capture_output=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert h.read_image(tmp_path / "p.qcow2") == small_pair.app_data


def test_solid_create_into_a_pipe_and_apply_from_it(h, small_pair, tmp_path):
    """create --solid -o - | apply -: the whole way without a file."""
    out = tmp_path / "p.qcow2"
    create = subprocess.Popen([h.VMSYNTH, "create", "--base", small_pair.base_path, "--disk",
                               small_pair.app_path, "--solid", "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = subprocess.run([h.VMSYNTH, "apply", "-", "--base", small_pair.base_path, "-o", out,
                        "--json"], stdin=create.stdout, capture_output=True, check=False)
    assert create.stdout is not None
    create.stdout.close()
    assert create.wait(60) == 0, create.stderr.read() if create.stderr else ""
    assert r.returncode == 0, r.stderr
    assert h.read_image(out) == small_pair.app_data


@pytest.fixture(scope="module")
def many_frames(h, tmp_path_factory):
    """An overlay of a few hundred small frames: more than the decoder keeps in flight."""
    d = tmp_path_factory.mktemp("many-frames")
    base_data = b"".join(h.text_block(f"b{i}") for i in range(256))
    app_data = bytearray(base_data)
    for i in range(0, 256, 2):
        app_data[i * BLOCK:(i + 1) * BLOCK] = h.det_bytes(i, BLOCK)
    base_path = h.write_image(d / "base.qcow2", base_data)
    app_path = h.write_image(d / "app.qcow2", bytes(app_data), backing=base_path.resolve(),
                             base_data=base_data)
    base, disk = bases.load_path(base_path), Qcow2Image(app_path)
    try:
        overlays = {solid: h.make_overlay(base, disk, frame_data=BLOCK, solid=solid)[0]
                    for solid in (False, True)}
    finally:
        disk.close()
        base.close()
    return base_path, bytes(app_data), overlays


@pytest.mark.parametrize("solid", [False, True], ids=["frames", "solid"])
def test_synthesis_begins_before_the_transfer_ends(h, many_frames, tmp_path, solid):
    """The server holds back the last 100 bytes (part of the trailer) until the rebuilt
    disk's temporary file already holds data: rebuilding overlapped the transfer, also
    when the frames are one solid stream."""
    base_path, app_data, overlays = many_frames
    overlay = overlays[solid]
    out = tmp_path / "synth.qcow2"
    with serving(overlay) as srv:
        srv.hold_at = len(overlay) - 100
        proc = subprocess.Popen([h.VMSYNTH, "apply", srv.url, "--base", base_path, "-o", out],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            written = 0
            while time.monotonic() < deadline and proc.poll() is None:
                temps = list(tmp_path.glob(".synth.qcow2.*.tmp"))
                written = max((t.stat().st_size for t in temps), default=0)
                if written > len(app_data) // 4:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, proc.communicate()
            assert written > len(app_data) // 4, "nothing was rebuilt before the last bytes"
            assert not out.exists()  # the result appears only once it is complete and checked
        finally:
            srv.release.set()
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert h.read_image(out) == app_data


def test_a_missing_url_is_bad_input(cli, small_pair, tmp_path):
    with serving(small_pair.multi) as srv:
        r = cli("apply", srv.url.replace("app.vmo", "nope.vmo"), "--base",
                small_pair.base_path, "-o", tmp_path / "x.qcow2")
    assert r.code == ExitCode.BAD_INPUT and "404" in r.err, r.err
    assert len(r.err.splitlines()) == 1


def test_an_unreachable_server_is_bad_input(cli, small_pair, tmp_path):
    with serving(b"") as srv:
        url = srv.url
    r = cli("apply", url, "--base", small_pair.base_path, "-o", tmp_path / "x.qcow2")
    assert r.code == ExitCode.BAD_INPUT and "cannot fetch" in r.err, r.err
    assert not (tmp_path / "x.qcow2").exists()


def test_a_transfer_that_breaks_off_writes_nothing(cli, small_pair, tmp_path):
    with serving(small_pair.multi) as srv:
        srv.cut_at = len(small_pair.multi) // 2
        r = cli("apply", srv.url, "--base", small_pair.base_path, "-o", tmp_path / "x.qcow2")
    assert r.code == ExitCode.BAD_INPUT and "broke off" in r.err, r.err
    assert len(r.err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
