"""A running benchsync node: the wiring of every service around one data directory.

`Node` owns the local dataset (database, blocks, history, replicas), the
libp2p side (`P2PNode`), the query service, the snapshot policy, the control
API and the systemd notifications. `Node.run` is a trio service: it returns
`task_status.started(endpoints)` once the node listens and serves, and on
cancellation it stops taking work, lets in-flight writes finish, closes the
host and then the database.

All DuckDB and file work runs in worker threads (`trio.to_thread`); one trio
lock serialises the operations that replace the database file or the head
(snapshot, restore), so a restore never races a snapshot.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import trio
from multiformats import CID

from benchsync.daemon.answers import table_json
from benchsync.daemon.config import Config
from benchsync.daemon.control import (
    ApiError,
    ControlEndpoints,
    ControlServer,
    Request,
    Router,
    Text,
)
from benchsync.daemon.fetch import FetchLimits
from benchsync.daemon.host import check_listening
from benchsync.daemon.identity import load_or_create_identity, peer_id_of
from benchsync.daemon.metrics import Metrics
from benchsync.daemon.network import P2PNode
from benchsync.daemon.query import DistributedQueryError, QueryService
from benchsync.daemon.sdnotify import Notifier, run_watchdog
from benchsync.protocol.heads import Head, encode_head
from benchsync.protocol.planner import PlanError
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.errors import InvalidRecord, NotFound, StorageError
from benchsync.storage.migrate import migrate_files
from benchsync.storage.sandbox import QueryError
from benchsync.storage.snapshot import DiskFull, Version, read_version

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

POLICY_TICK = 0.5  # seconds between checks of the snapshot policy
DISK_FULL_RETRY = 60.0  # seconds: a snapshot paused by a full disk is retried at least this often
DISK_FREED_BYTES = 1024 * 1024  # bytes freed since the failure that make a paused snapshot retry
RECORD_KINDS = ("perf", "compat", "test")
MAX_RECORDS_PER_REQUEST = 100_000
VERSION = "0.1.0"


def head_of(version: Version) -> Head:
    """The announcement of one of our versions."""
    return Head(
        dataset=version.manifest.dataset,
        seq=version.seq,
        root=CID.decode(version.cid),
        tables=CID.decode(version.tables_cid),
        created_at=version.created_at,
        bytes=version.manifest.total_bytes,
    )


class _WriteCounter:
    """Rows written since the last snapshot; bumped from the DB writer thread."""

    def __init__(self) -> None:
        self.rows = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.rows += n

    def take(self) -> int:
        with self.lock:
            n, self.rows = self.rows, 0
            return n


@dataclass
class SnapshotPause:
    """Why scheduled snapshots are paused (a full disk), and what a retry waits for."""

    reason: str  # "disk_full"
    message: str
    since: float  # seconds since the epoch
    free_bytes: int  # free space measured after the last failure
    retried_at: float  # monotonic time of the last attempt


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class Node:
    """One benchsync node on one data directory. Start it with `nursery.start(node.run)`."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.home = Path(config.home)
        self.notifier = notifier or Notifier()
        self.peer_id = peer_id_of(load_or_create_identity(self.home))
        # The home lock, held until run() ends: one node (or offline writer) per home.
        self.dataset = LocalDataset(
            self.home,
            self.peer_id,
            memory_limit=f"{config.db_memory_limit // 2**20}MiB",
            exclusive=True,
        )
        try:
            self._setup(config)
        except BaseException:
            self.dataset.close()
            raise

    def _setup(self, config: Config) -> None:
        self.metrics = Metrics()
        self.metrics.set_identity(peer_id=self.peer_id, network=config.network, version=VERSION)
        self.p2p = P2PNode(
            self.home,
            network=config.network,
            blockstore=self.dataset.blocks,
            listen=list(config.listen),
            announce=list(config.announce),
            bootstrap=list(config.bootstrap),
            trusted_peers=set(config.trusted_peers),
            mdns=config.mdns,
            limits=FetchLimits(
                max_block=config.max_block_bytes,
                max_response=config.max_response_bytes,
                max_fetches_per_peer=config.max_concurrent_fetches_per_peer,
            ),
            reannounce_interval=config.reannounce_interval,
            max_followed=config.max_followed_datasets,
            on_complete=self._install_replica,
        )
        self.queries = QueryService(
            self.p2p,
            lambda: self.dataset.db,
            network=config.network,
            timeout_s=config.query_timeout,
            max_rows=config.query_max_rows,
            max_bytes=config.query_max_bytes,
            memory_limit=f"{max(16, config.query_memory_limit // 2**20)}MiB",
            replicas=self.dataset.replicas,
            dataset=self.peer_id,
        )
        self._writes = _WriteCounter()
        self.dataset.on_write.append(self._writes.add)
        self.dataset.on_write.append(self.metrics.writes.inc)
        self._head_lock = trio.Lock()  # snapshot and restore replace the head / the DB file
        self.snapshot_pause: SnapshotPause | None = None  # set while a full disk pauses snapshots
        self._last_snapshot = time.monotonic()
        self.endpoints: ControlEndpoints | None = None
        self._metric_marks: dict[str, int] = {}
        self.started_at = time.time()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(
        self, *, task_status: TaskStatus[ControlEndpoints] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            # Before anything listens: a damaged database stops the node here, not at
            # its first request (DuckDB reads most of the file lazily).
            await trio.to_thread.run_sync(self.dataset.check)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.p2p.run)
                check_listening(self.p2p.host, self.p2p.listen)  # py-libp2p only logs failures
                self.queries.register()
                head = await trio.to_thread.run_sync(self.dataset.head)
                if head is not None:
                    self.p2p.set_local_head(head_of(head))
                    self.metrics.head_seq.set(head.seq)
                server = ControlServer.from_config(self.router(), self.config)
                endpoints: ControlEndpoints = await nursery.start(server.run)
                self.endpoints = endpoints
                nursery.start_soon(self._snapshot_policy)
                if self.notifier.watchdog_interval:
                    await nursery.start(run_watchdog, self.notifier)
                log.info(
                    "node %s up: network=%s addrs=%s control=%s",
                    self.peer_id, self.config.network, " ".join(self.p2p.addrs),
                    endpoints.socket_path,
                )  # fmt: skip
                self.notifier.ready(self._status_line())
                task_status.started(endpoints)
                if head is not None:
                    await self.p2p.announce(head_of(head))
        finally:
            self.notifier.stopping("closing the database")
            with trio.CancelScope(shield=True):
                # Queued writes finish inside close(); it runs in a thread so the
                # (shielded) trio loop stays responsive to a second signal.
                await trio.to_thread.run_sync(self.dataset.close)
                self.queries.close()
            log.info("node %s stopped", self.peer_id)

    def _status_line(self) -> str:
        head = self.dataset.snapshots.head()
        paused = " snapshots=paused(disk full)" if self.snapshot_pause is not None else ""
        return (
            f"peers={len(self.p2p.connected_peers())} "
            f"head={head.seq if head else '-'} replicas={len(self.dataset.replicas.all())}"
            f"{paused}"
        )

    # --- snapshots ------------------------------------------------------------------------------

    async def _snapshot_policy(self) -> None:
        """Snapshot after N written rows and/or every T seconds when something changed.

        A full disk pauses the policy (status shows why) instead of failing the
        node: the unsnapshotted rows stay pending, and the snapshot is retried
        as soon as space was freed (or every DISK_FULL_RETRY seconds).
        """
        after = self.config.snapshot_after_writes
        every = self.config.snapshot_interval
        pending = 0
        while True:
            await trio.sleep(POLICY_TICK)
            pending += self._writes.take()
            if self.snapshot_pause is not None:
                if pending and await self._space_returned():
                    await self._scheduled_snapshot()
                    if self.snapshot_pause is None:
                        pending = 0
                continue
            due_by_count = after > 0 and pending >= after
            due_by_time = every > 0 and time.monotonic() - self._last_snapshot >= every
            if pending and (due_by_count or due_by_time):
                await self._scheduled_snapshot()
                if self.snapshot_pause is None:  # paused: the rows stay pending for the retry
                    pending = 0

    async def _scheduled_snapshot(self) -> None:
        try:
            await self.snapshot()
        except DiskFull:
            pass  # snapshot() paused the policy and logged it
        except StorageError as e:
            log.error("scheduled snapshot failed: %s", e)
        self.notifier.status(self._status_line())

    async def _space_returned(self) -> bool:
        """While paused by a full disk: is it time to retry?"""
        pause = self.snapshot_pause
        assert pause is not None
        if time.monotonic() - pause.retried_at >= DISK_FULL_RETRY:
            return True
        free = await trio.to_thread.run_sync(_free_bytes, self.home)
        return free >= pause.free_bytes + DISK_FREED_BYTES

    async def snapshot(self) -> tuple[Version, bool]:
        """Take a snapshot now; announce it if it is new. Returns (head, created).

        Raises DiskFull (and pauses the snapshot policy until space returns) or
        SnapshotError; the database and history are unchanged then.
        """
        async with self._head_lock:
            started = time.monotonic()
            try:
                result = await trio.to_thread.run_sync(self.dataset.snapshot)
            except DiskFull as e:
                await self._pause_snapshots(e)
                raise
            self._last_snapshot = time.monotonic()
        if self.snapshot_pause is not None:
            log.info("snapshots resumed: there is disk space again")
            self.snapshot_pause = None
        if result.created:
            self.metrics.snapshots.inc()
            self.metrics.snapshot_seconds.observe(time.monotonic() - started)
            self.metrics.head_seq.set(result.version.seq)
            log.info(
                "snapshot seq=%d cid=%s new_blocks=%d new_bytes=%d",
                result.version.seq, result.version.cid, result.new_blocks, result.new_bytes,
            )  # fmt: skip
            await self._announce(result.version)
        return result.version, result.created

    async def _pause_snapshots(self, e: DiskFull) -> None:
        free = await trio.to_thread.run_sync(_free_bytes, self.home)
        if self.snapshot_pause is None:
            log.error("snapshots paused, the node keeps serving: %s", e)
            self.snapshot_pause = SnapshotPause(
                reason="disk_full", message=str(e), since=time.time(),
                free_bytes=free, retried_at=time.monotonic(),
            )  # fmt: skip
        else:  # a failed retry: wait for more space than now
            self.snapshot_pause.message = str(e)
            self.snapshot_pause.free_bytes = free
            self.snapshot_pause.retried_at = time.monotonic()

    def snapshot_status(self) -> dict[str, Any]:
        """`status`'s "snapshots": "ok", or "paused" with why, since when and what waits."""
        pause = self.snapshot_pause
        if pause is None:
            return {"state": "ok"}
        return {
            "state": "paused", "reason": pause.reason, "error": pause.message,
            "since": pause.since, "free_bytes": pause.free_bytes,
            "hint": "free disk space (e.g. `benchsync gc`); snapshots resume by themselves",
        }  # fmt: skip

    async def restore(self, cid: str) -> Version:
        async with self._head_lock:
            version = await trio.to_thread.run_sync(self.dataset.restore, cid)
            self.queries.database_replaced()
        log.info("restored %s as seq=%d cid=%s", cid, version.seq, version.cid)
        await self._announce(version)
        return version

    async def _announce(self, version: Version) -> None:
        head = head_of(version)
        self.p2p.set_local_head(head)
        try:
            await self.p2p.announce(head)
            self.metrics.announced("sent", len(encode_head(head)))
        except Exception as e:  # gossip is lossy anyway; the periodic re-announce retries
            log.warning("announcing seq %d failed: %r", version.seq, e)

    async def _install_replica(self, head: Head) -> None:
        def install() -> Any:
            version = read_version(self.dataset.blocks, head.root)
            if version.manifest.dataset != head.dataset or version.seq != head.seq:
                raise StorageError(
                    f"snapshot {head.root} says dataset={version.manifest.dataset} "
                    f"seq={version.seq}, but was announced as {head.dataset} seq={head.seq}"
                )
            return self.dataset.install_replica(str(head.root))

        replica = await trio.to_thread.run_sync(install)
        log.info(
            "replica %s seq=%d installed (%d bytes)", replica.dataset, replica.seq, replica.bytes
        )

    # --- status ---------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What `benchsync status` shows. P2P state is read here, on the trio thread
        that owns it; only the database count runs in a worker thread."""
        # `db` waits while a restore swaps the file: resolve it in the thread too.
        rows = await trio.to_thread.run_sync(lambda: self.dataset.db.table_counts())
        head = self.dataset.snapshots.head()  # two small files
        replicas = self.replicas()
        return {
            "peer_id": self.peer_id,
            "network": self.config.network,
            "addrs": self.p2p.addrs,
            "control_socket": str(self.endpoints.socket_path) if self.endpoints else None,
            "head": head.cid if head else None,
            "head_seq": head.seq if head else None,
            "tables_cid": head.tables_cid if head else None,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "rows": rows,
            "snapshots": self.snapshot_status(),
            "trusted_peers": list(self.config.trusted_peers),
            "peers": self.peers(),
            "replicas": replicas,
            "transfers": [r["dataset"] for r in replicas if r["syncing"]],
            "received_bytes": self.p2p.fetcher.stats.block_bytes,
            "served_bytes": self.p2p.provider.served.block_bytes,
        }

    def peers(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.p2p.peers()]

    def replicas(self) -> list[dict[str, Any]]:
        """Per followed dataset: head seen and installed (CID, seq), bytes, lag, last error."""
        installed = {r.dataset: r for r in self.dataset.replicas.all()}
        out = []
        for state in self.p2p.replica_states():
            seen, got = state.head_seen, state.head_installed
            local = installed.pop(state.dataset, None)
            out.append({
                "dataset": state.dataset,
                "head_seen": str(seen.root) if seen else None,
                "seq_seen": seen.seq if seen else None,
                "head_installed": str(got.root) if got else (local.root if local else None),
                "seq_installed": got.seq if got else (local.seq if local else None),
                "bytes": state.bytes,
                "lag": state.lag_seq,
                "lag_seconds": round(state.lag_seconds, 3),
                "last_error": state.last_error,
                "syncing": state.syncing,
            })  # fmt: skip
            self.metrics.replica_lag.labels(state.dataset).set(state.lag_seq)
        for r in installed.values():  # installed by an earlier run, not heard of yet in this one
            out.append({
                "dataset": r.dataset, "head_seen": None, "seq_seen": None,
                "head_installed": r.root, "seq_installed": r.seq, "bytes": r.bytes,
                "lag": 0, "lag_seconds": 0.0, "last_error": None, "syncing": False,
            })  # fmt: skip
        return out

    # --- control API ------------------------------------------------------------------------------

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/v1/status", self._api_status)
        r.add("GET", "/v1/peers", self._api_peers)
        r.add("GET", "/v1/replicas", self._api_replicas)
        r.add("POST", "/v1/record/{kind}", self._api_record)
        r.add("POST", "/v1/query", self._api_query)
        r.add("POST", "/v1/snapshot", self._api_snapshot)
        r.add("GET", "/v1/history", self._api_history)
        r.add("POST", "/v1/restore", self._api_restore)
        r.add("POST", "/v1/migrate", self._api_migrate)
        if self.config.metrics:
            r.add("GET", "/metrics", self._api_metrics)
        return r

    async def _api_status(self, request: Request) -> tuple[int, Any]:
        return 200, await self.status()

    async def _api_peers(self, request: Request) -> tuple[int, Any]:
        return 200, {"peers": self.peers()}

    async def _api_replicas(self, request: Request) -> tuple[int, Any]:
        return 200, {"replicas": self.replicas()}

    async def _api_record(self, request: Request) -> tuple[int, Any]:
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
        def store_one(db: BenchmarkDB) -> int:
            store = {
                "perf": db.store_performance_result,
                "compat": db.store_hardware_compatibility,
                "test": db.store_integration_test_result,
            }[kind]
            return store(records[0])

        try:
            # `writing` (in the thread: it waits while a restore swaps the file) re-runs a
            # write the swap refused on the restored database; acknowledged means committed.
            if len(records) == 1:
                ident = await trio.to_thread.run_sync(self.dataset.writing, store_one)
                return 200, {"stored": 1, "id": ident}
            n = await trio.to_thread.run_sync(
                self.dataset.writing, lambda db: db.ingest_records(kind, records)
            )
            return 200, {"stored": n}
        except InvalidRecord as e:
            raise ApiError(
                422, "invalid_record", str(e), "fix the named field; nothing was written"
            ) from e
        except (TypeError, ValueError) as e:
            raise ApiError(422, "invalid_record", str(e), "nothing was written") from e
        except StorageError as e:  # e.g. WriteFailed on a full disk: the transaction rolled back
            raise ApiError(
                500, "write_failed", f"{type(e).__name__}: {e}",
                "nothing was written; check free disk space and the node's log, then retry",
            ) from e

    async def _api_query(self, request: Request) -> tuple[int, Any]:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            raise ApiError(
                400, "bad_request", 'expected {"sql": "...", "scope": "local|replicas|network"}'
            )
        scope = body.get("scope", "local")
        if scope not in ("local", "replicas", "network"):
            raise ApiError(400, "bad_scope", f"unknown scope {scope!r}",
                           "use local, replicas or network")  # fmt: skip
        params = body.get("params") or []
        with self.metrics.time_query(scope) as t:
            try:
                if scope == "network":
                    result = await self.queries.execute(
                        body["sql"], params, peers=body.get("peers"),
                        require_all=bool(body.get("require_all", False)),
                        timeout_s=body.get("timeout"),
                    )  # fmt: skip
                    return 200, result.to_json()
                # The same gate, sandbox worker and limits as a peer's query.
                table = await self.queries.query(body["sql"], params, scope=scope)
                return 200, {"scope": scope, **table_json(table)}
            except QueryError as e:  # refused, invalid SQL, limits
                t.outcome = e.kind if e.kind in ("refused", "timeout", "too_large") else "error"
                raise ApiError(400, e.kind, str(e), "only single read-only SELECTs run") from e
            except PlanError as e:
                t.outcome = "refused"
                raise ApiError(400, "cannot_distribute", str(e),
                               "rewrite it without the construct named above") from e  # fmt: skip
            except DistributedQueryError as e:  # require_all with missing peers, or no answer
                t.outcome = "error"
                raise ApiError(503, "peers_missing", str(e),
                               "retry, raise --timeout, or drop --require-all") from e  # fmt: skip
            except duckdb.Error as e:
                t.outcome = "error"
                raise ApiError(400, "query_failed", f"{type(e).__name__}: {e}",
                               "check the SQL; list tables with SHOW TABLES") from e  # fmt: skip
            except ValueError as e:
                t.outcome = "error"
                raise ApiError(400, "bad_request", str(e)) from e

    async def _api_snapshot(self, request: Request) -> tuple[int, Any]:
        try:
            version, created = await self.snapshot()
        except DiskFull as e:
            raise ApiError(
                507, "disk_full", str(e),
                "free disk space (e.g. `benchsync gc`); the database and history are unchanged",
            ) from e  # fmt: skip
        except StorageError as e:
            raise ApiError(
                500, "snapshot_failed", str(e), "the database and history are unchanged"
            ) from e
        return 200, version.to_json() | {"created": created}

    async def _api_history(self, request: Request) -> tuple[int, Any]:
        limit = request.query_int("limit", minimum=1)  # ApiError 400 unless 1..2^63-1
        versions = await trio.to_thread.run_sync(lambda: self.dataset.history(limit))
        return 200, {"versions": [v.to_json() for v in versions]}

    async def _api_restore(self, request: Request) -> tuple[int, Any]:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("cid"), str):
            raise ApiError(400, "bad_request", 'expected {"cid": "..."}', "see `benchsync log`")
        try:
            version = await self.restore(body["cid"])
        except NotFound as e:
            raise ApiError(404, "not_found", str(e), "list versions with `benchsync log`") from e
        except StorageError as e:
            raise ApiError(409, "restore_failed", str(e), "the live database is unchanged") from e
        return 200, version.to_json()

    async def _api_migrate(self, request: Request) -> tuple[int, Any]:
        """Migrate legacy files into the running node's dataset (the node owns the database)."""
        body = request.json()
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ApiError(400, "bad_request", 'expected {"paths": ["/abs/legacy.duckdb", ...]}',
                           "paths are read by the node's process: give absolute paths")  # fmt: skip
        backup, verify = bool(body.get("backup", True)), bool(body.get("verify", True))
        async with self._head_lock:
            before = await trio.to_thread.run_sync(self.dataset.head)
            results = await trio.to_thread.run_sync(
                lambda: migrate_files(self.dataset, paths, backup=backup, verify=verify)
            )
            head = await trio.to_thread.run_sync(self.dataset.head)
        if head is not None and (before is None or head.cid != before.cid):
            await self._announce(head)
        return 200, {"results": [r.to_json() for r in results], "ok": all(r.ok for r in results)}

    async def _api_metrics(self, request: Request) -> tuple[int, Any]:
        self._sync_metrics()
        self.replicas()  # refreshes the replica_lag gauges
        return 200, Text(self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    def _sync_metrics(self) -> None:
        """Fold the P2P services' own counters into the Prometheus ones (as deltas)."""
        m = self.metrics
        m.peers.set(len(self.p2p.connected_peers()))
        received, served = self.p2p.fetcher.stats, self.p2p.provider.served
        now = {
            "blocks_in": received.blocks, "bytes_in": received.block_bytes,
            "blocks_out": served.blocks, "bytes_out": served.block_bytes,
            "rejected": self.p2p.announcer.rejected, "bans": self.p2p.policy.bans_total,
        }  # fmt: skip
        delta = {k: v - self._metric_marks.get(k, 0) for k, v in now.items()}
        self._metric_marks = now
        m.fetch_blocks.labels("received").inc(delta["blocks_in"])
        m.fetch_bytes.labels("received").inc(delta["bytes_in"])
        m.fetch_blocks.labels("sent").inc(delta["blocks_out"])
        m.fetch_bytes.labels("sent").inc(delta["bytes_out"])
        for _ in range(delta["rejected"]):
            m.verification_failed("announcement")
        for _ in range(delta["bans"]):
            m.verification_failed("block")
