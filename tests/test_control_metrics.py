"""Prometheus metrics: per-node registries, label checks, query timing."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchsync.daemon.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed back: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_nodes_in_one_process_keep_separate_counts() -> None:
    a, b = Metrics(), Metrics()
    a.writes.inc(3)
    b.writes.inc(1)
    a.peers.set(2)
    assert samples(a)[("benchsync_records_written_total", ())] == 3
    assert samples(b)[("benchsync_records_written_total", ())] == 1
    assert samples(b)[("benchsync_peers", ())] == 0


def test_counts_and_bytes_by_direction() -> None:
    m = Metrics()
    m.set_identity(peer_id="12D3KooWtest", network="lab", version="0.1.0")
    m.announced("sent", 120)
    m.announced("sent", 80)
    m.fetched("received", "ok", blocks=4, nbytes=1_000_000)
    m.verification_failed("block")
    m.replica_lag.labels("12D3KooWpeer").set(2)
    s = samples(m)
    assert s[("benchsync_announcements_total", (("direction", "sent"),))] == 2
    assert s[("benchsync_announcement_bytes_total", (("direction", "sent"),))] == 200
    assert s[("benchsync_announcements_total", (("direction", "received"),))] == 0  # pre-created
    assert s[("benchsync_fetches_total", (("direction", "received"), ("outcome", "ok")))] == 1
    assert s[("benchsync_fetch_bytes_total", (("direction", "received"),))] == 1_000_000
    assert s[("benchsync_fetch_blocks_total", (("direction", "received"),))] == 4
    assert s[("benchsync_verification_failures_total", (("kind", "block"),))] == 1
    assert s[("benchsync_replica_lag", (("dataset", "12D3KooWpeer"),))] == 2
    info = (("network", "lab"), ("peer_id", "12D3KooWtest"), ("version", "0.1.0"))
    assert s[("benchsync_node_info", info)] == 1


def test_query_latency_by_scope_and_outcome() -> None:
    m = Metrics()
    m.observe_query("local", "ok", 0.003)
    with m.time_query("network") as t:
        t.outcome = "timeout"
    with pytest.raises(RuntimeError), m.time_query("replicas"):
        raise RuntimeError("query failed")
    s = samples(m)
    assert s[("benchsync_queries_total", (("outcome", "ok"), ("scope", "local")))] == 1
    assert s[("benchsync_queries_total", (("outcome", "timeout"), ("scope", "network")))] == 1
    assert s[("benchsync_queries_total", (("outcome", "error"), ("scope", "replicas")))] == 1
    le = (("le", "0.005"), ("outcome", "ok"), ("scope", "local"))
    assert s[("benchsync_query_duration_seconds_bucket", le)] == 1
    le = (("le", "0.001"), ("outcome", "ok"), ("scope", "local"))
    assert s[("benchsync_query_duration_seconds_bucket", le)] == 0


def test_unknown_label_values_are_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="scope='everywhere'"):
        m.observe_query("everywhere", "ok", 1.0)
    with pytest.raises(ValueError, match="direction"):
        m.announced("sideways", 1)
    assert not any(labels for name, labels in samples(m) if name == "benchsync_queries_total")


def test_fold_adds_what_the_services_counted_since_the_last_fold() -> None:
    from benchsync.daemon.metrics import NodeCounters

    m = Metrics()
    m.fold(NodeCounters(peers=2, blocks_received=3, bytes_received=300, blocks_sent=1,
                        bytes_sent=100, announcements_rejected=1, bans=0,
                        replica_lag={"12D3KooWpeer": 4}))  # fmt: skip
    m.fold(NodeCounters(peers=1, blocks_received=5, bytes_received=500, blocks_sent=1,
                        bytes_sent=100, announcements_rejected=3, bans=1,
                        replica_lag={"12D3KooWpeer": 0}))  # fmt: skip
    s = samples(m)
    assert s[("benchsync_peers", ())] == 1
    assert s[("benchsync_fetch_blocks_total", (("direction", "received"),))] == 5
    assert s[("benchsync_fetch_bytes_total", (("direction", "received"),))] == 500
    assert s[("benchsync_fetch_bytes_total", (("direction", "sent"),))] == 100
    assert s[("benchsync_verification_failures_total", (("kind", "announcement"),))] == 3
    assert s[("benchsync_verification_failures_total", (("kind", "block"),))] == 1
    assert s[("benchsync_replica_lag", (("dataset", "12D3KooWpeer"),))] == 0
