"""Migration of benchmark databases written by the original API into a node's own dataset.

This module owns `benchsync migrate`'s work on disk: backing a legacy `.duckdb`
file up, reading it read-only, importing its rows into the node's database with
fresh ids, recording where every row came from, verifying the import inside the
same transaction, and the `--snapshot-only` mode (a standalone snapshot of the
legacy file, without import).

Choices, and why:
- One file = one `BenchmarkDB.write` transaction. The legacy file is ATTACHed
  read-only inside it (DuckDB makes ATTACH transactional, so a rollback also
  detaches it), every table is copied with set-based `INSERT ... SELECT`, and
  verification runs before COMMIT: a failure anywhere rolls the whole file back.
- Provenance is a table, `migrated_rows(source, source_table, source_id,
  source_parent_id, table_name, new_id, merged)`, not extra columns: our tables
  keep exactly the schema fresh nodes have (same Parquet schemas in snapshots),
  one table answers "where did this row come from" for every table, and it
  doubles as the id map used to remap foreign keys. `source_parent_id` exists
  because assertion ids restart per test result in the original, so the
  original id alone does not name an assertion. `migration_sources` has one row
  per imported file (digests, path, time, row counts).
- New ids follow the original order: MAX(id)+1 onwards, ordered by the original
  id. Models and hardware platforms are merged by value (model_name;
  hardware_type + device_name, as `storage.db` resolves them), so summaries by
  model keep working across files.
- Idempotency: a file is identified by the SHA-256 of its bytes and by a digest
  of its content (per table: columns, row count, order-independent row hash).
  Either matching a recorded source means "already migrated"; the content digest
  survives the file being rewritten, the byte digest survives a DuckDB upgrade
  that changes `hash()`.
- A file is validated (a DuckDB database with the schema's tables) before
  anything is written, and its backup goes into the data directory
  (`<home>/backups/`) unless the caller asks for it beside the file: a node
  migrating paths named over its control API never writes beside them (the
  CLI, the user's own process, backs up beside the files its user named).
- Tables the schema does not know are carried over with all their columns; in
  them, `model_id`, `hardware_id` and `run_id` (when not the table's own key)
  are remapped like everywhere else, so that carried views keep joining
  correctly. Views are recreated over the node's tables.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from benchsync.storage import schema
from benchsync.storage.dataset import LocalDataset, write_sidecar
from benchsync.storage.db import CHANGES_TABLE
from benchsync.storage.errors import StorageError
from benchsync.storage.snapshot import SnapshotStore
from benchsync.storage.sqlnames import ident, literal

BACKUP_SUFFIX = ".pre-benchsync-backup"
BACKUP_DIR = "backups"  # under the data directory: where backups go unless asked beside the file
SOURCES_TABLE = "migration_sources"
ROWS_TABLE = "migrated_rows"
ATTACH_ALIAS = "benchsync_legacy"
READ_CHUNK = 1024 * 1024  # bytes read at a time when hashing a file
MAX_EXAMPLES = 3  # offending values quoted in an error message

# Merged by value: these columns name a row, whatever its id.
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "models": ("model_name",),
    "hardware_platforms": ("hardware_type", "device_name"),
}
# table -> {column: referenced table}, for the schema's tables.
FOREIGN_KEYS: dict[str, dict[str, str]] = {
    "performance_results": {
        "run_id": "test_runs",
        "model_id": "models",
        "hardware_id": "hardware_platforms",
    },
    "performance_batch_results": {"result_id": "performance_results"},
    "hardware_compatibility": {
        "run_id": "test_runs",
        "model_id": "models",
        "hardware_id": "hardware_platforms",
    },
    "integration_test_results": {
        "run_id": "test_runs",
        "hardware_id": "hardware_platforms",
        "model_id": "models",
    },
    "integration_test_assertions": {"test_result_id": "integration_test_results"},
}
REFERENCED_TABLES = frozenset(t for fks in FOREIGN_KEYS.values() for t in fks.values())
# Ids that restart per parent row: provenance records the parent's original id too.
PARENT_COLUMNS = {"integration_test_assertions": "test_result_id"}
# In tables the schema does not know, columns of these names are references and get remapped
# (`result_id` is not among them: in web_platform_results it is that table's own key).
CARRIED_REFERENCES = {
    "model_id": "models",
    "hardware_id": "hardware_platforms",
    "run_id": "test_runs",
}
# Node-local bookkeeping that must not be copied out of a file that is itself a node database.
NOT_CARRIED = frozenset({schema.VERSION_TABLE, SOURCES_TABLE, ROWS_TABLE, CHANGES_TABLE})

_PROVENANCE_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {SOURCES_TABLE} (
        source VARCHAR NOT NULL, file_sha256 VARCHAR NOT NULL, path VARCHAR NOT NULL,
        migrated_at TIMESTAMP NOT NULL, rows BIGINT NOT NULL, tables JSON,
        verified BOOLEAN)""",
    f"""CREATE TABLE IF NOT EXISTS {ROWS_TABLE} (
        source VARCHAR NOT NULL, source_table VARCHAR NOT NULL, source_id BIGINT,
        source_parent_id BIGINT, table_name VARCHAR NOT NULL, new_id BIGINT NOT NULL,
        merged BOOLEAN NOT NULL)""",
)

