"""Content-addressed snapshots of the benchmark database, and their history.

A snapshot is a UnixFS directory any IPFS tool can read::

    <root>/manifest.json                     format, dataset, seq, parent, created_at,
                                             schema_version, writer, per-table
                                             rows/bytes/cid/digest/segments
    <root>/tables/<table>/part-NNNN.parquet  each table as content-defined segments
    <root>/tables/<table>.parquet            (older versions: one file per table)

Each table is split by key into segments whose boundaries depend only on the
rows (`segments`: the rule, its constants and the rows/2 digest), each
exported in key order with a fixed row-group size by DuckDB's own writer, so
the same rows give the same `tables/` CID on every node *with the same writer*
(DuckDB version: it writes its version into every file, and its encoders
change between releases), whatever history led to them. The writer knows
which key ranges changed since the last snapshot (`db.BenchmarkDB` tracks
them; a restart marks everything dirty once), so a snapshot re-exports only
the dirty segments (`WHERE key` in their range) and reuses the others' CIDs,
digests and row counts from a local index (`segments.json` in the state
directory, valid for the head it names): its cost follows the change, not the
database. Versions in the older one-file layout stay readable and restorable.

Content identity across writers is the per-table row digest (`rowdigest`, a
specified encoding of the rows; rows/2 over segments) that each manifest
records beside the writer (`duckdb`, `benchsync` versions): a snapshot whose
digests equal the head's is no change, whatever bytes the writer produced.
Manifests written before the digest existed have none; for them "no change"
falls back to `tables/` CID equality.

History is the chain of `parent` links between manifests; the head is a small
JSON file written atomically. Nothing here erases history: a restore records a
new head whose content equals an old version's.

A snapshot may come from a peer, so its meaning is checked before any of it
reaches the filesystem or DuckDB (`read_version` and `materialize_tables` do it
for every consumer): table names follow `sqlnames.TABLE_NAME_RE`, `tables/`
holds exactly one entry per manifest table and nothing else: `<table>.parquet`
for a table without `segments` in the manifest, else a directory of exactly
`part-0000.parquet` .. `part-<n-1>.parquet` for its n segments; the files
expand to exactly the bytes the manifest claims (bounded by the limits below,
and by how much distinct data the DAG really holds), and their Parquet
metadata agrees with the claimed rows and stays under a decompressed size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from multiformats import CID

import benchsync
from benchsync.storage import rowdigest, schema, segments, unixfs
from benchsync.storage.blockstore import (
    Blockstore,
    BlockWriteError,
    fsync_path,
    verify_block,
)
from benchsync.storage.cid import cid_text, parse_cid_text
from benchsync.storage.db import CHANGES_TABLE
from benchsync.storage.errors import NotFound, StorageError, TooLarge
from benchsync.storage.sqlnames import UnsafeName, check_table_name, ident, literal

FORMAT = "benchsync-snapshot/1"
ROW_GROUP_SIZE = (
    8192  # rows; fixed so appended rows leave earlier row groups (and chunks) unchanged
)
PARQUET_COMPRESSION = "zstd"
MANIFEST_NAME = "manifest.json"
TABLES_DIR = "tables"
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest lists tables, not rows; anything bigger is not ours
HEAD_FILENAME = "HEAD.json"
PARQUET_SUFFIX = ".parquet"
# What a snapshot from outside may claim. Our schema has 8 tables; legacy files add a few.
MAX_TABLES = 256
MAX_TABLE_BYTES = 64 * 1024**3  # bytes of one table's Parquet file
MAX_TABLE_ROWS = 2**40  # rows of one table
# Decoded size of one table's Parquet data (every value spelled out, dictionaries
# expanded): what loading it may cost in DuckDB memory, spill files and database file.
MAX_TABLE_UNCOMPRESSED_BYTES = 64 * 1024**3  # bytes
# Our zstd Parquet of benchmark rows decodes to a small multiple of its size; a file
# that decodes to more than this (once above the floor) is a decompression bomb.
MAX_PARQUET_EXPANSION = 200  # uncompressed bytes per file byte
PARQUET_EXPANSION_FLOOR = 64 * 1024 * 1024  # bytes; small files may compress as they like
CHECK_MEMORY_LIMIT = "256MB"  # DuckDB's memory while measuring a received file's text columns
# Identical 256 KiB chunks may share one leaf, but zstd Parquet all but never repeats
# one; a file claiming more than this many times the distinct bytes its DAG holds
# is a DAG bomb (a diamond of links to one leaf), however its claims add up.
MAX_CHUNK_REUSE = 16
MIN_CID_PREFIX = 12  # characters; every CIDv1 of ours starts "bafybei"/"bafkrei"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")  # a table's row digest, as `rowdigest` writes it
# The writer a manifest names: a few short software -> version strings, for diagnosis.
MAX_WRITER_ENTRIES = 8
WRITER_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
WRITER_VALUE_RE = re.compile(r"^[\x20-\x7e]{1,64}$")
DIGEST_BATCH_ROWS = 64 * 1024  # rows per Arrow batch when digesting a Parquet file
# DuckDB's memory limit while a snapshot runs: it exports one segment (~131k rows) at a
# time, so a small buffer pool is enough, and a full scan does not grow the process.
SNAPSHOT_MEMORY_LIMIT = "64MiB"
SEGMENT_INDEX_NAME = "segments.json"  # the local index of the head's segments
# /2: the changes since the index are logged in the database (db.CHANGES_TABLE). An index
# of /1 was written by a benchsync that kept them in memory only: not trusted after it.
SEGMENT_INDEX_FORMAT = "benchsync-segment-index/2"


class SnapshotError(StorageError):
    """A snapshot could not be taken, read or restored; the live data is untouched."""


class DiskFull(SnapshotError):
    """The disk filled up while writing; nothing was made current."""


class IncompleteSnapshot(SnapshotError):
    """A snapshot's DAG is missing blocks in the local blockstore."""


class BadSnapshot(SnapshotError):
    """A well-formed DAG whose content is not a valid benchsync snapshot (its author's fault)."""


class SnapshotTooLarge(BadSnapshot, TooLarge):
    """A snapshot's content is bigger than its manifest claims or than a named limit."""


@dataclass(frozen=True)
class TableInfo:
    rows: int
    bytes: int
    cid: str
    digest: str | None = None  # `rowdigest` of the rows; None: unsupported type, or an old manifest
    # Segment count of tables/<table>/ (digest: rows/2); None: the older tables/<table>.parquet
    segments: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rows": self.rows, "bytes": self.bytes, "cid": self.cid}
        if self.digest is not None:
            doc["digest"] = self.digest
        if self.segments is not None:
            doc["segments"] = self.segments
        return doc


# What parsing a hostile manifest can raise: wrong types and keys, OverflowError for
# 1e999 or a 400-digit number, RecursionError for JSON nested too deep.
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError)


