"""The serving side of `/benchsync/query/1.0.0`: answers peers' queries from the own dataset.

`QueryServer.handle` drives one `benchsync.protocol.query.ServerSession` over
a libp2p stream: it reads until the session has the request (under
`REQUEST_TIMEOUT`), runs it in `LocalQueryService` (the sandbox workers, with
this node's limits and a per-peer stream limit) and writes the session's one
response frame. The access policy (trusted peers, bans) is applied before
`handle` runs, where it is registered; the network check is the session's.
A peer that breaks the framing loses its stream (reset), never the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from benchsync.daemon.host import read_some, remote_peer
from benchsync.daemon.local_query import LocalQueryService
from benchsync.protocol.query import (
    QueryRequest,
    QueryResponse,
    RequestReceived,
    ServerEvent,
    ServerSession,
)
from benchsync.storage.sandbox import QueryError, ResultTooLarge
from benchsync.storage.sandbox_worker import to_ipc

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds a requester has to send its whole request
WRITE_TIMEOUT = 30.0  # seconds to write one answer (64 MiB at ~100 MiB/s takes < 1 s)
WRITE_CHUNK = 1024 * 1024  # bytes per stream write of a large answer


@dataclass
class ServerStats:
    """Counters of what the server did (status output, tests, metrics)."""

    requests: int = 0
    answered: int = 0  # "ok" responses
    errors: dict[str, int] = field(default_factory=dict)  # error status -> count
    bytes_out: int = 0  # bytes of response frames written


async def write_chunked(stream: INetStream, data: bytes) -> None:
    """Write `data` in WRITE_CHUNK pieces (no copy of a large answer in one write)."""
    view = memoryview(data)
    for start in range(0, len(data), WRITE_CHUNK):
        await stream.write(bytes(view[start : start + WRITE_CHUNK]))


class QueryServer:
    """Answers `/benchsync/query/1.0.0` streams from the own dataset."""

    def __init__(self, local: LocalQueryService, *, network: str) -> None:
        self.local = local
        self.network = network
        self.limits = local.limits
        self.active: dict[str, int] = {}  # peer -> query streams being served
        self.stats = ServerStats()

    async def handle(self, stream: INetStream) -> None:
        """Answer one query stream (register behind the access policy).

        Raises on a peer that breaks the framing; the caller resets that stream.
        """
        peer = str(remote_peer(stream))
        session = ServerSession(network=self.network)
        if self.active.get(peer, 0) >= self.limits.max_per_peer:
            busy = QueryResponse.error("refused", (
                f"busy: already answering {self.limits.max_per_peer} queries from peer {peer}; "
                "retry when one finishes"))  # fmt: skip
            await self._reply(stream, session.busy(busy), busy.status)
            return
        self.active[peer] = self.active.get(peer, 0) + 1
        try:
            await self._serve(stream, session, peer)
        finally:
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]

    async def _serve(self, stream: INetStream, session: ServerSession, peer: str) -> None:
        event: ServerEvent | None = None
        with trio.fail_after(REQUEST_TIMEOUT):
            while event is None:
                data = await read_some(stream)
                if not data:
                    session.receive_eof()  # raises: the stream ended before the request
                event = session.receive_data(data)
        if isinstance(event, RequestReceived):
            self.stats.requests += 1
            response = await self.answer(event.request, peer)
        else:
            self.stats.requests += event.stage == "request"  # a malformed request counts
            response = event.response
        frame = await trio.to_thread.run_sync(session.send, response)
        await self._reply(stream, frame, response.status)

    async def answer(self, request: QueryRequest, peer: str) -> QueryResponse:
        """The response to `peer`'s `request` from the own dataset (never raises for bad SQL)."""
        max_bytes = min(request.max_bytes, self.limits.max_bytes)
        try:
            table = await self.local.execute(
                request.sql, request.params or None, timeout_s=request.timeout_s,
                max_rows=request.max_rows, max_bytes=max_bytes, requester=peer,
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

    async def _reply(self, stream: INetStream, frame: bytes, status: str) -> None:
        with trio.fail_after(WRITE_TIMEOUT):
            await write_chunked(stream, frame)
        self.stats.bytes_out += len(frame)
        if status == "ok":
            self.stats.answered += 1
        else:
            self.stats.errors[status] = self.stats.errors.get(status, 0) + 1