Progress = Callable[[str], None]
_T = TypeVar("_T")


# ---- errors: who is at fault, what to try ------------------------------------------------------


class MigrationError(StorageError):
    """A legacy file could not be migrated; the node's database is unchanged."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


class LegacyFileMissing(MigrationError):
    """The named file does not exist (or is not a regular file)."""


class NotADuckDBFile(MigrationError):
    """The file exists but is not a DuckDB database."""


class LegacyFileLocked(MigrationError):
    """Another process has the file open for writing."""


class CorruptLegacyFile(MigrationError):
    """DuckDB could not read the file's blocks (bad checksum, truncated file)."""


class UnknownSchema(MigrationError):
    """A DuckDB file, but not of the benchmark database schema."""


class InconsistentLegacyData(MigrationError):
    """The file's rows contradict themselves (duplicate ids, references to missing rows)."""


class VerificationFailed(MigrationError):
    """The imported rows do not match the file's; the import was rolled back."""


# ---- results --------------------------------------------------------------------------------


@dataclass
class TableReport:
    """What happened to one table of a legacy file."""

    name: str
    rows: int  # rows in the legacy file
    new_rows: int  # rows added to the node's table (fewer when models/hardware merged)
    carried: bool = False  # a table the schema does not know, copied as it is
    verified: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "new_rows": self.new_rows,
            "carried": self.carried,
            "verified": self.verified,
        }


@dataclass
class MigrationResult:
    """The outcome for one legacy file.

    `status` is migrated | already-migrated | snapshot | failed.
    """

    path: Path
    status: str
    source: str | None = None  # content digest: `migrated_rows.source`
    file_sha256: str | None = None
    tables: list[TableReport] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    backup: Path | None = None
    verified: bool | None = None
    cid: str | None = None
    sidecar: Path | None = None
    error: str | None = None
    error_type: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "status": self.status,
            "ok": self.ok,
            "source": self.source,
            "file_sha256": self.file_sha256,
            "rows": self.rows,
            "tables": [t.to_json() for t in self.tables],
            "views": self.views,
            "backup": None if self.backup is None else str(self.backup),
            "verified": self.verified,
            "cid": self.cid,
            "sidecar": None if self.sidecar is None else str(self.sidecar),
            "error": self.error,
            "error_type": self.error_type,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# ---- reading a legacy file ------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyTable:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, DuckDB type) in table order
    rows: int
    checksum: int  # sum of hash(row) as a HUGEINT: order-independent
    primary_key: str | None

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]