@dataclass(frozen=True)
class Manifest:
    dataset: str
    seq: int
    parent: str | None
    created_at: float  # seconds since the epoch
    schema_version: int
    tables: dict[str, TableInfo] = field(default_factory=dict)
    format: str = FORMAT
    # Who wrote tables/ ({"duckdb": ..., "benchsync": ...}); None in manifests older than it.
    writer: dict[str, str] | None = None

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "dataset": self.dataset,
            "seq": self.seq,
            "parent": self.parent,
            "created_at": self.created_at,
            "schema_version": self.schema_version,
            "tables": {name: info.to_json() for name, info in sorted(self.tables.items())},
        }
        if self.writer is not None:
            doc["writer"] = dict(self.writer)
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest; raises BadSnapshot naming what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise BadSnapshot(f"manifest.json is {len(data)} bytes, limit {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise BadSnapshot(
                    f"unknown snapshot format {doc.get('format')!r}, expected {FORMAT!r}"
                )
            if len(doc["tables"]) > MAX_TABLES:
                raise BadSnapshot(
                    f"manifest lists {len(doc['tables'])} tables, limit {MAX_TABLES}"
                )
            tables = {
                check_table_name(name): _table_info(name, t)
                for name, t in doc["tables"].items()
            }
            for local in (schema.VERSION_TABLE, CHANGES_TABLE):
                if local in tables:  # node-local; a restore must not take a peer's
                    raise BadSnapshot(f"manifest lists the node-local table {local!r}")
            parent = doc["parent"]
            return cls(
                dataset=str(doc["dataset"]),
                seq=int(doc["seq"]),
                parent=None if parent is None else str(parent),
                created_at=float(doc["created_at"]),
                schema_version=int(doc["schema_version"]),
                tables=tables,
                writer=_writer(doc.get("writer")),
            )
        except BadSnapshot:
            raise
        except UnsafeName as e:
            raise BadSnapshot(f"manifest.json: {e}") from e
        except _MALFORMED as e:
            raise BadSnapshot(f"malformed manifest.json: {e}") from e

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def digests(self) -> dict[str, str | None]:
        """Table name -> row digest (None where the manifest has none)."""
        return {name: info.digest for name, info in self.tables.items()}

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tables.values())


def _table_info(name: str, doc: Any) -> TableInfo:
    """A manifest's entry for one table, its numbers checked against the limits."""
    digest = doc.get("digest")
    if digest is not None and not (isinstance(digest, str) and DIGEST_RE.fullmatch(digest)):
        raise BadSnapshot(f"manifest: table {name} has a malformed digest {str(digest)[:80]!r}")
    nseg = doc.get("segments")
    if nseg is not None and not (
        isinstance(nseg, int) and not isinstance(nseg, bool) and 1 <= nseg <= segments.MAX_SEGMENTS
    ):
        raise BadSnapshot(
            f"manifest: table {name} claims {str(nseg)[:40]} segments "
            f"(allowed 1..{segments.MAX_SEGMENTS})"
        )
    info = TableInfo(
        rows=int(doc["rows"]),
        bytes=int(doc["bytes"]),
        cid=str(doc["cid"]),
        digest=digest,
        segments=nseg,
    )
    if not 0 <= info.rows <= MAX_TABLE_ROWS:
        raise BadSnapshot(
            f"manifest: table {name} claims {info.rows} rows (allowed 0..{MAX_TABLE_ROWS})"
        )
    if info.bytes < 0:
        raise BadSnapshot(f"manifest: table {name} claims {info.bytes} bytes")
    if info.bytes > MAX_TABLE_BYTES:
        raise SnapshotTooLarge(f"manifest: table {name}", limit=MAX_TABLE_BYTES, got=info.bytes)
    return info


