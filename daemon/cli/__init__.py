"""The `benchsync` command line.

Each command group lives in its own module under this package and registers
itself through `register(subparsers)`; `COMMAND_MODULES` lists them in the
order `--help` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchsync.daemon.cli.common import CLIError

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
    """Run one command; its exit code. Every failure the user can act on becomes
    `Error: ...` / `Try: ...` on stderr, also when trio wrapped it in an exception group."""
    from benchsync.daemon.cli.common import fail

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print("Interrupted.", file=sys.stderr)
            return 130
        for leaf in leaves:
            if isinstance(leaf, Exception) and (err := user_error(leaf)) is not None:
                return fail(err)
        raise
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        return fail(err)
    return int(rc or 0)


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def user_error(e: Exception) -> CLIError | None:
    """The `CLIError` for a failure that is not a bug (a bad setting, a busy or
    unwritable data directory, a listener that cannot be opened), else None."""
    from benchsync.daemon.cli.common import CLIError, os_error
    from benchsync.daemon.config import ConfigError
    from benchsync.daemon.control import ControlSocketError
    from benchsync.storage.db import DatabaseLocked
    from benchsync.storage.errors import StorageError

    if isinstance(e, CLIError):
        return e
    if isinstance(e, DatabaseLocked):
        return CLIError(str(e), "a node runs on this data directory: stop it, or let the "
                        "command go through it (check `benchsync status`)")  # fmt: skip
    if isinstance(e, StorageError):
        return CLIError(str(e), "run with the same arguments again after fixing the cause above")
    if isinstance(e, ConfigError):
        return CLIError(e.message, e.hint)
    if isinstance(e, ControlSocketError):
        return CLIError(e.message, e.hint)
    if isinstance(e, OSError):
        return os_error(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