@dataclass(frozen=True)
class LegacyFile:
    path: Path
    file_sha256: str
    tables: dict[str, LegacyTable]
    views: dict[str, str]  # name -> CREATE VIEW statement
    source: str  # content digest

    @property
    def known_tables(self) -> list[str]:
        return [t for t in schema.TABLES if t in self.tables]

    @property
    def carried_tables(self) -> list[str]:
        return sorted(t for t in self.tables if t not in schema.TABLES and t not in NOT_CARRIED)


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (and of its write-ahead log, if one is beside it)."""
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".wal")):
        if not p.exists():
            continue
        with open(p, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _classify_open_error(path: Path, e: duckdb.Error) -> MigrationError:
    msg = str(e)
    low = msg.lower()
    if "corrupt" in low:
        return CorruptLegacyFile(
            path,
            f"DuckDB cannot read this file ({msg}); restore it from a "
            f"backup (e.g. {path.name}{BACKUP_SUFFIX}) and retry",
        )
    if (
        "set lock" in low
        or "conflicting lock" in low
        or "different configuration" in low
        or "already attached" in low
    ):
        return LegacyFileLocked(
            path,
            f"the file is open in another process or connection ({msg}); "
            "close the program using it (e.g. the old benchmark tool) and retry",
        )
    if "not a valid duckdb database" in low:
        return NotADuckDBFile(
            path,
            "this is not a DuckDB database file; pass a .duckdb file "
            "written by the benchmark database API",
        )
    return CorruptLegacyFile(
        path,
        f"DuckDB cannot read this file ({msg}); restore it from a "
        f"backup (e.g. {path.name}{BACKUP_SUFFIX}) and retry",
    )


def _check_regular_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LegacyFileMissing(path, "no such file; check the path given to --db") from None
    except (OSError, ValueError) as e:  # permissions, a NUL byte, a name too long, ...
        raise LegacyFileMissing(
            path, f"cannot read it ({e}); check the path given to --db"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise LegacyFileMissing(path, "not a regular file; --db takes a .duckdb file")


def open_legacy(path: Path) -> duckdb.DuckDBPyConnection:
    """Open a legacy file read-only; raises a `MigrationError` subclass saying what is wrong."""
    _check_regular_file(path)
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise _classify_open_error(path, e) from None


def inspect_legacy(path: Path) -> LegacyFile:
    """Read a legacy file's tables, views and digests; the file is opened read-only.

    Raises `LegacyFileMissing`, `NotADuckDBFile`, `LegacyFileLocked`,
    `CorruptLegacyFile`, or `UnknownSchema` for a DuckDB file that is not a
    benchmark database (none of the schema's tables, or one lacking its id or
    reference columns).
    """
    return _read_legacy(Path(path), _inspect)


def validate_legacy(path: Path) -> None:
    """Check, reading only, that `path` is a benchmark database of the original schema.

    Cheaper than `inspect_legacy` (no digests); raises the same errors.
    """
    _read_legacy(Path(path), lambda conn, p: _schema_columns(conn, p, _table_names(conn, p)))


def _read_legacy(
    path: Path, read: Callable[[duckdb.DuckDBPyConnection, Path], _T]
) -> _T:
    """`read(conn, path)` on a read-only connection to the file; DuckDB errors while
    reading become `CorruptLegacyFile`."""
    conn = open_legacy(path)
    try:
        try:
            return read(conn, path)
        except duckdb.Error as e:
            raise CorruptLegacyFile(
                path, f"reading it failed ({e}); restore it from a backup and retry"
            ) from None
    finally:
        conn.close()


def _table_names(conn: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """The file's tables; `UnknownSchema` when none is one of the schema's."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' ORDER BY table_name"
        ).fetchall()
    ]
    if not any(t in names for t in schema.TABLES):
        listed = ", ".join(names) if names else "no tables at all"
        raise UnknownSchema(
            path,
            f"a DuckDB database, but not a benchmark database (it has "
            f"{listed}; expected {', '.join(schema.TABLES)})",
        )
    return names


def _schema_columns(
    conn: duckdb.DuckDBPyConnection, path: Path, names: list[str]
) -> dict[str, tuple[tuple[str, str], ...]]:
    """Each table's (column, type) pairs; `UnknownSchema` when a schema table lacks
    its key, reference or merge columns."""
    out = {}
    for name in names:
        columns = tuple(
            (str(c), str(t))
            for c, t in conn.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
                "current_database() AND schema_name = 'main' AND table_name = ? "
                "ORDER BY column_index",
                [name],
            ).fetchall()
        )
        if name in schema.TABLES:
            required = {
                schema.PRIMARY_KEYS[name],
                *FOREIGN_KEYS.get(name, {}),
                *MERGE_KEYS.get(name, ()),
            }
            missing = sorted(required - {c for c, _ in columns})
            if missing:
                raise UnknownSchema(
                    path,
                    f"table {name} lacks column(s) {', '.join(missing)}: not "
                    "the benchmark database schema, so its rows cannot be mapped",
                )
        out[name] = columns
    return out


def _inspect(conn: duckdb.DuckDBPyConnection, path: Path) -> LegacyFile:
    names = _table_names(conn, path)
    all_columns = _schema_columns(conn, path, names)
    pks: dict[str, str] = {}
    for table, cols in conn.execute(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
        "WHERE database_name = current_database() AND constraint_type = 'PRIMARY KEY'"
    ).fetchall():
        if len(cols) == 1:
            pks[table] = cols[0]
    tables: dict[str, LegacyTable] = {}
    for name, columns in all_columns.items():
        rows, checksum = conn.execute(
            f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM {ident(name)} t"
        ).fetchall()[0]
        pk = schema.PRIMARY_KEYS.get(name, pks.get(name))
        tables[name] = LegacyTable(name, columns, int(rows), int(checksum), pk)
    views = {
        str(n): str(sql)
        for n, sql in conn.execute(
            "SELECT view_name, sql FROM duckdb_views() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND NOT internal ORDER BY view_name"
        ).fetchall()
    }
    digest = hashlib.sha256()
    for t in sorted(tables.values(), key=lambda t: t.name):
        digest.update(json.dumps([t.name, t.columns, t.rows, t.checksum]).encode())
    digest.update(json.dumps(sorted(views.items())).encode())
    return LegacyFile(
        path=path,
        file_sha256=file_sha256(path),
        tables=tables,
        views=views,
        source=digest.hexdigest()[:32],
    )


# ---- backup ---------------------------------------------------------------------------------


