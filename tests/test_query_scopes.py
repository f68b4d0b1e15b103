"""Local and replicas queries through a real node's control API: the same gate,
sandbox and limits as a peer's query (issue 17, finding 9).

Before, these scopes ran on the node's main DuckDB: `read_blob` returned the
node's private key, `/etc/passwd` and `duckdb_settings()` were readable, and a
runaway query had no time limit and held shutdown for half a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from test_node import PERF, call, make_node

from benchsync.daemon.control import ControlAPIError, ControlClient
from benchsync.daemon.local_query import DEFAULT_LIMITS, DEFAULT_MEMORY_LIMIT
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.sandbox import InvalidSQL, QueryLimits, QueryRefused, QueryTimeout

WAIT = 60.0  # seconds: bound for any condition on a loaded 2-core box
SLOW = "SELECT count(*) AS n FROM range(1000000000000) a, range(10) b"  # CPU, little memory


def hostile(home: Path) -> list[str]:
    return [
        f"SELECT * FROM read_blob('{home}/identity.key')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT name, value FROM duckdb_settings()",
        "SELECT * FROM read_csv('http://127.0.0.1:9/data.csv')",  # no httpfs autoinstall
        f"SELECT * FROM read_parquet('{home}/replicas/*/*/*.parquet')",
        f"ATTACH '{home}/benchsync.duckdb' AS again",
        "SET enable_external_access = true",
    ]


async def refused(client: ControlClient, sql: str, scope: str) -> ControlAPIError:
    with pytest.raises(ControlAPIError) as info:
        await call(client, "POST", "/v1/query", {"sql": sql, "scope": scope})
    return info.value


async def test_local_and_replicas_scopes_are_sandboxed(tmp_path: Path) -> None:
    node = make_node(tmp_path / "a", query_timeout=3.0, query_memory_limit=256 * 2**20)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(node.run)
        client = ControlClient(socket_path=endpoints.socket_path)
        with trio.fail_after(WAIT * 2):
            await call(client, "POST", "/v1/record/perf", PERF)
            for scope in ("local", "replicas"):
                for sql in hostile(node.home):
                    error = await refused(client, sql, scope)
                    assert error.code == "refused", (scope, sql, error)
                    assert "PRIVATE KEY" not in error.message and "root:" not in error.message
                # The time limit holds in both scopes.
                t0 = time.monotonic()
                error = await refused(client, SLOW, scope)
                assert error.code == "timeout" and time.monotonic() - t0 < WAIT
                # So does the memory limit, outside DuckDB's accounting.
                rss = psutil.Process().memory_info().rss
                error = await refused(client, "SELECT list_sum(range(0, 100000000)) AS s", scope)
                assert error.code == "too_large" and "memory" in error.message
                assert psutil.Process().memory_info().rss - rss < 150 * 2**20
            # Honest queries still answer, replicas with their origin column.
            local = await call(client, "POST", "/v1/query",
                               {"sql": "SELECT count(*) FROM performance_results"})  # fmt: skip
            assert local["rows"] == [[1]]
            mine = await call(client, "POST", "/v1/query", {
                "sql": "SELECT origin, count(*) AS n FROM performance_results GROUP BY 1",
                "scope": "replicas"})  # fmt: skip
            assert mine["rows"] == [[node.peer_id, 1]]
        nursery.cancel_scope.cancel()


async def test_shutdown_does_not_wait_for_a_running_query(tmp_path: Path) -> None:
    node = make_node(tmp_path / "a", query_timeout=120.0)
    outcome: list[Any] = []
    async with trio.open_nursery() as outer:
        stopped = trio.Event()

        scopes: list[trio.CancelScope] = []

        async def run_node(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await node.run(task_status=task_status)
            stopped.set()

        endpoints = await outer.start(run_node)
        client = ControlClient(socket_path=endpoints.socket_path, timeout=WAIT)

        async def slow() -> None:
            try:
                outcome.append(await call(client, "POST", "/v1/query", {"sql": SLOW}))
            except Exception as e:  # the node went away mid-answer
                outcome.append(e)

        outer.start_soon(slow)
        pool = node.queries.local.pool
        with trio.fail_after(WAIT):
            while not [w for w in pool.workers if w.address_limit and w not in pool._idle]:
                await trio.sleep(0.01)
        (worker,) = [w for w in pool.workers if w not in pool._idle]
        t0 = time.monotonic()
        scopes[0].cancel()  # what SIGTERM does
        with trio.fail_after(WAIT):
            await stopped.wait()
        assert time.monotonic() - t0 < 20  # not the query's 120 s
        assert worker.returncode is not None
    assert not isinstance(outcome[0], dict)  # the slow query never answered


def test_offline_queries_pass_the_same_gate_and_sandbox(tmp_path: Path) -> None:
    """`LocalDataset.query` (the offline CLI's path) never runs user SQL on the database."""
    home = tmp_path / "home"
    limits = {"limits": DEFAULT_LIMITS, "memory_limit": f"{DEFAULT_MEMORY_LIMIT}B"}
    slow = QueryLimits(timeout_s=0.5, max_rows=1, max_bytes=1024)
    with LocalDataset(home, "12D3KooWSelf") as ds:
        ds.db.ingest_records("perf", [PERF])
        (home / "identity.key").write_bytes(b"PRIVATE KEY")
        for scope in ("local", "replicas"):
            for sql in hostile(home):
                with pytest.raises((QueryRefused, InvalidSQL)):
                    ds.query(sql, scope=scope, **limits)
            with pytest.raises(QueryTimeout):
                ds.query(SLOW, scope=scope, limits=slow, memory_limit=limits["memory_limit"])
        count = ds.query("SELECT count(*) AS n FROM performance_results", **limits)
        assert count["n"].to_pylist() == [1]
        mine = ds.query("SELECT origin, count(*) AS n FROM performance_results GROUP BY 1",
                        scope="replicas", **limits)  # fmt: skip
        assert mine.to_pylist() == [{"origin": "12D3KooWSelf", "n": 1}]


def test_offline_cli_refuses_reading_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "BENCHSYNC_HOME": str(home)}
    cli = [sys.executable, "-m", "benchsync.daemon.cli"]
    subprocess.run([*cli, "init"], env=env, check=True, capture_output=True, timeout=WAIT)
    rec = subprocess.run([*cli, "record", "perf", "--model", "m", "--hardware", "cpu",
                          "--throughput", "9.8"], env=env, capture_output=True, text=True,
                         timeout=WAIT)  # fmt: skip
    assert rec.returncode == 0, rec.stderr
    # Issue 10, observations 5 and 6: no file written, no setting or temp table made,
    # and --throughput 9.8 reads back as 9.8 (DOUBLE, not FLOAT).
    out = tmp_path / "x.csv"
    for sql in (f"COPY models TO '{out}'", f"COPY (SELECT 1) TO '{out}'", "SET threads = 1",
                "CREATE TEMP TABLE t AS SELECT 1"):
        got = subprocess.run([*cli, "query", sql], env=env, capture_output=True, text=True,
                             timeout=WAIT, cwd=tmp_path)  # fmt: skip
        assert got.returncode == 1 and got.stderr.startswith("Error: query refused"), (sql, got)
        assert not out.exists()
    got = subprocess.run([*cli, "query", "SELECT throughput_items_per_second AS t "
                          "FROM performance_results", "--format", "csv"],
                         env=env, capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    assert got.returncode == 0 and got.stdout.splitlines() == ["t", "9.8"], got
    for scope in ("local", "replicas"):
        got = subprocess.run(
            [*cli, "query", f"SELECT * FROM read_blob('{home}/identity.key')", "--scope", scope],
            env=env, capture_output=True, text=True, timeout=WAIT)  # fmt: skip
        assert got.returncode == 1 and "Error:" in got.stderr and "refused" in got.stderr
        assert "content" not in got.stdout
