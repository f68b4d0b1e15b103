"""The benchmark database: one DuckDB file, one writer thread, readers beside it.

`BenchmarkDB` owns a node's `benchsync.duckdb`. Every write is a job run by one
connection on one dedicated thread inside BEGIN/COMMIT (datasette's `Database`
does the same), so writes are serialised and ids can be assigned as MAX(id)+1
without races; the writer caches those maxima and the model/hardware ids it
resolved, because it is the only writer of the file. Reads run on their own
cursors in whatever thread calls them and see committed data only.

It keeps the original benchmark API's method names (`store_performance_result`,
`query_performance_results`, ...) and adds bulk ingest, which validates a whole
batch first and inserts it with a few set-based SQL statements over an Arrow
table (never a Python loop of INSERTs), all in one transaction.

Each write also logs the key ranges it changed in the node-local table
`snapshot_changes`, in its own transaction, for the next snapshot to export
only those segments, also after a restart or a kill -9. Hand-written: DuckDB
has no change-data capture, and a journal beside the file could disagree
with it after a crash (docs/storage-format.md, "The change log").
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from benchsync.storage import graph
from benchsync.storage.errors import InvalidRecord, StorageError
from benchsync.storage.records import (
    RECORD_TYPES,
    RULES,
    Record,
    arrow_schema,
    check_known_fields,
    check_value,
    record_kind,
    validate,
    validate_arrow,
)
from benchsync.storage.schema import PRIMARY_KEYS, TABLES, ensure_schema
from benchsync.storage.sqlnames import literal

DB_FILENAME = "benchsync.duckdb"
# DuckDB's file layout: three 4 KiB headers, then fixed-size blocks (`pragma_database_size`).
DUCKDB_HEADER_BYTES = 3 * 4096
WRITER_JOIN_TIMEOUT = 30.0  # seconds close() waits for queued writes to finish
_NO_RUN = "no test run has this id; create one with create_test_run() or omit run_id"
DEFAULT_RUN_NAME = "benchsync record"  # test_runs.test_name of runs created for unattached tests

T = TypeVar("T")

# Each record kind's own table and the ids it refers to.
KIND_TABLES = {
    "perf": "performance_results",
    "compat": "hardware_compatibility",
    "test": "integration_test_results",
}


class ReadOnlyDatabase(StorageError):
    """A write was asked of a database opened with read_only=True."""


class DatabaseLocked(StorageError):
    """Another process (usually a running node) holds the database file."""


class DatabaseDamaged(StorageError):
    """The database file is not a readable DuckDB database (truncated, overwritten)."""


class DatabaseClosed(StorageError):
    """The database takes no more writes (closed, or closing for a restore); nothing was written."""


class WriteFailed(StorageError):
    """DuckDB failed a write (e.g. a full disk); the transaction was rolled back."""


# The node-local change log: one row per key range a committed write changed, written in
# the write's own transaction (so a crash keeps exactly the changes of what committed),
# deleted by the snapshot that exported them. tbl NULL: anything may have changed. Never
# part of a snapshot, like schema.VERSION_TABLE. See docs/storage-format.md.
CHANGES_TABLE = "snapshot_changes"
_CHANGES_DDL = (  # sql: CHANGES_TABLE is this module's constant
    f"CREATE TABLE {CHANGES_TABLE} (seq BIGINT NOT NULL, tbl VARCHAR, lo BIGINT, hi BIGINT)"
)

Interval = tuple[int | None, int | None]  # inclusive key range; None: unbounded
# Key ranges changed since the last snapshot, per table; None: unknown (all of it).
Dirty = dict[str, list[Interval]] | None
WHOLE: Interval = (None, None)
MAX_DIRTY_INTERVALS = 64  # per table; more are merged into one covering range


_INTERNAL = -1  # a job's row count that marks the change log's bookkeeping (never a write's)


def _ensure_changes_table(conn: duckdb.DuckDBPyConnection) -> None:
    """Create CHANGES_TABLE if the file lacks it, logging "everything changed".

    A file without the log (new, older, restored, migrated) may hold any
    rows the segment index does not describe: its first snapshot exports all.
    """
    present = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = ?",
        [CHANGES_TABLE],
    ).fetchall()[0][0]
    if present:
        return
    conn.begin()
    try:
        conn.execute(_CHANGES_DDL)
        conn.execute(  # sql: CHANGES_TABLE is this module's constant
            f"INSERT INTO {CHANGES_TABLE} VALUES (0, NULL, NULL, NULL)")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


LoggedRange = tuple[str | None, int | None, int | None]  # CHANGES_TABLE's (tbl, lo, hi)
MAX_LOGGED_CACHE = 64  # ranges the writer remembers as logged (to skip logging them again)


def _covers(a: LoggedRange, b: LoggedRange) -> bool:
    """Whether logged range `a` contains range `b` (NULL table: everything)."""
    if a[0] is None:
        return True
    if a[0] != b[0]:
        return False
    lo_ok = a[1] is None or (b[1] is not None and a[1] <= b[1])
    hi_ok = a[2] is None or (b[2] is not None and b[2] <= a[2])
    return lo_ok and hi_ok


def _log_changes(conn: duckdb.DuckDBPyConnection, state: _WriterState) -> None:
    """Append the running job's changed ranges to CHANGES_TABLE, in its transaction.

    A range inside one this writer logged since the last snapshot began
    (`state.logged`) is skipped: the row that covers it stays until a snapshot
    that sees this write deletes it. Appends, the common write, all fall in
    the first append's (first id, unbounded) range.
    """
    touched = state.touched
    wanted: list[LoggedRange]
    if touched is None:
        wanted = [(None, None, None)]
    else:
        wanted = [(t, lo, hi) for t, intervals in touched.items() for lo, hi in intervals]
    rows = [r for r in wanted if not any(_covers(x, r) for x in state.logged)]
    if not rows:
        return
    if len(state.logged) + len(rows) <= MAX_LOGGED_CACHE:
        state.logged.extend(rows)  # forgotten if the commit fails (`_run_writer`)
    first = state.seq + 1
    # One statement, not executemany: DuckDB prepares each executemany row's statement
    # again, which costs more than the write it logs.
    values = ", ".join(["(?, ?, ?, ?)"] * len(rows))
    conn.execute(  # sql: CHANGES_TABLE is this module's constant, the rest placeholders
        f"INSERT INTO {CHANGES_TABLE} VALUES {values}",
        [x for i, row in enumerate(rows) for x in (first + i, *row)],
    )
    # Advanced before the commit: a rolled-back job leaves a gap, which is harmless.
    state.seq = first + len(rows) - 1


def merge_dirty(a: Dirty, b: Dirty) -> Dirty:
    """The union of two dirty sets (None, unknown, absorbs anything)."""
    if a is None or b is None:
        return None
    out = {t: list(v) for t, v in a.items()}
    for table, intervals in b.items():
        mine = out.setdefault(table, [])
        for interval in intervals:
            if interval not in mine:
                mine.append(interval)
        if len(mine) > MAX_DIRTY_INTERVALS:
            # Coarser is still correct: one range covering them all.
            los = [lo for lo, _ in mine]
            his = [hi for _, hi in mine]
            out[table] = [(
                None if None in los else min(x for x in los if x is not None),
                None if None in his else max(x for x in his if x is not None),
            )]
    return out


class _WriterState:
    """What the writer thread knows about the file; valid only while it is the sole writer."""

    def __init__(self) -> None:
        self.next_ids: dict[str, int] = {}
        self.models: dict[str, tuple[int, bool]] = {}  # name -> (model_id, family known)
        self.hardware: dict[tuple[str, str | None], int] = {}
        self.runs: set[int] = set()
        # What the running job changed (dirty key ranges), logged in its transaction.
        self.touched: Dirty = {}
        self.seq = 0  # the last CHANGES_TABLE seq used (it is the only writer)
        # Ranges logged since the snapshot of epoch `epoch` began (see `_log_changes`).
        self.logged: list[LoggedRange] = []
        self.epoch = 0

    def touch(self, table: str, lo: int | None = None, hi: int | None = None) -> None:
        self.touched = merge_dirty(self.touched, {table: [(lo, hi)]})

    def clear(self) -> None:
        self.next_ids.clear()
        self.models.clear()
        self.hardware.clear()
        self.runs.clear()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _coerce(kind: str, record: Record | Mapping[str, Any] | None,
            kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A record object, a mapping or keyword arguments -> validated field dict."""
    if record is not None and kwargs:
        raise TypeError("pass either a record or keyword arguments, not both")
    if isinstance(record, Record):
        if kind != record.KIND:
            raise InvalidRecord("record", type(record).__name__,
                                f"expected a {RECORD_TYPES[kind].__name__}")
        return record.to_dict()
    data = record if record is not None else kwargs
    check_known_fields(kind, data)
    return validate(kind, data)


