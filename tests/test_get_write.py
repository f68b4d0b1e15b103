"""Writing a fetched UnixFS DAG as `ipfs get` does, and refusing names unsafe as paths.

Real blocks in a real (filesystem) blockstore; DAGs built by hand where a
hostile author would: `..` and `/` in names, a symlink, a HAMT shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from multiformats import CID

from benchsync.daemon.cli.common import CLIError
from benchsync.daemon.cli.get import write_dag
from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import FsBlockstore
from benchsync.storage.cid import DAG_PB, block_cid


def node(store: FsBlockstore, links: list[dagpb.Link], fs_type: int, data: bytes | None = None
         ) -> CID:  # fmt: skip
    block = dagpb.encode_node(links, dagpb.encode_unixfs(fs_type, data=data))
    cid = block_cid(DAG_PB, block)
    store.put(cid, block)
    return cid


def test_files_directories_and_symlinks_are_written(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    big = os.urandom(600_000)
    fcid, _, ftsize = unixfs.add_bytes(big, store.put)
    link = node(store, [], dagpb.TYPE_SYMLINK, b"big.bin")
    sub, subsize = unixfs.add_directory([("big.bin", fcid, ftsize)], store.put)
    root, _ = unixfs.add_directory([("data", sub, subsize), ("latest", link, 10)], store.put)
    out = tmp_path / "out"
    assert write_dag(store.get, root, out) == len(big)
    assert (out / "data" / "big.bin").read_bytes() == big
    assert os.readlink(out / "latest") == "big.bin"
    assert not (tmp_path / ".out.partial").exists()
    single = tmp_path / "single"
    assert write_dag(store.get, fcid, single) == len(big) and single.read_bytes() == big


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "nul\0"])
def test_unsafe_names_stop_the_write_and_leave_nothing(tmp_path: Path, name: str) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    fcid, _, ftsize = unixfs.add_bytes(b"payload", store.put)
    root = node(store, [dagpb.Link(fcid, "ok", ftsize), dagpb.Link(fcid, name, ftsize)],
                dagpb.TYPE_DIRECTORY)  # fmt: skip
    out = tmp_path / "dest" / "out"
    out.parent.mkdir()
    with pytest.raises(CLIError, match="not a safe file name"):
        write_dag(store.get, root, out)
    assert list(out.parent.iterdir()) == []  # neither out nor its .partial
    assert not (tmp_path / "payload").exists()


def test_hamt_shards_are_refused_with_a_hint(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    shard = node(store, [], dagpb.TYPE_HAMT_SHARD)
    with pytest.raises(CLIError, match="HAMT"):
        write_dag(store.get, shard, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_names_do_not_overwrite(tmp_path: Path) -> None:
    store = FsBlockstore(tmp_path / "blocks")
    a, _, at = unixfs.add_bytes(b"first", store.put)
    b, _, bt = unixfs.add_bytes(b"second", store.put)
    root = node(store, [dagpb.Link(a, "x", at), dagpb.Link(b, "x", bt)], dagpb.TYPE_DIRECTORY)
    with pytest.raises(FileExistsError):
        write_dag(store.get, root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_get_reads_the_blockstore_the_dataset_writes(tmp_path: Path) -> None:
    """`get` opens `<home>/blocks` without DuckDB: the same store `LocalDataset` uses."""
    from benchsync.daemon.cli.get import home_blockstore
    from benchsync.storage.dataset import LocalDataset

    with LocalDataset(tmp_path / "home", "dataset") as ds:
        cid, _, _ = unixfs.add_bytes(b"stored by the dataset", ds.blocks.put)
        assert Path(ds.blocks.root) == home_blockstore(tmp_path / "home").root  # type: ignore[attr-defined]
    assert home_blockstore(tmp_path / "home").get(cid) == b"stored by the dataset"
    with pytest.raises(CLIError, match="not a benchsync data directory"):
        home_blockstore(tmp_path / "typo")


def test_a_writer_follows_the_fetch_and_writes_blocks_as_they_are_stored(
    tmp_path: Path,
) -> None:
    """Without a node, `get` writes while the blocks arrive: a block the writer needs
    before it is stored is waited for, not a failure."""
    from benchsync.daemon.cli.get import _Arrivals, _Writer

    source = FsBlockstore(tmp_path / "source")
    big = os.urandom(1_500_000)
    fcid, _, ftsize = unixfs.add_bytes(big, source.put)
    root, _ = unixfs.add_directory([("big.bin", fcid, ftsize)], source.put)
    blocks = list(unixfs.walk(source.get, root))
    store = FsBlockstore(tmp_path / "blocks")
    arrivals = _Arrivals(store)
    writer = _Writer(arrivals, root, tmp_path / "out")
    writer.start()
    for cid, data in blocks:  # the fetch: one block at a time, the writer waiting on each
        store.put(cid, data)
        arrivals.stored()
    arrivals.finish()
    writer.join()
    assert writer.error is None and writer.written == len(big)
    assert (tmp_path / "out" / "big.bin").read_bytes() == big

    # A fetch that ends without a block: the waiting writer stops and leaves nothing.
    partial = FsBlockstore(tmp_path / "partial")
    arrivals = _Arrivals(partial)
    writer = _Writer(arrivals, root, tmp_path / "out2")
    writer.start()
    for cid, data in blocks[:-1]:
        partial.put(cid, data)
        arrivals.stored()
    arrivals.finish()
    writer.join()
    assert isinstance(writer.error, CLIError) and "cannot write" in str(writer.error)
    assert not (tmp_path / "out2").exists() and not (tmp_path / ".out2.partial").exists()
