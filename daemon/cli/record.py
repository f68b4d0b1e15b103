"""`benchsync record perf|compat|test`: store benchmark results in the local database.

Each subcommand takes one record as flags, or many with `--from FILE.jsonl`
(one JSON object per line, keyword names of the Python API). The flags, their
types and help come from storage's record rules (`records.RULES`, whose flag
and help are `records.FIELD_FLAGS`), the same table that validates a record,
so `--help`, the flag parsing and the record fields cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchsync.daemon.cli.common import (
    CLIError,
    add_node_arguments,
    call_node,
    data_dir,
    node_client,
    require_home,
)
from benchsync.daemon.cli.progress import Progress
from benchsync.daemon.control import MAX_BODY_BYTES, ControlAPIError, ControlClient
from benchsync.storage.db import DB_FILENAME, BenchmarkDB, DatabaseLocked
from benchsync.storage.errors import InvalidRecord, StorageError
from benchsync.storage.records import RULES, check_known_fields, validate

# `--from` through a running node goes in staged batches of at most this many bytes
# of request body (half the control API's limit: room for a node with a smaller one).
BATCH_BYTES = MAX_BODY_BYTES // 2
_ENVELOPE = '{"records": []}'

# `benchsync record KIND` flags: the record fields that have a flag in storage's one
# field table (records.FIELD_FLAGS), in field order, parsed by the field's kind.
_FLAG_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "json": str,
                               "bool": "bool"}  # fmt: skip
_FLAGS: dict[str, list[tuple[str, str, Any, str]]] = {
    kind: [(rule.flag, rule.name, _FLAG_TYPES[rule.kind], rule.help)
           for rule in RULES[kind] if rule.flag is not None]
    for kind in ("perf", "compat", "test")
}  # fmt: skip
_KIND_HELP = {
    "perf": "a performance result (throughput, latency, memory)",
    "compat": "a hardware compatibility result",
    "test": "an integration test result",
}
_STORE = {
    "perf": BenchmarkDB.store_performance_result,
    "compat": BenchmarkDB.store_hardware_compatibility,
    "test": BenchmarkDB.store_integration_test_result,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="store benchmark results in the local database")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    for kind, flags in _FLAGS.items():
        k = kinds.add_parser(kind, help=_KIND_HELP[kind])
        add_node_arguments(k)
        k.add_argument("--from", dest="from_file", metavar="FILE.jsonl",
                       help="read records from a JSONL file (keyword names), all or nothing")
        for flag, dest, type_, help_ in flags:
            if type_ == "bool":
                k.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_)
            else:
                k.add_argument(flag, dest=dest, type=type_, help=help_)
        k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kind = args.kind
    fields = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS[kind]
              if getattr(args, dest) is not None}
    if args.from_file and fields:
        raise CLIError("--from cannot be combined with record flags",
                       "put every field in the JSONL file, or drop --from")
    for name in (r.name for r in RULES[kind] if r.kind == "json"):
        if name in fields:
            try:
                fields[name] = json.loads(fields[name])
            except ValueError as e:
                raise CLIError(f"--{name} is not valid JSON: {e}",
                               f"""--{name} '{{"key": 1}}'""") from None
    client = node_client(args)
    if client is not None:  # the running node owns the database: record through it
        return _record_via_node(client, kind, args.from_file, fields)
    require_home(data_dir(args.home))  # only init and up create a data directory
    path = data_dir(args.home) / DB_FILENAME
    try:
        with BenchmarkDB(path) as db:
            if args.from_file:
                source = Path(args.from_file)
                if not source.is_file():
                    raise CLIError(f"no such file: {source}", "check the path given to --from")
                count = db.ingest_jsonl(kind, source)
                print(f"Recorded {count} {kind} record(s) from {source} into {path}")
            else:
                record_id = _STORE[kind](db, **fields)
                print(f"Recorded {kind} record {record_id} into {path}")
    except InvalidRecord as e:
        flag = next((f for f, dest, _, _ in _FLAGS[kind] if dest == e.field), None)
        hint = (f"fix {flag} ({e.field})" if flag and not args.from_file
                else f"fix field {e.field!r}; nothing was written")
        raise CLIError(str(e), hint) from None
    except DatabaseLocked as e:
        raise CLIError(str(e), "stop the running node, or record through it when its "
                       "control API is available") from None
    except StorageError as e:
        raise CLIError(str(e), f"check {path}") from None
    return 0


def _record_via_node(client: ControlClient, kind: str, from_file: str | None,
                     fields: dict[str, Any]) -> int:
    if from_file:
        return _record_file_via_node(client, kind, Path(from_file))
    answer = call_node(client, "POST", f"/v1/record/{kind}", fields)
    print(f"Recorded {kind} record {answer.get('id')} through the running node")
    return 0


def read_jsonl(kind: str, source: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, each checked by the record rules (as the node will
    again); CLIError naming the line of the first bad one (nothing is sent)."""
    if not source.is_file():
        raise CLIError(f"no such file: {source}", "check the path given to --from")
    records: list[dict[str, Any]] = []
    try:
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise CLIError(f"{source}:{n}: not JSON: {e}",
                                   "one JSON object per line; nothing was written") from None
                try:
                    if not isinstance(obj, dict):
                        raise InvalidRecord("record", obj, "expected a JSON object per line")
                    check_known_fields(kind, obj)
                    validate(kind, obj)
                except InvalidRecord as e:
                    raise CLIError(f"{source}:{n}: {e}",
                                   f"fix field {e.field!r}; nothing was written") from None
                records.append(obj)
    except UnicodeDecodeError as e:
        raise CLIError(f"{source} is not UTF-8 text: {e}", "one JSON object per line") from None
    if not records:
        raise CLIError(f"{source} holds no records", "one JSON object per line")
    return records


def batches(records: list[dict[str, Any]],
            max_bytes: int = BATCH_BYTES) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """`records` in runs whose body `{"records": [...]}`, as the control client encodes
    it (`json.dumps`: ASCII, so characters are bytes), fits in `max_bytes`; with that size."""
    run: list[dict[str, Any]] = []
    size = len(_ENVELOPE)
    for record in records:
        n = len(json.dumps(record))
        if len(_ENVELOPE) + n > max_bytes:
            raise CLIError(f"one record is {n} bytes of JSON, more than the {max_bytes} bytes "
                           "of one control API request", "shorten its metadata")  # fmt: skip
        if run and size + n + 2 > max_bytes:
            yield run, size
            run, size = [], len(_ENVELOPE)
        size += n + (2 if run else 0)
        run.append(record)
    if run:
        yield run, size


def _record_file_via_node(client: ControlClient, kind: str, source: Path) -> int:
    """Stage the file's records in the node in batches, then commit them in one
    transaction (daemon/staging.py): any size, all or nothing, progress on stderr."""
    records = read_jsonl(kind, source)
    runs = list(batches(records))
    base = f"/v1/record/{kind}/batches"
    batch = call_node(client, "POST", base, {})["batch"]
    progress = Progress(f"record {source.name}", sum(size for _, size in runs))
    committed = False
    try:
        for run, size in runs:
            call_node(client, "POST", f"{base}/{batch}", {"records": run})
            progress.update(size)
        progress.close()
        committed = True  # from here the node drops the batch, whatever the answer
        answer = call_node(client, "POST", f"{base}/{batch}/commit", {})
    finally:
        if not committed:  # best effort: an abandoned batch also expires on its own
            with contextlib.suppress(ControlAPIError):
                client.request("DELETE", f"{base}/{batch}")
    print(f"Recorded {answer['stored']} {kind} record(s) from {source} through the node")
    return 0
