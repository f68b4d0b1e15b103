"""A lab of separate machines for tests: Linux network namespaces on one bridge.

`Lab(root, n)` builds n "machines" (network namespaces `<prefix>-1` ... `-n`)
each with one `eth0` plugged (veth pair) into a bridge that lives in a
namespace of its own (`<prefix>-sw`), so nothing is added to the host's
network stack. Machine i has 10.77.0.i/24 and, for the IPv6 cases,
fd00:77::i/64 (a ULA), both only inside its namespace. On each machine runs
one real `benchsync up` (`ip netns exec`) with the DEFAULT listen settings
(the same port everywhere, as in a real lab), its own BENCHSYNC_HOME and
control socket (a path in the shared file system, so the test talks to it
from the host's namespace), mDNS off.

`Lab.close()` kills every node and deletes every namespace, also after a
failed test; `remove_stale()` deletes namespaces of our prefix left by a run
that was killed (their pid is gone). Needs root and iproute2: `netns_skip_reason()`
says why not, for `pytest.skip`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchsync.daemon.control import ControlClient, ControlUnavailable
from benchsync.daemon.demo import lab_key_file
from tests.waiting import wait_for

PREFIX = "bsnl"  # every namespace of ours: bsnl<pid>-<lab>-<machine>; .ci/run removes bsnl*
SUBNET4 = "10.77.0"
SUBNET6 = "fd00:77::"
IP_TIMEOUT = 10.0  # seconds for one `ip` command
STOP_TIMEOUT = 10.0  # seconds a node gets to exit after SIGTERM before SIGKILL


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=IP_TIMEOUT)  # fmt: skip


def netns_skip_reason() -> str | None:
    """Why namespace labs cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        r = ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "`ip` (iproute2) is not installed"
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _our_namespaces() -> list[str]:
    r = ip("netns", "list", check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _delete_namespace(name: str) -> None:
    """Kill whatever still runs in `name`, then delete it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", name, check=False)


def remove_stale() -> None:
    """Delete namespaces of our prefix whose creating process is gone (a killed run)."""
    for name in _our_namespaces():
        pid = name[len(PREFIX) :].split("-", 1)[0]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists()
        if not alive:
            _delete_namespace(name)


class Machine:
    """One namespace, its address and its `benchsync up` process."""

    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.ns = f"{lab.prefix}-{index}"
        self.ip4 = f"{SUBNET4}.{index}"
        self.ip6 = f"{SUBNET6}{index}"
        self.home = lab.root / f"m{index}"
        self.socket = self.home / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = ControlClient(socket_path=self.socket, timeout=30.0)
        self._log: Any = None

    # --- the node -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
        return env | {
            "BENCHSYNC_HOME": str(self.home),
            "BENCHSYNC_CONTROL_SOCKET": str(self.socket),
            "BENCHSYNC_NETWORK": self.lab.network,
            "BENCHSYNC_LAB_KEY": str(self.lab.lab_key),  # every machine in one lab
            "BENCHSYNC_MDNS": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, *extra: str) -> None:
        """`benchsync up` in this machine's namespace; default listen settings."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.home / "node.log", "ab")  # noqa: SIM115 (closed in stop)
        argv = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "benchsync.daemon.cli",
                "up", *self.lab.node_args, *extra]  # fmt: skip
        self.proc = subprocess.Popen(argv, env=self.env(), stdout=self._log, stderr=self._log,
                                     start_new_session=True)  # fmt: skip

    def status(self) -> dict[str, Any] | None:
        """The node's status over its control socket, or None while it does not answer."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node m{self.index} exited ({self.proc.returncode}):\n"
                                 + self.log_tail())  # fmt: skip
        try:
            doc: dict[str, Any] = self.client.get("/v1/status")
        except (ControlUnavailable, OSError):
            return None
        return doc

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        doc: dict[str, Any] = wait_for(f"node m{self.index} to answer", self.status, timeout)
        return doc

    def cli_status(self) -> dict[str, Any]:
        """`benchsync status --json`, as a user types it (from the host's namespace: the
        control socket is a file)."""
        import json

        r = subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", "status", "--json"],
                           env=self.env(), capture_output=True, text=True, timeout=60,
                           check=True)  # fmt: skip
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def write(self, model: str) -> str:
        """Record one result and snapshot it; returns the new head CID."""
        self.client.post("/v1/record/perf", {"model_name": model, "hardware_type": "cpu",
                                             "throughput": float(self.index)})  # fmt: skip
        cid: str = self.client.post("/v1/snapshot", {})["cid"]
        return cid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.home / "node.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- the cable ----------------------------------------------------------------------

    def unplug(self) -> None:
        """Pull this machine's cable: its port on the bridge goes down."""
        ip("-n", self.lab.switch, "link", "set", f"p{self.index}", "down")

    def plug(self) -> None:
        ip("-n", self.lab.switch, "link", "set", f"p{self.index}", "up")


class Lab:
    """n machines on one bridge; see the module docstring."""

    def __init__(self, root: Path, n: int, *, name: str = "lab", network: str = "netlab",
                 node_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.root = root
        self.prefix = f"{PREFIX}{os.getpid()}-{name}"
        self.switch = f"{self.prefix}-sw"
        self.network = network
        self.node_args = node_args
        self.lab_key = lab_key_file(root)
        self.machines = [Machine(self, i) for i in range(1, n + 1)]

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for m in self.machines:
            ip("netns", "add", m.ns)
            # One veth pair: p<i> on the bridge's side, eth0 on the machine's.
            ip("-n", self.switch, "link", "add", f"p{m.index}", "type", "veth",
               "peer", "name", "eth0", "netns", m.ns)  # fmt: skip
            ip("-n", self.switch, "link", "set", f"p{m.index}", "master", "br0", "up")
            ip("-n", m.ns, "link", "set", "lo", "up")
            ip("-n", m.ns, "addr", "add", f"{m.ip4}/24", "dev", "eth0")
            ip("-n", m.ns, "addr", "add", f"{m.ip6}/64", "dev", "eth0", "nodad")
            ip("-n", m.ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        for m in self.machines:
            m.stop()
        for m in self.machines:
            _delete_namespace(m.ns)
        _delete_namespace(self.switch)

    def start(self, machines: list[Machine], timeout: float, *extra: str) -> None:
        for m in machines:
            m.start(*extra)
        for m in machines:
            m.wait_ready(timeout)

    def heads(self) -> dict[str, str]:
        """peer ID -> head CID of every running machine that has one."""
        out = {}
        for m in self.machines:
            doc = m.status()
            if doc and doc.get("head"):
                out[doc["peer_id"]] = doc["head"]
        return out

    def converged(self, heads: dict[str, str], machines: list[Machine] | None = None) -> bool:
        """Has every machine of `machines` (default all) installed every other's head?"""
        for m in machines or self.machines:
            doc = m.status()
            if doc is None:
                return False
            installed = {r["dataset"]: r["head_installed"] for r in doc["replicas"]}
            installed[doc["peer_id"]] = doc["head"]
            if any(installed.get(peer) != head for peer, head in heads.items()):
                return False
        return True


@contextlib.contextmanager
def lab(root: Path, n: int, **kw: Any) -> Iterator[Lab]:
    remove_stale()
    with Lab(root, n, **kw) as built:
        yield built
