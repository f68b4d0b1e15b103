"""A node's life on its data directory: one instance per home, a checked database,
an exclusive listen port, crash leftovers, permissions, restores that lose no
acknowledged write, and a full disk that pauses snapshots instead of killing the node.

Real `benchsync up` processes on 127.0.0.1 (issue 17, findings 5, 7, 11 and 14).
Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchsync.daemon.control import ControlAPIError, ControlClient
from benchsync.daemon.demo import NodeProcess, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

NETWORK = "lifecycle"
UP_TIMEOUT = 60.0  # seconds for a refused `benchsync up` to exit
CLI_TIMEOUT = 60.0  # seconds for one CLI command
PERF = {"model_name": "bert-base-uncased", "hardware_type": "cuda", "device_name": "A100",
        "batch_size": 8, "throughput": 812.5, "latency_avg": 9.8}  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())  # fmt: skip


def run_up(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`benchsync up` that is expected to refuse to start: it must exit on its own.

    A node that reports ready instead is stopped at once (its ready line is kept in
    stdout, which the caller's assertions then reject).
    """
    argv = [sys.executable, "-m", "benchsync.daemon.cli", "up", "--home", str(home),
            "--network", NETWORK, *extra]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    assert proc.stdout is not None
    first = ""
    readable, _, _ = select.select([proc.stdout], [], [], UP_TIMEOUT)
    if readable:
        first = proc.stdout.readline()  # "" once it exits; the ready line if it starts
    if first.startswith("ready "):
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=UP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, first + out, err)


def assert_clear_refusal(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "ready" not in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith("Error: ") for line in lines), r.stderr
    assert any(line.startswith("Try: ") for line in lines), r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@contextlib.contextmanager
def running(node: NodeProcess) -> Iterator[NodeProcess]:
    node.start()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


# --- finding 11: a single instance per home ------------------------------------------------


class OffSocketNode(NodeProcess):
    """A node whose control socket is not the home's default one: offline commands
    on its home do not find it, as with a second `--control-socket` or a custom config."""

    @property
    def socket_path(self) -> Path:
        return self.home.parent / f"{self.home.name}-control.sock"


def test_second_node_on_a_used_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "a"
    with running(OffSocketNode(home, free_port(), NETWORK)) as a:
        assert a.proc is not None
        # Another control socket and port: nothing but the home is shared.
        r = run_up(home, "--control-socket", str(tmp_path / "other.sock"),
                   "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}")  # fmt: skip
        assert_clear_refusal(r, str(home), "already used by a running node", f"pid {a.proc.pid}")
        # An offline writer (`record` does not find the node, so it opens the home
        # itself) is refused the same way, and the node still serves.
        w = run_cli("snapshot", "--home", str(home))
        assert_clear_refusal(w, "already used by a running node", f"pid {a.proc.pid}")
        w = run_cli("record", "perf", "--home", str(home), "--model", "m", "--hardware", "cpu",
                    "--throughput", "1")  # fmt: skip
        assert_clear_refusal(w, "in use")  # record opens the file itself: DuckDB's own lock
        assert a.client.post("/v1/record/perf", PERF)["stored"] == 1
        assert a.status()["rows"]["performance_results"] == 1


