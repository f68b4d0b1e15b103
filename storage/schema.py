"""The benchmark database schema: its tables, its version, and forward migrations.

This module owns the DDL. Version 1 is the original benchmark database's schema
(see ../shared/notes/original-schema.md), so `.duckdb` files written by the
earlier API open unchanged; every later version is a migration in `MIGRATIONS`,
applied forward in place by `ensure_schema` and recorded in `schema_version`.

Choices, and why:
- Fresh files get no PRIMARY KEY / FOREIGN KEY constraints. DuckDB maintains an
  ART index per key, which slows bulk appends, and it refuses `ALTER TABLE` on a
  table other tables reference, which would block migrations. Ids are assigned
  by the single writer (`storage.db`) as MAX(id)+1 inside its transaction, so
  they stay unique and monotonically increasing; references are resolved by the
  writer, never taken on trust from a record. Files of the original schema keep
  their constraints: a migration only adds columns and tables.
- Measurements are DOUBLE (migration 3): the original's FLOAT (32-bit) read
  `--throughput 9.8` back as 9.800000190734863. Legacy FLOAT values migrate as
  they are (the FLOAT's exact value, widened). DuckDB refuses to change a
  column of a table other tables reference, so a file of the original schema
  (with its keys) has those tables rebuilt in the fresh shape (no key
  constraints, like fresh files); a table referenced by a table this module
  does not know is left as it was.
- Tables this module does not know (web_platform_results, ...) and views are
  left exactly as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from benchsync.storage.errors import StorageError
from benchsync.storage.sqlnames import ident

VERSION_TABLE = "schema_version"

# Our tables in dependency order: a table only refers to tables before it.
TABLES: list[str] = [
    "models",
    "hardware_platforms",
    "test_runs",
    "performance_results",
    "performance_batch_results",
    "hardware_compatibility",
    "integration_test_results",
    "integration_test_assertions",
]

# table -> id column; exports order rows by it (ids only grow, so appended rows come last).
PRIMARY_KEYS: dict[str, str] = {
    "models": "model_id",
    "hardware_platforms": "hardware_id",
    "test_runs": "run_id",
    "performance_results": "result_id",
    "performance_batch_results": "batch_id",
    "hardware_compatibility": "compatibility_id",
    "integration_test_results": "test_result_id",
    "integration_test_assertions": "assertion_id",
}

# Every per-node counter, as a key or as a reference: unique only inside one
# dataset. Cross-node views (`storage.scopes`) make them globally unique.
ID_COLUMNS: frozenset[str] = frozenset(PRIMARY_KEYS.values())

_ORIGINAL_DDL = [
    """CREATE TABLE IF NOT EXISTS models (
        model_id INTEGER NOT NULL, model_name VARCHAR NOT NULL, model_family VARCHAR,
        modality VARCHAR, source VARCHAR, version VARCHAR, parameters_million FLOAT,
        metadata JSON, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS hardware_platforms (
        hardware_id INTEGER NOT NULL, hardware_type VARCHAR NOT NULL, device_name VARCHAR,
        platform VARCHAR, platform_version VARCHAR, driver_version VARCHAR, memory_gb FLOAT,
        compute_units INTEGER, metadata JSON, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS test_runs (
        run_id INTEGER NOT NULL, test_name VARCHAR NOT NULL, test_type VARCHAR NOT NULL,
        started_at TIMESTAMP, completed_at TIMESTAMP, execution_time_seconds FLOAT,
        success BOOLEAN, git_commit VARCHAR, git_branch VARCHAR, command_line VARCHAR,
        metadata JSON, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS performance_results (
        result_id INTEGER NOT NULL, run_id INTEGER, model_id INTEGER NOT NULL,
        hardware_id INTEGER NOT NULL, test_case VARCHAR NOT NULL, batch_size INTEGER DEFAULT 1,
        precision VARCHAR, total_time_seconds FLOAT, average_latency_ms FLOAT,
        throughput_items_per_second FLOAT, memory_peak_mb FLOAT, iterations INTEGER,
        warmup_iterations INTEGER, metrics JSON, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS performance_batch_results (
        batch_id INTEGER NOT NULL, result_id INTEGER NOT NULL, batch_index INTEGER NOT NULL,
        batch_size INTEGER NOT NULL, latency_ms FLOAT, memory_usage_mb FLOAT,
        created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS hardware_compatibility (
        compatibility_id INTEGER NOT NULL, run_id INTEGER, model_id INTEGER NOT NULL,
        hardware_id INTEGER NOT NULL, is_compatible BOOLEAN NOT NULL,
        detection_success BOOLEAN NOT NULL, initialization_success BOOLEAN NOT NULL,
        error_message VARCHAR, error_type VARCHAR, suggested_fix VARCHAR,
        workaround_available BOOLEAN, compatibility_score FLOAT, metadata JSON,
        created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS integration_test_results (
        test_result_id INTEGER NOT NULL, run_id INTEGER NOT NULL, test_module VARCHAR NOT NULL,
        test_class VARCHAR, test_name VARCHAR NOT NULL, status VARCHAR NOT NULL,
        execution_time_seconds FLOAT, hardware_id INTEGER, model_id INTEGER,
        error_message VARCHAR, error_traceback VARCHAR, metadata JSON, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS integration_test_assertions (
        assertion_id INTEGER NOT NULL, test_result_id INTEGER NOT NULL,
        assertion_name VARCHAR NOT NULL, passed BOOLEAN NOT NULL, expected_value VARCHAR,
        actual_value VARCHAR, message VARCHAR, created_at TIMESTAMP)""",
]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    # Run after the statements, for what SQL alone cannot say (in the same transaction).
    apply: Callable[[duckdb.DuckDBPyConnection], None] | None = None


def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    return [(str(n), str(t)) for n, t in conn.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE schema_name = 'main' AND table_name = ? ORDER BY column_index", [table],
    ).fetchall()]  # fmt: skip


def _measurements_to_double(conn: duckdb.DuckDBPyConnection) -> None:
    """Migration 3: every FLOAT column of our tables becomes DOUBLE, values as they are."""
    # sql: tables are the schema's own TABLES; column names and types come from the file's
    # catalogue (a legacy file may carry any column name), so columns go through ident().
    present = [t for t in TABLES if _columns(conn, t)]
    floats = {t: [n for n, kind in _columns(conn, t) if kind == "FLOAT"] for t in present}
    referencing: dict[str, set[str]] = {}
    for table, target in conn.execute(
        "SELECT table_name, referenced_table FROM duckdb_constraints() "
        "WHERE schema_name = 'main' AND constraint_type = 'FOREIGN KEY'"
    ).fetchall():
        referencing.setdefault(str(target), set()).add(str(table))
    # Rebuilt: referenced tables with FLOAT columns, and every table referencing a
    # rebuilt one (it must be dropped first). When that reaches a table we do not
    # know, nothing is rebuilt: the referenced tables keep their FLOAT columns.
    rebuild = {t for t in present if floats[t] and referencing.get(t)}
    while (grown := rebuild | {r for t in rebuild for r in referencing.get(t, ())}) != rebuild:
        rebuild = grown
    if not rebuild <= set(present):
        rebuild = set()
    for table in present:
        if table not in rebuild and not referencing.get(table):
            for column in floats[table]:
                conn.execute(f"ALTER TABLE {table} ALTER COLUMN {ident(column)} TYPE DOUBLE")
    order = [t for t in TABLES if t in rebuild]
    for table in order:
        new = f"__bs_new_{table}"
        ddl = next(d for d in _ORIGINAL_DDL if f"EXISTS {table} (" in d)
        ddl = ddl.replace(f"IF NOT EXISTS {table} (", f"{new} (")
        conn.execute(ddl.replace(" FLOAT", " DOUBLE"))
        have = {n for n, _ in _columns(conn, new)}
        for name, kind in _columns(conn, table):
            if name not in have:
                kind = "DOUBLE" if kind == "FLOAT" else kind
                conn.execute(f"ALTER TABLE {new} ADD COLUMN {ident(name)} {kind}")
        conn.execute(f"INSERT INTO {new} BY NAME SELECT * FROM {table}")
    for table in reversed(order):
        conn.execute(f"DROP TABLE {table}")
    for table in order:
        conn.execute(f"ALTER TABLE __bs_new_{table} RENAME TO {table}")


# Forward only, never edited once released: a file at version N gets N+1.. applied.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "original benchmark database schema", tuple(_ORIGINAL_DDL)),
    Migration(
        2,
        "p90/p95/p99 latency columns on performance_results",
        tuple(  # sql: fixed column names
            f"ALTER TABLE performance_results ADD COLUMN IF NOT EXISTS {col} FLOAT"
            for col in ("latency_p90_ms", "latency_p95_ms", "latency_p99_ms")
        ),
    ),
    Migration(3, "measurements as DOUBLE, not FLOAT", (), _measurements_to_double),
)

SCHEMA_VERSION: int = MIGRATIONS[-1].version


class SchemaTooNew(StorageError):
    """The file was written by a newer benchsync; we refuse to touch it."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this benchsync supports "
            f"({supported}); upgrade benchsync to open it"
        )
        self.found = found
        self.supported = supported


def current_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the open database; 0 for none (fresh or original file)."""
    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'",
        [VERSION_TABLE],
    ).fetchall()
    if not exists[0][0]:
        return 0
    rows = conn.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchall()
    return int(rows[0][0])


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the schema, or migrate an existing one forward, in one transaction.

    Idempotent. A file of the original schema (no version table) is at version
    0: migration 1 leaves its tables as they are (IF NOT EXISTS) and later
    migrations add what it lacks. Raises `SchemaTooNew` for a file written by a
    newer benchsync. `conn` must not be inside a transaction.
    """
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found, SCHEMA_VERSION)
    if found == SCHEMA_VERSION:
        return
    conn.begin()
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} "
            "(version INTEGER NOT NULL, description VARCHAR, applied_at TIMESTAMP)"
        )
        now = datetime.now(UTC).replace(tzinfo=None)
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            for statement in migration.statements:
                conn.execute(statement)
            if migration.apply is not None:
                migration.apply(conn)
            conn.execute(
                f"INSERT INTO {VERSION_TABLE} VALUES (?, ?, ?)",
                [migration.version, migration.description, now],
            )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
