"""The node's Prometheus metrics.

Owns one `CollectorRegistry` per node (never prometheus_client's global one,
so that several nodes can run in one process, as the tests do), the metric
names and label sets, and the text exposition served at `GET /metrics` of the
control API. Services receive the `Metrics` object and update its attributes;
what the P2P services count themselves is read as a `NodeCounters` and folded
in (`Metrics.fold`) when the metrics are rendered. Label values are checked
against small fixed sets so that a bug cannot explode the number of time series.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

if TYPE_CHECKING:
    from benchsync.storage.dataset import MaintenanceReport

NAMESPACE = "benchsync"
QUERY_SCOPES = ("local", "replicas", "network")
QUERY_OUTCOMES = ("ok", "error", "timeout", "refused", "too_large")
DIRECTIONS = ("sent", "received")
VERIFICATION_KINDS = ("block", "announcement", "snapshot")
# Where the data directory's bytes are (`LocalDataset.disk_usage`).
DISK_KINDS = ("database", "history", "replicas", "other", "free")
VERSION_STATES = ("kept", "thinned")
# Latencies from a cached local aggregate (ms) to a slow network fan-out (s).
QUERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # s
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)  # seconds
# What `render` produces: prometheus_client's text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass(frozen=True)
class NodeCounters:
    """What the P2P services count themselves, read at one moment: running totals
    (since the node started) and the current peers and replica lags."""

    peers: int
    blocks_received: int
    bytes_received: int
    blocks_sent: int
    bytes_sent: int
    announcements_rejected: int
    bans: int
    replica_lag: Mapping[str, int]  # dataset -> versions behind its owner's announced head
    strangers_refused: int = 0  # streams and gossip refused because the peer is not in our lab


class Metrics:
    """Every metric of one node, registered in its own `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the exposition and no dashboard of ours uses them
        # (a process-wide switch in prometheus_client).
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.info = Info("node", "Identity of this node", namespace=ns, registry=r)
        # process_resident_memory_bytes, process_open_fds, ...: what a node that lives for
        # months must keep flat (issue 19); the standard names, so dashboards know them.
        ProcessCollector(registry=r)
        self.allocator = Info(
            "allocator", "Native memory allocators of this process (arrow_pool: Arrow's "
            "default pool)", namespace=ns, registry=r,
        )  # fmt: skip
        self.arrow_bytes = Gauge(
            "arrow_allocated_bytes", "Bytes allocated by Arrow's default pool now",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.writes = Counter(
            "records_written", "Records written to the local dataset", namespace=ns, registry=r
        )
        self.snapshots = Counter(
            "snapshots", "Snapshots taken (a new version of the local dataset)",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.snapshot_seconds = Histogram(
            "snapshot_duration_seconds", "Time to export and store one snapshot",
            namespace=ns, registry=r, buckets=SNAPSHOT_BUCKETS,
        )  # fmt: skip
        self.head_seq = Gauge(
            "head_seq", "Sequence number of the local dataset's head", namespace=ns, registry=r
        )
        self.announcements = Counter(
            "announcements", "Head announcements", ["direction"], namespace=ns, registry=r
        )
        self.announcement_bytes = Counter(
            "announcement_bytes", "Bytes of head announcements", ["direction"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.fetches = Counter(
            "fetches", "Snapshot fetches (sent = served to a peer, received = from a peer)",
            ["direction", "outcome"], namespace=ns, registry=r,
        )  # fmt: skip
        self.fetch_bytes = Counter(
            "fetch_bytes", "Block bytes transferred by fetches", ["direction"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.fetch_blocks = Counter(
            "fetch_blocks", "Blocks transferred by fetches", ["direction"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.verification_failures = Counter(
            "verification_failures", "Data from peers that failed verification", ["kind"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.strangers_refused = Counter(
            "strangers_refused", "Streams and gossip refused because the peer is not in our lab",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.peers = Gauge("peers", "Connected peers", namespace=ns, registry=r)
        self.replica_lag = Gauge(
            "replica_lag", "Versions a replica is behind the head its owner announced",
            ["dataset"], namespace=ns, registry=r,
        )  # fmt: skip
        self.queries = Counter(
            "queries", "Queries answered", ["scope", "outcome"], namespace=ns, registry=r
        )
        self.query_seconds = Histogram(
            "query_duration_seconds", "Query latency", ["scope", "outcome"],
            namespace=ns, registry=r, buckets=QUERY_BUCKETS,
        )  # fmt: skip
        self.disk_bytes = Gauge(
            "disk_bytes", "Bytes of the data directory by kind (free: of its file system)",
            ["kind"], namespace=ns, registry=r,
        )  # fmt: skip
        self.disk_budget = Gauge(
            "disk_budget_bytes", "The disk_budget setting (0: none)", namespace=ns, registry=r
        )
        self.over_budget = Gauge(
            "disk_over_budget", "1 when the data directory stays over its budget though "
            "thinned to the minimum", namespace=ns, registry=r,
        )  # fmt: skip
        self.versions = Gauge(
            "history_versions", "Versions of the own history (kept: restorable)", ["state"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.maintenance_passes = Counter(
            "maintenance_passes", "Maintenance passes (thinning, replica expiry, block GC)",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.gc_freed_bytes = Counter(
            "gc_freed_bytes", "Bytes of blocks deleted by maintenance", namespace=ns, registry=r
        )
        for kind in DISK_KINDS:
            self.disk_bytes.labels(kind)
        for state in VERSION_STATES:
            self.versions.labels(state)
        # Pre-create the fixed label sets so that dashboards see zeros, not gaps.
        for d in DIRECTIONS:
            self.announcements.labels(d)
            self.announcement_bytes.labels(d)
            self.fetch_bytes.labels(d)
            self.fetch_blocks.labels(d)
        for k in VERIFICATION_KINDS:
            self.verification_failures.labels(k)
        self._folded = NodeCounters(0, 0, 0, 0, 0, 0, 0, {})  # the totals last folded in

    # --- recording helpers (check label values) -----------------------------

    def set_identity(self, *, peer_id: str, network: str, version: str) -> None:
        self.info.info({"peer_id": peer_id, "network": network, "version": version})

    def announced(self, direction: str, nbytes: int) -> None:
        """Count one announcement sent or received, of `nbytes` bytes."""
        _check("direction", direction, DIRECTIONS)
        self.announcements.labels(direction).inc()
        self.announcement_bytes.labels(direction).inc(nbytes)

    def fetched(self, direction: str, outcome: str, *, blocks: int, nbytes: int) -> None:
        """Count one fetch (sent = served to a peer) and the blocks and bytes it moved."""
        _check("direction", direction, DIRECTIONS)
        _check("outcome", outcome, QUERY_OUTCOMES)
        self.fetches.labels(direction, outcome).inc()
        self.fetch_blocks.labels(direction).inc(blocks)
        self.fetch_bytes.labels(direction).inc(nbytes)

    def verification_failed(self, kind: str) -> None:
        _check("kind", kind, VERIFICATION_KINDS)
        self.verification_failures.labels(kind).inc()

    def observe_query(self, scope: str, outcome: str, seconds: float) -> None:
        """Count one query and its latency."""
        _check("scope", scope, QUERY_SCOPES)
        _check("outcome", outcome, QUERY_OUTCOMES)
        self.queries.labels(scope, outcome).inc()
        self.query_seconds.labels(scope, outcome).observe(seconds)

    @contextlib.contextmanager
    def time_query(self, scope: str) -> Iterator[QueryTimer]:
        """Time the `with` body as one query; outcome "ok", or "error" if it raises.

        Set `timer.outcome` inside the body for another outcome (e.g. "timeout").
        """
        timer = QueryTimer()
        start = time.perf_counter()
        try:
            yield timer
        except BaseException:
            if timer.outcome == "ok":
                timer.outcome = "error"
            raise
        finally:
            self.observe_query(scope, timer.outcome, time.perf_counter() - start)

    def fold(self, now: NodeCounters) -> None:
        """Set the gauges to `now`, and raise the counters by how much the services'
        totals grew since the last fold (a total never shrinks while a node runs)."""
        last, self._folded = self._folded, now
        self.peers.set(now.peers)
        for dataset, lag in now.replica_lag.items():
            self.replica_lag.labels(dataset).set(lag)
        # A dataset no longer followed (it left the lab, its replica expired) loses its
        # series: over months, every dataset ever seen would otherwise stay, at its last lag.
        for dataset in set(last.replica_lag) - set(now.replica_lag):
            with contextlib.suppress(KeyError):  # a dataset of an earlier fold only
                self.replica_lag.remove(dataset)
        def grown(field: str) -> int:
            return max(0, getattr(now, field) - getattr(last, field))

        self.fetch_blocks.labels("received").inc(grown("blocks_received"))
        self.fetch_bytes.labels("received").inc(grown("bytes_received"))
        self.fetch_blocks.labels("sent").inc(grown("blocks_sent"))
        self.fetch_bytes.labels("sent").inc(grown("bytes_sent"))
        self.verification_failures.labels("announcement").inc(grown("announcements_rejected"))
        self.verification_failures.labels("block").inc(grown("bans"))
        self.strangers_refused.inc(grown("strangers_refused"))

    def maintained(self, report: MaintenanceReport) -> None:
        """Take in one maintenance pass's report: disk usage, versions, freed bytes."""
        usage = report.usage
        for kind, value in (("history", usage.history_bytes), ("replicas", usage.replica_bytes),
                            ("other", usage.other_bytes)):  # fmt: skip
            self.disk_bytes.labels(kind).set(value)
        self.disk_now(usage.database_bytes, usage.free_bytes)
        self.disk_budget.set(report.budget or 0)
        self.over_budget.set(1 if report.over_budget else 0)
        self.versions.labels("kept").set(report.kept)
        self.versions.labels("thinned").set(report.thinned)
        self.maintenance_passes.inc()
        self.gc_freed_bytes.inc(report.freed_bytes)

    def disk_now(self, database_bytes: int, free_bytes: int) -> None:
        """The two disk figures cheap enough to measure at every scrape."""
        self.disk_bytes.labels("database").set(database_bytes)
        self.disk_bytes.labels("free").set(free_bytes)

    def memory_now(self) -> None:
        """Arrow's pool, read at a scrape (reading it makes Arrow pick its default pool:
        never before the node's allocators are set, `benchsync.daemon.cli.up`)."""
        import pyarrow as pa

        pool = pa.default_memory_pool()
        self.allocator.info({"arrow_pool": pool.backend_name})
        self.arrow_bytes.set(pool.bytes_allocated())

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this node."""
        self.memory_now()
        return generate_latest(self.registry)


class QueryTimer:
    """What `Metrics.time_query` yields: set `outcome` to report something other than "ok"."""

    def __init__(self) -> None:
        self.outcome = "ok"


def _check(label: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"metric label {label}={value!r}; expected one of {allowed}")

