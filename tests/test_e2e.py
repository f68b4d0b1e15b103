"""End-to-end: real `benchsync up` processes on 127.0.0.1, driven through the CLI.

Three nodes with their own data directories record through the CLI, snapshot,
replicate each other and answer `--scope replicas` and `--scope network`
queries; one is killed with SIGKILL right after a write was acknowledged and
restarted on the same data directory, and everything converges again with
nothing acknowledged lost. systemd's side is played by an AF_UNIX datagram
socket per node (`NOTIFY_SOCKET`), on which READY=1, WATCHDOG=1 and
STOPPING=1 are checked; a service manager that stops reading must not stall
the node. A bad config file must stop `benchsync up` before it listens.

Every wait polls a condition under a deadline; nodes start in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchsync.daemon.control import ControlClient
from benchsync.daemon.demo import (
    NodeProcess,
    free_port,
    lab_key_file,
    sample_results,
    wait_converged,
)

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 60.0  # seconds for one CLI command (it talks to a running node)
NOTIFY_TIMEOUT = 30.0  # seconds to wait for an expected sd_notify message
WATCHDOG_USEC = 400_000  # microseconds: the node pings every 0.2 s
WATCHDOG_PINGS = 3  # pings we want to see to call it periodic
PER_NODE = 20  # results each node records from a JSONL file (plus one by flags)
LATE_WRITES = 5  # results node2 acknowledges just before it is killed
NETWORK_QUERY_TIMEOUT = 5.0  # seconds a network query waits for a dead peer
SNAPSHOT_POLICY_TIMEOUT = 15.0  # seconds for --snapshot-after-writes to snapshot
STOP_TIMEOUT = 20.0  # seconds for a node to exit after SIGTERM
STUCK_READY_TIMEOUT = 15.0  # seconds for a node with an unread NOTIFY_SOCKET to be ready
BAD_CONFIG_TIMEOUT = 30.0  # seconds for `benchsync up` to refuse a bad config

COUNT_BY_HARDWARE = (
    "SELECT h.hardware_type, count(*) AS results "
    "FROM performance_results p JOIN hardware_platforms h ON p.hardware_id = h.hardware_id "
    "GROUP BY h.hardware_type ORDER BY h.hardware_type"
)
# Local ids collide across nodes: in the replicas scope a join must match the origin too.
COUNT_BY_HARDWARE_REPLICAS = (
    "SELECT h.hardware_type, count(*) AS results "
    "FROM performance_results p JOIN hardware_platforms h USING (origin, hardware_id) "
    "GROUP BY h.hardware_type ORDER BY h.hardware_type"
)
COUNT_BY_ORIGIN = "SELECT origin, count(*) AS n FROM performance_results GROUP BY origin"


# --- helpers --------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    # A developer's own BENCHSYNC_* settings must not leak into the nodes under test.
    return {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}


def cli_start(home: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "benchsync.daemon.cli", *args, "--home", str(home)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_clean_env())  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=CLI_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = finish(cli_start(home, *args))
    assert r.returncode == 0, f"benchsync {' '.join(args)} failed:\n{r.stderr}"
    return r


Call = tuple[Path, tuple[str, ...]]  # (data directory, CLI arguments)


def cli_parallel(calls: list[Call]) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI commands concurrently (each costs ~1 s of imports); all must succeed."""
    procs = [cli_start(home, *args) for home, args in calls]
    results = [finish(p) for p in procs]
    for (_, args), r in zip(calls, results, strict=True):
        assert r.returncode == 0, f"benchsync {' '.join(args)} failed:\n{r.stderr}"
    return results


def query_json(home: Path, sql: str, scope: str, *extra: str) -> dict[str, Any]:
    """`benchsync query --format json` as {"rows": [...], "peers": [...]} in every scope.

    The CLI prints a bare array of rows for local/replicas, and a document with
    the per-peer status for network.
    """
    doc = json.loads(cli(home, "query", sql, "--scope", scope, "--format", "json", *extra).stdout)
    if scope == "network":
        assert isinstance(doc, dict) and isinstance(doc["peers"], list), doc
        return dict(doc)
    assert isinstance(doc, list), doc
    return {"rows": doc, "peers": []}


