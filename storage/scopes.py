"""What a query sees in each scope, as Arrow tables handed to a sandbox.

A sandbox reads no files itself: the caller hands in the tables of the
query's scope (`ScopeInput`) and `scope_tables` turns them into the name ->
table mapping a `QuerySandbox` loads:

- `local`: the node's own tables, as they are.
- `replicas`: each table name is the union (by column name, missing columns
  NULL, like DuckDB's `UNION ALL BY NAME`) of the node's own rows and every
  installed replica's, with a leading `origin` column naming the dataset
  (peer ID) each row came from.
- one dataset (`ScopeInput(own, origin=...)` with no replicas, or only empty
  own tables and one replica): what a node answers for one dataset in the
  `network` scope, with the same `origin` column and ids as `replicas`.

Ids across origins. `model_id`, `hardware_id`, `run_id`, ... (every column
named in `schema.ID_COLUMNS`, as a key or a reference, in every table) are
per-node counters: model 1 of node A is not model 1 of node B. Wherever rows
carry an `origin` column, each such column holds `global_id(origin, id)`
instead: `origin_tag(origin) * 2**32 + id` as BIGINT, where the tag is 31
bits of the SHA-256 of the dataset ID. So a join on ids only ever matches
rows of one origin (`r JOIN models m USING (model_id)` gives what one
database holding every node's rows would), the same row has the same id in
every scope, on every node and in every query, and the local id is
`id % 2**32`. Two origins in one scope with the same tag (odds about
n^2 / 2^32) are refused (`OriginTagCollision`) rather than mis-joined. The
`local` scope keeps the node's own ids as they are.

Replica tables are Parquet files under the node's replicas directory, named
by the caller (the replica store): a file, or a table's segment directory
whose `part-NNNN.parquet` files are read in order; they are read here with
pyarrow, never by DuckDB, and only those files. Table names pass `check_table_name` first.
In the daemon this runs inside the sandbox's worker process, so a replica
whose Parquet expands beyond the worker's memory limit costs that worker only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchsync.storage import segments
from benchsync.storage.errors import StorageError
from benchsync.storage.schema import ID_COLUMNS
from benchsync.storage.sqlnames import check_table_name

ORIGIN_COLUMN = "origin"
ID_BITS = 32  # low bits of a global id: the local id (ids are 32-bit INTEGERs)
TAG_BITS = 31  # high bits: the origin's tag (a global id stays a positive BIGINT)


class OriginTagCollision(StorageError):
    """Two datasets of one scope have the same origin tag: their ids could mis-join."""


def origin_tag(origin: str) -> int:
    """The `TAG_BITS`-bit tag of a dataset ID (the high bits of its global ids)."""
    digest = hashlib.sha256(origin.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") >> (32 - TAG_BITS)


def global_id(origin: str, local_id: int) -> int:
    """The id a cross-node view shows for `origin`'s local id `local_id`."""
    return (origin_tag(origin) << ID_BITS) + local_id


@dataclass(frozen=True)
class ReplicaTables:
    """One installed replica: its dataset (peer ID) and its Parquet file or segment
    directory (`tables/<table>/part-NNNN.parquet`, read in part order) per table."""

    dataset: str
    tables: Mapping[str, Path]

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "tables": {k: str(v) for k, v in self.tables.items()}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReplicaTables:
        return cls(str(doc["dataset"]), {str(k): Path(v) for k, v in doc["tables"].items()})


@dataclass(frozen=True)
class ScopeInput:
    """The data of one scope: own tables, and (replicas scope) origin and replicas.

    `origin` None means the local scope: own tables only, no `origin` column.
    """

    own: Mapping[str, pa.Table]
    origin: str | None = None
    replicas: Sequence[ReplicaTables] = field(default_factory=tuple)


def scope_tables(scope: ScopeInput) -> dict[str, pa.Table]:
    """The tables a query in `scope` sees (name -> Arrow table).

    Raises UnsafeName for a table name outside the rule, OSError or
    pyarrow.ArrowInvalid for an unreadable replica file, pyarrow.ArrowTypeError
    when a replica's column cannot be unified with ours, OriginTagCollision
    when two of the scope's datasets share an origin tag.
    """
    if scope.origin is None:
        return {check_table_name(name): table for name, table in scope.own.items()}
    _check_tags([scope.origin, *(r.dataset for r in scope.replicas)])
    parts: dict[str, list[pa.Table]] = {}
    for name, table in scope.own.items():
        parts.setdefault(check_table_name(name), []).append(_with_origin(table, scope.origin))
    for replica in scope.replicas:
        for name, path in replica.tables.items():
            # A file (a version in the one-file layout) or a directory of segments.
            files = segments.parquet_files(path)
            table = pa.concat_tables(
                [pq.read_table(p) for p in files], promote_options="permissive"
            )
            parts.setdefault(check_table_name(name), []).append(
                _with_origin(table, replica.dataset)
            )
    return {name: pa.concat_tables(ts, promote_options="permissive") for name, ts in parts.items()}


def _check_tags(origins: Sequence[str]) -> None:
    seen: dict[int, str] = {}
    for origin in dict.fromkeys(origins):
        other = seen.setdefault(origin_tag(origin), origin)
        if other != origin:
            raise OriginTagCollision(
                f"datasets {other} and {origin} have the same origin tag, so their ids "
                "cannot be told apart in one scope; query them in the network scope "
                "one at a time (--peer)"
            )


def _with_origin(table: pa.Table, origin: str) -> pa.Table:
    table = _plain(table)
    if ORIGIN_COLUMN in table.column_names:
        table = table.drop_columns([ORIGIN_COLUMN])
    offset = pa.scalar(origin_tag(origin) << ID_BITS, pa.int64())
    for i, f in enumerate(table.schema):
        if f.name in ID_COLUMNS and (pa.types.is_integer(f.type) or pa.types.is_null(f.type)):
            ids = pc.add(pc.cast(table.column(i), pa.int64()), offset)
            table = table.set_column(i, pa.field(f.name, pa.int64(), f.nullable), ids)
    return table.add_column(0, ORIGIN_COLUMN, pa.repeat(origin, table.num_rows))


def _plain(table: pa.Table) -> pa.Table:
    """Extension columns as their storage type: DuckDB hands JSON over as
    `arrow.json`, Parquet reads it back as string, and the union needs one type."""
    for i, f in enumerate(table.schema):
        if isinstance(f.type, pa.BaseExtensionType):
            column = table.column(i)
            plain = pa.chunked_array([c.storage for c in column.chunks], type=f.type.storage_type)
            table = table.set_column(i, pa.field(f.name, f.type.storage_type), plain)
    return table
