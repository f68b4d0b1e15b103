"""Messages of `/benchsync/query/1.0.0`: a query request and its response.

Pure codec (no I/O). Both messages are self-describing and bounded:

    magic (4 bytes) | header length (4 bytes, big-endian) | JSON header | body

A request's body is empty; a response's body is an Arrow IPC stream (status
"ok") or empty (an error). The network layer sends `to_bytes()` inside its own
length-prefixed frames; `from_bytes()` validates every field and raises
`QueryMessageError` (the remote peer's fault) on anything malformed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

REQUEST_MAGIC = b"BSQ1"
RESPONSE_MAGIC = b"BSR1"
MAX_SQL_BYTES = 64 * 1024  # bytes of UTF-8 SQL text
MAX_PARAMS = 256  # query parameters
MAX_PARAM_STR_BYTES = 16 * 1024  # bytes per string parameter
MAX_HEADER_BYTES = 256 * 1024  # bytes of JSON header
MAX_MESSAGE_CHARS = 4096  # characters of an error message
MAX_TIMEOUT = 300.0  # seconds
MAX_ROWS = 10_000_000  # rows a requester may ask for
MIN_INT_PARAM, MAX_INT_PARAM = -(2**63), 2**63 - 1  # an integer parameter binds as a BIGINT
MAX_RESULT_BYTES = 256 * 1024 * 1024  # bytes of Arrow IPC in one response
_PREFIX = struct.Struct(">4sI")

Status = Literal["ok", "refused", "invalid_sql", "timeout", "too_large", "internal"]
STATUSES: tuple[str, ...] = get_args(Status)
ERROR_KINDS: tuple[str, ...] = tuple(s for s in STATUSES if s != "ok")

Param = None | bool | int | float | str


class QueryMessageError(ValueError):
    """Bytes or fields that do not form a valid query message (the sender's fault)."""


def _header(data: bytes, magic: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _PREFIX.size:
        raise QueryMessageError(f"message of {len(data)} bytes is shorter than its prefix")
    got_magic, length = _PREFIX.unpack_from(data)
    if got_magic != magic:
        raise QueryMessageError(f"bad magic {got_magic!r}, expected {magic!r}")
    if length > MAX_HEADER_BYTES:
        raise QueryMessageError(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + length
    if len(data) < end:
        raise QueryMessageError(f"truncated header: need {end} bytes, got {len(data)}")
    try:
        header = json.loads(data[_PREFIX.size : end].decode("utf-8"))
    except RecursionError:  # 256 KiB of "[" nests deeper than the parser's stack allows
        raise QueryMessageError("header is JSON nested too deeply") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more than 4300 digits
        raise QueryMessageError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise QueryMessageError("header must be a JSON object")
    return header, data[end:]


def _pack(magic: bytes, header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return _PREFIX.pack(magic, len(raw)) + raw + body


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in header:
        raise QueryMessageError(f"missing field {name!r}")
    value = header[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise QueryMessageError(f"field {name!r} has type {type(value).__name__}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _utf8_size(text: str, what: str) -> int:
    """Bytes of `text` in UTF-8; QueryMessageError if it cannot be encoded (JSON's
    "\\ud800" escapes decode to lone surrogates, which UTF-8 cannot carry)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise QueryMessageError(f"{what} is not valid Unicode text (lone surrogate)") from None


@dataclass(frozen=True)
class QueryRequest:
    """A read-only SQL query with the limits the requester accepts."""

    sql: str
    params: list[Param] = field(default_factory=list)
    timeout_s: float = 10.0  # seconds
    max_rows: int = 1_000_000
    max_bytes: int = 64 * 1024 * 1024  # bytes of Arrow IPC

    def __post_init__(self) -> None:
        if not isinstance(self.sql, str) or not self.sql.strip():
            raise QueryMessageError("sql must be a non-empty string")
        if _utf8_size(self.sql, "sql") > MAX_SQL_BYTES:
            raise QueryMessageError(f"sql exceeds {MAX_SQL_BYTES} bytes")
        if not isinstance(self.params, list) or len(self.params) > MAX_PARAMS:
            raise QueryMessageError(f"params must be a list of at most {MAX_PARAMS} values")
        for p in self.params:
            if p is not None and not isinstance(p, bool | int | float | str):
                raise QueryMessageError(f"parameter of type {type(p).__name__} is not allowed")
            if isinstance(p, float) and not math.isfinite(p):
                raise QueryMessageError("float parameters must be finite")
            if type(p) is int and not MIN_INT_PARAM <= p <= MAX_INT_PARAM:
                raise QueryMessageError("integer parameters must fit in 64 bits (BIGINT)")
            if isinstance(p, str) and _utf8_size(p, "a string parameter") > MAX_PARAM_STR_BYTES:
                raise QueryMessageError(f"string parameter exceeds {MAX_PARAM_STR_BYTES} bytes")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float):
            raise QueryMessageError("timeout_s must be a number")
        if not 0 < self.timeout_s <= MAX_TIMEOUT:
            raise QueryMessageError(
                f"timeout_s must be in (0, {MAX_TIMEOUT}], got {self.timeout_s}"
            )
        for name, top in (("max_rows", MAX_ROWS), ("max_bytes", MAX_RESULT_BYTES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise QueryMessageError(f"{name} must be an integer in [0, {top}], got {value!r}")

    def to_bytes(self) -> bytes:
        return _pack(REQUEST_MAGIC, {
            "sql": self.sql, "params": self.params, "timeout_s": self.timeout_s,
            "max_rows": self.max_rows, "max_bytes": self.max_bytes,
        })  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> QueryRequest:
        """Decode and validate; raises QueryMessageError."""
        header, body = _header(data, REQUEST_MAGIC)
        if body:
            raise QueryMessageError(f"{len(body)} unexpected bytes after the request header")
        return cls(
            sql=_field(header, "sql", str),
            params=_field(header, "params", list),
            timeout_s=_field(header, "timeout_s", (int, float)),
            max_rows=_field(header, "max_rows", int),
            max_bytes=_field(header, "max_bytes", int),
        )


@dataclass(frozen=True)
class QueryResponse:
    """An answer (status "ok", Arrow IPC stream in `arrow_ipc`) or a typed error."""

    status: Status
    message: str = ""
    arrow_ipc: bytes = b""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise QueryMessageError(f"status must be one of {STATUSES}, got {self.status!r}")
        if not isinstance(self.message, str) or len(self.message) > MAX_MESSAGE_CHARS:
            raise QueryMessageError(f"message must be a string of at most {MAX_MESSAGE_CHARS}")
        _utf8_size(self.message, "message")  # it is shown to a user
        if not isinstance(self.arrow_ipc, bytes) or len(self.arrow_ipc) > MAX_RESULT_BYTES:
            raise QueryMessageError(f"arrow_ipc must be at most {MAX_RESULT_BYTES} bytes")
        if self.status != "ok" and self.arrow_ipc:
            raise QueryMessageError("an error response carries no Arrow data")
        if self.status == "ok" and not self.arrow_ipc:
            raise QueryMessageError("an ok response carries an Arrow IPC stream")

    @classmethod
    def error(cls, status: Status, message: str) -> QueryResponse:
        """An error response; a long message is cut to MAX_MESSAGE_CHARS, and what
        UTF-8 cannot carry (lone surrogates) is replaced."""
        text = message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace").decode("utf-8")
        return cls(status=status, message=text)

    def to_bytes(self) -> bytes:
        header = {"status": self.status, "message": self.message, "body": len(self.arrow_ipc)}
        return _pack(RESPONSE_MAGIC, header, self.arrow_ipc)

    @classmethod
    def from_bytes(cls, data: bytes) -> QueryResponse:
        """Decode and validate; raises QueryMessageError."""
        header, body = _header(data, RESPONSE_MAGIC)
        declared = _field(header, "body", int)
        if declared != len(body):
            raise QueryMessageError(f"body of {len(body)} bytes, header says {declared}")
        return cls(
            status=_field(header, "status", str),
            message=_field(header, "message", str),
            arrow_ipc=bytes(body),
        )
