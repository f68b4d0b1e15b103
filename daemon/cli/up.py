"""`benchsync up`: run a node in the foreground (what systemd starts).

Logs go to stderr as one `key=value` line per event; under systemd (when
`$JOURNAL_STREAM` is set) each line carries a `<N>` priority prefix instead of
a timestamp, which journald turns into the entry's priority.

Signals: the first SIGTERM/SIGINT stops the node gracefully (no new work,
in-flight writes finish, the host and the database close); a second one
exits at once. Acknowledged writes are committed by DuckDB before they are
acknowledged, so even `kill -9` loses none of them.

Memory: a node lives for months, so the CLI sets its native allocators
(`set_allocators`, called by `benchsync.daemon.cli` before any command module
loads; the reasons and figures at `NODE_ALLOCATOR_ENV`), and `serve` warns in
the log if Arrow picked another pool anyway.

A node that cannot start (home in use, damaged database, a listener that
cannot be opened, a bad setting) exits 1 with `Error:` / `Try:` from the CLI's
one table (`benchsync.daemon.cli.user_error`) and a log line, before it
reports ready. The control API's routes (`benchsync.daemon.api`) are built
here and handed to the node.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform
import signal
import sys
from collections.abc import AsyncIterator, MutableMapping
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
# Allocators of a process that lives for months (issue 19; bench/bench_memory.py measures
# them: a lone node writing 150 rows every 2 s, a snapshot each, RSS at 1, 3, 7 minutes).
# - Arrow's default pool is mimalloc, which kept the memory of every snapshot's Parquet
#   reads after they were freed: its arena's RSS grew all along while Arrow held 20 KB.
#   Glibc's malloc (the "system" pool) gives it back. Arrow picks its pool from this
#   variable once, at its first allocation, and its C++ code (the Parquet reader) uses
#   that pool whatever pyarrow's `set_memory_pool` says: hence a variable, set early.
# - Glibc then keeps freed chunks in one arena per thread that ever allocated (8 per
#   core: 16 here), each fragmenting on its own; two arenas held 6 MB free where 16 held
#   21 MB after 5 minutes. Glibc reads MALLOC_ARENA_MAX at start-up, so `set_allocators`
#   also sets it with mallopt (before any thread); the variable is for child processes.
# Both together, same run: RSS 203, 212, 221 MiB at 1, 3, 7 minutes; the system pool on
# 16 arenas 198, 220, 242; Arrow's and glibc's defaults 225, 271, 327 (1.48x at 7 min).
# A value already in the environment wins (to compare, or to go back).
NODE_ALLOCATOR_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


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



def set_allocators(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put `NODE_ALLOCATOR_ENV` in the environment, unless set there already.

    The CLI calls it first, for every command: Arrow reads the variable once, at
    its first allocation, and importing the storage modules allocates (module-level
    Arrow values); `run` would be too late."""
    for name, value in NODE_ALLOCATOR_ENV.items():
        environ.setdefault(name, value)
    if environ is os.environ:
        _set_arena_max(environ["MALLOC_ARENA_MAX"])


def _set_arena_max(value: str) -> None:
    """Glibc's arena limit for this process (it read the variable when it started, before
    `set_allocators` could set it). Only on glibc; a value that is not a number is
    ignored, as glibc ignores it."""
    if platform.libc_ver()[0] != "glibc" or not value.isdigit():
        return
    ctypes.CDLL(None).mallopt(M_ARENA_MAX, int(value))  # None: the process's own libc


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
    _check_allocators(log)
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


def _check_allocators(log: logging.Logger) -> None:
    """Warn when Arrow's pool is not the one asked for: something allocated Arrow memory
    before `set_allocators` (memory would then grow over weeks)."""
    import pyarrow as pa

    wanted = os.environ.get("ARROW_DEFAULT_MEMORY_POOL")
    got = pa.default_memory_pool().backend_name
    if wanted and got != wanted:
        log.warning(
            "Arrow's memory pool is %s, not %s as ARROW_DEFAULT_MEMORY_POOL asks (Arrow "
            "allocated before it was set); the node's memory may grow over time. Set "
            "ARROW_DEFAULT_MEMORY_POOL=%s in the node's environment", got, wanted, wanted,
        )  # fmt: skip


def _host_port(host: str, port: int) -> str:
    """`host:port` for a URL (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
