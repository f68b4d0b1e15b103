"""benchsync and a real Kubo (v0.22, boxo Bitswap) exchange blocks over Bitswap (issue 12).

Real processes only: a `benchsync up` node (tests start it as NodeProcess) and Kubo
nodes in child processes (tests/kubo.py). Kubo is a stranger to the lab, so the node
serves it only with `bitswap_serve = all`.

- serve: Kubo `Download`s a snapshot by its root CID from the node, and DuckDB reads
  the recorded rows from the Parquet files Kubo wrote; then, that node gone, a node
  that never had the snapshot restores it from Kubo alone.
- get: `benchsync get` fetches a multi-megabyte file only Kubo holds (Kubo's default
  CIDv0 DAG, dag-pb leaves) and writes identical bytes, with no node running on the
  home (printing its JSON answer and nothing else) and through a running node.
- limits: a peer that wants 10,000 CIDs the node never held and every block of the
  snapshot over and over, and never reads a reply, costs only its own streams: Kubo's
  download beside it completes, the node's RSS stays bounded, the node stays up.

Skipped, with the reason, where kubo-python's library cannot run (not x86_64 Linux).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiformats import CID

from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.daemon.host import new_benchsync_host
from benchsync.protocol.bitswap import (
    BITSWAP_120,
    BITSWAP_PROTOCOLS,
    WANT_HAVE,
    Message,
    WantEntry,
    encode_message,
    frame,
)
from benchsync.storage import unixfs
from benchsync.storage.blockstore import FsBlockstore
from benchsync.storage.cid import RAW, block_cid
from tests.kubo import BITSWAP_LOG, Kubo, require_kubo
from tests.test_node_lifecycle import running

pytestmark = pytest.mark.slow

NETWORK = "kubo-interop"
DOWNLOAD_TIMEOUT = 60.0  # seconds for a few MiB over loopback on a loaded 2-core box
ROWS = 400  # recorded rows; with PAD_BYTES each, the results table spans several blocks
PAD_BYTES = 2048  # incompressible bytes per row (random, base64 in `metrics`)
PERF = {"model_name": "bert-base-uncased", "hardware_type": "cuda", "device_name": "A100",
        "batch_size": 8, "latency_avg": 9.8}  # fmt: skip
CHUNK = 256 * 1024  # bytes per UnixFS leaf


RESTORED_SQL = (
    "SELECT r.test_case, r.throughput_items_per_second, m.model_name "
    "FROM performance_results r JOIN models m USING (model_id) ORDER BY r.test_case"
)


def serving_node(tmp_path: Path, *extra: str) -> NodeProcess:
    """A node (own lab key) that serves any Bitswap peer: Kubo is a stranger to its lab."""
    return NodeProcess(tmp_path / "node", free_port(), NETWORK,
                       extra_args=["--no-mdns", "--bitswap-serve", "all", *extra])  # fmt: skip


def records() -> list[dict[str, Any]]:
    return [PERF | {"test_case": f"kubo-{i}", "throughput": 100.0 + i,
                    "metrics": {"pad": base64.b64encode(os.urandom(PAD_BYTES * 3 // 4)).decode()}}
            for i in range(ROWS)]  # fmt: skip


def table_files(snap: Path, table: str) -> list[Path]:
    """A table's Parquet in a snapshot: tables/<table>.parquet or its part-NNNN segments."""
    single = snap / "tables" / f"{table}.parquet"
    files = [single] if single.is_file() else sorted((snap / "tables" / table).glob("part-*"))
    assert files, f"no Parquet for {table} in {sorted(os.listdir(snap / 'tables'))}"
    return files


@dataclass
class SnapshotInKubo:
    kubo: Kubo  # holds the snapshot's blocks (its Download stored them); still running
    root: str
    dataset: str  # the peer ID of the node that recorded it (stopped by now)
    snap: Path  # the files Kubo wrote


@pytest.fixture(scope="module")
def snapshot_in_kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnapshotInKubo]:
    """A node records ROWS rows and snapshots; a Kubo Downloads the snapshot by root CID
    from it (so Kubo holds its blocks); the node stops. Kubo stays up for the module."""
    require_kubo()
    tmp = tmp_path_factory.mktemp("snapshot-in-kubo")
    with Kubo(tmp / "kubo", log_level=BITSWAP_LOG) as kubo:
        with running(serving_node(tmp)) as node:
            assert node.client.post("/v1/record/perf", {"records": records()})["stored"] == ROWS
            root = node.client.post("/v1/snapshot", {})["cid"]
            kubo.connect(node.addr)
            kubo.download(root, tmp / "snap", timeout=DOWNLOAD_TIMEOUT)
        yield SnapshotInKubo(kubo, root, node.peer_id, tmp / "snap")


def expected_rows() -> list[tuple[str, float, str]]:
    return sorted((f"kubo-{i}", 100.0 + i, str(PERF["model_name"])) for i in range(ROWS))


