"""Errors raised by the storage layer.

Every error says who is at fault and carries the numbers: a `TooLarge` names
the limit and what it got; a `CorruptBlock` names the CID it expected. Modules
of `benchsync.storage` raise these (or subclasses defined next to the code
that raises them); the CLI and the daemon turn them into user-facing messages.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error benchsync.storage raises on purpose."""


class InvalidRecord(StorageError, ValueError):
    """A record handed to the database is invalid; nothing was written."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class NotFound(StorageError, KeyError):
    """Something asked for by identifier (a block, a version, a table) is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class CorruptBlock(StorageError):
    """Bytes that do not hash to the CID they were stored or sent under."""

    def __init__(self, cid: object, detail: str = "") -> None:
        msg = f"block {cid} does not match its CID"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.cid = cid


class TooLarge(StorageError):
    """An input exceeded a named limit."""

    def __init__(self, what: str, *, limit: int, got: int) -> None:
        super().__init__(f"{what} too large: {got} bytes, limit {limit}")
        self.what = what
        self.limit = limit
        self.got = got