def _writer(doc: Any) -> dict[str, str] | None:
    """A manifest's `writer`, checked: a few short printable name -> version strings."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or len(doc) > MAX_WRITER_ENTRIES:
        raise BadSnapshot(
            f"manifest: writer must be an object of at most {MAX_WRITER_ENTRIES} entries"
        )
    for key, value in doc.items():
        if not WRITER_KEY_RE.fullmatch(key) or not (
            isinstance(value, str) and WRITER_VALUE_RE.fullmatch(value)
        ):
            raise BadSnapshot(f"manifest: malformed writer entry {str(key)[:40]!r}")
    return dict(doc)


def current_writer() -> dict[str, str]:
    """The software this process writes `tables/` with, as a manifest records it."""
    return {"duckdb": duckdb.__version__, "benchsync": benchsync.__version__}


@dataclass(frozen=True)
class Version:
    """One entry of the history: a snapshot root and what its manifest says."""

    cid: str
    tables_cid: str
    manifest: Manifest

    @property
    def seq(self) -> int:
        return self.manifest.seq

    @property
    def parent(self) -> str | None:
        return self.manifest.parent

    @property
    def created_at(self) -> float:
        return self.manifest.created_at

    def to_json(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "tables_cid": self.tables_cid,
            "seq": self.seq,
            "parent": self.parent,
            "created_at": self.created_at,
            "dataset": self.manifest.dataset,
            "rows": {n: t.rows for n, t in sorted(self.manifest.tables.items())},
            "bytes": self.manifest.total_bytes,
            "writer": self.manifest.writer,
        }


# --- reading snapshots out of a blockstore -------------------------------------------


def verified_getter(store: Blockstore) -> Callable[[CID], bytes]:
    """A block reader that re-verifies every block: disks rot, and a restore must not install it."""

    def get(cid: CID) -> bytes:
        try:
            data = store.get(cid)
        except NotFound as e:
            raise IncompleteSnapshot(f"block {cid} is missing from the blockstore") from e
        verify_block(cid, data)
        return data

    return get


def read_version(store: Blockstore, root: CID | str) -> Version:
    """The version rooted at `root`, its manifest and `tables/` listing checked.

    Raises IncompleteSnapshot, or BadSnapshot for anything that is not a valid
    benchsync snapshot (a root that is not a CID, a bad name, a missing or
    unlisted table file, a size beyond the limits).
    """
    try:
        root = parse_cid_text(root) if isinstance(root, str) else root
    except (ValueError, KeyError) as e:
        raise BadSnapshot(f"{str(root)[:100]!r} is not a CID: {e}") from e
    get = verified_getter(store)
    listing = _list_dir(get, root)
    entries = dict((name, cid) for name, cid, _ in listing)
    if len(entries) != len(listing) or set(entries) != {MANIFEST_NAME, TABLES_DIR}:
        raise BadSnapshot(
            f"{root} is not a benchsync snapshot: its entries are "
            f"{sorted(name for name, _, _ in listing)[:10]!r}, expected "
            f"[{MANIFEST_NAME!r}, {TABLES_DIR!r}]"
        )
    manifest = Manifest.from_bytes(_read_small_file(get, entries[MANIFEST_NAME]))
    tables_cid = cid_text(entries[TABLES_DIR])
    version = Version(cid=cid_text(root), tables_cid=tables_cid, manifest=manifest)
    # History outlives garbage-collected tables; their listing is checked again by
    # `materialize_tables` before anything is read from them.
    with contextlib.suppress(IncompleteSnapshot):
        table_files(get, version)
    return version


@dataclass(frozen=True)
class TableLink:
    """Where one table of a version lives in its `tables/` directory, as checked."""

    cid: CID  # the file (older layout) or the segment directory
    # (link name, file CID) of each segment in order; None: the one-file layout
    parts: tuple[tuple[str, CID], ...] | None = None


def table_files(get: Callable[[CID], bytes], version: Version) -> dict[str, TableLink]:
    """Table name -> its checked entry of `version`'s `tables/`.

    A manifest table without `segments` must be exactly `<table>.parquet`; one
    with n segments a directory `<table>` of exactly `part-0000.parquet` ..
    `part-<n-1>.parquet`; with the CID the manifest names, once; every listed
    table must be there and nothing else. Raises BadSnapshot naming the first
    entry that breaks the rule.
    """
    listing = _list_dir(get, CID.decode(version.tables_cid))
    tables = version.manifest.tables
    files: dict[str, TableLink] = {}
    for name, cid, _ in listing:
        table = name.removesuffix(PARQUET_SUFFIX)
        try:
            check_table_name(table)
        except UnsafeName as e:
            if name == table:
                raise BadSnapshot(
                    f"unexpected entry {name[:100]!r} in tables/ "
                    f"(want <table>.parquet or <table>/part-NNNN.parquet)"
                ) from e
            raise BadSnapshot(f"tables/ entry {name[:100]!r}: {e}") from e
        if table in files:
            raise BadSnapshot(f"tables/{name} appears twice")
        if table not in tables:
            raise BadSnapshot(f"tables/{name} is not listed in the manifest")
        info = tables[table]
        if (name == table) != (info.segments is not None):
            want = f"{table}/" if info.segments is not None else f"{table}{PARQUET_SUFFIX}"
            raise BadSnapshot(
                f"unexpected entry tables/{name}: the manifest's layout for {table} is "
                f"tables/{want} (segment layout: <table>/part-NNNN.parquet)"
            )
        if cid_text(cid) != info.cid:
            raise BadSnapshot(f"tables/{name} is {cid}, but the manifest says {info.cid}")
        files[table] = TableLink(cid, None if info.segments is None else _segment_links(
            get, table, cid, info.segments))
    absent = sorted(set(tables) - set(files))
    if absent:
        raise BadSnapshot(
            f"manifest lists table {absent[0]!r} but tables/{absent[0]}"
            f"{'/' if tables[absent[0]].segments else PARQUET_SUFFIX} is absent"
        )
    return files


def _segment_links(
    get: Callable[[CID], bytes], table: str, cid: CID, count: int
) -> tuple[tuple[str, CID], ...]:
    """The parts of a segment directory: exactly part-0000 .. part-<count-1>, in order."""
    try:
        listing = unixfs.list_directory(get, cid)
    except SnapshotError:
        raise
    except (StorageError, ValueError, KeyError) as e:
        raise BadSnapshot(
            f"tables/{table} is not a segment directory (tables/<table>/part-NNNN.parquet): {e}"
        ) from e
    names = [name for name, _, _ in listing]
    want = [segments.segment_name(i) for i in range(count)]
    if names != want:
        odd = next((n for n, w in zip(names, want, strict=False) if n != w), None)
        raise BadSnapshot(
            f"tables/{table}/ holds {len(names)} entries"
            f"{f' (unexpected {odd[:100]!r})' if odd else ''}; the manifest claims "
            f"{count} segments, part-0000.parquet .. {want[-1]}"
        )
    return tuple((name, c) for name, c, _ in listing)


def _list_dir(get: Callable[[CID], bytes], cid: CID) -> list[tuple[str, CID, int]]:
    try:
        return unixfs.list_directory(get, cid)
    except SnapshotError:
        raise
    except StorageError as e:
        raise BadSnapshot(f"{cid}: {e}") from e
    except (ValueError, KeyError) as e:
        raise BadSnapshot(f"{cid} is not a UnixFS directory: {e}") from e


def _read_small_file(get: Callable[[CID], bytes], cid: CID) -> bytes:
    out = bytearray()
    try:
        for chunk in unixfs.cat(get, cid):
            out += chunk
            if len(out) > MAX_MANIFEST_BYTES:
                raise SnapshotTooLarge(f"{MANIFEST_NAME}", limit=MAX_MANIFEST_BYTES, got=len(out))
    except SnapshotError:
        raise
    except unixfs.FileTooLarge as e:
        raise SnapshotTooLarge(f"{MANIFEST_NAME}", limit=e.limit, got=e.got) from e
    except StorageError as e:
        raise BadSnapshot(f"{MANIFEST_NAME} ({cid}): {e}") from e
    return bytes(out)


def missing_blocks(store: Blockstore, root: CID) -> list[CID]:
    """CIDs reachable from `root` that the store lacks (only the frontier it can see)."""
    return unixfs.frontier(store.get, store.has, root)


def dag_blocks(store: Blockstore, root: CID) -> Iterator[tuple[CID, bytes]]:
    """Every block of the DAG under `root`, parents first; raises IncompleteSnapshot."""
    return unixfs.walk(verified_getter(store), root)


def materialize_tables(store: Blockstore, version: Version, dest: Path) -> dict[str, Path]:
    """Write the version's Parquet files into `dest`; returns table name -> path.

    The path is `dest/<table>.parquet` for a table in the one-file layout, the
    directory `dest/<table>/` of its `part-NNNN.parquet` segments otherwise
    (`segments.parquet_files` lists either). Names, sizes and Parquet metadata
    are checked first (see `table_files`, `check_parquet_file`); paths are
    built only from checked names. On any error everything this call wrote is
    removed (and `dest`, if this call created it) before raising
    IncompleteSnapshot, BadSnapshot (SnapshotTooLarge for a bomb), DiskFull or
    SnapshotError.
    """
    get = verified_getter(store)
    links = table_files(get, version)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    try:
        for table, link in links.items():
            info = version.manifest.tables[table]
            check_distinct_bytes(get, table, link.cid, info.bytes)
            if link.parts is None:
                path = dest / f"{check_table_name(table)}{PARQUET_SUFFIX}"
                files[table] = path
                _write_file(get, table, link.cid, info.bytes, path)
            else:
                path = dest / check_table_name(table)
                files[table] = path
                path.mkdir()
                budget = info.bytes
                for name, cid in link.parts:
                    budget -= _write_file(get, table, cid, None, path / name, budget)
                if budget:
                    raise BadSnapshot(
                        f"tables/{table}/ holds {info.bytes - budget} bytes, "
                        f"the manifest claims {info.bytes}"
                    )
            check_parquet_file(path, table, info)
    except BaseException:
        for path in files.values():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return files


def check_distinct_bytes(
    get: Callable[[CID], bytes],
    table: str,
    cid: CID,
    claimed: int,
    size: Callable[[CID], int] | None = None,
) -> None:
    """Refuse a file claiming far more bytes than the distinct blocks of its DAG hold
    (raw leaves measured with `size` when given, see `unixfs.distinct_bytes`)."""
    try:
        distinct = unixfs.distinct_bytes(get, cid, size)
    except SnapshotError:
        raise
    except NotFound as e:  # from `size`
        raise IncompleteSnapshot(f"tables/{table} ({cid}): {e}") from e
    except StorageError as e:
        raise BadSnapshot(f"tables/{table} ({cid}): {e}") from e
    if claimed > MAX_CHUNK_REUSE * distinct and claimed > 0:
        raise SnapshotTooLarge(
            f"tables/{table} (its DAG holds {distinct} distinct bytes; "
            f"expanded at most {MAX_CHUNK_REUSE} times)",
            limit=MAX_CHUNK_REUSE * distinct,
            got=claimed,
        )


def _write_file(
    get: Callable[[CID], bytes],
    table: str,
    cid: CID,
    size: int | None,
    path: Path,
    budget: int | None = None,
) -> int:
    """Write the file DAG `cid` to `path` (which must not exist); returns its bytes.

    Exactly `size` bytes when given; otherwise the root's claim, refused past
    `budget` (what is left of the table's claimed bytes).
    """
    one_file = path.name == f"{table}{PARQUET_SUFFIX}"
    what = f"tables/{table}{PARQUET_SUFFIX}" if one_file else f"tables/{table}/{path.name}"
    written = 0
    try:
        with open(path, "xb") as f:
            for chunk in unixfs.cat(get, cid, size):
                written += len(chunk)
                if budget is not None and written > budget:
                    raise SnapshotTooLarge(
                        f"{what} (the manifest's bytes for {table})", limit=budget, got=written
                    )
                f.write(chunk)
    except SnapshotError:
        raise
    except unixfs.FileTooLarge as e:
        raise SnapshotTooLarge(
            f"{what} (the manifest claims {size} bytes)", limit=e.limit, got=e.got
        ) from e
    except StorageError as e:
        raise BadSnapshot(f"{what} ({cid}): {e}") from e
    except OSError as e:
        if _disk_full(e):
            raise DiskFull(f"disk full while writing {path}: {e}") from e
        raise SnapshotError(f"cannot write {path}: {e}") from e
    return written


@dataclass(frozen=True)
class ParquetCheck:
    """What checking one Parquet file found: a function of its bytes alone, so a caller
    that knows the file's CID may remember it (a replica's unchanged segments)."""

    rows: int
    stated: int  # uncompressed bytes its metadata states
    decoded: int  # bytes its data decodes to, every dictionary value spelled out

    def to_json(self) -> list[int]:
        return [self.rows, self.stated, self.decoded]

    @classmethod
    def from_json(cls, doc: object) -> ParquetCheck:
        if not (isinstance(doc, list) and len(doc) == 3
                and all(type(v) is int and v >= 0 for v in doc)):  # fmt: skip
            raise ValueError(f"not a Parquet check: {doc!r}")
        return cls(*doc)


def check_parquet_file(
    path: Path,
    table: str,
    info: TableInfo,
    known: Callable[[Path], ParquetCheck | None] = lambda _: None,
) -> dict[Path, ParquetCheck]:
    """Check a table file before anything loads its rows into DuckDB; returns each
    Parquet file's check.

    The row count must equal the manifest's, and the decoded size stay under
    MAX_TABLE_UNCOMPRESSED_BYTES and MAX_PARQUET_EXPANSION times the file (above
    PARQUET_EXPANSION_FLOOR). The metadata's uncompressed sizes are checked
    first; then the data is decoded one row group at a time, dictionaries kept
    as dictionaries, because one dictionary value repeated on every row decodes
    to far more than any size the metadata states. A file `known` returns a
    check for is neither read nor decoded again (its bytes were checked
    before). Raises BadSnapshot (SnapshotTooLarge for a bomb).
    """
    limit = min(
        MAX_TABLE_UNCOMPRESSED_BYTES,
        max(PARQUET_EXPANSION_FLOOR, MAX_PARQUET_EXPANSION * info.bytes),
    )
    files = segments.parquet_files(path)
    where = f"tables/{table}{'/' if path.is_dir() else PARQUET_SUFFIX}"
    what = f"{where} decoded ({info.bytes} bytes on disk)"
    try:
        checks = {p: c for p in files if (c := known(p)) is not None}
        metas = {p: pq.ParquetFile(p).metadata for p in files if p not in checks}
        stated_of = {
            p: sum(
                meta.row_group(g).column(c).total_uncompressed_size
                for g in range(meta.num_row_groups)
                for c in range(meta.num_columns)
            )
            for p, meta in metas.items()
        }
        rows = sum(c.rows for c in checks.values()) + sum(m.num_rows for m in metas.values())
        if rows != info.rows:
            raise BadSnapshot(f"{where} holds {rows} rows, the manifest claims {info.rows}")
        stated = sum(c.stated for c in checks.values()) + sum(stated_of.values())
        if stated > limit:
            raise SnapshotTooLarge(what, limit=limit, got=stated)
        decoded = sum(c.decoded for c in checks.values())
        if metas:
            with _check_cursor() as conn:
                for p, meta in metas.items():
                    before = decoded
                    decoded = _check_decoded(conn, p, meta, limit, decoded, what)
                    checks[p] = ParquetCheck(meta.num_rows, stated_of[p], decoded - before)
    except SnapshotError:
        raise
    except (pa.ArrowException, duckdb.Error, OSError, ValueError) as e:
        raise BadSnapshot(f"{where} is not readable Parquet: {e}") from e
    return checks


def _check_decoded(
    conn: duckdb.DuckDBPyConnection, path: Path, meta: Any, limit: int, decoded: int, what: str
) -> int:
    """The running decoded total with `path`'s rows added, refused past `limit`.

    A fixed-width column decodes to its rows times its width whatever its
    pages hold (a reader takes the row count from the metadata), so that is
    counted without reading it. A text or binary column is measured by one
    DuckDB scan summing its values' lengths, a dictionary value counted on
    every row that uses it (DuckDB's strings point into the dictionary: the
    scan never spells a bomb out; `conn` runs under CHECK_MEMORY_LIMIT), plus its
    offsets. Any other column (nested) is decoded a row group at a time by
    pyarrow, dictionaries kept as dictionaries. Decoding every column with
    pyarrow was most of a replica install's time (bench/bench_replica.py).
    """
    schema_arrow = meta.schema.to_arrow_schema()
    if len(set(schema_arrow.names)) != len(schema_arrow.names):
        # Columns are chosen by name below: a twin could hide a bomb behind an int.
        raise BadSnapshot(f"{what}: the file has two columns of one name")
    width = 0  # bits per row of the fixed-width columns
    text: list[tuple[str, bool]] = []  # (column, whether it is a string: else binary)
    nested: list[str] = []
    for f in schema_arrow:
        if _is_text(f.type):
            text.append((f.name, pa.types.is_string(f.type) or pa.types.is_large_string(f.type)))
            continue
        try:
            width += f.type.bit_width
        except ValueError:  # no fixed width
            nested.append(f.name)
    decoded += (meta.num_rows * (width + 32 * len(text)) + 7) // 8  # values and text offsets
    if decoded > limit:
        raise SnapshotTooLarge(what, limit=limit, got=decoded)
    if text:
        lengths = ", ".join(
            f"coalesce(sum({'strlen' if kind else 'octet_length'}({ident(c)})), 0)"
            for c, kind in text
        )
        try:
            # sql: the path through literal(), every column through ident().
            row = conn.execute(f"SELECT {lengths} FROM read_parquet({literal(path)})").fetchone()
        except duckdb.OutOfMemoryException as e:  # other errors: not readable (the caller)
            raise SnapshotTooLarge(what, limit=limit, got=limit + 1) from e
        decoded += sum(int(n) for n in row or ())
        if decoded > limit:
            raise SnapshotTooLarge(what, limit=limit, got=decoded)
    if nested:
        pf = pq.ParquetFile(path, read_dictionary=[c for c, _ in text])
        for g in range(meta.num_row_groups):
            for column in pf.read_row_group(g, columns=nested).columns:
                decoded += sum(_decoded_bytes(chunk) for chunk in column.chunks)
                if decoded > limit:
                    raise SnapshotTooLarge(what, limit=limit, got=decoded)
    return decoded


_check_db: duckdb.DuckDBPyConnection | None = None
_check_db_lock = threading.Lock()


def _check_cursor() -> duckdb.DuckDBPyConnection:
    """A connection of its own (a cursor) to the process's in-memory DuckDB for measuring
    received files (no tables: only `read_parquet` scans), under CHECK_MEMORY_LIMIT.

    The database is opened once: opening and closing one per check cost 30-150
    ms, as much as the scans of a 30 MiB replica. Checks run in worker threads:
    each takes its own cursor, made under the lock.
    """
    global _check_db
    with _check_db_lock:
        if _check_db is None:
            _check_db = duckdb.connect(config={"memory_limit": CHECK_MEMORY_LIMIT})
        return _check_db.cursor()


def _is_text(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_string(t)
        or pa.types.is_large_binary(t)
    )


def _decoded_bytes(array: pa.Array) -> int:
    """Bytes of `array` with every dictionary value spelled out where it is used."""
    if isinstance(array, pa.DictionaryArray):
        lengths = pc.binary_length(array.dictionary).take(array.indices)
        return int(pc.sum(lengths).as_py() or 0) + array.indices.nbytes
    return int(array.nbytes)


# --- writing snapshots ---------------------------------------------------------------

Interval = tuple[int | None, int | None]  # an inclusive key range; None: unbounded
# What changed since the last snapshot: table -> key intervals; None: unknown (everything).
Dirty = dict[str, list[Interval]] | None


class ChangeSource(Protocol):
    """What a snapshot asks the database (`BenchmarkDB`) about changes."""

    def begin_snapshot(self, conn: Any) -> Dirty:
        """Begin `conn`'s read transaction; return the changes since the last call."""
        ...

    def return_dirty(self, dirty: Dirty) -> None:
        """Take back changes a failed snapshot did not export."""
        ...

    def snapshot_done(self) -> None:
        """The snapshot is durable (head and segment index): forget the changes it took."""
        ...