class NotifyListener:
    """The service manager's end of `$NOTIFY_SOCKET`: collects sd_notify datagrams.

    Like systemd it drains the socket continuously (a thread): a full datagram
    queue would make the node's next notification block or fail.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)  # so the reader thread notices close() promptly
        self.messages: list[dict[str, str]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"notify:{path.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self._add(data)

    def _add(self, data: bytes) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        with self._changed:
            self.messages.append(fields)
            self._changed.notify_all()

    def close(self) -> None:
        """Stop reading; whatever is still queued on the socket is collected first."""
        if self._closed:
            return
        self._closed = True
        self._reader.join(timeout=5)
        self.sock.setblocking(False)
        try:
            while True:
                self._add(self.sock.recv(4096))
        except OSError:  # BlockingIOError: the queue is empty
            pass
        self.sock.close()

    def count(self, key: str) -> int:
        with self._changed:
            return sum(1 for m in self.messages if key in m)

    def wait_for(self, key: str, times: int = 1, timeout: float = NOTIFY_TIMEOUT) -> dict[str, str]:
        """Wait until `key` arrived `times` times in total; returns the latest message with it."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._count(key) >= times, timeout):
                raise AssertionError(f"{self.path.name}: {key} seen {self._count(key)} times, "
                                     f"wanted {times}; messages: {self.messages}")  # fmt: skip
            return [m for m in self.messages if key in m][-1]

    def _count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m)


def start_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()


def perf_count(home: Path) -> int:
    doc = query_json(home, "SELECT count(*) AS n FROM performance_results", "local")
    return int(doc["rows"][0]["n"])


# --- the lab --------------------------------------------------------------------------------


def test_three_nodes_sync_query_survive_kill_and_stop_cleanly(tmp_path: Path) -> None:
    network = f"e2e-{os.getpid()}"
    listeners = [NotifyListener(tmp_path / f"n{i}.sock") for i in range(3)]
    key = lab_key_file(tmp_path)  # one lab
    nodes = [
        NodeProcess(tmp_path / f"node{i}", free_port(), network, lab_key=key,
                    extra_args=["--snapshot-interval", "0", "--reannounce-interval", "1"],
                    env={"NOTIFY_SOCKET": str(listeners[i].path),
                         "WATCHDOG_USEC": str(WATCHDOG_USEC),
                         "PYTHONFAULTHANDLER": "1"})
        for i in range(3)
    ]  # fmt: skip
    for node in nodes:
        node.bootstrap = [o.addr for o in nodes if o is not node]
    try:
        start_all(nodes)
        _check_ready_and_watchdog(nodes, listeners)
        heads = _record_snapshot_converge(tmp_path, nodes)
        _check_queries(nodes, heads)
        _kill_restart_converge(tmp_path, nodes, listeners)
        _check_sigterm(nodes, listeners)
    except BaseException:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                # A hung node: SIGABRT makes faulthandler write every thread's stack to its log.
                node.proc.send_signal(signal.SIGABRT)
                node.proc.wait(timeout=10)
            print(f"--- {node.home.name} log ---\n{node.tail_log(60)}", file=sys.stderr)
        raise
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)
        for listener in listeners:
            listener.close()


def _check_ready_and_watchdog(nodes: list[NodeProcess], listeners: list[NotifyListener]) -> None:
    for node, listener in zip(nodes, listeners, strict=True):
        ready = listener.wait_for("READY")
        assert ready["READY"] == "1"
        assert "STATUS" in ready, "READY=1 should carry a STATUS line for `systemctl status`"
        # READY=1 means serving: the control API must answer straight away.
        assert node.status()["peer_id"] == node.peer_id
        listener.wait_for("WATCHDOG", times=WATCHDOG_PINGS, timeout=10 * WATCHDOG_USEC / 1e6)
        assert listener.count("STOPPING") == 0


def _record_snapshot_converge(tmp_path: Path, nodes: list[NodeProcess]) -> dict[str, str]:
    calls: list[Call] = []
    for i, node in enumerate(nodes):
        jsonl = tmp_path / f"results{i}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in sample_results(i, PER_NODE)))
        calls.append((node.home, ("record", "perf", "--from", str(jsonl))))
    for r in cli_parallel(calls):
        assert f"Recorded {PER_NODE} perf record(s)" in r.stdout
        assert "through the" in r.stdout, r.stdout  # the running node took it
    # One more per node through flags: the user's everyday command.
    calls = [(node.home, ("record", "perf", "--model", "e2e-flag-model",
                          "--hardware", sample_results(i, 1)[0]["hardware_type"],
                          "--throughput", f"{100 + i}", "--latency-avg", "3.5"))
             for i, node in enumerate(nodes)]  # fmt: skip
    for r in cli_parallel(calls):
        assert "through the" in r.stdout, r.stdout  # the running node took it
    snaps = cli_parallel([(node.home, ("snapshot",)) for node in nodes])
    heads = wait_converged(nodes)
    for node, snap in zip(nodes, snaps, strict=True):
        assert heads[node.peer_id] and heads[node.peer_id] in snap.stdout, (
            "`benchsync snapshot` should print the CID that became the node's head")
    return heads


