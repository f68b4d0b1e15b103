"""Replicas installed without a second copy (issue 14): each received leaf lands once, in
its content-addressed segment file, shared by the versions that hold it.

Real components throughout: two `LocalDataset`s (real DuckDB files, fsynced
blockstores), real py-libp2p hosts on 127.0.0.1 for the transfers, and a real
child process killed with SIGKILL inside an install.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from multiformats import CID

from benchsync.daemon.network import P2PNode
from benchsync.protocol.heads import Head
from benchsync.storage import segments
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.replica_files import FILES_DIR, file_leaves, file_name
from benchsync.storage.snapshot import Version
from tests.snapshot_crash_child import perf
from tests.test_p2p import LAB_KEY
from tests.test_segments import use_bits

TIMEOUT = 60  # seconds: one transfer scenario on a loaded 2-core box
PEER = "peera"  # the writer's dataset name (a replica folder name)
REPO = Path(__file__).resolve().parents[1]


def table_cids(ds: LocalDataset, version: Version) -> dict[str, CID]:
    """Every table file of `version`: content-addressed name -> file CID."""
    from benchsync.storage.replica_files import file_cids, version_files

    out = {}
    for link in version_files(ds.blocks, version).values():
        for cid in file_cids(link):
            out[file_name(cid)] = cid
    return out


def p2p(tmp: Path, name: str, ds: LocalDataset) -> P2PNode:
    return P2PNode(tmp / name, network="lab", blockstore=ds.blocks, retry_delay=0.2,
                   lab_key=LAB_KEY)  # fmt: skip


async def fetch_placed(tmp: Path, a: LocalDataset, b: LocalDataset, root: str) -> int:
    """Fetch `root` from `a` into `b` as the syncer does (leaves placed into `b`'s
    replica files, then finish); returns the block bytes received.

    Each call's hosts get homes of their own: hosts on the homes of a previous call
    would redial each other's old addresses (peers.json) beside the test's dial."""
    n = len(list(tmp.glob("pa*")))
    na, nb = p2p(tmp, f"pa{n}", a), p2p(tmp, f"pb{n}", b)
    place = b.replica_placement(PEER, CID.decode(root))
    assert place is not None
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(na.run)
                await nursery.start(nb.run)
                await nb.connect(na.addrs[0])
                result = await nb.fetcher.fetch(CID.decode(root), [na.peer_id], place=place.files)
                nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(place.finish)
    finally:
        place.close()
    return result.stats.block_bytes


def inodes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


async def test_a_new_version_receives_only_its_changed_segments_into_shared_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 8)  # ~256 rows per segment: a dozen segments
    with LocalDataset(tmp_path / "a", PEER) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 3000))
        v1 = a.snapshot().version
        await fetch_placed(tmp_path, a, b, v1.cid)
        b.install_replica(v1.cid)
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        v1_files = table_cids(b, v1)
        assert {p.name for p in files.iterdir()} == set(v1_files)
        # The version's folder is links to them: the data is on disk once.
        replica = b.replicas.get(PEER)
        assert replica is not None
        linked = replica.tables["performance_results"]
        for part in segments.parquet_files(linked):
            assert part.stat().st_nlink == 2
        # Every received leaf is a reference into its file, not a block of its own.
        for name, cid in v1_files.items():
            for leaf, offset, size in file_leaves(b.blocks, cid):
                ref = b.blocks.file_ref(leaf)
                assert ref is not None and ref.path == (files / name).absolute()
                assert (ref.offset, ref.length) == (offset, size)
        before = inodes(files)

        a.db.ingest_records("perf", perf(3000, 30))  # +1 %
        v2 = a.snapshot().version
        received = await fetch_placed(tmp_path, a, b, v2.cid)
        b.install_replica(v2.cid)
        v2_files = table_cids(b, v2)
        kept = set(v1_files) & set(v2_files)
        assert len(kept) >= len(v1_files) - 3  # appends touch the last segment(s) only
        after = inodes(files)
        assert set(after) == set(v2_files)  # v1's other files went with the pointer move
        for name in kept:
            assert after[name] == before[name]  # not rewritten, not even touched
        changed = sum((files / n).stat().st_size for n in set(v2_files) - kept)
        assert received < changed + 16 * 1024  # the changed files and a few inner nodes
        # No reference points into a removed file; every block verifies.
        assert b.blocks.verify() == []
        assert not (tmp_path / "b" / "replicas" / PEER / v1.cid).exists()
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 3030}]
        # Linked files count once.
        parquet = sum(t.bytes for t in v2.manifest.tables.values())
        assert b.replicas.disk_bytes() < parquet + 64 * 1024
        assert b.disk_usage().replica_bytes < parquet + b.blocks.disk_bytes()


def import_version(a: LocalDataset, b: LocalDataset, tmp: Path, cid: str) -> None:
    car = tmp / f"{cid}.car"
    with open(car, "wb") as f:
        a.export_car(f, cid)
    with open(car, "rb") as f:
        b.import_cars([(car.name, f)])


def test_an_install_without_placement_writes_each_file_once_and_shares_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 8)
    with LocalDataset(tmp_path / "a", PEER) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 2000))
        v1 = a.snapshot().version
        a.db.ingest_records("perf", perf(2000, 20))
        v2 = a.snapshot().version
        import_version(a, b, tmp_path, v1.cid)
        b.install_replica(v1.cid)
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        before = inodes(files)
        import_version(a, b, tmp_path, v2.cid)
        b.install_replica(v2.cid)
        after = inodes(files)
        kept = set(before) & set(after)
        assert kept and all(before[n] == after[n] for n in kept)
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 2020}]
        assert b.blocks.verify() == []


def test_a_new_version_decodes_only_its_new_segment_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The install's Parquet check (rows, decoded size) is remembered by file CID in
    CHECKS.json: the next version decodes only the files it does not share."""
    from benchsync.storage import replicas, snapshot

    use_bits(monkeypatch, 8)
    decoded: list[int] = []  # inodes of the files decoded
    real = snapshot._check_decoded

    def spy(conn: Any, path: Path, *args: Any) -> int:
        decoded.append(path.stat().st_ino)
        return real(conn, path, *args)

    monkeypatch.setattr(snapshot, "_check_decoded", spy)
    with LocalDataset(tmp_path / "a", PEER) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 3000))
        v1 = a.snapshot().version
        a.db.ingest_records("perf", perf(3000, 30))
        v2 = a.snapshot().version
        a.db.ingest_records("perf", perf(3030, 30))
        v3 = a.snapshot().version
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        import_version(a, b, tmp_path, v1.cid)
        b.install_replica(v1.cid)
        assert sorted(decoded) == sorted(p.stat().st_ino for p in files.iterdir())
        checks = tmp_path / "b" / "replicas" / PEER / replicas.CHECKS_FILENAME
        assert set(json.loads(checks.read_text())) == {str(c) for c in table_cids(b, v1).values()}

        decoded.clear()
        before = set(table_cids(b, v1))
        import_version(a, b, tmp_path, v2.cid)
        b.install_replica(v2.cid)
        new = set(table_cids(b, v2)) - before
        assert new and len(new) < len(before)
        assert sorted(decoded) == sorted((files / n).stat().st_ino for n in new)
        assert set(json.loads(checks.read_text())) == {str(c) for c in table_cids(b, v2).values()}

        # A damaged record is a cache miss, not an error: everything is decoded again.
        checks.write_text("{not json")
        decoded.clear()
        import_version(a, b, tmp_path, v3.cid)
        b.install_replica(v3.cid)
        assert sorted(decoded) == sorted(p.stat().st_ino for p in files.iterdir())
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 3060}]