# Called with a fault point's name at each step of a snapshot (see SNAPSHOT_FAULT_POINTS).
# Never set in production; a crash test sets it to kill the process at that point.
FAULT_HOOK: Callable[[str], None] | None = None
SNAPSHOT_FAULT_POINTS = (
    "exported",  # a table's segments exported and their blocks put (once per table)
    "blocks-written",  # every table block written, not yet synced
    "blocks-synced",  # the table blocks synced; no manifest yet
    "root-written",  # the manifest and root blocks synced; HEAD still the old version
    "head-written",  # HEAD names the new version; the segment index still the old one's
    "index-written",  # the segment index names HEAD; the change log not yet cleared
    "done",  # the change log cleared
)


def _fault(point: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point)


@dataclass(frozen=True)
class Segment:
    """One exported segment: where its key range ends and what a manifest needs of it."""

    hi: int | None  # the last key of its range (a boundary); None: the open tail
    rows: int
    bytes: int
    cid: str
    tsize: int  # cumulative DAG size, for the directory link
    digest: str | None  # rows/1 of its rows

    def to_json(self) -> list[Any]:
        return [self.hi, self.rows, self.bytes, self.cid, self.tsize, self.digest]

    @classmethod
    def from_json(cls, doc: Any) -> Segment:
        hi, rows, size, cid, tsize, digest = doc
        return cls(
            None if hi is None else int(hi), int(rows), int(size), str(cid), int(tsize),
            None if digest is None else str(digest),
        )


