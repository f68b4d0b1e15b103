"""Hostile snapshots: verified blocks whose names, shapes and sizes are meant to hurt.

A CID proves the bytes, not their meaning. Each test crafts a snapshot a peer
could send (a path in a link name, SQL in a table name, a duplicate or unlisted
file, a manifest lying about bytes or rows, a DAG bomb, a Parquet bomb) into a
real blockstore, feeds it to a real consumer (`materialize_tables`,
`ReplicaStore.install` through `LocalDataset.install_replica`, and
`LocalDataset.restore`), and checks what a user would notice: a typed error,
nothing written outside the destination, no table in the node's database and
no partial output left behind.

Bombs run in a child process under RLIMIT_FSIZE/RLIMIT_AS and, as root, on a
small tmpfs in a private mount namespace (`unshare -m`): if the defence
regresses, the test fails on the limit instead of filling CI's disk or memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from multiformats import CID

from benchsync.storage import dagpb, unixfs
from benchsync.storage.blockstore import Blockstore, MemoryBlockstore
from benchsync.storage.cid import DAG_PB, RAW, block_cid
from benchsync.storage.dagpb import Link
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.errors import NotFound, TooLarge
from benchsync.storage.snapshot import (
    FORMAT,
    BadSnapshot,
    SnapshotError,
    SnapshotTooLarge,
    materialize_tables,
    read_version,
)

OWN = "12D3KooWTrustOwnDatasetAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
PEER = "12D3KooWHostilePeerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
CHILD_FSIZE = 64 * 1024 * 1024  # bytes a bomb child may write in any one file
CHILD_TMPFS = "256m"  # the child's whole disk when it runs in its own mount namespace
CHILD_AS = 4 * 1024**3  # bytes of address space (DuckDB and pyarrow reserve a lot up front)
CHILD_TIMEOUT = 120.0  # seconds


# --- building snapshots by hand --------------------------------------------------------


def put(store: Blockstore, codec: int, data: bytes) -> CID:
    cid = block_cid(codec, data)
    store.put(cid, data, verify=False)
    return cid


def raw_directory(store: Blockstore, entries: list[tuple[str, CID, int]]) -> tuple[CID, int]:
    """A UnixFS directory block with exactly these links: no sorting, no name checks."""
    block = dagpb.encode_node(
        [Link(cid, name, tsize) for name, cid, tsize in entries],
        dagpb.encode_unixfs(dagpb.TYPE_DIRECTORY),
    )
    return put(store, DAG_PB, block), len(block) + sum(t for _, _, t in entries)


def parquet(sql: str, tmp: Path, conn: Any = None) -> bytes:
    path = tmp / f"scratch-{os.urandom(4).hex()}.parquet"
    (conn or duckdb).sql(f"COPY ({sql}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
    data = path.read_bytes()
    path.unlink()
    return data


def rows_of(data: bytes, tmp: Path) -> int:
    path = tmp / f"rows-{os.urandom(4).hex()}.parquet"
    path.write_bytes(data)
    try:
        return pq.ParquetFile(path).metadata.num_rows
    finally:
        path.unlink()


def hostile_snapshot(
    store: Blockstore,
    files: list[tuple[str, bytes | CID]],
    tmp: Path,
    *,
    tables: dict[str, dict[str, Any]] | None = None,
    lie: dict[str, dict[str, Any]] | None = None,
    dataset: str = PEER,
) -> str:
    """Root CID of a snapshot whose tables/ links are `files` (name -> bytes or a file CID).

    The manifest lists each `<name>.parquet` honestly unless `tables` replaces it
    or `lie` overrides fields of one table's entry.
    """
    entries = []
    honest: dict[str, dict[str, Any]] = {}
    for name, content in files:
        if isinstance(content, CID):
            cid, size, tsize = content, 0, 0
            rows = 0
        else:
            cid, size, tsize = unixfs.add_bytes(content, store.put)
            try:
                rows = rows_of(content, tmp)
            except Exception:
                rows = 0
        entries.append((name, cid, tsize))
        honest[name.removesuffix(".parquet")] = {"rows": rows, "bytes": size, "cid": str(cid)}
    doc_tables = tables if tables is not None else honest
    for table, fields in (lie or {}).items():
        doc_tables[table] = {**doc_tables[table], **fields}
    manifest = {
        "format": FORMAT,
        "dataset": dataset,
        "seq": 1,
        "parent": None,
        "created_at": 0.0,
        "schema_version": 1,
        "tables": doc_tables,
    }
    mcid, _, mtsize = unixfs.add_bytes(json.dumps(manifest).encode(), store.put)
    tables_cid, tables_tsize = raw_directory(store, entries)
    root, _ = raw_directory(
        store, [("manifest.json", mcid, mtsize), ("tables", tables_cid, tables_tsize)]
    )
    return str(root)


def diamond(store: Blockstore, levels: int, fanout: int, *, claims: bool = True) -> CID:
    """A file DAG of `levels` nodes, each linking `fanout` times to the one below.

    It stores one 256 KiB leaf and `levels` small nodes, and expands to
    fanout**levels leaves. With `claims` every node states consistent
    filesize/blocksizes (so only a byte bound stops it); without, none.
    """
    leaf = os.urandom(unixfs.CHUNK_SIZE)
    child = put(store, RAW, leaf)
    child_size = len(leaf)
    for _ in range(levels):
        if claims:
            data = dagpb.encode_unixfs(
                dagpb.TYPE_FILE, filesize=child_size * fanout, blocksizes=[child_size] * fanout
            )
        else:
            data = dagpb.encode_unixfs(dagpb.TYPE_FILE)
        child = put(store, DAG_PB, dagpb.encode_node([Link(child, "", 0)] * fanout, data))
        child_size *= fanout
    return child


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}


@pytest.fixture
def ds(tmp_path: Path):
    with LocalDataset(tmp_path / "node", OWN) as dataset:
        dataset.db.ingest_records(
            "perf",
            [
                {"model_name": "bert", "hardware_type": "cpu", "batch_size": 1,
                 "precision": "fp32", "test_case": "t", "throughput": 10.0}
            ],
        )
        yield dataset


def db_tables(ds: LocalDataset) -> set[str]:
    with ds.db.reader() as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }


# --- names: paths and SQL --------------------------------------------------------------

HOSTILE_NAMES = [
    "../evil",
    "ABS/evil",  # replaced by an absolute path under tmp_path
    "x\"; COPY (SELECT 42) TO 'pwned.csv';--",
    "x'); COPY (SELECT 42) TO 'pwned.csv';--",
    'quo"te',
    "Models",
    "sub/../evil",
    "",
]


def _name(template: str, tmp_path: Path) -> str:
    return template.replace("ABS", str(tmp_path / "abs"))


def _assert_nothing_escaped(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("evil*")), "a file was written outside its destination"
    assert not list(tmp_path.rglob("pwned.csv")), "SQL from a table name ran"


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_name_is_refused_by_replica_install(
    ds: LocalDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative COPY target would land
    (tmp_path / "abs").mkdir()
    name = _name(template, tmp_path)
    data = parquet("SELECT 1 AS a", tmp_path)
    root = hostile_snapshot(ds.blocks, [(f"{name}.parquet", data)], tmp_path)
    before = db_tables(ds)
    with pytest.raises(BadSnapshot):
        ds.install_replica(root)
    _assert_nothing_escaped(tmp_path)
    assert files_under(ds.replicas.root) == set()
    assert ds.replicas.all() == []
    assert db_tables(ds) == before


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_name_is_refused_by_restore(
    ds: LocalDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "abs").mkdir()
    name = _name(template, tmp_path)
    data = parquet("SELECT 1 AS a", tmp_path)
    root = hostile_snapshot(ds.blocks, [(f"{name}.parquet", data)], tmp_path, dataset=OWN)
    before = db_tables(ds)
    with pytest.raises(SnapshotError):
        ds.restore(root)
    _assert_nothing_escaped(tmp_path)
    assert db_tables(ds) == before
    assert ds.head() is None
    assert files_under(ds.tmp) == set()
    assert not list(ds.home.glob(".restore-*"))


def test_table_name_with_quote_in_manifest_only_is_refused(ds: LocalDataset, tmp_path) -> None:
    data = parquet("SELECT 1 AS a", tmp_path)
    root = hostile_snapshot(
        ds.blocks,
        [("notes.parquet", data)],
        tmp_path,
        tables={'no"tes': {"rows": 1, "bytes": len(data), "cid": "x"}},
    )
    with pytest.raises(BadSnapshot, match="not allowed"):
        read_version(ds.blocks, root)


def test_node_local_schema_table_is_refused(ds: LocalDataset, tmp_path: Path) -> None:
    data = parquet("SELECT 99 AS version", tmp_path)
    root = hostile_snapshot(ds.blocks, [("schema_version.parquet", data)], tmp_path, dataset=OWN)
    with pytest.raises(BadSnapshot, match="node-local"):
        ds.restore(root)


# --- shape: duplicates, unlisted and missing files ---------------------------------------


def _materialize(ds: LocalDataset, root: str, dest: Path) -> dict[str, Path]:
    return materialize_tables(ds.blocks, read_version(ds.blocks, root), dest)


@pytest.mark.parametrize(
    ("links", "tables", "match"),
    [
        (["notes.parquet", "notes.parquet"], None, "twice"),
        (["notes.parquet", "extra.parquet"], ["notes"], "not listed"),
        (["notes.parquet", "README.txt"], ["notes"], "unexpected entry"),
        (["notes.parquet"], ["notes", "other"], "absent"),
        (["notes"], ["notes"], "segment layout"),
    ],
)
def test_directory_must_match_the_manifest(
    ds: LocalDataset, tmp_path: Path, links: list[str], tables: list[str] | None, match: str
) -> None:
    data = parquet("SELECT 1 AS a", tmp_path)
    root = hostile_snapshot(ds.blocks, [(n, data) for n in links], tmp_path)
    if tables is not None:
        cid = str(unixfs.add_bytes(data, lambda c, d: None)[0])
        root = hostile_snapshot(
            ds.blocks,
            [(n, data) for n in links],
            tmp_path,
            tables={t: {"rows": 1, "bytes": len(data), "cid": cid} for t in tables},
        )
    dest = tmp_path / "dest"
    with pytest.raises(BadSnapshot, match=match):
        _materialize(ds, root, dest)
    assert not dest.exists()
    with pytest.raises(BadSnapshot, match=match):
        ds.install_replica(root)
    assert files_under(ds.replicas.root) == set()


# --- sizes: the manifest's claims are enforced ------------------------------------------


def test_manifest_understating_bytes_is_refused_without_partial_output(
    ds: LocalDataset, tmp_path: Path
) -> None:
    data = parquet("SELECT range AS a, random() AS b FROM range(100000)", tmp_path)
    assert len(data) > 2 * unixfs.CHUNK_SIZE
    root = hostile_snapshot(
        ds.blocks, [("notes.parquet", data)], tmp_path, lie={"notes": {"bytes": 1000}}
    )
    dest = tmp_path / "dest"
    with pytest.raises(SnapshotTooLarge) as e:
        _materialize(ds, root, dest)
    assert e.value.limit == 1000 and e.value.got > 1000
    assert not dest.exists()


@pytest.mark.parametrize(
    ("lie", "match"),
    [
        ({"bytes": 10**9}, "too large|claims"),
        ({"rows": 7}, "rows"),
        ({"rows": -1}, "rows"),
        ({"bytes": 2**62}, "too large"),
        ({"cid": "bafkreigmrlswonzjzrstfhhejpwrgmw7sqdc533wvxpugrty6u4zorvozm"}, "manifest says"),
    ],
)
def test_manifest_lies_are_refused(
    ds: LocalDataset, tmp_path: Path, lie: dict[str, Any], match: str
) -> None:
    data = parquet("SELECT range AS a FROM range(10)", tmp_path)
    root = hostile_snapshot(ds.blocks, [("notes.parquet", data)], tmp_path, lie={"notes": lie})
    dest = tmp_path / "dest"
    with pytest.raises(BadSnapshot, match=match):
        _materialize(ds, root, dest)
    assert not dest.exists()


def test_honest_hand_made_snapshot_materializes(ds: LocalDataset, tmp_path: Path) -> None:
    """The builder above makes valid snapshots: the refusals are about the lies only."""
    data = parquet("SELECT range AS a FROM range(10)", tmp_path)
    root = hostile_snapshot(ds.blocks, [("notes.parquet", data)], tmp_path)
    files = _materialize(ds, root, tmp_path / "dest")
    assert files == {"notes": tmp_path / "dest" / "notes.parquet"}
    assert files["notes"].read_bytes() == data


# --- restore: typed errors for content that does not fit ----------------------------------


def _own_table_parquet(ds: LocalDataset, sql: str, tmp_path: Path) -> bytes:
    with ds.db.reader() as conn:
        return parquet(sql, tmp_path, conn)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (None, "not readable Parquet"),
        ("SELECT 'x' AS model_id, 'y' AS model_name", "model_id"),
        ("SELECT *, 1 AS evil FROM models", "newer schema"),
    ],
)
def test_restore_of_content_that_does_not_fit_is_a_typed_error(
    ds: LocalDataset, tmp_path: Path, sql: str | None, match: str
) -> None:
    data = b"this is not parquet" * 10 if sql is None else _own_table_parquet(ds, sql, tmp_path)
    root = hostile_snapshot(ds.blocks, [("models.parquet", data)], tmp_path, dataset=OWN)
    before = ds.db.table_counts()
    with pytest.raises(SnapshotError, match=match):
        ds.restore(root)
    assert ds.db.table_counts() == before
    assert files_under(ds.tmp) == set()
    assert not list(ds.home.glob(".restore-*"))


# --- HEAD.json and CID prefixes ------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b"not json", b"[]", b'{"cid": 5}', b"{}", b'{"cid": "garbage"}', b"\xff\xfe"]
)
def test_corrupt_head_is_a_typed_error(ds: LocalDataset, content: bytes) -> None:
    ds.snapshot()
    ds.snapshots.head_path.write_bytes(content)
    with pytest.raises(SnapshotError, match="HEAD.json"):
        ds.head()
    with pytest.raises(SnapshotError):
        ds.history()


@pytest.mark.parametrize("prefix", ["", "b", "bafybei"])
def test_empty_or_short_cid_prefix_names_no_version(ds: LocalDataset, prefix: str) -> None:
    ds.snapshot()
    head = ds.head()
    assert head is not None
    with pytest.raises(NotFound, match="too short"):
        ds.snapshots.find(prefix)
    with pytest.raises(NotFound):
        ds.restore(prefix)
    assert ds.head() == head
    assert ds.snapshots.find(head.cid[:20]) == head


# --- unixfs.cat holds a DAG to its claims ---------------------------------------------------


def test_cat_streams_exactly_the_expected_size() -> None:
    store = MemoryBlockstore()
    data = os.urandom(3 * unixfs.CHUNK_SIZE + 5)
    cid, size, _ = unixfs.add_bytes(data, store.put)
    assert b"".join(unixfs.cat(store.get, cid, size)) == data
    with pytest.raises(unixfs.FileTooLarge):
        list(unixfs.cat(store.get, cid, size - 1))
    with pytest.raises(unixfs.UnixFSError, match="ends after|claim"):
        list(unixfs.cat(store.get, cid, size + 1))


def test_cat_stops_a_diamond_at_the_expected_size() -> None:
    store = MemoryBlockstore()
    root = diamond(store, levels=40, fanout=2)  # claims 2**40 leaves, consistently
    produced = 0
    with pytest.raises(TooLarge) as e:
        for chunk in unixfs.cat(store.get, root, 10 * unixfs.CHUNK_SIZE):
            produced += len(chunk)
    assert produced == 0  # the root's claim is refused before a byte is read
    assert e.value.got == 2**40 * unixfs.CHUNK_SIZE


def test_cat_refuses_a_diamond_without_claims() -> None:
    store = MemoryBlockstore()
    root = diamond(store, levels=64, fanout=2, claims=False)  # 2**64 leaves
    with pytest.raises(unixfs.UnixFSError):
        list(unixfs.cat(store.get, root, 10 * unixfs.CHUNK_SIZE))
    with pytest.raises(unixfs.UnixFSError):
        list(unixfs.cat(store.get, root))


def test_cat_refuses_lying_and_empty_children() -> None:
    store = MemoryBlockstore()
    leaf = put(store, RAW, b"abc")
    empty = put(store, RAW, b"")
    lying = put(
        store,
        DAG_PB,
        dagpb.encode_node(
            [Link(leaf, "", 3)], dagpb.encode_unixfs(dagpb.TYPE_FILE, filesize=3, blocksizes=[4])
        ),
    )
    with pytest.raises(unixfs.UnixFSError, match="claims"):
        list(unixfs.cat(store.get, lying))
    with_empty = put(
        store,
        DAG_PB,
        dagpb.encode_node(
            [Link(leaf, "", 3), Link(empty, "", 0)],
            dagpb.encode_unixfs(dagpb.TYPE_FILE, filesize=3, blocksizes=[3, 0]),
        ),
    )
    with pytest.raises(unixfs.UnixFSError, match="empty child"):
        list(unixfs.cat(store.get, with_empty))


def test_cat_refuses_a_dag_deeper_than_the_limit() -> None:
    store = MemoryBlockstore()
    root = diamond(store, levels=unixfs.MAX_DAG_DEPTH + 1, fanout=1)
    with pytest.raises(unixfs.UnixFSError, match="deeper"):
        list(unixfs.cat(store.get, root))
    assert b"".join(unixfs.cat(store.get, diamond(store, levels=unixfs.MAX_DAG_DEPTH, fanout=1)))


# --- bombs, each run in a child process that cannot hurt the machine -----------------------

CHILD = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys
    from pathlib import Path

    src, work, op, root, tmpfs = sys.argv[1:6]
    work = Path(work)
    if tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + tmpfs, "none", str(work)],
                       check=True)
    home = work / "node"
    shutil.copytree(src, home)

    from benchsync.storage.dataset import LocalDataset

    def files():
        return sorted(str(p.relative_to(work)) for p in work.rglob("*") if not p.is_dir())

    before = files()
    result = {"error": None}
    try:
        with LocalDataset(home, sys.argv[6]) as ds:
            if op == "install":
                ds.install_replica(root)
            else:
                ds.restore(root)
                tables = ds.db.table_counts()
    except BaseException as e:
        result = {"error": [c.__name__ for c in type(e).__mro__], "message": str(e)[:500]}
    result["new_files"] = sorted(set(files()) - set(before))
    print(json.dumps(result))
    """
)


