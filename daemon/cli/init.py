"""`benchsync init`: create the data directory (mode 0700: it holds the node's keys and data)
and its lab key (`<home>/lab.key`: a fresh key, a closed lab of one, or `--lab-key FILE`'s)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchsync.daemon.cli.common import CLIError, data_dir, os_error
from benchsync.daemon.lab import (
    LAB_KEY_MODE,
    LabKeyError,
    encode_key,
    ensure_home_key,
    home_key_path,
    read_key,
)

DATA_DIR_MODE = 0o700  # the identity key, the database and the blocks are the node's alone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the data directory ($BENCHSYNC_HOME or XDG data dir)")
    p.add_argument("--home", help="data directory (default: $BENCHSYNC_HOME, else XDG data dir)")
    p.add_argument("--lab-key", metavar="FILE",
                   help="join the lab whose key FILE holds (copied to <home>/lab.key); "
                        "default: a new key, a lab of one")  # fmt: skip
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


def install_lab_key(home: Path, source: Path | None) -> Path:
    """`<home>/lab.key`: a copy of `source`'s key, else the existing or a new one.

    Raises CLIError when `source` is no usable key, or the home already holds
    another key (replacing it would make this node a stranger to its lab).
    """
    target = home_key_path(home)
    try:
        if source is None:
            return ensure_home_key(home)
        key = read_key(source)
        if target.exists():
            if read_key(target) == key:
                return target
            raise CLIError(
                f"{target} already holds another lab key",
                f"move it away first if this node should leave its lab for {source}'s",
            )
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, LAB_KEY_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(encode_key(key))
        return target
    except LabKeyError as e:
        raise CLIError(e.message, e.hint) from e
    except OSError as e:
        raise os_error(e) from e


def run(args: argparse.Namespace) -> int:
    home = data_dir(args.home)
    make_private_home(home)
    install_lab_key(home, Path(args.lab_key) if args.lab_key else None)
    print(home)
    return 0
