"""The serving side of `/benchsync/query/1.0.0`: answers peers' queries from the own dataset.

A peer's query sees the own dataset as the `replicas` scope shows it (an
`origin` column, globally unique ids; `benchsync.storage.scopes`), so that
our answer and a replica of our dataset answer alike.

The stream adapter (`benchsync.daemon.streams`) serves the protocol with a
`benchsync.protocol.query.QuerySession` per stream: it applies the access
policy, reads the request under its request timeout, refuses another
network or a malformed request, and only then calls `QueryServer.handle`.
The server runs the request in `LocalQueryService` (the sandbox workers,
with this node's limits and a per-peer stream limit) and sends the one
response. A peer that breaks the framing loses its stream, never the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from benchsync.daemon.local_query import LocalQueryService
from benchsync.daemon.streams import Channel
from benchsync.protocol.query import QueryOpen, QueryRequest, QueryResponse
from benchsync.storage.sandbox import QueryError, ResultTooLarge
from benchsync.storage.sandbox_worker import to_ipc

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 30.0  # seconds to write one answer (64 MiB at ~100 MiB/s takes < 1 s)
WRITE_CHUNK = 1024 * 1024  # bytes per stream write of a large answer


@dataclass
class ServerStats:
    """Counters of what the server did (status output, tests, metrics)."""

    requests: int = 0
    answered: int = 0  # "ok" responses
    errors: dict[str, int] = field(default_factory=dict)  # error status -> count
    bytes_out: int = 0  # bytes of response frames written


class QueryServer:
    """Answers admitted `/benchsync/query/1.0.0` requests from the own dataset."""

    def __init__(self, local: LocalQueryService) -> None:
        self.local = local
        self.limits = local.limits
        self.active: dict[str, int] = {}  # peer -> query streams being served
        self.stats = ServerStats()

    async def handle(self, channel: Channel, event: object) -> None:
        """Answer the request `event` (a `QueryOpen`) on `channel` (the adapter's handler).

        Raises TypeError for any other event (a bug of ours).
        """
        if not isinstance(event, QueryOpen):
            raise TypeError(f"the query server got {type(event).__name__}, not QueryOpen")
        peer = channel.peer
        if self.active.get(peer, 0) >= self.limits.max_per_peer:
            await self._reply(channel, QueryResponse.error("refused", (
                f"busy: already answering {self.limits.max_per_peer} queries from peer {peer}; "
                "retry when one finishes")))  # fmt: skip
            return
        self.active[peer] = self.active.get(peer, 0) + 1
        try:
            self.stats.requests += 1
            await self._reply(channel, await self.answer(event.request, peer))
        finally:
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]

    async def answer(self, request: QueryRequest, peer: str) -> QueryResponse:
        """The response to `peer`'s `request` from the own dataset (never raises for bad SQL).

        A request of purpose "ship" (rows for a network query's coordinator) is
        bounded by this node's `ship_max_bytes` (query_ship_max_bytes), not by
        its row and answer limits; it runs in the same sandbox, under the same
        memory and time limits, in the same per-peer slots."""
        limits = self.local.limits
        top = limits.ship_max_bytes if request.purpose == "ship" else limits.max_bytes
        max_bytes = min(request.max_bytes, top)
        try:
            table = await self.local.execute(
                request.sql, request.params or None, timeout_s=request.timeout_s,
                max_rows=request.max_rows, max_bytes=max_bytes, requester=peer,
                scope="dataset",  # the own dataset as the replicas scope shows it
                purpose=request.purpose,
            )  # fmt: skip
            ipc = await trio.to_thread.run_sync(to_ipc, table)
        except QueryError as e:
            return QueryResponse.error(e.kind, str(e))
        except Exception as e:  # a bug of ours must not look like the peer's fault
            log.exception("query failed unexpectedly")
            return QueryResponse.error("internal", f"internal error: {type(e).__name__}: {e}")
        if len(ipc) > max_bytes:
            return QueryResponse.error("too_large", str(ResultTooLarge(
                "answer bytes (Arrow IPC)", limit=max_bytes, got=len(ipc))))  # fmt: skip
        return QueryResponse("ok", arrow_ipc=ipc)

    async def _reply(self, channel: Channel, response: QueryResponse) -> None:
        # Encoding copies the answer: in a thread. Written in chunks, not one huge write.
        frame = await trio.to_thread.run_sync(channel.session.send, response)
        view = memoryview(frame)
        with trio.fail_after(WRITE_TIMEOUT):
            for start in range(0, len(frame), WRITE_CHUNK):
                await channel.write(bytes(view[start : start + WRITE_CHUNK]))
        self.stats.bytes_out += len(frame)
        if response.status == "ok":
            self.stats.answered += 1
        else:
            self.stats.errors[response.status] = self.stats.errors.get(response.status, 0) + 1
