"""`benchsync lab-key new FILE`: write a fresh lab key to hand to the lab's other machines."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchsync.daemon.cli.common import CLIError
from benchsync.daemon.lab import LabKeyError, write_new_key


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab-key", help="create a lab key (nodes holding it form one lab)")
    actions = p.add_subparsers(dest="lab_key_command", metavar="ACTION")
    actions.required = True
    new = actions.add_parser(
        "new", help="write a fresh random 256-bit key to FILE (mode 0600; never overwrites)"
    )
    new.add_argument("file", metavar="FILE")
    new.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        write_new_key(path)
    except LabKeyError as e:
        raise CLIError(e.message, e.hint) from e
    print(path)
    print(
        f"Copy {path} to every machine of the lab (keep it mode 0600) and start each node "
        f"with --lab-key {path} (or `benchsync init --lab-key {path}`).",
    )
    return 0
