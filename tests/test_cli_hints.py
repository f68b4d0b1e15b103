"""The CLI's one table of `Try:` hints (`user_error`), which `up` uses too: every
failure of the environment gets what happened and what to try; a bug gets None."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from benchsync.daemon.cli import user_error
from benchsync.daemon.cli.common import CLIError
from benchsync.daemon.control import ControlSocketError, ControlTCPError
from benchsync.daemon.host import HostConfigError, ListenError
from benchsync.daemon.identity import IdentityError
from benchsync.storage.db import DatabaseDamaged, DatabaseLocked
from benchsync.storage.errors import StorageError
from benchsync.storage.homelock import HomeInUse

HOME = Path("/srv/benchsync")


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (HomeInUse(HOME, 4242), f"`benchsync status --home {HOME}`"),
        (DatabaseLocked("database is locked"), "a node runs on this data directory"),
        (DatabaseDamaged("not a DuckDB file"), "move the database file aside"),
        (StorageError("export failed"), "after fixing the cause above"),
        (ListenError("cannot listen on /ip4/0.0.0.0/tcp/4816"), "choose another --listen"),
        (HostConfigError("bootstrap: not a multiaddr"), "fix the setting named above"),
        (IdentityError("key file is not a libp2p key"), "key file"),
        # Errors with a hint of their own keep it.
        (ControlSocketError(HOME / "c.sock", "exists and is not a socket", "move that file away"),
         "move that file away"),
        (ControlTCPError(HOME / "c.sock", ("127.0.0.1", 9), "the port is in use",
                         "set control_tcp to another port"), "set control_tcp"),
        (OSError(errno.EROFS, "Read-only file system", str(HOME)), "mounted read-only"),
        (OSError(errno.EACCES, "Permission denied", str(HOME)), "this user may write there"),
    ],  # fmt: skip
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_every_environment_failure_has_its_hint(error: Exception, hint: str) -> None:
    err = user_error(error)
    assert isinstance(err, CLIError)
    assert err.message and err.hint and hint in err.hint, err.hint


def test_an_own_hint_comes_with_its_message() -> None:
    err = user_error(ControlTCPError(HOME / "c.sock", ("127.0.0.1", 9), "in use", "try it"))
    assert err is not None
    assert err.message == "control_tcp 127.0.0.1:9: in use" and err.hint == "try it"


def test_a_bug_gets_no_hint() -> None:
    assert user_error(KeyError("x")) is None
    assert user_error(AssertionError()) is None
