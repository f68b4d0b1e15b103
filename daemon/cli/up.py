"""`benchsync up`: run a node in the foreground (what systemd starts).

Logs go to stderr as one `key=value` line per event; under systemd (when
`$JOURNAL_STREAM` is set) each line carries a `<N>` priority prefix instead of
a timestamp, which journald turns into the entry's priority.

Signals: the first SIGTERM/SIGINT stops the node gracefully (no new work,
in-flight writes finish, the host and the database close); a second one
exits at once. Acknowledged writes are committed by DuckDB before they are
acknowledged, so even `kill -9` loses none of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from benchsync.daemon import config as config_mod
from benchsync.daemon.cli.common import CLIError, add_home_argument, data_dir
from benchsync.daemon.cli.init import make_private_home

if TYPE_CHECKING:
    from trio_typing import TaskStatus

LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
FORCED_EXIT_CODE = 130


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>level={record.levelname} logger={record.name} {record.getMessage()}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # py-libp2p is chatty at INFO about every stream; keep it at WARNING unless debugging.
    if level.lower() != "debug":
        logging.getLogger("libp2p").setLevel(logging.WARNING)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a node in the foreground (what systemd starts)")
    add_home_argument(p)
    config_mod.add_arguments(p)
    p.set_defaults(func=run)


NODE_UMASK = 0o077  # files the node creates (database, blocks, keys) are its own alone


def run(args: argparse.Namespace) -> int:
    home = data_dir(args.home)
    make_private_home(home)
    os.umask(NODE_UMASK)
    try:
        config = config_mod.config_from_args(home, args)
    except config_mod.ConfigError as e:
        raise CLIError(str(e), "fix the setting named above (see `benchsync config docs`)") from e
    setup_logging(config.log_level)
    return trio.run(serve, config)


def start_error_hint(e: BaseException, home: Path) -> str | None:
    """The `Try:` line for an error that stops a node before it is ready, or None when
    `e` is not one (a bug: let it be a traceback)."""
    from benchsync.daemon.control import ControlSocketError
    from benchsync.daemon.host import HostConfigError, ListenError
    from benchsync.daemon.identity import IdentityError
    from benchsync.storage.db import DatabaseDamaged
    from benchsync.storage.errors import StorageError
    from benchsync.storage.homelock import HomeInUse

    if isinstance(e, HomeInUse):
        return (f"stop that node first (`benchsync status --home {home}` shows it), or give "
                "this one its own data directory with --home")  # fmt: skip
    if isinstance(e, DatabaseDamaged):
        return ("move the database file aside (history and blocks stay), start the node "
                "again, then `benchsync restore <cid>` from `benchsync log`")  # fmt: skip
    if isinstance(e, ListenError):
        return ("another process listens there: stop it, or choose another --listen "
                "address (port 0 picks a free one)")  # fmt: skip
    if isinstance(e, (ControlSocketError, HostConfigError, IdentityError)):
        return "fix the setting named above (see `benchsync config docs`)"
    if isinstance(e, (StorageError, OSError)):
        return f"check that {home} is writable and has free space"
    return None


def _start_error(e: BaseException) -> BaseException:
    """The one error inside the exception groups trio's nurseries wrap it in."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _refuse(e: BaseException, home: Path) -> int | None:
    """Report a start-up failure as Error/Try; returns the exit status, None if not one."""
    err = _start_error(e)
    hint = start_error_hint(err, home)
    if hint is None:
        return None
    logging.getLogger("benchsync.up").error("cannot start: %s", err)
    print(f"Error: {err}", file=sys.stderr)
    print(f"Try: {hint}", file=sys.stderr)
    return 1


async def serve(config: config_mod.Config) -> int:
    from benchsync.daemon.control import ControlEndpoints
    from benchsync.daemon.node import Node

    log = logging.getLogger("benchsync.up")
    try:
        node = await trio.to_thread.run_sync(Node, config)
    except Exception as e:
        code = _refuse(e, Path(config.home))
        if code is None:
            raise
        return code
    node_scope = trio.CancelScope()

    async def run_node(task_status: TaskStatus[ControlEndpoints]) -> None:
        with node_scope:
            await node.run(task_status=task_status)
        outer.cancel_scope.cancel()  # the node is down: stop watching signals

    async def watch_signals(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if node_scope.cancel_called:
                log.warning("second %s: forcing exit", signal.Signals(signum).name)
                os._exit(FORCED_EXIT_CODE)
            log.info(
                "received %s: shutting down (send it again to force)", signal.Signals(signum).name
            )
            node_scope.cancel()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_signals, signals)
            try:
                endpoints = await outer.start(run_node)
            except Exception as e:  # never ready: the node has closed its database and lock
                code = _refuse(e, Path(config.home))
                if code is None:
                    raise
                outer.cancel_scope.cancel()
                return code
            # One machine-readable line on stdout, for scripts and the demo.
            print(f"ready peer_id={node.peer_id} control={endpoints.socket_path} "
                  f"addrs={','.join(node.p2p.addrs)}", flush=True)  # fmt: skip
    return 0
