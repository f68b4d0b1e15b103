"""The node's control API routes: request validation and one error mapping.

`control_router(node)` builds the `Router` that `benchsync up` serves (see
`benchsync.daemon.control` for the server, the envelope and `ApiError`).
Each handler checks its request's shape, calls one operation of the `Node`
(or its query service) and shapes the answer; it knows nothing of threads,
locks or libp2p.

Every typed error of storage, the planner and the query coordinator becomes
an API error through one table, `ERRORS` (`api_error`); a route names only
what a storage failure means for it (`write_failed`, `snapshot_failed`,
`restore_failed`), for the StorageErrors the table does not name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchsync.daemon.answers import table_json
from benchsync.daemon.control import ApiError, Request, Router, Text
from benchsync.daemon.coordinator import DistributedQueryError, PartialAnswer
from benchsync.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from benchsync.daemon.network import GetFailed, GetResult
from benchsync.daemon.staging import StagingRoutes
from benchsync.protocol.planner import PlanError
from benchsync.storage.cid import InvalidCID
from benchsync.storage.errors import InvalidRecord, NotFound, StorageError
from benchsync.storage.retention import BadTag
from benchsync.storage.sandbox import QueryError
from benchsync.storage.snapshot import DiskFull

if TYPE_CHECKING:
    from benchsync.daemon.node import Node

RECORD_KINDS = ("perf", "compat", "test")
MAX_RECORDS_PER_REQUEST = 100_000  # records in one POST /v1/record/{kind}
MAX_GET_PEERS = 64  # peers one POST /v1/get may dial (each dial may take DIAL_TIMEOUT)
QUERY_SCOPES = ("local", "replicas", "network")
# QueryError kinds that the query metrics count as their own outcome (others: "error").
QUERY_OUTCOMES = ("refused", "timeout", "too_large")


@dataclass(frozen=True)
class Failure:
    """How one error type is answered: HTTP status, error code (None: the error's
    own `kind`, for QueryError) and what to try."""

    status: int
    code: str | None
    hint: str | None


# In order: the first type that matches answers. Subclasses before their bases.
ERRORS: tuple[tuple[type[Exception], Failure], ...] = (
    (InvalidRecord, Failure(422, "invalid_record", "fix the named field; nothing was written")),
    (DiskFull, Failure(
        507, "disk_full",
        "free disk space (e.g. `benchsync gc`); the database and history are unchanged",
    )),  # fmt: skip
    (InvalidCID, Failure(400, "bad_cid", "give a CIDv0 (Qm...) or CIDv1 (bafy...)")),
    (NotFound, Failure(404, "not_found", "list versions with `benchsync log`")),
    (BadTag, Failure(400, "bad_tag", "choose another name")),
    (QueryError, Failure(400, None, "only single read-only SELECTs run")),  # refused, SQL, limits
    (PlanError, Failure(400, "cannot_distribute", "rewrite it without the construct named above")),
    # a dataset's rows missing (and allow_partial not given), or no node answered
    (PartialAnswer, Failure(
        503, "partial_answer",
        "retry, raise the timeout, or pass allow_partial (--allow-partial) to accept it",
    )),  # fmt: skip
    (DistributedQueryError, Failure(503, "peers_missing", "retry, or raise the timeout")),
)


def api_error(e: Exception, storage_failure: Failure | None = None) -> ApiError | None:
    """The API error for a typed error `e`: from `ERRORS`, else `storage_failure` for
    any other StorageError; None when `e` is none of these (a bug: a 500)."""
    failure = next((f for kind, f in ERRORS if isinstance(e, kind)), None)
    if failure is None and isinstance(e, StorageError):
        failure = storage_failure
    if failure is None:
        return None
    code = failure.code or (e.kind if isinstance(e, QueryError) else "error")
    return ApiError(failure.status, code, str(e), failure.hint)


@contextmanager
def answering(storage_failure: Failure | None = None) -> Iterator[None]:
    """Turn the typed errors raised in the `with` body into `ApiError`s (`api_error`)."""
    try:
        yield
    except Exception as e:
        error = api_error(e, storage_failure)
        if error is None:
            raise
        raise error from e


WRITE_FAILED = Failure(
    500, "write_failed",
    "nothing was written; check free disk space and the node's log, then retry",
)  # fmt: skip
SNAPSHOT_FAILED = Failure(500, "snapshot_failed", "the database and history are unchanged")
RESTORE_FAILED = Failure(409, "restore_failed", "the live database is unchanged")
KEEP_FAILED = Failure(409, "cannot_keep", "pin or tag a version `benchsync log` shows as kept")
GET_FAILED = Failure(500, "get_failed", "check free disk space and the node's log; blocks "
                     "stored so far are kept, run the same get again")
MAINTENANCE_FAILED = Failure(500, "maintenance_failed", "see the node's log; nothing kept was lost")


def control_router(node: Node) -> Router:
    """The routes of `node`'s control API (`/metrics` only when the `metrics` setting is on)."""
    return ControlAPI(node).router()


