"""`/benchsync/query/1.0.0` for one node: the wiring of its three parts.

- `benchsync.daemon.local_query.LocalQueryService`: the node's data in the
  `local` and `replicas` scopes, run in sandbox worker processes.
- `benchsync.daemon.query_server.QueryServer`: answers peers' query streams.
- `benchsync.daemon.coordinator.Coordinator`: plans a network query, asks
  every peer, runs the local part and merges.

Planning and the wire session are pure (`benchsync.protocol.planner`,
`benchsync.protocol.query`); the sandbox is storage's
(`benchsync.storage.sandbox`). `QueryService` builds the three parts from
the node's settings, registers the server and is what the node calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from benchsync.daemon.coordinator import DEFAULT_SHIP_MAX_BYTES, Coordinator, DistributedResult
from benchsync.daemon.local_query import (
    DEFAULT_LIMITS,
    DEFAULT_MEMORY_LIMIT,
    MAX_SERVED_TIMEOUT,
    DatabaseSource,
    LocalQueryService,
    Scope,
    ServerLimits,
)
from benchsync.daemon.network import P2PNode
from benchsync.daemon.query_server import QueryServer
from benchsync.protocol.query import QUERY_PROTOCOL_ID, QuerySession
from benchsync.protocol.session import RESPONDER
from benchsync.storage.replicas import ReplicaStore

PRESTARTED_WORKERS = 2  # sandbox worker processes started with the query service

__all__ = ["QueryService"]


class QueryService:
    """The query protocol for one node: server (`register`) and coordinator (`execute`)."""

    def __init__(
        self,
        p2p: P2PNode,
        db: DatabaseSource,
        *,
        network: str | None = None,
        timeout_s: float = DEFAULT_LIMITS.timeout_s,
        max_rows: int = DEFAULT_LIMITS.max_rows,
        max_bytes: int = DEFAULT_LIMITS.max_bytes,
        memory_limit: str | int = DEFAULT_MEMORY_LIMIT,
        limits: ServerLimits | None = None,
        replicas: ReplicaStore | None = None,
        dataset: str | None = None,
        ship_max_bytes: int = DEFAULT_SHIP_MAX_BYTES,
    ) -> None:
        """`db` is the node's BenchmarkDB or a callable returning the current one;
        `replicas` and `dataset` (the own dataset ID, default the node's peer ID)
        serve the `replicas` scope and the replica fallback of the `network` scope.

        `timeout_s`, `max_rows` and `max_bytes` are the defaults of `execute`
        and (with `memory_limit`) what this node grants to peers' queries,
        unless `limits` spells the latter out. `ship_max_bytes` bounds the
        rows a network query that cannot be split gathers from all nodes, and
        (unless `limits` is given) what this node ships to a peer's such query.
        """
        self.p2p = p2p
        self.network = network or p2p.network
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        limits = limits or ServerLimits(
            max_timeout_s=max(timeout_s, MAX_SERVED_TIMEOUT), max_rows=max_rows,
            max_bytes=max_bytes, memory_limit=memory_limit, ship_max_bytes=ship_max_bytes,
        )  # fmt: skip
        self.local = LocalQueryService(db, limits=limits, replicas=replicas,
                                       dataset=dataset or p2p.peer_id)  # fmt: skip
        self.server = QueryServer(self.local)
        self.coordinator = Coordinator(p2p, self.local, network=self.network,
                                       ship_max_bytes=ship_max_bytes)

    def database_replaced(self) -> None:
        """The node swapped its database object (restore): re-read it on the next query."""
        self.local.invalidate()

    def register(self) -> None:
        """Serve `/benchsync/query/1.0.0` through the node's stream adapter (which
        applies the access policy and the network check)."""
        self.p2p.streams.serve(QUERY_PROTOCOL_ID, lambda: QuerySession(RESPONDER),
                               self.server.handle)  # fmt: skip
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
        """Every peer of the network a query asks by default (see `Coordinator`)."""
        return self.coordinator.default_peers()

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        peers: Sequence[str] | None = None,
        timeout_s: float | None = None,
        allow_partial: bool = False,
        require_all: bool | None = None,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> DistributedResult:
        """A network query (`Coordinator.execute`); limits left as None take the
        service's defaults. Raises as `Coordinator.execute`: `PartialAnswer`
        when a known dataset's rows are missing, unless `allow_partial`
        (then check `result.complete`). `require_all` is an ignored alias."""
        return await self.coordinator.execute(
            sql, params, peers=peers, allow_partial=allow_partial, require_all=require_all,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            max_rows=self.max_rows if max_rows is None else max_rows,
            max_bytes=self.max_bytes if max_bytes is None else max_bytes,
        )  # fmt: skip
