"""Safe execution of untrusted read-only SQL on a node's own tables.

A `QuerySandbox` is its own in-memory DuckDB instance, separate from the node's
database: DuckDB will not open the node's file twice with a different
configuration, and disabling external access on the main instance would break
Parquet export. The caller hands the node's tables in as Arrow data
(`load`); they are registered as Arrow views, which costs ~nothing per reload
(measured: registering a 1M-row table takes ~2 ms, `CREATE TABLE AS` ~40 ms)
and still scans with external access disabled.

The instance is locked down at creation: no file system access
(`enable_external_access=false`, and the local file system disabled outright),
no extension autoload/autoinstall, no spilling (`temp_directory=''`: nothing
is ever written or read under the working directory's `.tmp/`), a private
empty directory for DuckDB's home, secret and extension directories (so
nothing about the node's machine shows), a memory limit and a thread count,
then `lock_configuration=true` so no query can change any of it.

`gate()` is the one read-only gate every path that runs user SQL goes
through (local, replicas and network scopes, the merge): DuckDB's own parser
(`json_serialize_sql` serializes only SELECT statements), exactly one
statement, and no system functions (`duckdb_settings()`, `current_setting`,
`pragma_*`, ...) that would describe the node rather than its data. A timer
interrupts a query that exceeds its time limit, and the answer is streamed in
batches so that a row or byte limit stops it early.

DuckDB's `memory_limit` is its own accounting, and some operators (a huge
`range()` list, `repeat()`) allocate around it. The OS bound that holds
whatever DuckDB does is `RLIMIT_AS` on a worker process
(`benchsync.storage.sandbox_worker`), which the daemon starts and sizes.

Thread safety: one sandbox runs one query at a time (an internal lock
serializes `execute` and `load`); use one sandbox per worker thread for
parallelism.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from benchsync.storage.errors import StorageError
from benchsync.storage.limits import QUERY_MAX_BYTES, QUERY_MAX_ROWS, QUERY_TIMEOUT

DEFAULT_THREADS = 1  # DuckDB worker threads per sandbox
BATCH_ROWS = 64 * 1024  # rows fetched per Arrow batch while checking the limits
MAX_SQL_CHARS = 64 * 1024  # characters of SQL text accepted
# Functions that describe the node (settings, paths, secrets, extensions, catalog
# internals) rather than the tables handed in; refused by the gate.
SYSTEM_FUNCTION_PREFIXES = ("duckdb_", "pragma_", "pg_")  # pg_catalog.pg_settings, ...
SYSTEM_FUNCTIONS = frozenset({"current_setting", "which_secret", "getvariable", "getenv"})

# One wording per error, whatever path ran the query.
FORBIDDEN_ACCESS = (
    "the query sandbox has no file, network, extension or settings access; "
    "query the benchmark tables only"
)
READ_ONLY = "only read-only SELECT/WITH queries are served; the statement was refused"

ErrorKind = str  # one of protocol.query.ERROR_KINDS


class QueryError(StorageError):
    """A query the sandbox did not answer. `.kind` is the protocol's error kind."""

    kind: ErrorKind = "internal"


class QueryRefused(QueryError):
    """The caller sent something other than one read-only SELECT, or it touched
    something the sandbox forbids (files, extensions, settings)."""

    kind = "refused"


class InvalidSQL(QueryError):
    """The caller's SQL does not parse or does not bind (unknown table/column, types)."""

    kind = "invalid_sql"


class QueryTimeout(QueryError):
    """The query ran longer than its time limit and was interrupted."""

    kind = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"query interrupted after its time limit of {timeout_s:g} s; "
            "narrow it (WHERE, fewer joins) or raise the limit"
        )
        self.timeout_s = timeout_s


class ResultTooLarge(QueryError):
    """The answer (or the work to compute it) exceeded a row, byte or memory limit."""

    kind = "too_large"

    def __init__(self, what: str, *, limit: int | str, got: int | str) -> None:
        super().__init__(
            f"{what} over the limit ({got} > {limit}); aggregate, filter or add a LIMIT"
        )
        self.what = what
        self.limit = limit
        self.got = got


@dataclass(frozen=True)
class QueryLimits:
    """Limits one query runs under; the defaults (`storage/limits.py`) are also
    the defaults of the node's settings query_timeout, query_max_rows and
    query_max_bytes."""

    timeout_s: float = QUERY_TIMEOUT  # seconds
    max_rows: int = QUERY_MAX_ROWS  # rows in the answer
    max_bytes: int = QUERY_MAX_BYTES  # bytes of Arrow data in the answer

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_rows < 0 or self.max_bytes < 0:
            raise ValueError("timeout_s must be > 0 and max_rows/max_bytes >= 0")


