"""`benchsync migrate`: bring `.duckdb` files of the original benchmark API into this node.

Thin wiring over `benchsync.storage.migrate`: it opens the data directory
offline, runs the batch (or `--snapshot-only`), prints progress on stderr and a
summary table (or one JSON document with `--json`) on stdout. The exit code is
non-zero when any file failed; the others are still migrated.

`--config` also takes the original migration script's JSON configuration
(detected by a `.json` name or a leading `{`): each field present is reported
on stderr with what it does for a migration, or that it has no effect. The
`migrate_to_ipfs` console script (`old_script_main`) is this command under the
original script's name and options.
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
    add_node_arguments,
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
    add_node_arguments(p)
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
        help="node config file; its data directory is used (default: <home>/config.toml); "
        "or the original migration script's JSON configuration",
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


# What the original JSON configuration's fields do for a migration (the API's own use of
# them is `benchsync.compat.FIELD_EFFECTS`): an effect, or None and why there is none.
JSON_FIELD_EFFECTS: dict[str, tuple[str | None, str]] = {
    "enable_ipfs_storage": ("the dataset is snapshotted after the import; its CID is printed", ""),
    "auto_pin": ("snapshots are kept as the dataset's history", ""),
}


def is_json_config(path: str) -> bool:
    """Whether `path` is the original JSON configuration rather than a node's TOML file."""
    if path.lower().endswith(".json"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False  # the TOML loader reports the missing file


def _json_config(path: str) -> None:
    """Read the original JSON configuration and say, on stderr, what each field does."""
    from benchsync.compat import FIELD_EFFECTS, CompatError, IPFSConfig

    try:
        config = IPFSConfig.from_file(path)
        with open(path, encoding="utf-8") as f:
            present = json.load(f)
    except CompatError as e:
        raise CLIError(str(e), "fix the JSON file, or give a node config.toml") from None
    for name in present:
        effect, why = JSON_FIELD_EFFECTS.get(name) or (None, FIELD_EFFECTS[name][1])
        if name == "enable_ipfs_storage" and not config.enable_ipfs_storage:
            effect, why = None, "benchsync always snapshots the dataset after a migration"
        if effect:
            print(f"{path}: {name}: {effect}", file=sys.stderr)
        else:
            why = why or "it configures the Python API (benchsync.compat), not a migration"
            print(f"warning: {path}: {name} has no effect on a migration: {why}",
                  file=sys.stderr)


def _home(args: argparse.Namespace) -> None:
    if args.config and is_json_config(args.config):
        _json_config(args.config)
        args.config = None  # the node's own config (and data directory) as without --config
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


def old_script_main(argv: list[str] | None = None) -> int:
    """`migrate_to_ipfs`: the original migration script's command line, run as `migrate`.

    `--db FILE` (repeatable), `--config FILE.json`, `--no-backup`, `--verbose`;
    the files are imported into this machine's node ($BENCHSYNC_HOME).
    """
    from benchsync.daemon.cli import main

    parser = argparse.ArgumentParser(
        prog="migrate_to_ipfs",
        description="Import benchmark .duckdb files into this machine's benchsync node "
        "(the original script's name for `benchsync migrate`).",
    )
    parser.add_argument("--db", action="append", required=True, metavar="FILE",
                        help="database file (repeatable)")
    parser.add_argument("--config", metavar="FILE.json", help="the original JSON configuration")
    parser.add_argument("--no-backup", action="store_true", help="do not back the files up")
    parser.add_argument("--verbose", "-v", action="store_true", help="progress per table")
    args = parser.parse_args(argv)
    forwarded = ["migrate"] + [a for p in args.db for a in ("--db", p)]
    if args.config:
        forwarded += ["--config", args.config]
    forwarded += ["--no-backup"] * args.no_backup + ["--verbose"] * args.verbose
    return main(forwarded)