def backup_file(path: Path, directory: Path | None = None) -> Path:
    """Copy `path` (and its .wal) to `<directory>/<name>.pre-benchsync-backup`,
    `directory` defaulting to the file's own; returns the backup's path.

    An identical existing backup is reused; a different one is kept and the new
    copy gets a numbered name (`.1`, `.2`, ...), so no backup is ever overwritten.
    Callers validate the file first (`validate_legacy`): only a benchmark
    database is ever copied.
    """
    if directory is None:
        directory = path.parent
    else:
        directory.mkdir(parents=True, exist_ok=True)
    base = directory / (path.name + BACKUP_SUFFIX)
    dest = base
    n = 0
    while dest.exists():
        if filecmp.cmp(path, dest, shallow=False):
            return dest
        n += 1
        dest = base.with_name(f"{base.name}.{n}")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copy2(path, tmp)
    os.replace(tmp, dest)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        shutil.copy2(wal, dest.with_name(dest.name + ".wal"))
    return dest


# ---- the import job (runs on the writer thread, inside one transaction) ----------------------


def _column_types(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return {
        str(c): str(t)
        for c, t in conn.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
            "current_database() AND schema_name = 'main' AND table_name = ?",
            [table],
        ).fetchall()
    }


def _convert(expr: str, src_type: str, dst_type: str) -> str:
    """SQL turning a legacy value into the node column's type.

    JSON stored as text is kept when it parses; text that is not JSON becomes a
    JSON string holding that text, so nothing is lost.
    """
    if src_type == dst_type:
        return expr
    if dst_type == "JSON":
        return (
            f"CASE WHEN {expr} IS NULL THEN NULL ELSE coalesce(try_cast({expr} AS JSON), "
            f"to_json({expr}::VARCHAR)) END"
        )
    return f"CAST({expr} AS {dst_type})"


def _id_map(source: str, table: str) -> str:
    return (
        f"(SELECT source_id, new_id FROM {ROWS_TABLE} WHERE source = {literal(source)} "
        f"AND source_table = {literal(table)})"
    )


def _scalar(conn: duckdb.DuckDBPyConnection, sql: str) -> int:
    rows = conn.execute(sql).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


