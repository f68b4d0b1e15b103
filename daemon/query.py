"""`/benchsync/query/1.0.0` on both sides: answering peers' queries, and fanning one out.

This module owns the network side of cross-node SQL (the planning and merging
live in `benchsync.storage.distquery`, the wire messages in
`benchsync.protocol.query`):

- `LocalQueryService` runs SQL on the node's data in the `local` and
  `replicas` scopes, for the node itself or for a peer, in sandbox worker
  processes (`benchsync.daemon.query_pool`: OS memory limit, deadline,
  killed when the caller goes away, per-peer fairness). A peer's query and
  the local part of a network query see the node's OWN dataset only (never
  replicas: a replicated row would be counted twice). It re-reads the node's
  tables lazily, only when `BenchmarkDB.on_write` reported a change since the
  last load. Every path that runs user SQL passes `distquery.check` (the
  sandbox's one read-only gate) and runs in the one sandbox.
- `QueryServer` answers query streams: network name, limits, a per-peer
  stream limit, typed errors. The access policy (trusted peers, bans) is
  applied by `P2PNode.add_stream_handler` before it runs.
- `QueryService` wires both into a `P2PNode` (`register()`) and is the
  coordinator: `execute_distributed_query` plans the query, asks every peer of
  the network concurrently under one deadline, runs the local part itself,
  merges, and reports every peer's fate. A peer is never silently left out.

Wire format (every frame varint-length-prefixed, `benchsync.protocol.frames`):

    requester -> server  frame 1: JSON hello {"network": NAME}  <= MAX_HELLO_FRAME
                         frame 2: QueryRequest.to_bytes()       <= MAX_REQUEST_FRAME
    server -> requester  one frame: QueryResponse.to_bytes()
                         (<= the request's max_bytes + MAX_RESPONSE_OVERHEAD),
                         or the access wrapper's JSON refusal frame

A peer that breaks this loses its stream (reset), never the node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import pyarrow as pa
import trio
from libp2p.abc import INetStream
from multiformats import varint

from benchsync.daemon.answers import table_json
from benchsync.daemon.host import StreamReader, remote_peer
from benchsync.daemon.network import P2PNode
from benchsync.daemon.query_pool import SandboxPool
from benchsync.protocol.frames import (
    LocalProtocolError,
    ProtocolError,
    Refused,
    RemoteProtocolError,
    TruncatedFrame,
    check_network,
    decode_json,
    encode_json_frame,
)
from benchsync.protocol.planner import PARTIALS_TABLE
from benchsync.protocol.query import (
    MAX_HEADER_BYTES,
    MAX_RESULT_BYTES,
    MAX_TIMEOUT,
    QueryMessageError,
    QueryRequest,
    QueryResponse,
)
from benchsync.storage import distquery as dq
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.replicas import ReplicaStore
from benchsync.storage.sandbox import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_THREADS,
    InvalidSQL,
    QueryError,
    QueryRefused,
    QueryTimeout,
    ResultTooLarge,
)
from benchsync.storage.schema import TABLES
from benchsync.storage.scopes import ReplicaTables, ScopeInput
from benchsync.storage.sqlnames import ident

log = logging.getLogger(__name__)

QUERY_PROTOCOL_ID = "/benchsync/query/1.0.0"
MAX_HELLO_FRAME = 4 * 1024  # bytes: the JSON hello holds a network name only
MAX_REQUEST_FRAME = 8 + MAX_HEADER_BYTES  # bytes: magic + length + the request's JSON header
MAX_RESPONSE_OVERHEAD = 64 * 1024  # bytes of response header around the Arrow IPC body
REQUEST_TIMEOUT = 10.0  # seconds a requester has to send its whole request
WRITE_TIMEOUT = 30.0  # seconds to write one answer (64 MiB at ~100 MiB/s takes < 1 s)
WRITE_CHUNK = 1024 * 1024  # bytes per stream write of a large answer
DEFAULT_QUERY_TIMEOUT = 10.0  # seconds: a distributed query's default deadline
MAX_SERVED_TIMEOUT = 60.0  # seconds: the longest time limit this node grants a peer
MAX_CONCURRENT_QUERIES = 2  # peers' queries running at once (one sandbox worker each)
MAX_QUERIES_PER_PEER = 2  # query streams one peer may have open to us at once
MAX_RUNNING_PER_PEER = 1  # of one peer's queries, running at once (the others wait their turn)
MAX_LOCAL_QUERIES = 2  # the node's own queries running at once, in slots no peer can take
PRESTARTED_WORKERS = 2  # sandbox worker processes started with the query service
# Part of the remaining time kept back when asking a peer, so that its own
# "timeout" answer reaches us before our deadline does.
DEADLINE_MARGIN = 0.5  # seconds, at most
DEADLINE_MARGIN_SHARE = 0.2  # of the remaining time, when that is less

PeerState = Literal["answered", "timed_out", "refused", "unreachable", "error"]
ANSWERED: PeerState = "answered"
TIMED_OUT: PeerState = "timed_out"
REFUSED: PeerState = "refused"
UNREACHABLE: PeerState = "unreachable"
ERROR: PeerState = "error"


# --- errors --------------------------------------------------------------------------------


class DistributedQueryError(Exception):
    """A network query that produced no answer; `.peers` says what each node did."""

    def __init__(self, message: str, peers: Sequence[PeerResult] = ()) -> None:
        super().__init__(message)
        self.peers = list(peers)

    def to_json(self) -> dict[str, Any]:
        """The error and every node's status, for the control API."""
        return {"error": str(self), "peers": [p.to_json() for p in self.peers]}