class ControlAPI:
    """The handlers of one node's control API."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.staging = StagingRoutes(node, RECORD_KINDS)  # bulk records: daemon/staging.py

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/v1/status", self.status)
        r.add("GET", "/v1/peers", self.peers)
        r.add("GET", "/v1/replicas", self.replicas)
        r.add("POST", "/v1/record/{kind}", self.record)
        self.staging.add_to(r)
        r.add("POST", "/v1/query", self.query)
        r.add("POST", "/v1/snapshot", self.snapshot)
        r.add("GET", "/v1/history", self.history)
        r.add("POST", "/v1/restore", self.restore)
        r.add("POST", "/v1/fetch", self.fetch)
        r.add("POST", "/v1/get", self.get)
        r.add("GET", "/v1/get", self.gets)
        r.add("POST", "/v1/migrate", self.migrate)
        r.add("GET", "/v1/pins", self.pins)
        r.add("POST", "/v1/pins", self.pin)
        r.add("GET", "/v1/tags", self.tags)
        r.add("POST", "/v1/tags", self.tag)
        r.add("POST", "/v1/maintenance", self.maintenance)
        if self.node.config.metrics:
            r.add("GET", "/metrics", self.metrics)
        return r

    async def status(self, request: Request) -> tuple[int, Any]:
        return 200, await self.node.status()

    async def peers(self, request: Request) -> tuple[int, Any]:
        return 200, {"peers": self.node.peers()}

    async def replicas(self, request: Request) -> tuple[int, Any]:
        return 200, {"replicas": self.node.replicas()}

    async def record(self, request: Request) -> tuple[int, Any]:
        kind = request.params["kind"]
        if kind not in RECORD_KINDS:
            raise ApiError(404, "unknown_kind", f"no record kind {kind!r}",
                           f"use one of {', '.join(RECORD_KINDS)}")  # fmt: skip
        body = request.json()
        records = body.get("records") if isinstance(body, dict) and "records" in body else [body]
        if (
            not isinstance(records, list)
            or not records
            or not all(isinstance(r, dict) for r in records)
        ):
            raise ApiError(400, "bad_request", 'expected one record object or {"records": [...]}',
                           "see `benchsync record --help` for the field names")  # fmt: skip
        if len(records) > MAX_RECORDS_PER_REQUEST:
            raise ApiError(413, "too_many_records",
                           f"{len(records)} records, limit {MAX_RECORDS_PER_REQUEST}",
                           "split the batch")  # fmt: skip
        try:
            with answering(WRITE_FAILED):
                if len(records) == 1:
                    return 200, {"stored": 1, "id": await self.node.record_one(kind, records[0])}
                return 200, {"stored": await self.node.record_many(kind, records)}
        except (TypeError, ValueError) as e:  # a value the record rules could not even check
            raise ApiError(422, "invalid_record", str(e), "nothing was written") from e

    async def query(self, request: Request) -> tuple[int, Any]:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            raise ApiError(
                400, "bad_request", 'expected {"sql": "...", "scope": "local|replicas|network"}'
            )
        scope = body.get("scope", "local")
        if scope not in QUERY_SCOPES:
            raise ApiError(400, "bad_scope", f"unknown scope {scope!r}",
                           "use local, replicas or network")  # fmt: skip
        params = body.get("params") or []
        queries = self.node.queries
        with self.node.metrics.time_query(scope) as timer:
            try:
                with answering():
                    if scope == "network":
                        # Partial answers are refused unless allow_partial; then the
                        # answer says "complete": false and "missing". require_all is
                        # accepted and ignored (it is the default).
                        result = await queries.execute(
                            body["sql"], params, peers=body.get("peers"),
                            allow_partial=body.get("allow_partial") is True,
                            timeout_s=body.get("timeout"),
                        )  # fmt: skip
                        return 200, result.to_json()
                    # The same gate, sandbox worker and limits as a peer's query.
                    table = await queries.query(body["sql"], params, scope=scope)
                    return 200, {"scope": scope, **table_json(table)}
            except ApiError as e:
                cause = e.__cause__
                if isinstance(cause, PlanError):
                    timer.outcome = "refused"
                elif isinstance(cause, QueryError) and cause.kind in QUERY_OUTCOMES:
                    timer.outcome = cause.kind
                raise
            except ValueError as e:  # a bad timeout or peer list
                raise ApiError(400, "bad_request", str(e)) from e

    async def snapshot(self, request: Request) -> tuple[int, Any]:
        with answering(SNAPSHOT_FAILED):
            version, created = await self.node.snapshot()
        return 200, version.to_json() | {"created": created}

    async def history(self, request: Request) -> tuple[int, Any]:
        limit = request.query_int("limit", minimum=1)  # ApiError 400 unless 1..2^63-1
        versions = await self.node.history(limit)
        return 200, {"versions": [v.to_json() for v in versions]}

    async def restore(self, request: Request) -> tuple[int, Any]:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("cid"), str):
            raise ApiError(400, "bad_request", 'expected {"cid": "..."}', "see `benchsync log`")
        with answering(RESTORE_FAILED):
            version = await self.node.restore(body["cid"])
        return 200, version.to_json()

    async def fetch(self, request: Request) -> tuple[int, Any]:
        """Make the DAG under a CID present in our blockstore, from the connected peers
        (lab members over /benchsync/car, any peer over Bitswap: `get` without dialing)."""
        body = request.json()
        cid = body.get("cid") if isinstance(body, dict) else None
        if not isinstance(cid, str):
            raise ApiError(400, "bad_request", 'expected {"cid": "..."}')
        result = await self._get(cid, [])
        return 200, {"cid": str(result.root), "blocks": result.blocks}

    async def get(self, request: Request) -> tuple[int, Any]:
        """{"cid": ..., "peers": [multiaddr, ...]}: fetch any UnixFS DAG by CID into the
        blockstore (dialing `peers` first); what was fetched, from whom."""
        body = request.json()
        peers = body.get("peers", []) if isinstance(body, dict) else None
        if not (isinstance(body, dict) and isinstance(body.get("cid"), str)
                and isinstance(peers, list)
                and all(isinstance(p, str) for p in peers)):  # fmt: skip
            raise ApiError(400, "bad_request",
                           'expected {"cid": "...", "peers": ["/ip4/.../p2p/..."]}')  # fmt: skip
        if len(peers) > MAX_GET_PEERS:
            raise ApiError(400, "bad_request", f"{len(peers)} peers, limit {MAX_GET_PEERS}",
                           "name the few peers that hold it")  # fmt: skip
        result = await self._get(body["cid"], peers)
        return 200, result.to_json()

    async def gets(self, request: Request) -> tuple[int, Any]:
        """The `get`s running now: CID, bytes fetched so far."""
        return 200, {"gets": list(self.node.gets.values())}

    async def _get(self, cid: str, peers: list[str]) -> GetResult:
        from benchsync.daemon.host import HostConfigError

        try:
            with answering(GET_FAILED):
                return await self.node.get(cid, peers)
        except HostConfigError as e:
            raise ApiError(400, "bad_address", str(e), "give full /ip4/.../tcp/.../p2p/<peer id> "
                           "addresses") from e  # fmt: skip
        except GetFailed as e:
            raise ApiError(404, "not_found", str(e),
                           "connect a peer that holds it (--peer MULTIADDR), or check the CID; "
                           "blocks fetched so far are kept") from e  # fmt: skip
        except (ValueError, KeyError) as e:  # multiformats: not a CID
            raise ApiError(400, "bad_cid", f"{cid!r} is not a CID: {e}",
                           "give a CIDv0 (Qm...) or CIDv1 (bafy...)") from e  # fmt: skip

    async def migrate(self, request: Request) -> tuple[int, Any]:
        """Migrate legacy files into the running node's dataset (the node owns the database)."""
        body = request.json()
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ApiError(400, "bad_request", 'expected {"paths": ["/abs/legacy.duckdb", ...]}',
                           "paths are read by the node's process: give absolute paths")  # fmt: skip
        backup, verify = bool(body.get("backup", True)), bool(body.get("verify", True))
        results = await self.node.migrate(paths, backup=backup, verify=verify)
        return 200, {"results": [r.to_json() for r in results], "ok": all(r.ok for r in results)}

    async def pins(self, request: Request) -> tuple[int, Any]:
        pins = self.node.dataset.pins()
        return 200, {"pins": [{"cid": c, "pinned_at": t} for c, t in sorted(pins.items())]}

    async def pin(self, request: Request) -> tuple[int, Any]:
        """{"cid": ..., "action": "add"|"rm"}: keep a version (or any complete DAG) forever,
        or stop keeping it."""
        body = request.json()
        if not (isinstance(body, dict) and isinstance(body.get("cid"), str)
                and body.get("action", "add") in ("add", "rm")):  # fmt: skip
            raise ApiError(400, "bad_request", 'expected {"cid": "...", "action": "add|rm"}')
        with answering(KEEP_FAILED):
            if body.get("action", "add") == "add":
                return 200, {"pinned": await self.node.keep("pin", body["cid"])}
            return 200, {"unpinned": await self.node.keep("unpin", body["cid"])}

    async def tags(self, request: Request) -> tuple[int, Any]:
        return 200, {"tags": self.node.dataset.tags()}

    async def tag(self, request: Request) -> tuple[int, Any]:
        """{"name": ..., "cid": ... (default: the head)} tags a version; {"name": ...,
        "remove": true} removes the tag."""
        body = request.json()
        cid = body.get("cid") if isinstance(body, dict) else None
        if not (isinstance(body, dict) and isinstance(body.get("name"), str)
                and (cid is None or isinstance(cid, str))):  # fmt: skip
            raise ApiError(400, "bad_request", 'expected {"name": "...", "cid": "..."}')
        with answering(KEEP_FAILED):
            if body.get("remove") is True:
                return 200, {"removed": await self.node.keep("untag", body["name"])}
            version = await self.node.keep("tag", body["name"], cid)
        return 200, {"name": body["name"], **version.to_json()}

    async def maintenance(self, request: Request) -> tuple[int, Any]:
        """Run a maintenance pass now (thin, expire, collect, count); its report."""
        service = self.node.maintenance
        report = await service.run_now()  # after a pass in progress; reported as scheduled
        if report is None:
            failure = MAINTENANCE_FAILED
            raise ApiError(failure.status, str(failure.code), service.error or "failed",
                           failure.hint)  # fmt: skip
        return 200, report.to_json()

    async def metrics(self, request: Request) -> tuple[int, Any]:
        return 200, Text(self.node.metrics_text(), METRICS_CONTENT_TYPE)