class QuerySandbox:
    """An isolated, read-only DuckDB for untrusted SELECTs over Arrow tables.

    `memory_limit` is a DuckDB size string ("512MB", "1073741824B").
    """

    def __init__(self, *, memory_limit: str, threads: int = DEFAULT_THREADS) -> None:
        self._lock = threading.Lock()
        # Empty and private: DuckDB's settings name these paths, so they must say nothing.
        self._private = tempfile.TemporaryDirectory(prefix="benchsync-sandbox-")
        self._conn = duckdb.connect(
            ":memory:",
            config={
                "enable_external_access": False,
                "autoload_known_extensions": False,
                "autoinstall_known_extensions": False,
                "allow_community_extensions": False,
                "memory_limit": memory_limit,
                "threads": threads,
                "temp_directory": "",  # no spilling: no file is ever written or read
                "home_directory": self._private.name,
                "secret_directory": self._private.name,
                "extension_directory": self._private.name,
            },
        )
        # Only settable once the database runs; then nothing may change any more.
        self._conn.execute("SET disabled_filesystems = 'LocalFileSystem'")
        self._conn.execute("SET lock_configuration = true")
        self._tables: dict[str, pa.Table] = {}
        self.memory_limit = memory_limit

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self._private.cleanup()

    def __enter__(self) -> QuerySandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tables(self) -> dict[str, pa.Table]:
        return dict(self._tables)

    def load(self, tables: Mapping[str, pa.Table]) -> None:
        """Replace the sandbox's data with `tables` (name -> Arrow table).

        Zero-copy: the Arrow buffers are referenced, not copied, so reloading
        after each snapshot is cheap. Tables not in `tables` disappear.
        """
        with self._lock:
            for name in self._tables:
                self._conn.unregister(name)
            self._tables = {}
            for name, table in tables.items():
                if not isinstance(table, pa.Table):
                    raise TypeError(f"table {name!r} must be a pyarrow.Table, got {type(table)}")
                self._conn.register(name, table)
                self._tables[name] = table

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        limits: QueryLimits,
    ) -> pa.Table:
        """Run one read-only SELECT under `limits`; returns its answer as an Arrow table.

        The SQL passes `gate()` first. Raises QueryRefused, InvalidSQL,
        QueryTimeout, ResultTooLarge (all QueryError, with `.kind`), or
        QueryError(kind="internal"). The sandbox keeps serving after any of them.
        """
        if not (params is None or isinstance(params, list | tuple)
                or (isinstance(params, dict) and all(isinstance(k, str) for k in params))):
            raise InvalidSQL("query parameters must be a list of values (or an object of "
                             f"named values), not {type(params).__name__}")  # fmt: skip
        with self._lock:
            gate(self._conn, sql)
            return self._run(sql, params, limits.timeout_s, limits.max_rows, limits.max_bytes)

    def _run(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None,
             timeout_s: float, max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
        state = threading.Lock()
        running = True
        timed_out = False

        def on_timeout() -> None:
            nonlocal timed_out
            with state:  # never interrupt a later query after this one finished
                if running:
                    timed_out = True
                    self._conn.interrupt()

        timer = threading.Timer(timeout_s, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            batches: list[pa.RecordBatch] = []
            rows = size = 0
            reader = self._conn.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)
            for batch in reader:
                rows += batch.num_rows
                size += batch.nbytes
                if rows > max_rows:
                    raise ResultTooLarge("answer rows", limit=max_rows, got=f"at least {rows}")
                if size > max_bytes:
                    raise ResultTooLarge("answer bytes", limit=max_bytes, got=f"at least {size}")
                batches.append(batch)
            return pa.Table.from_batches(batches, schema=reader.schema)
        except duckdb.InterruptException:
            raise QueryTimeout(timeout_s) from None
        except duckdb.PermissionException:
            raise QueryRefused(FORBIDDEN_ACCESS) from None
        except duckdb.OutOfMemoryException:
            raise ResultTooLarge("query memory", limit=self.memory_limit, got="more") from None
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException,
                duckdb.ConversionException, duckdb.InvalidInputException,
                duckdb.NotImplementedException, duckdb.OutOfRangeException) as e:  # fmt: skip
            if timed_out:
                raise QueryTimeout(timeout_s) from None
            if "configuration has been locked" in str(e):
                raise QueryRefused(FORBIDDEN_ACCESS) from None
            raise InvalidSQL(_first_line(e)) from None
        except duckdb.Error as e:
            if timed_out:
                raise QueryTimeout(timeout_s) from None
            raise QueryError(f"query failed in DuckDB: {_first_line(e)}") from None
        finally:
            with state:
                running = False
            timer.cancel()


def run_once(
    sql: str,
    tables: Mapping[str, pa.Table],
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    limits: QueryLimits,
    memory_limit: str,
) -> pa.Table:
    """Run one query over `tables` in a fresh sandbox in this process; returns the answer.

    Memory is bounded by DuckDB's own accounting only (the daemon runs the
    same sandbox in a worker process under an OS limit). Raises QueryError
    subclasses, as `QuerySandbox.execute`.
    """
    with QuerySandbox(memory_limit=memory_limit) as sandbox:
        sandbox.load(tables)
        return sandbox.execute(sql, params, limits=limits)


def gate(conn: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    """The read-only gate: returns the AST of `sql` if it may run in a sandbox.

    `sql` must be at most MAX_SQL_CHARS long and exactly one SELECT/WITH
    query (DuckDB's own parser: only SELECT statements serialise) calling no
    system function. `conn` is any DuckDB connection (parsing runs nothing).
    Raises InvalidSQL (does not parse) or QueryRefused (anything else:
    INSERT, COPY, ATTACH, SET, PRAGMA, several statements, system functions).
    """
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRefused(f"SQL text of {len(sql)} characters exceeds {MAX_SQL_CHARS}")
    row = conn.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0]
    ast: dict[str, Any] = json.loads(row[0])
    if ast.get("error"):
        message = str(ast.get("error_message", "parse error"))
        if "Only SELECT statements" in message:
            raise QueryRefused(READ_ONLY)
        raise InvalidSQL(f"SQL does not parse: {message}")
    statements = ast.get("statements", [])
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement per query, got {len(statements)}")
    for name in _names(ast):
        lowered = name.lower()
        if lowered in SYSTEM_FUNCTIONS or lowered.startswith(SYSTEM_FUNCTION_PREFIXES):
            raise QueryRefused(FORBIDDEN_ACCESS)
    return ast


def _names(node: Any) -> list[str]:
    """Every function and table name an AST mentions (table functions included)."""
    out: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in ("function_name", "table_name", "schema_name"):
                if isinstance(item.get(key), str):
                    out.append(item[key])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
