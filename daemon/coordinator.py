"""The coordinator of network queries: plan, ask every dataset's origin, merge.

`Coordinator.execute` plans the query (`benchsync.protocol.planner.plan_sql`
with DuckDB's dialect) and gets one partial answer per dataset the node
knows of (its own, every peer whose head it has seen, every replica it
holds), concurrently under one deadline:

- from the dataset's origin when it answers (`ask`: a
  `benchsync.protocol.query.QuerySession` driven by the node's stream
  adapter, which applies the access policy); the own dataset in the node's
  own sandbox slots;
- otherwise (unreachable, dead, timed out, refused, too large) from the
  node's installed replica of it, run here like the own part
  (`source: replica`, with the replica's `seq` and lag);
- otherwise the dataset is missing and the answer is *partial*: `execute`
  raises `PartialAnswer` (which carries the partial result) unless the
  caller passed `allow_partial=True`, and the result says
  `complete: false`. Nothing is left out silently.

Every node answers for its dataset as the `replicas` scope shows it (an
`origin` column, globally unique ids: `benchsync.storage.scopes`), so an
origin's answer and a replica's are interchangeable. The partial answers
are merged in a sandbox worker.

A plan that ships rows (`rows`: median, ...; `shipped`: CTEs, subqueries,
...: see the planner) is bounded by bytes, not by rows: its requests say
`purpose: "ship"`, ask for up to `query_ship_max_bytes` (at most the
protocol's MAX_RESULT_BYTES, 256 MiB, per request) and no row count, and
each peer clamps them to its own `query_ship_max_bytes` (a peer from before
the field clamps them to its query_max_rows/query_max_bytes, as it always
did); the own part and a replica's run likewise. A `shipped` plan has one
node part per base table the query reads: each dataset ships those tables'
named columns, one request after the other on its own stream each (so a
peer's fairness limits hold). A peer's refusal leaves its dataset to its
replica, else missing: a partial answer, never a wrong one. The bytes of
every dataset's shipped rows together are bounded by `ship_max_bytes`
(`ResultTooLarge` naming the setting); the coordinator runs the rest of the
query (`rows`) or the caller's query (`shipped`) over the union, and the
caller's max_rows/max_bytes bound that answer only.
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
from benchsync.daemon.config import SETTINGS_BY_NAME
from benchsync.daemon.host import remote_peer
from benchsync.daemon.local_query import LocalQueryService
from benchsync.daemon.network import P2PNode
from benchsync.daemon.streams import Channel
from benchsync.protocol.frames import Interrupted, ProtocolError, Refused
from benchsync.protocol.planner import PARTIALS_TABLE, PlanError, QueryPlan, check_partial, plan_sql
from benchsync.protocol.query import (
    MAX_RESULT_BYTES,
    MAX_ROWS,
    MAX_TIMEOUT,
    QUERY_PROTOCOL_ID,
    Purpose,
    QueryMessageError,
    QueryOpen,
    QueryRequest,
    QueryResponse,
    QuerySession,
)
from benchsync.protocol.session import REQUESTER
from benchsync.storage.distquery import DUCKDB, PartialsMismatch, union_partials
from benchsync.storage.replicas import Replica
from benchsync.storage.sandbox import (
    InvalidSQL,
    QueryError,
    QueryRefused,
    QueryTimeout,
    ResultTooLarge,
)
from benchsync.storage.sandbox_worker import from_ipc

# Part of the remaining time kept back when asking a peer, so that its own
# "timeout" answer reaches us before our deadline does.
DEADLINE_MARGIN = 0.5  # seconds, at most
DEADLINE_MARGIN_SHARE = 0.2  # of the remaining time, when that is less
# Of the remaining time, what dialling an unconnected origin may take when we hold
# a replica of its dataset: the rest is the replica's.
REPLICA_DIAL_SHARE = 0.5
# Bytes of shipped base-table rows one network query may gather (all datasets together).
DEFAULT_SHIP_MAX_BYTES: int = SETTINGS_BY_NAME["query_ship_max_bytes"].default
SHIP_SETTING = "query_ship_max_bytes"

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


class PartialAnswer(DistributedQueryError):
    """Some known datasets' rows are missing from the answer (neither their origin
    nor a replica answered); `.missing` lists them, `.result` is the partial
    answer (the rows of the datasets that did answer)."""

    def __init__(self, result: DistributedResult) -> None:
        missing = result.missing
        detail = "; ".join(f"{p.peer_id}: {p.status} ({p.message})" for p in missing)
        super().__init__(
            f"partial answer: {len(missing)} dataset(s) missing: {detail}. Retry, raise the "
            "time limit, or pass allow_partial to accept an answer without their rows",
            result.peers,
        )
        self.missing = missing
        self.result = result


PeersMissing = PartialAnswer  # the name before partial answers were refused by default


Source = Literal["origin", "replica"]
ORIGIN: Source = "origin"
REPLICA: Source = "replica"


@dataclass
class PeerResult:
    """One dataset of a distributed query: what its origin did, where its rows came from.

    `peer_id` is the dataset (its origin's peer ID); `status` the origin's
    fate; `source` is None when the answer lacks this dataset's rows.
    """

    peer_id: str
    status: PeerState
    message: str = ""
    rows: int = 0  # rows of its partial answer
    bytes: int = 0  # bytes of its answer on the wire (0 for the local part)
    elapsed_s: float = 0.0  # seconds from asking to its answer (or failure)
    local: bool = False  # this node's own part, run in-process
    source: Source | None = None  # origin, replica, or None: missing from the answer
    seq: int | None = None  # the replica's snapshot seq (source replica)
    lag_seq: int | None = None  # versions the replica is behind the newest head seen
    lag_s: float | None = None  # seconds the replica is older than the newest head seen

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id, "dataset": self.peer_id, "status": self.status,
            "message": self.message, "rows": self.rows, "bytes": self.bytes,
            "elapsed_s": round(self.elapsed_s, 4), "local": self.local, "source": self.source,
            "seq": self.seq, "lag_seq": self.lag_seq,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
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
        """True when every known dataset's rows are in the answer (from origin or replica)."""
        return all(p.source is not None for p in self.peers)

    @property
    def missing(self) -> list[PeerResult]:
        """The datasets whose rows the answer lacks."""
        return [p for p in self.peers if p.source is None]

    def to_json(self) -> dict[str, Any]:
        """Columns, rows (lists of JSON values), peers, strategy, completeness: for the
        control API/CLI."""
        return table_json(self.table) | {
            "peers": [p.to_json() for p in self.peers],
            "strategy": self.strategy, "reason": self.reason, "complete": self.complete,
            "missing": [p.peer_id for p in self.missing], "elapsed_s": round(self.elapsed_s, 4),
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

    def __init__(self, p2p: P2PNode, local: LocalQueryService, *, network: str,
                 ship_max_bytes: int = DEFAULT_SHIP_MAX_BYTES) -> None:  # fmt: skip
        self.p2p = p2p
        self.local = local
        self.network = network
        self.ship_max_bytes = ship_max_bytes

    def default_peers(self) -> list[str]:
        """Every dataset of the network we know of, but our own: connected peers,
        peers whose heads we know (they may need a dial), datasets we follow or
        hold a replica of. Untrusted peers are not part of our network and are
        left out; banned ones are kept (and reported)."""
        me = self.p2p.peer_id
        known = list(self.p2p.announcer.book.heads)
        known += [s.dataset for s in self.p2p.replica_states()]
        if self.local.replicas is not None:
            known += [r.dataset for r in self.local.replicas.all()]
        candidates = dict.fromkeys([*self.p2p.connected_peers(), *known])
        return sorted(p for p in candidates if p != me and self.p2p.policy.is_trusted(p))

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        peers: Sequence[str] | None = None,
        timeout_s: float,
        allow_partial: bool = False,
        require_all: bool | None = None,
        max_rows: int,
        max_bytes: int,
    ) -> DistributedResult:
        """Run `sql` over this node's dataset and `peers`' (default: every dataset known).

        Each dataset's part runs at its origin, else on the replica we hold
        (see the module docstring), concurrently, under one deadline of
        `timeout_s`; the answers are merged here. Returns the merged answer
        with every dataset's source and its origin's status. Raises InvalidSQL
        or QueryRefused (the SQL, checked before anyone is asked), PlanError,
        `PartialAnswer` when some dataset's rows are missing and not
        `allow_partial` (its `.result` is the partial answer), and
        `DistributedQueryError` when no dataset answered at all.
        `require_all` is accepted and ignored: requiring every dataset is the default.
        A `shipped` plan raises ResultTooLarge when the shipped rows exceed
        `ship_max_bytes` (the `query_ship_max_bytes` setting).
        """
        del require_all  # the default behaviour now; kept so that old callers still work
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
                or not 0 < timeout_s <= MAX_TIMEOUT:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT}] seconds, got {timeout_s!r}")
        if peers is not None and (not isinstance(peers, list | tuple)
                                  or not all(isinstance(p, str) for p in peers)):
            raise ValueError("peers must be a list of peer ID strings")
        started = time.monotonic()
        answer_rows, answer_bytes = max_rows, max_bytes
        deadline = trio.current_time() + timeout_s
        plan = await trio.to_thread.run_sync(plan_sql, sql, params, DUCKDB)
        targets = list(dict.fromkeys(peers if peers is not None else self.default_peers()))
        targets = [p for p in targets if p != self.p2p.peer_id]
        statuses: dict[str, PeerResult] = {}
        partials: dict[str, dict[str, pa.Table]] = {}  # dataset -> node part name -> answer
        purpose: Purpose = "answer"
        if plan.ships_rows:  # bounded by bytes (the setting), not by the answer's rows
            max_rows, max_bytes = MAX_ROWS, min(self.ship_max_bytes, MAX_RESULT_BYTES)
            purpose = "ship"
        shipped_bytes = [0]

        def count_shipped(tables: Mapping[str, pa.Table]) -> None:
            if not plan.ships_rows:
                return
            shipped_bytes[0] += sum(t.nbytes for t in tables.values())
            if shipped_bytes[0] > self.ship_max_bytes:
                fatal.append(_ship_too_large(shipped_bytes[0], self.ship_max_bytes))
                nursery.cancel_scope.cancel()

        async def ask_local() -> None:
            t0 = time.monotonic()
            me = self.p2p.peer_id
            try:
                tables = await self._run_parts(plan, me, deadline, max_rows, max_bytes,
                                               purpose)  # fmt: skip
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
            partials[me] = tables
            statuses[me] = PeerResult(me, ANSWERED, rows=_rows(tables), source=ORIGIN,
                                      elapsed_s=time.monotonic() - t0, local=True)  # fmt: skip
            count_shipped(tables)

        async def ask(peer: str) -> None:
            replica = self._replica(peer)
            open_deadline = deadline
            if replica is not None and peer not in self.p2p.connected_peers():
                # A dial that fails slowly must leave the replica time to answer.
                open_deadline = trio.current_time() + (deadline - trio.current_time()) \
                    * REPLICA_DIAL_SHARE
            result, table = await self._ask_peer(peer, plan, deadline, max_rows, max_bytes,
                                                 purpose, open_deadline=open_deadline)
            if table is None and replica is not None:
                table = await self._ask_replica(result, replica, plan, deadline,
                                                max_rows, max_bytes, purpose)  # fmt: skip
            statuses[peer] = result
            if table is not None:
                partials[peer] = table
                count_shipped(table)

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
        if not partials:
            raise DistributedQueryError(
                "no node answered: " + "; ".join(f"{p.peer_id}: {p.status} ({p.message})"
                                                 for p in ordered), ordered)  # fmt: skip
        # Local first, then by peer ID: the merge input order is deterministic.
        inputs = [partials[p.peer_id] for p in ordered if p.peer_id in partials]
        for i, t in enumerate(inputs):
            check_partial(plan, i, t[PARTIALS_TABLE].column_names if PARTIALS_TABLE in t else [])
        unions: dict[str, pa.Table] = {}
        try:
            for name, _ in plan.node_parts():
                unions[name] = await trio.to_thread.run_sync(
                    union_partials, [t[name] for t in inputs])
        except PartialsMismatch as e:
            raise PlanError(str(e)) from None
        if plan.ships_rows:  # the caller's limits bound the answer, not the input
            max_rows, max_bytes = answer_rows, answer_bytes
        table = await self.local.merge(plan.merge_sql, unions,
                                       max_rows=max_rows, max_bytes=max_bytes,
                                       timeout_s=max(1.0, deadline - trio.current_time()))
        result = DistributedResult(table, ordered, plan.strategy, plan.reason,
                                   elapsed_s=time.monotonic() - started)  # fmt: skip
        if not result.complete and not allow_partial:
            raise PartialAnswer(result)
        return result

    def _replica(self, dataset: str) -> Replica | None:
        """The installed replica of `dataset` this node holds, if any."""
        return None if self.local.replicas is None else self.local.replicas.get(dataset)

    async def _ask_replica(
        self, result: PeerResult, replica: Replica, plan: QueryPlan, deadline: float,
        max_rows: int, max_bytes: int, purpose: Purpose,
    ) -> dict[str, pa.Table] | None:  # fmt: skip
        """The plan's node parts over our replica of `result`'s dataset (its origin did
        not answer); fills in `result`'s source, seq and lag. None when it fails too."""
        try:
            tables = await self._run_parts(plan, replica.dataset, deadline, max_rows, max_bytes,
                                           purpose)  # fmt: skip
        except QueryError as e:
            result.message += f"; its replica (seq {replica.seq}) failed too: {e.kind}: {e}"
            return None
        state = next((s for s in self.p2p.replica_states() if s.dataset == replica.dataset), None)
        result.source, result.seq, result.rows = REPLICA, replica.seq, _rows(tables)
        result.lag_seq = 0 if state is None else state.lag_seq
        result.lag_s = 0.0 if state is None else state.lag_seconds
        return tables

    async def _run_parts(self, plan: QueryPlan, dataset: str, deadline: float,
                         max_rows: int, max_bytes: int,
                         purpose: Purpose) -> dict[str, pa.Table]:  # fmt: skip
        """Every node part of `plan` over `dataset` here (own data or replica), in turn."""
        out = {}
        for name, sql in plan.node_parts():
            out[name] = await self.local.execute(
                sql, timeout_s=max(0.001, deadline - trio.current_time()),
                max_rows=max_rows, max_bytes=max_bytes, scope="dataset", dataset=dataset,
                purpose=purpose,
            )  # fmt: skip
        return out

    async def _ask_peer(
        self, peer: str, plan: QueryPlan, deadline: float, max_rows: int, max_bytes: int,
        purpose: Purpose = "answer", *, open_deadline: float | None = None,
    ) -> tuple[PeerResult, dict[str, pa.Table] | None]:  # fmt: skip
        """Every node part of `plan` from `peer`, one stream each, in turn: all
        of them, or None and why (the first part that failed)."""
        t0 = time.monotonic()
        out: dict[str, pa.Table] = {}
        wire = 0
        for name, sql in plan.node_parts():
            result, table = await self._ask_peer_part(peer, plan, sql, deadline, max_rows,
                                                      max_bytes, purpose,
                                                      open_deadline=open_deadline)  # fmt: skip
            wire += result.bytes
            if table is None:
                if len(plan.node_parts()) > 1:
                    result.message = f"table {name}: {result.message}"
                result.bytes, result.elapsed_s = wire, time.monotonic() - t0
                return result, None
            out[name] = table
            open_deadline = None  # connected now
        return PeerResult(peer, ANSWERED, rows=_rows(out), bytes=wire, source=ORIGIN,
                          elapsed_s=time.monotonic() - t0), out

    async def _ask_peer_part(
        self, peer: str, plan: QueryPlan, sql: str, deadline: float, max_rows: int,
        max_bytes: int, purpose: Purpose = "answer", *, open_deadline: float | None = None,
    ) -> tuple[PeerResult, pa.Table | None]:  # fmt: skip
        t0 = time.monotonic()

        def done(state: PeerState, message: str = "", **kw: Any) -> tuple[PeerResult, None]:
            return PeerResult(peer, state, message, elapsed_s=time.monotonic() - t0, **kw), None

        opened = False
        opening = trio.CancelScope(deadline=deadline if open_deadline is None else open_deadline)
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
                            sql=sql, max_rows=max_rows, max_bytes=max_bytes, purpose=purpose,
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
        if purpose != "ship" and table.num_rows > max_rows:
            return done(ERROR, f"answer of {table.num_rows} rows exceeds max_rows={max_rows}",
                        bytes=wire)  # fmt: skip
        result = PeerResult(peer, ANSWERED, rows=table.num_rows, bytes=wire, source=ORIGIN,
                            elapsed_s=time.monotonic() - t0)  # fmt: skip
        return result, table


def _rows(tables: Mapping[str, pa.Table]) -> int:
    return sum(t.num_rows for t in tables.values())


def _ship_too_large(got: int, limit: int) -> ResultTooLarge:
    return ResultTooLarge(f"rows shipped to the coordinator, in bytes (setting {SHIP_SETTING})",
                          limit=limit, got=got)  # fmt: skip


def _drop_mistyped(
    partials: dict[str, dict[str, pa.Table]], ordered: list[PeerResult], me: str
) -> None:
    """Turn a peer whose partial answer cannot be unified with ours into an error.

    One peer answering with the wrong column types (a bug or a lie) would
    otherwise fail the whole merge; only its schema is compared, no data.
    """
    if me not in partials:
        return
    ours = partials[me]
    for result in ordered:
        tables = partials.get(result.peer_id)
        if result.peer_id == me or tables is None:
            continue
        try:
            for name, table in tables.items():
                pa.concat_tables([ours[name].schema.empty_table(), table.schema.empty_table()],
                                 promote_options="permissive")  # fmt: skip
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            del partials[result.peer_id]
            result.status, result.source = ERROR, None
            result.message = f"answer's column types do not match this node's: {e}"


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