class PeersMissing(DistributedQueryError):
    """`require_all=True` and some peers did not answer; `.missing` lists them."""

    def __init__(self, missing: Sequence[PeerResult], peers: Sequence[PeerResult]) -> None:
        detail = "; ".join(f"{p.peer_id}: {p.status} ({p.message})" for p in missing)
        super().__init__(
            f"{len(missing)} node(s) did not answer: {detail}. "
            "Retry, raise the time limit, or drop require_all to accept a partial answer",
            peers,
        )
        self.missing = list(missing)


# --- the local dataset -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """What this node grants to one query, whoever asks (peers' requests are clamped)."""

    max_timeout_s: float = MAX_SERVED_TIMEOUT  # seconds
    max_rows: int = DEFAULT_MAX_ROWS  # rows in one answer
    max_bytes: int = DEFAULT_MAX_BYTES  # bytes of Arrow data in one answer
    memory_limit: str | int = DEFAULT_MEMORY_LIMIT  # DuckDB size string or bytes, per sandbox
    max_concurrent: int = MAX_CONCURRENT_QUERIES  # peers' queries running at once
    max_per_peer: int = MAX_QUERIES_PER_PEER  # streams one peer may have open
    max_running_per_peer: int = MAX_RUNNING_PER_PEER  # of those, queries running at once
    local_slots: int = MAX_LOCAL_QUERIES  # the node's own queries running at once
    threads: int = DEFAULT_THREADS  # DuckDB threads per sandbox


DatabaseSource: TypeAlias = BenchmarkDB | Callable[[], BenchmarkDB]
Scope = Literal["local", "replicas"]


