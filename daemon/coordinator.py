"""The coordinator of network queries: plan, ask every peer, run the local part, merge.

`Coordinator.execute` plans the query (`benchsync.protocol.planner.plan_sql`
with DuckDB's dialect), asks every peer of the network concurrently under one
deadline (`ask`: a `benchsync.protocol.query.QuerySession` driven by the
node's stream adapter, which applies the access policy), runs the local
part in the node's own sandbox slots, merges the partial answers in a
sandbox worker, and reports every peer's fate. A peer is never silently
left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import trio
from libp2p.abc import INetStream

from benchsync.daemon.answers import table_json
from benchsync.daemon.host import remote_peer
from benchsync.daemon.local_query import LocalQueryService
from benchsync.daemon.network import P2PNode
from benchsync.daemon.streams import Channel
from benchsync.protocol.frames import Interrupted, ProtocolError, Refused
from benchsync.protocol.planner import PARTIALS_TABLE, PlanError, QueryPlan, check_partial, plan_sql
from benchsync.protocol.query import (
    MAX_TIMEOUT,
    QUERY_PROTOCOL_ID,
    QueryMessageError,
    QueryOpen,
    QueryRequest,
    QueryResponse,
    QuerySession,
)
from benchsync.protocol.session import REQUESTER
from benchsync.storage.distquery import DUCKDB, PartialsMismatch, union_partials
from benchsync.storage.sandbox import InvalidSQL, QueryError, QueryRefused, QueryTimeout
from benchsync.storage.sandbox_worker import from_ipc

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


async def ask(
    channel: Channel, request: QueryRequest, *, network: str
) -> tuple[QueryResponse, int]:
    """Send `request` on a query channel and read the answer.

    Returns the response and the bytes received (the answer's size on the
    wire). Raises `Refused` (the peer's access policy or network check
    refused us), `Interrupted` (the stream ended mid-answer) or
    `RemoteProtocolError` (garbage). A response with an error status is
    returned, not raised.
    """
    await channel.send(QueryOpen(network, request))
    response = await channel.expect(QueryResponse)
    assert isinstance(response, QueryResponse)
    return response, channel.wire_in


async def exchange(
    stream: INetStream, request: QueryRequest, *, network: str
) -> tuple[QueryResponse, int]:
    """`ask` on a stream opened by other means (tests, a scripted peer)."""
    channel = Channel(stream, QuerySession(REQUESTER), str(remote_peer(stream)))
    return await ask(channel, request, network=network)


class _NoAnswer(Exception):
    """The deadline passed before the peer answered (the stream is reset)."""


class Coordinator:
    """Runs network queries for one node: its own part in `local`, the peers' over `p2p`."""

    def __init__(self, p2p: P2PNode, local: LocalQueryService, *, network: str) -> None:
        self.p2p = p2p
        self.local = local
        self.network = network

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
        timeout_s: float,
        require_all: bool = False,
        max_rows: int,
        max_bytes: int,
    ) -> DistributedResult:
        """Run `sql` over this node and `peers` (default: every peer of the network).

        Every node runs the plan's node part on its own dataset, concurrently,
        under one deadline of `timeout_s`; the answers are merged here.
        Returns the merged answer with every node's status. Raises InvalidSQL
        or QueryRefused (the SQL, checked before anyone is asked), PlanError,
        `PeersMissing` when `require_all` and a node did not answer, and
        `DistributedQueryError` when no node answered at all.
        """
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
                or not 0 < timeout_s <= MAX_TIMEOUT:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT}] seconds, got {timeout_s!r}")
        if peers is not None and (isinstance(peers, str)
                                  or not all(isinstance(p, str) for p in peers)):
            raise ValueError("peers must be a list of peer ID strings")
        started = time.monotonic()
        deadline = trio.current_time() + timeout_s
        plan = await trio.to_thread.run_sync(plan_sql, sql, params, DUCKDB)
        targets = list(dict.fromkeys(peers if peers is not None else self.default_peers()))
        targets = [p for p in targets if p != self.p2p.peer_id]
        statuses: dict[str, PeerResult] = {}
        partials: dict[str, pa.Table] = {}

        async def ask_local() -> None:
            t0 = time.monotonic()
            me = self.p2p.peer_id
            try:
                table = await self.local.execute(
                    plan.node_sql, timeout_s=max(0.001, deadline - trio.current_time()),
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
        for i, t in enumerate(inputs):
            check_partial(plan, i, t.column_names)
        try:
            union = await trio.to_thread.run_sync(union_partials, inputs)
        except PartialsMismatch as e:
            raise PlanError(str(e)) from None
        table = await self.local.merge(plan.merge_sql, {PARTIALS_TABLE: union},
                                       max_rows=max_rows, max_bytes=max_bytes,
                                       timeout_s=max(1.0, deadline - trio.current_time()))
        return DistributedResult(table, ordered, plan.strategy, plan.reason,
                                 elapsed_s=time.monotonic() - started)  # fmt: skip

    async def _ask_peer(
        self, peer: str, plan: QueryPlan, deadline: float, max_rows: int, max_bytes: int
    ) -> tuple[PeerResult, pa.Table | None]:
        t0 = time.monotonic()

        def done(state: PeerState, message: str = "", **kw: Any) -> tuple[PeerResult, None]:
            return PeerResult(peer, state, message, elapsed_s=time.monotonic() - t0, **kw), None

        opened = False
        opening = trio.CancelScope(deadline=deadline)
        with opening:
            try:
                session = QuerySession(REQUESTER)
                async with self.p2p.streams.open(peer, QUERY_PROTOCOL_ID, session) as channel:
                    opened = True
                    opening.deadline = math.inf  # the exchange has the deadline: reset on it
                    response: QueryResponse | None = None
                    wire = 0
                    with trio.move_on_at(deadline):
                        remaining = deadline - trio.current_time()
                        margin = min(DEADLINE_MARGIN, remaining * DEADLINE_MARGIN_SHARE)
                        request = QueryRequest(
                            sql=plan.node_sql, max_rows=max_rows, max_bytes=max_bytes,
                            timeout_s=min(MAX_TIMEOUT, max(0.001, remaining - margin)),
                        )  # fmt: skip
                        response, wire = await ask(channel, request, network=self.network)
                    if response is None:
                        raise _NoAnswer
            except Refused as e:  # by our admission rule (not asked) or by the peer
                return done(REFUSED, e.reason)
            except _NoAnswer:
                return done(TIMED_OUT, f"no answer within the query's deadline "
                                       f"({time.monotonic() - t0:.2f} s)")  # fmt: skip
            except Interrupted as e:
                return done(ERROR, f"the stream ended mid-answer (peer died or reset it): {e}")
            except (ProtocolError, QueryMessageError) as e:
                return done(ERROR, f"peer broke the query protocol: {e}")
            except Exception as e:
                if opened:  # the connection dropped while writing
                    return done(ERROR, f"the stream failed: {_describe(e)}")
                # dial errors, no address, protocol not supported
                if peer in self.p2p.connected_peers():
                    return done(ERROR, f"connected, but no query stream could be opened "
                                       f"(does it serve {QUERY_PROTOCOL_ID}?): {_describe(e)}")
                return done(UNREACHABLE, f"could not connect: {_describe(e)}")
        if not opened:
            return done(UNREACHABLE, f"could not open a stream before the deadline "
                                     f"({time.monotonic() - t0:.2f} s)")  # fmt: skip
        if response.status != "ok":
            state = {"refused": REFUSED, "timeout": TIMED_OUT}.get(response.status, ERROR)
            return done(state, f"{response.status}: {response.message}", bytes=wire)
        try:
            table = await trio.to_thread.run_sync(from_ipc, response.arrow_ipc)
        except (pa.ArrowInvalid, OSError) as e:
            return done(ERROR, f"answer is not an Arrow IPC stream: {e}", bytes=wire)
        try:
            check_partial(plan, 0, table.column_names)
        except PlanError:
            return done(ERROR, f"answer has columns {table.column_names}, expected "
                               f"{list(plan.partial_columns)} (a different benchsync version?)",
                        bytes=wire)  # fmt: skip
        if table.num_rows > max_rows:
            return done(ERROR, f"answer of {table.num_rows} rows exceeds max_rows={max_rows}",
                        bytes=wire)  # fmt: skip
        result = PeerResult(peer, ANSWERED, rows=table.num_rows, bytes=wire,
                            elapsed_s=time.monotonic() - t0)  # fmt: skip
        return result, table


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
