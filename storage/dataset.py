"""A node's own dataset on disk: the database, its blocks, history and replicas.

`LocalDataset` is the one object the CLI (offline) and the daemon (online)
open on a data directory. It owns the layout::

    <home>/benchsync.duckdb          the live database (single writer)
    <home>/.benchsync.duckdb.ipfs.json  sidecar: current snapshot CID, time, size
    <home>/blocks/                   content-addressed blocks (own and peers')
    <home>/snapshots/HEAD.json       the head of the version history
    <home>/snapshots/pins.json       pinned roots (`pin add`, imported CARs): kept forever
    <home>/snapshots/tags.json       tag name -> version (kept forever, `restore NAME`)
    <home>/snapshots/thinned.json    versions whose tables retention gave up (`retention`)
    <home>/replicas/<peer>/          installed replicas
    <home>/tmp/                      scratch space for exports and restores
    <home>/benchsync.lock            held by the one process that writes the home

and the operations that span them: snapshot, restore (atomic file swap),
CAR export/import, pins and tags, maintenance (history thinning, replica
expiry, block GC, disk accounting) and queries in the local and replicas
scopes.

Block GC never runs beside anything that writes blocks it needs kept: the
snapshot, restore, CAR import, replica install, pin and tag changes and
`maintain` hold one lock (`_blocks_lock`). Database writes and queries never
take it.

One process at a time writes a home: opening the database for writing (or
opening the dataset `exclusive`, as a node does) takes the home lock, and a
second writer gets `HomeInUse` naming the holder's pid. Reading history and
blocks, exporting and importing CARs take no lock and work beside a node.
Whoever takes the lock first removes what a crashed writer left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import duckdb
import pyarrow as pa
from multiformats import CID

from benchsync.storage import car, distquery, retention, rowdigest, segments, unixfs
from benchsync.storage.blockstore import TEMP_GRACE, FsBlockstore, block_key
from benchsync.storage.cid import parse_cid_text
from benchsync.storage.db import CHANGES_TABLE, DB_FILENAME, BenchmarkDB, DatabaseClosed
from benchsync.storage.errors import NotFound, StorageError
from benchsync.storage.homelock import HomeLock
from benchsync.storage.limits import QUERY_MEMORY_LIMIT
from benchsync.storage.replica_files import ReplicaPlacement
from benchsync.storage.replicas import LOSSLESS_WIDENING, ReplicaStore, check_parquet_schema
from benchsync.storage.sandbox import QueryError, QueryLimits, run_once
from benchsync.storage.schema import PRIMARY_KEYS, TABLES, VERSION_TABLE
from benchsync.storage.scopes import ReplicaTables, ScopeInput, scope_tables
from benchsync.storage.snapshot import (
    DIGEST_BATCH_ROWS,
    BadSnapshot,
    DiskFull,
    SnapshotError,
    SnapshotResult,
    SnapshotStore,
    Version,
    atomic_write,
    dag_blocks,
    fsync_dir,
    materialize_tables,
    missing_blocks,
    parquet_digest,
    read_version,
)
from benchsync.storage.sqlnames import check_table_name, ident

SCOPES = ("local", "replicas")
# DuckDB's default is 80 % of RAM; a node shares its machine with the benchmarks it records.
# Capped, big sorts spill to disk instead of growing with the database; a snapshot lowers
# it further while it runs (snapshot.SNAPSHOT_MEMORY_LIMIT), as it exports a segment at a time.
DEFAULT_DB_MEMORY_LIMIT = "1GiB"
# Scratch files a writer makes and removes; found while holding the home lock, they are
# a crashed writer's leftovers (snapshot exports, restore work, staged restore databases).
LEFTOVER_PATTERNS = (
    "tmp/snapshot-*", "tmp/restore-*", ".restore-*.duckdb", ".restore-*.duckdb.wal",
)
_FLAG = "__benchsync_segment_end"  # the boundary flag column of a restore's digest query
DATA_DIR_MODE = 0o700  # the database, blocks and identity are nobody else's business

T = TypeVar("T")


class RestoreError(SnapshotError):
    """A restore failed; the live database is unchanged."""


class CarImportError(StorageError):
    """A CAR import failed; nothing was made available."""


def sidecar_path(db_path: Path) -> Path:
    """Where the sidecar metadata of a standalone database lives (`.{db}.ipfs.json`)."""
    return db_path.with_name(f".{db_path.name}.ipfs.json")


def write_sidecar(db_path: Path, version: Version) -> Path:
    """Record the current snapshot beside the database, for tools that only see the file."""
    path = sidecar_path(db_path)
    doc = {
        "cid": version.cid,
        "tables_cid": version.tables_cid,
        "seq": version.seq,
        "created_at": version.created_at,
        "snapshot_bytes": version.manifest.total_bytes,
        "db_size": db_path.stat().st_size if db_path.exists() else 0,
        "dataset": version.manifest.dataset,
    }
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
    return path


@dataclass(frozen=True)
class DiskUsage:
    """Where a home's bytes are (`status`, `/metrics`, the disk budget)."""

    database_bytes: int  # the live database file (and its write-ahead log)
    history_bytes: int  # blocks of the own history: kept versions, thinned manifests
    replica_bytes: int  # replicas' Parquet files and the blocks only they reference
    other_bytes: int  # other blocks: pins of foreign DAGs, fetches in flight
    blocks_bytes: int  # the whole blockstore
    free_bytes: int  # free space of the home's file system

    @property
    def total_bytes(self) -> int:
        return self.database_bytes + self.history_bytes + self.replica_bytes + self.other_bytes

    def to_json(self) -> dict[str, int]:
        return {
            "database_bytes": self.database_bytes, "history_bytes": self.history_bytes,
            "replica_bytes": self.replica_bytes, "other_bytes": self.other_bytes,
            "blocks_bytes": self.blocks_bytes, "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
        }  # fmt: skip


