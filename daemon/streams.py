"""The one stream adapter: drives a sans-IO session over a libp2p stream, behind one gate.

Every benchsync stream protocol is a `benchsync.protocol.session.Session`
(bytes in, events out); this module is the only place that moves those bytes
over an `INetStream`, and the only place that decides who may use a protocol.

Serving (`StreamAdapter.serve(protocol_id, new_session, handler)`), in order:
1. `admit(peer, protocol_id)`: the single decision point: bans, lab
   membership (`daemon/lab.py`) and `trusted_peers`. A peer whose membership
   is still being proven is waited for first (`settle`, at most
   `MEMBERSHIP_TIMEOUT`), so a stream racing the proof is not refused. A
   refused peer gets the session's `Refusal` before we read a byte of its
   request.
2. The request event is read under `request_timeout`; a malformed one is
   answered with a `Refusal` naming the error (the peer is not banned: a
   different version may have sent it).
3. The request's `network` must be ours, else a `Refusal`.
4. `handler(channel, request)` answers through the `Channel`.
The stream is closed when the handler returns and reset when it raises; an
exception costs its stream, never the node (py-libp2p tears the host down
otherwise).

Requesting (`async with adapter.open(peer, protocol_id, session) as ch`):
the peer's membership is settled and `admit(..., asking=True)` is asked first
(`Refused` without opening a stream; we never ask a stranger: its heads and
blocks are not the lab's, even when `open`), the stream is opened
under `open_timeout`, and closed on success or reset on error when the block
ends. A `Refusal` event is the caller's to turn into `Refused` (`expect`).

The membership protocol itself is the one exception: `serve_unadmitted` and
`open_unadmitted` carry it to peers not yet proven (and to strangers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from benchsync.daemon.host import (
    AccessPolicy,
    guard_handler,
    new_stream,
    read_some,
    remote_peer,
)
from benchsync.protocol.frames import Refused, RemoteProtocolError, encode_json_frame, refusal
from benchsync.protocol.session import NEED_DATA, Refusal, Session

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds for a requester to send its request once the stream is open
OPEN_TIMEOUT = 10.0  # seconds to dial (if needed) and negotiate a protocol on a new stream
CLOSE_TIMEOUT = 1.0  # seconds granted to closing or resetting a stream (the peer may be gone)


MEMBERSHIP_TIMEOUT = 10.0  # seconds a stream waits for its peer's lab membership to be proven


class Admission(Protocol):
    """Decides whether `peer` may use `protocol`: None to admit, else the reason to refuse."""

    def __call__(self, peer: str, protocol: str) -> str | None: ...


class Membership(Protocol):
    """Lab membership as the adapter needs it (`benchsync.daemon.lab.Lab`)."""

    async def settle(self, peer: str) -> None: ...

    def refusal(self, peer: str, protocol: str, *, asking: bool = False) -> str | None: ...

    def failure(self, peer: str) -> Exception | None: ...


class Channel:
    """One stream driven for one session: events in and out, raw bytes for bulk bodies.

    `wire_in`/`wire_out` count the bytes moved. Deadlines are the caller's
    (`trio.fail_after` around a call); limits are the session's.
    """

    def __init__(self, stream: INetStream, session: Session, peer: str) -> None:
        self.stream = stream
        self.session = session
        self.peer = peer
        self.wire_in = 0
        self.wire_out = 0

    async def next_event(self) -> object:
        """The peer's next event (see `Session.next_event` for what it raises)."""
        while True:
            event = self.session.next_event()
            if event is not NEED_DATA:
                return event
            self.session.receive_data(await self.read())

    async def expect(self, *types: type) -> object:
        """The next event, which must be one of `types`; a `Refusal` raises `Refused`."""
        event = await self.next_event()
        if isinstance(event, Refusal):
            raise Refused(event.reason)
        if not isinstance(event, types):
            raise RemoteProtocolError(
                f"expected {'/'.join(t.__name__ for t in types)}, got {type(event).__name__}"
            )
        return event

    async def send(self, event: object) -> None:
        """Encode `event` with the session and write it (LocalProtocolError if not allowed)."""
        await self.write(self.session.send(event))

    async def write(self, data: bytes) -> None:
        """Write bytes the session produced (e.g. bulk sections encoded in a worker thread)."""
        if data:
            await self.stream.write(data)
            self.wire_out += len(data)

    async def read(self) -> bytes:
        """Raw bytes from the stream; b"" at its end (EOF, reset or closed alike)."""
        data = await read_some(self.stream)
        self.wire_in += len(data)
        return data

    async def close(self) -> None:
        """Close our side, best effort (the peer may already be gone)."""
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
            await self.stream.close()

    async def reset(self) -> None:
        """Abort the stream, best effort."""
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
            await self.stream.reset()


Handler = Callable[[Channel, object], Awaitable[None]]