_TAIL = Segment(None, 0, 0, "", 0, None)  # stands for the (empty) range above the last boundary


def _columns(conn: Any) -> dict[str, list[tuple[str, str]]]:
    """Table -> its (column, type) in order: one catalog query for every table."""
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, typ in conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall():
        out.setdefault(str(table), []).append((str(column), str(typ)))
    return out


class _TableExport:
    """One table's segments, exported inside the snapshot's read transaction.

    `full()` applies the segment rule to the whole table; `update(old, dirty)`
    re-exports only the segments whose key range meets a dirty interval (and
    a neighbour when a boundary key was deleted), keeping the others as they
    are: the result is the same list of segments either way.
    """

    def __init__(
        self,
        conn: Any,
        table: str,
        columns: list[tuple[str, str]],
        work: Path,
        put: Callable[[CID, bytes], None],
    ) -> None:
        self.conn = conn
        self.table = check_table_name(table)
        self.work = work
        self.put = put
        self.columns = columns
        key = schema.PRIMARY_KEYS.get(table)
        types = dict(columns)
        self.key = key if key in types and types[key] in segments.INTEGER_TYPES else None
        names = [c for c, _ in self.columns]
        # Key order; ties (a legacy table whose key is not unique) by every column.
        self.order = ", ".join(ident(c) for c in ([self.key] if self.key else []) + names)
        self.exported_rows = 0
        self.files: list[Path] = []  # exported segment files, kept when `keep`
        self.keep = False

    def full(self) -> list[Segment]:
        if self.key is None:
            return [self._whole()]
        out = self._pieces(None, None, self._boundaries(None, None))
        return out or [self._whole()]

    def update(self, old: list[Segment], dirty: list[Interval]) -> list[Segment]:
        if self.key is None:
            return old if not dirty else self.full()
        segs = list(old) + ([_TAIL] if old[-1].hi is not None else [])
        his = [s.hi for s in segs]

        def hit(i: int) -> bool:
            lo, hi = (his[i - 1] if i else None), his[i]
            return any(
                (dhi is None or lo is None or dhi > lo) and (hi is None or dlo is None or dlo <= hi)
                for dlo, dhi in dirty
            )

        marked = [hit(i) for i in range(len(segs))]
        out: list[Segment] = []
        i = 0
        while i < len(segs):
            if not marked[i]:
                if segs[i] is not _TAIL:
                    out.append(segs[i])
                i += 1
                continue
            end = i
            while end + 1 < len(segs) and marked[end + 1]:
                end += 1
            lo = his[i - 1] if i else None
            while True:
                bounds = self._boundaries(lo, his[end])
                if his[end] is None or (bounds and bounds[-1] == his[end]):
                    break
                # The boundary that closed this range was deleted: it merges with the next.
                end += 1
                while end + 1 < len(segs) and marked[end + 1]:
                    end += 1
            out += self._pieces(lo, his[end], bounds)
            i = end + 1
        return out or [self._whole()]

    def _boundaries(self, lo: int | None, hi: int | None) -> list[int]:
        assert self.key is not None
        # sql: range_sql/boundary_sql quote the key with ident() and format ints.
        rows = self.conn.execute(
            f"SELECT DISTINCT {ident(self.key)} FROM {ident(self.table)} "
            f"WHERE {segments.range_sql(self.key, lo, hi)} "
            f"AND {segments.boundary_sql(self.key)} ORDER BY 1"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _pieces(self, lo: int | None, hi: int | None, bounds: list[int]) -> list[Segment]:
        out = []
        prev = lo
        for b in bounds:
            seg = self._export(prev, b, tail=False)
            assert seg is not None
            out.append(seg)
            prev = b
        if hi is None:
            # The tail above the last boundary is left out when empty, unless it
            # is the whole table (an empty table is one empty segment).
            seg = self._export(prev, None, tail=prev is not None)
            if seg is not None:
                out.append(seg)
        return out

    def _whole(self) -> Segment:
        seg = self._export(None, None, tail=False)
        assert seg is not None
        return seg

    def _copy(self, where: str, order: str, path: Path) -> None:
        # sql: where/order quote names with ident(); the path goes through literal().
        self.conn.execute(
            f"COPY (SELECT * FROM {ident(self.table)} WHERE {where} ORDER BY {order}) "
            f"TO {literal(path)} (FORMAT parquet, COMPRESSION {PARQUET_COMPRESSION}, "
            f"ROW_GROUP_SIZE {ROW_GROUP_SIZE})"
        )

    def _key_order_digest(self, path: Path) -> str | None:
        """rows/1 of the file if its keys strictly increase (streaming), else None."""
        pf = pq.ParquetFile(path)
        digest = rowdigest.KeyOrderDigest(pf.schema_arrow, self.key)
        for batch in pf.iter_batches(batch_size=DIGEST_BATCH_ROWS):
            digest.feed(batch)
            if not digest.in_order:
                return None
        return digest.hexdigest()

    def _export(self, lo: int | None, hi: int | None, *, tail: bool) -> Segment | None:
        where = segments.range_sql(self.key, lo, hi) if self.key else "TRUE"
        path = self.work / f"{self.table}-{len(self.files):06d}{PARQUET_SUFFIX}"
        # By key alone first: with unique keys (every table of our schema) that is the
        # whole order, and sorting 100k rows by every column costs twice the export.
        self._copy(where, ident(self.key) if self.key else self.order, path)
        self.files.append(path)
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows == 0 and tail:
            path.unlink()
            self.files.pop()
            return None
        self.exported_rows += rows
        digest = self._key_order_digest(path)
        if digest is None:
            # Equal or NULL keys (legacy tables), or a type without a digest: the
            # rows need the full order (ties by every column) to be deterministic.
            path.unlink()
            self._copy(where, self.order, path)
            digest = parquet_digest(path, self.table)
        with open(path, "rb") as f:
            cid, size, tsize = unixfs.add_file(f, self.put)
        if not self.keep:
            # A scratch copy, deleted before the batch's filesystem sync so that it
            # does not write it to disk as well.
            path.unlink()
        return Segment(hi, rows, size, str(cid), tsize, digest)


def add_segments(
    table: str, segs: list[Segment], put: Callable[[CID, bytes], None]
) -> tuple[CID, int, TableInfo]:
    """The `tables/<table>/` directory of `segs`: (its CID, its Tsize, the manifest entry)."""
    if len(segs) > segments.MAX_SEGMENTS:
        raise SnapshotError(
            f"table {table} needs {len(segs)} segments, more than the {segments.MAX_SEGMENTS} "
            "one directory block holds without sharding; split the table or thin it"
        )
    cid, tsize = unixfs.add_directory(
        [(segments.segment_name(i), CID.decode(s.cid), s.tsize) for i, s in enumerate(segs)], put
    )
    info = TableInfo(
        rows=sum(s.rows for s in segs),
        bytes=sum(s.bytes for s in segs),
        cid=str(cid),
        digest=segments.combine([(s.rows, s.digest) for s in segs]),
        segments=len(segs),
    )
    return cid, tsize, info


def export_tables(conn: Any, dest: Path) -> dict[str, Path]:
    """Export every table of the open DuckDB connection to segment directories in `dest`.

    Returns table -> `dest/<table>/` holding its `part-NNNN.parquet` segments;
    all tables are read inside one transaction, so the files form a consistent
    cut even while writes go on beside them.
    """
    files: dict[str, Path] = {}
    conn.execute("BEGIN TRANSACTION")
    try:
        columns = _columns(conn)
        for table in snapshot_tables(conn):
            exporter = _TableExport(conn, table, columns[table], dest, lambda c, d: None)
            exporter.keep = True
            exporter.full()
            folder = dest / check_table_name(table)
            folder.mkdir()
            for i, path in enumerate(exporter.files):
                path.rename(folder / segments.segment_name(i))
            files[table] = folder
    finally:
        conn.execute("COMMIT")
    return files


def parquet_digest(path: Path, table: str) -> str | None:
    """The row digest of a table's Parquet file or segment directory; None: unsupported type.

    A file (one segment, or a table of the older layout): `rowdigest`'s
    rows/1, streaming when its rows are in key order (our export writes them
    so). A directory: `segments.combine` (rows/2) of its segments' rows/1.
    Raises BadSnapshot if a file cannot be read.
    """
    if path.is_dir():
        parts = []
        for part in segments.parquet_files(path):
            try:
                rows = pq.ParquetFile(part).metadata.num_rows
            except (pa.ArrowException, OSError, ValueError) as e:
                raise BadSnapshot(f"tables/{table}/{part.name} is not readable Parquet: {e}") from e
            parts.append((rows, parquet_digest(part, table)))
        return segments.combine(parts)
    try:
        arrow_schema = pq.ParquetFile(path).schema_arrow
        return rowdigest.table_digest(
            arrow_schema,
            lambda: pq.ParquetFile(path).iter_batches(batch_size=DIGEST_BATCH_ROWS),
            schema.PRIMARY_KEYS.get(table),
        )
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadSnapshot(f"tables/{table}.parquet is not readable Parquet: {e}") from e


def rows1_digest(files: list[Path], table: str) -> str | None:
    """rows/1 (the older layout's digest) of a table's segment files, streamed in order.

    None when a type is unsupported or the rows are not in unique key order.
    """
    try:
        digest = rowdigest.KeyOrderDigest(
            pq.ParquetFile(files[0]).schema_arrow, schema.PRIMARY_KEYS.get(table)
        )
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=DIGEST_BATCH_ROWS):
                digest.feed(batch)
        return digest.hexdigest()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadSnapshot(f"tables/{table}/ is not readable Parquet: {e}") from e


