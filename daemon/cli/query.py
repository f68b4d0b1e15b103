"""`benchsync query SQL`: run read-only SQL and print the answer as a table, JSON or CSV.

With a node running, every scope goes through its control API (its sandbox
worker processes and limits). Offline, scopes `local` and `replicas` open the
data directory read-only and run the query in this process through
`LocalDataset.query`: the same read-only gate and sandbox (no files, no
settings, no extensions), under the same settings (`query_timeout`,
`query_max_rows`, `query_max_bytes`, `query_memory_limit`), never on the
database itself. Scope `network` needs a running node. `format_arrow` is the
one place an Arrow answer becomes text.

A network answer that lacks any known dataset's rows (neither its origin nor
a replica answered) is partial: exit status `EXIT_PARTIAL` (3), the missing
datasets on stderr, `"complete": false` and `"missing"` in `--format json`,
and the rows printed only with `--allow-partial`. `--require-all` was the
opt-in for this; it is now the default and the flag an accepted no-op.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any

import pyarrow as pa

from benchsync.daemon.answers import json_value
from benchsync.daemon.cli.common import (
    CLIError,
    add_node_arguments,
    call_node,
    data_dir,
    node_client,
)
from benchsync.daemon.config import load_config
from benchsync.daemon.control import ControlClient
from benchsync.storage.db import DB_FILENAME, DatabaseLocked
from benchsync.storage.errors import StorageError
from benchsync.storage.sandbox import QueryError, QueryLimits

SCOPES = ("local", "replicas", "network")
FORMATS = ("table", "json", "csv")
EXIT_PARTIAL = 3  # DESIGN's exit status for a partial answer
MAX_CELL_WIDTH = 60  # characters of one cell in --format table before it is cut
QUERY_HINT = ("one read-only SELECT over the tables models, hardware_platforms, test_runs, "
              "performance_results, hardware_compatibility, integration_test_results, "
              "integration_test_assertions; no files or settings")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="run read-only SQL on benchmark results")
    p.add_argument("sql", metavar="SQL", help="one SQL statement, e.g. 'SELECT * FROM models'")
    p.add_argument("--scope", choices=SCOPES, default="local",
                   help="local: this node's database (default); replicas: plus replicated "
                        "snapshots; network: live fan-out to peers")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("--allow-partial", action="store_true",
                   help="network scope: print the rows of an answer that lacks some "
                        "dataset's rows (still exit status 3)")
    p.add_argument("--require-all", action="store_true",
                   help="accepted and ignored: refusing partial answers is now the default "
                        "(this alias goes in the next release)")
    p.add_argument("--peer", action="append", metavar="PEER_ID",
                   help="network scope: ask only this peer (repeatable)")
    p.add_argument("--timeout", type=float, help="network scope: seconds to wait for peers")
    add_node_arguments(p)
    p.set_defaults(func=run)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, default=json_value)
    return str(json_value(value))


def format_arrow(table: pa.Table, fmt: str) -> str:
    """Render an answer: `table` (aligned columns), `json` (one array of objects) or `csv`."""
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        return json.dumps([{k: json_value(v) for k, v in r.items()} for r in rows],
                          default=json_value, indent=2)
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
    client = node_client(args)
    if client is not None:
        return _query_via_node(client, args)
    if args.scope == "network":
        raise CLIError("--scope network needs a running node",
                       "start one with `benchsync up`, or use --scope local|replicas")
    path = data_dir(args.home) / DB_FILENAME
    if not path.exists():
        raise CLIError(f"no database at {path}",
                       "record results first (`benchsync record perf ...`) or pass --home")
    answer = _query_offline(args)
    print(format_arrow(answer, args.format))
    return 0


def _query_via_node(client: ControlClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"sql": args.sql, "scope": args.scope}
    if args.scope == "network":
        body["allow_partial"] = True  # the node says what is missing; we decide here
        if args.peer:
            body["peers"] = args.peer
        if args.timeout:
            body["timeout"] = args.timeout
    answer = call_node(client, "POST", "/v1/query", body)
    table = _table_from_json(answer)
    peers = answer.get("peers") or []
    complete = args.scope != "network" or answer.get("complete") is True
    show_rows = complete or args.allow_partial
    if args.format == "json" and args.scope == "network":
        # The answer and who gave it: one document, so scripts can check every peer's status.
        rows = json.loads(format_arrow(table, "json")) if show_rows else None
        doc = {"rows": rows, "complete": complete, "missing": answer.get("missing") or [],
               "peers": peers, "strategy": answer.get("strategy"),
               "reason": answer.get("reason")}  # fmt: skip
        print(json.dumps(doc, indent=2))
    elif show_rows:
        print(format_arrow(table, args.format))
    if args.scope == "network":
        # Per-dataset status goes to stderr so that CSV on stdout stays machine-readable.
        for p in peers:
            extra = f" ({p['message']})" if p.get("message") else ""
            source = p.get("source")
            where = (f"rows from {source}" if source == "origin" else
                     f"rows from replica seq {p.get('seq')}, {p.get('lag_seq')} version(s) "
                     f"behind" if source == "replica" else "MISSING")  # fmt: skip
            print(f"peer {p['peer_id']}: {p['status']}, {where}{extra}", file=sys.stderr)
    if not complete:
        missing = answer.get("missing") or []
        print(f"Error: partial answer: the rows of {len(missing)} dataset(s) are missing: "
              f"{', '.join(missing)}", file=sys.stderr)  # fmt: skip
        print("Try: retry, raise --timeout, or pass --allow-partial to print the rows "
              "the other datasets gave", file=sys.stderr)  # fmt: skip
        return EXIT_PARTIAL
    return 0


def _table_from_json(answer: dict[str, Any]) -> pa.Table:
    columns = answer.get("columns", [])
    rows = answer.get("rows", [])
    if not columns:
        return pa.table({})
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})


def _query_offline(args: argparse.Namespace) -> pa.Table:
    from benchsync.daemon.cli.common import open_dataset

    config = load_config(data_dir(args.home), getattr(args, "config", None))
    limits = QueryLimits(timeout_s=config.query_timeout, max_rows=config.query_max_rows,
                         max_bytes=config.query_max_bytes)  # fmt: skip
    with open_dataset(args) as ds:
        ds.read_only = True  # before the database first opens: a query never writes
        try:
            return ds.query(args.sql, scope=args.scope, limits=limits,
                            memory_limit=f"{config.query_memory_limit}B")  # fmt: skip
        except DatabaseLocked as e:
            raise CLIError(str(e), "stop the running node, or query through it") from None
        except QueryError as e:
            raise CLIError(f"query {e.kind}: {e}", QUERY_HINT) from None
        except StorageError as e:
            raise CLIError(f"query failed: {e}".strip(), f"check {ds.db_path}") from None
