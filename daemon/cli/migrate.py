"""`benchsync migrate`: bring `.duckdb` files of the original benchmark API into this node.

Thin wiring over `benchsync.storage.migrate`: it opens the data directory
offline, runs the batch (or `--snapshot-only`), prints progress on stderr and a
summary table (or one JSON document with `--json`) on stdout. The exit code is
non-zero when any file failed; the others are still migrated.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchsync.daemon.cli.common import (
    CLIError,
    add_home_argument,
    call_node,
    data_dir,
    node_client,
    open_dataset,
)
from benchsync.storage.db import DatabaseLocked
from benchsync.storage.migrate import (
    MigrationError,
    backup_file,
    migrate_files,
    snapshot_legacy,
    validate_legacy,
)

EXIT_SOME_FAILED = 2  # at least one file failed; the rest were migrated


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser(
        "migrate",
        help="import .duckdb files of the original benchmark database API",
        description="Import each --db file into this node's dataset in one transaction per file: "
        "ids are remapped, models and hardware merged by name, provenance recorded in "
        "migrated_rows, and the import verified before it is committed. Re-running is safe.",
    )
    add_home_argument(p)
    p.add_argument(
        "--db",
        action="append",
        required=True,
        metavar="FILE",
        help="legacy database file (repeatable)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="node config file; its data directory is used (default: <home>/config.toml)",
    )
    p.add_argument(
        "--no-backup",
        action="store_true",
        help="do not copy FILE to FILE.pre-benchsync-backup first",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the per-table row count and checksum comparison",
    )
    p.add_argument(
        "--snapshot-only",
        action="store_true",
        help="do not import: snapshot each file as it is, print its CID and write "
        "the .FILE.ipfs.json sidecar beside it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--verbose", "-v", action="store_true", help="progress per table, warnings")
    p.set_defaults(func=run)


def _progress(verbose: bool) -> Callable[[str], None]:
    tty = sys.stderr.isatty()

    def say(message: str) -> None:
        per_table = (
            message.startswith("    ") or ": importing" in message or ": carrying" in message
        )
        if per_table and not verbose:
            if tty:  # a transient status line, overwritten by the next one
                print(f"\r\x1b[K{message.strip()[:100]}", end="", file=sys.stderr, flush=True)
            return
        print(("\r\x1b[K" if tty else "") + message, file=sys.stderr, flush=True)

    return say


def _home(args: argparse.Namespace) -> None:
    if args.config:
        from benchsync.daemon.config import ConfigError, load_config

        try:
            args.home = str(load_config(data_dir(args.home), args.config).home)
        except ConfigError as e:
            raise CLIError(e.message, e.hint) from None


def run(args: argparse.Namespace) -> int:
    _home(args)
    say = _progress(args.verbose)
    client = None if args.snapshot_only else node_client(args)
    if client is not None:
        # The running node owns the database: it migrates (and announces the new head).
        # Backups beside the files are ours to write (our user named them), not the node's.
        say(f"migrating {len(args.db)} file(s) through the running node")
        paths = [str(Path(p).resolve()) for p in args.db]
        backups = {} if args.no_backup else _backup_beside(paths, say)
        body = {"paths": paths, "backup": False, "verify": not args.no_verify}
        results = call_node(client, "POST", "/v1/migrate", body)["results"]
        for r in results:
            if r["ok"] and r["path"] in backups:
                r["backup"] = backups[r["path"]]
    else:
        with open_dataset(args) as ds:
            if not args.snapshot_only:
                try:
                    _ = ds.db  # opened lazily; open it now, before anything is read or backed up
                except DatabaseLocked as e:
                    raise CLIError(
                        f"the database in {ds.home} is in use by another process ({e})",
                        "if a node runs there, check its control socket (`benchsync status`); "
                        "otherwise stop the process that holds the file",
                    ) from None
            if args.snapshot_only:
                done = [snapshot_legacy(ds, Path(p), progress=say) for p in args.db]
            else:
                done = migrate_files(
                    ds,
                    [Path(p) for p in args.db],
                    backup=not args.no_backup,
                    backup_beside=True,  # the user named these files
                    verify=not args.no_verify,
                    progress=say,
                )
        results = [r.to_json() for r in done]
    if args.json:
        print(json.dumps({"results": results, "ok": all(r["ok"] for r in results)}, indent=1))
    else:
        _print_summary(results)
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"Error: {r['error']}", file=sys.stderr)
    if failed:
        print(
            f"Try: fix the file(s) above and run the same command again; the "
            f"{len(results) - len(failed)} "
            "other file(s) are done and will be skipped",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0


def _backup_beside(paths: list[str], say: Callable[[str], None]) -> dict[str, str]:
    """Back up each valid legacy file beside itself; {path: backup}. An invalid file is
    left alone: the node reports what is wrong with it."""
    backups = {}
    for p in paths:
        try:
            validate_legacy(Path(p))
            backups[p] = str(backup_file(Path(p)))
        except MigrationError:
            continue
        say(f"  {Path(p).name}: backed up to {backups[p]}")
    return backups


def _print_summary(results: list[dict[str, Any]]) -> None:
    """The summary table, from results as `MigrationResult.to_json()` (local or from a node)."""
    header = ("FILE", "STATUS", "TABLES", "ROWS", "CID", "VERIFIED", "BACKUP")
    rows = [header]
    for r in results:
        verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
        rows.append(
            (
                r["path"],
                r["status"],
                str(len(r["tables"])),
                str(r["rows"]),
                r["cid"] or "-",
                verified,
                r["backup"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in results:
        for w in r["warnings"]:
            print(f"warning: {r['path']}: {w}", file=sys.stderr)