CRASH_CHILD = """
import os, signal, sys
from benchsync.storage import replicas
from benchsync.storage.dataset import LocalDataset
home, root, point = sys.argv[1], sys.argv[2], sys.argv[3]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-pointer":
    replicas.atomic_write = die
else:
    replicas.ReplicaStore._sweep = die
with LocalDataset(home, "peerb") as b:
    b.install_replica(root)
"""


@pytest.mark.parametrize("point", ["before-pointer", "before-sweep"])
def test_kill_9_inside_an_install_leaves_a_queryable_replica_and_the_next_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    use_bits(monkeypatch, 8)
    with LocalDataset(tmp_path / "a", PEER) as a:
        a.db.ingest_records("perf", perf(0, 2000))
        v1 = a.snapshot().version
        a.db.ingest_records("perf", perf(2000, 500))
        v2 = a.snapshot().version
        with LocalDataset(tmp_path / "b", "peerb") as b:
            import_version(a, b, tmp_path, v1.cid)
            b.install_replica(v1.cid)
            import_version(a, b, tmp_path, v2.cid)
    # The child installs v2 and is killed at `point` (its segment rule does not matter:
    # it only reads the version).
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path / "b"), v2.cid, point],
        cwd=REPO, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    with LocalDataset(tmp_path / "b", "peerb") as b:
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        want = 2000 if point == "before-pointer" else 2500
        assert got.to_pylist() == [{"n": want}]
        b.replicas.expire(0.0, 0)  # what the crash left beside the current version
        assert b.blocks.verify() == []
        b.install_replica(v2.cid)
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 2500}]
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        assert {p.name for p in files.iterdir()} == set(table_cids(b, v2))
        folders = {p.name for p in (tmp_path / "b" / "replicas" / PEER).iterdir() if p.is_dir()}
        assert folders == {FILES_DIR, v2.cid}
        assert b.blocks.verify() == []