def same_content(a: dict[str, TableInfo], b: dict[str, TableInfo]) -> bool:
    """Do two manifests' tables hold the same rows, by their digests?

    False (undecided) unless both list the same tables, each with a digest.
    """
    if set(a) != set(b):
        return False
    return all(
        a[t].digest is not None and a[t].digest == b[t].digest and a[t].rows == b[t].rows
        for t in a
    )


def add_tables(
    files: dict[str, Path], put: Callable[[CID, bytes], None]
) -> tuple[CID, int, dict[str, tuple[CID, int]]]:
    """Chunk Parquet files or segment directories into the `tables/` directory.

    Returns (directory CID, its cumulative size, table -> (entry CID, bytes)).
    """
    entries = []
    added: dict[str, tuple[CID, int]] = {}
    for table, path in files.items():
        if path.is_dir():
            parts = []
            size = 0
            for i, part in enumerate(segments.parquet_files(path)):
                with open(part, "rb") as f:
                    cid, n, tsize = unixfs.add_file(f, put)
                parts.append((segments.segment_name(i), cid, tsize))
                size += n
            cid, tsize = unixfs.add_directory(parts, put)
            entries.append((check_table_name(table), cid, tsize))
        else:
            with open(path, "rb") as f:
                cid, size, tsize = unixfs.add_file(f, put)
            entries.append((f"{check_table_name(table)}{PARQUET_SUFFIX}", cid, tsize))
        added[table] = (cid, size)
    tables_cid, tables_tsize = unixfs.add_directory(entries, put)
    return tables_cid, tables_tsize, added


