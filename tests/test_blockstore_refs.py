"""File-reference blocks, batches spread over threads, transfer marks and `verify`.

One test body runs against the filesystem and the in-memory store (a file
reference points into a real file in `tmp_path` either way); restarts are a new
`FsBlockstore` on the same directory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from multiformats import CID

from benchsync.storage import unixfs
from benchsync.storage.blockstore import (
    REF_SUFFIX,
    Blockstore,
    FileRef,
    FileRefChanged,
    FsBlockstore,
    MemoryBlockstore,
    add_file_by_reference,
)
from benchsync.storage.cid import RAW, block_cid
from benchsync.storage.errors import CorruptBlock

CHUNK = unixfs.CHUNK_SIZE


@pytest.fixture(params=["fs", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Blockstore:
    if request.param == "fs":
        return FsBlockstore(tmp_path / "blocks")
    return MemoryBlockstore()


def segment(tmp_path: Path, data: bytes, name: str = "part-0000.parquet") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def leaves(store: Blockstore, root: CID) -> list[CID]:
    return [c for c, _ in unixfs.walk(store.get, root) if c.codec.code == RAW]


# --- put_ref ---------------------------------------------------------------------------


def test_a_reference_reads_as_the_block_it_points_to(store: Blockstore, tmp_path: Path) -> None:
    data = os.urandom(5000)
    path = segment(tmp_path, b"head" + data + b"tail")
    cid = block_cid(RAW, data)
    assert store.put_ref(cid, path, 4, len(data)) is True
    assert store.put_ref(cid, path, 4, len(data)) is False  # already stored
    assert store.put(cid, data) is False  # stored as a reference: kept as it is
    assert store.has(cid) and store.get(cid) == data and store.size(cid) == len(data)
    assert store.file_ref(cid) == FileRef(path, 4, len(data))
    assert [str(c) for c in store.cids()] == [str(cid)]
    assert store.total_bytes() == len(data)  # what serving it sends
    assert store.disk_bytes() < 200  # only the record: the bytes stay in the file
    store.delete(cid)
    assert not store.has(cid) and path.read_bytes()[4:-4] == data  # the file is untouched


def test_a_block_stored_as_bytes_is_not_replaced_by_a_reference(
    store: Blockstore, tmp_path: Path
) -> None:
    data = b"x" * 3000
    cid = block_cid(RAW, data)
    store.put(cid, data)
    assert store.put_ref(cid, segment(tmp_path, data), 0, len(data)) is False
    assert store.file_ref(cid) is None and store.disk_bytes() == len(data)


def test_a_wrong_range_is_refused_before_anything_is_stored(
    store: Blockstore, tmp_path: Path
) -> None:
    data = os.urandom(2000)
    path = segment(tmp_path, data)
    cid = block_cid(RAW, data)
    with pytest.raises(FileRefChanged, match="no longer hash"):
        store.put_ref(cid, path, 1, len(data) - 1)
    with pytest.raises(FileRefChanged, match="ends 1999 bytes into"):
        store.put_ref(cid, path, 1, len(data))
    with pytest.raises(ValueError, match="offset >= 0"):
        store.put_ref(cid, path, -1, 5)
    assert not store.has(cid)


@pytest.mark.parametrize("change", ["rewritten", "truncated", "deleted"])
def test_a_changed_file_is_a_clear_error_and_verify_drops_the_reference(
    store: Blockstore, tmp_path: Path, change: str
) -> None:
    data = os.urandom(4 * CHUNK)
    path = segment(tmp_path, data)
    root, size, _ = add_file_by_reference(store, path)
    refs = leaves(store, root)
    if change == "rewritten":
        path.write_bytes(data[:CHUNK] + os.urandom(CHUNK) + data[2 * CHUNK :])
    elif change == "truncated":
        path.write_bytes(data[: 2 * CHUNK + 10])
    else:
        path.unlink()
    broken = {"rewritten": refs[1:2], "truncated": refs[2:], "deleted": refs}[change]
    detail = {"rewritten": "no longer hash", "truncated": "now ends", "deleted": "is gone"}[change]
    with pytest.raises(FileRefChanged, match=detail) as info:
        store.get(broken[0])
    assert str(path) in str(info.value) and "add the file again" in str(info.value)
    assert isinstance(info.value, CorruptBlock)  # a fetch's provider never serves it
    assert {str(c) for c in store.verify()} == {str(c) for c in broken}
    assert not any(store.has(c) for c in broken)
    assert all(store.has(c) for c in refs if c not in broken)


# --- a whole file by reference ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, CHUNK, 3 * CHUNK + 17, 180 * CHUNK])
def test_a_file_by_reference_has_the_cid_and_bytes_of_a_copied_one(
    store: Blockstore, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    path = segment(tmp_path, data)
    copied = MemoryBlockstore()
    expected = unixfs.add_bytes(data, copied.put)
    assert add_file_by_reference(store, path) == expected
    root = expected[0]
    assert b"".join(unixfs.cat(store.get, root)) == data
    for cid, block in unixfs.walk(copied.get, root):
        assert store.get(cid) == block  # served bytes identical, block by block
        assert (store.file_ref(cid) is not None) == (cid.codec.code == RAW)
    inner = sum(len(b) for c, b in unixfs.walk(copied.get, root) if c.codec.code != RAW)
    assert store.total_bytes() == copied.total_bytes()
    # The store holds the inner nodes and one small record per leaf, never the data.
    assert store.disk_bytes() <= inner + 200 * len(leaves(store, root))


def test_gc_deletes_unreachable_references_and_never_the_file(
    store: Blockstore, tmp_path: Path
) -> None:
    a = segment(tmp_path, os.urandom(2 * CHUNK), "a.parquet")
    b = segment(tmp_path, os.urandom(2 * CHUNK), "b.parquet")
    root_a, _, _ = add_file_by_reference(store, a)
    root_b, _, _ = add_file_by_reference(store, b)
    gone = [root_b, *leaves(store, root_b)]
    removed, freed = store.gc([root_a])
    assert removed == len(gone)
    assert not any(store.has(c) for c in gone)
    assert b"".join(unixfs.cat(store.get, root_a)) == a.read_bytes()
    assert b.exists()
    assert freed < 2 * CHUNK  # the root node and two records: no file data was the store's


def test_references_survive_a_restart(tmp_path: Path) -> None:
    path = segment(tmp_path, os.urandom(3 * CHUNK))
    root, _, _ = add_file_by_reference(FsBlockstore(tmp_path / "blocks"), path)
    again = FsBlockstore(tmp_path / "blocks")
    assert b"".join(unixfs.cat(again.get, root)) == path.read_bytes()
    records = list((tmp_path / "blocks").glob(f"*/*{REF_SUFFIX}"))
    # One record for the file's three blocks, named under each (a record per block cost
    # a file creation per 256 KiB received: as much as writing the bytes).
    assert len(records) == 3 and len({r.stat().st_ino for r in records}) == 1
    assert records[0].stat().st_size < 3 * 200 and records[0].stat().st_nlink == 3
    assert again.disk_bytes() < 2 * CHUNK  # the root node, and the record counted once


def test_a_failed_batch_keeps_no_reference(store: Blockstore, tmp_path: Path) -> None:
    data = os.urandom(1000)
    cid = block_cid(RAW, data)
    path = segment(tmp_path, data)
    with pytest.raises(KeyError), store.batch():
        store.put_ref(cid, path, 0, len(data))
        assert store.get(cid) == data and store.size(cid) == len(data)  # this thread sees it
        raise KeyError("boom")
    assert not store.has(cid) and list(store.cids()) == []


# --- a batch spread over calls and threads ---------------------------------------------


def run_in_thread(fn: Callable[[], None]) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_a_batch_handle_takes_puts_from_several_threads_and_commits_once(
    store: Blockstore,
) -> None:
    items = [(block_cid(RAW, d), d) for d in (os.urandom(100) for _ in range(6))]
    batch = store.begin_batch()
    for part in (items[:3], items[3:]):

        def put(part: list[tuple[CID, bytes]] = part) -> None:
            with store.joined(batch):
                for cid, data in part:
                    store.put(cid, data)

        run_in_thread(put)
    assert not any(store.has(c) for c, _ in items)  # not committed: invisible outside
    with store.joined(batch):
        assert all(store.get(c) == d for c, d in items)
    store.commit_batch(batch)
    assert all(store.get(c) == d for c, d in items)
    # The handle is empty again and takes more; an abort drops only what follows.
    extra = block_cid(RAW, b"extra")
    with store.joined(batch):
        store.put(extra, b"extra")
    store.abort_batch(batch)
    assert not store.has(extra) and len(list(store.cids())) == 6


def test_a_thread_cannot_join_two_batches(store: Blockstore) -> None:
    a, b = store.begin_batch(), store.begin_batch()
    with store.joined(a), pytest.raises(RuntimeError, match="another batch"), store.joined(b):
        pass
    with store.joined(a), store.batch():  # a nested batch() joins the joined one
        store.put(block_cid(RAW, b"n"), b"n")
    assert not store.has(block_cid(RAW, b"n"))
    store.commit_batch(a)
    assert store.has(block_cid(RAW, b"n"))


# --- transfer marks and verify ---------------------------------------------------------


def test_a_transfer_mark_outlives_a_crash_and_is_no_block(tmp_path: Path) -> None:
    root = block_cid(RAW, b"root")
    store = FsBlockstore(tmp_path / "blocks")
    store.begin_transfer(root)
    restarted = FsBlockstore(tmp_path / "blocks")  # a crash: end_transfer never ran
    assert restarted.interrupted_transfers() == [root]
    assert list(restarted.cids()) == [] and restarted.disk_bytes() == 0
    restarted.end_transfer(root)
    assert FsBlockstore(tmp_path / "blocks").interrupted_transfers() == []


def test_verify_finds_and_drops_a_torn_block(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    good, torn = (os.urandom(CHUNK), os.urandom(CHUNK))
    good_cid, torn_cid = block_cid(RAW, good), block_cid(RAW, torn)
    store.put(good_cid, good)
    store.put(torn_cid, torn)
    path = next(p for p in (tmp_path / "blocks").rglob("*") if p.name == str(torn_cid))
    with path.open("r+b") as f:  # what a lost write-back could leave: a short block
        f.truncate(CHUNK // 2)
    assert store.verify() == [torn_cid]
    assert store.has(good_cid) and not store.has(torn_cid)
    assert store.verify([good_cid, torn_cid]) == []


# --- blocks written into the file they belong to ----------------------------------------


def test_blocks_put_into_a_file_land_once_in_it_as_references(
    store: Blockstore, tmp_path: Path
) -> None:
    payload = os.urandom(3 * CHUNK + 100)
    chunks = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)]
    target = tmp_path / "part-0000.parquet"
    with store.batch():
        # Out of order, as blocks of a transfer may come: each lands at its offset.
        for i in (2, 0, 3, 1):
            cid = block_cid(RAW, chunks[i])
            assert store.put_into_file(cid, chunks[i], target, i * CHUNK) is True
            assert store.get(cid) == chunks[i]  # readable by the batch's thread at once
    assert target.read_bytes() == payload
    for i, chunk in enumerate(chunks):
        cid = block_cid(RAW, chunk)
        assert store.get(cid) == chunk
        assert store.file_ref(cid) == FileRef(target, i * CHUNK, len(chunk))
    assert store.disk_bytes() < 200 * len(chunks)  # only the records: the bytes are the file's
    # The bytes are written even for a block already stored (the file needs them).
    again = tmp_path / "copy.parquet"
    assert store.put_into_file(block_cid(RAW, chunks[0]), chunks[0], again, 0) is False
    assert again.read_bytes() == chunks[0]


def test_a_block_put_into_a_file_is_verified_before_anything_is_written(
    store: Blockstore, tmp_path: Path
) -> None:
    target = tmp_path / "part.parquet"
    with pytest.raises(CorruptBlock):
        store.put_into_file(block_cid(RAW, b"right"), b"wrong", target, 0)
    assert not target.exists() and list(store.cids()) == []


def test_a_failed_batch_keeps_no_reference_into_the_file(
    store: Blockstore, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    cid = block_cid(RAW, data)
    with pytest.raises(KeyError), store.batch():
        store.put_into_file(cid, data, tmp_path / "part.parquet", 0)
        raise KeyError("boom")
    assert not store.has(cid)


def test_a_batch_syncs_the_written_file_before_any_reference_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    target = tmp_path / "elsewhere" / "part.parquet"  # maybe another filesystem
    target.parent.mkdir()
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(target):
            events.append("file synced")
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(REF_SUFFIX):
            events.append("reference named")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    data = os.urandom(5000)
    with store.batch():
        store.put_into_file(block_cid(RAW, data), data, target, 0)
        assert events == []  # nothing synced per block
    assert events == ["file synced", "reference named"]
