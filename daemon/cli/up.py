"""`benchsync up`: run a node in the foreground (what systemd starts).

Logs go to stderr as one `key=value` line per event; under systemd (when
`$JOURNAL_STREAM` is set) each line carries a `<N>` priority prefix instead of
a timestamp, which journald turns into the entry's priority.

Signals: the first SIGTERM/SIGINT stops the node gracefully (no new work,
in-flight writes finish, the host and the database close); a second one
exits at once. Acknowledged writes are committed by DuckDB before they are
acknowledged, so even `kill -9` loses none of them.

A node that cannot start (home in use, damaged database, a listener that
cannot be opened, a bad setting) exits 1 with `Error:` / `Try:` from the CLI's
one table (`benchsync.daemon.cli.user_error`) and a log line, before it
reports ready. The control API's routes (`benchsync.daemon.api`) are built
here and handed to the node.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from benchsync.daemon import config as config_mod
from benchsync.daemon.cli import user_error
from benchsync.daemon.cli.common import CLIError, add_home_argument, data_dir, fail
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
NODE_UMASK = 0o077  # files the node creates (database, blocks, keys) are its own alone


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



def run(args: argparse.Namespace) -> int:
    home = data_dir(args.home)
    make_private_home(home)
    os.umask(NODE_UMASK)
    try:
        config = config_mod.config_from_args(home, args)
    except config_mod.ConfigError as e:
        raise CLIError(str(e), e.hint or "fix the setting named above (see `benchsync config docs`)"
                       ) from e
    setup_logging(config.log_level)
    return trio.run(serve, config)


def _start_error(e: BaseException) -> BaseException:
    """The one error inside the exception groups trio's nurseries wrap it in."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _refuse(e: BaseException) -> int | None:
    """Report a start-up failure as Error/Try (the CLI's one table, `user_error`) and
    in the log; returns the exit status, None if it is not one (a bug)."""
    err = user_error(_start_error(e))
    if err is None:
        return None
    logging.getLogger("benchsync.up").error("cannot start: %s", err.message)
    return fail(err)


async def serve(config: config_mod.Config) -> int:
    from benchsync.daemon.api import control_router
    from benchsync.daemon.control import ControlEndpoints
    from benchsync.daemon.node import Node

    log = logging.getLogger("benchsync.up")
    try:
        node = await trio.to_thread.run_sync(Node, config)
    except Exception as e:
        code = _refuse(e)
        if code is None:
            raise
        return code
    router = control_router(node)
    node_scope = trio.CancelScope()

    async def run_node(task_status: TaskStatus[ControlEndpoints]) -> None:
        with node_scope:
            await node.run(router, task_status=task_status)
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
                code = _refuse(e)
                if code is None:
                    raise
                outer.cancel_scope.cancel()
                return code
            # One machine-readable line on stdout, for scripts and the demo.
            web = f" web=http://{_host_port(*node.web_address)}/" if node.web_address else ""
            print(f"ready peer_id={node.peer_id} control={endpoints.socket_path} "
                  f"addrs={','.join(node.p2p.addrs)}{web}", flush=True)  # fmt: skip
    return 0


def _host_port(host: str, port: int) -> str:
    """`host:port` for a URL (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
