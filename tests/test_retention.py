"""History retention, pins, tags, replica expiry and block GC of a dataset, on real files.

Versions are stamped by a fake clock (seconds apart), so a retention of
seconds thins them exactly; `maintain(now=...)` is told the time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from multiformats import CID
from test_snapshot import DATASET, fill

from benchsync.storage import replicas, retention, snapshot
from benchsync.storage.dataset import LocalDataset, RestoreError
from benchsync.storage.errors import NotFound
from benchsync.storage.retention import BadTag, RetentionPolicy
from benchsync.storage.snapshot import Manifest, Version, dag_blocks, missing_blocks

PEER = "12D3KooWPeerDatasetBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
T0 = 1_800_000_000.0  # seconds since the epoch: the first version's time
POLICY = RetentionPolicy(retention=10.0, interval=5.0)  # seconds, as a test node sets them
DAY = 86400.0  # seconds


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(snapshot, "time", SimpleNamespace(time=c.time))
    monkeypatch.setattr(replicas, "time", SimpleNamespace(time=c.time))  # installed_at
    return c


def write_and_snapshot(ds: LocalDataset, clock: Clock, n: int, *, every: float = 1.0) -> None:
    """n writes, each followed by a snapshot, `every` seconds apart."""
    for _ in range(n):
        start = sum(ds.db.table_counts().values())
        fill(ds, start, 300)
        assert ds.snapshot().created
        clock.now += every


def kept_and_thinned(ds: LocalDataset) -> tuple[list[Version], list[Version]]:
    gone = ds.thinned()
    history = ds.history()
    return [v for v in history if v.cid not in gone], [v for v in history if v.cid in gone]


def fake_version(i: int, created_at: float) -> Version:
    m = Manifest(dataset=DATASET, seq=i, parent=None, created_at=created_at, schema_version=3)
    return Version(cid=f"root{i}", tables_cid=f"tables{i}", manifest=m)


# --- the rule, without files ---------------------------------------------------------------


def test_plan_keeps_recent_thins_old_to_one_per_interval() -> None:
    history = [fake_version(i, T0 + i) for i in range(30, 0, -1)]  # newest first, 1 s apart
    now = T0 + 30
    plan = retention.plan(history, now, POLICY)
    kept = {v.seq for v in plan.keep}
    # Newer than 10 s: seqs 20..30; older: the newest of each 5 s bucket
    # (buckets are aligned to multiples of 5 s of the epoch: T0 is one).
    assert {20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30} <= kept
    assert kept - set(range(20, 31)) == {19, 14, 9, 4}
    assert {v.seq for v in plan.thin} == set(range(1, 31)) - kept
    # Pins and tags (protected) and the head survive any age; thinned stays thinned.
    later = retention.plan(history, now + 1000, POLICY, protected={"root2"},
                           thinned={"root9", "root2"})  # fmt: skip
    # (9 thinned earlier: 8 is the newest left in its bucket)
    assert {v.seq for v in later.keep} == {30, 2, 29, 24, 19, 14, 8, 4}
    assert [v.seq for v in later.thinned] == [9]


def test_tighten_thins_oldest_first_never_protected() -> None:
    history = [fake_version(i, T0 + i) for i in range(5, 0, -1)]
    plan = retention.plan(history, T0 + 5, RetentionPolicy(retention=100, interval=1),
                          protected={"root1"})  # fmt: skip
    blocks = {f"root{i}": {f"b{i}"} for i in range(1, 6)}
    sizes = {f"b{i}": 100 for i in range(1, 6)}
    held, fits = retention.tighten(plan, lambda v: blocks[v.cid], sizes, 50, budget=350)
    assert fits and held == 300
    assert [v.seq for v in plan.thin] == [2, 3]  # oldest unprotected first; 1 is pinned
    held, fits = retention.tighten(plan, lambda v: blocks[v.cid], sizes, 50, budget=10)
    assert not fits and {v.seq for v in plan.keep} == {5, 1}  # the head and the pin stay


def test_tag_names_are_checked() -> None:
    for bad in ("", "-x", "a b", "bafybeigdyr", "QmFoo", "x" * 65, "../x"):
        with pytest.raises(BadTag):
            retention.check_tag(bad)
    assert retention.check_tag("paper-v1.2_final") == "paper-v1.2_final"


# --- a dataset that snapshots on every write --------------------------------------------------


def test_history_thins_as_time_passes_and_kept_versions_restore(
    tmp_path: Path, clock: Clock
) -> None:
    with LocalDataset(tmp_path / "home", DATASET) as ds:
        write_and_snapshot(ds, clock, 30)
        all_versions = ds.history()
        assert len(all_versions) == 30
        blocks_before = sum(1 for _ in ds.blocks.cids())
        pinned, tagged = all_versions[-2], all_versions[-4]  # seq 2 and 4: old
        ds.pin_version(pinned.cid)
        ds.tag("baseline", tagged.cid)

        report = ds.maintain(POLICY, now=clock.now)
        kept, thinned = kept_and_thinned(ds)
        assert report.versions == 30 and report.kept == len(kept)
        assert report.thinned_now == len(thinned) == 30 - len(kept) > 10
        assert {pinned.cid, tagged.cid, all_versions[0].cid} <= {v.cid for v in kept}
        # Thinned versions keep their manifest (the chain is whole) but not their tables.
        assert len(ds.history()) == 30
        for v in thinned:
            assert not ds.blocks.has(CID.decode(v.tables_cid))
            assert ds.blocks.has(CID.decode(v.cid))
        for v in kept:
            assert missing_blocks(ds.blocks, CID.decode(v.cid)) == []
        blocks_after = sum(1 for _ in ds.blocks.cids())
        assert report.removed_blocks == blocks_before - blocks_after > 0

        # As time passes, the recent versions age into the thinned zone.
        clock.now += 60
        later = ds.maintain(POLICY, now=clock.now)
        kept2, thinned2 = kept_and_thinned(ds)
        assert len(kept2) < len(kept) and later.thinned_now == len(kept) - len(kept2)
        assert {pinned.cid, tagged.cid, all_versions[0].cid} <= {v.cid for v in kept2}
        assert sum(1 for _ in ds.blocks.cids()) < blocks_after
        # The usage adds up: every block is own history (no replicas here).
        assert later.usage.history_bytes == later.usage.blocks_bytes == ds.blocks.total_bytes()

        # Every kept version restores, by CID, and the tag by name; thinned ones refuse.
        for v in kept2:
            restored = ds.restore(v.cid)
            assert restored.manifest.digests() == v.manifest.digests()
        assert ds.restore("baseline").tables_cid == tagged.tables_cid
        with pytest.raises(RestoreError, match="thinned by history retention"):
            ds.restore(thinned2[-1].cid)
        with pytest.raises(RestoreError, match="thinned"):
            ds.pin_version(thinned2[-1].cid)


def test_unpinned_and_untagged_versions_are_thinned_again(tmp_path: Path, clock: Clock) -> None:
    with LocalDataset(tmp_path / "home", DATASET) as ds:
        write_and_snapshot(ds, clock, 8)
        first = ds.history()[-1]
        ds.tag("first", first.cid)
        ds.pin_version("first")
        assert set(ds.pins()) == {first.cid} and ds.find("first").cid == first.cid
        ds.maintain(POLICY, now=clock.now + DAY)
        assert first.cid not in ds.thinned()
        assert ds.unpin("first") and not ds.unpin(first.cid)
        ds.maintain(POLICY, now=clock.now + DAY)
        assert first.cid not in ds.thinned()  # still tagged
        assert ds.untag("first") and not ds.untag("first")
        ds.maintain(POLICY, now=clock.now + DAY)
        assert first.cid in ds.thinned()
        with pytest.raises(NotFound):
            ds.find("first")


def test_disk_budget_thins_to_the_minimum_and_says_when_it_cannot_fit(
    tmp_path: Path, clock: Clock
) -> None:
    with LocalDataset(tmp_path / "home", DATASET) as ds:
        write_and_snapshot(ds, clock, 12)
        ds.tag("keep", ds.history()[-1].cid)
        ds.maintain(POLICY, now=clock.now)  # the rule alone
        roomy = ds.maintain(POLICY, now=clock.now, budget=10**12)
        assert not roomy.over_budget and roomy.thinned_now == 0  # a roomy budget thins no more
        # A budget a little above the database and the newest version's tables.
        usage = roomy.usage
        tight = usage.total_bytes - usage.history_bytes // 3
        report = ds.maintain(POLICY, now=clock.now, budget=tight)
        assert report.thinned_now > 0 and not report.over_budget
        assert report.usage.total_bytes <= tight
        # Impossible: only the head and the tagged version remain, and it says so.
        report = ds.maintain(POLICY, now=clock.now, budget=1)
        kept, _ = kept_and_thinned(ds)
        assert report.over_budget
        assert {v.cid for v in kept} == {ds.head().cid, ds.find("keep").cid}  # type: ignore[union-attr]


def test_replicas_keep_only_the_latest_and_expire(tmp_path: Path, clock: Clock) -> None:
    with LocalDataset(tmp_path / "home", DATASET) as ds, \
            LocalDataset(tmp_path / "peer", PEER) as peer:  # fmt: skip
        fill(ds, 0, 10)
        ds.snapshot()
        roots = []
        for i in range(2):
            fill(peer, i * 500, 500)
            root = peer.snapshot().version.cid
            for cid, data in dag_blocks(peer.blocks, CID.decode(root)):
                ds.blocks.put(cid, data)
            ds.install_replica(root)
            roots.append(root)
        old_only = ds.blocks.reachable([CID.decode(roots[0])]) - ds.blocks.reachable(
            [CID.decode(roots[1])]
        )
        assert old_only and all(ds.blocks.has(c) for c in old_only)
        report = ds.maintain(POLICY, now=clock.now)
        assert not any(ds.blocks.has(c) for c in old_only)  # the old version's blocks went
        assert missing_blocks(ds.blocks, CID.decode(roots[1])) == []
        assert report.usage.replica_bytes > 0 and report.expired_replicas == []
        # Seen 10 days later (its owner is in the lab): kept 30 days from then.
        ds.maintain(POLICY, now=clock.now + 10 * DAY, seen=[PEER], replica_expiry=30 * DAY)
        report = ds.maintain(POLICY, now=clock.now + 35 * DAY, replica_expiry=30 * DAY)
        assert report.expired_replicas == [] and ds.replicas.get(PEER) is not None
        report = ds.maintain(POLICY, now=clock.now + 41 * DAY, replica_expiry=30 * DAY)
        assert report.expired_replicas == [PEER] and ds.replicas.all() == []
        assert not ds.blocks.has(CID.decode(roots[1]))
        assert report.usage.replica_bytes == 0


# --- kill -9 in the middle of a collection ----------------------------------------------------

SLOW_GC = textwrap.dedent("""
    import sys, time
    from benchsync.storage import blockstore
    from benchsync.storage.dataset import LocalDataset
    from benchsync.storage.retention import RetentionPolicy

    remove = blockstore.FsBlockstore._remove
    def slow_remove(self, key):
        print("deleting", flush=True)
        time.sleep(0.01)
        return remove(self, key)
    blockstore.FsBlockstore._remove = slow_remove
    ds = LocalDataset(sys.argv[1], sys.argv[2])
    ds.maintain(RetentionPolicy(retention=float(sys.argv[3]), interval=float(sys.argv[4])),
                now=float(sys.argv[5]))
    print("finished", flush=True)