def _check_queries(nodes: list[NodeProcess], heads: dict[str, str]) -> None:
    per_node = PER_NODE + 1
    home0, home2 = nodes[0].home, nodes[2].home
    json_query = ("--format", "json")
    status_r, origin_r, net0_r, net2_r, hw_r = cli_parallel([
        (home0, ("status", "--json")),
        (home0, ("query", COUNT_BY_ORIGIN, "--scope", "replicas", *json_query)),
        (home0, ("query", COUNT_BY_HARDWARE, "--scope", "network", "--require-all", *json_query)),
        (home2, ("query", COUNT_BY_HARDWARE, "--scope", "network", "--require-all", *json_query)),
        (home0, ("query", COUNT_BY_HARDWARE_REPLICAS, "--scope", "replicas", *json_query)),
    ])  # fmt: skip

    # status --json: what an operator checks after convergence.
    status = json.loads(status_r.stdout)
    assert status["peer_id"] == nodes[0].peer_id and status["head"] == heads[nodes[0].peer_id]
    assert all(a.endswith(f"/p2p/{nodes[0].peer_id}") for a in status["addrs"])
    assert {p["peer_id"] for p in status["peers"]} == {n.peer_id for n in nodes[1:]}
    installed = {r["dataset"]: r for r in status["replicas"]}
    for other in nodes[1:]:
        assert installed[other.peer_id]["head_installed"] == heads[other.peer_id]
        assert installed[other.peer_id]["lag"] == 0

    # replicas scope: own rows plus every replicated snapshot, with the origin of each row.
    rows = json.loads(origin_r.stdout)
    assert {r["origin"]: r["n"] for r in rows} == {n.peer_id: per_node for n in nodes}

    # network scope: a live fan-out whose merged answer equals one database holding all rows.
    expected = sorted(
        [sample_results(i, 1)[0]["hardware_type"], per_node] for i in range(len(nodes))
    )
    for r in (net0_r, net2_r):
        doc = json.loads(r.stdout)
        assert sorted([row["hardware_type"], row["results"]] for row in doc["rows"]) == expected
        assert {p["peer_id"] for p in doc["peers"]} == {n.peer_id for n in nodes}
        assert all(p["status"] == "answered" for p in doc["peers"]), doc["peers"]
    # The same question on the replicas scope gives the same numbers (no network needed).
    rows = json.loads(hw_r.stdout)
    assert sorted([row["hardware_type"], row["results"]] for row in rows) == expected


def _kill_restart_converge(tmp_path: Path, nodes: list[NodeProcess],
                           listeners: list[NotifyListener]) -> None:
    victim, listener = nodes[2], listeners[2]
    answer = victim.client.post("/v1/query", {"sql": "SELECT count(*) FROM performance_results"})
    before = answer["rows"][0][0]
    assert before == PER_NODE + 1
    jsonl = tmp_path / "late.jsonl"
    late = [dict(r, model_name="acknowledged-before-kill") for r in sample_results(2, LATE_WRITES)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in late))
    r = cli(victim.home, "record", "perf", "--from", str(jsonl))
    assert f"Recorded {LATE_WRITES}" in r.stdout
    # The write was acknowledged; kill at once, no snapshot, no graceful anything.
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait(timeout=10)
    assert victim.proc.returncode == -signal.SIGKILL

    # A peer that is down is reported in the answer, never silently dropped: its
    # dataset is answered from node0's replica of it (issue 10), and says so.
    doc = query_json(nodes[0].home, COUNT_BY_HARDWARE, "network",
                     "--timeout", str(NETWORK_QUERY_TIMEOUT))  # fmt: skip
    status = {p["peer_id"]: p for p in doc["peers"]}
    # (unreachable, timed out, or refused by the lab's admission: it is not connected)
    assert status[victim.peer_id]["status"] != "answered", doc["peers"]
    assert status[victim.peer_id]["message"], "the report should say why the origin is missing"
    assert status[victim.peer_id]["source"] == "replica" and doc["complete"], doc
    assert status[nodes[1].peer_id]["status"] == "answered"
    # The answer holds every dataset: node2's rows as of its replicated snapshot.
    assert sorted([r["hardware_type"], r["results"]] for r in doc["rows"]) == sorted(
        [sample_results(i, 1)[0]["hardware_type"], PER_NODE + 1] for i in range(3)
    )

    victim.stop()  # closes the old process's pipe
    ready_before = listener.count("READY")
    # Same data directory, port and identity; now snapshotting by itself after each write.
    victim.extra_args = [*victim.extra_args, "--snapshot-after-writes", "1"]
    victim.start()
    victim.wait_ready()
    listener.wait_for("READY", times=ready_before + 1)
    assert victim.status()["peer_id"] == victim.peer_id
    assert perf_count(victim.home) == before + LATE_WRITES, "an acknowledged write was lost"

    # One more write; the snapshot policy (not a command) makes and announces version 2.
    cli(victim.home, "record", "perf", "--model", "acknowledged-before-kill",
        "--hardware", late[0]["hardware_type"], "--throughput", "1")  # fmt: skip
    deadline = time.monotonic() + SNAPSHOT_POLICY_TIMEOUT
    while victim.status()["head_seq"] != 2:
        assert time.monotonic() < deadline, "--snapshot-after-writes 1 made no snapshot"
        time.sleep(0.1)
    wait_converged(nodes)
    late_count = LATE_WRITES + 1
    late_sql = ("SELECT count(*) AS n FROM performance_results p JOIN models m "
                "ON p.model_id = m.model_id WHERE m.model_name = 'acknowledged-before-kill'")
    replicas_r, network_r = cli_parallel([
        (nodes[0].home, ("query", COUNT_BY_ORIGIN, "--scope", "replicas", "--format", "json")),
        (nodes[1].home, ("query", late_sql, "--scope", "network", "--require-all",
                         "--format", "json")),
    ])  # fmt: skip
    counts = {r["origin"]: r["n"] for r in json.loads(replicas_r.stdout)}
    assert counts == {n.peer_id: before + (late_count if n is victim else 0) for n in nodes}
    assert json.loads(network_r.stdout)["rows"] == [{"n": late_count}]


