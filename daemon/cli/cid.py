"""`benchsync cid PATH`: the UnixFS CID of a file or directory, computed offline.

Prints what `ipfs add -n -r --cid-version=1 PATH` prints as the last CID
(Kubo's defaults: raw leaves, 256 KiB chunks, balanced DAG of 174 links), without
storing anything and without a running node.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multiformats import CID

from benchsync.daemon.cli.common import CLIError
from benchsync.storage import unixfs
from benchsync.storage.errors import StorageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cid",
        help="print the UnixFS CID of a file or directory (as `ipfs add -n --cid-version=1`)",
        description=(
            "Print the CIDv1 that `ipfs add -n -r --cid-version=1 PATH` would print for PATH "
            "(sha2-256, raw leaves, 256 KiB chunks, 174 links per node). Nothing is stored. "
            "Like Kubo, files and directories whose names start with '.' inside a directory "
            "are skipped unless --hidden is given; symlinks are added as links, not followed."
        ),
    )
    p.add_argument("path", type=Path, help="file or directory")
    p.add_argument("-H", "--hidden", action="store_true", help="include dotfiles (Kubo's --hidden)")
    p.set_defaults(func=run)


def _discard(cid: CID, data: bytes) -> None:
    """`ipfs add -n`: hash only, store nothing."""


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists() and not path.is_symlink():
        raise CLIError(f"{path} does not exist", "give the path of a file or directory")
    try:
        cid = unixfs.add_path(path, _discard, hidden=args.hidden)
    except OSError as e:
        where = e.filename or path
        raise CLIError(f"cannot read {where}: {e.strerror}", "check its permissions") from e
    except StorageError as e:
        raise CLIError(str(e), "give a path holding only files, directories and symlinks") from e
    print(cid)
    return 0