""")


def test_kill_during_gc_leaves_every_kept_version_whole(tmp_path: Path, clock: Clock) -> None:
    home = tmp_path / "home"
    with LocalDataset(home, DATASET) as ds:
        write_and_snapshot(ds, clock, 20)
        # Many garbage blocks: the collection takes seconds, so the kill lands inside it.
        for i in range(400):
            ds.blocks.put(*_raw_block(b"garbage %d" % i))
        before = ds.history()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_GC, str(home), DATASET, str(POLICY.retention),
         str(POLICY.interval), str(clock.now)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    deleted = 0
    while time.monotonic() < deadline and deleted < 50:  # well inside the collection
        line = proc.stdout.readline()
        if not line:
            break
        deleted += line.startswith("deleting")
    assert deleted == 50, "the collection never got going"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with LocalDataset(home, DATASET) as ds:
        assert [v.cid for v in ds.history()] == [v.cid for v in before]  # the chain is whole
        kept, thinned = kept_and_thinned(ds)
        assert thinned, "the thinning was recorded before any block was deleted"
        assert len([c for c in ds.blocks.cids()]) > 0
        for v in kept:
            assert missing_blocks(ds.blocks, CID.decode(v.cid)) == [], v.seq
        ds.restore(kept[-1].cid)  # the oldest kept version, whole
        # The next pass finishes the job.
        report = ds.maintain(POLICY, now=clock.now)
        assert report.removed_blocks > 0 and report.thinned_now == 0
        for v in thinned:
            assert not ds.blocks.has(CID.decode(v.tables_cid))


def _raw_block(data: bytes) -> tuple[CID, bytes]:
    from benchsync.storage.cid import RAW, block_cid

    return block_cid(RAW, data), data
