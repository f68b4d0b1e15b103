"""`/benchsync/query/1.0.0`: its messages and its sessions, sans-IO.

Messages. Both are self-describing and bounded:

    magic (4 bytes) | header length (4 bytes, big-endian) | JSON header | body

A request's body is empty; a response's body is an Arrow IPC stream (status
"ok") or empty (an error). `from_bytes()` validates every field and raises
`QueryMessageError` (the remote peer's fault) on anything malformed.

Sessions. One stream carries one query, every frame varint-length-prefixed
(`benchsync.protocol.frames`):

    requester -> server  frame 1: JSON hello {"network": NAME}  <= MAX_HELLO_FRAME
                         frame 2: QueryRequest.to_bytes()       <= MAX_REQUEST_FRAME
    server -> requester  one frame: QueryResponse.to_bytes()
                         (<= response_frame_limit(request.max_bytes)),
                         or a JSON refusal frame {"status": "refused", ...}

`QuerySession` holds that order (a `benchsync.protocol.session.Session`:
bytes in, events out, like h11's `Connection`); the daemon's stream adapter
moves its bytes, refuses (access policy, another network, a malformed
request) and hands the request to the query server. A refusal frame is told
from a response by its first byte: a response starts with its magic
(`RESPONSE_MAGIC`), a JSON object with "{".
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from benchsync.protocol.frames import (
    LocalProtocolError,
    RemoteProtocolError,
    decode_json,
    encode_frame,
    encode_json_frame,
)
from benchsync.protocol.session import (
    DONE,
    IDLE,
    NEED_DATA,
    REQUESTED,
    REQUESTER,
    RESPONDER,
    Refusal,
    Session,
    Transitions,
    parse_refusal,
)

QUERY_PROTOCOL_ID = "/benchsync/query/1.0.0"
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
MAX_HELLO_FRAME = 4 * 1024  # bytes: the JSON hello holds a network name only
MAX_REQUEST_FRAME = _PREFIX.size + MAX_HEADER_BYTES  # bytes: magic + length + JSON header
MAX_RESPONSE_OVERHEAD = 64 * 1024  # bytes of response header around the Arrow IPC body

# Why a request is asked: "answer" (the default, and what a request without the field
# means: an old peer's) is clamped by the server's query_max_rows/query_max_bytes;
# "ship" (base-table rows for the coordinator of a network query that cannot be split)
# by its query_ship_max_bytes and no row count (max_rows does not apply).
Purpose = Literal["answer", "ship"]
PURPOSES: tuple[str, ...] = get_args(Purpose)

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
    """A read-only SQL query with the limits the requester accepts.

    A limit left out is the protocol's maximum: the server clamps every
    request to its own settings (`query_timeout`, `query_max_rows`, ...).
    `purpose` "ship" asks for base-table rows a coordinator merges (see
    `Purpose`): the server bounds it by its `query_ship_max_bytes` and by no
    row count (`max_rows` does not apply); still at most MAX_RESULT_BYTES,
    the wire's largest answer.
    """

    sql: str
    params: list[Param] = field(default_factory=list)
    timeout_s: float = MAX_TIMEOUT  # seconds
    max_rows: int = MAX_ROWS
    max_bytes: int = MAX_RESULT_BYTES  # bytes of Arrow IPC
    purpose: Purpose = "answer"  # "ship": rows for a coordinator, bounded by bytes only

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
        if self.purpose not in PURPOSES:
            raise QueryMessageError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")

    def to_bytes(self) -> bytes:
        header: dict[str, Any] = {
            "sql": self.sql, "params": self.params, "timeout_s": self.timeout_s,
            "max_rows": self.max_rows, "max_bytes": self.max_bytes,
        }  # fmt: skip
        if self.purpose != "answer":  # left out otherwise: the bytes old peers send
            header["purpose"] = self.purpose
        return _pack(REQUEST_MAGIC, header)

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
            # optional: a peer from before the field asks for answers
            purpose=_field(header, "purpose", str) if "purpose" in header else "answer",
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


# --- the session -------------------------------------------------------------------------------


def response_frame_limit(max_bytes: int) -> int:
    """The largest response frame a requester accepts for a request with `max_bytes`."""
    return min(max_bytes, MAX_RESULT_BYTES) + MAX_RESPONSE_OVERHEAD


@dataclass(frozen=True)
class QueryOpen:
    """The requester's event: the network it is on (the hello) and its request."""

    network: str
    request: QueryRequest


class QuerySession(Session):
    """One side of a query stream (see the module docstring for the exchange).

    Events: the requester sends `QueryOpen`; the responder answers with one
    `QueryResponse` (an error status included) or a `Refusal`. Each frame has
    its own limit: the hello MAX_HELLO_FRAME, the request MAX_REQUEST_FRAME,
    the response `response_frame_limit` of the request's max_bytes. A request
    that does not decode is a `RemoteProtocolError` naming the fault.
    """

    TRANSITIONS: ClassVar[Transitions] = {
        (REQUESTER, IDLE, QueryOpen): REQUESTED,
        (RESPONDER, REQUESTED, QueryResponse): DONE,
        (RESPONDER, IDLE, Refusal): DONE,
        (RESPONDER, REQUESTED, Refusal): DONE,
    }

    def __init__(self, role: str) -> None:
        super().__init__(role, max_frame=MAX_HELLO_FRAME)
        self.request: QueryRequest | None = None  # once sent or received
        self._network: str | None = None  # the hello's, while the request is awaited

    def _encode(self, event: object) -> bytes:
        if isinstance(event, QueryOpen):
            hello = encode_json_frame({"network": event.network}, max_frame=MAX_HELLO_FRAME)
            body = event.request.to_bytes()
            if len(body) > MAX_REQUEST_FRAME:
                raise LocalProtocolError(
                    f"query request of {len(body)} bytes exceeds {MAX_REQUEST_FRAME}")  # fmt: skip
            self.request = event.request
            self.frames.max_frame = response_frame_limit(event.request.max_bytes)
            return hello + encode_frame(body, max_frame=MAX_REQUEST_FRAME)
        if isinstance(event, QueryResponse):
            limit = MAX_RESPONSE_OVERHEAD
            if self.request is not None:
                limit = response_frame_limit(self.request.max_bytes)
            return encode_frame(event.to_bytes(), max_frame=limit)
        return super()._encode(event)

    def _decode(self) -> object:
        if self.role == RESPONDER:
            return self._decode_open()
        body = self._next_frame()
        if body is None:
            return NEED_DATA
        # A response starts with its magic; a refusal is a JSON object.
        if body[:1] == b"{":
            obj = decode_json(body)
            refused = parse_refusal(obj)
            if refused is None:
                status = obj.get("status")
                raise RemoteProtocolError(f"unexpected JSON frame with status {status!r}")
            return refused
        try:
            return QueryResponse.from_bytes(body)
        except QueryMessageError as e:
            raise RemoteProtocolError(f"malformed query response: {e}") from None

    def _decode_open(self) -> object:
        if self._network is None:
            body = self._next_frame()
            if body is None:
                return NEED_DATA
            network = decode_json(body).get("network")
            if not isinstance(network, str):
                raise RemoteProtocolError("the hello names no network")
            self._network = network
            self.frames.max_frame = MAX_REQUEST_FRAME
        body = self._next_frame()
        if body is None:
            return NEED_DATA
        try:
            self.request = QueryRequest.from_bytes(body)
        except QueryMessageError as e:
            raise RemoteProtocolError(f"malformed query request: {e}") from None
        return QueryOpen(self._network, self.request)
