"""Blockstore: one test body for the filesystem and the in-memory store, plus disk-only cases."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import (
    BlockNotFound,
    Blockstore,
    BlockWriteError,
    FsBlockstore,
    MemoryBlockstore,
    UnsupportedHash,
    verify_block,
)
from benchsync.storage.cid import InvalidCID, block_cid, decode_cid, make_cid
from benchsync.storage.dagpb import Link
from benchsync.storage.errors import CorruptBlock, NotFound, StorageError

RAW = 0x55
DAG_PB = 0x70


@pytest.fixture(params=["fs", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Blockstore:
    if request.param == "fs":
        return FsBlockstore(tmp_path / "blocks")
    return MemoryBlockstore()


def raw_block(data: bytes) -> tuple[CID, bytes]:
    return block_cid(RAW, data), data


def test_make_cid_equals_multiformats_public_constructor() -> None:
    digest = hashlib.sha256(b"hello world\n").digest()
    ours = make_cid(RAW, 0x12, digest)
    public = CID("base32", 1, "raw", multihash.wrap(digest, "sha2-256"))
    assert ours == public
    assert str(ours) == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    assert bytes(ours) == bytes(public)
    assert hash(ours) == hash(public)


def test_put_get_has_size_delete(store: Blockstore) -> None:
    cid, data = raw_block(b"hello world\n")
    assert not store.has(cid)
    assert store.put(cid, data) is True
    assert store.put(cid, data) is False  # already there
    assert store.has(cid)
    assert store.get(cid) == data
    assert store.size(cid) == len(data)
    assert store.total_bytes() == len(data)
    assert [str(c) for c in store.cids()] == [str(cid)]
    store.delete(cid)
    assert not store.has(cid)
    store.delete(cid)  # idempotent
    with pytest.raises(BlockNotFound) as info:
        store.get(cid)
    assert str(cid) in str(info.value)
    assert isinstance(info.value, NotFound)
    with pytest.raises(BlockNotFound):
        store.size(cid)
    assert list(store.cids()) == []
    assert store.total_bytes() == 0


def test_put_verifies_unless_told_not_to(store: Blockstore) -> None:
    cid, _ = raw_block(b"the real bytes")
    with pytest.raises(CorruptBlock) as info:
        store.put(cid, b"other bytes")
    assert info.value.cid == cid
    assert not store.has(cid)
    assert store.put(cid, b"other bytes", verify=False) is True
    assert store.get(cid) == b"other bytes"


def test_unsupported_hash_is_refused(store: Blockstore) -> None:
    data = b"x"
    cid = CID("base32", 1, "raw", multihash.digest(data, "sha2-512"))
    with pytest.raises(UnsupportedHash, match="sha2-512"):
        store.put(cid, data)
    assert not store.has(cid)


def test_identity_cids_verify() -> None:
    data = b"tiny"
    cid = CID("base32", 1, "raw", multihash.wrap(data, "identity"))
    verify_block(cid, data)
    with pytest.raises(CorruptBlock):
        verify_block(cid, b"tinx")


def test_cidv0_and_cidv1_of_a_block_are_one_key(store: Blockstore) -> None:
    node = b"\x0a\x02\x08\x01"  # dag-pb: an empty UnixFS directory
    v1 = block_cid(DAG_PB, node)
    v0 = v1.set(version=0, base="base58btc")
    assert store.put(v0, node) is True
    assert store.has(v1) and store.get(v1) == node
    assert store.put(v1, node) is False
    assert [str(c) for c in store.cids()] == [str(v1)]


def test_same_digest_different_codec_are_different_blocks(store: Blockstore) -> None:
    data = b"\x0a\x02\x08\x01"
    as_raw, as_pb = block_cid(RAW, data), block_cid(DAG_PB, data)
    store.put(as_raw, data)
    assert not store.has(as_pb)


def _put_dag(store: Blockstore, data: bytes) -> CID:
    cid, _, _ = unixfs.add_bytes(data, store.put, chunk_size=1024, max_links=4)
    return cid


def test_gc_keeps_what_roots_reach_and_frees_the_rest(store: Blockstore) -> None:
    kept_data = os.urandom(10 * 1024)  # 10 leaves -> 2 levels of nodes
    dropped_data = os.urandom(3 * 1024)
    kept = _put_dag(store, kept_data)
    dropped = _put_dag(store, dropped_data)
    kept_blocks = {str(c) for c, _ in unixfs.walk(store.get, kept)}
    dropped_blocks = {str(c): len(b) for c, b in unixfs.walk(store.get, dropped)}
    assert len(kept_blocks) == 1 + 3 + 10 and len(dropped_blocks) == 1 + 3
    before = store.total_bytes()

    removed, freed = store.gc([kept])

    assert (removed, freed) == (len(dropped_blocks), sum(dropped_blocks.values()))
    assert store.total_bytes() == before - freed
    assert {str(c) for c in store.cids()} == kept_blocks
    assert b"".join(unixfs.cat(store.get, kept)) == kept_data
    assert store.gc([kept]) == (0, 0)
    kept_total = store.total_bytes()
    assert store.gc([]) == (len(kept_blocks), kept_total)
    assert list(store.cids()) == []


def test_gc_keeps_the_present_part_of_an_incomplete_dag(store: Blockstore) -> None:
    root = _put_dag(store, os.urandom(5 * 1024))
    blocks = list(unixfs.walk(store.get, root))
    missing_child = blocks[-1][0]
    store.delete(missing_child)
    present = {str(c) for c in store.cids()}
    assert store.gc([root]) == (0, 0)
    assert {str(c) for c in store.cids()} == present


def test_gc_keeps_a_malformed_block_a_root_names_and_what_roots_share(store: Blockstore) -> None:
    """A malformed dag-pb block reachable from a root is kept (it links nowhere); a DAG
    shared by two roots is kept while either root is."""
    bad = block_cid(DAG_PB, b"\xff not a dag-pb node")
    store.put(bad, b"\xff not a dag-pb node")
    shared = _put_dag(store, os.urandom(3 * 1024))
    root = dagpb.encode_node([Link(bad, "bad", 1), Link(shared, "shared", 1)], b"\x08\x01")
    root_cid = block_cid(DAG_PB, root)
    store.put(root_cid, root)
    garbage = _put_dag(store, os.urandom(2 * 1024))
    shared_blocks = {str(c) for c, _ in unixfs.walk(store.get, shared)}
    garbage_blocks = len(list(unixfs.walk(store.get, garbage)))

    assert store.gc([root_cid, shared])[0] == garbage_blocks
    assert {str(c) for c in store.cids()} == {str(root_cid), str(bad)} | shared_blocks
    assert store.gc([shared]) == (2, len(root) + len(b"\xff not a dag-pb node"))


def test_fs_store_persists_and_shards(tmp_path: Path) -> None:
    cids = []
    first = FsBlockstore(tmp_path / "blocks")
    for i in range(20):
        cid, data = raw_block(f"block {i}".encode())
        first.put(cid, data)
        cids.append(cid)
    again = FsBlockstore(tmp_path / "blocks")
    assert {str(c) for c in again.cids()} == {str(c) for c in cids}
    assert again.get(cids[3]) == b"block 3"
    files = [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()]
    assert len(files) == 20
    assert all(p.parent.parent == tmp_path / "blocks" and len(p.parent.name) == 2 for p in files)
    assert len({p.parent for p in files}) > 1  # spread over shards, not one directory


def _enospc(*args: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("syscall", ["write", "fsync"])
def test_full_disk_leaves_no_partial_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syscall: str
) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    cid, data = raw_block(os.urandom(300_000))
    monkeypatch.setattr(os, syscall, _enospc)
    with pytest.raises(BlockWriteError, match="disk is full") as info:
        store.put(cid, data)
    monkeypatch.undo()
    assert isinstance(info.value, StorageError)
    assert not store.has(cid)
    assert [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()] == []
    assert store.put(cid, data) is True  # space is back: the retry works
    assert store.get(cid) == data


def test_gc_removes_temporary_files_left_by_a_crash(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    cid, data = raw_block(b"kept")
    store.put(cid, data)
    shard = next(p for p in (tmp_path / "blocks").iterdir() if p.is_dir())
    (shard / ".tmp-deadbeef").write_bytes(b"half a blo")
    assert [str(c) for c in store.cids()] == [str(cid)]  # never listed as a block
    store.gc([cid])
    assert [p.name for p in shard.iterdir()] == [str(cid)]
    assert not (shard / ".tmp-deadbeef").exists()
    assert store.get(cid) == b"kept"


@settings(max_examples=50, deadline=None)
@given(
    codec=st.sampled_from([RAW, DAG_PB, 0x71]),
    digest=st.binary(min_size=32, max_size=32),
)
def test_fast_cid_path_equals_multiformats(codec: int, digest: bytes) -> None:
    ours = make_cid(codec, 0x12, digest)
    theirs = CID("base32", 1, codec, multihash.wrap(digest, "sha2-256"))
    assert ours == theirs and str(ours) == str(theirs) and bytes(ours) == bytes(theirs)
    assert decode_cid(bytes(theirs)) == theirs
    # Decoded CIDs are remembered: a second decode, from any buffer, is the same CID.
    assert decode_cid(memoryview(bytes(theirs))) == theirs == decode_cid(bytearray(bytes(theirs)))
    v0 = theirs.set(version=0, base="base58btc") if codec == DAG_PB else None
    if v0 is not None:
        assert decode_cid(bytes(v0)) == v0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01",
        b"\x01\x55\x12\x20" + bytes(31),
        b"\x02\x55\x12\x20" + bytes(32),
        b"\x01\x55\x12\x10" + bytes(16),
        b"\x01\x80\x00",
        b"\x12\x20" + bytes(31),
        b"\x01\x55\x12\x20" + bytes(33),
    ],
)
def test_decode_cid_rejects_malformed_bytes(raw: bytes) -> None:
    for _ in range(2):  # a refusal is not remembered as a CID
        with pytest.raises(InvalidCID):
            decode_cid(raw)
