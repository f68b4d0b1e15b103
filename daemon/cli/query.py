"""`benchsync query SQL`: run read-only SQL and print the answer as a table, JSON or CSV.

Scope `local` opens the node's own database read-only. Scopes `replicas` and
`network` need a running node and are wired by the daemon later; for now they
fail with a hint. `format_arrow` is the one place an Arrow answer becomes text.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from benchsync.daemon.cli.common import CLIError, data_dir
from benchsync.storage.db import DB_FILENAME, BenchmarkDB, DatabaseLocked
from benchsync.storage.errors import StorageError

SCOPES = ("local", "replicas", "network")
FORMATS = ("table", "json", "csv")
MAX_CELL_WIDTH = 60  # characters of one cell in --format table before it is cut


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="run read-only SQL on benchmark results")
    p.add_argument("sql", metavar="SQL", help="one SQL statement, e.g. 'SELECT * FROM models'")
    p.add_argument("--scope", choices=SCOPES, default="local",
                   help="local: this node's database (default); replicas: plus replicated "
                        "snapshots; network: live fan-out to peers")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("--home", help="data directory (default: $BENCHSYNC_HOME, else XDG data dir)")
    p.set_defaults(func=run)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, default=_jsonable)
    return str(_jsonable(value))


def format_arrow(table: pa.Table, fmt: str) -> str:
    """Render an answer: `table` (aligned columns), `json` (one array of objects) or `csv`."""
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        return json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows],
                          default=_jsonable, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([_text(r[n]) for n in names] for r in rows)
        return buf.getvalue().rstrip("\n")
    cells = [[_text(r[n])[:MAX_CELL_WIDTH] for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.scope != "local":
        raise CLIError(f"--scope {args.scope} needs a running node",
                       "start one with `benchsync up`, or use --scope local")
    path = data_dir(args.home) / DB_FILENAME
    if not path.exists():
        raise CLIError(f"no database at {path}",
                       "record results first (`benchsync record perf ...`) or pass --home")
    try:
        with BenchmarkDB(path, read_only=True) as db:
            answer = db.query(args.sql)
    except DatabaseLocked as e:
        raise CLIError(str(e), "stop the running node, or query through it with "
                       "--scope replicas|network") from None
    except duckdb.Error as e:
        raise CLIError(f"query failed: {e}".strip(),
                       "check the SQL; tables: models, hardware_platforms, test_runs, "
                       "performance_results, hardware_compatibility, integration_test_results, "
                       "integration_test_assertions (the database is opened read-only)") from None
    except StorageError as e:
        raise CLIError(str(e), f"check {path}") from None
    print(format_arrow(answer, args.format))
    return 0