class _Importer:
    """Imports one attached legacy file; every method runs inside the writer's transaction."""

    def __init__(
        self, conn: duckdb.DuckDBPyConnection, legacy: LegacyFile, verify: bool, progress: Progress
    ) -> None:
        self.conn = conn
        self.legacy = legacy
        self.verify = verify
        self.progress = progress
        self.src = legacy.source
        self.warnings: list[str] = []

    def sql(self, statement: str) -> int:
        return _scalar(self.conn, statement)

    def ltable(self, table: str) -> str:
        return f"{ATTACH_ALIAS}.main.{ident(table)}"

    # -- checks of the file's own consistency --
    def check_ids(self, table: str) -> None:
        # sql: ltable() quotes with ident(); the rest is ident()/literal() or a constant.
        pk = schema.PRIMARY_KEYS[table]
        rows = self.conn.execute(
            f"SELECT {ident(pk)}, count(*) FROM {self.ltable(table)} GROUP BY 1 "
            f"HAVING count(*) > 1 OR {ident(pk)} IS NULL ORDER BY 1 LIMIT {MAX_EXAMPLES}"
        ).fetchall()
        if rows:
            shown = ", ".join(f"{pk}={r[0]} ({r[1]} rows)" for r in rows)
            raise InconsistentLegacyData(
                self.legacy.path,
                f"table {table} has duplicate or NULL ids ({shown}); other tables "
                "refer to it by id, so the references would be ambiguous. Fix the file and retry",
            )

    def check_references(self, table: str, refs: dict[str, str]) -> None:
        # sql: ltable() quotes with ident(); the rest is ident()/literal() or a constant.
        for col, target in refs.items():
            tpk = schema.PRIMARY_KEYS[target]
            rows = self.conn.execute(
                f"SELECT DISTINCT s.{ident(col)} FROM {self.ltable(table)} s "
                f"WHERE s.{ident(col)} IS NOT NULL AND NOT EXISTS "
                f"(SELECT 1 FROM {self.ltable(target)} r WHERE r.{ident(tpk)} = s.{ident(col)}) "
                f"ORDER BY 1 LIMIT {MAX_EXAMPLES}"
            ).fetchall()
            if rows:
                shown = ", ".join(str(r[0]) for r in rows)
                raise InconsistentLegacyData(
                    self.legacy.path,
                    f"{table}.{col} refers to rows of {target} that do not exist "
                    f"({col} = {shown}); add the missing {target} rows or set those references "
                    "to NULL in the file, then retry",
                )

    # -- column handling --
    def prepare_columns(self, table: str, ltab: LegacyTable) -> dict[str, str]:
        """Node column types, after adding any column the file has and the node lacks."""
        types = _column_types(self.conn, table)
        # sql: `typ` is a type name DuckDB itself printed for the file's column (a type, not
        # text a user typed); names are quoted with ident().
        for col, typ in ltab.columns:
            if col not in types:
                self.conn.execute(f"ALTER TABLE {ident(table)} ADD COLUMN {ident(col)} {typ}")
                types[col] = typ
                self.warnings.append(
                    f"added column {table}.{col} ({typ}), which the file has "
                    "and benchsync's schema does not"
                )
        return types

    def value_exprs(
        self, ltab: LegacyTable, types: dict[str, str], skip: Iterable[str], refs: dict[str, str]
    ) -> tuple[list[str], list[str], str]:
        """(node columns, source expressions, joins) for a table's non-key columns."""
        cols, exprs, joins = [], [], []
        skip = set(skip)
        src_types = dict(ltab.columns)
        for i, col in enumerate(ltab.column_names):
            if col in skip:
                continue
            cols.append(col)
            if col in refs:
                alias = f"m{i}"
                joins.append(
                    f"LEFT JOIN {_id_map(self.src, refs[col])} {alias} "
                    f"ON {alias}.source_id = s.{ident(col)}"
                )
                exprs.append(_convert(f"{alias}.new_id", "BIGINT", types[col]))
            else:
                exprs.append(_convert(f"s.{ident(col)}", src_types[col], types[col]))
        return cols, exprs, " ".join(joins)

    # -- tables of the schema --
    def import_merged(self, table: str) -> TableReport:
        # sql: every fragment below (ltable, key/column lists, exprs, joins) is composed of
        # ident()/literal() of schema or file names, and numbers DuckDB computed.
        ltab = self.legacy.tables[table]
        pk = schema.PRIMARY_KEYS[table]
        keys = MERGE_KEYS[table]
        types = self.prepare_columns(table, ltab)
        key_cols = ", ".join(ident(k) for k in keys)
        match = lambda a, b: " AND ".join(  # noqa: E731
            f"{a}.{ident(k)} IS NOT DISTINCT FROM {b}.{ident(k)}" for k in keys
        )
        base = self.sql(f"SELECT coalesce(max({ident(pk)}), 0) + 1 FROM {ident(table)}")
        self.conn.execute(f"""
            INSERT INTO {ROWS_TABLE}
            WITH s AS (SELECT {ident(pk)} AS sid, {key_cols}, rowid AS rid,
                              row_number() OVER (PARTITION BY {key_cols}
                                                 ORDER BY {ident(pk)}, rowid) AS dup
                       FROM {self.ltable(table)}),
                 ex AS (SELECT {key_cols}, min({ident(pk)}) AS id FROM {ident(table)} GROUP BY ALL),
                 fresh AS (SELECT s.*, {base} + row_number() OVER (ORDER BY sid, rid) - 1 AS new_id
                           FROM s WHERE dup = 1
                           AND NOT EXISTS (SELECT 1 FROM ex WHERE {match("ex", "s")}))
            SELECT {literal(self.src)}, {literal(table)}, s.sid, NULL, {literal(table)},
                   coalesce(ex.id, f.new_id), NOT (s.dup = 1 AND ex.id IS NULL)
            FROM s LEFT JOIN ex ON {match("ex", "s")} LEFT JOIN fresh f ON {match("f", "s")}""")
        cols, exprs, _ = self.value_exprs(ltab, types, [pk], {})
        new_rows = self.sql(f"""
            INSERT INTO {ident(table)} ({ident(pk)}, {", ".join(map(ident, cols))})
            SELECT p.new_id, {", ".join(exprs)} FROM {self.ltable(table)} s
            JOIN {ROWS_TABLE} p ON p.source = {literal(self.src)}
                 AND p.source_table = {literal(table)} AND p.source_id = s.{ident(pk)}
                 AND NOT p.merged
            ORDER BY p.new_id""")
        report = TableReport(table, ltab.rows, new_rows)
        if self.verify:
            # Merged rows are checked on their key (the node's row keeps its own other values);
            # rows this file added are checked on every column.
            key_src = ", ".join(f"s.{ident(k)}" for k in keys)
            key_node = ", ".join(f"n.{ident(k)}" for k in keys)
            src = self.conn.execute(f"""
                SELECT count(*), coalesce(sum(hash(s.{ident(pk)}, {key_src})::HUGEINT), 0)
                     + coalesce(sum(hash(s.{ident(pk)}, {", ".join(exprs)})::HUGEINT)
                                FILTER (WHERE NOT p.merged), 0)
                FROM {self.ltable(table)} s JOIN {ROWS_TABLE} p
                     ON p.source = {literal(self.src)} AND p.source_table = {literal(table)}
                     AND p.source_id = s.{ident(pk)}""").fetchall()[
                0
            ]
            node_vals = ", ".join(f"n.{ident(c)}" for c in cols)
            node = self.conn.execute(f"""
                SELECT count(*), coalesce(sum(hash(p.source_id, {key_node})::HUGEINT), 0)
                     + coalesce(sum(hash(p.source_id, {node_vals})::HUGEINT)
                                FILTER (WHERE NOT p.merged), 0)
                FROM {ROWS_TABLE} p JOIN {ident(table)} n ON n.{ident(pk)} = p.new_id
                WHERE p.source = {literal(self.src)}
                      AND p.source_table = {literal(table)}""").fetchall()[
                0
            ]
            report.verified = self.compare(table, ltab.rows, src, node)
        return report

    def import_plain(self, table: str) -> TableReport:
        # sql: every fragment below (ltable, key/column lists, exprs, joins) is composed of
        # ident()/literal() of schema or file names, and numbers DuckDB computed.
        ltab = self.legacy.tables[table]
        pk = schema.PRIMARY_KEYS[table]
        parent = PARENT_COLUMNS.get(table)
        refs = {c: t for c, t in FOREIGN_KEYS.get(table, {}).items() if t in self.legacy.tables}
        missing_targets = [
            c for c, t in FOREIGN_KEYS.get(table, {}).items() if t not in self.legacy.tables
        ]
        for col in missing_targets:
            n = self.sql(f"SELECT count({ident(col)}) FROM {self.ltable(table)}")
            if n:
                raise InconsistentLegacyData(
                    self.legacy.path,
                    f"{table}.{col} is set in {n} row(s) but the file has no "
                    f"{FOREIGN_KEYS[table][col]} table to resolve it",
                )
        self.check_references(table, refs)
        types = self.prepare_columns(table, ltab)
        base = self.sql(f"SELECT coalesce(max({ident(pk)}), 0) + 1 FROM {ident(table)}")
        order = ", ".join(
            ([f"s.{ident(parent)}"] if parent else []) + [f"s.{ident(pk)}", "s.rowid"]
        )
        new_id = f"{base} + row_number() OVER (ORDER BY {order}) - 1"
        parent_expr = f"s.{ident(parent)}" if parent else "NULL"
        # The same deterministic numbering in both statements pairs each row with its provenance.
        self.conn.execute(f"""
            INSERT INTO {ROWS_TABLE}
            SELECT {literal(self.src)}, {literal(table)}, s.{ident(pk)}, {parent_expr},
                   {literal(table)}, {new_id}, false
            FROM {self.ltable(table)} s""")
        cols, exprs, joins = self.value_exprs(ltab, types, [pk], refs)
        new_rows = self.sql(f"""
            INSERT INTO {ident(table)} ({ident(pk)}, {", ".join(map(ident, cols))})
            SELECT {_convert(new_id, "BIGINT", types[pk])}, {", ".join(exprs)}
            FROM {self.ltable(table)} s {joins}""")
        report = TableReport(table, ltab.rows, new_rows)
        if self.verify:
            # Compared in the file's id space for the row itself (via provenance) and in the
            # node's for references: a lost, duplicated or colliding row changes count or sum.
            src = self.conn.execute(f"""
                SELECT count(*), coalesce(sum(hash(s.{ident(pk)}, {parent_expr}, {", ".join(exprs)})
                                              ::HUGEINT), 0)
                FROM {self.ltable(table)} s {joins}""").fetchall()[0]
            node_vals = ", ".join(f"n.{ident(c)}" for c in cols)
            node = self.conn.execute(f"""
                SELECT count(*), coalesce(sum(hash(p.source_id, p.source_parent_id, {node_vals})
                                              ::HUGEINT), 0)
                FROM {ROWS_TABLE} p JOIN {ident(table)} n ON n.{ident(pk)} = p.new_id
                WHERE p.source = {literal(self.src)}
                      AND p.source_table = {literal(table)}""").fetchall()[
                0
            ]
            report.verified = self.compare(table, ltab.rows, src, node)
        return report

    # -- tables the schema does not know --
    def import_carried(self, table: str) -> TableReport:
        # sql: every fragment below (ltable, key/column lists, exprs, joins) is composed of
        # ident()/literal() of schema or file names, and numbers DuckDB computed.
        ltab = self.legacy.tables[table]
        exists = self.sql(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            f"AND schema_name = 'main' AND table_name = {literal(table)}"
        )
        if not exists:
            # No constraints: rows of several files share this table and their own ids may repeat.
            self.conn.execute(
                f"CREATE TABLE {ident(table)} AS SELECT * FROM {self.ltable(table)} LIMIT 0"
            )
        refs = {
            c: t
            for c, t in CARRIED_REFERENCES.items()
            if c in ltab.column_names and c != ltab.primary_key and t in self.legacy.tables
        }
        self.check_references(table, refs)
        types = self.prepare_columns(table, ltab)
        cols, exprs, joins = self.value_exprs(ltab, types, [], refs)
        node_hash = (
            f"SELECT count(*), coalesce(sum(hash({', '.join(ident(c) for c in cols)})"
            f"::HUGEINT), 0) FROM {ident(table)}"
        )
        before = self.conn.execute(node_hash).fetchall()[0] if self.verify else (0, 0)
        new_rows = self.sql(
            f"INSERT INTO {ident(table)} ({', '.join(map(ident, cols))}) "
            f"SELECT {', '.join(exprs)} FROM {self.ltable(table)} s {joins}"
        )
        report = TableReport(table, ltab.rows, new_rows, carried=True)
        if self.verify:
            # Shared table, no provenance per row: the order-independent sum is additive, so
            # what this file added is the difference.
            after = self.conn.execute(node_hash).fetchall()[0]
            src = self.conn.execute(
                f"SELECT count(*), coalesce(sum(hash({', '.join(exprs)})"
                f"::HUGEINT), 0) FROM {self.ltable(table)} s {joins}"
            ).fetchall()[0]
            delta = (after[0] - before[0], after[1] - before[1])
            report.verified = self.compare(table, ltab.rows, src, delta)
        return report

    def compare(
        self, table: str, expected_rows: int, src: Sequence[Any], node: Sequence[Any]
    ) -> bool:
        if int(src[0]) != expected_rows or int(node[0]) != expected_rows:
            raise VerificationFailed(
                self.legacy.path,
                f"table {table}: {expected_rows} rows in the file, "
                f"{int(node[0])} imported; the import was rolled back",
            )
        if int(src[1]) != int(node[1]):
            raise VerificationFailed(
                self.legacy.path,
                f"table {table}: the imported rows' checksum differs from the "
                "file's; the import was rolled back",
            )
        return True

    def import_views(self) -> list[str]:
        existing = {
            str(n): str(s)
            for n, s in self.conn.execute(
                "SELECT view_name, sql FROM duckdb_views() "
                "WHERE database_name = current_database() "
                "AND schema_name = 'main' AND NOT internal"
            ).fetchall()
        }
        created = []
        for name, sql in self.legacy.views.items():
            if name in existing:
                if existing[name] != sql:
                    self.warnings.append(
                        f"view {name} already exists with another definition; kept the existing one"
                    )
                continue
            try:
                self.conn.execute(sql)
            except duckdb.Error as e:
                raise InconsistentLegacyData(
                    self.legacy.path,
                    f"view {name} cannot be recreated over the node's tables ({e})",
                ) from None
            created.append(name)
        return created

    def run(self) -> tuple[list[TableReport], list[str]] | None:
        """Import everything; None if this file was migrated before."""
        conn = self.conn
        sources_exist = self.sql(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            f"AND schema_name = 'main' AND table_name = {literal(SOURCES_TABLE)}"
        )
        if sources_exist and self.sql(
            f"SELECT count(*) FROM {SOURCES_TABLE} WHERE source = {literal(self.src)} "
            f"OR file_sha256 = {literal(self.legacy.file_sha256)}"
        ):
            return None
        for ddl in _PROVENANCE_DDL:
            conn.execute(ddl)
        conn.execute(f"ATTACH {literal(str(self.legacy.path))} AS {ATTACH_ALIAS} (READ_ONLY)")
        for table in self.legacy.known_tables:
            if table in REFERENCED_TABLES:
                self.check_ids(table)
        reports = []
        for table in self.legacy.known_tables:
            self.progress(f"{table}: importing {self.legacy.tables[table].rows} rows")
            if table in MERGE_KEYS:
                reports.append(self.import_merged(table))
            else:
                reports.append(self.import_plain(table))
        for table in self.legacy.carried_tables:
            self.progress(f"{table}: carrying over {self.legacy.tables[table].rows} rows")
            reports.append(self.import_carried(table))
        views = self.import_views()
        summary = {r.name: r.rows for r in reports}
        conn.execute(
            f"INSERT INTO {SOURCES_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                self.src,
                self.legacy.file_sha256,
                str(self.legacy.path),
                datetime.now(UTC).replace(tzinfo=None),
                sum(summary.values()),
                json.dumps(summary),
                True if self.verify else None,
            ],
        )
        conn.execute(f"DETACH {ATTACH_ALIAS}")
        return reports, views


