"""Batched durable block writes: `with store.batch():` and its use by snapshots.

One test body runs against the filesystem and the in-memory store; the
durability order (data synced before any rename, renames synced before the
snapshot's head moves) is checked on the real filesystem store, with spies that
call the real syscalls and note what was on disk at each sync.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.storage import blockstore
from benchsync.storage.blockstore import (
    TMP_PREFIX,
    Blockstore,
    BlockWriteError,
    FsBlockstore,
    MemoryBlockstore,
)
from benchsync.storage.cid import RAW, block_cid
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.snapshot import DiskFull

DATASET = "12D3KooWBatchTestDatasetAAAAAAAAAAAAAAAAAAAAAAAAAAA"


class Boom(Exception):
    """Raised inside a batch body by the tests."""


@pytest.fixture(params=["fs", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Blockstore:
    if request.param == "fs":
        return FsBlockstore(tmp_path / "blocks")
    return MemoryBlockstore()


def blocks(n: int, size: int = 1000, tag: str = "") -> list[tuple[CID, bytes]]:
    out = []
    for i in range(n):
        data = f"{tag}block {i} ".encode() * (size // 10)
        out.append((block_cid(RAW, data), data))
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def temps_under(root: Path) -> set[str]:
    return {p.name for p in root.glob(f"*/{TMP_PREFIX}*")}


def seen_from_another_thread(store: Blockstore, cid: CID) -> bool:
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(store.has(cid)))
    t.start()
    t.join()
    return result[0]


# --- one body for both stores ----------------------------------------------------------


def test_batch_commit_makes_blocks_visible(store: Blockstore) -> None:
    items = blocks(5)
    with store.batch():
        for cid, data in items:
            assert store.put(cid, data) is True
        assert store.put(*items[0]) is False  # dedup inside the batch
        # This thread reads its pending blocks; others only see them once committed.
        assert all(store.has(cid) and store.get(cid) == data for cid, data in items)
        assert store.size(items[1][0]) == len(items[1][1])
        assert not seen_from_another_thread(store, items[0][0])
    assert {str(c) for c in store.cids()} == {str(c) for c, _ in items}
    assert all(store.get(cid) == data for cid, data in items)
    assert seen_from_another_thread(store, items[0][0])


def test_exception_inside_batch_keeps_no_block(store: Blockstore) -> None:
    kept_cid, kept = blocks(1, tag="kept")[0]
    store.put(kept_cid, kept)
    items = blocks(4)
    with pytest.raises(Boom), store.batch():
        for cid, data in items:
            store.put(cid, data)
        raise Boom
    assert [str(c) for c in store.cids()] == [str(kept_cid)]
    assert not any(store.has(cid) for cid, _ in items)
    with store.batch():  # the same blocks can be stored afterwards
        assert all(store.put(cid, data) for cid, data in items)
    assert all(store.get(cid) == data for cid, data in items)


def test_nested_batch_joins_the_outer_one(store: Blockstore) -> None:
    (a, da), (b, db) = blocks(2)
    with pytest.raises(Boom), store.batch():
        store.put(a, da)
        with store.batch():
            store.put(b, db)
        assert not seen_from_another_thread(store, b)  # the inner exit committed nothing
        raise Boom
    assert list(store.cids()) == []


def test_delete_of_a_pending_block(store: Blockstore) -> None:
    (a, da), (b, db) = blocks(2)
    with store.batch():
        store.put(a, da)
        store.put(b, db)
        store.delete(a)
        assert not store.has(a)
    assert [str(c) for c in store.cids()] == [str(b)]


def test_other_threads_puts_are_not_part_of_the_batch(store: Blockstore) -> None:
    (mine, dm), (theirs, dt) = blocks(2)
    stored: list[bool] = []

    def other() -> None:
        stored.append(store.put(theirs, dt))
        stored.append(store.put(mine, dm))  # pending in the batch, not yet stored

    with pytest.raises(Boom), store.batch():
        store.put(mine, dm)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen_from_another_thread(store, theirs)  # stored at once, not deferred
        raise Boom
    # The failed batch takes neither the other thread's blocks nor its copy of `mine`.
    assert stored == [True, True]
    assert store.get(theirs) == dt and store.get(mine) == dm


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=20),
    fail=st.booleans(),
)
def test_batch_equals_sequential_puts_or_nothing(ops: list[tuple[int, bool]], fail: bool) -> None:
    pool = blocks(8, size=300)
    with tempfile.TemporaryDirectory() as tmp:
        for store in (FsBlockstore(Path(tmp) / "blocks"), MemoryBlockstore()):
            expected: set[str] = set()
            results = []
            try:
                with store.batch():
                    for index, delete in ops:
                        cid, data = pool[index]
                        if delete:
                            store.delete(cid)
                            expected.discard(str(cid))
                        else:
                            results.append(store.put(cid, data))
                            expected.add(str(cid))
                    if fail:
                        raise Boom
            except Boom:
                expected = set()
            assert {str(c) for c in store.cids()} == expected
            assert all(store.get(CID.decode(k)) == pool_data(pool, k) for k in expected)
            if isinstance(store, FsBlockstore):
                assert temps_under(store.root) == set()


def pool_data(pool: list[tuple[CID, bytes]], key: str) -> bytes:
    return next(data for cid, data in pool if str(cid) == key)


# --- the filesystem store: durability order and faults -----------------------------------


class SyncSpy:
    """Wraps the real syncfs and os.replace; notes the temp files present at each sync."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.events: list[tuple[str, object]] = []
        self.synced_temps: set[str] = set()
        self.synced_blocks: set[str] = set()
        real_syncfs = blockstore._syncfs
        assert real_syncfs is not None, "these tests need Linux syncfs(2)"
        real_replace = os.replace

        def syncfs(fd: int) -> int:
            self.synced_temps = temps_under(root)
            self.synced_blocks = self.block_names()
            self.events.append(("sync", None))
            return real_syncfs(fd)

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            self.events.append(("replace", Path(src).name))
            real_replace(src, dst)

        monkeypatch.setattr(blockstore, "_syncfs", syncfs)
        monkeypatch.setattr(os, "replace", replace)

    def block_names(self) -> set[str]:
        return {p.name for p in files_under(self.root) if not p.name.startswith(TMP_PREFIX)}


