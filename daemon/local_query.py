"""The node's own queries: its data in each scope, run in sandbox worker processes.

`LocalQueryService` runs read-only SQL over the node's data in the `local`
and `replicas` scopes, for the node itself or for a peer, in the sandbox
workers of a `benchsync.daemon.query_pool.SandboxPool` (OS memory limit,
deadline, killed when the caller goes away, per-peer fairness). A peer's
query and the local part of a network query see the node's OWN dataset only
(never replicas: a replicated row would be counted twice). It re-reads the
node's tables lazily, only when `BenchmarkDB.on_write` reported a change
since the last load. Every query passes the sandbox's one read-only gate
(`benchsync.storage.sandbox.gate`) before it takes a worker, and again inside it.

The default limits are the node's settings (`benchsync.daemon.config.SETTINGS`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import pyarrow as pa
import trio

from benchsync.daemon.config import SETTINGS_BY_NAME
from benchsync.daemon.query_pool import SandboxPool
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.distquery import DUCKDB
from benchsync.storage.replicas import ReplicaStore
from benchsync.storage.sandbox import DEFAULT_THREADS, QueryLimits, QueryRefused
from benchsync.storage.schema import TABLES
from benchsync.storage.scopes import ReplicaTables, ScopeInput
from benchsync.storage.sqlnames import ident

# The one set of query defaults: the settings table's.
DEFAULT_LIMITS = QueryLimits(
    timeout_s=SETTINGS_BY_NAME["query_timeout"].default,
    max_rows=SETTINGS_BY_NAME["query_max_rows"].default,
    max_bytes=SETTINGS_BY_NAME["query_max_bytes"].default,
)
DEFAULT_MEMORY_LIMIT: int = SETTINGS_BY_NAME["query_memory_limit"].default  # bytes per sandbox
DEFAULT_SHIP_MAX_BYTES: int = SETTINGS_BY_NAME["query_ship_max_bytes"].default
SHIP_ROWS = 2**62  # "no row limit", for rows shipped to a coordinator (bounded by bytes)
MAX_SERVED_TIMEOUT = 60.0  # seconds: the longest time limit this node grants a peer
MAX_CONCURRENT_QUERIES = 2  # peers' queries running at once (one sandbox worker each)
MAX_QUERIES_PER_PEER = 2  # query streams one peer may have open to us at once
MAX_RUNNING_PER_PEER = 1  # of one peer's queries, running at once (the others wait their turn)
MAX_LOCAL_QUERIES = 2  # the node's own queries running at once, in slots no peer can take


@dataclass(frozen=True)
class ServerLimits:
    """What this node grants to one query, whoever asks (peers' requests are clamped)."""

    max_timeout_s: float = MAX_SERVED_TIMEOUT  # seconds
    max_rows: int = DEFAULT_LIMITS.max_rows  # rows in one answer
    max_bytes: int = DEFAULT_LIMITS.max_bytes  # bytes of Arrow data in one answer
    # bytes of Arrow data in one answer of purpose "ship" (base-table rows for a
    # network query's coordinator: no row limit); the query protocol carries at most
    # MAX_RESULT_BYTES of them per answer
    ship_max_bytes: int = DEFAULT_SHIP_MAX_BYTES
    memory_limit: str | int = DEFAULT_MEMORY_LIMIT  # DuckDB size string or bytes, per sandbox
    max_concurrent: int = MAX_CONCURRENT_QUERIES  # peers' queries running at once
    max_per_peer: int = MAX_QUERIES_PER_PEER  # streams one peer may have open
    max_running_per_peer: int = MAX_RUNNING_PER_PEER  # of those, queries running at once
    local_slots: int = MAX_LOCAL_QUERIES  # the node's own queries running at once
    threads: int = DEFAULT_THREADS  # DuckDB threads per sandbox


DatabaseSource: TypeAlias = BenchmarkDB | Callable[[], BenchmarkDB]
Scope = Literal["local", "replicas", "dataset"]
Purpose = Literal["answer", "ship"]  # as the query protocol's (`benchsync.protocol.query`)


class LocalQueryService:
    """Runs read-only SQL on the node's data in sandbox worker processes (`SandboxPool`).

    `db` is the node's BenchmarkDB, or a callable returning the current one
    (a restore may replace the database object); `replicas` (optional) is
    the node's replica store and `dataset` its own dataset ID, for the
    `replicas` scope. The node's tables are read (as Arrow, in a thread) only
    when the database changed since the last read: its `on_write` bumps a
    generation counter, and a different database object counts as a change.
    A worker that already holds the current generation is not sent it again.
    Call `invalidate()` after changing the data by other means; `close()` when done.
    """

    def __init__(
        self,
        db: DatabaseSource,
        *,
        limits: ServerLimits | None = None,
        replicas: ReplicaStore | None = None,
        dataset: str | None = None,
    ) -> None:
        self._source = db
        self.limits = limits or ServerLimits()
        self.replicas = replicas
        self.dataset = dataset
        self._lock = threading.Lock()  # guards the counters (on_write runs in writer threads)
        self._load_lock = threading.Lock()  # one thread re-reads the tables at a time
        self._generation = 0
        self._watched: BenchmarkDB | None = None  # the database whose on_write we listen to
        self._tables: tuple[int, dict[str, pa.Table]] | None = None
        self.loads = 0  # times the tables were read from the database (tests, metrics)
        self.pool = SandboxPool(
            memory_limit=self.limits.memory_limit, threads=self.limits.threads,
            local_slots=self.limits.local_slots, peer_slots=self.limits.max_concurrent,
            per_peer=self.limits.max_running_per_peer,
        )  # fmt: skip
        if isinstance(db, BenchmarkDB):
            self._database()  # listen from now on

    @property
    def db(self) -> BenchmarkDB:
        """The current database (resolved through the callable, if one was given)."""
        return self._source if isinstance(self._source, BenchmarkDB) else self._source()

    def _database(self) -> BenchmarkDB:
        db = self.db
        with self._lock:
            if db is not self._watched:
                self._unwatch()
                db.on_write.append(self._changed)
                self._watched = db
                self._generation += 1
        return db

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(ValueError):
                self._watched.on_write.remove(self._changed)
            self._watched = None

    def _changed(self, rows: int) -> None:
        with self._lock:
            self._generation += 1
        # The loaded tables (a whole copy of the database, in Arrow) are stale now: let
        # them go at once, not at the next query, which may come hours later (issue 19).
        self._tables = None

    def invalidate(self) -> None:
        """Forget the loaded tables: the next query re-reads the database."""
        self._changed(0)

    def close(self) -> None:
        with self._lock:
            self._unwatch()
        self.pool.close()

    def _current_tables(self) -> tuple[int, dict[str, pa.Table]]:
        """The own tables and their generation (blocking: for worker threads)."""
        with self._load_lock:
            db = self._database()
            with self._lock:
                generation = self._generation
            loaded = self._tables  # one read: a write may drop it meanwhile (`_changed`)
            if loaded is None or loaded[0] != generation:
                # Read the generation first: a write landing during the read bumps
                # it again, so the next query reloads instead of missing it.
                tables = {t: db.query(f"SELECT * FROM {ident(t)}") for t in TABLES}
                loaded = self._tables = (generation, tables)
                self.loads += 1
            return loaded

    def _scope(
        self, scope: Scope, dataset: str | None = None
    ) -> tuple[str, Callable[[], Awaitable[ScopeInput]]]:
        """The key naming the scope's current data, and how to produce that data.

        Scope `dataset`: one dataset's rows only, `dataset` (default: the own
        one) with its `origin` column and global ids, from the own database
        or from its installed replica. Blocking (the database and replica
        pointers are looked at): for worker threads. Raises QueryRefused when
        there is no such replica.
        """
        self._database()  # a replaced database object is a new generation
        with self._lock:
            generation = self._generation
        own_only = False  # the own tables, emptied: their schema, none of their rows
        if scope == "local":
            key = f"local:{generation}"
            replicas: list[ReplicaTables] = []
        elif scope == "dataset":
            if self.dataset is None:
                raise QueryRefused("this node has no dataset ID; use the local scope")
            dataset = dataset or self.dataset
            if dataset == self.dataset:
                key, replicas = f"dataset:{generation}", []
            else:
                replica = None if self.replicas is None else self.replicas.get(dataset)
                if replica is None:
                    raise QueryRefused(f"this node holds no replica of dataset {dataset}")
                replicas = [ReplicaTables(replica.dataset, replica.tables)]
                key = f"replica:{generation}:{dataset}=" + ",".join(
                    sorted(map(str, replica.tables.values())))  # fmt: skip
                own_only = True
        else:
            if self.replicas is None or self.dataset is None:
                raise QueryRefused("this node keeps no replicas; use the local scope")
            replicas = [ReplicaTables(r.dataset, r.tables) for r in self.replicas.all()]
            key = f"replicas:{generation}:" + ",".join(
                f"{r.dataset}={sorted(map(str, r.tables.values()))}" for r in replicas)  # fmt: skip

        async def produce() -> ScopeInput:
            _, own = await trio.to_thread.run_sync(self._current_tables)
            if scope == "local":
                return ScopeInput(own)
            if own_only:
                own = {name: table.slice(0, 0) for name, table in own.items()}
            return ScopeInput(own, origin=self.dataset, replicas=replicas)

        return key, produce

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        timeout_s: float,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        scope: Scope = "local",
        dataset: str | None = None,
        requester: str | None = None,
        purpose: Purpose = "answer",
    ) -> pa.Table:
        """Run `sql` over `scope` in a sandbox worker for `requester`; returns the answer.

        Scope `dataset` is one dataset's rows (`dataset`, default the own one)
        as the network scope sees them (see `_scope`).

        `requester` is the asking peer's ID, or None for the node itself (its
        own slots: peers never starve it). The limits are clamped to this
        node's `ServerLimits` (rows and bytes left as None are those); the time
        limit covers waiting for a slot, reloading and running. Purpose "ship"
        (rows a network query's coordinator merges) is bounded by bytes only:
        `ship_max_bytes` instead of `max_bytes`, and no row limit (`max_rows`
        does not apply); same sandbox, memory and time limits, same slots. Raises
        QueryRefused, InvalidSQL, QueryTimeout, ResultTooLarge or QueryError;
        when cancelled, the worker is killed.
        """
        timeout_s = min(timeout_s, self.limits.max_timeout_s)
        if purpose == "ship":  # bytes only: no row limit applies to shipped rows
            max_rows, top_bytes = SHIP_ROWS, self.limits.ship_max_bytes
        else:
            top_rows, top_bytes = self.limits.max_rows, self.limits.max_bytes
            max_rows = top_rows if max_rows is None else min(max_rows, top_rows)
        max_bytes = top_bytes if max_bytes is None else min(max_bytes, top_bytes)
        deadline = trio.current_time() + timeout_s
        await trio.to_thread.run_sync(DUCKDB.parse, sql)  # the gate, before taking a worker
        key, produce = await trio.to_thread.run_sync(self._scope, scope, dataset)
        return await self.pool.run(requester, sql, params, scope_key=key, scope=produce,
                                   deadline=deadline, timeout_s=timeout_s,
                                   max_rows=max_rows, max_bytes=max_bytes)  # fmt: skip

    async def merge(self, merge_sql: str, partials: Mapping[str, pa.Table], *,
                    timeout_s: float, max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
        """Run `merge_sql` over `partials` (table name -> the union of the nodes'
        answers) in a sandbox worker, in the node's own slots (the merge SQL
        holds the caller's expressions); returns the final answer. Raises
        QueryError subclasses."""
        scope = ScopeInput(partials)
        return await self.pool.run(None, merge_sql, None, scope_key=None, scope=scope,
                                   deadline=trio.current_time() + timeout_s, timeout_s=timeout_s,
                                   max_rows=max_rows, max_bytes=max_bytes)  # fmt: skip