# ---- the public API -------------------------------------------------------------------------


def _quiet(_: str) -> None:
    pass


def _prefixed(say: Progress, prefix: str) -> Progress:
    return lambda message: say(f"  {prefix}: {message}")


def migrate_file(
    dataset: LocalDataset,
    path: str | Path,
    *,
    backup: bool = True,
    backup_beside: bool = False,
    verify: bool = True,
    snapshot: bool = True,
    progress: Progress | None = None,
) -> MigrationResult:
    """Migrate one legacy file into `dataset`; never raises for a bad file.

    Returns a `MigrationResult`: status "migrated" (with per-table reports and,
    when `snapshot`, the CID of the snapshot taken after it), "already-migrated"
    (nothing imported), or "failed" (with `error`/`error_type`; the node's
    database is unchanged).
    """
    return migrate_files(
        dataset, [path], backup=backup, backup_beside=backup_beside, verify=verify,
        snapshot=snapshot, progress=progress,
    )[0]  # fmt: skip


def migrate_files(
    dataset: LocalDataset,
    paths: Sequence[str | Path],
    *,
    backup: bool = True,
    backup_beside: bool = False,
    verify: bool = True,
    snapshot: bool = True,
    progress: Progress | None = None,
) -> list[MigrationResult]:
    """Migrate each file in its own transaction; one result per file, in order.

    Each file is validated before anything is written; with `backup`, a valid
    file is then copied into `<home>/backups/` (beside the file itself only with
    `backup_beside`, for callers whose user named the file). A failing file is
    rolled back and reported; the others go on. When `snapshot`, one snapshot
    is taken after the batch and its CID is set on every result that did not fail.
    """
    say = progress or _quiet
    backup_dir = None if backup_beside else dataset.home / BACKUP_DIR
    results = []
    for i, p in enumerate(paths, 1):
        path = Path(p)
        say(f"[{i}/{len(paths)}] {path}")
        results.append(
            _migrate_one(dataset, path, backup, backup_dir, verify, _prefixed(say, path.name))
        )
    if snapshot and any(r.ok for r in results):
        say("snapshotting the dataset")
        cid = dataset.snapshot().version.cid
        for r in results:
            if r.ok:
                r.cid = cid
    return results


