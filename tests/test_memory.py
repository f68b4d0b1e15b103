"""A node that lives for months keeps its memory flat (issue 19).

`bench/bench_memory.py` found why a lone node's RSS grew ~10 MiB a minute
under a steady write + snapshot load while its Python objects, glibc's heap,
Arrow's allocated bytes and DuckDB's buffers stayed flat: Arrow's default
mimalloc pool kept the memory of every snapshot's Parquet reads, and glibc's
16 arenas (one per thread, up to 8 per core) their freed chunks. `benchsync`
now puts Arrow on the system allocator and glibc on 2 arenas before anything
allocates. RSS itself
is never asserted here (it depends on the machine and its load): these tests
check that the settings reach a real node process, and that what the node
keeps in Python does not grow with the number of snapshots.
"""

from __future__ import annotations

import collections
import gc
import os
import platform
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from benchsync.daemon.cli.up import NODE_ALLOCATOR_ENV, set_allocators
from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.daemon.local_query import LocalQueryService
from benchsync.daemon.metrics import Metrics, NodeCounters
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.retention import RetentionPolicy

NETWORK = "memory"
WARM_UP = 3  # snapshots before objects are counted: first-use imports and caches
PERF = {"model_name": "m", "hardware_type": "cpu", "device_name": "d", "batch_size": 1,
        "throughput": 1.0, "latency_avg": 2.0}  # fmt: skip
WINDOW = 8  # snapshots per window: something kept per snapshot grows by this in each


def test_a_real_node_runs_arrow_on_the_system_allocator(tmp_path: Path) -> None:
    """`benchsync up` sets the pool before Arrow's first allocation: a node started as a
    program reports the system pool (mimalloc without the fix), and its process memory."""
    node = NodeProcess(tmp_path / "n", free_port(), NETWORK)
    node.start()
    try:
        node.wait_ready()
        text = node.client.get_text("/metrics")
    finally:
        node.stop()
    assert 'benchsync_allocator_info{arrow_pool="system"} 1.0' in text
    assert re.search(r"^process_resident_memory_bytes \d", text, re.MULTILINE)
    assert re.search(r"^benchsync_arrow_allocated_bytes \d", text, re.MULTILINE)
    assert "Arrow's memory pool is" not in (node.tail_log(200))  # no mismatch warning


def test_an_allocator_set_in_the_environment_wins() -> None:
    env = {"ARROW_DEFAULT_MEMORY_POOL": "mimalloc", "MALLOC_ARENA_MAX": "8"}
    set_allocators(env)
    assert env == {"ARROW_DEFAULT_MEMORY_POOL": "mimalloc", "MALLOC_ARENA_MAX": "8"}
    empty: dict[str, str] = {}
    set_allocators(empty)
    assert empty == NODE_ALLOCATOR_ENV


ARENAS = """
import ctypes, os, sys, tempfile, threading
if sys.argv[1] == "set":
    from benchsync.daemon.cli.up import set_allocators
    set_allocators()
libc = ctypes.CDLL(None)
go, done = threading.Barrier(9), threading.Barrier(9)
def work():
    keep = [bytearray(1000) for _ in range(100)]  # this thread's first mallocs: its arena
    go.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
go.wait()  # all 8 threads hold memory now
libc.fdopen.restype = ctypes.c_void_p  # a FILE*
with tempfile.TemporaryFile() as f:
    fp = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    f.seek(0)
    print(f.read().count(b"<heap nr="))
done.wait()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_the_arena_limit_holds_in_the_process_that_sets_it() -> None:
    """Glibc read MALLOC_ARENA_MAX when the process started; `set_allocators` must
    still bound this process's arenas (8 threads allocating: 2 arenas, not 9)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        return int(out)

    assert arenas("set") <= int(NODE_ALLOCATOR_ENV["MALLOC_ARENA_MAX"])
    assert arenas("plain") > int(NODE_ALLOCATOR_ENV["MALLOC_ARENA_MAX"])  # the check can fail


def test_replica_lag_series_of_a_dataset_no_longer_followed_are_dropped() -> None:
    """Over months every dataset that ever left the lab would keep a series at its last lag."""
    m = Metrics()
    m.fold(NodeCounters(0, 0, 0, 0, 0, 0, 0, {"gone": 3, "stays": 1}))
    assert 'dataset="gone"' in m.render().decode()
    m.fold(NodeCounters(0, 0, 0, 0, 0, 0, 0, {"stays": 0}))
    text = m.render().decode()
    assert 'dataset="gone"' not in text
    assert 'benchsync_replica_lag{dataset="stays"} 0.0' in text


def test_the_local_query_service_lets_stale_tables_go(tmp_path: Path) -> None:
    """The own tables a query loaded (a copy of the database) go as soon as a write makes
    them stale, not at the next query, which may come hours later."""
    db = BenchmarkDB(tmp_path / "db.duckdb")
    local = LocalQueryService(db)
    try:
        db.ingest_records("perf", [PERF])
        _, tables = local._current_tables()  # what a query loads (no worker needed)
        loaded = weakref.ref(tables["performance_results"])
        assert local._current_tables()[1] is tables  # unchanged data: kept for queries
        del tables
        db.ingest_records("perf", [PERF | {"batch_size": 2}])
        gc.collect()
        assert loaded() is None
    finally:
        local.close()
        db.close()


def _object_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


@pytest.mark.slow
def test_python_objects_do_not_grow_with_snapshots(tmp_path: Path) -> None:
    """Writes, snapshots and maintenance passes on a real dataset: no kind of Python
    object grows with the number of snapshots (row digests, versions, Arrow tables,
    DuckDB results held by something would). Counted over two equal windows after a
    warm-up; a bounded cache may fill during the first one (threading's weak sets do,
    by a dozen objects), a leak grows in both."""
    policy = RetentionPolicy(retention=0.0, interval=0.0)  # thin everything but the head
    with LocalDataset(tmp_path / "home", "memory-test") as ds:

        def snapshots(start: int, n: int) -> collections.Counter[str]:
            for i in range(start, start + n):
                ds.db.ingest_records("perf", [
                    {"model_name": f"m{i}-{j}", "hardware_type": "cpu", "device_name": "d",
                     "batch_size": 1 + j, "throughput": 1.0 + j, "latency_avg": 2.0}
                    for j in range(20)])  # fmt: skip
                assert ds.snapshot().created
                ds.maintain(policy)
            return _object_counts()

        warm = snapshots(0, WARM_UP)
        first = snapshots(WARM_UP, WINDOW)
        second = snapshots(WARM_UP + WINDOW, WINDOW)
    half = WINDOW // 2
    grown = {t: (first[t] - warm[t], second[t] - first[t]) for t in second
             if first[t] - warm[t] >= half and second[t] - first[t] >= half}  # fmt: skip
    assert grown == {}, f"objects that grew in both windows of {WINDOW} snapshots: {grown}"
