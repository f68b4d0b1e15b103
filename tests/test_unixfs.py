"""UnixFS builder and reader: CIDs equal to Kubo/ipfs-car, streaming memory, round trips, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from multiformats import CID

from benchsync.daemon.cli import main
from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import MemoryBlockstore
from benchsync.storage.cid import DAG_PB, block_cid
from benchsync.storage.dagpb import links
from benchsync.storage.errors import NotFound, TooLarge

VECTORS = json.loads((Path(__file__).parent / "vectors" / "unixfs.json").read_text())
SEED = b"ipfs-interop-vectors-v1"
LARGEST = max(f["size"] for f in VECTORS["files"])
EMPTY_DIR_V1 = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"  # well known
PROFILES = {"kubo_v1": {}, "ipfscar": {"chunk_size": 1024 * 1024, "max_links": 1024}}


class VectorStream(io.RawIOBase):
    """The vectors' input bytes, generated on the fly: sha256(seed + i.to_bytes(8)) for i = 0.."""

    def __init__(self, seed: bytes, size: int) -> None:
        self.seed, self.left, self.counter, self.pending = seed, size, 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        if len(self.pending) < n:
            count = (n - len(self.pending)) // 32 + 1
            sha = hashlib.sha256
            fresh = b"".join(
                sha(self.seed + (self.counter + k).to_bytes(8, "big")).digest()
                for k in range(count)
            )
            self.counter += count
            self.pending += fresh
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.left -= n
        return n


def vector_bytes(seed: bytes, size: int) -> bytes:
    return VectorStream(seed, size).read()