def _failed(result: MigrationResult, e: Exception) -> MigrationResult:
    result.status = "failed"
    result.error = str(e)
    result.error_type = type(e).__name__
    return result


def _migrate_one(
    dataset: LocalDataset,
    path: Path,
    backup: bool,
    backup_dir: Path | None,
    verify: bool,
    say: Progress,
) -> MigrationResult:
    started = time.perf_counter()
    result = MigrationResult(path=path, status="failed")
    try:
        try:
            legacy = inspect_legacy(path)  # validates before anything is written
            if backup:
                result.backup = backup_file(path, backup_dir)
                say(f"backed up to {result.backup}")
            result.source, result.file_sha256 = legacy.source, legacy.file_sha256
            say(f"{len(legacy.tables)} tables, {sum(t.rows for t in legacy.tables.values())} rows")

            def job(conn: duckdb.DuckDBPyConnection) -> Any:
                importer = _Importer(conn, legacy, verify, say)
                out = importer.run()
                return out, importer.warnings

            try:
                outcome, warnings = dataset.db.write(job)
            except MigrationError:
                raise
            except duckdb.Error as e:
                err = _classify_open_error(path, e)
                if isinstance(err, CorruptLegacyFile) and "corrupt" not in str(e).lower():
                    err = MigrationError(
                        path,
                        f"importing failed ({e}); nothing was imported. "
                        "Report this with the file if it persists",
                    )
                raise err from None
        except (MigrationError, OSError) as e:
            say(f"failed: {e}")
            return _failed(result, e)
        result.warnings = warnings
        if outcome is None:
            result.status = "already-migrated"
            say("already migrated (same content); nothing imported")
        else:
            result.tables, result.views = outcome
            result.status = "migrated"
            result.verified = True if verify else None
            say(f"imported {result.rows} rows" + (", verified" if verify else ""))
        return result
    finally:
        result.seconds = time.perf_counter() - started


