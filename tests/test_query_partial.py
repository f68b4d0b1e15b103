"""Issue 10, observations 2 and 3, over real py-libp2p hosts on 127.0.0.1.

3: a peer that is gone, or answers `too_large`, makes the answer *partial*:
   `PartialAnswer` unless `allow_partial`, and then `complete` is false and
   the dataset is named — never a quiet NULL or a short count.
2: a dataset whose origin cannot answer is answered from the replica this
   node holds of it (`source: replica`, its seq and lag), and the answer is
   complete and equals one DuckDB over every node's rows.
"""

from __future__ import annotations

import inspect
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from test_query_network import MEDIAN, NETWORK, TIMEOUT, QNode, records, running

from benchsync.daemon.coordinator import ANSWERED, ORIGIN, REPLICA, PartialAnswer
from benchsync.daemon.local_query import ServerLimits
from benchsync.daemon.network import P2PNode
from benchsync.daemon.query import QueryService
from benchsync.storage.blockstore import MemoryBlockstore
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.sandbox import ResultTooLarge

COUNT = "SELECT count(*) AS n, sum(batch_size) AS bs FROM performance_results"
# Nodes of one test share a lab key, when nodes have one (lab membership, issue 18).
LAB: dict[str, Any] = (
    {"lab_key": bytes(range(32))}
    if "lab_key" in inspect.signature(P2PNode.__init__).parameters else {}
)


async def test_too_large_and_dead_peers_make_the_answer_partial(tmp_path: Path) -> None:
    rng = random.Random(3)
    # c answers too_large to anything row-shaped (shipped rows: its query_ship_max_bytes)
    small = ServerLimits(max_bytes=256, ship_max_bytes=256)
    a, b = QNode(tmp_path, "a", **LAB), QNode(tmp_path, "b", **LAB)
    c = QNode(tmp_path, "c", limits=small, **LAB)
    for node in (a, b, c):
        node.db.ingest_records("perf", records(rng, 300))
    async with running(a, c), trio.open_nursery() as b_life:
        await b_life.start(b.p2p.run)
        with trio.fail_after(TIMEOUT):
            for n in (b, c):
                await n.p2p.connect(a.p2p.addrs[0])
            peers = [b.peer_id, c.peer_id]
            # median ships rows: c's answer exceeds its limit. Before: NULL-free but
            # short medians, or NULL, and nothing said so.
            with pytest.raises(PartialAnswer) as info:
                await a.service.execute(MEDIAN, peers=peers, timeout_s=15)
            assert [p.peer_id for p in info.value.missing] == [c.peer_id]
            assert "too_large" in str(info.value) and c.peer_id in str(info.value)
            partial = info.value.result
            assert not partial.complete and partial.to_json()["missing"] == [c.peer_id]
            allowed = await a.service.execute(MEDIAN, peers=peers, timeout_s=15,
                                              allow_partial=True)  # fmt: skip
            assert not allowed.complete and allowed.to_json()["complete"] is False
            # A complete answer says so.
            full = await a.service.execute(COUNT, peers=[b.peer_id], timeout_s=15)
            assert full.complete and full.table.column("n").to_pylist() == [600]
            assert all(p.source == ORIGIN for p in full.peers)
            # b's host goes away: its dataset is missing, not silently dropped from the sum.
            b_life.cancel_scope.cancel()
        b.close()
        with trio.fail_after(TIMEOUT):
            with pytest.raises(PartialAnswer) as info:
                await a.service.execute(COUNT, peers=[b.peer_id], timeout_s=5)
            assert [p.peer_id for p in info.value.missing] == [b.peer_id]
            assert info.value.result.table.column("n").to_pylist() == [300]