def snapshot_tables(conn: Any) -> list[str]:
    """Tables a snapshot carries: the schema's, then other base tables (e.g. legacy ones)."""
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_type = 'BASE TABLE' ORDER BY table_name"
    ).fetchall()
    present = {r[0] for r in rows}
    known = [t for t in schema.TABLES if t in present]
    # The schema version table records when *this* file was migrated: node-local, not content.
    # So is the change log of what the next snapshot must export again.
    extra = sorted(present - set(known) - {schema.VERSION_TABLE, CHANGES_TABLE})
    return known + extra


def _export_table(
    exporter: _TableExport, old: dict[str, Any] | None, dirty: Dirty, legacy: bool
) -> tuple[CID, int, TableInfo, str | None, dict[str, Any]]:
    """One table of a snapshot: (its directory CID, Tsize, manifest entry, rows/1, index entry).

    Incremental when the index entry `old` still describes the table (same key
    and columns) and the changes are known; otherwise every segment. rows/1 is
    computed only for a table of a one-file-layout head (`legacy`), to tell
    "no change" by that head's digest: from the segment files when all were
    exported, from the index when none was, so a dirty table is exported whole.
    """
    columns = [list(c) for c in exporter.columns]
    usable = (
        old is not None
        and dirty is not None
        and old["key"] == exporter.key
        and old["columns"] == columns
        and not (legacy and dirty.get(exporter.table))
    )
    exporter.keep = legacy
    try:
        if usable:
            assert old is not None and dirty is not None
            segs = exporter.update(
                [Segment.from_json(x) for x in old["segments"]], dirty.get(exporter.table, [])
            )
        else:
            segs = exporter.full()
        cid, tsize, info = add_segments(exporter.table, segs, exporter.put)
        rows1 = None
        if legacy and exporter.files and exporter.exported_rows == info.rows:
            rows1 = rows1_digest(exporter.files, exporter.table)
        elif legacy and exporter.exported_rows == 0 and old is not None:
            rows1 = old.get("rows1")
    finally:
        for path in exporter.files:
            path.unlink(missing_ok=True)
    entry = {"key": exporter.key, "columns": columns, "segments": [x.to_json() for x in segs]}
    if rows1 is not None:
        entry["rows1"] = rows1
    return cid, tsize, info, rows1, entry


@contextlib.contextmanager
def _memory_limit(conn: Any, limit: str) -> Iterator[None]:
    """DuckDB's memory limit lowered to `limit` for the block (a process-wide setting)."""
    old = conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    conn.execute(f"SET memory_limit = {literal(limit)}")
    try:
        yield
    finally:
        conn.execute(f"SET memory_limit = {literal(str(old))}")


@dataclass
class SnapshotResult:
    version: Version
    created: bool  # False when nothing changed since the head
    new_blocks: int = 0
    new_bytes: int = 0
    exported_rows: int = 0  # rows exported again (the rest reused unchanged segments)


