"""`/benchsync/query/1.0.0` over real py-libp2p hosts on 127.0.0.1.

Every node has its own real BenchmarkDB file in tmp_path; "the right answer"
is the same SQL on one more BenchmarkDB that holds the union of every node's
records (its local ids differ; the queries group by values, as the design
asks). Misbehaving peers are P2PNodes with hand-written handlers.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiformats import varint

from benchsync.daemon.coordinator import (
    ANSWERED,
    ERROR,
    REFUSED,
    TIMED_OUT,
    UNREACHABLE,
    PeersMissing,
    exchange,
)
from benchsync.daemon.host import StreamReader, parse_peer_addr, read_some
from benchsync.daemon.local_query import LocalQueryService, ServerLimits
from benchsync.daemon.network import P2PNode
from benchsync.daemon.query import QueryService
from benchsync.protocol.frames import Refused, encode_json_frame
from benchsync.protocol.planner import plan_sql
from benchsync.protocol.query import (
    MAX_HELLO_FRAME,
    MAX_REQUEST_FRAME,
    QUERY_PROTOCOL_ID,
    QueryRequest,
    QueryResponse,
)
from benchsync.storage.blockstore import MemoryBlockstore
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.distquery import DUCKDB
from benchsync.storage.sandbox import InvalidSQL, QueryRefused
from benchsync.storage.sandbox_worker import from_ipc, to_ipc
from tests.test_p2p import LAB_KEY

NETWORK = "lab"
TIMEOUT = 25  # seconds: bound for one multi-node scenario on a loaded 2-core box
MODELS = ["bert-base", "gpt2", "vit-b16", "t5-small"]
HARDWARE = ["cpu", "cuda", "rocm"]
GROUP_BY = (
    "SELECT m.model_name, h.hardware_type, count(*) AS n, "
    "avg(p.throughput_items_per_second) AS tput, min(p.average_latency_ms) AS lo, "
    "sum(p.batch_size) AS bs FROM performance_results p "
    "JOIN models m ON p.model_id = m.model_id "
    "JOIN hardware_platforms h ON p.hardware_id = h.hardware_id "
    "WHERE p.batch_size >= ? GROUP BY 1, 2 ORDER BY 1, 2"
)
MEDIAN = (
    "SELECT h.hardware_type, median(p.throughput_items_per_second) AS med, count(*) AS n "
    "FROM performance_results p JOIN hardware_platforms h ON p.hardware_id = h.hardware_id "
    "GROUP BY 1 ORDER BY 1"
)


def records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [
        {
            "model_name": rng.choice(MODELS),
            "hardware_type": rng.choice(HARDWARE),
            "batch_size": rng.choice([1, 2, 4, 8]),
            "throughput": rng.uniform(10, 2000),
            "latency_avg": None if rng.random() < 0.1 else rng.uniform(0.5, 50),
        }
        for _ in range(n)
    ]


class QNode:
    """A P2PNode with its own BenchmarkDB and (unless `serve=False`) a QueryService."""

    def __init__(self, tmp: Path, name: str, *, serve: bool = True,
                 limits: ServerLimits | None = None, **p2p: Any) -> None:  # fmt: skip
        p2p.setdefault("lab_key", LAB_KEY)  # one lab for every node of these tests
        self.p2p = P2PNode(tmp / name, network=p2p.pop("network", NETWORK),
                           blockstore=MemoryBlockstore(), **p2p)  # fmt: skip
        self.db = BenchmarkDB(tmp / name / "bench.duckdb")
        self.service = QueryService(self.p2p, self.db, limits=limits)
        if serve:
            self.service.register()

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    def close(self) -> None:
        self.service.close()
        self.db.close()


@asynccontextmanager
async def running(*nodes: QNode) -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            for n in nodes:
                await nursery.start(n.p2p.run)
            yield nursery
            nursery.cancel_scope.cancel()
    finally:
        for n in nodes:
            n.close()


def assert_same(got: pa.Table, want: pa.Table) -> None:
    """Same columns, same rows in the same order; floats equal to 1e-9 relative."""
    assert got.column_names == want.column_names
    g, w = got.to_pylist(), want.to_pylist()
    assert len(g) == len(w) > 0, (g, w)
    for rg, rw in zip(g, w, strict=True):
        for name in got.column_names:
            a, b = rg[name], rw[name]
            if isinstance(a, float) or isinstance(b, float):
                assert a is not None and b is not None, (rg, rw)
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (name, rg, rw)
            else:
                assert a == b, (name, rg, rw)


async def ask_raw(asker: QNode, server: QNode, request: QueryRequest) -> Any:
    stream = await asker.p2p.open_stream(server.peer_id, QUERY_PROTOCOL_ID)
    try:
        response, _ = await exchange(stream, request, network=NETWORK)
    finally:
        await stream.close()
    return response


async def test_fan_out_equals_one_duckdb_over_the_union(tmp_path: Path) -> None:
    rng = random.Random(5)
    a, b, c = (QNode(tmp_path, n) for n in "abc")
    union = BenchmarkDB(tmp_path / "union.duckdb")
    for node, rows in ((a, 70), (b, 40), (c, 90)):
        recs = records(rng, rows)
        node.db.ingest_records("perf", recs)
        union.ingest_records("perf", recs)
    with trio.fail_after(TIMEOUT):
        async with running(a, b, c):
            await b.p2p.connect(a.p2p.addrs[0])
            await c.p2p.connect(a.p2p.addrs[0])
            result = await a.service.execute(GROUP_BY, [2], timeout_s=10)
            assert result.strategy == "decomposed"
            assert_same(result.table, union.query(GROUP_BY, [2]))
            assert [p.peer_id for p in result.peers] == [a.peer_id, *sorted([b.peer_id, c.peer_id])]
            assert all(p.status == ANSWERED for p in result.peers) and result.complete
            assert result.peers[0].local and result.peers[0].bytes == 0
            assert all(p.bytes > 0 and p.rows > 0 for p in result.peers[1:])
            doc = result.to_json()
            assert doc["columns"] == ["model_name", "hardware_type", "n", "tput", "lo", "bs"]
            assert sum(r[2] for r in doc["rows"]) == union.query(
                "SELECT count(*) AS n FROM performance_results WHERE batch_size >= 2"
            )["n"][0].as_py()

            # A query with no exact merge ships rows and still equals the union.
            med = await a.service.execute(MEDIAN, timeout_s=10)
            assert med.strategy == "rows" and med.reason
            assert_same(med.table, union.query(MEDIAN))

            # New rows at b are seen by the next query (b reloads once, not per query).
            loads = b.service.local.loads
            await b.service.execute(MEDIAN, peers=[], timeout_s=10)
            assert b.service.local.loads == loads  # unchanged data: no reload
            more = records(rng, 25)
            b.db.ingest_records("perf", more)
            union.ingest_records("perf", more)
            # c bootstrapped to a only; it asks b too (dialling it if peer exchange
            # has not connected them yet).
            info = parse_peer_addr(b.p2p.addrs[0])
            c.p2p.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
            again = await c.service.execute(GROUP_BY, [1], peers=[a.peer_id, b.peer_id],
                                            timeout_s=10)  # fmt: skip
            assert_same(again.table, union.query(GROUP_BY, [1]))
            assert b.service.local.loads == loads + 1
            assert b.service.server.stats.errors == {}
            # The caller's SQL is at fault: a typed error, not a per-peer status.
            with pytest.raises(InvalidSQL, match="nope"):
                await a.service.execute("SELECT nope FROM performance_results", timeout_s=5)
            with pytest.raises(QueryRefused):
                await a.service.execute("DELETE FROM models", timeout_s=5)
    union.close()


HOSTILE = [
    ("SELECT 1; SELECT 2", {"refused"}),
    ("COPY performance_results TO '{out}/leak.csv'", {"refused"}),
    ("ATTACH '{out}/other.duckdb' AS other", {"refused"}),
    ("INSTALL httpfs", {"refused"}),
    ("LOAD httpfs", {"refused"}),
    ("PRAGMA database_list", {"refused"}),
    ("SET memory_limit = '64GB'", {"refused"}),
    ("CREATE TABLE evil AS SELECT 1 AS x", {"refused"}),
    ("INSERT INTO models (model_id, model_name) VALUES (99, 'evil')", {"refused"}),
    ("SELECT * FROM read_csv('/etc/passwd')", {"refused"}),
    ("SELECT * FROM read_parquet('{out}/*.parquet')", {"refused"}),
    # 100M rows materialized: over the memory limit (no spilling), or slower than 1 s.
    ("SELECT count(*) FROM range(100000000) a, range(100000000) b", {"timeout", "too_large"}),
    ("SELECT * FROM range(5000000)", {"too_large"}),
    ("SELECT no_such_column FROM performance_results", {"invalid_sql"}),
]


async def test_hostile_queries_over_a_real_stream_are_refused_or_limited(tmp_path: Path) -> None:
    a, u = QNode(tmp_path, "a"), QNode(tmp_path, "u", serve=False)
    a.db.ingest_records("perf", records(random.Random(1), 30))
    before = a.db.table_counts()
    with trio.fail_after(TIMEOUT):
        async with running(a, u):
            await u.p2p.connect(a.p2p.addrs[0])
            for template, expected in HOSTILE:
                sql = template.format(out=tmp_path)
                request = QueryRequest(sql=sql, timeout_s=1.0, max_rows=100_000)
                response = await ask_raw(u, a, request)
                assert response.status in expected, (sql, response)
                assert response.message and not response.arrow_ipc
            # The node still answers, and nothing was written or leaked.
            ok = await ask_raw(u, a, QueryRequest(sql="SELECT count(*) AS n FROM models"))
            assert ok.status == "ok"
            assert from_ipc(ok.arrow_ipc)["n"][0].as_py() == before["models"]
    assert not list(tmp_path.glob("leak*")) and not (tmp_path / "other.duckdb").exists()
    with BenchmarkDB(tmp_path / "a" / "bench.duckdb", read_only=True) as db:
        assert db.table_counts() == before
        assert "evil" not in db.query("SELECT model_name FROM models")["model_name"].to_pylist()


def stalling_handler(release: trio.Event) -> Callable[[INetStream], Awaitable[None]]:
    async def handler(stream: INetStream) -> None:
        reader = StreamReader(stream, max_frame=MAX_HELLO_FRAME)
        await reader.frame(max_frame=MAX_HELLO_FRAME)
        await reader.frame(max_frame=MAX_REQUEST_FRAME)
        await release.wait()  # never answers while the test runs

    return handler


async def dying_handler(stream: INetStream) -> None:
    """Reads the request, sends a third of a frame, then resets the stream."""
    reader = StreamReader(stream, max_frame=MAX_HELLO_FRAME)
    await reader.frame(max_frame=MAX_HELLO_FRAME)
    await reader.frame(max_frame=MAX_REQUEST_FRAME)
    await stream.write(varint.encode(3000) + b"BSR1" + b"\x00" * 996)
    await stream.reset()


async def lying_handler(stream: INetStream) -> None:
    """Answers with the planned column names but every value a string."""
    reader = StreamReader(stream, max_frame=MAX_HELLO_FRAME)
    await reader.frame(max_frame=MAX_HELLO_FRAME)
    await reader.frame(max_frame=MAX_REQUEST_FRAME)
    columns = plan_sql(GROUP_BY, [1], DUCKDB).partial_columns
    table = pa.table({c: pa.array(["lie"], pa.string()) for c in columns})
    body = QueryResponse("ok", arrow_ipc=to_ipc(table)).to_bytes()
    await stream.write(varint.encode(len(body)) + body)


async def test_stalled_dead_and_unreachable_peers_are_reported(tmp_path: Path) -> None:
    rng = random.Random(9)
    a, b = QNode(tmp_path, "a"), QNode(tmp_path, "b")
    stall, dies = QNode(tmp_path, "stall", serve=False), QNode(tmp_path, "dies", serve=False)
    mute = QNode(tmp_path, "mute", serve=False)  # connected, does not speak the protocol
    release = trio.Event()
    stall.p2p.add_stream_handler(QUERY_PROTOCOL_ID, stalling_handler(release))
    dies.p2p.add_stream_handler(QUERY_PROTOCOL_ID, dying_handler)
    liar = QNode(tmp_path, "liar", serve=False)
    liar.p2p.add_stream_handler(QUERY_PROTOCOL_ID, lying_handler)
    union = BenchmarkDB(tmp_path / "union.duckdb")
    for node in (a, b):
        recs = records(rng, 50)
        node.db.ingest_records("perf", recs)
        union.ingest_records("perf", recs)
    ghost = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    with trio.fail_after(TIMEOUT):
        async with running(a, b, stall, dies, mute, liar):
            for n in (b, stall, dies, mute, liar):
                await n.p2p.connect(a.p2p.addrs[0])
            t0 = trio.current_time()
            result = await a.service.execute(GROUP_BY, [1], timeout_s=2.0, allow_partial=True)
            assert trio.current_time() - t0 < 4.0  # the deadline held
            status = {p.peer_id: p for p in result.peers}
            assert status[a.peer_id].status == ANSWERED and status[b.peer_id].status == ANSWERED
            assert status[stall.peer_id].status == TIMED_OUT
            assert status[dies.peer_id].status == ERROR
            assert "mid-answer" in status[dies.peer_id].message
            assert status[mute.peer_id].status == ERROR
            assert status[liar.peer_id].status == ERROR
            assert "column types" in status[liar.peer_id].message
            assert not result.complete and len(result.missing) == 4
            # The answer holds the nodes that answered, exactly.
            assert_same(result.table, union.query(GROUP_BY, [1]))
            assert "timed_out" in str(result.to_json()["peers"])

            named = await a.service.execute(MEDIAN, peers=[b.peer_id, ghost], timeout_s=2.0,
                                            allow_partial=True)  # fmt: skip
            assert {p.peer_id: p.status for p in named.peers} == {
                a.peer_id: ANSWERED, b.peer_id: ANSWERED, ghost: UNREACHABLE}
            assert_same(named.table, union.query(MEDIAN))

            with pytest.raises(PeersMissing) as e:
                await a.service.execute(GROUP_BY, [1], timeout_s=1.5, require_all=True)
            missing = {stall.peer_id, dies.peer_id, mute.peer_id, liar.peer_id}
            assert {p.peer_id for p in e.value.missing} == missing
            assert stall.peer_id in str(e.value) and "allow_partial" in str(e.value)
            # Everyone who can answer still does.
            ok = await a.service.execute(GROUP_BY, [1], peers=[b.peer_id], require_all=True,
                                         timeout_s=5)  # fmt: skip
            assert ok.complete
            release.set()
    union.close()


async def test_untrusted_peer_and_wrong_network_are_refused(tmp_path: Path) -> None:
    a = QNode(tmp_path, "a")
    u = QNode(tmp_path, "u")
    a.db.ingest_records("perf", records(random.Random(2), 10))
    c = QNode(tmp_path, "c", trusted_peers={a.peer_id})
    c.db.ingest_records("perf", records(random.Random(3), 10))
    with trio.fail_after(TIMEOUT):
        async with running(a, u, c):
            await u.p2p.connect(c.p2p.addrs[0])
            await a.p2p.connect(c.p2p.addrs[0])
            got = await u.service.execute(MEDIAN, peers=[c.peer_id], timeout_s=5,
                                          allow_partial=True)  # fmt: skip
            (refused,) = [p for p in got.peers if p.peer_id == c.peer_id]
            assert refused.status == REFUSED and "trusted_peers" in refused.message
            assert c.service.server.stats.requests == 0  # refused before the query ran
            ok = await a.service.execute(MEDIAN, peers=[c.peer_id], timeout_s=5)
            assert ok.complete
            assert sum(ok.table["n"].to_pylist()) == 20
            # A hello naming another network is refused too, by the stream adapter.
            stream = await a.p2p.open_stream(c.peer_id, QUERY_PROTOCOL_ID)
            with pytest.raises(Refused, match="wrong network"):
                await exchange(stream, QueryRequest(sql="SELECT 1"), network="elsewhere")
            await stream.close()
            # The untrusted peer's raw stream gets the adapter's refusal.
            stream = await u.p2p.open_stream(c.peer_id, QUERY_PROTOCOL_ID)
            with pytest.raises(Refused, match="trusted_peers"):
                await exchange(stream, QueryRequest(sql="SELECT 1"), network=NETWORK)
            await stream.close()
            # c's own default set leaves out nobody it trusts: a is asked.
            mine = await c.service.execute(MEDIAN, timeout_s=5)
            assert [p.peer_id for p in mine.peers] == [c.peer_id, a.peer_id]


async def read_all(stream: INetStream) -> bytes:
    out = b""
    while data := await read_some(stream):
        out += data
    return out


async def test_garbage_on_the_query_stream_costs_that_stream_only(tmp_path: Path) -> None:
    a, u = QNode(tmp_path, "a"), QNode(tmp_path, "u", serve=False)
    a.db.ingest_records("perf", records(random.Random(4), 10))
    hello = encode_json_frame({"network": NETWORK})
    garbage = [
        b"\xff" * 32,  # not a varint
        varint.encode(50 * 1024 * 1024) + b"x" * 100,  # a frame far above the limit
        hello + varint.encode(20) + b"BSQ1" + b"\x00\x00\xff\xff" + b"{" * 12,  # bad request
        encode_json_frame([1, 2, 3]),  # hello that is not an object
    ]
    with trio.fail_after(TIMEOUT):
        async with running(a, u):
            await u.p2p.connect(a.p2p.addrs[0])
            replies = []
            for junk in garbage:
                stream = await u.p2p.open_stream(a.peer_id, QUERY_PROTOCOL_ID)
                await stream.write(junk)
                replies.append(await read_all(stream))  # ends: reset, or closed after an error
                await stream.close()
            # Each gets a short refusal naming the fault before the stream closes.
            assert b"malformed query request" in replies[2]
            assert all(b'"status":"refused"' in r and len(r) < 1024 for r in replies), replies
            assert a.p2p.running and u.peer_id in a.p2p.connected_peers()
            response = await ask_raw(u, a, QueryRequest(sql="SELECT count(*) AS n FROM models"))
            assert response.status == "ok"


async def test_local_part_follows_writes_and_a_replaced_database(tmp_path: Path) -> None:
    first, second = BenchmarkDB(tmp_path / "1.duckdb"), BenchmarkDB(tmp_path / "2.duckdb")
    first.ingest_records("perf", records(random.Random(6), 5))
    second.ingest_records("perf", records(random.Random(7), 12))
    current = [first]
    local = LocalQueryService(lambda: current[0])
    count = "SELECT count(*) AS n FROM performance_results"

    async def rows() -> int:
        table = await local.execute(count, timeout_s=5)
        return int(table["n"][0].as_py())

    try:
        assert await rows() == 5 and await rows() == 5
        assert local.loads == 1  # unchanged data is not re-read
        first.ingest_records("perf", records(random.Random(8), 3))
        assert await rows() == 8 and local.loads == 2
        current[0] = second  # a restore swapped the database object
        assert await rows() == 12
        first.ingest_records("perf", records(random.Random(9), 1))  # old db: ignored now
        assert await rows() == 12 and local.loads == 3
    finally:
        local.close()
        first.close()
        second.close()


async def test_server_limits_memory_and_streams_per_peer(tmp_path: Path) -> None:
    limits = ServerLimits(memory_limit="32MB", max_per_peer=1, max_rows=50)
    a, u = QNode(tmp_path, "a", limits=limits), QNode(tmp_path, "u", serve=False)
    a.db.ingest_records("perf", records(random.Random(5), 80))
    hog = "SELECT max(l) FROM (SELECT list(i) AS l FROM range(30000000) t(i))"
    slow = "SELECT count(*) FROM range(1000000000000) a, range(10) b"  # slow, little memory
    with trio.fail_after(TIMEOUT):
        async with running(a, u):
            await u.p2p.connect(a.p2p.addrs[0])
            response = await ask_raw(u, a, QueryRequest(sql=hog, timeout_s=5))
            assert response.status == "too_large" and "memory" in response.message
            # The node's max_rows wins over the requester's larger one.
            rows = await ask_raw(u, a, QueryRequest(
                sql="SELECT * FROM performance_results", max_rows=1000))  # fmt: skip
            assert rows.status == "too_large" and "50" in rows.message
            answers: list[str] = []

            async def ask(sql: str, timeout_s: float) -> None:
                r = await ask_raw(u, a, QueryRequest(sql=sql, timeout_s=timeout_s))
                answers.append(f"{r.status}: {r.message}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, slow, 1.5)
                # The slow one holds u's only slot once the server counts it
                # (server state has no event to await; poll the condition).
                while a.service.server.stats.requests < 3:
                    await trio.sleep(0.01)
                nursery.start_soon(ask, "SELECT 1", 5.0)
            assert answers[0].startswith("refused: busy") and answers[1].startswith("timeout")
            assert not a.service.server.active  # every slot was given back
            ok = await ask_raw(u, a, QueryRequest(sql="SELECT count(*) AS n FROM models"))
            assert ok.status == "ok"


async def test_peer_memory_hogs_are_refused_and_the_node_does_not_grow(tmp_path: Path) -> None:
    """Finding 4: DuckDB's own accounting let `list_sum(range(...))` take a node to
    16 GiB and answer ok. The worker's OS limit refuses it; the node's RSS stays."""
    limits = ServerLimits(memory_limit="256MiB")
    a, u = QNode(tmp_path, "a", limits=limits), QNode(tmp_path, "u", serve=False)
    a.db.ingest_records("perf", records(random.Random(12), 20))
    me = psutil.Process()
    hogs = ["SELECT list_sum(range(0, 100000000)) AS s",  # 800 MB, outside DuckDB's limit
            "SELECT length(repeat('x', 1000000000)) AS n"]  # 1 GB  # fmt: skip
    with trio.fail_after(TIMEOUT * 2):
        async with running(a, u):
            await u.p2p.connect(a.p2p.addrs[0])
            ok = await ask_raw(u, a, QueryRequest(sql="SELECT count(*) AS n FROM models"))
            assert ok.status == "ok"
            before = me.memory_info().rss
            for sql in hogs:
                response = await ask_raw(u, a, QueryRequest(sql=sql, timeout_s=20))
                assert response.status == "too_large" and "memory" in response.message, sql
            assert me.memory_info().rss - before < 150 * 2**20
            again = await ask_raw(u, a, QueryRequest(sql="SELECT count(*) AS n FROM models"))
            assert again.status == "ok" and a.p2p.running


async def test_one_peer_cannot_take_every_slot(tmp_path: Path) -> None:
    """Finding 10: two long queries from one peer filled both slots and everyone
    else timed out. One peer runs one query at a time; others and the node go on."""
    limits = ServerLimits(max_concurrent=2, max_per_peer=2, max_running_per_peer=1)
    a = QNode(tmp_path, "a", limits=limits)
    hog, other = QNode(tmp_path, "hog", serve=False), QNode(tmp_path, "other", serve=False)
    a.db.ingest_records("perf", records(random.Random(13), 10))
    slow = "SELECT count(*) FROM range(1000000000000) a, range(10) b"
    hog_answers: list[str] = []
    with trio.fail_after(TIMEOUT * 2):
        async with running(a, hog, other) as nursery:
            for n in (hog, other):
                await n.p2p.connect(a.p2p.addrs[0])

            async def hog_asks() -> None:
                r = await ask_raw(hog, a, QueryRequest(sql=slow, timeout_s=40))
                hog_answers.append(r.status)

            nursery.start_soon(hog_asks)
            nursery.start_soon(hog_asks)
            pool = a.service.local.pool
            # Both of hog's queries arrived: one runs, one waits for hog's own turn.
            while not (pool.peers.running.get(hog.peer_id) == 1 and pool.peers.waiting == 1):
                await trio.sleep(0.01)
            t0 = trio.current_time()
            answer = await ask_raw(other, a, QueryRequest(sql="SELECT 1 AS x", timeout_s=10))
            assert answer.status == "ok", answer
            # The node's own queries have their own slots.
            mine = await a.service.local.execute("SELECT count(*) AS n FROM models", timeout_s=10)
            assert mine["n"][0].as_py() > 0
            assert trio.current_time() - t0 < 20  # not held up by hog's 40 s queries
            assert hog_answers == []  # hog's queries are still running/waiting