async def test_unreachable_origin_is_answered_from_its_replica(tmp_path: Path) -> None:
    rng = random.Random(4)
    recs = {name: records(rng, n) for name, n in (("a", 50), ("b", 70), ("c", 90))}
    a_home = tmp_path / "a-home"
    b = QNode(tmp_path, "b", **LAB)
    c_p2p_home = tmp_path / "c"
    c = QNode(tmp_path, "c", serve=False, **LAB)  # c's origin never answers queries
    union = BenchmarkDB(tmp_path / "union.duckdb")
    for r in recs.values():
        union.ingest_records("perf", r)
    b.db.ingest_records("perf", recs["b"])
    # c's dataset, snapshotted; a holds a verified replica of it (no network involved).
    c_data = LocalDataset(tmp_path / "c-data", c.peer_id)
    c_data.db.ingest_records("perf", recs["c"])
    root = c_data.snapshot().version.cid
    c_data.close()
    shutil.copytree(tmp_path / "c-data" / "blocks", a_home / "blocks")
    a_data = LocalDataset(a_home, "")
    a_p2p = P2PNode(tmp_path / "a", network=NETWORK, blockstore=MemoryBlockstore(), **LAB)
    a_data.dataset = a_p2p.peer_id
    a_data.db.ingest_records("perf", recs["a"])
    replica = a_data.install_replica(root)
    a_service = QueryService(a_p2p, a_data.db, replicas=a_data.replicas)
    a_service.register()
    try:
        async with running(b, c) as nursery:
            await nursery.start(a_p2p.run)
            with trio.fail_after(TIMEOUT):
                await b.p2p.connect(a_p2p.addrs[0])
                sql = ("SELECT m.model_name, count(*) AS n, sum(r.batch_size) AS bs "
                       "FROM performance_results r JOIN models m USING (model_id) "
                       "GROUP BY 1 ORDER BY 1")  # fmt: skip
                result = await a_service.execute(sql, peers=[b.peer_id, c.peer_id],
                                                 timeout_s=10)  # fmt: skip
                assert result.complete
                assert result.table.to_pylist() == union.query(sql).to_pylist()
                by = {p.peer_id: p for p in result.peers}
                assert by[b.peer_id].source == ORIGIN and by[b.peer_id].status == ANSWERED
                assert by[c.peer_id].source == REPLICA and by[c.peer_id].status != ANSWERED
                assert by[c.peer_id].seq == replica.seq and by[c.peer_id].lag_seq == 0
                doc = result.to_json()["peers"]
                assert {p["dataset"]: p["source"] for p in doc} == {
                    a_p2p.peer_id: "origin", b.peer_id: "origin", c.peer_id: "replica"}
                # Known by default: the replica's dataset is asked without --peer.
                assert c.peer_id in a_service.default_peers()
                nursery.cancel_scope.cancel()
    finally:
        a_service.close()
        a_data.close()
        union.close()
    assert c_p2p_home.exists()


SHIP_CTE = (
    "WITH r AS (SELECT hardware_id, throughput_items_per_second AS t FROM performance_results) "
    "SELECT h.hardware_type, median(r.t) AS med, count(*) AS n "
    "FROM r JOIN hardware_platforms h USING (hardware_id) GROUP BY 1 ORDER BY 1"
)


async def test_row_shipping_is_bounded_by_bytes_not_by_query_max_rows(tmp_path: Path) -> None:
    """median() over more rows per node than query_max_rows: the rows ship (a request
    with purpose "ship", bounded by the peer's query_ship_max_bytes), and the answer is
    complete and equals one DuckDB over the union. Before: each node's part hit
    max_rows (too_large) and the answer was partial (exit 3)."""
    rng = random.Random(11)
    union = BenchmarkDB(tmp_path / "union.duckdb")
    nodes = []
    for name in "ab":
        p2p = P2PNode(tmp_path / name, network=NETWORK, blockstore=MemoryBlockstore(), **LAB)
        db = BenchmarkDB(tmp_path / name / "bench.duckdb")
        recs = records(rng, 3000)
        db.ingest_records("perf", recs)
        union.ingest_records("perf", recs)
        # as the node builds it from query_max_rows = 1000 (and the default ship bytes)
        service = QueryService(p2p, db, max_rows=1000)
        service.register()
        nodes.append((p2p, db, service))
    (a, _, a_service), (b, _, b_service) = nodes
    try:
        async with trio.open_nursery() as nursery:
            for p2p, _, _ in nodes:
                await nursery.start(p2p.run)
            with trio.fail_after(TIMEOUT):
                await b.connect(a.addrs[0])
                for sql, strategy in ((MEDIAN, "rows"), (SHIP_CTE, "shipped")):
                    result = await a_service.execute(sql, peers=[b.peer_id], timeout_s=20)
                    assert result.strategy == strategy
                    assert result.complete, result.to_json()["peers"]
                    assert result.table.to_pylist() == union.query(sql).to_pylist()
                    assert sum(r["n"] for r in result.table.to_pylist()) == 6000
                    assert all(p.rows >= 3000 for p in result.peers)  # + hardware rows
                assert b_service.server.stats.errors == {}
                # The answer itself is still bounded by the caller's rows.
                with pytest.raises(ResultTooLarge, match="rows"):
                    await a_service.execute("SELECT DISTINCT throughput_items_per_second "
                                            "FROM performance_results", peers=[b.peer_id],
                                            timeout_s=20)  # fmt: skip
                # A node's own query_ship_max_bytes bounds what it ships: b refuses.
                b_service.local.limits = b_service.server.limits = ServerLimits(
                    max_rows=1000, ship_max_bytes=4096)  # fmt: skip
                with pytest.raises(PartialAnswer, match="too_large"):
                    await a_service.execute(MEDIAN, peers=[b.peer_id], timeout_s=20)
            nursery.cancel_scope.cancel()
    finally:
        for _, db, service in nodes:
            service.close()
            db.close()
        union.close()
