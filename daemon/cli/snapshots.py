"""`benchsync snapshot | log | restore | export | import | gc`: versions of the local dataset."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from multiformats import CID

from benchsync.daemon.cli.common import (
    CLIError,
    add_home_argument,
    add_node_arguments,
    call_node,
    node_client,
    open_dataset,
    parse_size,
)
from benchsync.daemon.cli.progress import CountingReader, CountingWriter, Progress
from benchsync.storage.errors import NotFound, StorageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="snapshot the database; prints the version's CID")
    add_node_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_snapshot)

    p = sub.add_parser("log", help="list versions, newest first")
    add_home_argument(p)
    p.add_argument("-n", "--limit", type=int, default=None, help="show at most N versions")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_log)

    p = sub.add_parser("restore", help="make an old version's content current (history is kept)")
    add_node_arguments(p)
    p.add_argument("cid", help="root CID of the version (from `benchsync log`), or a tag")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_restore)

    p = sub.add_parser("export", help="write a version (default: the head) as CAR file(s)")
    add_home_argument(p)
    p.add_argument("cid", nargs="?", help="root CID (default: the head)")
    p.add_argument("--car", required=True, metavar="FILE", help="output CAR file")
    p.add_argument(
        "--max-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="split into CARs of at most SIZE bytes (e.g. 64M): FILE.0000.car, FILE.0001.car, ...",
    )
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "import", help="import CAR file(s): verify every block, then make the roots available"
    )
    add_home_argument(p)
    p.add_argument("files", nargs="+", metavar="FILE.car")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_import)

    p = sub.add_parser(
        "gc", help="thin the history by the retention settings, expire replicas, delete "
        "blocks nothing kept references",
    )  # fmt: skip
    add_node_arguments(p)
    p.add_argument("--config", metavar="FILE", help="config file (default: <home>/config.toml)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_gc)


def run_snapshot(args: argparse.Namespace) -> int:
    client = node_client(args)
    if client is not None:  # the node owns the database and announces the new head
        doc = call_node(client, "POST", "/v1/snapshot", {})
    else:
        with open_dataset(args) as ds:
            result = ds.snapshot()
        doc = result.version.to_json() | {
            "created": result.created,
            "new_blocks": result.new_blocks,
            "new_bytes": result.new_bytes,
        }
    if args.json:
        print(json.dumps(doc))
    else:
        if not doc["created"]:
            print("no change since the head", file=sys.stderr)
        print(doc["cid"])
    return 0


def run_log(args: argparse.Namespace) -> int:
    with open_dataset(args) as ds:
        versions = ds.history(args.limit)
        thinned, pins = ds.thinned(), ds.pins()
        tags: dict[str, list[str]] = {}
        for name, cid in sorted(ds.tags().items()):
            tags.setdefault(cid, []).append(name)
        # Thinned by retention and its tables gone (another kept version may share them).
        gone = {v.cid for v in versions
                if v.cid in thinned and not ds.blocks.has(CID.decode(v.tables_cid))}  # fmt: skip
    docs = [v.to_json() | {"tags": tags.get(v.cid, []), "pinned": v.cid in pins,
                           "thinned": v.cid in gone} for v in versions]  # fmt: skip
    if args.json:
        print(json.dumps(docs))
        return 0
    if not versions:
        print("no versions yet (run `benchsync snapshot`)", file=sys.stderr)
        return 0
    for v, doc in zip(versions, docs, strict=True):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        rows = ", ".join(f"{t}={i.rows}" for t, i in sorted(v.manifest.tables.items()) if i.rows)
        marks = [f"tag: {', '.join(doc['tags'])}"] if doc["tags"] else []
        marks += ["pinned"] if doc["pinned"] else []
        marks += ["thinned: tables deleted, not restorable"] if doc["thinned"] else []
        extra = f"  ({'; '.join(marks)})" if marks else ""
        print(f"{v.seq:>5}  {v.cid}  {when}  parent={v.parent or '-'}{extra}")
        print(f"       rows: {rows or '(empty)'}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    client = node_client(args)
    if client is not None:
        doc = call_node(client, "POST", "/v1/restore", {"cid": args.cid})
    else:
        from benchsync.storage.dataset import RestoreError
        from benchsync.storage.snapshot import IncompleteSnapshot

        with open_dataset(args) as ds:
            try:
                doc = ds.restore(args.cid).to_json()
            except NotFound as e:
                raise CLIError(str(e), "list versions with `benchsync log`; a snapshot held "
                               "elsewhere: start the node (`benchsync up`), whose restore "
                               "fetches it from peers, or `benchsync get CID --peer "
                               "MULTIADDR` first") from e  # fmt: skip
            except (IncompleteSnapshot, RestoreError) as e:
                raise CLIError(str(e), "start the node (`benchsync up`): its restore fetches "
                               "missing blocks from peers; or fetch them first with "
                               "`benchsync get CID --peer MULTIADDR`") from e  # fmt: skip
    print(json.dumps(doc) if args.json else doc["cid"])
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.car)
    with open_dataset(args) as ds:
        head = ds.snapshots.find(args.cid) if args.cid else ds.head()
        total = head.manifest.total_bytes if head else None
        progress = Progress(f"export {out.name}", total)
        if args.max_size:
            paths = ds.export_cars(out, args.cid, args.max_size, progress=progress.update)
            progress.close()
            for p in paths:
                print(p)
        else:
            tmp = out.with_name(f".{out.name}.partial")
            with open(tmp, "wb") as f:
                root, n = ds.export_car(CountingWriter(f, progress), args.cid)
            tmp.replace(out)
            progress.close()
            print(root)
    return 0


def run_import(args: argparse.Namespace) -> int:
    for name in args.files:
        if not Path(name).is_file():
            raise CLIError(f"{name}: no such file", "pass the path of a .car file")
    total = sum(Path(n).stat().st_size for n in args.files)
    progress = Progress("import", total, enabled=not args.json)
    with open_dataset(args) as ds, ExitStack() as stack:
        streams = [
            (
                name,
                io.BufferedReader(CountingReader(stack.enter_context(open(name, "rb")), progress)),
            )
            for name in args.files
        ]
        try:
            result = ds.import_cars(streams)
        except StorageError as e:
            raise CLIError(
                str(e), "check the file is a complete CAR written by `benchsync export`"
            ) from e
        finally:
            progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "roots": result.roots,
                    "blocks": result.blocks,
                    "new_blocks": result.new_blocks,
                    "new_bytes": result.new_bytes,
                }
            )
        )
    else:
        if result.noop:
            print("already present: nothing new imported", file=sys.stderr)
        for root in result.roots:
            print(root)
    return 0


def run_gc(args: argparse.Namespace) -> int:
    client = node_client(args)
    if client is not None:  # the node collects: it knows the blocks being fetched
        doc = call_node(client, "POST", "/v1/maintenance", {})
    else:
        from benchsync.daemon.config import load_config
        from benchsync.storage.retention import RetentionPolicy

        with open_dataset(args) as ds:
            config = load_config(ds.home, getattr(args, "config", None))
            policy = RetentionPolicy(config.history_retention, config.history_interval)
            # Offline nothing is being written: temporary files are all crash leftovers.
            doc = ds.maintain(policy, budget=config.disk_budget, temp_grace=0.0,
                              replica_expiry=config.replica_expiry).to_json()  # fmt: skip
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"thinned {doc['thinned_now']} version(s) ({doc['kept']} of {doc['versions']} "
          f"kept), removed {doc['removed_blocks']} block(s), freed {doc['freed_bytes']} "
          "bytes")  # fmt: skip
    if doc["expired_replicas"]:
        print(f"expired replicas: {', '.join(doc['expired_replicas'])}")
    if doc["over_budget"]:
        print(f"warning: {doc['usage']['total_bytes']} bytes used, over the disk budget "
              f"of {doc['budget']}", file=sys.stderr)  # fmt: skip
    return 0