class BenchmarkDB:
    """A node's benchmark database file. Thread-safe; also a context manager."""

    def __init__(
        self, path: str | Path, *, read_only: bool = False, memory_limit: str | None = None
    ) -> None:
        """Open (creating or migrating forward) the database at `path`.

        `memory_limit` (a DuckDB size such as "1GiB") caps DuckDB's buffer
        manager; bigger sorts (the snapshot export) spill to disk instead of
        growing with the database. None leaves DuckDB's default (80 % of RAM).
        """
        self.path = Path(path)
        self.read_only = read_only
        self.on_write: list[Callable[[int], None]] = []
        config: dict[str, str | bool | int | float | list[str]] = (
            {"memory_limit": memory_limit} if memory_limit else {}
        )
        try:
            self._root = duckdb.connect(str(self.path), read_only=read_only, config=config)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise DatabaseLocked(
                    f"{self.path} is in use by another process (is a node running?): {e}"
                ) from None
            if "not a valid duckdb database" in str(e).lower() or "read enough" in str(e):
                raise DatabaseDamaged(f"{self.path} is damaged: {e}") from None
            raise StorageError(f"cannot open {self.path}: {e}") from None
        except duckdb.Error as e:  # a file DuckDB cannot make sense of
            raise DatabaseDamaged(f"{self.path} is damaged: {type(e).__name__}: {e}") from None
        self._cursor_lock = threading.Lock()  # making cursors off the root is not thread-safe
        self._readers = 0  # read cursors in use; close() waits for them
        self._readers_done = threading.Condition()
        self._closed = False
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], Future[Any]] | None] = (
            queue.SimpleQueue())
        self._writer: threading.Thread | None = None
        self._writes_stopped = False
        # The CHANGES_TABLE seq up to which the running snapshot took the changes.
        self._taken: int | None = None
        # Held while a write logs and commits and while a snapshot's transaction begins:
        # a write either commits before the snapshot's start, or sees the epoch moved
        # and logs its ranges anew (the snapshot may delete the rows that covered them).
        self._log_lock = threading.Lock()
        self._log_epoch = 0
        if not read_only:
            try:
                ensure_schema(self._root)
                _ensure_changes_table(self._root)
            except duckdb.Error as e:
                self._root.close()
                if isinstance(e, duckdb.IOException) and "read enough" not in str(e):
                    raise StorageError(f"cannot open {self.path}: {e}") from None  # disk, rights
                raise DatabaseDamaged(
                    f"{self.path} is damaged: {type(e).__name__}: {e}"
                ) from None
            self._writer = threading.Thread(
                target=self._run_writer, name=f"benchsync-writer:{self.path.name}", daemon=True)
            self._writer.start()

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work, let queued writes and running reads finish, close the file.

        Idempotent. Closing the DuckDB connection under a running read would
        fail it ("connection is busy"), so readers are waited for (at most
        WRITER_JOIN_TIMEOUT); new readers get a "closed" StorageError.
        """
        with self._readers_done:
            if self._closed:
                return
            self._closed = True
        self.stop_writes()
        with self._readers_done:
            self._readers_done.wait_for(lambda: self._readers == 0, WRITER_JOIN_TIMEOUT)
        self._root.close()

    def stop_writes(self) -> None:
        """Take no more writes: queued ones commit, later ones raise DatabaseClosed.

        Reads go on. Idempotent. A restore stops the writes, snapshots what
        they committed, and only then replaces the file, so no acknowledged
        write is lost with it.
        """
        with self._readers_done:
            if self._writes_stopped:
                return
            self._writes_stopped = True
            # Under the same lock as `_submit`'s check: no job can be queued behind the stop.
            if self._writer is not None:
                self._jobs.put(None)
        if self._writer is not None:
            self._writer.join(WRITER_JOIN_TIMEOUT)

    def check(self) -> None:
        """Read the schema and the file's layout; raises DatabaseDamaged if either is broken.

        Cheap (no table is scanned): it catches a file that was truncated or
        overwritten, which DuckDB itself only notices when a query reaches
        the missing blocks.
        """
        try:
            with self.reader() as cur:
                cur.execute("SELECT table_name, column_name FROM information_schema.columns")
                cur.fetchall()
                size = cur.execute(
                    "SELECT block_size, total_blocks FROM pragma_database_size()"
                ).fetchone()
        except duckdb.Error as e:
            raise DatabaseDamaged(f"{self.path} is damaged: {type(e).__name__}: {e}") from None
        if size is not None:
            block_size, total_blocks = int(size[0]), int(size[1])
            expected = DUCKDB_HEADER_BYTES + block_size * total_blocks
            got = self.path.stat().st_size
            if total_blocks and got < expected:
                raise DatabaseDamaged(
                    f"{self.path} is damaged: {got} bytes, but its header lists "
                    f"{total_blocks} blocks ({expected} bytes); it was truncated"
                )

    def __enter__(self) -> BenchmarkDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what changed since the last snapshot ---------------------------------------------

    def begin_snapshot(self, conn: duckdb.DuckDBPyConnection) -> Dirty:
        """Begin a read transaction on `conn` and return what changed since the last snapshot.

        The changes are read from CHANGES_TABLE inside that transaction, so
        they are exactly those of the writes it sees (each write logs its
        ranges in its own transaction). They stay logged until
        `snapshot_done` deletes them: a snapshot that fails or is killed
        leaves them for the next one. None (everything) for a file without
        the log (read-only, or never opened for writing by this benchsync).
        """
        conn.execute("BEGIN TRANSACTION")
        try:
            with self._log_lock:
                # DuckDB starts the transaction (its snapshot of the data) at the first
                # statement that reads the database, not at BEGIN: this one.
                logged = conn.execute(
                    "SELECT count(*) FROM information_schema.tables "
                    f"WHERE table_schema = 'main' AND table_name = {literal(CHANGES_TABLE)}"
                ).fetchall()[0][0]
                self._log_epoch += 1
            if not logged:
                self._taken = None
                return None
            # sql: CHANGES_TABLE is this module's constant
            taken, everything = conn.execute(
                f"SELECT max(seq), bool_or(tbl IS NULL) FROM {CHANGES_TABLE}"
            ).fetchall()[0]
            # Distinct ranges only: a log of many small writes repeats most of them.
            ranges = [] if everything or taken is None else conn.execute(
                f"SELECT DISTINCT tbl, lo, hi FROM {CHANGES_TABLE} "  # sql: the constant
                "ORDER BY tbl, lo NULLS FIRST, hi NULLS LAST"
            ).fetchall()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._taken = None if taken is None else int(taken)
        if everything:
            return None
        dirty: Dirty = {}
        for table, lo, hi in ranges:
            dirty = merge_dirty(dirty, {table: [(lo, hi)]})
        return dirty

    def return_dirty(self, dirty: Dirty) -> None:
        """A snapshot did not complete: its changes stay logged for the next one."""
        self._taken = None

    def snapshot_done(self) -> None:
        """The snapshot that `begin_snapshot` began is durable: delete the changes it took.

        Best effort: when writes are stopped (a restore, a close) the changes
        stay logged, and the next snapshot exports their segments again, to
        the same bytes.
        """
        taken, self._taken = self._taken, None
        if taken is None or self.read_only:
            return

        def job(conn: duckdb.DuckDBPyConnection, state: _WriterState) -> tuple[None, int]:
            conn.execute(  # sql: CHANGES_TABLE is this module's constant
                f"DELETE FROM {CHANGES_TABLE} WHERE seq <= ?", [taken]
            )
            state.touched = {}  # bookkeeping, not a change of the data
            return None, _INTERNAL
        # A failure here (closed, full disk) only means those segments are exported again.
        with contextlib.suppress(StorageError):
            self._submit(job)

    # ---- the writer ------------------------------------------------------------------------

    def _run_writer(self) -> None:
        with self._cursor_lock:
            conn = self._root.cursor()
        state = _WriterState()
        state.seq = _scalar(  # sql: CHANGES_TABLE is this module's constant
            conn, f"SELECT coalesce(max(seq), 0) FROM {CHANGES_TABLE}")
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            state.touched = {}
            try:
                conn.begin()
                result, rows = job(conn, state)
                # Logged in the write's own transaction: a snapshot (or a restart) sees a
                # write exactly when it sees the ranges it changed.
                with self._log_lock:
                    if state.epoch != self._log_epoch:
                        state.epoch = self._log_epoch
                        state.logged.clear()  # that snapshot may delete what covered us
                    _log_changes(conn, state)
                    conn.commit()
            except BaseException as e:
                state.clear()  # the rolled-back job may have advanced the caches
                state.logged.clear()  # and logged rows that are not committed
                with contextlib.suppress(duckdb.Error):  # BEGIN itself may have failed
                    conn.rollback()
                fut.set_exception(e)
                continue
            if rows == _INTERNAL:  # the change log's own bookkeeping: no listener cares
                fut.set_result(result)
                continue
            for callback in list(self.on_write):
                # A listener's bug must not fail a write that is already committed.
                with contextlib.suppress(Exception):
                    callback(rows)
            fut.set_result(result)
        conn.close()

    def _submit(self, job: Callable[[duckdb.DuckDBPyConnection, _WriterState], tuple[T, int]]) -> T:
        if self.read_only:
            raise ReadOnlyDatabase(f"{self.path} was opened read-only; writes are refused")
        fut: Future[T] = Future()
        with self._readers_done:
            if self._writes_stopped:
                raise DatabaseClosed(f"{self.path} takes no more writes (closed or being replaced)")
            self._jobs.put((job, fut))
        try:
            return fut.result()
        except duckdb.Error as e:  # DuckDB failed the transaction (rolled back): disk, I/O
            raise WriteFailed(f"{type(e).__name__}: {e}") from e

    def write(self, fn: Callable[[duckdb.DuckDBPyConnection], T], *,
              changes: Dirty = None) -> T:
        """Run `fn(conn)` on the writer thread inside BEGIN/COMMIT and return its result.

        Any exception rolls the transaction back and is re-raised here. `on_write`
        listeners get the net number of rows the job added to `TABLES`.
        `changes` declares the key ranges `fn` changes (table -> inclusive
        (low, high) key intervals, None for unbounded), so that the next
        snapshot exports only those segments; by default anything may have
        changed and the next snapshot exports everything.
        """
        declared = None if changes is None else {t: list(v) for t, v in changes.items()}

        def job(conn: duckdb.DuckDBPyConnection, state: _WriterState) -> tuple[T, int]:
            before = _total_rows(conn)
            # fn may insert or delete anything: forget what the writer cached.
            state.clear()
            state.touched = declared  # None: any table may have changed anywhere
            result = fn(conn)
            return result, max(0, _total_rows(conn) - before)
        return self._submit(job)

    # ---- reads -----------------------------------------------------------------------------

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for reading, usable in the calling thread; it sees committed data."""
        with self._readers_done:
            if self._closed:
                raise StorageError(f"{self.path} is closed")
            self._readers += 1
        try:
            with self._cursor_lock:
                cur = self._root.cursor()
            try:
                yield cur
            finally:
                cur.close()
        finally:
            with self._readers_done:
                self._readers -= 1
                self._readers_done.notify_all()

    def query(self, sql: str, params: Iterable[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run one SQL statement on a read cursor and return its rows as an Arrow table.

        Raises duckdb.Error for bad SQL (and for writes, when opened read-only).
        """
        with self.reader() as cur:
            rel = cur.sql(sql, params=params)
            # Statements without a result set (e.g. SET) return no relation.
            return rel.to_arrow_table() if rel is not None else pa.table({})

    def _dicts(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        with self.reader() as cur:
            res = cur.execute(sql, params)
            cols = [d[0] for d in res.description]
            types = [str(d[1]) for d in res.description]
            rows = res.fetchall()
        json_cols = [i for i, t in enumerate(types) if t == "JSON"]
        out = []
        for row in rows:
            d = dict(zip(cols, row, strict=True))
            for i in json_cols:
                if row[i] is not None:
                    d[cols[i]] = json.loads(row[i])
            out.append(d)
        return out

    def table_counts(self) -> dict[str, int]:
        """Rows per table of `TABLES`."""
        with self.reader() as cur:  # sql: t is one of the schema's own TABLES
            return {t: _scalar(cur, f"SELECT count(*) FROM {t}") for t in TABLES}

    # ---- writes of single records ----------------------------------------------------------

    def store_performance_result(self, record: Record | Mapping[str, Any] | None = None,
                                 /, **fields: Any) -> int:
        """Store one performance result; return its result_id. Raises `InvalidRecord`."""
        rec = _coerce("perf", record, fields)
        return self._submit(lambda conn, st: _insert_one(conn, st, "perf", rec))

    def store_hardware_compatibility(self, record: Record | Mapping[str, Any] | None = None,
                                     /, **fields: Any) -> int:
        """Store one hardware compatibility result; return its compatibility_id."""
        rec = _coerce("compat", record, fields)
        return self._submit(lambda conn, st: _insert_one(conn, st, "compat", rec))

    store_compatibility_result = store_hardware_compatibility

    def store_integration_test_result(self, record: Record | Mapping[str, Any] | None = None,
                                      /, **fields: Any) -> int:
        """Store one integration test result with its assertions; return its test_result_id.

        Without a run_id the result is attached to a new test run.
        """
        rec = _coerce("test", record, fields)
        return self._submit(lambda conn, st: _insert_one(conn, st, "test", rec))

    def create_test_run(self, test_name: str, test_type: str, **fields: Any) -> int:
        """Create a test run (to pass as run_id to later records); return its run_id."""
        allowed = {"started_at", "completed_at", "execution_time_seconds", "success",
                   "git_commit", "git_branch", "command_line", "metadata"}
        for key, value in fields.items():
            if key not in allowed:
                raise InvalidRecord(key, value,
                                    f"unknown test run field; expected {sorted(allowed)}")
        for key, value in (("test_name", test_name), ("test_type", test_type)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidRecord(key, value, "is required and must be a non-blank string")
        if fields.get("metadata") is not None:
            fields["metadata"] = json.dumps(fields["metadata"])

        def job(conn: duckdb.DuckDBPyConnection, st: _WriterState) -> tuple[int, int]:
            run_id = _next_id(conn, st, "test_runs")
            row = {"run_id": run_id, "test_name": test_name, "test_type": test_type,
                   "created_at": _now(), **fields}
            _insert_row(conn, "test_runs", row)
            st.runs.add(run_id)
            return run_id, 1
        return self._submit(job)

    # ---- bulk ingest -----------------------------------------------------------------------

    def ingest_records(self, kind: str, records: Iterable[Record | Mapping[str, Any]]) -> int:
        """Store many records of one kind ("perf", "compat", "test") in one transaction.

        Every record is validated first; the first bad one raises `InvalidRecord`
        (its `index` attribute is its position) and nothing of the batch is
        written. Returns the number of records stored.
        """
        k = record_kind(kind)
        clean: list[dict[str, Any]] = []
        for i, rec in enumerate(records):
            try:
                clean.append(_coerce(k, rec, {}))
            except InvalidRecord as e:
                e.index = i
                e.args = (f"record {i}: {e.args[0]}",)
                raise
        return self._ingest_clean(k, clean)

    def ingest_jsonl(self, kind: str, path: str | Path) -> int:
        """Store the records of a JSONL file (one JSON object per line, keyword names).

        Errors name the line. Returns the number of records stored.
        """
        k = record_kind(kind)
        clean: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise InvalidRecord("line", lineno,
                                        f"{path}:{lineno} is not JSON: {e}") from None
                try:
                    if not isinstance(obj, dict):
                        raise InvalidRecord("record", obj, "expected a JSON object per line")
                    clean.append(_coerce(k, obj, {}))
                except InvalidRecord as e:
                    e.line = lineno
                    e.args = (f"{path}:{lineno}: {e.args[0]}",)
                    raise
        return self._ingest_clean(k, clean)

    def ingest_arrow(self, kind: str, table: pa.Table) -> int:
        """Store every row of an Arrow table (columns named like the keyword arguments).

        Validated column by column; returns the number of records stored.
        """
        k = record_kind(kind)
        assertions = None
        if "assertions" in table.column_names:
            if k != "test":
                raise InvalidRecord("assertions", None, f"{k} records have no assertions")
            raw = table.column("assertions").to_pylist()
            table = table.drop_columns(["assertions"])
            rule = next(r for r in RULES["test"] if r.name == "assertions")
            assertions = [check_value(rule, a) or [] for a in raw]
        flat = validate_arrow(k, table)
        return self._submit(lambda conn, st: _ingest(conn, st, k, flat, assertions))

    def _ingest_clean(self, kind: str, clean: list[dict[str, Any]]) -> int:
        """Columnise validated records into an Arrow table and ingest it."""
        json_fields = {r.name for r in RULES[kind] if r.kind == "json"}
        columns = {}
        for f in arrow_schema(kind):
            values = [r[f.name] for r in clean]
            if f.name in json_fields:
                values = [None if v is None else json.dumps(v) for v in values]
            columns[f.name] = pa.array(values, type=f.type)
        flat = pa.table(columns, schema=arrow_schema(kind))
        assertions = [r["assertions"] or [] for r in clean] if kind == "test" else None
        return self._submit(lambda conn, st: _ingest(conn, st, kind, flat, assertions))

    # ---- queries of the original API -------------------------------------------------------

    def query_performance_results(
        self, model_name: str | None = None, hardware_type: str | None = None, *,
        device_name: str | None = None, batch_size: int | None = None,
        precision: str | None = None, test_case: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
        latest_only: bool = False, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Performance results with keyword names (throughput, latency_avg, ...), oldest first.

        latest_only keeps the newest result per (model, hardware, device, batch
        size, precision, test case).
        """
        where, params = _filters(model_name=model_name, hardware_type=hardware_type,
                                 device_name=device_name, batch_size=batch_size,
                                 precision=precision, test_case=test_case,
                                 since=since, until=until)
        partition = ("m.model_name, h.hardware_type, h.device_name, r.batch_size, r.precision, "
                     "r.test_case")
        return self._dicts(_select("perf", where, partition if latest_only else None, limit),
                           params)

    def query_hardware_compatibility(
        self, model_name: str | None = None, hardware_type: str | None = None, *,
        device_name: str | None = None, is_compatible: bool | None = None,
        since: datetime | None = None, until: datetime | None = None,
        latest_only: bool = False, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Compatibility results, oldest first.

        latest_only keeps the newest per (model, hardware, device).
        """
        where, params = _filters(model_name=model_name, hardware_type=hardware_type,
                                 device_name=device_name, is_compatible=is_compatible,
                                 since=since, until=until)
        partition = "m.model_name, h.hardware_type, h.device_name"
        return self._dicts(_select("compat", where, partition if latest_only else None, limit),
                           params)

    def query_integration_test_results(
        self, model_name: str | None = None, hardware_type: str | None = None, *,
        status: str | None = None, test_module: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
        latest_only: bool = False, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Integration test results with their `assertions` lists, oldest first.

        latest_only keeps the newest result per (module, class, test name, model, hardware).
        """
        where, params = _filters(model_name=model_name, hardware_type=hardware_type,
                                 status=status, test_module=test_module, since=since, until=until)
        partition = ("r.test_module, r.test_class, r.test_name, m.model_name, h.hardware_type, "
                     "h.device_name")
        rows = self._dicts(_select("test", where, partition if latest_only else None, limit),
                           params)
        if rows:
            ids = [r["test_result_id"] for r in rows]
            asserts = self._dicts(
                "SELECT test_result_id, assertion_name, passed, expected_value, actual_value, "
                "message FROM integration_test_assertions WHERE list_contains(?, test_result_id) "
                "ORDER BY assertion_id", [ids])
            by_result: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            for a in asserts:
                by_result[a.pop("test_result_id")].append(a)
            for r in rows:
                r["assertions"] = by_result[r["test_result_id"]]
        return rows

    def get_model_performance_summary(self, model_name: str) -> list[dict[str, Any]]:
        """Per (hardware, device, batch size, precision): result count and mean/min/max figures.

        Empty if the model has no performance results.
        """
        return self._dicts(_SUMMARY_SQL.format(key="m.model_name", group="h.hardware_type, "
                                               "h.device_name"), [model_name])

    def get_hardware_benchmark_summary(self, hardware_type: str) -> list[dict[str, Any]]:
        """Per (model, device, batch size, precision) on this hardware type: count and figures."""
        return self._dicts(_SUMMARY_SQL.format(key="h.hardware_type", group="m.model_name, "
                                               "h.device_name"), [hardware_type])

    # ---- graph -----------------------------------------------------------------------------

    def get_benchmark_relationships(self, node_id: str) -> list[dict[str, Any]]:
        """Typed edges around a node; see `storage.graph.relationships`."""
        with self.reader() as cur:
            return graph.relationships(cur, node_id)

    def search_similar_benchmarks(self, model_name: str, top_k: int = 5) -> list[dict[str, Any]]:
        """Models ranked by similarity of performance; see `storage.graph.similar_models`."""
        with self.reader() as cur:
            return graph.similar_models(cur, model_name, top_k)


# ---- SQL building (module level: pure functions of their arguments) -------------------------

_SUMMARY_SQL = """
SELECT {group}, r.batch_size, r.precision, count(*) AS results,
       avg(r.throughput_items_per_second) AS avg_throughput,
       max(r.throughput_items_per_second) AS max_throughput,
       avg(r.average_latency_ms) AS avg_latency_ms, min(r.average_latency_ms) AS min_latency_ms,
       avg(r.latency_p95_ms) AS avg_latency_p95_ms, avg(r.latency_p99_ms) AS avg_latency_p99_ms,
       max(r.memory_peak_mb) AS max_memory_peak_mb,
       min(r.created_at) AS first_at, max(r.created_at) AS last_at
FROM performance_results r JOIN models m USING (model_id)
     JOIN hardware_platforms h USING (hardware_id)
WHERE {key} = ?
GROUP BY ALL ORDER BY ALL
"""

_FILTER_COLUMNS = {
    "model_name": "m.model_name", "hardware_type": "h.hardware_type",
    "device_name": "h.device_name", "batch_size": "r.batch_size", "precision": "r.precision",
    "test_case": "r.test_case", "is_compatible": "r.is_compatible", "status": "r.status",
    "test_module": "r.test_module",
}


def _filters(*, since: datetime | None, until: datetime | None,
             **equal: Any) -> tuple[list[str], list[Any]]:
    where, params = [], []
    for name, value in equal.items():
        if value is not None:
            where.append(f"{_FILTER_COLUMNS[name]} = ?")
            params.append(value)
    if since is not None:
        where.append("r.created_at >= ?")
        params.append(since)
    if until is not None:
        where.append("r.created_at < ?")
        params.append(until)
    return where, params


def _select(kind: str, where: list[str], latest_partition: str | None, limit: int | None) -> str:
    """SELECT of a kind's results under their keyword names, joined to model and hardware."""
    # sql: table, columns and names come from the fixed RULES/KIND_TABLES; `where` holds
    # this module's own conditions with `?` parameters; the limit is an int.
    table = KIND_TABLES[kind]
    pk = PRIMARY_KEYS[table]
    cols = [f"r.{pk}"]
    for rule in RULES[kind]:
        if rule.kind == "assertions":
            continue
        if rule.column is None:  # a lookup key: model/hardware
            src = "h" if rule.name in ("hardware_type", "device_name") else "m"
            cols.append(f"{src}.{rule.name}")
        elif rule.column == rule.name:
            cols.append(f"r.{rule.name}")
        else:
            cols.append(f"r.{rule.column} AS {rule.name}")
    join = "LEFT JOIN" if kind == "test" else "JOIN"
    sql = (f"SELECT {', '.join(cols)} FROM {table} r "
           f"{join} models m ON m.model_id = r.model_id "
           f"{join} hardware_platforms h ON h.hardware_id = r.hardware_id")
    if where:
        sql += " WHERE " + " AND ".join(where)
    if latest_partition:
        sql += (f" QUALIFY row_number() OVER (PARTITION BY {latest_partition} "
                f"ORDER BY r.created_at DESC, r.{pk} DESC) = 1")
    sql += f" ORDER BY r.created_at, r.{pk}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql


def _total_rows(conn: duckdb.DuckDBPyConnection) -> int:
    # sql: t is one of the schema's own TABLES.
    sql = " + ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
    return _scalar(conn, f"SELECT {sql}")


# ---- writer-thread helpers: called only inside a write job ----------------------------------

def _next_id(conn: duckdb.DuckDBPyConnection, st: _WriterState, table: str, count: int = 1) -> int:
    """Reserve `count` ids of `table` (MAX+1 onwards) and return the first."""
    if table not in st.next_ids:  # sql: table and pk are the schema's own names
        pk = PRIMARY_KEYS[table]
        st.next_ids[table] = _scalar(conn, f"SELECT coalesce(max({pk}), 0) + 1 FROM {table}")
    first = st.next_ids[table]
    st.next_ids[table] = first + count
    st.touch(table, first)  # rows appended from `first` on
    return first


def _insert_row(conn: duckdb.DuckDBPyConnection, table: str, row: Mapping[str, Any]) -> None:
    # sql: row's keys are column names of the fixed RULES; values go in as parameters.
    names = ", ".join(row)
    marks = ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(row.values()))


def _model_id(conn: duckdb.DuckDBPyConnection, st: _WriterState, name: str,
              family: str | None, now: datetime) -> tuple[int, int]:
    """(model_id, rows inserted) for a model name, created on first use."""
    cached = st.models.get(name)
    if cached is not None and (family is None or cached[1]):
        return cached[0], 0
    found = conn.execute("SELECT model_id, model_family FROM models WHERE model_name = ? "
                         "ORDER BY model_id LIMIT 1", [name]).fetchall()
    if not found:
        model_id = _next_id(conn, st, "models")
        _insert_row(conn, "models", {"model_id": model_id, "model_name": name,
                                     "model_family": family, "created_at": now})
        st.models[name] = (model_id, family is not None)
        return model_id, 1
    model_id, known = int(found[0][0]), found[0][1]
    if known is None and family is not None:
        conn.execute("UPDATE models SET model_family = ? WHERE model_id = ?", [family, model_id])
        st.touch("models", model_id, model_id)
        known = family
    st.models[name] = (model_id, known is not None)
    return model_id, 0


def _hardware_id(conn: duckdb.DuckDBPyConnection, st: _WriterState, hardware_type: str,
                 device: str | None, now: datetime) -> tuple[int, int]:
    """(hardware_id, rows inserted) for a (hardware type, device), created on first use."""
    key = (hardware_type, device)
    if key in st.hardware:
        return st.hardware[key], 0
    found = conn.execute(
        "SELECT min(hardware_id) FROM hardware_platforms WHERE hardware_type = ? "
        "AND device_name IS NOT DISTINCT FROM ?", [hardware_type, device]).fetchall()
    inserted = 0
    if found[0][0] is None:
        hardware_id = _next_id(conn, st, "hardware_platforms")
        _insert_row(conn, "hardware_platforms", {"hardware_id": hardware_id,
                                                 "hardware_type": hardware_type,
                                                 "device_name": device, "created_at": now})
        inserted = 1
    else:
        hardware_id = int(found[0][0])
    st.hardware[key] = hardware_id
    return hardware_id, inserted


def _check_run(conn: duckdb.DuckDBPyConnection, st: _WriterState, run_id: int) -> None:
    if run_id in st.runs:
        return
    if not conn.execute("SELECT 1 FROM test_runs WHERE run_id = ? LIMIT 1", [run_id]).fetchall():
        raise InvalidRecord("run_id", run_id, _NO_RUN)
    st.runs.add(run_id)


def _new_run(conn: duckdb.DuckDBPyConnection, st: _WriterState, now: datetime,
             success: bool | None) -> int:
    run_id = _next_id(conn, st, "test_runs")
    _insert_row(conn, "test_runs", {"run_id": run_id, "test_name": DEFAULT_RUN_NAME,
                                    "test_type": "integration", "started_at": now,
                                    "completed_at": now, "success": success, "created_at": now})
    st.runs.add(run_id)
    return run_id


def _insert_one(conn: duckdb.DuckDBPyConnection, st: _WriterState, kind: str,
                rec: Mapping[str, Any]) -> tuple[int, int]:
    """Insert one validated record; return (its id, rows written)."""
    now = _now()
    rows = 1
    table = KIND_TABLES[kind]
    pk = PRIMARY_KEYS[table]
    row: dict[str, Any] = {}
    if rec.get("model_name") is not None:
        row["model_id"], n = _model_id(conn, st, rec["model_name"], rec["model_family"], now)
        rows += n
    if rec.get("hardware_type") is not None:
        row["hardware_id"], n = _hardware_id(conn, st, rec["hardware_type"], rec["device_name"],
                                             now)
        rows += n
    run_id = rec.get("run_id")
    if run_id is not None:
        _check_run(conn, st, run_id)
    elif kind == "test":
        run_id = _new_run(conn, st, now, rec["status"] in ("pass", "skip"))
        rows += 1
    row["run_id"] = run_id
    for rule in RULES[kind]:
        if rule.column is None or rule.name == "run_id":
            continue
        value = rec[rule.name]
        if rule.kind == "json" and value is not None:
            value = json.dumps(value)
        row[rule.column] = value
    if row["created_at"] is None:
        row["created_at"] = now
    record_id = _next_id(conn, st, table)
    row[pk] = record_id
    _insert_row(conn, table, row)
    for assertion in rec.get("assertions") or []:
        a = {"assertion_id": _next_id(conn, st, "integration_test_assertions"),
             "test_result_id": record_id, **assertion, "created_at": row["created_at"]}
        _insert_row(conn, "integration_test_assertions", a)
        rows += 1
    return record_id, rows


# Bulk ingest: the batch is registered as `_incoming` (with its row ordinal `_ord`) and
# moved with set-based statements; ids are the reserved base + ordinal, so they follow
# the order of the input.

_NEW_MODELS_SQL = """
INSERT INTO models (model_id, model_name, model_family, created_at)
SELECT ? + row_number() OVER (ORDER BY first_ord) - 1, model_name, model_family, ?
FROM (SELECT model_name, min(_ord) AS first_ord,
             any_value(model_family) FILTER (WHERE model_family IS NOT NULL) AS model_family
      FROM _incoming WHERE model_name IS NOT NULL GROUP BY model_name) n
WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.model_name = n.model_name)
"""

_MODEL_FAMILIES_SQL = """
UPDATE models SET model_family = n.model_family
FROM (SELECT model_name, any_value(model_family) AS model_family FROM _incoming
      WHERE model_family IS NOT NULL GROUP BY model_name) n
WHERE models.model_name = n.model_name AND models.model_family IS NULL
"""

_NEW_HARDWARE_SQL = """
INSERT INTO hardware_platforms (hardware_id, hardware_type, device_name, created_at)
SELECT ? + row_number() OVER (ORDER BY first_ord) - 1, hardware_type, device_name, ?
FROM (SELECT hardware_type, device_name, min(_ord) AS first_ord FROM _incoming
      WHERE hardware_type IS NOT NULL GROUP BY hardware_type, device_name) n
WHERE NOT EXISTS (SELECT 1 FROM hardware_platforms h WHERE h.hardware_type = n.hardware_type
                  AND h.device_name IS NOT DISTINCT FROM n.device_name)
"""

_UNKNOWN_RUN_SQL = """
SELECT run_id FROM _incoming WHERE run_id IS NOT NULL
  AND run_id NOT IN (SELECT run_id FROM test_runs) ORDER BY _ord LIMIT 1
"""


def _scalar(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    """The one integer a statement returns (INSERT returns its row count).

    fetchall, not fetchone: DuckDB keeps a half-fetched result open on the
    connection, which then refuses unregister().
    """
    rows = conn.execute(sql, params).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def _ingest(conn: duckdb.DuckDBPyConnection, st: _WriterState, kind: str, flat: pa.Table,
            assertions: list[list[dict[str, Any]]] | None) -> tuple[int, int]:
    """Insert a validated batch; return (records stored, rows written)."""
    # sql: table, column and rule names come from the fixed RULES/KIND_TABLES; the rows
    # arrive as the registered Arrow table `_incoming`, never as SQL text.
    n = flat.num_rows
    if n == 0:
        return 0, 0
    now = _now()
    table = KIND_TABLES[kind]
    incoming = flat.append_column("_ord", pa.array(range(n), type=pa.int64()))
    conn.register("_incoming", incoming)
    try:
        for rule in RULES[kind]:
            if rule.kind == "json":
                bad_json = conn.execute(
                    f"SELECT {rule.name} FROM _incoming WHERE {rule.name} IS NOT NULL AND "
                    f"coalesce(json_type(try_cast({rule.name} AS JSON)), '') <> 'OBJECT' "
                    "ORDER BY _ord LIMIT 1").fetchall()
                if bad_json:
                    raise InvalidRecord(rule.name, bad_json[0][0], "not a JSON object")
        bad = conn.execute(_UNKNOWN_RUN_SQL).fetchall()
        if bad:
            raise InvalidRecord("run_id", bad[0][0], _NO_RUN)
        rows = 0
        # Reserve ids only after counting what is new, so the cache stays exact.
        new_models = _scalar(conn, "SELECT count(DISTINCT model_name) FROM _incoming n WHERE "
                            "model_name IS NOT NULL AND NOT EXISTS (SELECT 1 FROM models m "
                            "WHERE m.model_name = n.model_name)", [])
        if new_models:
            rows += _scalar(conn, _NEW_MODELS_SQL, [_next_id(conn, st, "models", new_models), now])
        if "model_family" in incoming.column_names:
            conn.execute(_MODEL_FAMILIES_SQL)
            st.touch("models")  # which models it named is not worth a query: models is small
        new_hw = _scalar(conn, "SELECT count(*) FROM (SELECT DISTINCT hardware_type, device_name "
                        "FROM _incoming n WHERE hardware_type IS NOT NULL AND NOT EXISTS (SELECT 1 "
                        "FROM hardware_platforms h WHERE h.hardware_type = n.hardware_type AND "
                        "h.device_name IS NOT DISTINCT FROM n.device_name))", [])
        if new_hw:
            rows += _scalar(conn, _NEW_HARDWARE_SQL,
                           [_next_id(conn, st, "hardware_platforms", new_hw), now])
        st.models.clear()  # names created here are not in the per-record cache
        st.hardware.clear()
        default_run = None
        if kind == "test" and incoming.column("run_id").null_count:
            success = bool(_scalar(
                conn, "SELECT bool_and(status IN ('pass', 'skip'))::INTEGER FROM _incoming "
                "WHERE run_id IS NULL"))
            default_run = _new_run(conn, st, now, success)
            rows += 1
        pk = PRIMARY_KEYS[table]
        base = _next_id(conn, st, table, n)
        cols, exprs = [pk, "run_id"], ["? + i._ord", "coalesce(i.run_id, ?)"]
        for rule in RULES[kind]:
            if rule.column is None or rule.name in ("run_id", "created_at"):
                continue
            cols.append(rule.column)
            exprs.append(f"i.{rule.name}")
        cols += ["created_at", "model_id", "hardware_id"]
        exprs += ["coalesce(i.created_at, ?)", "m.model_id", "h.hardware_id"]
        join = "LEFT JOIN" if kind == "test" else "JOIN"
        rows += _scalar(conn, f"""
            INSERT INTO {table} ({', '.join(cols)})
            SELECT {', '.join(exprs)} FROM _incoming i
            {join} (SELECT model_name, min(model_id) AS model_id FROM models GROUP BY ALL) m
                ON m.model_name = i.model_name
            {join} (SELECT hardware_type, device_name, min(hardware_id) AS hardware_id
                    FROM hardware_platforms GROUP BY ALL) h
                ON h.hardware_type = i.hardware_type
               AND h.device_name IS NOT DISTINCT FROM i.device_name
            ORDER BY i._ord""", [base, default_run, now])
        if assertions:
            rows += _ingest_assertions(conn, st, base, assertions, incoming, now)
    finally:
        # After a failed statement the transaction is aborted and DuckDB refuses even
        # this; the registration is then replaced by the next batch's.
        with contextlib.suppress(duckdb.Error):
            conn.unregister("_incoming")
    return n, rows


def _ingest_assertions(conn: duckdb.DuckDBPyConnection, st: _WriterState, base: int,
                       assertions: list[list[dict[str, Any]]], incoming: pa.Table,
                       now: datetime) -> int:
    """Insert the assertions of the batch's test results (ids follow the input order)."""
    flat = [(i, a) for i, items in enumerate(assertions) for a in items]
    if not flat:
        return 0
    created = incoming.column("created_at").to_pylist()
    first = _next_id(conn, st, "integration_test_assertions", len(flat))
    tbl = pa.table({
        "assertion_id": pa.array(range(first, first + len(flat)), type=pa.int32()),
        "test_result_id": pa.array([base + i for i, _ in flat], type=pa.int32()),
        "assertion_name": [a["assertion_name"] for _, a in flat],
        "passed": pa.array([a["passed"] for _, a in flat], type=pa.bool_()),
        "expected_value": pa.array([a["expected_value"] for _, a in flat], type=pa.string()),
        "actual_value": pa.array([a["actual_value"] for _, a in flat], type=pa.string()),
        "message": pa.array([a["message"] for _, a in flat], type=pa.string()),
        "created_at": pa.array([created[i] or now for i, _ in flat], type=pa.timestamp("us")),
    })
    conn.register("_incoming_assertions", tbl)
    try:
        return _scalar(conn, "INSERT INTO integration_test_assertions BY NAME "
                      "SELECT * FROM _incoming_assertions", [])
    finally:
        with contextlib.suppress(duckdb.Error):
            conn.unregister("_incoming_assertions")
