"""The `benchsync` command line.

Each command group lives in its own module under this package and registers
itself through `register(subparsers)`; `COMMAND_MODULES` lists them in the
order `--help` shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchsync.daemon.cli.common import CLIError

COMMAND_MODULES = [
    "init",
    "lab_key",
    "up",
    "status",
    "demo",
    "snapshots",
    "get",
    "pin",
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
    `Error: ...` / `Try: ...` on stderr, also when trio wrapped it in an exception group.

    Output piped into a reader that stops early (`benchsync log | head`) ends
    the command quietly, as it ends `cat`: no traceback, exit status 0.
    """
    from benchsync.daemon.cli.common import fail

    try:
        rc = _run(argv)
    except BrokenPipeError as e:
        if not _stdout_closed():
            return fail(user_error(e) or _unexpected(e))  # another pipe: the node's socket
        return _quiet()
    try:
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
            sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        return _quiet()
    return rc


def _quiet() -> int:
    """stdout's reader has gone: later writes (the final flush at exit) go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def _unexpected(e: BaseException) -> CLIError:
    from benchsync.daemon.cli.common import CLIError

    return CLIError(str(e), "run the command again")


def _run(argv: list[str] | None) -> int:
    from benchsync.daemon.cli.common import fail
    from benchsync.daemon.cli.up import set_allocators

    set_allocators()  # before the command modules load: Arrow picks its pool only once
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main() tells a closed stdout from another broken pipe
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


def user_error(e: BaseException) -> CLIError | None:
    """The `CLIError` (what happened / what to try) for a failure that is not a bug:
    a bad setting, a busy, damaged or unwritable data directory, a listener that
    cannot be opened. None for anything else (a bug: let it be a traceback).

    The one table of `Try:` hints for every command, `up` included. An error
    that carries its own `hint` (ConfigError, ControlSocketError and its
    subclasses) keeps it.
    """
    from benchsync.daemon.cli.common import CLIError, os_error
    from benchsync.daemon.config import ConfigError
    from benchsync.daemon.control import ControlSocketError
    from benchsync.daemon.host import HostConfigError, ListenError
    from benchsync.daemon.identity import IdentityError
    from benchsync.storage.db import DatabaseDamaged, DatabaseLocked
    from benchsync.storage.errors import StorageError
    from benchsync.storage.homelock import HomeInUse

    if isinstance(e, CLIError):
        return e
    if isinstance(e, ConfigError | ControlSocketError) and e.hint:
        return CLIError(e.message, e.hint)
    if isinstance(e, HomeInUse):
        return CLIError(str(e), f"stop that node first (`benchsync status --home {e.home}` "
                        "shows it), or give this one its own data directory with "
                        "--home")  # fmt: skip
    if isinstance(e, DatabaseLocked):
        return CLIError(str(e), "a node runs on this data directory: stop it, or let the "
                        "command go through it (check `benchsync status`)")  # fmt: skip
    if isinstance(e, DatabaseDamaged):
        return CLIError(str(e), "move the database file aside (history and blocks stay), "
                        "start the node again, then `benchsync restore <cid>` from "
                        "`benchsync log`")  # fmt: skip
    if isinstance(e, StorageError):
        return CLIError(str(e), "run with the same arguments again after fixing the cause above")
    if isinstance(e, ListenError):
        return CLIError(str(e), "another process listens there: stop it, or choose another "
                        "--listen address (port 0 picks a free one)")  # fmt: skip
    if isinstance(e, HostConfigError):
        return CLIError(str(e), "fix the setting named above (see `benchsync config docs`)")
    if isinstance(e, IdentityError):
        return CLIError(str(e), "do what the message says with the key file: it names this "
                        "node's dataset, so fix or restore it rather than delete it")  # fmt: skip
    if isinstance(e, OSError):
        return os_error(e)
    return None

if __name__ == "__main__":
    sys.exit(main())