def _limits() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (CHILD_FSIZE, CHILD_FSIZE))
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_AS, CHILD_AS))


def run_bomb(ds: LocalDataset, tmp_path: Path, op: str, root: str) -> dict[str, Any]:
    """Run `op` (install or restore) of `root` on a copy of `ds`'s home in a fenced child."""
    ds.close()
    work = tmp_path / "fenced"
    work.mkdir()
    args = [str(ds.home), str(work), op, root]
    use_tmpfs = os.geteuid() == 0 and shutil.which("unshare") is not None
    cmd = [sys.executable, "-c", CHILD, *args, CHILD_TMPFS if use_tmpfs else "", OWN]
    if use_tmpfs:
        cmd = ["unshare", "-m", "--propagation", "private", *cmd]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, preexec_fn=_limits
    )
    assert proc.returncode == 0 and proc.stdout, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_refused_cleanly(result: dict[str, Any], error: str = "SnapshotTooLarge") -> None:
    assert result["error"] is not None, "the bomb was accepted"
    assert error in result["error"], result
    leftovers = [f for f in result["new_files"] if "/blocks/" not in f]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("op", ["install", "restore"])
@pytest.mark.parametrize(
    ("levels", "fanout", "claimed", "error"),
    [
        # 2**64 chunks without size claims; the manifest claims 2.5 MiB
        (64, 2, 10 * unixfs.CHUNK_SIZE, "BadSnapshot"),
        # claims that add up (64 MiB), but one leaf repeated
        (8, 2, 256 * unixfs.CHUNK_SIZE, "SnapshotTooLarge"),
        # claims that add up to 256 TiB, the manifest claims 2.5 MiB
        (30, 2, 10 * unixfs.CHUNK_SIZE, "SnapshotTooLarge"),
    ],
)
def test_diamond_dag_bomb_is_refused(
    ds: LocalDataset,
    tmp_path: Path,
    op: str,
    levels: int,
    fanout: int,
    claimed: int,
    error: str,
) -> None:
    bomb = diamond(ds.blocks, levels, fanout, claims=levels < 40)
    root = hostile_snapshot(
        ds.blocks,
        [("notes.parquet", bomb)],
        tmp_path,
        tables={"notes": {"rows": 1, "bytes": claimed, "cid": str(bomb)}},
        dataset=PEER if op == "install" else OWN,
    )
    _assert_refused_cleanly(run_bomb(ds, tmp_path, op, root), error)


