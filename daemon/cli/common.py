"""Shared pieces of the CLI: the data directory, error reporting, output formats."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchsync.daemon.control import ControlClient
    from benchsync.storage.dataset import LocalDataset

SYSTEMD_STATE_DIR = Path("/var/lib/benchsync")  # the unit's StateDirectory=benchsync (its home)
SYSTEMD_RUNTIME_DIR = Path("/run/benchsync")  # the unit's RuntimeDirectory=benchsync


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


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """--home and --control-socket, for a command that talks to the node running on a
    data directory (`node_client`): found by its socket, else the command works offline."""
    add_home_argument(parser)
    parser.add_argument(
        "--control-socket", metavar="PATH",
        help="the running node's control socket (default: $BENCHSYNC_CONTROL_SOCKET, the "
             "control_socket setting, else <home>/control.sock or the systemd unit's); "
             "given, a node must answer there",
    )  # fmt: skip


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


def require_home(home: Path) -> None:
    """Refuse a data directory that `init` or `up` never made (a mistyped --home).

    Raises `CLIError`: only `init` and `up` create a data directory, so that a
    typo never makes a new identity or an empty version.
    """
    if not home.is_dir():
        raise CLIError(
            f"{home} is not a benchsync data directory (no such directory)",
            "check --home / $BENCHSYNC_HOME; `benchsync init` (or `benchsync up`) creates one",
        )


def open_dataset(args: argparse.Namespace) -> LocalDataset:
    """Open an existing data directory offline (no running node).

    Raises CLIError for a data directory that does not exist (`require_home`),
    IdentityError for an unusable key file. The database itself opens on first
    use; a node holding it makes that raise DatabaseLocked. `main` turns each
    into an error with a hint.
    """
    from benchsync.daemon.identity import load_or_create_identity, peer_id_of
    from benchsync.storage.dataset import LocalDataset

    home = data_dir(getattr(args, "home", None))
    require_home(home)
    key_pair = load_or_create_identity(home)  # exists: loaded; IdentityError: `main` hints
    return LocalDataset(home, peer_id_of(key_pair))


def node_client(args: argparse.Namespace) -> ControlClient | None:
    """A client of the node running on this data directory, or None when none answers."""
    from benchsync.daemon.config import ConfigError, load_config
    from benchsync.daemon.control import ControlClient

    home = data_dir(getattr(args, "home", None))
    explicit = getattr(args, "control_socket", None)  # --control-socket (add_node_arguments)
    overrides = {"control_socket": explicit} if explicit else None
    try:
        config = load_config(home, getattr(args, "config", None), overrides=overrides)
    except ConfigError as e:
        raise CLIError(str(e), "fix the setting named above (see `benchsync config docs`)") from e
    timeout = getattr(args, "timeout", None) or 300.0
    for path in control_sockets(home, config.control_socket, config.sources.get("control_socket")):
        client = ControlClient(socket_path=path, timeout=timeout)
        if client.available():
            return client
    if explicit:  # asked for a node there: never fall back to the data directory itself
        raise CLIError(f"no node answers on control socket {config.control_socket}",
                       "check the path (`benchsync status` on the node's machine shows it), "
                       "that the node runs, and that this user may use the socket "
                       "(group benchsync for the systemd unit)")  # fmt: skip
    return None


def control_sockets(home: Path, configured: Path, source: str | None) -> list[Path]:
    """Where the node of `home` may listen: the configured socket, then, unless it
    was set explicitly, the systemd unit's (RuntimeDirectory) for its StateDirectory."""
    from benchsync.daemon.config import CONTROL_SOCKET_NAME

    out = [configured]
    if source in (None, "default", "$RUNTIME_DIRECTORY"):
        with contextlib.suppress(OSError):
            if home.resolve() == SYSTEMD_STATE_DIR.resolve():
                out.append(SYSTEMD_RUNTIME_DIR / CONTROL_SOCKET_NAME)
    return list(dict.fromkeys(out))


def call_node(client: ControlClient, method: str, path: str, body: Any = None) -> Any:
    """One control API call; its error shape becomes a CLIError."""
    from benchsync.daemon.control import ControlAPIError

    try:
        if method == "GET":
            return client.get(path)
        return client.post(path, body)
    except ControlAPIError as e:
        raise CLIError(e.message, e.hint) from e
