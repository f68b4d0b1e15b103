"""The `benchsync` command line.

Each command group lives in its own module under this package and registers
itself through `register(subparsers)`; `COMMAND_MODULES` lists them in the
order `--help` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "init",
    "up",
    "status",
    "demo",
    "snapshots",
    "config_cmd",
    "cid",
    "record",
    "query",
    "migrate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchsync",
        description="Peer-to-peer sync daemon for machine-learning benchmark results.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"benchsync.daemon.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from benchsync.daemon.cli.common import CLIError, fail
    from benchsync.storage.db import DatabaseLocked
    from benchsync.storage.errors import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CLIError as e:
        return fail(e)
    except DatabaseLocked as e:
        return fail(CLIError(str(e), "a node runs on this data directory: stop it, or let the "
                             "command go through it (check `benchsync status`)"))
    except StorageError as e:
        return fail(
            CLIError(str(e), "run with the same arguments again after fixing the cause above")
        )
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