class StreamAdapter:
    """Registers protocol handlers on `host` and opens streams, all through `admit`.

    `network` is the name every request must carry; `policy` is the access
    policy `admit` applies, `membership` the lab (None: no lab check, for
    tests of a single protocol); `admit=` adds a further rule.
    """

    def __init__(
        self,
        host: IHost,
        *,
        network: str,
        policy: AccessPolicy,
        membership: Membership | None = None,
        admit: Admission | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        open_timeout: float = OPEN_TIMEOUT,
        membership_timeout: float = MEMBERSHIP_TIMEOUT,
    ) -> None:
        self.host = host
        self.network = network
        self.policy = policy
        self.membership = membership
        self.membership_timeout = membership_timeout
        self._extra = admit
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout

    def admit(self, peer: str, protocol: str, *, asking: bool = False) -> str | None:
        """Why `peer` may not use `protocol` with us (`asking`: we would ask it), or None.

        The one access decision of the node's stream protocols: bans, then lab
        membership (a stranger is refused, save what `open` serves it), then
        `trusted_peers`. Call `settle` first: a pending peer is refused here.
        """
        ban = self.policy.ban_reason(peer)
        if ban is not None:
            return f"peer {peer} is temporarily banned by this node: {ban}"
        reason = None
        if self.membership is not None:
            reason = self.membership.refusal(peer, protocol, asking=asking)
        if reason is None:
            reason = self.policy.refusal(peer)
        if reason is None and self._extra is not None:
            reason = self._extra(peer, protocol)
        return reason

    async def settle(self, peer: str) -> None:
        """Wait (at most `membership_timeout`) until `peer`'s lab membership is decided."""
        if self.membership is not None:
            with trio.move_on_after(self.membership_timeout):
                await self.membership.settle(peer)

    def check_network(self, request: object) -> str | None:
        """Why a request naming another network is refused, or None when it names ours."""
        other = getattr(request, "network", None)
        if other == self.network:
            return None
        return (
            f"wrong network: this node is on network {self.network!r}, "
            f"the request was for {other!r}"
        )

    def serve(self, protocol_id: str, new_session: Callable[[], Session], handler: Handler) -> None:
        """Serve `protocol_id`: each stream gets `new_session()` and, once admitted, `handler`.

        `handler(channel, request)` receives the parsed request event (its
        network already checked) and answers through `channel`.
        """

        async def admitted(stream: INetStream) -> None:
            peer = str(remote_peer(stream))
            channel = Channel(stream, new_session(), peer)
            await self.settle(peer)
            reason = self.admit(peer, protocol_id)
            if reason is not None:
                await channel.send(Refusal(reason))
                return
            try:
                with trio.fail_after(self.request_timeout):
                    request = await channel.next_event()
            except RemoteProtocolError as e:
                await channel.send(Refusal(f"malformed request: {e}"))
                return
            reason = self.check_network(request)
            if reason is not None:
                await channel.send(Refusal(reason))
                return
            await handler(channel, request)

        self.host.set_stream_handler(TProtocol(protocol_id), guard_handler(protocol_id, admitted))

    def serve_stream(
        self, protocol_id: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        """Serve `protocol_id` with a `handler` that reads its own request (no session yet).

        Transitional, for a protocol not yet moved to a session: `admit` is
        applied (a refused peer gets the JSON refusal frame and its stream
        closed) but the network check is the handler's own.
        """

        async def admitted(stream: INetStream) -> None:
            peer = str(remote_peer(stream))
            await self.settle(peer)
            reason = self.admit(peer, protocol_id)
            if reason is not None:
                await stream.write(encode_json_frame(refusal(reason)))
                return
            await handler(stream)

        self.host.set_stream_handler(TProtocol(protocol_id), guard_handler(protocol_id, admitted))

    @contextlib.asynccontextmanager
    async def open(self, peer: str, protocol_id: str, session: Session) -> AsyncIterator[Channel]:
        """A channel to `peer` speaking `protocol_id`, closed (or reset on error) at the end.

        Raises `Refused` when `admit` refuses the peer (no stream of `protocol_id` is opened),
        `trio.TooSlowError` or the libp2p error when the stream cannot be opened.
        """
        await self.settle(peer)
        failure = None if self.membership is None else self.membership.failure(peer)
        if failure is not None:
            raise failure  # the proof could not run (unreachable, reset): not a refusal
        reason = self.admit(peer, protocol_id, asking=True)
        if reason is not None:
            raise Refused(f"not asking: {reason}")
        async with self.open_unadmitted(peer, protocol_id, session) as channel:
            yield channel

    def serve_unadmitted(
        self,
        protocol_id: str,
        new_session: Callable[[str], Session],
        handler: Callable[[Channel], Awaitable[None]],
    ) -> None:
        """Serve `protocol_id` to every peer, without `admit`: only for the membership proof.

        `new_session(peer)` makes the session; `handler(channel)` runs the
        whole exchange (the stream is closed after it, reset if it raises).
        """

        async def handle(stream: INetStream) -> None:
            peer = str(remote_peer(stream))
            await handler(Channel(stream, new_session(peer), peer))

        self.host.set_stream_handler(TProtocol(protocol_id), guard_handler(protocol_id, handle))

    @contextlib.asynccontextmanager
    async def open_unadmitted(
        self, peer: str, protocol_id: str, session: Session
    ) -> AsyncIterator[Channel]:
        """`open` without `settle` and `admit`: only for the membership proof."""
        stream = await new_stream(self.host, ID.from_base58(peer), [protocol_id], self.open_timeout)
        channel = Channel(stream, session, peer)
        ok = False
        try:
            yield channel
            ok = True
        finally:
            await (channel.close() if ok else channel.reset())