def _check_sigterm(nodes: list[NodeProcess], listeners: list[NotifyListener]) -> None:
    for node in nodes:
        assert node.proc is not None and node.proc.poll() is None
        node.proc.send_signal(signal.SIGTERM)
    # One SIGTERM each (a second one would mean "force"); then wait for all of them.
    codes = [node.proc.wait(timeout=STOP_TIMEOUT) for node in nodes if node.proc is not None]
    assert codes == [0, 0, 0], [n.tail_log() for n in nodes]
    for node, listener in zip(nodes, listeners, strict=True):
        listener.wait_for("STOPPING", timeout=NOTIFY_TIMEOUT)
        assert not node.client.available(), "the control socket should be gone after a clean stop"


def test_node_stays_responsive_when_the_service_manager_stops_reading(tmp_path: Path) -> None:
    """A full `$NOTIFY_SOCKET` queue must cost watchdog pings, never the node's event loop."""
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(tmp_path / "stuck.sock"))  # bound, never read
    # Fill its queue (net.unix.max_dgram_qlen datagrams) before the node starts.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler, \
            contextlib.suppress(BlockingIOError):
        for _ in range(100_000):
            filler.sendto(b"X=1", socket.MSG_DONTWAIT, str(tmp_path / "stuck.sock"))
    node = NodeProcess(tmp_path / "node", free_port(), f"e2e-stuck-{os.getpid()}",
                       env={"NOTIFY_SOCKET": str(tmp_path / "stuck.sock"),
                            "WATCHDOG_USEC": str(WATCHDOG_USEC)})  # fmt: skip
    try:
        node.start()
        # READY=1 and every WATCHDOG=1 are undeliverable from the start.
        node.wait_ready(timeout=STUCK_READY_TIMEOUT)
        client = ControlClient(socket_path=node.socket_path, timeout=30.0)
        answer = client.post("/v1/record/perf", {"model_name": "m", "hardware_type": "cpu",
                                                 "throughput": 1.0})  # fmt: skip
        assert answer["stored"] == 1
        assert client.get("/v1/status")["rows"]["performance_results"] == 1
        assert node.stop() == 0
    finally:
        node.stop(signal.SIGKILL)
        stuck.close()


# --- refusing to start ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_text", "setting"),
    [
        ('snapshot_interval = "soon"\n', "snapshot_interval"),
        ("network = \"lab\"\nquery_max_rowz = 10\n", "query_max_rowz"),
    ],
    ids=["bad-value", "unknown-setting"],
)
def test_bad_config_refuses_to_start_before_listening(
    tmp_path: Path, config_text: str, setting: str
) -> None:
    home = tmp_path / "node"
    home.mkdir()
    (home / "config.toml").write_text(config_text)
    listener = NotifyListener(tmp_path / "n.sock")
    port = free_port()
    env = _clean_env() | {"NOTIFY_SOCKET": str(listener.path)}
    try:
        r = subprocess.run(
            [sys.executable, "-m", "benchsync.daemon.cli", "up", "--home", str(home),
             "--listen", f"/ip4/127.0.0.1/tcp/{port}"],
            capture_output=True, text=True, env=env, timeout=BAD_CONFIG_TIMEOUT,
        )  # fmt: skip
        listener.close()  # collects anything the node sent
        assert r.returncode != 0
        assert setting in r.stderr and "Error:" in r.stderr and "Try:" in r.stderr, r.stderr
        assert "config.toml" in r.stderr, "the error should say which file is wrong"
        assert not r.stdout.startswith("ready"), r.stdout
        assert listener.count("READY") == 0
        assert not (home / "control.sock").exists()
        with socket.socket() as s:  # nobody ever listened on the port we asked for
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        listener.close()
