"""`benchsync init`: create the data directory (mode 0700: it holds the node's key and data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchsync.daemon.cli.common import CLIError, data_dir, os_error

DATA_DIR_MODE = 0o700  # the identity key, the database and the blocks are the node's alone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the data directory ($BENCHSYNC_HOME or XDG data dir)")
    p.add_argument("--home", help="data directory (default: $BENCHSYNC_HOME, else XDG data dir)")
    p.set_defaults(func=run)


def make_private_home(home: Path) -> None:
    """Create the data directory if needed and make it 0700 (an existing one, too).

    Raises CLIError when it cannot be created or its mode cannot be set, with the
    `Try:` hint of `os_error` for the reason (read-only file system, not the owner, ...).
    """
    path = Path(home)
    try:
        path.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
        path.chmod(DATA_DIR_MODE)
    except OSError as e:
        raise CLIError(
            f"cannot make the data directory {path} private: {e.strerror or e}", os_error(e).hint
        ) from e


def run(args: argparse.Namespace) -> int:
    home = data_dir(args.home)
    make_private_home(home)
    print(home)
    return 0