class Prefix(io.RawIOBase):
    """The first `size` bytes of a file (all vector inputs are prefixes of one byte sequence)."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = self.f.readinto(buf[: min(len(buf), self.left)])
        self.left -= n
        return n


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The longest vector input on disk, generated once; shorter inputs are its prefixes."""
    path = tmp_path_factory.mktemp("vectors") / "input.bin"
    src = io.BufferedReader(VectorStream(SEED, LARGEST), 1 << 20)
    with path.open("wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return path


def discard(cid: CID, data: bytes) -> None:
    pass


def _file_cases() -> Iterator[object]:
    for f in VECTORS["files"]:
        for profile in PROFILES:
            if profile in f:
                marks = [pytest.mark.slow] if f["size"] == LARGEST else []
                yield pytest.param(f, profile, id=f"{f['name']}-{profile}", marks=marks)


@pytest.mark.parametrize(("vector", "profile"), list(_file_cases()))
def test_file_cids_equal_ipfs_tools(vector: dict, profile: str, vector_file: Path) -> None:
    with vector_file.open("rb") as f:
        stream = io.BufferedReader(Prefix(f, vector["size"]))
        cid, size, _ = unixfs.add_file(stream, discard, **PROFILES[profile])
    assert str(cid) == vector[profile]
    assert size == vector["size"]


def _write_vector_dir(root: Path) -> Path:
    d = root / "dir"
    d.mkdir()
    (d / "a.parquet").write_bytes(vector_bytes(b"a.parquet", 300000))
    (d / "b.parquet").write_bytes(vector_bytes(b"b.parquet", 1024))
    return d


@pytest.mark.parametrize("profile", list(PROFILES))
def test_directory_cid_equals_ipfs_tools(tmp_path: Path, profile: str) -> None:
    vector = VECTORS["directories"][0]
    d = _write_vector_dir(tmp_path)
    assert str(unixfs.add_path(d, discard, **PROFILES[profile])) == vector[profile]


def test_add_directory_from_entries_matches_kubo(tmp_path: Path) -> None:
    vector = VECTORS["directories"][0]
    d = _write_vector_dir(tmp_path)
    entries = []
    # Given in reverse order: the builder must sort by name itself.
    for name in ("b.parquet", "a.parquet"):
        with (d / name).open("rb") as f:
            cid, _, tsize = unixfs.add_file(f, discard)
        assert str(cid) == vector["kubo_v1_file_cids"][f"dir/{name}"]
        entries.append((name, cid, tsize))
    cid, _ = unixfs.add_directory(entries, discard)
    assert str(cid) == vector["kubo_v1"]


def test_known_small_cids() -> None:
    cid, size, tsize = unixfs.add_bytes(b"hello world\n", discard)
    assert str(cid) == VECTORS["known"]["hello world\\n (12 bytes)"]["kubo_v1"]
    assert (size, tsize) == (12, 12)
    assert str(unixfs.add_directory([], discard)[0]) == EMPTY_DIR_V1


def test_dotfiles_skipped_unless_hidden(tmp_path: Path) -> None:
    d = _write_vector_dir(tmp_path)
    (d / ".DS_Store").write_bytes(b"junk")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    assert str(unixfs.add_path(d, discard)) == VECTORS["directories"][0]["kubo_v1"]
    blocks = MemoryBlockstore()
    with_hidden = unixfs.add_path(d, blocks.put, hidden=True)
    names = [name for name, _, _ in unixfs.list_directory(blocks.get, with_hidden)]
    assert names == [".DS_Store", ".git", "a.parquet", "b.parquet"]


def test_put_order_leaves_first_and_tsize_is_dag_size() -> None:
    order: list[CID] = []
    blocks: dict[CID, bytes] = {}

    def put(cid: CID, data: bytes) -> None:
        order.append(cid)
        blocks[cid] = data

    # 2 levels of internal nodes with tiny parameters: 4-byte chunks, 3 links
    data = os.urandom(512)
    cid, size, tsize = unixfs.add_bytes(data, put, chunk_size=4, max_links=3)
    assert size == len(data)
    assert order[-1] == cid
    position = {c: i for i, c in enumerate(order)}
    for parent in order:
        for child in links(parent, blocks[parent]):
            assert position[child] < position[parent]
    assert tsize == sum(len(b) for b in blocks.values())
    assert b"".join(unixfs.cat(blocks.__getitem__, cid)) == data


@pytest.mark.parametrize("leaves", [1, 2, 3, 4, 9, 10, 27, 28, 30])
def test_balanced_shape_reads_back(leaves: int) -> None:
    """Around every power of max_links the tree must still hold every byte, in order."""
    blocks = MemoryBlockstore()
    data = os.urandom(leaves * 4 - 1)
    cid, _, _ = unixfs.add_bytes(data, blocks.put, chunk_size=4, max_links=3)
    assert b"".join(unixfs.cat(blocks.get, cid)) == data
    # every node's children are either all leaves or all nodes of one height
    depth = 0
    node = cid
    while node.codec.code == dagpb.DAG_PB:
        links, _ = dagpb.decode_node(blocks.get(node))
        assert 1 <= len(links) <= 3
        node = links[0].cid
        depth += 1
    expected_depth = 0
    while 3**expected_depth < leaves:
        expected_depth += 1
    assert depth == expected_depth


def _peak_memory_of_add(vector_file: Path, size: int) -> tuple[CID, int]:
    with vector_file.open("rb") as f:
        stream = io.BufferedReader(Prefix(f, size))
        tracemalloc.start()
        try:
            cid, got, _ = unixfs.add_file(stream, discard)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got == size
    return cid, peak


def test_streaming_memory_stays_far_below_file_size(vector_file: Path) -> None:
    size = 50 * 1024 * 1024
    cid, peak = _peak_memory_of_add(vector_file, size)
    assert str(cid) == next(f for f in VECTORS["files"] if f["size"] == size)["kubo_v1"]
    # A few chunks in flight (read buffer, current chunk), never the file.
    assert peak < 8 * unixfs.CHUNK_SIZE, f"peak {peak} bytes for a {size}-byte file"
    _, small_peak = _peak_memory_of_add(vector_file, size // 10)
    assert peak < small_peak + 1024 * 1024, "memory grows with the file size"


def test_walk_list_resolve_cat_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "snap"
    (root / "tables").mkdir(parents=True)
    models = os.urandom(700_000)
    (root / "tables" / "models.parquet").write_bytes(models)
    (root / "manifest.json").write_bytes(b'{"seq": 1}')
    blocks = MemoryBlockstore()
    cid = unixfs.add_path(root, blocks.put)

    walked = list(unixfs.walk(blocks.get, cid))
    assert walked[0][0] == cid
    assert {str(c) for c, _ in walked} == {str(c) for c in blocks.cids()}
    seen: set[CID] = set()
    for parent, data in walked:  # parents before children
        seen.add(parent)
        for child in links(parent, data):
            assert child not in seen

    listing = unixfs.list_directory(blocks.get, cid)
    assert [name for name, _, _ in listing] == ["manifest.json", "tables"]
    file_cid = unixfs.resolve(blocks.get, cid, "tables/models.parquet")
    assert b"".join(unixfs.cat(blocks.get, file_cid)) == models
    assert unixfs.resolve(blocks.get, cid, "") == cid
    with pytest.raises(NotFound, match="missing.parquet"):
        unixfs.resolve(blocks.get, cid, "tables/missing.parquet")
    with pytest.raises(unixfs.UnixFSError, match="not a directory"):
        unixfs.resolve(blocks.get, cid, "manifest.json/x")
    with pytest.raises(unixfs.UnixFSError, match="not a file"):
        list(unixfs.cat(blocks.get, cid))


def test_identical_files_are_stored_once_and_walked_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("x", "y"):
        (tmp_path / "d" / name).write_bytes(b"same" * 100_000)
    blocks = MemoryBlockstore()
    cid = unixfs.add_path(tmp_path / "d", blocks.put)
    walked = [c for c, _ in unixfs.walk(blocks.get, cid)]
    assert len(walked) == len(set(walked)) == len(list(blocks.cids()))


def test_symlink_is_stored_as_a_link_not_followed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "target").write_bytes(b"data")
    (tmp_path / "d" / "alias").symlink_to("target")
    blocks = MemoryBlockstore()
    cid = unixfs.add_path(tmp_path / "d", blocks.put)
    alias = unixfs.resolve(blocks.get, cid, "alias")
    _, data = dagpb.decode_node(blocks.get(alias))
    fs = dagpb.decode_unixfs(data or b"")
    assert (fs.type, fs.data) == (dagpb.TYPE_SYMLINK, b"target")


def test_directory_entry_errors() -> None:
    cid, _, _ = unixfs.add_bytes(b"x", discard)
    with pytest.raises(unixfs.UnixFSError, match="duplicate"):
        unixfs.add_directory([("a", cid, 1), ("a", cid, 1)], discard)
    with pytest.raises(unixfs.UnixFSError, match="invalid directory entry name"):
        unixfs.add_directory([("a/b", cid, 1)], discard)
    # Kubo would shard this directory (> 256 KiB of links); we refuse instead of lying.
    many = [(f"{i:0200d}", cid, 1) for i in range(1200)]
    with pytest.raises(TooLarge, match="HAMT"):
        unixfs.add_directory(many, discard)


def test_cli_cid_prints_kubo_cid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write_vector_dir(tmp_path)
    (d / ".hidden").write_bytes(b"x")
    assert main(["cid", str(d)]) == 0
    assert capsys.readouterr().out.strip() == VECTORS["directories"][0]["kubo_v1"]
    assert main(["cid", str(d / "b.parquet")]) == 0
    assert (
        capsys.readouterr().out.strip()
        == VECTORS["directories"][0]["kubo_v1_file_cids"]["dir/b.parquet"]
    )
    assert main(["cid", "--hidden", str(d)]) == 0
    assert capsys.readouterr().out.strip() != VECTORS["directories"][0]["kubo_v1"]


def test_cli_cid_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cid", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "Error:" in err and "does not exist" in err and "Try:" in err


def test_walk_stops_at_the_frontier_of_what_is_held() -> None:
    """One walk serves both uses: every block, or only up to the blocks a store lacks."""
    store = MemoryBlockstore()
    root, _, _ = unixfs.add_bytes(bytes(range(40)), store.put, chunk_size=4, max_links=3)
    order = [cid for cid, _ in unixfs.walk(store.get, root)]
    assert order[0] == root and len(order) == len(set(order))
    leaf_parent = next(c for c in order if c != root and c.codec.code == DAG_PB)
    held = set(order) - {leaf_parent}
    missing: list[CID] = []
    walked = [c for c, _ in unixfs.walk(store.get, root, has=held.__contains__, missing=missing)]
    assert missing == [leaf_parent] == unixfs.frontier(store.get, held.__contains__, root)
    assert leaf_parent not in walked and set(walked) < held


def test_frontier_reads_inner_nodes_only() -> None:
    """Whether a DAG is whole is a question for its inner nodes: a held raw leaf links
    nowhere, so the fetch's and the install's completeness walks never read one (they
    read and hashed every byte of a replica twice more)."""
    store = MemoryBlockstore()
    root, _, _ = unixfs.add_bytes(os.urandom(40), store.put, chunk_size=4, max_links=3)
    read: list[CID] = []

    def get(cid: CID) -> bytes:
        read.append(cid)
        return store.get(cid)

    assert unixfs.frontier(get, store.has, root) == []
    assert read and all(c.codec.code == DAG_PB for c in read)
    leaves = [c for c, _ in unixfs.walk(store.get, root) if c.codec.code != DAG_PB]
    store.delete(leaves[3])
    assert unixfs.frontier(get, store.has, root) == [leaves[3]]


def test_distinct_bytes_by_stored_sizes_reads_no_leaf() -> None:
    """The expansion check of a file just received measures its leaves by the store's
    sizes instead of reading and hashing them again; the figure is the same."""
    store = MemoryBlockstore()
    data = os.urandom(30) * 3  # repeated chunks: fewer distinct leaves than positions
    root, _, _ = unixfs.add_bytes(data, store.put, chunk_size=10, max_links=3)
    read: list[CID] = []

    def get(cid: CID) -> bytes:
        read.append(cid)
        return store.get(cid)

    by_reading = unixfs.distinct_bytes(store.get, root)
    assert by_reading < len(data)
    assert unixfs.distinct_bytes(get, root, store.size) == by_reading
    assert read and all(c.codec.code == DAG_PB for c in read)
    leaf, _, _ = unixfs.add_bytes(b"one raw block", store.put)
    assert unixfs.distinct_bytes(get, leaf, store.size) == len(b"one raw block")


def _levels(get: unixfs.GetBlock, root: CID) -> list[list[CID]]:
    """The DAG's blocks level by level, read with the dag-pb decoder alone."""
    levels, level = [], [root]
    while level:
        levels.append(level)
        level = [child for cid in level for child in links(cid, get(cid))]
    return levels


def test_walk_breadth_first_goes_level_by_level_and_frontier_stops_at_the_limit() -> None:
    """The fetch asks for the shallowest missing blocks first, at most `limit` per round."""
    store = MemoryBlockstore()
    data = os.urandom(40)
    root, _, _ = unixfs.add_bytes(data, store.put, chunk_size=4, max_links=3)  # 10 leaves, 4 levels
    levels = _levels(store.get, root)
    assert [len(level) for level in levels] == [1, 2, 4, 10]
    bfs = [cid for cid, _ in unixfs.walk(store.get, root, order=unixfs.BREADTH_FIRST)]
    dfs = [cid for cid, _ in unixfs.walk(store.get, root)]
    assert bfs == [cid for level in levels for cid in level]
    assert set(dfs) == set(bfs) and dfs != bfs and dfs[-1] == levels[-1][-1]

    held = {root, *levels[1]}.__contains__
    frontier = unixfs.frontier(store.get, held, root, order=unixfs.BREADTH_FIRST, limit=3)
    assert frontier == levels[2][:3]
    assert unixfs.frontier(store.get, held, root, order=unixfs.BREADTH_FIRST) == levels[2]
    assert unixfs.frontier(store.get, held, root, limit=0) == []
    assert unixfs.frontier(store.get, lambda c: False, root, limit=5) == [root]


def test_walk_over_several_roots_visits_shared_blocks_once_first_root_first() -> None:
    store = MemoryBlockstore()
    a, _, _ = unixfs.add_bytes(b"a" * 12 + b"b" * 8, store.put, chunk_size=4, max_links=8)
    b, _, _ = unixfs.add_bytes(b"b" * 8, store.put, chunk_size=4, max_links=8)
    both = [cid for cid, _ in unixfs.walk(store.get, a, b)]
    assert both[0] == a and both[-1] == b  # b's only leaf ("bbbb") was already seen under a
    assert len(both) == len(set(both)) == 1 + 2 + 1  # a, leaves aaaa and bbbb, b


def test_walk_raises_on_a_malformed_node_unless_told_to_treat_it_as_a_leaf() -> None:
    store = MemoryBlockstore()
    junk = b"\xff not a dag-pb node"
    bad = block_cid(DAG_PB, junk)
    store.put(bad, junk)
    directory = dagpb.encode_unixfs(dagpb.TYPE_DIRECTORY)
    root = dagpb.encode_node([dagpb.Link(bad, "bad", len(junk))], directory)
    root_cid = block_cid(DAG_PB, root)
    store.put(root_cid, root)
    with pytest.raises(dagpb.DagPbError):
        list(unixfs.walk(store.get, root_cid))
    assert list(unixfs.walk(store.get, root_cid, malformed_as_leaf=True)) == [
        (root_cid, root), (bad, junk)]  # fmt: skip