@pytest.mark.parametrize("op", ["install", "restore"])
def test_parquet_decompression_bomb_is_refused(
    ds: LocalDataset, tmp_path: Path, op: str
) -> None:
    # 256 MiB of text that zstd squeezes into a few kilobytes.
    data = parquet("SELECT repeat('x', 1048576) AS note FROM range(256)", tmp_path)
    assert len(data) < 1024 * 1024
    root = hostile_snapshot(
        ds.blocks,
        [("notes.parquet", data)],
        tmp_path,
        dataset=PEER if op == "install" else OWN,
    )
    _assert_refused_cleanly(run_bomb(ds, tmp_path, op, root))


@pytest.mark.parametrize("op", ["install", "restore"])
def test_a_text_bomb_behind_a_fixed_width_twin_is_refused(
    ds: LocalDataset, tmp_path: Path, op: str
) -> None:
    """The decode check skips fixed-width columns (their size is rows x width): a file
    naming a 256 MiB text column like an int column must not slip through."""
    import pyarrow as pa

    path = tmp_path / "twins.parquet"
    text = pa.array(["x" * 1048576] * 256).dictionary_encode()
    pq.write_table(
        pa.Table.from_arrays([pa.array(range(256)), text], names=["note", "note"]),
        path,
        compression="zstd",
    )
    data = path.read_bytes()
    assert len(data) < 1024 * 1024
    root = hostile_snapshot(
        ds.blocks, [("notes.parquet", data)], tmp_path, dataset=PEER if op == "install" else OWN
    )
    result = run_bomb(ds, tmp_path, op, root)
    _assert_refused_cleanly(result, "BadSnapshot")
    assert "two columns of one name" in result["message"], result


