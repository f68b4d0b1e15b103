"""Shared pieces of the CLI: the data directory, error reporting, output formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The node's data directory: explicit path, else $BENCHSYNC_HOME, else XDG data dir."""
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("BENCHSYNC_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "benchsync"