def test_kubo_downloads_a_snapshot_and_duckdb_reads_its_rows(
    snapshot_in_kubo: SnapshotInKubo,
) -> None:
    snap = snapshot_in_kubo.snap
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["dataset"] == snapshot_in_kubo.dataset
    results = table_files(snap, "performance_results")
    assert sum(f.stat().st_size for f in results) > 2 * CHUNK  # several blocks crossed
    con = duckdb.connect()
    got = con.execute(
        "SELECT r.test_case, r.throughput_items_per_second, m.model_name "
        "FROM read_parquet(?) r JOIN read_parquet(?) m USING (model_id) ORDER BY r.test_case",
        [[str(f) for f in results], [str(f) for f in table_files(snap, "models")]],
    ).fetchall()
    assert got == expected_rows()


def test_a_fresh_node_restores_a_snapshot_only_kubo_holds(
    snapshot_in_kubo: SnapshotInKubo, tmp_path: Path
) -> None:
    """The node that recorded it is gone; a node that never had it restores it from IPFS."""
    kubo, root = snapshot_in_kubo.kubo, snapshot_in_kubo.root
    with running(serving_node(tmp_path)) as node:
        kubo.connect(node.addr)
        version = node.client.post("/v1/restore", {"cid": root})
        got = node.client.post("/v1/query", {"sql": RESTORED_SQL})
        bitswap = node.status()["bitswap"]
    assert version["seq"] >= 1, version
    assert [tuple(r) for r in got["rows"]] == expected_rows(), got
    assert bitswap["blocks_received"] >= 3, bitswap  # over Bitswap, from Kubo: nobody else has it



# --- benchsync get: a file only a Kubo holds ---------------------------------------------------

GET_BYTES = 3 * 1024 * 1024 + 12345  # a multi-megabyte file: 13 leaves of Kubo's default DAG
CLI_TIMEOUT = 45.0  # seconds for one `benchsync get` of GET_BYTES (~3 s idle) on a loaded box


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; one that misses CLI_TIMEOUT is killed and returned as
    failed (code -9) with what it wrote, so the assertion shows where it stood."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    argv = [sys.executable, "-m", "benchsync.daemon.cli", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[killed: no exit after {CLI_TIMEOUT:g} s]"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def kubo_only_file(tmp_path: Path, kubo: Kubo) -> tuple[str, bytes]:
    """A random GET_BYTES file added to `kubo` alone (then deleted here); (CID, bytes)."""
    payload = os.urandom(GET_BYTES)
    src = tmp_path / "only-in-kubo.bin"
    src.write_bytes(payload)
    cid = kubo.add(src)
    src.unlink()
    assert cid.startswith("Qm")  # Kubo's default: CIDv0, dag-pb leaves, not our CIDv1 raw leaves
    return cid, payload


def check_get(r: subprocess.CompletedProcess[str], kubo: Kubo, cid: str) -> dict[str, Any]:
    assert r.returncode == 0, f"benchsync get failed:\n{r.stderr[-4000:]}\n{kubo.logs()}"
    doc = dict(json.loads(r.stdout))
    assert doc["cid"] == cid and doc["bitswap_peers"] == [kubo.peer_id], doc
    assert doc["blocks"] >= GET_BYTES // CHUNK + 1, doc  # every leaf came over Bitswap
    return doc


@dataclass
class OfflineGet:
    result: subprocess.CompletedProcess[str]
    cid: str
    payload: bytes
    out: Path


@pytest.fixture(scope="module")
def offline_get(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OfflineGet]:
    """`benchsync get --json` of a file only a Kubo holds, with no node on the home: the
    CLI runs its own short-lived client and dials --peer. One run, checked twice below."""
    require_kubo()
    tmp = tmp_path_factory.mktemp("offline-get")
    with Kubo(tmp / "kubo", log_level=BITSWAP_LOG) as kubo:
        cid, payload = kubo_only_file(tmp, kubo)
        r = run_cli("get", cid, "-o", str(tmp / "got.bin"), "--peer", kubo.addr,
                    "--home", str(tmp / "home"), "--json")  # fmt: skip
        check_get(r, kubo, cid)
        yield OfflineGet(r, cid, payload, tmp / "got.bin")


def test_benchsync_get_fetches_a_file_only_kubo_holds(offline_get: OfflineGet) -> None:
    assert json.loads(offline_get.result.stdout)["path"] == str(offline_get.out)
    assert offline_get.out.read_bytes() == offline_get.payload


def test_a_get_from_kubo_prints_only_its_answer(offline_get: OfflineGet) -> None:
    """A successful `get --json` from a Kubo (outside any lab: it answers `na` to
    /benchsync/lab/1.0.0) writes its JSON and nothing else: no libp2p log lines."""
    err = offline_get.result.stderr
    assert err == "", f"{len(err.splitlines())} lines on stderr:\n{err[:2000]}"