class LocalQueryService:
    """Runs read-only SQL on the node's data in sandbox worker processes (`SandboxPool`).

    `db` is the node's BenchmarkDB, or a callable returning the current one
    (a restore may replace the database object); `replicas` (optional) is
    the node's replica store and `dataset` its own dataset ID, for the
    `replicas` scope. The node's tables are read (as Arrow, in a thread) only
    when the database changed since the last read: its `on_write` bumps a
    generation counter, and a different database object counts as a change.
    A worker that already holds the current generation is not sent it again.
    Call `invalidate()` after changing the data by other means; `close()` when done.
    """

    def __init__(
        self,
        db: DatabaseSource,
        *,
        limits: ServerLimits | None = None,
        replicas: ReplicaStore | None = None,
        dataset: str | None = None,
    ) -> None:
        self._source = db
        self.limits = limits or ServerLimits()
        self.replicas = replicas
        self.dataset = dataset
        self._lock = threading.Lock()  # guards the counters (on_write runs in writer threads)
        self._load_lock = threading.Lock()  # one thread re-reads the tables at a time
        self._generation = 0
        self._watched: BenchmarkDB | None = None  # the database whose on_write we listen to
        self._tables: tuple[int, dict[str, pa.Table]] | None = None
        self.loads = 0  # times the tables were read from the database (tests, metrics)
        self.pool = SandboxPool(
            memory_limit=self.limits.memory_limit, threads=self.limits.threads,
            local_slots=self.limits.local_slots, peer_slots=self.limits.max_concurrent,
            per_peer=self.limits.max_running_per_peer,
        )  # fmt: skip
        if isinstance(db, BenchmarkDB):
            self._database()  # listen from now on

    @property
    def db(self) -> BenchmarkDB:
        """The current database (resolved through the callable, if one was given)."""
        return self._source if isinstance(self._source, BenchmarkDB) else self._source()

    def _database(self) -> BenchmarkDB:
        db = self.db
        with self._lock:
            if db is not self._watched:
                self._unwatch()
                db.on_write.append(self._changed)
                self._watched = db
                self._generation += 1
        return db

    def _unwatch(self) -> None:
        if self._watched is not None:
            with contextlib.suppress(ValueError):
                self._watched.on_write.remove(self._changed)
            self._watched = None

    def _changed(self, rows: int) -> None:
        with self._lock:
            self._generation += 1

    def invalidate(self) -> None:
        """Forget the loaded tables: the next query re-reads the database."""
        self._changed(0)

    database_replaced = invalidate  # the node calls this after swapping its database

    def close(self) -> None:
        with self._lock:
            self._unwatch()
        self.pool.close()

    def _current_tables(self) -> tuple[int, dict[str, pa.Table]]:
        """The own tables and their generation (blocking: for worker threads)."""
        with self._load_lock:
            db = self._database()
            with self._lock:
                generation = self._generation
            if self._tables is None or self._tables[0] != generation:
                # Read the generation first: a write landing during the read bumps
                # it again, so the next query reloads instead of missing it.
                tables = {t: db.query(f"SELECT * FROM {ident(t)}") for t in TABLES}
                self._tables = (generation, tables)
                self.loads += 1
            return self._tables

    def _scope(self, scope: Scope) -> tuple[str, Callable[[], Awaitable[ScopeInput]]]:
        """The key naming the scope's current data, and how to produce that data.

        Blocking (the database and replica pointers are looked at): for worker threads.
        """
        self._database()  # a replaced database object is a new generation
        with self._lock:
            generation = self._generation
        if scope == "local":
            key = f"local:{generation}"
            replicas: list[ReplicaTables] = []
        else:
            if self.replicas is None or self.dataset is None:
                raise QueryRefused("this node keeps no replicas; use the local scope")
            replicas = [ReplicaTables(r.dataset, r.tables) for r in self.replicas.all()]
            key = f"replicas:{generation}:" + ",".join(
                f"{r.dataset}={sorted(map(str, r.tables.values()))}" for r in replicas)  # fmt: skip

        async def produce() -> ScopeInput:
            _, own = await trio.to_thread.run_sync(self._current_tables)
            if scope == "local":
                return ScopeInput(own)
            return ScopeInput(own, origin=self.dataset, replicas=replicas)

        return key, produce

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        timeout_s: float,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        scope: Scope = "local",
        requester: str | None = None,
    ) -> pa.Table:
        """Run `sql` over `scope` in a sandbox worker for `requester`; returns the answer.

        `requester` is the asking peer's ID, or None for the node itself (its
        own slots: peers never starve it). The limits are clamped to this
        node's `ServerLimits`; the time limit covers waiting for a slot,
        reloading and running. Raises QueryRefused, InvalidSQL, QueryTimeout,
        ResultTooLarge or QueryError; when cancelled, the worker is killed.
        """
        timeout_s = min(timeout_s, self.limits.max_timeout_s)
        max_rows = min(max_rows, self.limits.max_rows)
        max_bytes = min(max_bytes, self.limits.max_bytes)
        deadline = trio.current_time() + timeout_s
        await trio.to_thread.run_sync(dq.check, sql)  # refuse before taking a worker
        key, produce = await trio.to_thread.run_sync(self._scope, scope)
        return await self.pool.run(requester, sql, params, scope_key=key, scope=produce,
                                   deadline=deadline, timeout_s=timeout_s,
                                   max_rows=max_rows, max_bytes=max_bytes)  # fmt: skip

    async def merge(self, plan: dq.QueryPlan, partials: Sequence[pa.Table], *,
                    timeout_s: float, max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
        """Merge the nodes' partial answers in a sandbox worker (the merge SQL holds
        the caller's expressions); returns the final answer. Raises PlanError,
        QueryError subclasses."""
        assert plan.merge_sql is not None
        union = await trio.to_thread.run_sync(dq.merge_input, plan, partials)
        scope = ScopeInput({PARTIALS_TABLE: union})
        return await self.pool.run(None, plan.merge_sql, None, scope_key=None, scope=scope,
                                   deadline=trio.current_time() + timeout_s, timeout_s=timeout_s,
                                   max_rows=max_rows, max_bytes=max_bytes)  # fmt: skip


# --- the wire ----------------------------------------------------------------------------------


def response_frame_limit(max_bytes: int) -> int:
    """The largest response frame a requester accepts for a request with `max_bytes`."""
    return min(max_bytes, MAX_RESULT_BYTES) + MAX_RESPONSE_OVERHEAD


async def write_frame(stream: INetStream, body: bytes, *, max_frame: int) -> None:
    """Write one length-prefixed frame, in chunks (no copy of a large body).

    Raises LocalProtocolError when `body` exceeds `max_frame`.
    """
    if len(body) > max_frame:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds the limit {max_frame}")
    view = memoryview(body)
    await stream.write(varint.encode(len(body)) + bytes(view[:WRITE_CHUNK]))
    for start in range(WRITE_CHUNK, len(body), WRITE_CHUNK):
        await stream.write(bytes(view[start : start + WRITE_CHUNK]))


async def exchange(
    stream: INetStream, request: QueryRequest, *, network: str
) -> tuple[QueryResponse, int]:
    """Send `request` on an open query stream and read the answer.

    Returns the response and its size on the wire (bytes). Raises `Refused`
    (the peer's access policy or network check refused us), `TruncatedFrame`
    (the stream ended mid-answer) or `RemoteProtocolError` (garbage).
    A response with an error status is returned, not raised.
    """
    hello = encode_json_frame({"network": network}, max_frame=MAX_HELLO_FRAME)
    body = request.to_bytes()
    if len(body) > MAX_REQUEST_FRAME:
        raise LocalProtocolError(f"query request of {len(body)} bytes exceeds {MAX_REQUEST_FRAME}")
    await stream.write(hello + varint.encode(len(body)) + body)
    reader = StreamReader(stream, max_frame=MAX_HELLO_FRAME)
    frame = await reader.frame(max_frame=response_frame_limit(request.max_bytes))
    wire = reader.wire_bytes
    if frame[:1] == b"{":  # P2PNode's access wrapper answers with a JSON refusal frame
        obj = decode_json(frame)
        if obj.get("status") == "refused":
            raise Refused(str(obj.get("reason", "no reason given"))[:1000])
        raise RemoteProtocolError(f"unexpected JSON frame with status {obj.get('status')!r}")
    try:
        response = await trio.to_thread.run_sync(QueryResponse.from_bytes, frame)
    except QueryMessageError as e:
        raise RemoteProtocolError(f"malformed query response: {e}") from None
    return response, wire


# --- serving -----------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """Counters of what the server did (status output, tests, metrics)."""

    requests: int = 0
    answered: int = 0  # "ok" responses
    errors: dict[str, int] = field(default_factory=dict)  # error status -> count
    bytes_out: int = 0  # bytes of response frames written


class QueryServer:
    """Answers `/benchsync/query/1.0.0` streams from the own dataset."""

    def __init__(self, local: LocalQueryService, *, network: str) -> None:
        self.local = local
        self.network = network
        self.limits = local.limits
        self.active: dict[str, int] = {}  # peer -> query streams being served
        self.stats = ServerStats()

    async def handle(self, stream: INetStream) -> None:
        """Answer one query stream (wrap with `P2PNode.add_stream_handler`).

        Raises on a peer that breaks the framing; the wrapper resets that stream.
        """
        peer = str(remote_peer(stream))
        if self.active.get(peer, 0) >= self.limits.max_per_peer:
            await self._reply(stream, QueryResponse.error("refused", (
                f"busy: already answering {self.limits.max_per_peer} queries from peer {peer}; "
                "retry when one finishes")), MAX_RESPONSE_OVERHEAD)  # fmt: skip
            return
        self.active[peer] = self.active.get(peer, 0) + 1
        try:
            await self._serve(stream, peer)
        finally:
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]

    async def _serve(self, stream: INetStream, peer: str) -> None:
        reader = StreamReader(stream, max_frame=MAX_HELLO_FRAME)
        with trio.fail_after(REQUEST_TIMEOUT):
            hello_body = await reader.frame(max_frame=MAX_HELLO_FRAME)
            try:
                check_network(decode_json(hello_body), self.network)
            except Refused as e:
                await self._reply(stream, QueryResponse.error("refused", e.reason),
                                  MAX_RESPONSE_OVERHEAD)  # fmt: skip
                return
            request_body = await reader.frame(max_frame=MAX_REQUEST_FRAME)
        self.stats.requests += 1
        try:
            request = QueryRequest.from_bytes(request_body)
        except QueryMessageError as e:
            response = QueryResponse.error("refused", f"malformed query request: {e}")
            await self._reply(stream, response, MAX_RESPONSE_OVERHEAD)
            return
        response = await self.answer(request, peer)
        await self._reply(stream, response, response_frame_limit(request.max_bytes))

    async def answer(self, request: QueryRequest, peer: str) -> QueryResponse:
        """The response to `peer`'s `request` from the own dataset (never raises for bad SQL)."""
        max_bytes = min(request.max_bytes, self.limits.max_bytes)
        try:
            table = await self.local.execute(
                request.sql, request.params or None, timeout_s=request.timeout_s,
                max_rows=request.max_rows, max_bytes=max_bytes, requester=peer,
            )  # fmt: skip
            ipc = await trio.to_thread.run_sync(dq.to_ipc, table)
        except QueryError as e:
            return QueryResponse.error(e.kind, str(e))
        except Exception as e:  # a bug of ours must not look like the peer's fault
            log.exception("query failed unexpectedly")
            return QueryResponse.error("internal", f"internal error: {type(e).__name__}: {e}")
        if len(ipc) > max_bytes:
            return QueryResponse.error("too_large", str(ResultTooLarge(
                "answer bytes (Arrow IPC)", limit=max_bytes, got=len(ipc))))  # fmt: skip
        return QueryResponse("ok", arrow_ipc=ipc)

    async def _reply(self, stream: INetStream, response: QueryResponse, max_frame: int) -> None:
        body = await trio.to_thread.run_sync(response.to_bytes)
        with trio.fail_after(WRITE_TIMEOUT):
            await write_frame(stream, body, max_frame=max_frame)
        self.stats.bytes_out += len(body)
        if response.status == "ok":
            self.stats.answered += 1
        else:
            self.stats.errors[response.status] = self.stats.errors.get(response.status, 0) + 1


