"""Sandbox worker processes hold their limits whatever DuckDB does.

Hostile queries allocate around DuckDB's own memory accounting
(`list_sum(range(...))`, `repeat()`); here they run in real worker processes
under `RLIMIT_AS` with a small limit, so a regression costs at most about a
gigabyte for a moment, never the machine. No fixed sleeps: every wait is on
a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import trio

from benchsync.daemon.query_pool import (
    WORKER_HEADROOM,
    FairSlots,
    SandboxPool,
    SandboxWorker,
    size_bytes,
)
from benchsync.storage.sandbox import QueryRefused, QueryTimeout, ResultTooLarge
from benchsync.storage.scopes import ScopeInput

MiB = 1024 * 1024
LIMIT = 256 * MiB  # the workers' DuckDB memory limit in these tests
WAIT = 60.0  # seconds: generous bound for any condition on a loaded 2-core box
SCOPE = ScopeInput({"t": pa.table({"a": list(range(1000))})})
# Each needs far more than LIMIT + WORKER_HEADROOM, outside DuckDB's accounting.
HOGS = [
    "SELECT list_sum(range(0, 100000000)) AS s",  # an 800 MB list
    "SELECT length(repeat('x', 1000000000)) AS n",  # a 1 GB string
    "SELECT max(l) FROM (SELECT list(i) AS l FROM range(60000000) t(i))",
]
SLOW = "SELECT count(*) AS n FROM range(1000000000000) a, range(10) b"  # CPU, little memory


def peak_rss(pid: int) -> int:
    """The process's high-water resident set size, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.01)


async def ask(pool: SandboxPool, sql: str, *, who: str | None = None,
              timeout_s: float = 30.0) -> pa.Table:  # fmt: skip
    return await pool.run(who, sql, None, scope_key="t", scope=SCOPE,
                          deadline=trio.current_time() + timeout_s, timeout_s=timeout_s,
                          max_rows=1000, max_bytes=10 * MiB)  # fmt: skip


@asynccontextmanager
async def pool_of(**kw: int) -> AsyncIterator[SandboxPool]:
    pool = SandboxPool(memory_limit=kw.pop("memory_limit", LIMIT), **kw)
    try:
        yield pool
    finally:
        pool.close()


def busy_worker(pool: SandboxPool) -> SandboxWorker | None:
    busy = [w for w in pool.workers if w.address_limit and w not in pool._idle]
    return busy[0] if busy else None


@pytest.mark.parametrize("threads", [1, 4])
async def test_memory_hogs_are_refused_and_no_process_grows(threads: int) -> None:
    me = psutil.Process()
    before = me.memory_info().rss
    async with pool_of(threads=threads) as pool:
        assert (await ask(pool, "SELECT sum(a) AS s FROM t"))["s"][0].as_py() == 499500
        (worker,) = pool.workers
        idle = psutil.Process(worker.pid).memory_info().rss
        # DuckDB's per-thread reservations are inside the measured idle size.
        assert worker.address_limit > LIMIT + WORKER_HEADROOM
        for sql in HOGS:
            with pytest.raises(ResultTooLarge) as info:
                await ask(pool, sql)
            assert info.value.kind == "too_large" and "memory" in str(info.value)
            # Still serving, with this worker or its replacement.
            assert (await ask(pool, "SELECT count(*) AS n FROM t"))["n"][0].as_py() == 1000
        for w in pool.workers:
            assert peak_rss(w.pid) < idle + LIMIT + WORKER_HEADROOM
    # The node's own process never held the hogs' memory.
    assert me.memory_info().rss - before < 150 * MiB


async def test_the_caller_going_away_kills_the_worker() -> None:
    async with pool_of() as pool:
        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, pool, SLOW)
            await wait_for(lambda: busy_worker(pool) is not None, "a busy worker")
            worker = busy_worker(pool)
            assert worker is not None
            nursery.cancel_scope.cancel()  # the client left
        await wait_for(lambda: worker.returncode is not None, "the worker to die")
        assert time.monotonic() - t0 < WAIT  # not the query's 30 s
        assert pool.replaced == 1 and worker not in pool.workers
        assert (await ask(pool, "SELECT count(*) AS n FROM t"))["n"][0].as_py() == 1000


async def test_a_worker_that_stops_answering_is_killed_at_the_deadline() -> None:
    async with pool_of() as pool:
        await ask(pool, "SELECT 1")
        (worker,) = pool.workers
        os.kill(worker.pid, signal.SIGSTOP)  # frozen: DuckDB's own timer cannot fire
        with pytest.raises(QueryTimeout) as info:
            await ask(pool, "SELECT 1", timeout_s=1.0)
        assert info.value.kind == "timeout" and "1 s" in str(info.value)
        await wait_for(lambda: worker.returncode is not None, "the frozen worker to die")
        assert (await ask(pool, "SELECT 2 AS x"))["x"][0].as_py() == 2


async def test_a_worker_dying_mid_query_is_an_error_and_is_replaced() -> None:
    async with pool_of() as pool:
        async with trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def run() -> None:
                try:
                    await ask(pool, SLOW)
                except ResultTooLarge as e:
                    errors.append(e)

            nursery.start_soon(run)
            await wait_for(lambda: busy_worker(pool) is not None, "a busy worker")
            worker = busy_worker(pool)
            assert worker is not None
            os.kill(worker.pid, signal.SIGKILL)  # what the kernel does at a hard limit
        assert len(errors) == 1 and "sandbox process ended" in str(errors[0])
        assert (await ask(pool, "SELECT count(*) AS n FROM t"))["n"][0].as_py() == 1000
        assert worker.pid not in [w.pid for w in pool.workers]


async def test_workers_run_in_an_empty_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB's settings name the working directory; a worker's says nothing, and
    the node's `<cwd>/.tmp/` (DuckDB's default spill directory) is out of reach."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a\n1\n")
    async with pool_of() as pool:
        await ask(pool, "SELECT 1")
        (worker,) = pool.workers
        cwd = Path(os.readlink(f"/proc/{worker.pid}/cwd"))
        assert cwd != tmp_path and not list(cwd.iterdir())
        for sql in (f"SELECT * FROM read_csv('{tmp_path}/.tmp/secret.csv')",
                    "SELECT * FROM read_csv('.tmp/secret.csv')",
                    "SELECT value FROM duckdb_settings()"):  # fmt: skip
            with pytest.raises(QueryRefused):
                await ask(pool, sql)


async def test_fair_slots_serve_waiting_requesters_round_robin() -> None:
    slots = FairSlots(total=2, per_requester=1)
    order: list[str] = []
    await slots.acquire("hog")
    async with trio.open_nursery() as nursery:

        async def want(who: str) -> None:
            await slots.acquire(who)
            order.append(who)

        nursery.start_soon(want, "hog")  # its second query waits: per-requester cap
        await wait_for(lambda: slots.waiting == 1, "hog's second query to queue")
        nursery.start_soon(want, "other")
        await wait_for(lambda: order == ["other"], "other to get the free slot")
        assert slots.running == {"hog": 1, "other": 1} and slots.waiting == 1
        slots.release("hog")
        await wait_for(lambda: order == ["other", "hog"], "hog's turn")
        # A cancelled waiter leaves the queue and takes no slot.
        with trio.move_on_after(0.05):
            await slots.acquire("third")
        assert slots.waiting == 0 and slots.busy == 2


def test_size_strings() -> None:
    assert size_bytes("256MiB") == LIMIT and size_bytes("1GB") == 10**9
    assert size_bytes(12345) == 12345 and size_bytes("512MB") == 512 * 10**6
    with pytest.raises(ValueError):
        size_bytes("lots")