def test_batch_syncs_data_before_any_rename_and_renames_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    spy = SyncSpy(store.root, monkeypatch)
    items = blocks(6)
    with store.batch():
        for cid, data in items:
            store.put(cid, data)
        assert spy.events == []  # no per-block sync, no block under its real name yet
        assert spy.block_names() == set()
    kinds = [kind for kind, _ in spy.events]
    assert kinds == ["sync"] + ["replace"] * len(items) + ["sync"]
    renamed = {name for kind, name in spy.events if kind == "replace"}
    assert len(renamed) == len(items)
    # Every temp file renamed had been synced; the final sync saw every block in place.
    assert spy.synced_blocks == {str(cid) for cid, _ in items}
    assert FsBlockstore(store.root).get(items[2][0]) == items[2][1]  # a fresh open reads them
    assert temps_under(store.root) == set()


def test_batch_without_syncfs_fsyncs_each_temp_then_the_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    monkeypatch.setattr(blockstore, "_syncfs", None)  # as on a system without syncfs(2)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    items = blocks(5)
    with store.batch():
        for cid, data in items:
            store.put(cid, data)
    first_replace = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
    fsynced_before = {path for kind, path in events[:first_replace] if kind == "fsync"}
    renamed = [path for kind, path in events if kind == "replace"]
    assert set(renamed) <= fsynced_before  # every temp durable before any rename
    dirs_after = {path for kind, path in events[first_replace:] if kind == "fsync"}
    assert dirs_after == {str(store._path(str(cid)).parent) for cid, _ in items}
    assert all(store.get(cid) == data for cid, data in items)


def flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "blockstore-flusher"]


@pytest.mark.parametrize("fail", [False, True])
def test_batch_leaves_no_thread_and_no_open_file(tmp_path: Path, fail: bool) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(Boom) if fail else nullcontext(), store.batch():
        for cid, data in blocks(100, size=20_000):  # more than the flusher's queue holds
            store.put(cid, data)
        assert len(flusher_threads()) == (1 if blockstore._sync_file_range else 0)
        if fail:
            raise Boom
    assert flusher_threads() == []
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert len(list(store.cids())) == (0 if fail else 100)


