"""Failures of the environment reach the user as `Error:` / `Try:`, never a traceback
(issue 17, finding 13): real `benchsync` processes, real sockets, a read-only home."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchsync.daemon.control import MAX_UNIX_PATH

pytestmark = pytest.mark.slow  # real processes, one node start each

TOKEN = "s3cret-token-0123456789"
PROCESS_TIMEOUT = 120  # seconds for one CLI process, on a loaded machine


def cli(home: Path, *args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    env["BENCHSYNC_HOME"] = str(home)
    return subprocess.run(
        [*(wrap or []), sys.executable, "-m", "benchsync.daemon.cli", *args],
        env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip


def assert_user_error(
    r: subprocess.CompletedProcess[str], *words: str, hint: str = ""
) -> None:
    """Exit 1 with the documented two lines (the Error line holding `words`, the Try
    line `hint`), and no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert errors, r.stderr
    error, try_line = lines[errors[-1]], lines[errors[-1] + 1]
    assert try_line.startswith("Try: "), r.stderr
    for word in words:
        assert word.lower() in error.lower(), r.stderr
    assert hint.lower() in try_line.lower(), r.stderr


def up_args() -> list[str]:
    return ["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]


def test_up_with_a_socket_path_over_the_limit(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * (MAX_UNIX_PATH + 1 - len(str(tmp_path))))
    path = long_dir / "control.sock"
    assert len(os.fsencode(path)) > MAX_UNIX_PATH
    r = cli(tmp_path / "home", *up_args(), "--control-socket", str(path))
    # The error's own hint names the setting to change.
    assert_user_error(r, "control socket", "longer than 107 bytes",
                      hint="set control_socket (BENCHSYNC_CONTROL_SOCKET) to a shorter path")


def test_up_with_the_control_tcp_port_in_use(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        r = cli(
            tmp_path / "home", *up_args(), "--control-socket", str(tmp_path / "c.sock"),
            "--control-tcp", f"127.0.0.1:{port}", "--control-token", TOKEN,
        )  # fmt: skip
    finally:
        taken.close()
    assert_user_error(r, f"control_tcp 127.0.0.1:{port}", "in use", hint="set control_tcp")


# --- a read-only home ---------------------------------------------------------------------


def _read_only_wrapper(directory: Path) -> list[str] | None:
    """argv prefix that runs a command with `directory` read-only, or None if this machine
    cannot: root ignores file modes, so root gets a read-only bind mount of its own."""
    if os.geteuid() != 0:
        return []  # the caller removes write permission instead
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    d = os.fspath(directory)
    wrap = [unshare, "-m", "sh", "-ec",
            f'mount --bind "{d}" "{d}"; mount -o remount,bind,ro "{d}" "{d}"; exec "$@"', "sh"]
    probe = subprocess.run([*wrap, "touch", os.path.join(d, ".probe")], capture_output=True)
    if probe.returncode == 0:  # the mount did not make it read-only
        os.unlink(os.path.join(d, ".probe"))
        return None
    if b"Read-only" not in probe.stderr:
        return None  # no mount namespaces here (e.g. a container without CAP_SYS_ADMIN)
    return wrap


@pytest.fixture
def read_only(tmp_path: Path) -> object:
    """`read_only(dir)` -> argv prefix for running a command with `dir` read-only."""
    made_read_only: list[Path] = []

    def wrap(directory: Path) -> list[str]:
        prefix = _read_only_wrapper(directory)
        if prefix is None:
            pytest.skip("cannot make a directory read-only for root on this machine")
        if os.geteuid() != 0:
            for p in [directory, *directory.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            made_read_only.append(directory)
        return prefix

    yield wrap
    for d in made_read_only:
        for p in [d, *d.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


@pytest.mark.parametrize("command", ["log", "snapshot", "import", "init"])
def test_read_only_home(tmp_path: Path, read_only: object, command: str) -> None:
    home = tmp_path / "home"
    assert cli(home, "init").returncode == 0  # only init and up create a data directory
    r = cli(home, "record", "perf", "--model", "bert", "--hardware", "cpu", "--throughput", "1")
    assert r.returncode == 0, r.stderr
    car = tmp_path / "v.car"
    for args in (["snapshot"], ["export", "--car", str(car)],
                 ["record", "perf", "--model", "t5", "--hardware", "cpu", "--throughput", "2"]):
        r = cli(home, *args)
        assert r.returncode == 0, r.stderr
    args = {
        "log": ["log"],
        "snapshot": ["snapshot"],
        "import": ["import", str(car)],
        "init": ["init"],
    }[command]
    target = home
    if command == "log":
        target = tmp_path / "fresh"  # nothing there yet: the identity cannot be created
        target.mkdir()
    if command == "init":
        parent = tmp_path / "parent"  # the home itself cannot be created
        parent.mkdir()
        target = parent / "home"
    wrap = read_only(target.parent if command == "init" else target)  # type: ignore[operator]
    r = cli(target, *args, wrap=wrap)
    root = os.geteuid() == 0
    # `init` too gives the hint for the reason (it used to speak of ownership on a
    # read-only file system).
    hint = ("read-only" if root else "may write there") if command == "init" else ""
    assert_user_error(r, "read-only file system" if root else "permission denied", hint=hint)