@dataclass(frozen=True)
class MaintenanceReport:
    """What one `LocalDataset.maintain` pass did and found."""

    versions: int  # in the history
    kept: int  # versions that keep their tables (restorable)
    thinned_now: int  # versions thinned by this pass
    thinned: int  # thinned versions in all
    removed_blocks: int
    freed_bytes: int
    expired_replicas: list[str]
    usage: DiskUsage
    budget: int | None  # bytes; None: no budget
    over_budget: bool  # thinned to the minimum and still above the budget
    finished_at: float  # seconds since the epoch
    seconds: float  # how long the pass took

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": self.versions, "kept": self.kept, "thinned_now": self.thinned_now,
            "thinned": self.thinned, "removed_blocks": self.removed_blocks,
            "freed_bytes": self.freed_bytes, "expired_replicas": self.expired_replicas,
            "usage": self.usage.to_json(), "budget": self.budget,
            "over_budget": self.over_budget, "finished_at": self.finished_at,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


@dataclass
class ImportResult:
    roots: list[str]
    blocks: int = 0
    new_blocks: int = 0
    new_bytes: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return self.new_blocks == 0


class LocalDataset:
    """A data directory opened for use. Close it (or use it as a context manager)."""

    def __init__(
        self,
        home: Path,
        dataset: str,
        *,
        read_only: bool = False,
        memory_limit: str | None = DEFAULT_DB_MEMORY_LIMIT,
        exclusive: bool = False,
    ) -> None:
        """Open the data directory `home` (created, mode 0700, if missing).

        `exclusive` takes the home lock now and keeps it until `close()` (a
        node); otherwise it is taken when the database is first opened for
        writing. Raises `HomeInUse` when another process holds it.
        """
        self.home = Path(home)
        self.dataset = dataset
        self.home.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
        self.tmp = self.home / "tmp"
        self.tmp.mkdir(mode=DATA_DIR_MODE, exist_ok=True)
        self.db_path = self.home / DB_FILENAME
        self.read_only = read_only
        self.memory_limit = memory_limit
        self._db: BenchmarkDB | None = None
        self._closed = False
        self._swap_lock = threading.RLock()  # held while a restore swaps the database file
        # Held by whatever writes blocks that must survive GC, and by GC (module docstring).
        self._blocks_lock = threading.RLock()
        self.lock = HomeLock(self.home)
        if exclusive:
            self._take_lock()
        # Listeners of committed writes (rows written). The list is shared with every
        # database object this dataset opens, so they survive a restore's swap.
        self.on_write: list[Callable[[int], None]] = []
        self.blocks = FsBlockstore(self.home / "blocks")
        self.snapshots = SnapshotStore(self.home / "snapshots", self.blocks, dataset)
        self.replicas = ReplicaStore(self.home / "replicas", self.blocks)

    @property
    def db(self) -> BenchmarkDB:
        """The database, opened on first use: CAR export/import and history never need it,
        so they work beside a running node that holds the database's write lock.

        Raises `HomeInUse` (another process writes this home), `DatabaseDamaged`,
        `DatabaseClosed` after `close()`.
        """
        with self._swap_lock:  # never (re)open the file halfway through a restore's swap
            if self._closed:
                raise DatabaseClosed(f"{self.db_path} is closed")
            if self._db is None:
                if not self.read_only:
                    self._take_lock()
                self._db = BenchmarkDB(
                    self.db_path, read_only=self.read_only, memory_limit=self.memory_limit
                )
                self._db.on_write = self.on_write
            return self._db

    def writing(self, fn: Callable[[BenchmarkDB], T]) -> T:
        """Run the write `fn(db)`; if a restore swaps the file meanwhile, run it on the new one.

        A write refused with DatabaseClosed was never queued, so running it
        again writes it once. Waits (on `db`) while a restore holds the swap.
        """
        while True:
            db = self.db
            try:
                return fn(db)
            except DatabaseClosed:
                with self._swap_lock:
                    if self._closed or self._db is db:
                        raise  # closed for good, not replaced

    def check(self) -> None:
        """Open the database and check it is readable; raises DatabaseDamaged if not."""
        self.db.check()

    def _take_lock(self) -> None:
        if self.lock.held:
            return
        self.lock.acquire()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete what a crashed writer left (we hold the lock: nobody else is writing)."""
        for pattern in LEFTOVER_PATTERNS:
            for path in self.home.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def _close_db(self) -> None:
        with self._swap_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def close(self) -> None:
        """Close the database and drop the home lock. Idempotent; later writes are refused."""
        with self._swap_lock:
            self._closed = True
            self._close_db()
            self.lock.release()

    def __enter__(self) -> LocalDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # snapshots and history -------------------------------------------------------
    def snapshot(self) -> SnapshotResult:
        """Take a snapshot (or return the head if nothing changed) and update the sidecar.

        Raises DiskFull (nothing was made current; retry once there is space)
        or SnapshotError.
        """
        return self._snapshot(self.db)

    def _snapshot(self, db: BenchmarkDB) -> SnapshotResult:
        with self._blocks_lock:  # its blocks are referenced by nothing until the head moves
            return self._snapshot_locked(db)

    def _snapshot_locked(self, db: BenchmarkDB) -> SnapshotResult:
        try:
            with db.reader() as conn:
                # The database says what changed since the last snapshot (the export
                # then re-writes only those segments); its transaction begins with that.
                result = self.snapshots.snapshot(conn, tmp_dir=self.tmp, changes=db)
            # Also when nothing changed: an earlier snapshot may have failed to write it.
            write_sidecar(self.db_path, result.version)
        except duckdb.Error as e:  # the Parquet export (COPY) writes through DuckDB
            if _no_space(e):
                raise DiskFull(
                    f"disk full while exporting the snapshot ({e}); the database and history "
                    "are unchanged. Free some space (e.g. `benchsync gc`) and snapshot again"
                ) from e
            raise SnapshotError(f"snapshot failed: {type(e).__name__}: {e}") from e
        except OSError as e:  # the sidecar
            if _no_space(e):
                raise DiskFull(f"disk full while writing {sidecar_path(self.db_path)}: {e}") from e
            raise SnapshotError(f"snapshot failed: {e}") from e
        return result

    def head(self) -> Version | None:
        return self.snapshots.head()

    def history(self, limit: int | None = None) -> list[Version]:
        return self.snapshots.history(limit)

    def restore(self, cid: str) -> Version:
        """Make version `cid`'s content current; returns the new head (parent: the old head).

        The restored database is built and verified beside the live one (by
        meaning, not bytes: schema, row counts, row checksums and row digests
        must agree with the version's files, whichever DuckDB wrote them; see
        `_verify_built`), then swapped in with one rename: a crash at any point
        leaves either the old or the new file.

        Before the swap, writes stop (queued ones commit; later ones wait in
        `writing` and go to the restored file) and the live state is
        snapshotted, so every acknowledged write stays in the history. Raises
        RestoreError, DiskFull (that snapshot could not be taken; nothing
        changed) or NotFound.
        """
        # A write: the home lock first (taking it clears leftovers, so not after staging).
        self._take_lock()
        with self._blocks_lock:  # the target's tables must not be collected halfway
            return self._restore(cid)

    def _restore(self, cid: str) -> Version:
        target = self.find(cid)
        missing = missing_blocks(self.blocks, CID.decode(target.cid))
        if missing and target.cid in self.thinned():
            raise RestoreError(
                f"version {target.cid} was thinned by history retention: its tables were "
                "deleted, only its manifest is kept. Restore a kept version (`benchsync log` "
                "marks thinned ones); pin or tag versions to keep them forever"
            )
        if missing:
            raise RestoreError(
                f"version {target.cid} is incomplete here ({len(missing)} block(s) missing); "
                "import its CAR or fetch it from a peer first"
            )
        work = Path(tempfile.mkdtemp(prefix="restore-", dir=self.tmp))
        staged = self.home / f".restore-{os.getpid()}.duckdb"
        try:
            files = materialize_tables(self.blocks, target, work / "tables")
            self._build_database(staged, files)
            digests = self._verify_built(staged, target, files)
            # Other threads (the node's writers and queries) wait on `db` until the
            # swap is done, and then open the restored file, never the old one.
            with self._swap_lock:
                live = self.db
                live.stop_writes()
                try:
                    # Every write acknowledged so far is committed: keep it in history.
                    self._snapshot(live)
                finally:
                    self._close_db()
                wal = self.db_path.with_name(self.db_path.name + ".wal")
                if wal.exists():
                    # The live database did not checkpoint on close; swapping would pair the
                    # new file with the old write-ahead log. Refuse rather than corrupt.
                    raise RestoreError(f"{wal} still exists after closing the database")
                os.replace(staged, self.db_path)
                fsync_dir(self.home)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            with contextlib.suppress(FileNotFoundError):
                staged.with_name(staged.name + ".wal").unlink()
        version = self.snapshots.record_restore(target, digests)
        write_sidecar(self.db_path, version)
        return version

    def _build_database(self, path: Path, files: dict[str, Path]) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        staged = BenchmarkDB(path, memory_limit=self.memory_limit)
        try:

            def load(conn: duckdb.DuckDBPyConnection) -> None:
                existing = {
                    r[0]
                    for r in conn.execute(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema='main'"
                    ).fetchall()
                }
                for table, parquet in files.items():
                    # materialize_tables checked names, sizes and rows; the columns are
                    # checked here, against the tables the rows are about to land in.
                    check_parquet_schema(conn, table, parquet, extra_columns=False)
                    # sql: `name` and `src` are quoted by ident()/literal() right here.
                    name = ident(check_table_name(table))
                    src = segments.read_parquet_sql(parquet)
                    if table in existing:
                        conn.execute(f"DELETE FROM {name}")
                        conn.execute(f"INSERT INTO {name} BY NAME SELECT * FROM {src}")
                    else:
                        conn.execute(f"CREATE TABLE {name} AS SELECT * FROM {src}")
                after_load = getattr(staged, "after_bulk_load", None)
                if after_load is not None:
                    after_load(conn)

            staged.write(load)
        except duckdb.Error as e:
            raise RestoreError(
                f"the version's tables do not load into this node's schema: {e}; "
                "the live database is unchanged"
            ) from e
        finally:
            staged.close()

    def _verify_built(
        self, path: Path, target: Version, files: dict[str, Path]
    ) -> dict[str, str | None]:
        """Check the database at `path` holds exactly `target`'s rows; returns table -> row digest.

        Meaning, not bytes: the version may have been written by another DuckDB,
        whose Parquet bytes this one would not reproduce. Per table: the schema
        (every column of the file present with the same type, the table's other
        columns all NULL), the row count and an order-independent checksum of
        the rows (the sum of DuckDB's row hashes), computed over the Parquet
        file and over the restored table; then the file's row digest must equal
        the manifest's (when it has one, as every manifest since the digest
        does) and the restored table's. A table the version lacks must be
        empty. Raises RestoreError.
        """
        conn = duckdb.connect(
            str(path), read_only=True, config={"memory_limit": self.memory_limit or "80%"}
        )
        digests: dict[str, str | None] = {}
        try:
            for table, parquet in files.items():
                digests[table] = self._verify_table(conn, target, table, parquet)
            present = conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'main' AND table_type = 'BASE TABLE'"
            ).fetchall()
            for (table,) in present:
                if table in files or table in (VERSION_TABLE, CHANGES_TABLE):
                    continue
                n = _one(conn, f"SELECT count(*) FROM {ident(table)}")[0]
                if n:
                    raise _not_reproduced(
                        target, f"table {table} (not in the version) has {n} rows"
                    )
        except duckdb.Error as e:
            raise RestoreError(
                f"cannot read the restored database back to verify it: {e}; "
                "the live database is unchanged"
            ) from e
        finally:
            conn.close()
        return digests

    def _verify_table(
        self, conn: duckdb.DuckDBPyConnection, target: Version, table: str, parquet: Path
    ) -> str | None:
        """One table of `_verify_built`; returns the file's row digest."""
        # sql: name, src, cols, as_table and order are built from ident()/literal() below.
        name = ident(check_table_name(table))
        src = segments.read_parquet_sql(parquet)
        want = conn.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
        got = {r[0]: r[1] for r in conn.execute(f"DESCRIBE {name}").fetchall()}
        widened = False
        for column, typ in ((r[0], r[1]) for r in want):
            if got.get(column) != typ:
                if (typ, got.get(column)) not in LOSSLESS_WIDENING:
                    raise _not_reproduced(
                        target, f"{table}.{column} is {got.get(column)}, the version's is {typ}"
                    )
                widened = True  # a version from before a migration: compare as migrated
        columns = [r[0] for r in want]
        for column in sorted(set(got) - set(columns)):
            n = _one(conn, f"SELECT count({ident(column)}) FROM {name}")[0]
            if n:
                raise _not_reproduced(
                    target, f"{table}.{column}, absent from the version, has {n} values"
                )
        cols = ", ".join(ident(c) for c in columns)
        # The file's columns as the table's types (the same but after a widening migration).
        cast = [f"CAST({ident(c)} AS {got[c]})" for c in columns]
        as_table = ", ".join(f"{e} AS {ident(c)}" for e, c in zip(cast, columns, strict=True))
        checksum = "SELECT count(*), coalesce(sum(hash({})), 0) FROM "
        in_file = _one(conn, checksum.format(", ".join(cast)) + src)
        in_table = _one(conn, checksum.format(cols) + name)
        if in_file != in_table:
            raise _not_reproduced(
                target,
                f"{table} has {in_table[0]} rows (checksum {in_table[1]}), "
                f"the version {in_file[0]} (checksum {in_file[1]})",
            )
        claimed = target.manifest.tables[table].digest
        file_digest = parquet_digest(parquet, table)
        where = f"tables/{table}/" if parquet.is_dir() else f"tables/{table}.parquet"
        if claimed is not None and file_digest != claimed:
            raise RestoreError(
                f"version {target.cid}: {where} does not hold the rows its "
                f"manifest's digest names ({file_digest} != {claimed}); the live database "
                "is unchanged"
            )
        key = PRIMARY_KEYS.get(table)
        order = f" ORDER BY {ident(key)}" if key in columns else ""
        # A segmented version's digest (rows/2) follows the segment rule: cut the rows
        # the same way, by the boundary flag computed beside them.
        seg_key = segments.segmented_key(conn, table, key) if parquet.is_dir() else None
        flag = f", {segments.boundary_sql(seg_key)} AS {ident(_FLAG)}" if seg_key else ""
        segmented = parquet.is_dir()
        table_digest = self._digest(
            conn, f"SELECT {cols}{flag} FROM {name}{order}", key, segmented, seg_key
        )
        compare = file_digest
        if widened:
            compare = self._digest(
                conn, f"SELECT {as_table}{flag} FROM {src}{order}", key, segmented, seg_key
            )
        if None not in (compare, table_digest) and compare != table_digest:
            raise _not_reproduced(target, f"{table}'s row digest {table_digest} != {compare}")
        return file_digest

    @staticmethod
    def _digest(
        conn: duckdb.DuckDBPyConnection,
        query: str,
        key: str | None,
        segmented: bool = False,
        seg_key: str | None = None,
    ) -> str | None:
        """The row digest of what `query` returns (rows in `key` order stream).

        `segmented`: rows/2, the rows cut into segments by the `_FLAG` column
        (present when `seg_key`; else one segment), as a segmented version's.
        """
        # Each read on its own cursor: a result left unfinished blocks its connection.
        cursors: list[duckdb.DuckDBPyConnection] = []

        def batches() -> pa.RecordBatchReader:
            cursors.append(conn.cursor())
            return cursors[-1].sql(query).to_arrow_reader(DIGEST_BATCH_ROWS)

        try:
            first = [batches()]
            schema_arrow = first[0].schema
            if segmented:
                return segments.segment_digest_stream(
                    first.pop(), schema_arrow, key, _FLAG if seg_key else None
                )
            return rowdigest.table_digest(
                schema_arrow, lambda: first.pop() if first else batches(), key
            )
        finally:
            for cursor in cursors:
                cursor.close()

    # CAR export / import ----------------------------------------------------------
    def export_car(self, out: IO[bytes], cid: str | None = None) -> tuple[str, int]:
        """Write the DAG of version `cid` (default: the head) as one CAR; returns (root, bytes)."""
        root = self._export_root(cid)
        n = car.write_car(out, [root], dag_blocks(self.blocks, root))
        return str(root), n

    def export_cars(
        self,
        dest: Path,
        cid: str | None,
        max_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[Path]:
        """Split the DAG into CARs of at most `max_size` bytes each (all name the same root)."""
        root = self._export_root(cid)
        header = len(car.encode_header([root]))
        paths: list[Path] = []
        out: IO[bytes] | None = None
        written = 0
        try:
            for block_cid, data in dag_blocks(self.blocks, root):
                section = len(car.encode_section(block_cid, data))
                if header + section > max_size:
                    raise SnapshotError(
                        f"--max-size {max_size} is smaller than one block section ({section} bytes "
                        "plus the header); use at least 300000"
                    )
                if out is None or written + section > max_size:
                    if out is not None:
                        out.close()
                    path = dest.with_name(f"{dest.stem}.{len(paths):04d}{dest.suffix or '.car'}")
                    paths.append(path)
                    out = open(path, "wb")  # noqa: SIM115 - closed when the next part starts
                    out.write(car.encode_header([root]))
                    written = header
                out.write(car.encode_section(block_cid, data))
                written += section
                if progress is not None:
                    progress(section)
        finally:
            if out is not None:
                out.close()
        return paths

    def _export_root(self, cid: str | None) -> CID:
        if cid is None:
            head = self.head()
            if head is None:
                raise NotFound("nothing to export: no snapshot yet (run `benchsync snapshot`)")
            return CID.decode(head.cid)
        version = self.find(cid)
        return CID.decode(version.cid)

    def import_cars(self, streams: Iterable[tuple[str, IO[bytes]]]) -> ImportResult:
        """Import CARs: verify every block, check every root's DAG is complete, then pin the roots.

        Blocks are content-addressed, so storing verified blocks before the
        completeness check exposes nothing: a root only becomes available (pinned,
        restorable, exportable) once all of its blocks are present.
        """
        with self._blocks_lock:  # blocks unreferenced until pinned: no GC meanwhile
            return self._import_cars(streams)

    def _import_cars(self, streams: Iterable[tuple[str, IO[bytes]]]) -> ImportResult:
        result = ImportResult(roots=[])
        roots: list[CID] = []
        for name, stream in streams:
            try:
                header_roots, blocks = car.read_car(stream)
                # One filesystem sync per file instead of one fsync per block.
                with self.blocks.batch():
                    for block_cid, data in blocks:
                        result.blocks += 1
                        if self.blocks.put(block_cid, data, verify=False):  # read_car verified it
                            result.new_blocks += 1
                            result.new_bytes += len(data)
            except car.CarError as e:
                raise CarImportError(f"{name}: {e}") from e
            result.files.append(name)
            roots += [r for r in header_roots if r not in roots]
        for root in roots:
            missing = missing_blocks(self.blocks, root)
            if missing:
                raise CarImportError(
                    f"root {root} is incomplete: {len(missing)} block(s) missing "
                    f"(e.g. {missing[0]}); import the other CAR files of this export too"
                )
        self.pin(*roots)
        result.roots = [str(r) for r in roots]
        return result

    def pin(self, *roots: CID | str) -> None:
        """Keep `roots` (and every block under them) through garbage collection, forever."""
        with self._blocks_lock:
            pins = self._pins()
            for root in roots:
                pins.setdefault(str(root), time.time())
            self._save_pins(pins)

    def pin_version(self, name: str) -> str:
        """Pin a version of ours (CID, prefix or tag) or any complete DAG held here; its root.

        Raises NotFound, or RestoreError for a DAG that is incomplete here (a
        thinned version: its tables are gone).
        """
        self._take_lock()  # a write: not beside another process's collection
        with self._blocks_lock:
            root = self._complete_root(name)
            self.pin(root)
            return root

    def unpin(self, cid: str) -> bool:
        """Stop keeping `cid` forever (retention and GC decide again); False if not pinned."""
        self._take_lock()  # a write: not beside another process's collection
        with self._blocks_lock:
            pins = self._pins()
            root = cid if cid in pins else self._resolve_pinned(cid, pins)
            if root is None:
                return False
            del pins[root]
            self._save_pins(pins)
            return True

    def pins(self) -> dict[str, float]:
        """Pinned root -> when it was pinned."""
        return self._pins()

    def _resolve_pinned(self, cid: str, pins: dict[str, float]) -> str | None:
        try:
            root = self.find(cid).cid
        except (NotFound, SnapshotError):
            return None
        return root if root in pins else None

    def _complete_root(self, name: str) -> str:
        """The root `name` names (a version or any DAG), checked complete in the blockstore."""
        try:
            root = self.find(name).cid
        except (NotFound, SnapshotError):  # not a version of ours: any DAG held here
            try:
                root = str(parse_cid_text(name))
            except (ValueError, KeyError) as e:
                raise NotFound(f"{name!r} is neither a version, a tag nor a CID") from e
        missing = missing_blocks(self.blocks, CID.decode(root))
        if missing:
            why = ("it was thinned by history retention (its tables are gone)"
                   if root in self.thinned() else f"{len(missing)} block(s) are missing here")
            raise RestoreError(f"{root} cannot be kept forever: {why}")  # fmt: skip
        return root

    def _pins_path(self) -> Path:
        return self.home / "snapshots" / "pins.json"

    def _pins(self) -> dict[str, float]:
        try:
            return dict(json.loads(self._pins_path().read_text()))
        except FileNotFoundError:
            return {}

    def _save_pins(self, pins: dict[str, float]) -> None:
        atomic_write(self._pins_path(), json.dumps(pins, sort_keys=True).encode())

    # tags -------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        """Tag name -> root CID of the version it names."""
        return retention.read_tags(self.snapshots.state_dir)

    def tag(self, name: str, cid: str | None = None) -> Version:
        """Name version `cid` (default: the head) `name`, moving the tag if it exists.

        A tagged version is kept forever and `restore NAME` restores it.
        Raises BadTag, NotFound, RestoreError (a thinned version).
        """
        self._take_lock()  # a write: not beside another process's collection
        retention.check_tag(name)
        with self._blocks_lock:
            if cid is None:
                version = self.head()
                if version is None:
                    raise NotFound("nothing to tag: no snapshot yet (run `benchsync snapshot`)")
            else:
                version = self.find(cid)
            self._complete_root(version.cid)
            tags = self.tags()
            tags[name] = version.cid
            retention.write_tags(self.snapshots.state_dir, tags)
            return version

    def untag(self, name: str) -> bool:
        """Remove tag `name`; False if there was none."""
        self._take_lock()  # a write: not beside another process's collection
        with self._blocks_lock:
            tags = self.tags()
            if tags.pop(name, None) is None:
                return False
            retention.write_tags(self.snapshots.state_dir, tags)
            return True

    def find(self, name: str) -> Version:
        """A version by tag, root CID or unique CID prefix (`SnapshotStore.find`)."""
        cid = self.tags().get(name)
        return self.snapshots.find(cid if cid is not None else name)

    def thinned(self) -> dict[str, float]:
        """Versions whose tables history retention gave up -> when."""
        return retention.read_thinned(self.snapshots.state_dir)

    # maintenance ------------------------------------------------------------------
    def gc(self, extra_keep: Iterable[CID] = ()) -> tuple[int, int]:
        """Delete blocks nothing kept references: versions not thinned (their whole DAG),
        thinned versions' roots and manifests, pins, replicas, `extra_keep`. Thins nothing."""
        self._take_lock()
        with self._blocks_lock:
            history = self.history()
            gone = self.thinned()
            full = [v for v in history if v.cid not in gone]
            return self._collect(full, [v for v in history if v.cid in gone], extra_keep, 0.0)

    def _collect(self, full: list[Version], thinned: list[Version],
                 extra_keep: Iterable[CID], temp_grace: float) -> tuple[int, int]:  # fmt: skip
        keep = [CID.decode(v.cid) for v in full]
        keep += [CID.decode(c) for c in self._pins()]
        keep += [CID.decode(c) for c in self.tags().values()]
        keep += self.replicas.roots()
        keep += list(extra_keep)
        shallow = [CID.decode(v.cid) for v in thinned]
        keep += self._manifests(shallow)
        return self.blocks.gc(keep, keep_blocks=shallow, temp_grace=temp_grace)

    def _manifests(self, roots: list[CID]) -> list[CID]:
        """The manifest file CIDs of version roots (what a thinned version keeps)."""
        out = []
        for root in roots:
            with contextlib.suppress(StorageError, ValueError, KeyError):
                out += [cid for name, cid, _ in unixfs.list_directory(self.blocks.get, root)
                        if name == "manifest.json"]  # fmt: skip
        return out

    def maintain(
        self,
        policy: retention.RetentionPolicy,
        *,
        now: float | None = None,
        budget: int | None = None,
        extra_keep: Iterable[CID] = (),
        seen: Iterable[str] = (),
        replica_expiry: float = retention.REPLICA_EXPIRY,
        temp_grace: float = TEMP_GRACE,
    ) -> MaintenanceReport:
        """Thin the history, expire replicas, collect blocks and count the disk; one pass.

        Crash-safe in this order: the versions to keep are decided first, the
        ones given up are recorded (`thinned.json`), and only then are blocks
        deleted that no kept version, thinned manifest, pin, tag, replica or
        `extra_keep` root (a node's fetches in flight) references. A kill at
        any point leaves every kept version whole. `seen` are datasets whose
        owner is in the lab now; a replica unseen for `replica_expiry` seconds
        is dropped. With a `budget` (bytes of the whole home) the oldest kept
        versions are thinned too, never the head, a pin or a tag.
        """
        self._take_lock()  # one process collects a home's blocks
        started = time.monotonic()
        now = time.time() if now is None else now
        extra = list(extra_keep)
        with self._blocks_lock:
            for dataset in seen:
                with contextlib.suppress(StorageError, OSError):
                    self.replicas.mark_seen(dataset, now)
            expired = self.replicas.expire(now, replica_expiry)
            history = self.history()
            protected = set(self._pins()) | set(self.tags().values())
            plan = retention.plan(history, now, policy, protected=protected,
                                  thinned=self.thinned())  # fmt: skip
            over = False
            if budget is not None:
                over = not self._fit_budget(plan, budget, extra)
            retention.record_thinned(self.snapshots.state_dir, plan.thin, now)
            removed, freed = self._collect(
                plan.keep, plan.thin + plan.thinned, extra, temp_grace
            )
            usage = self.disk_usage(history)
        return MaintenanceReport(
            versions=len(history), kept=len(plan.keep), thinned_now=len(plan.thin),
            thinned=len(plan.thin) + len(plan.thinned), removed_blocks=removed,
            freed_bytes=freed, expired_replicas=expired, usage=usage, budget=budget,
            over_budget=over or (budget is not None and usage.total_bytes > budget),
            finished_at=time.time(), seconds=time.monotonic() - started,
        )  # fmt: skip

    def _fit_budget(self, plan: retention.RetentionPlan, budget: int, extra: list[CID]) -> bool:
        """Thin `plan` harder until the home fits `budget`; whether it does."""
        sizes: dict[str, int] = {}

        def cost(version: Version) -> set[str]:
            keys = set()
            for cid in self.blocks.reachable([CID.decode(version.tables_cid)]):
                key = block_key(cid)
                if key not in sizes:
                    sizes[key] = self.blocks.size(cid)
                keys.add(key)
            return keys

        usage = self.disk_usage(plan.keep + plan.thin + plan.thinned)
        # What stays whatever is thinned: the database, replicas, other blocks and the
        # history's manifests and roots (approximated by the history minus its tables).
        tables = set().union(*(cost(v) for v in plan.keep)) if plan.keep else set()
        manifests = max(0, usage.history_bytes - sum(sizes[k] for k in tables))
        fixed = usage.database_bytes + usage.replica_bytes + usage.other_bytes + manifests
        _, fits = retention.tighten(plan, cost, sizes, fixed, budget)
        return fits

    def disk_usage(self, history: list[Version] | None = None) -> DiskUsage:
        """Bytes of the database, own history, replicas and other blocks, and free space.

        Walks the DAGs (one stat per block): call it from maintenance, not per request.
        """
        history = self.history() if history is None else history
        gone = self.thinned()
        full = [CID.decode(v.cid) for v in history if v.cid not in gone]
        shallow = [CID.decode(v.cid) for v in history if v.cid in gone]
        own_keys = self.blocks.reachable(full + self._manifests(shallow))
        own_keys |= {c for c in shallow if self.blocks.has(c)}
        own = {block_key(c) for c in own_keys}
        theirs = {block_key(c) for c in self.blocks.reachable(self.replicas.roots())} - own
        history_bytes = replica_block_bytes = other = total = 0
        for cid in self.blocks.cids():
            key = block_key(cid)
            try:
                size = self.blocks.size(cid)
            except NotFound:
                continue  # collected meanwhile
            total += size
            if key in own:
                history_bytes += size
            elif key in theirs:
                replica_block_bytes += size
            else:
                other += size
        # A replica's leaves are reference blocks into its Parquet files (issue 14):
        # `size` says the bytes they name, which `replicas.disk_bytes()` counts already.
        # What the store holds on its own disk for them is what is left of its total.
        on_disk = self.blocks.disk_bytes()
        replica_block_bytes = min(replica_block_bytes, max(0, on_disk - history_bytes - other))
        return DiskUsage(
            database_bytes=self.database_bytes(), history_bytes=history_bytes,
            replica_bytes=replica_block_bytes + self.replicas.disk_bytes(),
            other_bytes=other, blocks_bytes=min(total, on_disk),
            free_bytes=shutil.disk_usage(self.home).free,
        )  # fmt: skip

    def database_bytes(self) -> int:
        """Bytes of the live database file and its write-ahead log."""
        total = 0
        for path in (self.db_path, self.db_path.with_name(self.db_path.name + ".wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    # queries ----------------------------------------------------------------------
    def query_inputs(self, scope: str = "local") -> ScopeInput:
        """The data a query in `scope` sees, to hand to a sandbox (which reads no files).

        The own tables as Arrow; in scope `replicas` also the own dataset ID
        (the `origin` of own rows) and every installed replica's Parquet files.
        Raises ValueError for an unknown scope, QueryError when the database's
        tables cannot be read.
        """
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
        try:
            own = {t: self.db.query(f"SELECT * FROM {ident(t)}") for t in TABLES}
        except duckdb.Error as e:
            raise QueryError(f"the database's tables could not be read: {e}") from None
        if scope == "local":
            return ScopeInput(own)
        replicas = [ReplicaTables(r.dataset, r.tables) for r in self.replicas.all()]
        return ScopeInput(own, origin=self.dataset, replicas=replicas)

    def query(self, sql: str, params: list[Any] | None = None, scope: str = "local", *,
              limits: QueryLimits = QueryLimits(),  # noqa: B008 (frozen, so shared safely)
              memory_limit: str = f"{QUERY_MEMORY_LIMIT}B") -> pa.Table:  # fmt: skip
        """Run one read-only SELECT in the local or replicas scope; returns the answer.

        The query passes the one read-only gate (before any table is read)
        and runs in a fresh `QuerySandbox` over `query_inputs(scope)`, never on
        the database itself: no files, no settings, no extensions, `limits`.
        In this process, so memory is bounded by DuckDB's own accounting
        (`memory_limit`, a DuckDB size string) only; the daemon runs the same
        sandbox in a worker process under an OS limit. Raises QueryRefused,
        InvalidSQL, QueryTimeout or ResultTooLarge (QueryError).
        """
        distquery.DUCKDB.parse(sql)  # the gate: refuse before reading the tables
        tables = scope_tables(self.query_inputs(scope))
        return run_once(sql, tables, params or None, limits=limits, memory_limit=memory_limit)

    def replica_placement(self, dataset: str, root: CID) -> ReplicaPlacement | None:
        """Where a fetch of a peer's version `root` writes its table files' leaves (once,
        into the replica's content-addressed files); None for our own dataset or a
        dataset name that is not a peer ID (its fetch keeps the leaves as blocks)."""
        if dataset == self.dataset:
            return None
        try:
            return self.replicas.placement(dataset, root)
        except BadSnapshot:
            return None

    def install_replica(self, root: str) -> Any:
        """Install a complete, verified peer snapshot from the blockstore as a replica."""
        version = read_version(self.blocks, root)
        if version.manifest.dataset == self.dataset:
            raise BadSnapshot(f"{root} is our own dataset ({self.dataset}), not a peer's")
        with self._blocks_lock, self.db.reader() as conn:  # not beside `expire`'s clean-up
            return self.replicas.install(version, conn)


def _one(conn: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    row = conn.execute(sql).fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    return row


def _not_reproduced(target: Version, why: str) -> RestoreError:
    return RestoreError(
        f"restored database does not reproduce version {target.cid} ({why}); "
        "the live database is unchanged"
    )


def _no_space(e: BaseException) -> bool:
    """Did `e` (an OSError, or DuckDB's text of one) come from a full disk or quota?"""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(os.strerror(n) in text for n in (errno.ENOSPC, errno.EDQUOT))
