"""Replicas: the latest verified snapshot of every dataset a node follows.

A replica is installed only from a complete, verified DAG in the blockstore.
Its Parquet files are content-addressed and shared across versions
(`<dataset>/files/<file-cid>.parquet`, see `replica_files`): the syncer
receives each leaf straight into its file, so a version's folder
(`<dataset>/<version-cid>/`) is made of hard links to them, checked against
the manifest and the schema, and only then does the dataset's `CURRENT.json`
pointer switch to it (atomically). A reader therefore sees either the
previous replica or the new one, never a partial one.

Only the latest version of each dataset is kept: installing a new one removes
the previous folder and the files no version links any more, with the
reference blocks into them (block GC takes the rest of its blocks, since
`roots` names only the current ones). A dataset whose owner has not been seen for a while (it left
the lab) is dropped by `expire`.

Queries in the `replicas` scope see union views: each table name resolves to
the node's own rows plus every replica's, with an `origin` column naming the
dataset (peer ID) each row came from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.storage import dagpb, schema, segments, unixfs
from benchsync.storage.blockstore import Blockstore
from benchsync.storage.cid import RAW, cid_text
from benchsync.storage.errors import NotFound, StorageError
from benchsync.storage.replica_files import (
    FILES_DIR,
    ActiveFiles,
    ReplicaPlacement,
    drop_refs_into,
    file_cids,
    file_leaves,
    file_name,
    version_files,
)
from benchsync.storage.snapshot import (
    PARQUET_SUFFIX,
    BadSnapshot,
    DiskFull,
    IncompleteSnapshot,
    ParquetCheck,
    SnapshotError,
    Version,
    atomic_write,
    check_distinct_bytes,
    check_parquet_file,
    fsync_dir,
    missing_blocks,
    verified_getter,
)
from benchsync.storage.sqlnames import TABLE_NAME_RE, check_table_name, ident, literal

CURRENT_FILENAME = "CURRENT.json"
SEEN_FILENAME = "SEEN.json"  # when the dataset's owner or head was last seen in the lab
# file CID -> its Parquet check (`ParquetCheck`): an unchanged segment is not decoded again
CHECKS_FILENAME = "CHECKS.json"
DROPPED_PREFIX = ".dropped-"  # a dataset folder being removed (a crash leaves it: removed later)
# (file type, table type) pairs whose values load exactly: a version or replica written
# before a migration widened a column (schema 3: FLOAT -> DOUBLE) still loads and reads.
LOSSLESS_WIDENING = frozenset({
    ("FLOAT", "DOUBLE"), ("TINYINT", "SMALLINT"), ("TINYINT", "INTEGER"),
    ("TINYINT", "BIGINT"), ("SMALLINT", "INTEGER"), ("SMALLINT", "BIGINT"),
    ("INTEGER", "BIGINT"),
})  # fmt: skip
# A dataset is named by its peer ID (base58btc, or a CIDv1 in base32): it names a folder.
DATASET_RE = re.compile(r"^[A-Za-z0-9]{1,128}$")


@dataclass(frozen=True)
class Replica:
    dataset: str
    root: str
    seq: int
    created_at: float
    installed_at: float
    bytes: int
    rows: dict[str, int]
    tables: dict[str, Path]  # table name -> Parquet file, or directory of its segments

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "seq": self.seq,
            "created_at": self.created_at,
            "installed_at": self.installed_at,
            "bytes": self.bytes,
            "rows": self.rows,
        }


def _safe_component(dataset: str) -> str:
    # Peer IDs are base58; anything else must not escape the replicas directory.
    if not isinstance(dataset, str) or not DATASET_RE.fullmatch(dataset):
        raise BadSnapshot(f"dataset name {dataset!r} is not a peer ID")
    return dataset


def check_parquet_schema(
    conn: Any, table: str, path: Path, *, extra_columns: bool = True
) -> None:
    """Raise BadSnapshot if `path` does not hold rows of our `table`.

    Every column the file shares with our table must have the same type (or
    one `LOSSLESS_WIDENING` makes it: a file from before a migration), and the
    table's primary key must be present. Extra columns (a newer schema) are
    allowed if `extra_columns` (replicas: the union views' BY NAME unions do
    not show them); a restore, which loads the rows into our tables, refuses them.
    """
    check_table_name(table)
    try:
        # sql: read_parquet_sql quotes every path with literal().
        src = segments.read_parquet_sql(path)
        got = {
            r[0]: r[1]
            for r in conn.execute(
                f"DESCRIBE SELECT * FROM {src}"
            ).fetchall()
        }
    except Exception as e:  # duckdb raises many kinds for a damaged file
        raise BadSnapshot(f"tables/{table}.parquet is not readable Parquet: {e}") from e
    if table not in schema.TABLES:
        return
    want = {r[0]: r[1] for r in conn.execute(f"DESCRIBE {ident(table)}").fetchall()}
    extra = sorted(set(got) - set(want))
    if extra and not extra_columns:
        raise BadSnapshot(
            f"tables/{table}.parquet has {len(extra)} column(s) our {table} lacks "
            f"({', '.join(repr(c) for c in extra[:5])}); it was written by a newer schema"
        )
    key = schema.PRIMARY_KEYS.get(table)
    if key and key not in got:
        raise BadSnapshot(f"tables/{table}.parquet lacks the key column {key!r}")
    for col, typ in got.items():
        if col in want and want[col] != typ and (typ, want[col]) not in LOSSLESS_WIDENING:
            raise BadSnapshot(
                f"tables/{table}.parquet: column {col!r} is {typ}, expected {want[col]}"
            )


def _load_checks(path: Path) -> dict[str, ParquetCheck]:
    """The dataset's remembered Parquet checks by file CID; none if absent or damaged
    (a cache: what it lacks is checked again)."""
    try:
        doc = json.loads(path.read_bytes())
        return {str(cid): ParquetCheck.from_json(c) for cid, c in doc.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _installed_tables(folder: Path) -> dict[str, Path]:
    tables: dict[str, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for p in sorted(folder.iterdir()):
            if p.is_dir() and TABLE_NAME_RE.fullmatch(p.name):
                tables[p.name] = p
            elif p.suffix == PARQUET_SUFFIX and TABLE_NAME_RE.fullmatch(p.stem):
                tables[p.stem] = p
    return tables


class ReplicaStore:
    """Installed replicas under `<root>/<dataset>/<snapshot root>/`."""

    def __init__(self, root: Path, blocks: Blockstore) -> None:
        self.root = Path(root)
        self.blocks = blocks
        self.root.mkdir(parents=True, exist_ok=True)
        self._active = ActiveFiles()  # files fetches write now, and files known complete

    def placement(self, dataset: str, root: CID) -> ReplicaPlacement:
        """Where a fetch of `dataset`'s version `root` writes its table files' leaves:
        pass `.files` to `Fetcher.fetch(place=...)`, then `finish()`, always `close()`."""
        folder = self.root / _safe_component(dataset) / FILES_DIR
        return ReplicaPlacement(self.blocks, root, folder, self._active)

    def install(self, version: Version, conn: Any) -> Replica:
        """Install `version` as its dataset's replica; returns it.

        `conn` is a DuckDB connection of the node's own database, used to check
        the Parquet files against our schema. Raises IncompleteSnapshot if any
        block is missing, BadSnapshot if the content is not valid.

        Each table file is the dataset's content-addressed file of its CID
        (`files/<file-cid>.parquet`): one a placed fetch completed, or one an
        earlier version linked, is used as it is; any other is written from the
        blocks (the copying path: a fetch without placement, a file whose layout
        cannot be placed, or one a crash left unfinished). The version's folder
        is then a folder of hard links to them, checked, and the pointer flips.
        """
        dataset = _safe_component(version.manifest.dataset)
        current = self.get(dataset)
        if current is not None and current.root == version.cid:
            return current
        if current is not None and current.seq >= version.seq:
            raise BadSnapshot(
                f"replica of {dataset} is at seq {current.seq}; refusing older seq {version.seq}"
            )
        root = CID.decode(version.cid)
        missing = missing_blocks(self.blocks, root)
        if missing:
            raise IncompleteSnapshot(
                f"{len(missing)} block(s) of {version.cid} missing, e.g. {missing[0]}"
            )
        folder = self.root / dataset
        files_dir = folder / FILES_DIR
        files_dir.mkdir(parents=True, exist_ok=True)
        links = version_files(self.blocks, version)  # checked names: all that reaches the disk
        dest = folder / version.cid
        staging = folder / f".{version.cid}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        live: dict[Path, CID] = {}
        known = _load_checks(folder / CHECKS_FILENAME)
        checks: dict[str, ParquetCheck] = {}
        try:
            staging.mkdir()
            for table, link in links.items():
                info = version.manifest.tables[table]
                paths = [self._complete_file(files_dir, table, cid) for cid in file_cids(link)]
                live.update(zip(paths, file_cids(link), strict=True))
                size = sum(p.stat().st_size for p in paths)
                if size != info.bytes:
                    raise BadSnapshot(
                        f"tables/{table} holds {size} bytes, the manifest claims {info.bytes}"
                    )
                if link.parts is None:
                    out = staging / f"{check_table_name(table)}{PARQUET_SUFFIX}"
                    _link(paths[0], out)
                else:
                    out = staging / check_table_name(table)
                    out.mkdir()
                    for (name, _), path in zip(link.parts, paths, strict=True):
                        _link(path, out / name)
                    fsync_dir(out)
                by_path = {out: cid_text(link.cid)} if link.parts is None else {
                    out / name: cid_text(cid) for name, cid in link.parts
                }
                earlier = {p: known[c] for p, c in by_path.items() if c in known}
                found = check_parquet_file(out, table, info, earlier.get)
                checks.update((by_path[p], c) for p, c in found.items())
                check_parquet_schema(conn, table, out)
            fsync_dir(staging)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
            fsync_dir(folder)
            # Before the pointer names the version: its leaves must not point into
            # files the sweep below removes.
            self._repoint(files_dir, live)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            # What this install wrote for a refused version goes (an installed
            # version's files are linked, a running fetch's are active: kept).
            self._sweep(files_dir, set())
            for empty in (files_dir, folder):
                with contextlib.suppress(OSError):
                    empty.rmdir()
            raise
        replica = Replica(
            dataset=dataset,
            root=version.cid,
            seq=version.seq,
            created_at=version.created_at,
            installed_at=time.time(),
            bytes=version.manifest.total_bytes,
            rows={n: t.rows for n, t in version.manifest.tables.items()},
            tables=_installed_tables(dest),
        )
        atomic_write(folder / CURRENT_FILENAME, json.dumps(replica.to_json()).encode())
        atomic_write(  # the installed version's files only: a swept file's check goes too
            folder / CHECKS_FILENAME,
            json.dumps({cid: c.to_json() for cid, c in checks.items()}).encode(),
        )
        self._remove_other_versions(folder, version.cid)
        self._sweep(files_dir, set(live))
        return replica

    def _complete_file(self, files_dir: Path, table: str, cid: CID) -> Path:
        """The content-addressed file of `cid`, complete: written from the blocks unless a
        placed fetch completed it in this process or an installed version links it."""
        path = files_dir / file_name(cid)
        with contextlib.suppress(FileNotFoundError):
            if self._active.is_complete(path) or path.stat().st_nlink > 1:
                return path
        info_bytes = unixfs_size(self.blocks, cid)
        check_distinct_bytes(verified_getter(self.blocks), table, cid, info_bytes)
        tmp = files_dir / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                for chunk in unixfs.cat(verified_getter(self.blocks), cid):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # refs into the old inode's bytes stay valid: same bytes
        except OSError as e:
            what = f"could not write replica file {path}: {e}"
            if _full(e):
                raise DiskFull(f"{what}; free disk space: the next sync retries") from e
            raise SnapshotError(what) from e
        except StorageError as e:
            if isinstance(e, SnapshotError):
                raise
            raise BadSnapshot(f"tables/{table} ({cid}): {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(files_dir)
        self._active.finished([path])
        return path

    def _repoint(self, files_dir: Path, live: dict[Path, CID]) -> None:
        """Re-point at a live file every leaf of `live` stored as a reference into another
        of the dataset's files (a leaf shared with a file that is going away)."""
        here = Path(os.path.abspath(files_dir))
        live_abs = {Path(os.path.abspath(p)) for p in live}
        if all(here / p.name in live_abs for p in here.iterdir() if not p.name.startswith(".")):
            return  # no file is going away (a first version): nothing points into one
        for path, cid in live.items():
            for leaf, offset, size in list(file_leaves(self.blocks, cid)):
                try:
                    ref = self.blocks.file_ref(leaf)
                except NotFound:
                    continue
                if ref is None or ref.path.parent != here or ref.path in live_abs:
                    continue
                self.blocks.delete(leaf)
                self.blocks.put_ref(leaf, path, offset, size)  # verified: read once

    def _remove_other_versions(self, folder: Path, keep: str) -> None:
        for child in folder.iterdir():
            if child.is_dir() and child.name not in (keep, FILES_DIR):
                shutil.rmtree(child, ignore_errors=True)  # old versions, crashed stagings

    def _sweep(self, files_dir: Path, live: set[Path]) -> None:
        """Remove the content-addressed files no installed version links, no fetch is
        writing and `live` does not name; their reference blocks go first."""
        try:
            children = list(files_dir.iterdir())
        except FileNotFoundError:
            return
        for path in children:
            try:
                if path.name.startswith("."):
                    path.unlink()  # a copy a crash cut short (installs hold the lock)
                    continue
                if path in live or path in self._active or path.stat().st_nlink > 1:
                    continue
                drop_refs_into(self.blocks, path)
                path.unlink()
                self._active.forget(path)
            except FileNotFoundError:
                continue

    def get(self, dataset: str) -> Replica | None:
        pointer = self.root / dataset / CURRENT_FILENAME
        try:
            doc = json.loads(pointer.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a damaged pointer means no usable replica; the next sync reinstalls
        folder = self.root / dataset / doc["root"]
        return Replica(
            dataset=doc["dataset"],
            root=doc["root"],
            seq=int(doc["seq"]),
            created_at=float(doc["created_at"]),
            installed_at=float(doc["installed_at"]),
            bytes=int(doc["bytes"]),
            rows={k: int(v) for k, v in doc["rows"].items()},
            # Only what `install` can have written: names it checked, a segment
            # directory per table (or a file, for a version in the one-file layout).
            tables=_installed_tables(folder),
        )

    def all(self) -> list[Replica]:
        out = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                replica = self.get(child.name)
                if replica is not None:
                    out.append(replica)
        return out

    def mark_seen(self, dataset: str, when: float) -> None:
        """Record that `dataset`'s owner (or a head of it) was seen in the lab at `when`."""
        folder = self.root / _safe_component(dataset)
        if (folder / CURRENT_FILENAME).exists():
            atomic_write(folder / SEEN_FILENAME, json.dumps({"seen_at": when}).encode())

    def last_seen(self, replica: Replica) -> float:
        """When `replica`'s dataset was last installed or seen, whichever is later."""
        try:
            seen = float(json.loads((self.root / replica.dataset / SEEN_FILENAME).read_text())
                         ["seen_at"])  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            seen = 0.0
        return max(replica.installed_at, seen)

    def expire(self, now: float, max_age: float) -> list[str]:
        """Drop the replicas not installed or seen for `max_age` seconds; their datasets.

        Also removes what a crash left: folders being dropped, version folders
        beside a dataset's current one, and content-addressed files no version
        links and no running fetch writes (with their reference blocks). Call
        it where no `install` runs at the same time (the dataset's lock).
        """
        for leftover in self.root.glob(f"{DROPPED_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        dropped = []
        for replica in self.all():
            folder = self.root / replica.dataset
            if max_age > 0 and now - self.last_seen(replica) > max_age:
                self.drop(replica.dataset)
                dropped.append(replica.dataset)
                continue
            for child in folder.iterdir():
                if (child.is_dir() and not child.name.startswith(".")
                        and child.name not in (replica.root, FILES_DIR)):  # fmt: skip
                    shutil.rmtree(child, ignore_errors=True)  # a crash between switch and remove
            self._sweep(folder / FILES_DIR, set())  # what a crash left in files/
        installed = {r.dataset for r in self.all()}
        for child in self.root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name not in installed:
                # Files of a first version never installed (its fetch failed or a crash
                # cut it): a fetch writing now keeps its own (active); the rest goes.
                self._sweep(child / FILES_DIR, set())
        return dropped

    def drop(self, dataset: str) -> None:
        """Remove `dataset`'s replica: its pointer goes first (one rename), then its files."""
        folder = self.root / _safe_component(dataset)
        if not folder.exists():
            return
        gone = self.root / f"{DROPPED_PREFIX}{dataset}"
        shutil.rmtree(gone, ignore_errors=True)
        folder.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes of the installed replicas' files (their Parquet, not their blocks).

        A file linked from several versions' folders (and `files/`) counts once."""
        total = 0
        seen: set[tuple[int, int]] = set()
        for path in self.root.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # an install or drop going on
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total

    def roots(self) -> list[CID]:
        """Roots to keep through garbage collection."""
        return [CID.decode(r.root) for r in self.all()]

    def union_view_sql(
        self, own_catalog: str, own_dataset: str, own_tables: list[str]
    ) -> list[str]:
        """Statements creating TEMP union views (with `origin`) over own tables and all replicas."""
        replicas = self.all()
        statements = []
        names = list(own_tables)
        for r in replicas:
            names += [t for t in r.tables if t not in names]
        for table in names:
            parts = []
            if table in own_tables:
                parts.append(
                    f"SELECT {literal(own_dataset)} AS origin, * "
                    f"FROM {ident(own_catalog)}.main.{ident(table)}"
                )
            for r in replicas:
                if table in r.tables:
                    # sql: read_parquet_sql quotes every path with literal().
                    parts.append(
                        f"SELECT {literal(r.dataset)} AS origin, * "
                        f"FROM {segments.read_parquet_sql(r.tables[table])}"
                    )
            body = " UNION ALL BY NAME ".join(parts)  # sql: parts quote with ident()/literal()
            statements.append(f"CREATE OR REPLACE TEMP VIEW {ident(table)} AS {body}")
        return statements


def _link(src: Path, dst: Path) -> None:
    """`dst` names the content-addressed file `src` (a hard link: no bytes copied)."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)  # a filesystem without hard links: the copying path


def _full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def unixfs_size(store: Blockstore, cid: CID) -> int:
    """The bytes a file DAG claims: a raw leaf's size, or its root node's filesize."""
    if cid.codec.code == RAW:
        return store.size(cid)
    try:
        _, data = dagpb.decode_node(store.get(cid))
        fs = dagpb.decode_unixfs(data or b"")
    except dagpb.DagPbError as e:
        raise BadSnapshot(f"{cid} is not a UnixFS file: {e}") from e
    return fs.filesize if fs.filesize is not None else len(fs.data) + sum(fs.blocksizes)
