"""Length-prefixed framing for benchsync's request/response protocols, sans-IO.

Every control message on `/benchsync/head/1.0.0`, `/benchsync/car/1.0.0` (and
the query protocol) travels as one frame: an unsigned varint length followed by
that many body bytes. This module owns the framing and the errors that say who
broke the protocol; it does no I/O. The daemon feeds the bytes it reads into a
`FrameDecoder` and writes what `encode_frame` returns.

A length prefix is checked against a named maximum *before* the body is
buffered, so a hostile peer cannot make us allocate more than `max_frame`.
JSON frames (`encode_json_frame` / `decode_json`) carry the small control
messages; bulk data (CAR) flows unframed after them.
"""

from __future__ import annotations

import json
from typing import Any

from multiformats import CID, varint

# A length prefix is a multiformats unsigned varint, as in a CID: the same 9-byte cap
# (multiformats' decoder refuses a 10th byte), so one definition.
from benchsync.storage.cid import MAX_VARINT_BYTES

MAX_FRAME = 64 * 1024  # bytes: the largest control frame any benchsync protocol accepts


class ProtocolError(Exception):
    """Base of every wire-format error: a message or frame that breaks the protocol.

    Who is at fault is the type (h11): `LocalProtocolError` is ours,
    `RemoteProtocolError` the peer's (the daemon bans for it and for nothing
    else). `Refused` and `Interrupted` are outcomes, not errors of either side.
    """


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (our bug or our caller's)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; drop its stream, maybe penalise it."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's length prefix exceeds the named maximum."""

    def __init__(self, *, limit: int, got: int) -> None:
        super().__init__(f"frame too large: {got} bytes, limit {limit}")
        self.limit = limit
        self.got = got


class TruncatedFrame(RemoteProtocolError):
    """The stream ended inside a frame (the peer died or cut the stream short)."""


class Refused(Exception):
    """A request was refused (wrong network, untrusted peer, busy, banned); `reason` says why.

    Neither side broke the protocol: a refusal is a well-formed answer, so it
    is no `ProtocolError` and never costs the refusing peer a ban. Raised to
    the requester when the peer's answer is a refusal, and by checks (such as
    `check_network`) when we must refuse; either way the reason is sent or shown.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


class Interrupted(Exception):
    """The stream ended or stalled before the exchange was complete; nobody is blamed.

    A peer killed mid-stream looks like a clean end of stream, so a short
    answer is an interruption, not a protocol violation: try another peer.
    """


def refusal(reason: str) -> dict[str, Any]:
    """The refusal body every benchsync request/response protocol answers with."""
    return {"status": "refused", "reason": reason}


def check_network(obj: dict[str, Any], network: str) -> None:
    """Raise `Refused` unless request `obj` names our `network`."""
    other = obj.get("network")
    if other != network:
        raise Refused(
            f"wrong network: this node is on network {network!r}, the request was for {other!r}"
        )


MAX_CID_TEXT = 256  # characters of a CID string in a message (a sha2-512 CIDv1 is ~110)


def parse_cid(value: object, what: str, error: type[Exception]) -> CID:
    """The CID in a message field, or `error` naming the field and the value.

    `error` is the caller's protocol error class (a bad head and a bad fetch
    request are rejected differently); multiformats' own exceptions, of several
    unrelated types, never escape.
    """
    if not isinstance(value, str) or len(value) > MAX_CID_TEXT:
        raise error(f"{what} must be a CID string, got {type(value).__name__}")
    try:
        return CID.decode(value)
    except Exception as e:
        raise error(f"{what}={value!r} is not a CID: {e}") from None


def encode_frame(body: bytes, *, max_frame: int = MAX_FRAME) -> bytes:
    """Return `body` with its varint length prefix.

    Raises `LocalProtocolError` when the body exceeds `max_frame`: the peer
    would refuse it, so sending it is our mistake.
    """
    if len(body) > max_frame:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds the limit {max_frame}")
    return varint.encode(len(body)) + body


def encode_json_frame(obj: Any, *, max_frame: int = MAX_FRAME) -> bytes:
    """Return one frame holding `obj` as compact UTF-8 JSON (see `encode_frame`)."""
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return encode_frame(body, max_frame=max_frame)


def decode_json(body: bytes) -> dict[str, Any]:
    """Parse a frame body as a JSON object.

    Raises `RemoteProtocolError` when it is not UTF-8 JSON or not an object.
    """
    try:
        obj = json.loads(body.decode("utf-8"))
    except RecursionError:  # a 64 KiB frame nests far deeper than the parser's stack allows
        raise RemoteProtocolError("frame is JSON nested too deeply") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more than 4300 digits
        raise RemoteProtocolError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"frame is JSON {type(obj).__name__}, expected an object")
    return obj


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frame bodies back.

    `feed(data)` returns every frame completed by `data` (possibly none: "need
    more data"). Bytes after the last complete frame stay buffered and can be
    taken back with `take_buffer()` when the protocol switches to raw data
    (the CAR stream after a fetch status frame). `close()` raises
    `TruncatedFrame` if the stream ended inside a frame.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame in progress, once known

    def feed(self, data: bytes, *, max_frames: int | None = None) -> list[bytes]:
        """Append `data`; return the bodies it completed, oldest first.

        With `max_frames`, stop after that many frames and keep the rest
        buffered. Raises `FrameTooLarge` on a length prefix above the limit and
        `RemoteProtocolError` on a malformed varint.
        """
        self._buf += data
        out: list[bytes] = []
        while max_frames is None or len(out) < max_frames:
            if self._need is None:
                # Find the varint's last byte (high bit clear) without consuming:
                # a prefix split across reads must wait for the rest.
                end = next(
                    (i for i, b in enumerate(self._buf[:MAX_VARINT_BYTES]) if b < 0x80), None
                )
                if end is None:
                    if len(self._buf) >= MAX_VARINT_BYTES:
                        raise RemoteProtocolError("frame length prefix is not a valid varint")
                    break
                try:
                    length, used, _ = varint.decode_raw(bytes(self._buf[: end + 1]))
                except ValueError as e:
                    raise RemoteProtocolError(f"frame length prefix is malformed: {e}") from None
                if length > self.max_frame:
                    raise FrameTooLarge(limit=self.max_frame, got=length)
                del self._buf[:used]
                self._need = length
            if len(self._buf) < self._need:
                break
            out.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Return and forget the bytes after the last complete frame.

        Raises `LocalProtocolError` if a frame is half-decoded (its prefix was
        consumed): switching to raw data then would lose bytes.
        """
        if self._need is not None:
            raise LocalProtocolError("cannot take the buffer in the middle of a frame")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def close(self) -> None:
        """Declare end of stream; raises `TruncatedFrame` if a frame was cut short."""
        if self._need is not None or self._buf:
            raise TruncatedFrame(
                f"stream ended inside a frame ({len(self._buf)} bytes of "
                f"{'an unknown length' if self._need is None else self._need} received)"
            )
