"""The one place where outside text becomes part of a SQL string.

A CID proves bytes, not meaning: a table name out of a peer's snapshot, a
path under the data directory or a dataset ID can still carry `"` or `'` and
whatever SQL follows it. DuckDB runs every statement in a string, so nothing
from outside is ever pasted into SQL directly. Values go in as bind
parameters where DuckDB accepts them; where it does not (identifiers, and the
file argument of `read_parquet`/`COPY ... TO`, which must be constant), they
pass through the helpers below, which validate first and quote second.

Table names have one rule, `TABLE_NAME_RE`, used by snapshot validation,
restore, replicas and the query sandbox alike.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchsync.storage.errors import StorageError

# A table name we accept from a snapshot: lower-case SQL identifier, as the schema's are.
TABLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class UnsafeName(StorageError, ValueError):
    """A name from outside does not follow the rule for what it names."""


def check_table_name(name: str) -> str:
    """Return `name` if it is a valid table name; raise UnsafeName otherwise."""
    if not isinstance(name, str) or not TABLE_NAME_RE.fullmatch(name):
        raise UnsafeName(
            f"table name {name!r} is not allowed (want {TABLE_NAME_RE.pattern})"
        )
    return name


def ident(name: str) -> str:
    """A quoted SQL identifier. Any name is safe once quoted; `"` is doubled.

    NUL bytes are refused: DuckDB's parser would cut the string there.
    """
    if "\x00" in name:
        raise UnsafeName(f"identifier {name!r} contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def literal(value: str | Path) -> str:
    """A quoted SQL string literal, for the places DuckDB takes no bind parameter.

    Used for file paths in `read_parquet(...)` and `COPY ... TO ...`, which must be
    constants. NUL bytes are refused.
    """
    text = str(value)
    if "\x00" in text:
        raise UnsafeName(f"string {text!r} contains a NUL byte")
    return "'" + text.replace("'", "''") + "'"
