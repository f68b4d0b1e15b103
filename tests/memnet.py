"""Hosts joined by in-memory streams, for driving the stream adapter on trio's virtual clock.

Real libp2p hosts move bytes over real sockets, so their timers run on the
wall clock; these hosts give `StreamAdapter`, `Fetcher` and `BlockProvider`
the few host calls they make (`get_id`, `set_stream_handler`, `new_stream`,
`disconnect`) over `trio.testing.memory_stream_pair`, so timeouts can be
asserted at exact virtual times under the `autojump_clock` fixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import cast

import trio
import trio.testing
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

StreamHandler = Callable[[INetStream], Awaitable[None]]


class MemoryStream:
    """One end of an in-memory stream, shaped as the `INetStream` calls the adapter makes."""

    def __init__(self, stream: trio.StapledStream, peer: ID) -> None:
        self._stream = stream
        self.muxed_conn = SimpleNamespace(peer_id=peer)  # `remote_peer` reads this

    async def read(self, n: int | None = None) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            await self._stream.send_eof()

    async def reset(self) -> None:
        await self._stream.aclose()


class MemoryHost:
    """A host of a `MemoryNet`: streams to other hosts of the same net, no transport."""

    def __init__(self, net: MemoryNet) -> None:
        self.net = net
        self.peer_id = ID.from_pubkey(create_new_key_pair().public_key)
        self.handlers: dict[str, StreamHandler] = {}

    def get_id(self) -> ID:
        return self.peer_id

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        self.handlers[str(protocol_id)] = handler

    async def new_stream(self, peer: ID, protocols: Sequence[str]) -> INetStream:
        return await self.net.connect(self, peer, [str(p) for p in protocols])

    async def disconnect(self, peer: ID) -> None:
        self.net.disconnected.append((self.peer_id.to_base58(), peer.to_base58()))


class MemoryNet:
    """Hosts that reach each other by peer ID; each served stream runs in the net's nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.hosts: dict[ID, MemoryHost] = {}
        self.disconnected: list[tuple[str, str]] = []  # (by, peer)

    def host(self) -> IHost:
        """A new host on this net (typed as the `IHost` the daemon's classes take)."""
        host = MemoryHost(self)
        self.hosts[host.peer_id] = host
        return cast(IHost, host)

    async def connect(self, dialer: MemoryHost, peer: ID, protocols: list[str]) -> INetStream:
        target = self.hosts.get(peer)
        if target is None:
            raise ConnectionError(f"no host {peer} on this memory net")
        handler = next((target.handlers[p] for p in protocols if p in target.handlers), None)
        if handler is None:
            raise ConnectionError(f"{peer} serves none of {protocols}")
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(handler, _net_stream(theirs, dialer.peer_id))
        return _net_stream(ours, peer)


def _net_stream(stream: trio.StapledStream, peer: ID) -> INetStream:
    return cast(INetStream, MemoryStream(stream, peer))


@contextlib.asynccontextmanager
async def memory_net() -> AsyncIterator[MemoryNet]:
    """A `MemoryNet` whose streams' handlers are cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        yield MemoryNet(nursery)
        nursery.cancel_scope.cancel()