def test_benchsync_get_through_the_running_node(tmp_path: Path) -> None:
    """A node runs on the home: it dials --peer and fetches; the CLI writes from its blocks."""
    require_kubo()
    node = NodeProcess(tmp_path / "node", free_port(), NETWORK, extra_args=["--no-mdns"])
    out = tmp_path / "got.bin"
    kubo = Kubo(tmp_path / "kubo", log_level=BITSWAP_LOG)
    with running(node), kubo:
        cid, payload = kubo_only_file(tmp_path, kubo)
        r = run_cli("get", cid, "-o", str(out), "--peer", kubo.addr,
                    "--home", str(node.home), "--json")  # fmt: skip
        check_get(r, kubo, cid)
        assert node.status()["bitswap"]["blocks_received"] >= GET_BYTES // CHUNK + 1
    assert out.read_bytes() == payload


# --- a Bitswap peer that floods and never reads costs only its own streams ---------------------

UNKNOWN_WANTS = 10_000  # want-haves (send DONT_HAVE) for CIDs the node has never held
WANTS_PER_MESSAGE = 1000  # entries per hostile message (below MAX_ENTRIES: all are decoded)
HOSTILE_ROUNDS = 20  # times the hostile peer asks for every block of the snapshot again
RSS_GROWTH_LIMIT = 200 * 1024 * 1024  # bytes the node may grow while attacked


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def hostile_peer(node: NodeProcess, blocks: list[CID], *,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Ask the node for UNKNOWN_WANTS CIDs it never held and, HOSTILE_ROUNDS times, for
    every block of its snapshot; never read a reply (the stream the node opens to us is
    accepted and left unread, so its blocks pile up against Yamux's window). Reports the
    wantlist entries written (until the node cut us off) and stays connected until
    cancelled."""
    host = new_benchsync_host(create_new_key_pair())

    async def never_read(stream: INetStream) -> None:
        await trio.sleep_forever()

    unknown = [block_cid(RAW, os.urandom(32)) for _ in range(UNKNOWN_WANTS)]
    messages = [tuple(WantEntry(c, want_type=WANT_HAVE, send_dont_have=True)
                      for c in unknown[i : i + WANTS_PER_MESSAGE])
                for i in range(0, UNKNOWN_WANTS, WANTS_PER_MESSAGE)]  # fmt: skip
    messages += [tuple(WantEntry(c) for c in blocks)] * HOSTILE_ROUNDS
    written = 0
    try:
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            for proto in BITSWAP_PROTOCOLS:
                host.set_stream_handler(TProtocol(proto), never_read)
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addr)))
            peer = ID.from_base58(node.peer_id)
            stream = await host.new_stream(peer, [TProtocol(BITSWAP_120)])
            try:
                for entries in messages:
                    await stream.write(frame(encode_message(Message(entries=entries))))
                    written += len(entries)
            except Exception:  # noqa: BLE001 - the node cutting this peer off is fair
                pass
            task_status.started(written)
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await host.close()


async def test_a_peer_flooding_wants_and_never_reading_costs_only_its_own_streams(
    tmp_path: Path,
) -> None:
    require_kubo()
    node = serving_node(tmp_path)
    await trio.to_thread.run_sync(node.start)
    try:
        await trio.to_thread.run_sync(node.wait_ready)
        assert node.proc is not None
        stored = await trio.to_thread.run_sync(
            lambda: node.client.post("/v1/record/perf", {"records": records()}))
        assert stored["stored"] == ROWS
        root = (await trio.to_thread.run_sync(lambda: node.client.post("/v1/snapshot", {})))["cid"]
        store = FsBlockstore(node.home / "blocks")
        blocks = [cid for cid, _ in unixfs.walk(store.get, CID.decode(root))]
        pid = node.proc.pid
        baseline = rss(pid)
        peak = [baseline]

        def watch_rss(stop: threading.Event) -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss(pid))

        def kubo_download() -> None:
            with Kubo(tmp_path / "kubo", log_level=BITSWAP_LOG) as kubo:
                kubo.connect(node.addr)
                kubo.download(root, tmp_path / "snap", timeout=DOWNLOAD_TIMEOUT)

        stop = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, watch_rss, stop)
            written = await nursery.start(hostile_peer, node, blocks)
            # The flood is in and its replies are stuck: an honest transfer still runs.
            await trio.to_thread.run_sync(kubo_download)
            stop.set()
            nursery.cancel_scope.cancel()
        assert written >= WANTS_PER_MESSAGE  # the peer got its first message in at least
        assert node.proc.poll() is None, node.tail_log()
        assert node.status()["peer_id"] == node.peer_id
        assert peak[0] - baseline < RSS_GROWTH_LIMIT, (baseline, peak[0])
        files = table_files(tmp_path / "snap", "performance_results")
        assert sum(f.stat().st_size for f in files) > 2 * CHUNK
    finally:
        await trio.to_thread.run_sync(node.stop)