# --- the coordinator -------------------------------------------------------------------------


@dataclass
class PeerResult:
    """What one node did for a distributed query."""

    peer_id: str
    status: PeerState
    message: str = ""
    rows: int = 0  # rows of its partial answer
    bytes: int = 0  # bytes of its answer on the wire (0 for the local part)
    elapsed_s: float = 0.0  # seconds from asking to its answer (or failure)
    local: bool = False  # this node's own part, run in-process

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id, "status": self.status, "message": self.message,
            "rows": self.rows, "bytes": self.bytes, "elapsed_s": round(self.elapsed_s, 4),
            "local": self.local,
        }  # fmt: skip


@dataclass
class DistributedResult:
    """A merged answer, the plan that produced it and every node's status."""

    table: pa.Table
    peers: list[PeerResult]  # the local node first, then peers by peer ID
    strategy: str  # the planner's strategy ("decomposed", "rows", ...)
    reason: str  # why the planner chose it
    elapsed_s: float = 0.0  # seconds, whole query

    @property
    def complete(self) -> bool:
        """True when every node asked answered (nothing is missing from the answer)."""
        return all(p.status == ANSWERED for p in self.peers)

    @property
    def missing(self) -> list[PeerResult]:
        return [p for p in self.peers if p.status != ANSWERED]

    def to_json(self) -> dict[str, Any]:
        """Columns, rows (lists of JSON values), peers, strategy: for the control API/CLI."""
        return table_json(self.table) | {
            "peers": [p.to_json() for p in self.peers],
            "strategy": self.strategy, "reason": self.reason, "complete": self.complete,
            "elapsed_s": round(self.elapsed_s, 4),
        }  # fmt: skip


