"""`benchsync init`: create the data directory."""

from __future__ import annotations

import argparse

from benchsync.daemon.cli.common import data_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the data directory ($BENCHSYNC_HOME or XDG data dir)")
    p.add_argument("--home", help="data directory (default: $BENCHSYNC_HOME, else XDG data dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    home = data_dir(args.home)
    home.mkdir(parents=True, exist_ok=True)
    print(home)
    return 0