def _enospc_after(calls: int, real: Callable[..., int]) -> Callable[..., int]:
    count = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    return write


def test_full_disk_during_batch_leaves_no_block_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    items = blocks(5, size=300_000)
    monkeypatch.setattr(os, "write", _enospc_after(2, os.write))
    with pytest.raises(BlockWriteError, match="disk is full"), store.batch():
        for cid, data in items:
            store.put(cid, data)
    monkeypatch.undo()
    assert files_under(store.root) == []  # the two blocks written before are dropped too
    with store.batch():  # space is back: the retry works
        for cid, data in items:
            store.put(cid, data)
    assert all(store.get(cid) == data for cid, data in items)


def test_failed_sync_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FsBlockstore(tmp_path / "blocks")

    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.ENOSPC)  # e.g. a thin-provisioned disk failing writeback
        return -1

    monkeypatch.setattr(blockstore, "_syncfs", failing_syncfs)
    items = blocks(3)
    with pytest.raises(BlockWriteError, match="disk is full") as info, store.batch():
        for cid, data in items:
            store.put(cid, data)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert files_under(store.root) == []


def test_concurrent_put_outside_the_batch_keeps_its_own_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    (mine, dm), (theirs, dt) = blocks(2)
    with store.batch():
        store.put(mine, dm)
        t = threading.Thread(target=store.put, args=(theirs, dt))
        t.start()
        t.join()
        # The fetcher thread's block is fsynced and in place before our batch ends.
        assert len(fsynced) == 1 and Path(fsynced[0]).name.startswith(TMP_PREFIX)
        assert store._path(str(theirs)).is_file()
        assert not store._path(str(mine)).exists()
    assert store._path(str(mine)).is_file()


# --- snapshots ----------------------------------------------------------------------------


def fill(ds: LocalDataset, start: int, count: int) -> None:
    def insert(conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute(
            "INSERT INTO performance_results (result_id, model_id, hardware_id, test_case, "
            "throughput_items_per_second, metrics) "
            "SELECT i, i % 7, i % 3, 'case-' || (i % 11), (hash(i) % 100000) / 7.0, "
            "'{\"h\": \"' || md5(i::VARCHAR) || '\"}' FROM range(?, ?) t(i)",
            [start, start + count],
        )

    ds.db.write(insert)


def test_snapshot_blocks_are_durable_before_the_head_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDataset(tmp_path / "node", DATASET) as ds:
        fill(ds, 0, 30_000)  # a few MB of Parquet: many 256 KiB blocks
        real_replace = os.replace
        spy = SyncSpy(ds.blocks.root, monkeypatch)
        head_checks: list[bool] = []

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if Path(dst).name == "HEAD.json":
                # Everything the head can reach is in place and was so at the last sync.
                head_checks.append(spy.block_names() == spy.synced_blocks)
            else:
                spy.events.append(("replace", Path(src).name))
                if Path(src).name.startswith(TMP_PREFIX):
                    assert Path(src).name in spy.synced_temps, "renamed before it was synced"
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        result = ds.snapshot()
        assert result.new_blocks > 10
        assert head_checks == [True]
        syncs = sum(1 for kind, _ in spy.events if kind == "sync")
        assert syncs == 4  # two per batch (tables, then manifest + root), not one per block
        assert ds.head() is not None and ds.head().cid == result.version.cid
        assert temps_under(ds.blocks.root) == set()


def test_snapshot_disk_full_in_batch_keeps_head_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDataset(tmp_path / "node", DATASET) as ds:
        fill(ds, 0, 5_000)
        v1 = ds.snapshot().version
        before = {p.name for p in files_under(ds.blocks.root)}
        fill(ds, 5_000, 20_000)
        monkeypatch.setattr(os, "write", _enospc_after(3, os.write))
        with pytest.raises(DiskFull, match="disk full"):
            ds.snapshot()
        monkeypatch.undo()
        assert ds.head().cid == v1.cid
        assert {p.name for p in files_under(ds.blocks.root)} == before  # nothing half-added
        v2 = ds.snapshot()
        assert v2.created and ds.head().cid == v2.version.cid
