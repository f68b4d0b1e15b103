"""Shared pieces of the CLI: the data directory, error reporting, output formats."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchsync.daemon.control import ControlClient
    from benchsync.storage.dataset import LocalDataset


class CLIError(Exception):
    """A user-facing failure: what happened, and what to try."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def fail(err: CLIError) -> int:
    print(f"Error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"Try: {err.hint}", file=sys.stderr)
    return err.code


# errno -> what to try, for file-system failures that are the environment's, not ours.
_OS_ERROR_HINTS = {
    errno.EROFS: "the file system is mounted read-only: give the node a writable data "
                 "directory (--home or $BENCHSYNC_HOME), or remount it read-write",
    errno.EACCES: "check that this user may write there (owner and mode), or give a data "
                  "directory this user owns (--home or $BENCHSYNC_HOME)",
    errno.EPERM: "check that this user may write there (owner, mode, immutable flag)",
    errno.ENOSPC: "free some disk space, then run the same command again",
    errno.EDQUOT: "free some space (the disk quota is full), then run the same command again",
    errno.ENOENT: "check the path above; `benchsync init` creates a data directory",
    errno.ENAMETOOLONG: "use a shorter path",
}  # fmt: skip


def os_error(e: OSError) -> CLIError:
    """A `CLIError` for a file-system failure: the path, the reason, what to try."""
    reason = e.strerror or str(e)
    what = f"{e.filename}: {reason}" if e.filename is not None else reason
    if e.filename2 is not None:
        what = f"{e.filename} -> {e.filename2}: {reason}"
    hint = _OS_ERROR_HINTS.get(e.errno or 0, "check the path above and its permissions")
    return CLIError(f"cannot use {what}" if e.filename else what, hint)


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The node's data directory: explicit path, else $BENCHSYNC_HOME, else XDG data dir."""
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("BENCHSYNC_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "benchsync"


def add_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", metavar="DIR", help="data directory (default: $BENCHSYNC_HOME, else XDG data dir)"
    )


def parse_size(text: str) -> int:
    """`64M`, `1G`, `300000` -> bytes (binary multiples)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 300000)") from None


def open_dataset(args: argparse.Namespace) -> LocalDataset:
    """Open the data directory offline (no running node), creating it on first use.

    Raises IdentityError for an unusable key file and OSError when the directory
    cannot be created. The database itself opens on first use; a node holding it
    makes that raise DatabaseLocked. `main` turns each into an error with a hint.
    """
    from benchsync.daemon.identity import load_or_create_identity, peer_id_of
    from benchsync.storage.dataset import LocalDataset

    home = data_dir(getattr(args, "home", None))
    home.mkdir(parents=True, exist_ok=True)
    key_pair = load_or_create_identity(home)  # IdentityError: `main` gives the hint
    return LocalDataset(home, peer_id_of(key_pair))


def node_client(args: argparse.Namespace) -> ControlClient | None:
    """A client of the node running on this data directory, or None when none answers."""
    from benchsync.daemon.config import ConfigError, load_config
    from benchsync.daemon.control import ControlClient

    home = data_dir(getattr(args, "home", None))
    try:
        config = load_config(home, getattr(args, "config", None))
    except ConfigError as e:
        raise CLIError(str(e), "fix the setting named above (see `benchsync config docs`)") from e
    client = ControlClient(
        socket_path=config.control_socket, timeout=getattr(args, "timeout", None) or 300.0
    )
    return client if client.available() else None


def call_node(client: ControlClient, method: str, path: str, body: Any = None) -> Any:
    """One control API call; its error shape becomes a CLIError."""
    from benchsync.daemon.control import ControlAPIError

    try:
        if method == "GET":
            return client.get(path)
        return client.post(path, body)
    except ControlAPIError as e:
        raise CLIError(e.message, e.hint) from e