class SnapshotStore:
    """Snapshots, history and restore for one dataset, over a blockstore.

    The head lives in `<state_dir>/HEAD.json`. The caller owns the database
    (and swapping it during a restore); this class owns blocks and history.
    """

    def __init__(self, state_dir: Path, blocks: Blockstore, dataset: str) -> None:
        self.state_dir = Path(state_dir)
        self.blocks = blocks
        self.dataset = dataset
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # head --------------------------------------------------------------------
    @property
    def head_path(self) -> Path:
        return self.state_dir / HEAD_FILENAME

    def head(self) -> Version | None:
        """The current version, or None before the first snapshot."""
        try:
            doc = json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SnapshotError(
                f"cannot read {self.head_path}: {e}; restore it from `benchsync log` of a peer "
                "or delete it to start a new history"
            ) from e
        cid = doc.get("cid") if isinstance(doc, dict) else None
        if not isinstance(cid, str):
            raise SnapshotError(
                f"{self.head_path} is damaged (no \"cid\" string); restore it from "
                "`benchsync log` of a peer or delete it to start a new history"
            )
        try:
            return read_version(self.blocks, cid)
        except BadSnapshot as e:
            raise BadSnapshot(
                f"{self.head_path} names {cid[:100]!r}, which is not a valid snapshot: {e}; "
                "delete it to start a new history"
            ) from e

    def _set_head(self, version: Version) -> None:
        atomic_write(self.head_path, json.dumps(version.to_json(), sort_keys=True).encode())

    # snapshot ----------------------------------------------------------------
    def snapshot(
        self, conn: Any, *, tmp_dir: Path | None = None, changes: ChangeSource | None = None
    ) -> SnapshotResult:
        """Export, chunk and store the database's tables; record a new head if anything changed.

        `conn` is a DuckDB connection (a read cursor is enough). `changes`
        (the `BenchmarkDB`) begins the read transaction and says what changed
        since its last snapshot (table -> key intervals): only those segments
        are exported again, when the local segment index matches the head.
        Without it everything is exported. Raises DiskFull or SnapshotError;
        on error the head is unchanged.
        """
        head = self.head()
        index = self._read_index(head)
        dirty: Dirty = None
        began = False
        # Tables of an older-layout head: "no change" compares their rows/1 digest.
        legacy = {
            t for t, info in (head.manifest.tables.items() if head else ())
            if info.segments is None and info.digest is not None
        }
        new_blocks = 0
        new_bytes = 0

        def put(cid: CID, data: bytes) -> None:
            nonlocal new_blocks, new_bytes
            if self.blocks.put(cid, data, verify=False):
                new_blocks += 1
                new_bytes += len(data)

        work = Path(tempfile.mkdtemp(prefix="snapshot-", dir=tmp_dir or self.state_dir))
        exported = 0
        try:
            try:
                with _memory_limit(conn, SNAPSHOT_MEMORY_LIMIT):
                    if changes is not None:
                        dirty = changes.begin_snapshot(conn)
                    else:
                        conn.execute("BEGIN TRANSACTION")
                    began = True
                    try:
                        # One durable sync for all the table blocks instead of an fsync per
                        # block; they are durable (and in place) when the batch ends.
                        with self.blocks.batch():
                            entries = []
                            tables: dict[str, TableInfo] = {}
                            compare: dict[str, TableInfo] = {}
                            kept: dict[str, Any] = {}
                            columns = _columns(conn)
                            for table in snapshot_tables(conn):
                                exporter = _TableExport(
                                    conn, table, columns[table], work, put
                                )
                                old = index.get(table) if dirty is not None else None
                                cid, tsize, info, rows1, kept[table] = _export_table(
                                    exporter, old, dirty, table in legacy
                                )
                                exported += exporter.exported_rows
                                _fault("exported")
                                entries.append((table, cid, tsize))
                                tables[table] = compare[table] = info
                                if table in legacy:
                                    compare[table] = replace(info, digest=rows1)
                            tables_cid, tables_tsize = unixfs.add_directory(entries, put)
                            _fault("blocks-written")
                        _fault("blocks-synced")
                    finally:
                        conn.execute("COMMIT")
                # The same bytes, or (another writer's bytes) the same rows: no new version.
                if head is not None and (
                    head.tables_cid == str(tables_cid)
                    or same_content(head.manifest.tables, tables)
                    or same_content(head.manifest.tables, compare)
                ):
                    self._write_index(head, kept)
                    self._done(changes)
                    return SnapshotResult(
                        version=head, created=False, exported_rows=exported
                    )
                manifest = Manifest(
                    dataset=self.dataset,
                    seq=(head.seq + 1) if head else 1,
                    parent=head.cid if head else None,
                    created_at=round(time.time(), 6),
                    schema_version=schema.SCHEMA_VERSION,
                    tables=tables,
                    writer=current_writer(),
                )
                version = self._commit(manifest, tables_cid, tables_tsize, put)
                _fault("head-written")
                self._write_index(version, kept)
                self._done(changes)
            except BaseException:
                if began and changes is not None:
                    changes.return_dirty(dirty)  # not exported: still to do
                raise
        except (OSError, BlockWriteError) as e:
            if _disk_full(e):
                raise DiskFull(
                    f"disk full while writing the snapshot ({e}); the database and history are "
                    "unchanged. Free some space (e.g. `benchsync gc`) and snapshot again"
                ) from e
            raise SnapshotError(f"snapshot failed: {e}") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return SnapshotResult(
            version=version,
            created=True,
            new_blocks=new_blocks,
            new_bytes=new_bytes,
            exported_rows=exported,
        )

    @staticmethod
    def _done(changes: ChangeSource | None) -> None:
        """HEAD and the index are durable: the changes this snapshot took are no longer owed."""
        _fault("index-written")
        if changes is not None:
            changes.snapshot_done()
        _fault("done")

    # the segment index -------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.state_dir / SEGMENT_INDEX_NAME

    def _read_index(self, head: Version | None) -> dict[str, Any]:
        """The head's segments per table, as the last snapshot left them; {} if unusable.

        Only an index naming the current head, written by this DuckDB, is
        used: anything else (another process's history, a restore, an upgrade,
        a damaged file) means a full export, which is always correct.
        """
        if head is None:
            return {}
        try:
            doc = json.loads(self.index_path.read_text())
            if (
                doc.get("format") != SEGMENT_INDEX_FORMAT
                or doc.get("head") != head.cid
                or doc.get("writer") != current_writer()
            ):
                return {}
            tables = doc["tables"]
            for entry in tables.values():  # checked once here, used without checks later
                entry["segments"] = [Segment.from_json(x).to_json() for x in entry["segments"]]
                if not entry["segments"]:
                    return {}
            return dict(tables)
        except (OSError, *_MALFORMED):
            return {}

    def _write_index(self, version: Version, tables: dict[str, Any]) -> None:
        doc = {
            "format": SEGMENT_INDEX_FORMAT,
            "head": version.cid,
            "writer": current_writer(),
            "tables": tables,
        }
        atomic_write(self.index_path, json.dumps(doc, sort_keys=True).encode())

    def _commit(
        self,
        manifest: Manifest,
        tables_cid: CID,
        tables_tsize: int,
        put: Callable[[CID, bytes], None],
    ) -> Version:
        with self.blocks.batch():  # the manifest and root blocks: durable before the head
            mcid, _, mtsize = unixfs.add_bytes(manifest.to_bytes(), put)
            root, _ = unixfs.add_directory(
                [(MANIFEST_NAME, mcid, mtsize), (TABLES_DIR, tables_cid, tables_tsize)], put
            )
        _fault("root-written")
        version = Version(cid=str(root), tables_cid=str(tables_cid), manifest=manifest)
        self._set_head(version)
        return version

    def record_restore(
        self, target: Version, digests: dict[str, str | None] | None = None
    ) -> Version:
        """Record a new head whose content is `target`'s, parented on the current head.

        `digests` (table -> row digest, as the restore verified them) fill in
        the ones `target`'s manifest lacks (an older manifest), so that the
        next snapshot of unchanged rows is no change whatever writes it.
        """
        head = self.head()
        digests = digests or {}
        tables = {
            name: info if info.digest is not None else replace(info, digest=digests.get(name))
            for name, info in target.manifest.tables.items()
        }
        manifest = Manifest(
            dataset=self.dataset,
            seq=(head.seq + 1) if head else 1,
            parent=head.cid if head else None,
            created_at=round(time.time(), 6),
            schema_version=target.manifest.schema_version,
            tables=tables,
            # tables/ is target's, bytes and all: so is its writer.
            writer=target.manifest.writer,
        )
        tables_cid = CID.decode(target.tables_cid)
        tsize = _cumulative_size(self.blocks, tables_cid)

        def put(cid: CID, data: bytes) -> None:
            self.blocks.put(cid, data, verify=False)

        return self._commit(manifest, tables_cid, tsize, put)

    # history -----------------------------------------------------------------
    def history(self, limit: int | None = None) -> list[Version]:
        """Versions newest first, following parent links from the head."""
        out: list[Version] = []
        version = self.head()
        while version is not None and (limit is None or len(out) < limit):
            out.append(version)
            if version.parent is None:
                break
            try:
                version = read_version(self.blocks, version.parent)
            except IncompleteSnapshot:
                break  # older history was garbage-collected or never fetched
        return out

    def find(self, cid: str) -> Version:
        """A version by root CID (or a unique prefix of one in the history).

        Raises NotFound for an unknown CID, a prefix shorter than MIN_CID_PREFIX
        characters (every one of our CIDs shares its first seven) or one that
        matches several versions; IncompleteSnapshot/BadSnapshot as read_version.
        """
        if not isinstance(cid, str) or len(cid) < MIN_CID_PREFIX:
            raise NotFound(
                f"{cid!r} is too short to name a version: give a full CID or at least "
                f"{MIN_CID_PREFIX} characters of one (see `benchsync log`)"
            )
        history = self.history()
        for version in history:
            if version.cid == cid or version.tables_cid == cid:
                return version
        matches = [v for v in history if v.cid.startswith(cid)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFound(f"{cid!r} is the prefix of {len(matches)} versions; give more of it")
        try:
            root = parse_cid_text(cid)
        except (ValueError, KeyError) as e:
            raise NotFound(f"no version {cid!r} in the history or the blockstore") from e
        return read_version(self.blocks, root)


def _disk_full(e: BaseException) -> bool:
    cause = e if isinstance(e, OSError) else e.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _cumulative_size(store: Blockstore, root: CID) -> int:
    return sum(len(data) for _, data in dag_blocks(store, root))


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


fsync_dir = fsync_path  # a directory's entries durable: the same one fsync
