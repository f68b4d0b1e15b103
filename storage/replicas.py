"""Replicas: the latest verified snapshot of every dataset a node follows.

A replica is installed only from a complete, verified DAG in the blockstore:
its Parquet files are written into a fresh directory, checked against the
schema, and only then does the dataset's `CURRENT.json` pointer switch to it
(atomically). A reader therefore sees either the previous replica or the new
one, never a partial one.

Only the latest version of each dataset is kept: installing a new one removes
the previous folder (and block GC its blocks, since `roots` names only the
current ones). A dataset whose owner has not been seen for a while (it left
the lab) is dropped by `expire`.

Queries in the `replicas` scope see union views: each table name resolves to
the node's own rows plus every replica's, with an `origin` column naming the
dataset (peer ID) each row came from.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.storage import schema, segments
from benchsync.storage.blockstore import Blockstore
from benchsync.storage.snapshot import (
    PARQUET_SUFFIX,
    BadSnapshot,
    IncompleteSnapshot,
    Version,
    atomic_write,
    materialize_tables,
    missing_blocks,
)
from benchsync.storage.sqlnames import TABLE_NAME_RE, check_table_name, ident, literal

CURRENT_FILENAME = "CURRENT.json"
SEEN_FILENAME = "SEEN.json"  # when the dataset's owner or head was last seen in the lab
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

    def install(self, version: Version, conn: Any) -> Replica:
        """Install `version` as its dataset's replica; returns it.

        `conn` is a DuckDB connection of the node's own database, used to check
        the Parquet files against our schema. Raises IncompleteSnapshot if any
        block is missing, BadSnapshot if the content is not valid.
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
        dest = self.root / dataset / version.cid
        staging = dest.with_name(f".{version.cid}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            files = materialize_tables(self.blocks, version, staging)
            for table, path in files.items():
                check_parquet_schema(conn, table, path)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replica = Replica(
            dataset=dataset,
            root=version.cid,
            seq=version.seq,
            created_at=version.created_at,
            installed_at=time.time(),
            bytes=version.manifest.total_bytes,
            rows={n: t.rows for n, t in version.manifest.tables.items()},
            tables={t: dest / path.name for t, path in files.items()},
        )
        atomic_write(self.root / dataset / CURRENT_FILENAME, json.dumps(replica.to_json()).encode())
        if current is not None and current.root != version.cid:
            shutil.rmtree(self.root / dataset / current.root, ignore_errors=True)
        return replica

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

        Also removes what a crash left: folders being dropped, and version
        folders beside a dataset's current one. Call it where no `install`
        runs at the same time (the dataset's lock).
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
                if child.is_dir() and not child.name.startswith(".") and child.name != replica.root:
                    shutil.rmtree(child, ignore_errors=True)  # a crash between switch and remove
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
        """Bytes of the installed replicas' files (their Parquet, not their blocks)."""
        total = 0
        for path in self.root.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # an install or drop going on
                if path.is_file():
                    total += path.stat().st_size
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