class QueryService:
    """The query protocol for one node: server (`register`) and coordinator (`execute`)."""

    def __init__(
        self,
        p2p: P2PNode,
        db: DatabaseSource,
        *,
        network: str | None = None,
        timeout_s: float = DEFAULT_QUERY_TIMEOUT,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        memory_limit: str | int = DEFAULT_MEMORY_LIMIT,
        limits: ServerLimits | None = None,
        replicas: ReplicaStore | None = None,
        dataset: str | None = None,
    ) -> None:
        """`db` is the node's BenchmarkDB or a callable returning the current one;
        `replicas` and `dataset` (the own dataset ID) serve the `replicas` scope.

        `timeout_s`, `max_rows` and `max_bytes` are the defaults of `execute`
        and (with `memory_limit`) what this node grants to peers' queries,
        unless `limits` spells the latter out.
        """
        self.p2p = p2p
        self.network = network or p2p.network
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        limits = limits or ServerLimits(
            max_timeout_s=max(timeout_s, MAX_SERVED_TIMEOUT), max_rows=max_rows,
            max_bytes=max_bytes, memory_limit=memory_limit,
        )  # fmt: skip
        self.local = LocalQueryService(db, limits=limits, replicas=replicas, dataset=dataset)
        self.server = QueryServer(self.local, network=self.network)

    def database_replaced(self) -> None:
        """The node swapped its database object (restore): re-read it on the next query."""
        self.local.database_replaced()

    def register(self) -> None:
        """Serve `/benchsync/query/1.0.0` on the node (behind its access policy)."""
        self.p2p.add_stream_handler(QUERY_PROTOCOL_ID, self.server.handle)
        self.local.pool.prestart(PRESTARTED_WORKERS)

    def close(self) -> None:
        self.local.close()

    async def query(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        scope: Scope = "local",
        timeout_s: float | None = None,
    ) -> pa.Table:
        """The node's own query in the `local` or `replicas` scope (no network).

        Same gate, sandbox and limits as a peer's query, in the node's own
        slots; cancelling it (the client went away, shutdown) kills its worker.
        Raises QueryRefused, InvalidSQL, QueryTimeout, ResultTooLarge, QueryError.
        """
        return await self.local.execute(
            sql, params, scope=scope, timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            max_rows=self.max_rows, max_bytes=self.max_bytes,
        )  # fmt: skip

    def default_peers(self) -> list[str]:
        """Every peer of the network we would ask: connected peers plus peers
        whose heads we know (they may need a dial). Untrusted peers are not part
        of our network and are left out; banned ones are kept (and reported)."""
        me = self.p2p.peer_id
        known = list(self.p2p.announcer.book.heads)
        known += [s.dataset for s in self.p2p.replica_states()]
        candidates = dict.fromkeys([*self.p2p.connected_peers(), *known])
        return sorted(p for p in candidates if p != me and self.p2p.policy.is_trusted(p))

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        peers: Sequence[str] | None = None,
        timeout_s: float | None = None,
        require_all: bool = False,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> DistributedResult:
        """Run `sql` over this node and `peers` (default: every peer of the network).

        Every node runs the plan's node part on its own dataset, concurrently,
        under one deadline of `timeout_s`; the answers are merged here.
        Returns the merged answer with every node's status. Raises InvalidSQL
        or QueryRefused (the SQL, checked before anyone is asked), PlanError,
        `PeersMissing` when `require_all` and a node did not answer, and
        `DistributedQueryError` when no node answered at all. Limits left as
        None take the service's defaults.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        max_rows = self.max_rows if max_rows is None else max_rows
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
                or not 0 < timeout_s <= MAX_TIMEOUT:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT}] seconds, got {timeout_s!r}")
        if peers is not None and (isinstance(peers, str)
                                  or not all(isinstance(p, str) for p in peers)):
            raise ValueError("peers must be a list of peer ID strings")
        started = time.monotonic()
        deadline = trio.current_time() + timeout_s
        plan = await trio.to_thread.run_sync(dq.plan, sql, params)
        assert plan.node_sql is not None
        targets = list(dict.fromkeys(peers if peers is not None else self.default_peers()))
        targets = [p for p in targets if p != self.p2p.peer_id]
        statuses: dict[str, PeerResult] = {}
        partials: dict[str, pa.Table] = {}

        async def ask_local() -> None:
            t0 = time.monotonic()
            me = self.p2p.peer_id
            try:
                table = await self.local.execute(
                    plan.node_sql or "", timeout_s=max(0.001, deadline - trio.current_time()),
                    max_rows=max_rows, max_bytes=max_bytes,
                )  # fmt: skip
            except (InvalidSQL, QueryRefused) as e:
                # The caller's SQL: every node would say the same. Stop asking.
                fatal.append(e)
                nursery.cancel_scope.cancel()
                return
            except QueryError as e:
                state: PeerState = TIMED_OUT if isinstance(e, QueryTimeout) else ERROR
                statuses[me] = PeerResult(me, state, f"{e.kind}: {e}",
                                          elapsed_s=time.monotonic() - t0, local=True)  # fmt: skip
                return
            partials[me] = table
            statuses[me] = PeerResult(me, ANSWERED, rows=table.num_rows,
                                      elapsed_s=time.monotonic() - t0, local=True)  # fmt: skip

        async def ask(peer: str) -> None:
            result, table = await self._ask_peer(peer, plan, deadline, max_rows, max_bytes)
            statuses[peer] = result
            if table is not None:
                partials[peer] = table

        fatal: list[QueryError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_local)
            for peer in targets:
                nursery.start_soon(ask, peer)
        if fatal:
            raise fatal[0]

        me = self.p2p.peer_id
        ordered = [statuses[me]] + [statuses[p] for p in sorted(targets)]
        _drop_mistyped(partials, ordered, me)
        missing = [p for p in ordered if p.status != ANSWERED]
        if require_all and missing:
            raise PeersMissing(missing, ordered)
        if not partials:
            raise DistributedQueryError(
                "no node answered: " + "; ".join(f"{p.peer_id}: {p.status} ({p.message})"
                                                 for p in ordered), ordered)  # fmt: skip
        # Local first, then by peer ID: the merge input order is deterministic.
        inputs = [partials[p.peer_id] for p in ordered if p.peer_id in partials]
        table = await self.local.merge(plan, inputs, max_rows=max_rows, max_bytes=max_bytes,
                                       timeout_s=max(1.0, deadline - trio.current_time()))
        return DistributedResult(table, ordered, plan.strategy, plan.reason,
                                 elapsed_s=time.monotonic() - started)  # fmt: skip

    execute_distributed_query = execute

    async def _ask_peer(
        self, peer: str, plan: dq.QueryPlan, deadline: float, max_rows: int, max_bytes: int
    ) -> tuple[PeerResult, pa.Table | None]:
        t0 = time.monotonic()

        def done(state: PeerState, message: str = "", **kw: Any) -> tuple[PeerResult, None]:
            return PeerResult(peer, state, message, elapsed_s=time.monotonic() - t0, **kw), None

        reason = self.p2p.policy.refusal(peer)
        if reason is not None:
            return done(REFUSED, f"not asked: {reason}")
        opened = False
        with trio.move_on_at(deadline):
            try:
                stream = await self.p2p.open_stream(peer, QUERY_PROTOCOL_ID)
            except Exception as e:  # dial errors, no address, protocol not supported
                if peer in self.p2p.connected_peers():
                    return done(ERROR, f"connected, but no query stream could be opened "
                                       f"(does it serve {QUERY_PROTOCOL_ID}?): {_describe(e)}")
                return done(UNREACHABLE, f"could not connect: {_describe(e)}")
            opened = True
            remaining = deadline - trio.current_time()
            margin = min(DEADLINE_MARGIN, remaining * DEADLINE_MARGIN_SHARE)
            request = QueryRequest(
                sql=plan.node_sql or "", timeout_s=min(MAX_TIMEOUT, max(0.001, remaining - margin)),
                max_rows=max_rows, max_bytes=max_bytes,
            )  # fmt: skip
            ok = False
            try:
                response, wire = await exchange(stream, request, network=self.network)
                ok = True
            except Refused as e:
                return done(REFUSED, e.reason)
            except TruncatedFrame as e:
                return done(ERROR, f"the stream ended mid-answer (peer died or reset it): {e}")
            except (ProtocolError, QueryMessageError) as e:
                return done(ERROR, f"peer broke the query protocol: {e}")
            except Exception as e:  # the connection dropped while writing
                return done(ERROR, f"the stream failed: {_describe(e)}")
            finally:
                with trio.move_on_after(1) as cleanup, contextlib.suppress(Exception):
                    cleanup.shield = True
                    await (stream.close() if ok else stream.reset())
            if response.status != "ok":
                state = {"refused": REFUSED, "timeout": TIMED_OUT}.get(response.status, ERROR)
                return done(state, f"{response.status}: {response.message}", bytes=wire)
            try:
                table = await trio.to_thread.run_sync(dq.from_ipc, response.arrow_ipc)
            except (pa.ArrowInvalid, OSError) as e:
                return done(ERROR, f"answer is not an Arrow IPC stream: {e}", bytes=wire)
            if plan.partial_columns and tuple(table.column_names) != plan.partial_columns:
                return done(ERROR, f"answer has columns {table.column_names}, expected "
                                   f"{list(plan.partial_columns)} (a different benchsync version?)",
                            bytes=wire)  # fmt: skip
            if table.num_rows > max_rows:
                return done(ERROR, f"answer of {table.num_rows} rows exceeds max_rows={max_rows}",
                            bytes=wire)  # fmt: skip
            result = PeerResult(peer, ANSWERED, rows=table.num_rows, bytes=wire,
                                elapsed_s=time.monotonic() - t0)  # fmt: skip
            return result, table
        if opened:
            return done(TIMED_OUT, f"no answer within the query's deadline "
                                   f"({time.monotonic() - t0:.2f} s)")  # fmt: skip
        return done(UNREACHABLE, f"could not open a stream before the deadline "
                                 f"({time.monotonic() - t0:.2f} s)")  # fmt: skip


def _drop_mistyped(partials: dict[str, pa.Table], ordered: list[PeerResult], me: str) -> None:
    """Turn a peer whose partial answer cannot be unified with ours into an error.

    One peer answering with the wrong column types (a bug or a lie) would
    otherwise fail the whole merge; only its schema is compared, no data.
    """
    if me not in partials:
        return
    ours = partials[me].schema.empty_table()
    for result in ordered:
        table = partials.get(result.peer_id)
        if result.peer_id == me or table is None:
            continue
        try:
            pa.concat_tables([ours, table.schema.empty_table()], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            del partials[result.peer_id]
            result.status = ERROR
            result.message = f"answer's column types do not match this node's: {e}"


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


__all__ = [
    "ANSWERED", "ERROR", "QUERY_PROTOCOL_ID", "REFUSED", "TIMED_OUT", "UNREACHABLE",
    "DistributedQueryError", "DistributedResult", "LocalQueryService", "PeerResult",
    "PeersMissing", "QueryServer", "QueryService",
    "ServerLimits", "exchange", "response_frame_limit", "write_frame",
]  # fmt: skip
