"""A running benchsync node: the wiring of every service around one data directory.

`Node` owns the local dataset (database, blocks, history, replicas), the
libp2p side (`P2PNode`), the query service, the snapshot policy
(`SnapshotPolicy`), disk maintenance (`Maintenance`: history retention,
replica expiry, block GC, accounting), the control server and the systemd
notifications, and
offers the operations the control API's routes (`benchsync.daemon.api`) call:
`status`, `record_one`/`record_many`, `snapshot`, `history`, `restore`,
`migrate`, `metrics_text`. `Node.run` is a trio service: it returns
`task_status.started(endpoints)` once the node listens and serves, and on
cancellation it stops taking work, lets in-flight writes finish, closes the
host and then the database.

All DuckDB and file work runs in worker threads (`trio.to_thread`); one trio
lock serialises the operations that replace the database file or the head
(snapshot, restore, migrate), so a restore never races a snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from multiformats import CID

from benchsync import __version__
from benchsync.daemon.config import Config, ConfigError
from benchsync.daemon.control import ControlEndpoints, ControlServer, Router
from benchsync.daemon.fetch import FetchLimits
from benchsync.daemon.host import check_listening
from benchsync.daemon.identity import load_or_create_identity, peer_id_of
from benchsync.daemon.lab import LabKeyError, load_lab_keys
from benchsync.daemon.maintenance import Maintenance
from benchsync.daemon.metrics import Metrics, NodeCounters
from benchsync.daemon.network import GetFailed, GetResult, P2PNode
from benchsync.daemon.query import QueryService
from benchsync.daemon.sdnotify import Notifier, run_watchdog
from benchsync.daemon.snapshot_policy import SnapshotPolicy
from benchsync.protocol.heads import Head, encode_head
from benchsync.storage.cid import InvalidCID, parse_cid_text
from benchsync.storage.dataset import LocalDataset, MaintenanceReport, RestoreError
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.errors import StorageError
from benchsync.storage.migrate import MigrationResult, migrate_files
from benchsync.storage.retention import RetentionPolicy
from benchsync.storage.snapshot import (
    DiskFull,
    Version,
    read_version,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

# A DAG fetched by `get` is kept from block GC this long without a pin, so that the
# command can write it out (and a user pin it) after the node fetched it.
GET_KEEP = 3600.0  # seconds


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


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _lab_settings(config: Config) -> dict[str, Any]:
    """P2PNode's lab arguments from the settings; a bad key file is a `ConfigError`."""
    try:
        keys = load_lab_keys(config.home, config.lab_key, config.lab_key_next)
    except LabKeyError as e:
        nxt = config.lab_key_next
        name = "lab_key_next" if nxt and nxt in e.message else "lab_key"
        raise ConfigError(name, getattr(config, name), e.message,
                          source=config.sources.get(name, ""), hint=e.hint) from None
    return {"lab_key": keys[0], "lab_key_next": keys[1] if len(keys) > 1 else None,
            "open": config.open, "open_queries": config.open_queries}


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
        self.metrics.set_identity(peer_id=self.peer_id, network=config.network, version=__version__)
        self.p2p = P2PNode(
            self.home,
            network=config.network,
            blockstore=self.dataset.blocks,
            listen=list(config.listen),
            announce=list(config.announce),
            bootstrap=list(config.bootstrap),
            trusted_peers=set(config.trusted_peers),
            **_lab_settings(config),
            bitswap_serve=config.bitswap_serve,
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
        # Replica leaves are received once, into their content-addressed files (issue 14).
        self.p2p.syncer.placement = lambda h: self.dataset.replica_placement(h.dataset, h.root)
        self.queries = QueryService(
            self.p2p,
            lambda: self.dataset.db,
            network=config.network,
            timeout_s=config.query_timeout,
            max_rows=config.query_max_rows,
            max_bytes=config.query_max_bytes,
            memory_limit=f"{config.query_memory_limit // 2**20}MiB",  # >= 16 MiB by the setting
            replicas=self.dataset.replicas,
            dataset=self.peer_id,
            ship_max_bytes=config.query_ship_max_bytes,
        )
        self.snapshot_policy = SnapshotPolicy(
            self.snapshot,
            lambda: trio.to_thread.run_sync(_free_bytes, self.home),
            after_writes=config.snapshot_after_writes,
            interval=config.snapshot_interval,
            on_change=lambda: self.notifier.status(self._status_line()),
        )
        self.maintenance = Maintenance(
            self.maintain, interval=config.maintenance_interval,
            on_report=self.metrics.maintained,
        )  # fmt: skip
        self.dataset.on_write.append(self.snapshot_policy.wrote)
        self.dataset.on_write.append(self.metrics.writes.inc)
        self._head_lock = trio.Lock()  # snapshot, restore and migrate replace the head / the DB
        self._got: dict[str, float] = {}  # root fetched by `get` -> when (monotonic), GET_KEEP
        self.gets: dict[str, dict[str, Any]] = {}  # root -> progress of a `get` running now
        self.endpoints: ControlEndpoints | None = None
        self.web_address: tuple[str, int] | None = None  # the dashboard's, once it listens
        self.started_at = time.time()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(
        self,
        router: Router | None = None,
        *,
        task_status: TaskStatus[ControlEndpoints] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the node until cancelled, serving `router` on the control API (default:
        `benchsync.daemon.api.control_router(self)`).

        `task_status.started()` gets the control API's endpoints once the node
        listens and serves. Raises before that if the database is damaged
        (DatabaseDamaged) or a listener cannot be opened (ListenError,
        ControlSocketError); the database is closed either way.
        """
        from benchsync.daemon.web import web_server

        if router is None:
            from benchsync.daemon.api import control_router

            router = control_router(self)
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
                server = ControlServer.from_config(router, self.config)
                endpoints: ControlEndpoints = await nursery.start(server.run)
                self.endpoints = endpoints
                web = web_server(self)  # the dashboard, when web_listen is set
                if web is not None:
                    self.web_address = await nursery.start(web.run)
                await nursery.start(self.snapshot_policy.run)
                await nursery.start(self.maintenance.run)
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
        paused = " snapshots=paused(disk full)" if self.snapshot_policy.pause is not None else ""
        report = self.maintenance.last
        budget = " disk=over-budget" if report is not None and report.over_budget else ""
        return (
            f"peers={len(self.p2p.connected_peers())} "
            f"head={head.seq if head else '-'} replicas={len(self.dataset.replicas.all())}"
            f"{paused}{budget}"
        )

    # --- writes ---------------------------------------------------------------------------------

    async def record_one(self, kind: str, record: Mapping[str, Any]) -> int:
        """Store one record of `kind` ("perf", "compat", "test"); its id once committed.

        Raises InvalidRecord (nothing written), StorageError (e.g. WriteFailed
        on a full disk: the transaction rolled back).
        """
        def store(db: BenchmarkDB) -> int:
            return {
                "perf": db.store_performance_result,
                "compat": db.store_hardware_compatibility,
                "test": db.store_integration_test_result,
            }[kind](record)

        # `writing` (in the thread: it waits while a restore swaps the file) re-runs a
        # write the swap refused on the restored database; acknowledged means committed.
        return await trio.to_thread.run_sync(self.dataset.writing, store)

    async def record_many(self, kind: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Store `records` of `kind` in one transaction; how many. Raises as `record_one`."""
        return await trio.to_thread.run_sync(
            self.dataset.writing, lambda db: db.ingest_records(kind, records)
        )

    # --- versions -------------------------------------------------------------------------------

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
                await self.snapshot_policy.disk_full(e)
                raise
            self.snapshot_policy.succeeded()
        if result.created:
            self.metrics.snapshots.inc()
            self.metrics.snapshot_seconds.observe(time.monotonic() - started)
            self.metrics.head_seq.set(result.version.seq)
            log.info(
                "snapshot seq=%d cid=%s new_blocks=%d new_bytes=%d",
                result.version.seq, result.version.cid, result.new_blocks, result.new_bytes,
            )  # fmt: skip
            await self._announce(result.version)
            self.maintenance.changed(result.new_bytes)
        return result.version, result.created

    async def history(self, limit: int | None = None) -> list[Version]:
        """Our versions, newest first, at most `limit` of them."""
        return await trio.to_thread.run_sync(lambda: self.dataset.history(limit))

    async def restore(self, cid: str) -> Version:
        """Make version `cid`'s content current as a new head, and announce it.

        `cid` is a version of ours (CID, prefix or tag) or any snapshot's root
        CID: blocks missing here are fetched from peers first (`get`). Raises
        NotFound (no such version here and not a CID), RestoreError (missing
        blocks no peer could give) or StorageError (the live database is
        unchanged).
        """
        await self._fetch_for_restore(cid)
        async with self._head_lock:
            version = await trio.to_thread.run_sync(self.dataset.restore, cid)
            self.queries.database_replaced()
        log.info("restored %s as seq=%d cid=%s", cid, version.seq, version.cid)
        await self._announce(version)
        return version

    async def _fetch_for_restore(self, name: str) -> None:
        """Fetch the blocks of the snapshot `name` names that are missing here, if any."""
        def resolve() -> CID | None:
            try:
                return CID.decode(self.dataset.find(name).cid)
            except StorageError:  # not in the history, or its root block is missing
                try:
                    return parse_cid_text(name)
                except InvalidCID:
                    return None  # neither: dataset.restore says NotFound

        root = await trio.to_thread.run_sync(resolve)
        if root is None or not await self.p2p.fetcher.missing(root, limit=1):
            return
        log.info("restore %s: fetching its missing blocks from peers", root)
        try:
            await self.get(str(root))
        except GetFailed as e:
            if str(root) in await trio.to_thread.run_sync(self.dataset.thinned):
                return  # dataset.restore says why: history retention deleted its tables
            raise RestoreError(
                f"snapshot {root} is incomplete here and no peer could give its missing "
                f"blocks: {e}"
            ) from e

    async def get(self, cid: str, peers: Sequence[str] = ()) -> GetResult:
        """Make the DAG under `cid` present here, from peers (`P2PNode.get`); `peers` (full
        multiaddrs) are dialed and asked first. Kept from GC for GET_KEEP seconds
        (pin it to keep it for good). Raises ValueError (not a CID), HostConfigError (a
        bad address), GetFailed, StorageError."""
        root = parse_cid_text(cid)
        key = str(root)
        self._got[key] = time.monotonic()  # before fetching: a partial DAG is kept too
        state = self.gets.setdefault(key, {"cid": key, "blocks": 0, "bytes": 0, "callers": 0})
        state["callers"] += 1

        def progress(nbytes: int) -> None:
            state["bytes"] += nbytes

        try:
            result = await self.p2p.get(root, dial=list(peers), progress=progress)
        finally:
            state["callers"] -= 1
            if not state["callers"]:
                del self.gets[key]
            self._got[key] = time.monotonic()
        if result.bytes:
            self.maintenance.changed(result.bytes)
        return result

    def _kept_gets(self) -> list[CID]:
        now = time.monotonic()
        for root in [r for r, t in self._got.items() if now - t > GET_KEEP]:
            del self._got[root]
        return [CID.decode(r) for r in self._got]

    async def migrate(
        self, paths: Sequence[str], *, backup: bool, verify: bool
    ) -> list[MigrationResult]:
        """Migrate legacy database files into our dataset (the node owns the database);
        one result per path. A new head is announced."""
        async with self._head_lock:
            before = await trio.to_thread.run_sync(self.dataset.head)
            results = await trio.to_thread.run_sync(
                lambda: migrate_files(self.dataset, list(paths), backup=backup, verify=verify)
            )
            head = await trio.to_thread.run_sync(self.dataset.head)
        if head is not None and (before is None or head.cid != before.cid):
            await self._announce(head)
        return results

    async def maintain(self) -> MaintenanceReport:
        """One maintenance pass (`LocalDataset.maintain`) in a worker thread: thin the
        history, expire replicas that left the lab, delete unreferenced blocks, count
        the disk. Heads being fetched are kept; datasets whose owner is connected
        count as seen. Raises StorageError."""
        states = self.p2p.replica_states()
        fetching = [s.head_seen.root for s in states if s.head_seen is not None]
        fetching += self._kept_gets()  # DAGs `get` fetched, until pinned or GET_KEEP passed
        connected = set(self.p2p.connected_peers())
        seen = [s.dataset for s in states if s.dataset in connected]
        policy = RetentionPolicy(self.config.history_retention, self.config.history_interval)
        return await trio.to_thread.run_sync(
            lambda: self.dataset.maintain(
                policy, budget=self.config.disk_budget, extra_keep=fetching, seen=seen,
                replica_expiry=self.config.replica_expiry,
            )
        )  # fmt: skip

    async def keep(self, action: str, name: str, cid: str | None = None) -> Any:
        """Pins and tags: "pin" / "unpin" a CID, "tag" NAME [CID] / "untag" NAME.

        Returns the pinned root, the tagged version or whether something was
        removed. Raises NotFound, BadTag, RestoreError (a thinned version)."""
        ds = self.dataset
        calls = {
            "pin": lambda: ds.pin_version(name),
            "unpin": lambda: ds.unpin(name),
            "tag": lambda: ds.tag(name, cid),
            "untag": lambda: ds.untag(name),
        }
        return await trio.to_thread.run_sync(calls[action])

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
        self.maintenance.changed(replica.bytes)
        log.info(
            "replica %s seq=%d installed (%d bytes)", replica.dataset, replica.seq, replica.bytes
        )

    # --- state ----------------------------------------------------------------------------------

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
            "snapshots": self.snapshot_policy.status(),
            "disk": await self.disk_status(),
            "trusted_peers": list(self.config.trusted_peers),
            "peers": self.peers(),
            "dials": self.p2p.dial_states(),  # known peers not connected: last error, next retry
            "replicas": replicas,
            "transfers": [r["dataset"] for r in replicas if r["syncing"]],
            "received_bytes": self.p2p.fetcher.stats.block_bytes,
            "served_bytes": self.p2p.provider.served.block_bytes,
            "bitswap": dataclasses.asdict(self.p2p.bitswap.stats),
            "gets": list(self.gets.values()),
        }

    async def disk_status(self) -> dict[str, Any]:
        """`status`'s "disk": the last maintenance pass's accounting (history, replicas,
        blocks) with the database size and free space measured now."""
        db, free = await trio.to_thread.run_sync(
            lambda: (self.dataset.database_bytes(), _free_bytes(self.home))
        )
        return self.maintenance.status(database_bytes=db, free_bytes=free)

    def peers(self) -> list[dict[str, Any]]:
        """Connected and known peers, as `status` and `peers` show them."""
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
        for r in installed.values():  # installed by an earlier run, not heard of yet in this one
            out.append({
                "dataset": r.dataset, "head_seen": None, "seq_seen": None,
                "head_installed": r.root, "seq_installed": r.seq, "bytes": r.bytes,
                "lag": 0, "lag_seconds": 0.0, "last_error": None, "syncing": False,
            })  # fmt: skip
        return out

    def counters(self) -> NodeCounters:
        """What the P2P services have counted so far, for the metrics."""
        received, served = self.p2p.fetcher.stats, self.p2p.provider.served
        return NodeCounters(
            peers=len(self.p2p.connected_peers()),
            blocks_received=received.blocks, bytes_received=received.block_bytes,
            blocks_sent=served.blocks, bytes_sent=served.block_bytes,
            announcements_rejected=self.p2p.announcer.rejected,
            bans=self.p2p.policy.bans_total,
            strangers_refused=self.p2p.lab.strangers_refused,
            replica_lag={s.dataset: s.lag_seq for s in self.p2p.replica_states()},
        )  # fmt: skip

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this node's metrics, brought up to date."""
        self.metrics.fold(self.counters())
        self.metrics.disk_now(self.dataset.database_bytes(), _free_bytes(self.home))
        return self.metrics.render()
