"""Shared fixtures for the vmsynth test suite.

`python -m pytest` run from the repository root puts the root itself first on sys.path, and
the source folder vmsynth/ found there lacks the cli/ and formats/ subpackages (they live at
the top of the repository and are mapped into the vmsynth namespace only by the installed
editable package). So drop the repository root from sys.path before anything imports
vmsynth: the tests then always exercise the installed layout, as users do.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == _REPO
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_repo_root(p)]
for _name in [m for m in sys.modules if m == "vmsynth" or m.startswith("vmsynth.")]:
    del sys.modules[_name]

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
import cloudlet_world
import helpers

sys.path.pop(0)

# The autouse per-test base cache is function scoped; sharing it across the examples of one
# property test is harmless (every example builds its own files). No timing limits: the
# machine is shared and slow examples are not failures.
settings.register_profile("vmsynth", deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.load_profile("vmsynth")


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory):
    """Session-scoped fixtures that open bases get a private cache too, never ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VMSYNTH_HOME", str(tmp_path_factory.mktemp("session-home")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def vmsynth_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """Every test gets its own empty base cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("VMSYNTH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def h():
    """The helpers module (tests/helpers.py)."""
    return helpers


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory: pytest.TempPathFactory):
    """A small base, an app that is its qcow2 child, and the overlay between them.

    The app exercises every record kind: new data, a delta edit, zero blocks, a block copied
    from elsewhere in the base, and a block repeated within the app. `overlay` is one frame;
    `multi` holds the same change in several frames (see helpers.build_small_pair).
    """
    return helpers.build_small_pair(tmp_path_factory.mktemp("small-pair"))


@pytest.fixture
def repo() -> Path:
    return _REPO


@pytest.fixture(scope="session", autouse=True)
def _host_cache(tmp_path_factory: pytest.TempPathFactory):
    """One private host-facts cache (the KVM probe's answer) for the whole run, never
    ~/.cache/vmsynth/host: the probe runs at most once per run (~20 s where KVM hangs)."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("host-cache")
    mp.setenv("VMSYNTH_HOST_CACHE", str(folder))
    yield folder
    mp.undo()


@pytest.fixture
def cli(capsys):
    """Run `vmsynth ARGS...` in this process; returns exit code, stdout, stderr."""
    from vmsynth.cli.main import main

    def run(*argv: object) -> helpers.Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        captured = capsys.readouterr()
        code = info.value.code
        return helpers.Result(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def world(h):
    """The cloudlet tests' guest, base and overlays (tests/cloudlet_world.py), built once."""
    import shutil

    w = cloudlet_world.build_world(h)
    yield w
    shutil.rmtree(w.dir, ignore_errors=True)
