"""The CLI against a node whose control socket is not the home's (issue 11): every
command that talks to a node takes `--control-socket PATH`, and the human `status`
shows the peers it fails to dial (the `dials` of `status --json`).

A real `benchsync up` process on 127.0.0.1 whose bootstrap peer does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchsync.daemon.cli.status import MAX_DIAL_LINES, _dial_lines
from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.daemon.identity import load_or_create_identity, peer_id_of

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 60.0  # seconds for one CLI command
DIAL_TIMEOUT = 60.0  # seconds for the node to have failed its bootstrap dial once


class SocketElsewhere(NodeProcess):
    """A node whose control socket is beside its home, not in it: the CLI finds it
    only when told where."""

    @property
    def socket_path(self) -> Path:
        return self.home.parent / "elsewhere.sock"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    return subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", *args],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)  # fmt: skip


@pytest.fixture
def lab() -> Iterator[tuple[NodeProcess, str]]:
    """A running node (socket elsewhere) and the peer ID of its unreachable bootstrap."""
    with tempfile.TemporaryDirectory(prefix="bss-", dir="/tmp") as d:
        ghost = peer_id_of(load_or_create_identity(Path(d) / "ghost"))
        boot = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{ghost}"  # nobody listens there
        node = SocketElsewhere(Path(d) / "n", free_port(), "sockets", bootstrap=[boot],
                               extra_args=["--no-mdns"])  # fmt: skip
        node.start()
        try:
            node.wait_ready()
            yield node, ghost
        finally:
            node.stop()


def test_control_socket_flag_and_dial_failures_in_status(lab: tuple[NodeProcess, str]) -> None:
    node, ghost = lab
    home, sock = str(node.home), str(node.socket_path)
    deadline = time.monotonic() + DIAL_TIMEOUT
    while not any(d["peer_id"] == ghost and d["last_error"]
                  for d in node.status().get("dials", [])):  # fmt: skip
        assert time.monotonic() < deadline, node.status().get("dials")
        time.sleep(0.1)

    r = run_cli("status", "--home", home, "--control-socket", sock)
    assert r.returncode == 0, r.stderr
    assert "node      running" in r.stdout
    dial = [line for line in r.stdout.splitlines() if ghost[:12] in line]
    assert r.stdout.count("dials     1 failing") == 1 and len(dial) == 1, r.stdout
    assert "bootstrap" in dial[0] and "retry in" in dial[0] and "failed" in dial[0], dial

    r = run_cli("record", "perf", "--model", "m", "--hardware", "cpu", "--throughput", "1",
                "--home", home, "--control-socket", sock)  # fmt: skip
    assert r.returncode == 0 and "through the running node" in r.stdout, r.stderr
    r = run_cli("query", "SELECT count(*) AS n FROM performance_results", "--format", "csv",
                "--home", home, "--control-socket", sock)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["n", "1"], r.stderr
    r = run_cli("snapshot", "--json", "--home", home, "--control-socket", sock)
    assert r.returncode == 0 and '"created": true' in r.stdout, r.stderr
    r = run_cli("peers", "--home", home, "--control-socket", sock)
    assert r.returncode == 0, r.stderr

    # Told where the node is and nobody answers there: said so, no offline fallback.
    missing = str(node.home.parent / "nobody.sock")
    r = run_cli("snapshot", "--home", home, "--control-socket", missing)
    assert r.returncode == 1 and f"Error: no node answers on control socket {missing}" in r.stderr
    assert "Try:" in r.stderr and "Traceback" not in r.stderr


def test_dial_lines_are_short() -> None:
    assert _dial_lines(None) == [] and _dial_lines([{"peer_id": "p", "last_error": None}]) == []
    dials = [{"peer_id": f"12D3KooW{i:040d}", "bootstrap": i == 0, "failures": 3,
              "last_error": "connection refused " * 20, "next_retry_seconds": 7.6}
             for i in range(MAX_DIAL_LINES + 2)]  # fmt: skip
    lines = _dial_lines(dials)
    assert lines[0] == f"dials     {MAX_DIAL_LINES + 2} failing (known peers not reachable)"
    assert "bootstrap, 3 failed, retry in 8 s: connection refused" in lines[1]
    assert " peer, 3 failed" in lines[2]
    assert all(len(line) < 140 for line in lines), lines
    assert lines[-1] == "  … and 2 more (`benchsync status --json`)"