async def test_the_syncer_receives_a_followed_head_into_the_replica_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 8)
    with LocalDataset(tmp_path / "a", PEER) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 2000))
        v1 = a.snapshot().version

        async def install(head: Head) -> None:
            await trio.to_thread.run_sync(b.install_replica, str(head.root))

        na = p2p(tmp_path, "pa", a)
        nb = P2PNode(tmp_path / "pb", network="lab", blockstore=b.blocks, retry_delay=0.2,
                     lab_key=LAB_KEY, on_complete=install)  # fmt: skip
        nb.syncer.placement = lambda h: b.replica_placement(h.dataset, h.root)
        root = CID.decode(v1.cid)
        head = Head(PEER, v1.seq, root, CID.decode(v1.tables_cid), v1.created_at,
                    v1.manifest.total_bytes)  # fmt: skip
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(na.run)
                await nursery.start(nb.run)
                await nb.connect(na.addrs[0])
                await nb.syncer.head_seen(head, na.peer_id)
                await nb.wait_until(lambda: nb.syncer.installed(PEER) == head)
                nursery.cancel_scope.cancel()
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        placed = table_cids(b, v1)
        assert {p.name for p in files.iterdir()} == set(placed)
        for name, cid in placed.items():
            assert (files / name).stat().st_nlink == 2  # the file and its version's link
            for leaf, _, _ in file_leaves(b.blocks, cid):
                ref = b.blocks.file_ref(leaf)
                assert ref is not None and ref.path == (files / name).absolute()
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 2000}]


def test_expiry_removes_the_files_of_a_fetch_that_never_completed_but_not_a_running_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 8)
    with LocalDataset(tmp_path / "a", PEER) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 1000))
        v1 = a.snapshot().version
        import_version(a, b, tmp_path, v1.cid)
        cids = table_cids(b, v1)
        # What a fetch cut short leaves: a leaf received into its file, nothing installed.
        files = tmp_path / "b" / "replicas" / PEER / FILES_DIR
        files.mkdir(parents=True)
        name, cid = next(iter(cids.items()))
        leaf, offset, _ = next(file_leaves(b.blocks, cid))
        data = b.blocks.get(leaf)
        b.blocks.delete(leaf)
        b.blocks.put_into_file(leaf, data, files / name, offset)
        running = b.replica_placement(PEER, CID.decode(v1.cid))
        assert running is not None
        writing = running.files.target("tables/performance_results/part-0001.parquet")
        assert writing is not None and writing.name != name
        writing.write_bytes(b"being received")
        try:
            b.replicas.expire(0.0, 0)
            assert list(files.iterdir()) == [writing]  # the running fetch's file stays
            assert not b.blocks.has(leaf)  # the other's reference went with its file
            assert b.blocks.verify() == []
        finally:
            running.close()
        b.replicas.expire(0.0, 0)
        assert list(files.iterdir()) == []