def snapshot_legacy(
    dataset: LocalDataset, path: str | Path, *, progress: Progress | None = None
) -> MigrationResult:
    """Make a standalone content-addressed snapshot of a legacy file, without importing it.

    The blocks go into the dataset's blockstore (and the root is pinned, so
    `gc` keeps it and `export` can serve it); the sidecar `.{db}.ipfs.json` is
    written beside the file. The node's database and history are untouched.
    Returns a result with status "snapshot" and `cid`, or "failed".
    """
    say = progress or _quiet
    path = Path(path)
    started = time.perf_counter()
    result = MigrationResult(path=path, status="failed")
    try:
        legacy = inspect_legacy(path)
        result.source, result.file_sha256 = legacy.source, legacy.file_sha256
        result.tables = [
            TableReport(t.name, t.rows, 0, carried=t.name not in schema.TABLES)
            for t in legacy.tables.values()
        ]
        conn = open_legacy(path)
        try:
            with tempfile.TemporaryDirectory(dir=dataset.tmp) as work:
                store = SnapshotStore(
                    Path(work) / "state", dataset.blocks, f"legacy-{legacy.source}"
                )
                snap = store.snapshot(conn, tmp_dir=Path(work))
        finally:
            conn.close()
        version = snap.version
        dataset.pin(version.cid)
        result.sidecar = write_sidecar(path, version)
        result.cid = version.cid
        result.status = "snapshot"
        say(f"{path.name}: snapshot {version.cid}")
    except (MigrationError, StorageError, OSError) as e:
        _failed(result, e)
    except duckdb.Error as e:
        _failed(result, CorruptLegacyFile(path, f"exporting failed ({e})"))
    result.seconds = time.perf_counter() - started
    return result
