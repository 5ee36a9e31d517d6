"""Never destroy what the user owns (issue 11), each failure written as a class.

- No output may be an input, by any name: every output option of every command against
  every file that command reads, named directly, through a symlink, a hard link and `..`.
- An output that is not a regular file is written in place or refused, never replaced.
- A damaged memory snapshot is refused by create, as by every other reader.
- A URL that trickles, loops, breaks off or carries secrets: one line, exit 16, no secret.
- Bad local state (names, $VMSYNTH_HOME, damaged cache entries, closed pipes) is bad input,
  never an internal error.
- Signals: a stopped process removes its temporaries; a killed one's are removed by the
  next writer into that folder, whatever its output name, but never a file being read.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import signal
import socket
import socketserver
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsynth import memory, signals, snapshot, store
from vmsynth.errors import ExitCode, UsageError
from vmsynth.memory import MachineInfo

BLOCK = 4096
RAM = 256 * BLOCK
MACHINE = MachineInfo("pc-i440fx-7.2", "qemu64", RAM, "7.2.22", 1, False, True, (), "tcg")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def write_vmem(h, path: Path, ram: bytes, state: bytes) -> Path:
    ram_file = path.with_suffix(".ram")
    ram_file.write_bytes(ram)
    memory.write_vmem(path, ram_file, MACHINE, state)
    ram_file.unlink()
    return path


# ------------------------------------------------------------------------------ the files

@dataclass
class World:
    """Every kind of file a command reads, in one folder, and the cached base s@1."""

    dir: Path
    base: Path
    base_vmem: Path
    mid: Path  # a child of the base ...
    top: Path  # ... and a child of mid: the disk, with a two-file backing chain
    app_vmem: Path
    key: Path
    overlay: Path  # disk + memory, encrypted with `key`
    kernel: Path
    initrd: Path


@pytest.fixture
def world(h, cli, small_pair, tmp_path) -> World:
    d = tmp_path / "w"
    d.mkdir()
    base = h.write_image(d / "base.qcow2", small_pair.base_data)
    mid_data = bytearray(small_pair.base_data)
    mid_data[0:BLOCK] = h.text_block("mid")
    mid = h.write_image(d / "mid.qcow2", bytes(mid_data), backing=base.resolve(),
                        base_data=small_pair.base_data)
    top_data = bytearray(mid_data)
    top_data[5 * BLOCK:6 * BLOCK] = h.text_block("top")
    top = h.write_image(d / "top.qcow2", bytes(top_data), backing=mid.resolve(),
                        base_data=bytes(mid_data))
    ram = bytearray(RAM)
    for i in range(20):
        ram[i * BLOCK:(i + 1) * BLOCK] = h.text_block(f"ram-{i}")
    base_vmem = write_vmem(h, d / "base.vmem", bytes(ram), b"state-a" * 100)
    ram[3 * BLOCK:4 * BLOCK] = h.text_block("app-page")
    app_vmem = write_vmem(h, d / "app.vmem", bytes(ram), b"state-b" * 120)
    assert cli("base", "add", base, "--name", "s", "--version", "1", "--memory",
               base_vmem).code == 0
    key = d / "k.key"
    assert cli("keygen", "-o", key).code == 0
    overlay = d / "app.vmo"
    r = cli("create", "--base", "s@1", "--disk", top, "--memory", app_vmem, "-o", overlay,
            "--encrypt", "--key-file", key)
    assert r.code == 0, r.err
    (d / "vmlinux").write_bytes(b"not really a kernel")
    (d / "initrd.gz").write_bytes(b"not really an initrd")
    return World(d, base, base_vmem, mid, top, app_vmem, key, overlay, d / "vmlinux",
                 d / "initrd.gz")


# Each command with an output option, and the inputs (World fields) it reads.
COMMANDS = {
    "apply -o": (lambda w, out: ["apply", w.overlay, "--base", "s@1", "--key-file", w.key,
                                 "-o", out],
                 ["overlay", "key", "base", "base_vmem"]),
    "apply --memory-output": (lambda w, out: ["apply", w.overlay, "--base", "s@1",
                                              "--key-file", w.key, "-o", w.dir / "r.qcow2",
                                              "--memory-output", out],
                              ["overlay", "key", "base", "base_vmem"]),
    "create -o": (lambda w, out: ["create", "--base", "s@1", "--disk", w.top, "--memory",
                                  w.app_vmem, "--encrypt", "--key-file", w.key, "-o", out],
                  ["base", "base_vmem", "top", "mid", "app_vmem", "key"]),
    "boot --serial": (lambda w, out: ["boot", w.top, "--kernel", w.kernel, "--initrd",
                                      w.initrd, "--serial", out],
                      ["top", "mid", "base", "kernel", "initrd"]),
    "boot --snapshot-on-exit": (lambda w, out: ["boot", w.top, "--snapshot-on-exit", out],
                                ["top", "mid", "base"]),
    "run --serial": (lambda w, out: ["run", w.overlay, "--base", "s@1", "--key-file", w.key,
                                     "--kernel", w.kernel, "--serial", out],
                     ["overlay", "key", "base", "base_vmem", "kernel"]),
}
CASES = [(cmd, field) for cmd, (_, fields) in COMMANDS.items() for field in fields]


def alias(w: World, target: Path, how: str) -> Path:
    """Another name for `target`: itself, a symlink, a hard link, or a path through `..`."""
    if how == "name":
        return target
    if how == "symlink":
        link = w.dir / "elsewhere" / f"link-{target.name}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(target)
        return link
    if how == "hardlink":
        link = w.dir / f"hard-{target.name}"
        os.link(target, link)
        return link
    (w.dir / "sub").mkdir(exist_ok=True)
    return w.dir / "sub" / ".." / target.name


@pytest.mark.parametrize("how", ["name", "symlink", "hardlink", "dotdot"])
@pytest.mark.parametrize(("command", "field"), CASES, ids=[f"{c}={f}" for c, f in CASES])
def test_no_output_is_an_input_by_any_name(cli, world, command, field, how):
    build, _ = COMMANDS[command]
    target = getattr(world, field)
    before = {p: sha(p) for p in world.dir.iterdir() if p.is_file()}
    r = cli(*build(world, alias(world, target, how)))
    assert r.code == ExitCode.USAGE, (r.code, r.err)
    option = command.split()[1]
    assert r.err.startswith("error: ") and r.err.count("\n") == 1, r.err
    assert option in r.err and "refusing to overwrite" in r.err, r.err
    assert str(target.name) in r.err, r.err  # it names the file it would have destroyed
    for path, digest in before.items():
        assert sha(path) == digest, f"{path.name} changed"
    assert temporaries(world.dir) == []


def test_snapshot_output_may_not_be_the_vms_own_files(tmp_path):
    """`vmsynth snapshot -o` names neither the VM's RAM file nor its disk (checked before
    QEMU is touched: the fake QMP object below has no methods at all)."""
    ram, disk = tmp_path / "ram", tmp_path / "disk.qcow2"
    ram.write_bytes(b"r" * 100)
    disk.write_bytes(b"d" * 100)
    launch = {"ram_file": str(ram), "disk": str(disk)}
    for out in (ram, disk, tmp_path / "x" / ".." / "disk.qcow2"):
        (tmp_path / "x").mkdir(exist_ok=True)
        with pytest.raises(UsageError, match="refusing to overwrite"):
            snapshot.take(object(), ram, launch, out)  # type: ignore[arg-type]
    assert ram.read_bytes() == b"r" * 100 and disk.read_bytes() == b"d" * 100


def test_two_outputs_of_one_apply_are_two_files(cli, world):
    for mem in (world.dir / "same.qcow2", world.dir / "sub" / ".." / "same.qcow2"):
        (world.dir / "sub").mkdir(exist_ok=True)
        r = cli("apply", world.overlay, "--base", "s@1", "--key-file", world.key,
                "-o", world.dir / "same.qcow2", "--memory-output", mem)
        assert r.code == ExitCode.USAGE and "same file" in r.err, r.err
    assert not (world.dir / "same.qcow2").exists()


# ------------------------------------------------------------------------------ devices, FIFOs

def device(tmp_path: Path, name: str) -> Path:
    """/dev/null or /dev/full; as root, a node of its own in tmp_path, so that a regression
    replaces that one (root could replace the system's)."""
    minor = {"null": 3, "full": 7}[name]
    if os.geteuid() != 0:
        return Path(f"/dev/{name}")  # a non-root rename into /dev fails anyway
    node = tmp_path / name
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return node


def test_apply_refuses_outputs_that_are_not_regular_files(cli, small_pair, tmp_path):
    vmo = tmp_path / "p.vmo"
    vmo.write_bytes(small_pair.overlay)
    null, fifo = device(tmp_path, "null"), tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, kind in ((null, "a character device"), (fifo, "a FIFO"),
                      (tmp_path, "a directory")):
        r = cli("apply", vmo, "--base", small_pair.base_path, "-o", out)
        assert r.code == ExitCode.USAGE, r.err
        assert f"is {kind}, not a regular file" in r.err or "directory" in r.err, r.err
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_create_writes_a_device_or_fifo_in_place(cli, small_pair, tmp_path):
    base, app = small_pair.base_path, small_pair.app_path
    null, full = device(tmp_path, "null"), device(tmp_path, "full")
    r = cli("create", "--base", base, "--disk", app, "-o", null)
    assert r.code == 0, r.err
    assert stat.S_ISCHR(os.stat(null).st_mode)
    r = cli("create", "--base", base, "--disk", app, "-o", full)
    assert r.code == ExitCode.WRITE_FAILED and "no space left" in r.err, r.err
    assert stat.S_ISCHR(os.stat(full).st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    r = cli("create", "--base", base, "--disk", app, "-o", fifo)
    reader.join(timeout=60)  # a hang guard, not a timing claim
    assert r.code == 0, r.err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    vmo = tmp_path / "through-fifo.vmo"
    vmo.write_bytes(got[0])
    assert cli("apply", vmo, "--base", base, "-o", tmp_path / "r.qcow2").code == 0


def test_create_refuses_a_socket_as_output(cli, small_pair, tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        r = cli("create", "--base", small_pair.base_path, "--disk", small_pair.app_path,
                "-o", path)
    assert r.code == ExitCode.USAGE and "is a socket" in r.err, r.err
    assert stat.S_ISSOCK(os.stat(path).st_mode)


# ------------------------------------------------------------------------------ damaged memory

def test_create_refuses_a_memory_snapshot_that_fails_its_own_digest(cli, world):
    data = bytearray(world.app_vmem.read_bytes())
    data[3 * BLOCK + 10] ^= 0x40  # in the RAM, not the header: only the digest can tell
    bad = world.dir / "m.vmem"
    bad.write_bytes(bytes(data))
    out = world.dir / "o.vmo"
    r = cli("create", "--base", "s@1", "--disk", world.top, "--memory", bad, "-o", out)
    assert r.code == ExitCode.DAMAGED_SNAPSHOT, r.err
    assert "contents are damaged" in r.err.replace(str(world.dir), "<dir>"), r.err
    assert not out.exists() and temporaries(world.dir) == []


# ------------------------------------------------------------------------------ URLs

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""
    user = ("user", "s3cr3t-pw")

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        route = self.path.partition("?")[0]
        if route == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "/trickle":  # one byte every 0.3 s, for ever (the client gives up)
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for i in range(len(self.body)):
                try:
                    self.wfile.write(self.body[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)
        elif route == "/cut":  # chunked, and the connection closes inside a chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % 100_000 + self.body[:300])
            self.wfile.flush()
            self.close_connection = True
        elif route == "/auth":
            token = base64.b64encode(":".join(self.user).encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def server(small_pair):
    handler = type("H", (_Handler,), {"body": small_pair.overlay})

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    with Server(("127.0.0.1", 0), handler) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        yield f"127.0.0.1:{srv.server_address[1]}"
        srv.shutdown()


def _apply_url(cli, small_pair, tmp_path, url, *extra):
    out = tmp_path / "from-url.qcow2"
    r = cli("apply", url, "--base", small_pair.base_path, "-o", out, *extra)
    assert not out.exists() or r.code == 0
    assert temporaries(tmp_path) == []
    return r


def test_a_trickling_server_is_given_up_on(cli, small_pair, tmp_path, server):
    started = time.monotonic()
    r = _apply_url(cli, small_pair, tmp_path, f"http://{server}/trickle",
                   "--speed-limit", "1K", "--speed-time", "2")
    assert r.code == ExitCode.BAD_INPUT, r.err
    assert "below the minimum of 1,024 bytes/s" in r.err, r.err
    assert time.monotonic() - started < 60  # a hang guard: the rule fired, not a timeout


def test_max_time_bounds_a_whole_transfer(cli, small_pair, tmp_path, server):
    r = _apply_url(cli, small_pair, tmp_path, f"http://{server}/trickle",
                   "--speed-limit", "1", "--max-time", "1.5")
    assert r.code == ExitCode.BAD_INPUT and "--max-time of 1.5 s" in r.err, r.err


def test_a_redirect_loop_is_one_line(cli, small_pair, tmp_path, server):
    r = _apply_url(cli, small_pair, tmp_path, f"http://{server}/loop")
    assert r.code == ExitCode.BAD_INPUT and r.err.count("\n") == 1, r.err
    assert "redirects in a loop" in r.err


def test_a_broken_chunked_transfer_is_said_in_the_users_terms(cli, small_pair, tmp_path,
                                                              server):
    r = _apply_url(cli, small_pair, tmp_path, f"http://{server}/cut")
    assert r.code == ExitCode.BAD_INPUT and r.err.count("\n") == 1, r.err
    assert "connection closed before the end" in r.err and "IncompleteRead" not in r.err


def test_url_credentials_work_and_are_never_shown(cli, small_pair, tmp_path, server):
    user, password = _Handler.user
    r = _apply_url(cli, small_pair, tmp_path, f"http://{user}:{password}@{server}/auth")
    assert r.code == 0, r.err
    for url in (f"http://{user}:wrong-pw-42@{server}/auth?token=tok-SECRET-9#frag-x",
                f"http://{user}:wrong-pw-42@{server}/nothing?token=tok-SECRET-9",
                f"http://{user}:wrong-pw-42@127.0.0.1:1/x?token=tok-SECRET-9",
                f"http://{user}:wrong-pw-42@{server}/loop?token=tok-SECRET-9"):
        for command in (["apply", url, "--base", small_pair.base_path, "-o",
                         tmp_path / "x.qcow2"], ["verify", url]):
            r = cli(*command, "--json")
            assert r.code == ExitCode.BAD_INPUT, r.err
            for secret in ("wrong-pw-42", "tok-SECRET-9", "frag-x"):
                assert secret not in r.err + r.out, (secret, r.err, r.out)
    r = cli("verify", f"http://{user}:{password}@{server}/auth?token=tok-SECRET-9", "--json")
    assert r.code == 0 and password not in r.out and "tok-SECRET-9" not in r.out, r.out


# ------------------------------------------------------------------------------ bad local state

def test_a_very_long_base_name_is_a_usage_error(cli, small_pair):
    for name, version in (("n" * 250, "1"), ("n", "v" * 300)):
        r = cli("base", "add", small_pair.base_path, "--name", name, "--version", version)
        assert r.code == ExitCode.USAGE and "invalid base name" in r.err, r.err
        r = cli("verify", "-", "--base", f"{name}@{version}")
        assert r.code == ExitCode.USAGE, r.err


def test_a_base_that_is_a_directory_is_bad_input(cli, small_pair, tmp_path):
    vmo = tmp_path / "p.vmo"
    vmo.write_bytes(small_pair.overlay)
    r = cli("apply", vmo, "--base", tmp_path, "-o", tmp_path / "r.qcow2")
    assert r.code == ExitCode.BAD_INPUT and "is a directory" in r.err, r.err


@pytest.mark.parametrize("kind", ["dangling-symlink", "file", "unwritable"])
def test_an_unusable_vmsynth_home_is_reported(cli, small_pair, tmp_path, monkeypatch, kind):
    home = tmp_path / "home"
    if kind == "dangling-symlink":
        home.symlink_to(tmp_path / "gone")
        want, words = ExitCode.BAD_INPUT, "does not exist"
    elif kind == "file":
        home.write_text("not a folder")
        want, words = ExitCode.BAD_INPUT, "not a directory"
    else:
        home = Path("/proc/self/vmsynth-home")  # no one may create anything in /proc
        want, words = ExitCode.WRITE_FAILED, "cannot create"
    monkeypatch.setenv("VMSYNTH_HOME", str(home))
    for argv in (["base", "add", small_pair.base_path, "--name", "b", "--version", "1"],
                 ["run", tmp_path / "missing.vmo", "--base", small_pair.base_path]):
        r = cli(*argv)
        assert r.code == want and words in r.err and "internal" not in r.err, (argv, r.err)


DAMAGE = {"empty": b"", "truncated": b'{"name": "d", "vers', "list": b"[]", "null": b"null",
          "not-utf8": b'{"name": "\xff\xfe"}', "wrong-types": b'{"name": 1, "version": []}'}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_reported_and_can_be_removed(cli, small_pair, vmsynth_home,
                                                              how):
    assert cli("base", "add", small_pair.base_path, "--name", "d", "--version", "1").code == 0
    (vmsynth_home / "bases" / "d@1.json").write_bytes(DAMAGE[how])
    r = cli("verify", "-", "--base", "d@1")
    assert r.code == ExitCode.BAD_INPUT and "is damaged" in r.err, r.err
    assert "vmsynth base rm d@1" in r.err
    r = cli("base", "list", "--json")
    assert r.code == 0 and '"damaged"' in r.out and '"d"' in r.out, r.out
    r = cli("base", "list")
    assert r.code == 0 and "damaged" in r.out
    assert cli("base", "rm", "d@1").code == 0
    assert cli("base", "list", "--json").out.strip() == "[]"


def test_a_damaged_scan_cache_is_rescanned(cli, small_pair, vmsynth_home, tmp_path):
    assert cli("base", "add", small_pair.base_path, "--name", "s", "--version", "1").code == 0
    for meta in (vmsynth_home / "scans").glob("*.json"):
        meta.write_bytes(b"[]")
    vmo = tmp_path / "p.vmo"
    vmo.write_bytes(small_pair.overlay)
    r = cli("apply", vmo, "--base", "s@1", "-o", tmp_path / "r.qcow2")
    assert r.code == 0, r.err


def _vmsynth(h, *argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(h.VMSYNTH), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def test_a_closed_pipe_or_a_full_device_is_cannot_write(h, small_pair, tmp_path):
    big = tmp_path / "big.qcow2"
    h.write_image(big, h.det_bytes("big", 8 << 20))
    p = _vmsynth(h, "create", "--base", small_pair.base_path, "--disk", big, "-o", "-")
    assert p.stdout is not None
    p.stdout.read(1000)
    p.stdout.close()  # like `| head -c 1000`
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.wait(timeout=120) == ExitCode.WRITE_FAILED, err
    assert "closed before everything was written" in err and "Traceback" not in err, err
    with open("/dev/full", "wb") as full:
        p = subprocess.run([str(h.VMSYNTH), "create", "--base", str(small_pair.base_path),
                            "--disk", str(big), "-o", "-"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120, check=False)
    assert p.returncode == ExitCode.WRITE_FAILED and "no space left" in p.stderr, p.stderr


# ------------------------------------------------------------------------------ signals

@pytest.fixture
def big_pair(h, small_pair, tmp_path):
    """A disk whose overlay takes long enough to write that a signal lands mid-way."""
    disk = tmp_path / "big.qcow2"
    h.write_image(disk, h.det_bytes("big-disk", 48 << 20))
    return small_pair.base_path, disk


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_create_removes_its_temporary_file(h, big_pair, tmp_path, sig):
    base, disk = big_pair
    out = tmp_path / "out" / "o.vmo"
    out.parent.mkdir()
    p = _vmsynth(h, "create", "--base", base, "--disk", disk, "-o", out, "--level", "9")
    deadline = time.monotonic() + 120  # hang guard
    while not temporaries(out.parent):
        assert p.poll() is None, "it finished before making its temporary file"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.send_signal(sig)  # surely while it writes: its temporary file exists
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert err.decode().count("\n") == 1 and "Traceback" not in err.decode()
    assert temporaries(out.parent) == [] and not out.exists()


def _handles_sigterm(pid: int) -> bool:
    """Whether the process catches SIGTERM (Python does not by default: vmsynth's first
    step is to install its handlers for SIGINT, SIGTERM and SIGHUP together)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(int(ln.split()[1], 16) for ln in status.splitlines()
                  if ln.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_ctrl_c_while_starting_prints_no_traceback(h, small_pair, tmp_path):
    """From the moment vmsynth's handlers are in place (its first step; before that is the
    interpreter's own start-up), a Ctrl-C at any point of the start-up (imports, the
    command's parsing, its work) is one line and exit 130. A Ctrl-C that comes as the
    interpreter shuts down, after the command's own end, kills it silently: -2."""
    seen = set()
    for i in range(12):
        p = _vmsynth(h, "verify", small_pair.base_path)  # not an overlay: exit 13 if it ends
        deadline = time.monotonic() + 60  # a hang guard
        while not _handles_sigterm(p.pid) and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(i * 0.02)  # then anywhere in the next quarter second
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err.decode(), err.decode()
        seen.add(p.returncode)
    assert seen <= {ExitCode.INTERRUPTED, ExitCode.CORRUPT, -signal.SIGINT}, seen
    assert ExitCode.INTERRUPTED in seen


def test_a_signal_during_the_renames_waits_for_both(cli, world, monkeypatch):
    """apply renames the disk and the memory snapshot into place as one step: a Ctrl-C
    that arrives between the two is held until both are done, and the error says so."""
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(store.os, "replace", replace)
    out, mem = world.dir / "r.qcow2", world.dir / "r.vmem"
    r = cli("apply", world.overlay, "--base", "s@1", "--key-file", world.key, "-o", out)
    assert r.code == ExitCode.INTERRUPTED, r.err
    assert out.exists() and mem.exists() and len(calls) == 2
    assert f"after {out} and {mem} were complete" in r.err, r.err


def test_deferred_signals_arrive_after_the_block():
    signals.install()
    order = []
    with pytest.raises(signals.Interrupted) as info, signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        order.append("block finished")
    assert order == ["block finished"] and info.value.exit_code == ExitCode.TERMINATED


def test_a_killed_writers_temporaries_are_swept_by_the_next_writer(h, cli, small_pair,
                                                                  tmp_path):
    """Whatever output name the dead process wrote, but never a file being read."""
    dead = h.dead_pid()
    stale = tmp_path / f".other.qcow2.{dead}.{store.TEMP_MARK}abc123.tmp"
    stale.write_bytes(b"left by kill -9")
    live = tmp_path / f".third.qcow2.{os.getpid()}.{store.TEMP_MARK}zz9.tmp"
    live.write_bytes(b"a running process's")
    read = tmp_path / f".p.vmo.{dead}.{store.TEMP_MARK}keep1.tmp"  # shaped like one, but
    read.write_bytes(small_pair.overlay)                              # it is the input
    r = cli("apply", read, "--base", small_pair.base_path, "-o", tmp_path / "new.qcow2")
    assert r.code == 0, r.err
    assert not stale.exists() and live.exists() and read.exists()


def test_no_session_is_scrubbed_while_it_holds_an_input(h, cli, small_pair, vmsynth_home):
    """A dead run's session is scrubbed by the next run, unless the next run reads from it."""
    dead = h.dead_pid()
    folder = vmsynth_home / "sessions" / f"{dead}-0123456789ab"
    folder.mkdir(parents=True)
    vmo = folder / "kept.vmo"
    vmo.write_bytes(small_pair.overlay)
    r = cli("run", vmo, "--base", small_pair.base_path, "--serial", vmo)
    assert r.code == ExitCode.USAGE and "refusing to overwrite" in r.err, r.err
    assert vmo.read_bytes() == small_pair.overlay
    r = cli("run", vmo, "--base", small_pair.base_path, "--accel", "tcg",
            "--kernel", "/nonexistent/vmlinux")
    assert vmo.read_bytes() == small_pair.overlay, r.err