def _measure(table: Any, tmp: Path, **write: Any) -> Any:
    """check_parquet_file of `table` written as one file: (ParquetCheck, or the error)."""
    from benchsync.storage.snapshot import TableInfo, check_parquet_file

    path = tmp / f"measured-{os.urandom(4).hex()}.parquet"
    pq.write_table(table, path, compression="zstd", **write)
    info = TableInfo(rows=table.num_rows, bytes=path.stat().st_size, cid="unused")
    try:
        return check_parquet_file(path, "notes", info)[path]
    except SnapshotTooLarge as e:
        return e


@pytest.mark.parametrize("kind", ["string", "binary", "nested"])
def test_every_column_kind_is_measured_as_decoded(tmp_path: Path, kind: str) -> None:
    """Text and binary columns are measured by a DuckDB scan, nested ones by pyarrow, fixed-
    width ones from the row count: a 256 MiB dictionary bomb of each kind is refused, and an
    honest file measures about what pyarrow decodes it to."""
    import pyarrow as pa

    value: Any = {"string": "x" * 1048576, "binary": b"x" * 1048576,
                  "nested": ["x" * 1048576]}[kind]  # fmt: skip
    bomb = pa.table({"n": pa.array(range(256)), "note": pa.array([value] * 256)})
    assert isinstance(_measure(bomb, tmp_path, use_dictionary=True), SnapshotTooLarge)

    honest_value: Any = {"string": "é-{}", "binary": b"b-{}", "nested": ["l-{}"]}[kind]
    rows = [
        [v.format(i) for v in honest_value] if isinstance(honest_value, list)
        else honest_value.format(i) if isinstance(honest_value, str)
        else honest_value.decode().format(i).encode()
        for i in range(5000)
    ]  # fmt: skip
    honest = pa.table({"n": pa.array(range(5000)), "x": pa.array([1.5] * 5000),
                       "note": pa.array(rows)})  # fmt: skip
    check = _measure(honest, tmp_path)
    assert check.rows == 5000
    assert 0.9 < check.decoded / honest.nbytes < 1.1, (check, honest.nbytes)
