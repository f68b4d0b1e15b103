"""The request/response session every benchsync stream protocol runs, sans-IO.

A session is one side of one stream (h11's `Connection`): bytes in with
`receive_data` (b"" is the end of the stream), events out with
`next_event` (`NEED_DATA` until one is whole), and `send(event)` returning
the bytes to write. It does no I/O; the daemon's stream adapter
(`benchsync.daemon.streams`) drives it over a libp2p stream, and tests drive
two of them joined by an in-memory link.

Both ends of a stream follow the same exchange states, so one transition
table per protocol, keyed by (who sends, state, event type), says what may
happen next (h11's `_state.py`). Sending an event the table does not allow
raises `LocalProtocolError` (our bug); receiving one raises
`RemoteProtocolError` (the peer's). Every protocol shares the opening and the
refusal:

    IDLE --requester: request--> REQUESTED --responder: answer--> ... --> DONE
    IDLE or REQUESTED --responder: Refusal--> DONE

A responder may refuse before reading the request (an untrusted peer): the
refusal is a JSON frame `{"status": "refused", "reason": ...}` on every
protocol, so a requester recognises it as an event, never by sniffing bytes.
The request event of every protocol has a `network` field: the adapter checks
it in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from benchsync.protocol.frames import (
    MAX_FRAME,
    FrameDecoder,
    Interrupted,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedFrame,
    decode_json,
    encode_json_frame,
    refusal,
)

REQUESTER: Final = "requester"
RESPONDER: Final = "responder"

IDLE: Final = "idle"  # nothing sent yet
REQUESTED: Final = "requested"  # the request is out; the responder answers next
DONE: Final = "done"  # the exchange is over; only the end of the stream may follow

MAX_REASON = 500  # characters of a peer's refusal reason we keep


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()  # `next_event` has no whole event yet: feed more bytes


@dataclass(frozen=True)
class Refusal:
    """The responder will not serve this request; `reason` says why (for the user)."""

    reason: str


@dataclass(frozen=True)
class EndOfStream:
    """The peer closed its side after a complete exchange."""


Transitions = Mapping[tuple[str, str, type], str]


class Session:
    """One side (`role`) of a request/response stream; subclasses give the table and codecs.

    A subclass sets `TRANSITIONS` and implements `_encode(event)` (bytes for an
    event we send) and `_decode()` (the next event from the buffered bytes, or
    `NEED_DATA`), using `self.frames` for framed messages.
    """

    TRANSITIONS: ClassVar[Transitions]

    def __init__(self, role: str, *, max_frame: int = MAX_FRAME) -> None:
        if role not in (REQUESTER, RESPONDER):
            raise ValueError(f"role must be {REQUESTER!r} or {RESPONDER!r}, not {role!r}")
        self.role = role
        self.peer_role = RESPONDER if role == REQUESTER else REQUESTER
        self.state: str = IDLE
        self.frames = FrameDecoder(max_frame=max_frame)
        self.eof = False  # the peer closed its side of the stream

    # --- the state machine ------------------------------------------------------------

    def _step(self, sender: str, event: object) -> None:
        new = self.TRANSITIONS.get((sender, self.state, type(event)))
        if new is None:
            error = LocalProtocolError if sender == self.role else RemoteProtocolError
            raise error(
                f"{type(self).__name__}: {sender} may not send {type(event).__name__} "
                f"in state {self.state!r}"
            )
        self.state = new

    @property
    def done(self) -> bool:
        return self.state == DONE

    # --- our side ---------------------------------------------------------------------

    def send(self, event: object) -> bytes:
        """The bytes that carry `event` to the peer.

        Raises `LocalProtocolError` when the exchange does not allow it now (or
        it does not fit its frame); the state is unchanged then.
        """
        self._check_send(event)
        data = self._encode(event)
        self._step(self.role, event)
        return data

    def _check_send(self, event: object) -> None:
        if (self.role, self.state, type(event)) not in self.TRANSITIONS:
            self._step(self.role, event)  # raises LocalProtocolError

    def _encode(self, event: object) -> bytes:
        if isinstance(event, Refusal):
            return encode_json_frame(refusal(event.reason))
        raise LocalProtocolError(f"{type(self).__name__} cannot send {type(event).__name__}")

    # --- the peer's side ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the stream; b"" means the peer closed its side."""
        if self.eof:
            if data:
                raise LocalProtocolError("data received after the end of the stream")
            return
        if not data:
            self.eof = True
        else:
            self.frames.feed(data, max_frames=0)

    def next_event(self) -> object:
        """The peer's next event, `NEED_DATA`, or `EndOfStream` once it closed after DONE.

        Raises `RemoteProtocolError` when the peer broke the protocol and
        `Interrupted` when its stream ended before the exchange was complete.
        """
        if self.state == DONE:
            if self.frames.buffered:
                raise RemoteProtocolError(
                    f"{self.frames.buffered} bytes after the end of the exchange"
                )
            return EndOfStream() if self.eof else NEED_DATA
        event = self._decode()
        if event is NEED_DATA:
            if self.eof:
                try:
                    self.frames.close()
                except TruncatedFrame as e:
                    raise Interrupted(str(e)) from None
                raise Interrupted(f"stream ended in state {self.state!r}")
            return NEED_DATA
        self._step(self.peer_role, event)
        return event

    def _decode(self) -> object:
        raise NotImplementedError

    def _next_frame(self) -> bytes | None:
        """The next whole frame body, or None (need more data)."""
        frames = self.frames.feed(b"", max_frames=1)
        return frames[0] if frames else None

    def _next_json(self) -> dict[str, Any] | None:
        body = self._next_frame()
        return None if body is None else decode_json(body)


def parse_refusal(obj: Mapping[str, Any]) -> Refusal | None:
    """The `Refusal` a status object carries, or None when it is no refusal."""
    if obj.get("status") != "refused":
        return None
    return Refusal(str(obj.get("reason", "no reason given"))[:MAX_REASON])