def test_truncated_database_is_a_clear_error_before_ready(tmp_path: Path) -> None:
    home = tmp_path / "a"
    with running(NodeProcess(home, free_port(), NETWORK)) as a:
        a.client.post("/v1/record/perf", {"records": [PERF] * 50})
    db = home / "benchsync.duckdb"
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(size // 3)
    r = run_up(home, "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}")
    assert_clear_refusal(r, str(db))


def test_used_listen_port_is_a_clear_error_before_ready(tmp_path: Path) -> None:
    port = free_port()
    # Something else listens with SO_REUSEPORT: we must not share its port.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen()
    try:
        r = run_up(tmp_path / "a", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert_clear_refusal(r, str(port))
    finally:
        other.close()
    # And a running node's port cannot be shared by anyone, reuse flag or not.
    with running(NodeProcess(tmp_path / "b", port, NETWORK)):
        intruder = socket.socket()
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
        intruder.close()
        r = run_up(tmp_path / "c", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert_clear_refusal(r, str(port))


# --- finding 7: no acknowledged write is lost around a restore ------------------------------

WRITERS = 3
RESTORES = 3


def _history_test_cases(home: Path, dataset: str, work: Path) -> set[str]:
    """Every performance_results.test_case of every version in the home's history."""
    import pyarrow.parquet as pq

    from benchsync.storage.dataset import LocalDataset
    from benchsync.storage.snapshot import materialize_tables

    seen: set[str] = set()
    with LocalDataset(home, dataset, read_only=True) as ds:
        for i, version in enumerate(ds.history()):
            files = materialize_tables(ds.blocks, version, work / f"v{i}")
            if "performance_results" in files:
                column = pq.read_table(files["performance_results"], columns=["test_case"])
                seen.update(column.column("test_case").to_pylist())
    return seen


def test_no_acknowledged_write_is_lost_around_restores(tmp_path: Path) -> None:
    import threading

    home = tmp_path / "a"
    with running(NodeProcess(home, free_port(), NETWORK,
                             extra_args=["--snapshot-after-writes", "0"])) as node:  # fmt: skip
        node.client.post("/v1/record/perf", {"records": [PERF | {"test_case": "base"}] * 5})
        base = node.client.post("/v1/snapshot", {})
        acknowledged: list[str] = []
        refused: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def writer(w: int) -> None:
            client = node.client  # one connection per thread
            i = 0
            while not stop.is_set():
                name = f"w{w}-{i}"
                i += 1
                try:
                    client.post("/v1/record/perf", PERF | {"test_case": name})
                except ControlAPIError as e:  # refused is allowed; acknowledged-then-lost is not
                    with lock:
                        refused.append(f"{name}: {e.message}")
                    continue
                with lock:
                    acknowledged.append(name)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        try:
            def more_writes(n: int = 20) -> None:
                target = len(acknowledged) + n
                wait_for(f"{n} more acknowledged writes", lambda: len(acknowledged) >= target)

            for _ in range(RESTORES):
                more_writes()  # fresh, unsnapshotted writes when the restore starts
                node.client.post("/v1/restore", {"cid": base["cid"]})
            more_writes()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        node.client.post("/v1/snapshot", {})  # the writes after the last restore
        history = node.client.get("/v1/history")["versions"]
    assert not refused, refused[:5]  # writes wait for the swap; none is turned away
    assert len(acknowledged) > RESTORES * 20
    in_history = _history_test_cases(home, node.peer_id, tmp_path / "versions")
    lost = [name for name in acknowledged if name not in in_history]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged writes lost: {lost[:10]}"
    assert len(history) >= 2 * RESTORES + 1  # a snapshot of the live state before each restore


# --- finding 5: a full disk pauses snapshots, the node keeps serving ------------------------

TMPFS_SIZE = 48 * 2**20  # bytes: the node's whole home lives on a tmpfs this small
ROW_PAD = 1500  # bytes of incompressible metrics per row, so sizes are predictable
BATCH = 400  # records per request (under the control API's body limit)
BIG_ROWS = 4000  # rows snapshotted before the disk fills (~6 MB)
LATE_ROWS = 800  # rows written once the disk is almost full (~1.2 MB: their WAL fits)
LEFT_FREE = 3 * 2**20  # bytes left free: the late rows fit, the next snapshot's export does not


def _padded(prefix: str, n: int) -> list[dict[str, Any]]:
    import base64

    return [PERF | {"test_case": f"{prefix}-{i}",
                    "metrics": {"pad": base64.b64encode(os.urandom(ROW_PAD * 3 // 4)).decode()}}
            for i in range(n)]  # fmt: skip


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                       capture_output=True)  # fmt: skip
    return r.returncode == 0


def test_full_disk_pauses_snapshots_and_they_resume(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and `unshare -m` to mount a private tmpfs")
    sock = tmp_path / "control.sock"  # outside the tmpfs: the test reaches it directly
    home = mnt / "home"
    # The tmpfs exists only in the node's private mount namespace: it disappears with the
    # node, whatever happens to the test. The test sees it through /proc/<pid>/root.
    script = (f"mount -t tmpfs -o size={TMPFS_SIZE} tmpfs {mnt} && exec {sys.executable} -m "
              f"benchsync.daemon.cli up --home {home} --network {NETWORK} "
              f"--listen /ip4/127.0.0.1/tcp/0 --control-socket {sock} "
              f"--snapshot-after-writes {BATCH} --snapshot-interval 0")  # fmt: skip
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE,
                                stderr=log, stdin=subprocess.DEVNULL, text=True,
                                env=_env())  # fmt: skip
    client = ControlClient(socket_path=sock, timeout=60.0)
    try:
        wait_for("the node to listen", lambda: client.available() or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()
        seen_home = Path(f"/proc/{proc.pid}/root") / home.relative_to("/")

        def status() -> dict[str, Any]:
            return dict(client.get("/v1/status"))

        def head_rows() -> int:
            versions = client.get("/v1/history?limit=1")["versions"]
            return int(versions[0]["rows"]["performance_results"]) if versions else 0

        for i in range(0, BIG_ROWS, BATCH):
            client.post("/v1/record/perf", {"records": _padded(f"big{i}", BATCH)})
        wait_for("the scheduled snapshot of the first rows", lambda: head_rows() == BIG_ROWS)
        # Fill the disk, leaving room for the late rows' log but not for another export.
        fill = seen_home / "fill"
        free = os.statvfs(seen_home).f_bavail * os.statvfs(seen_home).f_frsize
        fd = os.open(fill, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, free - LEFT_FREE)
        finally:
            os.close(fd)
        head_before = status()["head"]
        for i in range(0, LATE_ROWS, BATCH):
            client.post("/v1/record/perf", {"records": _padded(f"late{i}", BATCH)})
        paused = wait_for("snapshots to pause on the full disk",
                          lambda: (s := status())["snapshots"]["state"] == "paused"
                          and s)  # fmt: skip
        assert paused["snapshots"]["reason"] == "disk_full", paused["snapshots"]
        assert "disk full" in paused["snapshots"]["error"]
        assert paused["head"] == head_before
        # Still up and serving: status, queries; the CLI says why snapshots wait.
        assert proc.poll() is None
        rows = client.post("/v1/query", {"sql": "SELECT count(*) FROM performance_results"})
        assert rows["rows"] == [[BIG_ROWS + LATE_ROWS]]
        with pytest.raises(ControlAPIError) as info:
            client.post("/v1/snapshot", {})
        assert info.value.code == "disk_full"
        assert not list((seen_home / "tmp").glob("snapshot-*"))  # failed exports cleaned up
        # Space returns: the paused snapshot is retried by itself and takes the late rows.
        fill.unlink()
        resumed = wait_for("snapshots to resume",
                           lambda: (s := status())["snapshots"]["state"] == "ok"
                           and s["head"] != head_before and s)  # fmt: skip
        assert resumed["head_seq"] == paused["head_seq"] + 1
        assert head_rows() == BIG_ROWS + LATE_ROWS
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert "Traceback" not in log_path.read_text()


# --- finding 14: crash leftovers and permissions ---------------------------------------------

LEFTOVERS = ("tmp/snapshot-k1lled/performance_results.parquet", "tmp/restore-k1lled/tables/x",
             ".restore-4242.duckdb", ".restore-4242.duckdb.wal")  # fmt: skip


def _plant(home: Path, names: tuple[str, ...]) -> list[Path]:
    paths = [home / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a crash")
    return paths


def test_crash_leftovers_are_removed_when_the_home_is_free(tmp_path: Path) -> None:
    home = tmp_path / "a"
    with running(OffSocketNode(home, free_port(), NETWORK)) as a:
        a.client.post("/v1/record/perf", PERF)
        a.client.post("/v1/snapshot", {})
        # A running node's scratch files are not leftovers: a command that does not
        # take the home (history) must not touch them.
        live = _plant(home, ("tmp/snapshot-live/models.parquet",))
        r = run_cli("log", "--home", str(home))
        assert r.returncode == 0, r.stderr
        assert all(p.exists() for p in live)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # a crash: nothing of its own is cleaned up
        a.proc.wait(30)
    planted = _plant(home, LEFTOVERS)
    with running(OffSocketNode(home, free_port(), NETWORK)) as again:
        assert not [p for p in planted + live if p.exists()]
        assert (home / "tmp").is_dir()
        assert again.status()["rows"]["performance_results"] == 1


def test_home_and_the_files_a_node_creates_are_private(tmp_path: Path) -> None:
    home = tmp_path / "a"
    home.mkdir()
    home.chmod(0o755)
    with running(NodeProcess(home, free_port(), NETWORK)) as a:
        a.client.post("/v1/record/perf", PERF)
        a.client.post("/v1/snapshot", {})
        assert home.stat().st_mode & 0o777 == 0o700
        blocks = [p for p in (home / "blocks").rglob("*") if p.is_file()]
        made = [home / "benchsync.duckdb", *blocks]
        assert len(made) > 2
        exposed = [(str(p), oct(p.stat().st_mode & 0o777)) for p in made
                   if p.stat().st_mode & 0o077]  # fmt: skip
        assert not exposed, exposed
