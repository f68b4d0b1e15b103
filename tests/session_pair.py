"""Two sans-IO sessions joined by an in-memory link (h11's ConnectionPair).

Whatever one side sends is fed to the other at once, and `check()` asserts
that each side decoded exactly the events the other sent: the wire format
round-trips, byte for byte, with no network.
"""

from __future__ import annotations

from benchsync.protocol.session import NEED_DATA, REQUESTER, RESPONDER, EndOfStream, Session


class SessionPair:
    def __init__(self, requester: Session, responder: Session) -> None:
        self.sides = {REQUESTER: requester, RESPONDER: responder}
        self.sent: dict[str, list[object]] = {REQUESTER: [], RESPONDER: []}
        self.received: dict[str, list[object]] = {REQUESTER: [], RESPONDER: []}
        self.wire: dict[str, bytes] = {REQUESTER: b"", RESPONDER: b""}  # bytes each side got

    @staticmethod
    def other(role: str) -> str:
        return RESPONDER if role == REQUESTER else REQUESTER

    def send(self, role: str, *events: object) -> bytes:
        """`role` sends `events`; the other side decodes them. Returns the bytes sent."""
        out = b""
        for event in events:
            data = self.sides[role].send(event)
            self.sent[role].append(event)
            out += data
            self.deliver(self.other(role), data)
        return out

    def deliver(self, role: str, data: bytes) -> None:
        """Feed raw `data` to `role` (b"": the other side closed) and collect its events."""
        self.wire[role] += data
        self.sides[role].receive_data(data)
        while True:
            event = self.sides[role].next_event()
            if event is NEED_DATA:
                return
            self.received[role].append(event)
            if isinstance(event, EndOfStream):
                return

    def close(self, role: str) -> None:
        """`role` closes its side of the stream."""
        self.deliver(self.other(role), b"")

    def check(self) -> None:
        """Each side decoded exactly what the other sent (and, if closed, the end)."""
        for role in (REQUESTER, RESPONDER):
            got = [e for e in self.received[self.other(role)] if not isinstance(e, EndOfStream)]
            assert got == self.sent[role]
