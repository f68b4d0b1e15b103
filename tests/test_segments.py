"""Content-defined segments (issue 14): the rule, history independence and O(change) snapshots.

Real DuckDB files and a real blockstore throughout. The rule's constants are
lowered (`small_segments`) so that a few hundred rows make dozens of segments;
the rule itself is the same code.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.storage import segments, snapshot, unixfs
from benchsync.storage.blockstore import FsBlockstore
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.schema import ensure_schema
from benchsync.storage.snapshot import Dirty, SnapshotStore
from tests.fuzzing import FUZZ_SETTINGS

SMALL_BITS = 3  # 8 rows per segment on average


def use_bits(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    bound = 2 ** (64 - bits)
    monkeypatch.setattr(segments, "BOUNDARY_BOUND", bound)
    monkeypatch.setattr(segments, "BOUNDARY_HEX_BOUND", f"{bound:016x}")


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    use_bits(monkeypatch, SMALL_BITS)


# --- the rule ---------------------------------------------------------------------------


def test_boundary_rule_vector() -> None:
    """The first boundary keys >= 0 under the real constants: a change here re-segments
    every table (every CID), which must not happen silently."""
    found = [k for k in range(0, 600_000) if segments.is_boundary(k)][:5]
    assert found == [75470, 294890, 315408, 562808, 587809]


def test_boundary_rule_python_equals_duckdb(small_segments: None) -> None:
    keys = list(range(-300, 3000)) + [2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
    conn = duckdb.connect()
    conn.execute("CREATE TABLE k (id BIGINT)")
    conn.executemany("INSERT INTO k VALUES (?)", [[k] for k in keys])
    sql = f"SELECT id FROM k WHERE {segments.boundary_sql('id')} ORDER BY id"
    in_duckdb = [r[0] for r in conn.execute(sql).fetchall()]
    assert in_duckdb == sorted(k for k in keys if segments.is_boundary(k))
    assert 300 < len(in_duckdb) < 600  # about one in 8


# --- history independence: same rows, same tables CID ---------------------------------------


class Changes:
    """What `BenchmarkDB` tells a snapshot, for a test that writes with explicit ids."""

    def __init__(self) -> None:
        self.dirty: Dirty = None  # nothing known at first, like a freshly opened database

    def touch(self, table: str, ids: list[int]) -> None:
        if self.dirty is not None:
            self.dirty.setdefault(table, []).extend((i, i) for i in ids)

    def begin_snapshot(self, conn: Any) -> Dirty:
        conn.execute("BEGIN TRANSACTION")
        conn.execute("SELECT count(*) FROM information_schema.tables").fetchall()
        dirty, self.dirty = self.dirty, {}
        return dirty

    def return_dirty(self, dirty: Dirty) -> None:
        self.dirty = None

    def snapshot_done(self) -> None:
        pass  # begin_snapshot already took the changes


class Node:
    """A database written with explicit result ids and snapshotted incrementally."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True)
        self.conn = duckdb.connect(str(home / "db.duckdb"))
        ensure_schema(self.conn)
        self.blocks = FsBlockstore(home / "blocks")
        self.store = SnapshotStore(home / "snapshots", self.blocks, "lab")
        self.changes = Changes()

    @staticmethod
    def row(i: int, variant: int = 0) -> list[Any]:
        return [i, i % 5 + 1, i % 3 + 1, f"case-{i % 7}-{variant}", i % 4 + 1, i * 0.25]

    def insert(self, ids: list[int], variant: int = 0) -> None:
        self.conn.executemany(
            "INSERT INTO performance_results (result_id, model_id, hardware_id, test_case, "
            "batch_size, latency_p90_ms) VALUES (?, ?, ?, ?, ?, ?)",
            [self.row(i, variant) for i in ids],
        )
        self.changes.touch("performance_results", ids)

    def update(self, ids: list[int], variant: int) -> None:
        for i in ids:
            self.conn.execute(
                "UPDATE performance_results SET test_case = ? WHERE result_id = ?",
                [self.row(i, variant)[3], i],
            )
        self.changes.touch("performance_results", ids)

    def delete(self, ids: list[int]) -> None:
        for i in ids:
            self.conn.execute("DELETE FROM performance_results WHERE result_id = ?", [i])
        self.changes.touch("performance_results", ids)

    def snapshot(self, *, incremental: bool = True) -> snapshot.SnapshotResult:
        with self.conn.cursor() as cur:
            return self.store.snapshot(cur, changes=self.changes if incremental else None)

    def tables_cid(self) -> str:
        head = self.store.head()
        assert head is not None
        return head.tables_cid

    def close(self) -> None:
        self.conn.close()


def batches(ids: list[int], cuts: list[int]) -> list[list[int]]:
    edges = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@settings(FUZZ_SETTINGS, max_examples=6)  # two databases per case: seconds each
@given(
    final=st.sets(st.integers(1, 300), min_size=1, max_size=80),
    extra=st.sets(st.integers(1, 400), max_size=20),
    seed=st.integers(0, 2**32),
    cuts_a=st.lists(st.integers(0, 400), max_size=4),
    cuts_b=st.lists(st.integers(0, 400), max_size=4),
)
def test_same_rows_in_any_history_give_the_same_tables_cid(
    tmp_path_factory: pytest.TempPathFactory,
    final: set[int],
    extra: set[int],
    seed: int,
    cuts_a: list[int],
    cuts_b: list[int],
) -> None:
    """Node a inserts the rows in one order; node b in another, with extra rows it
    deletes again and rows it changes and changes back, snapshotting (incrementally)
    in between. Same rows at the end: the same tables CID, also as a full export."""
    with pytest.MonkeyPatch.context() as mp:
        use_bits(mp, SMALL_BITS)
        tmp = tmp_path_factory.mktemp("hist")
        rng = random.Random(seed)
        a, b = Node(tmp / "a"), Node(tmp / "b")
        try:
            order_a = sorted(final)
            rng.shuffle(order_a)
            for part in batches(order_a, cuts_a):
                a.insert(part)
                a.snapshot()
            extra_ids = sorted(extra - final)
            order_b = sorted(final) + extra_ids
            rng.shuffle(order_b)
            changed = sorted(rng.sample(sorted(final), k=min(len(final), 10)))
            for i, part in enumerate(batches(order_b, cuts_b)):
                b.insert(part)
                b.snapshot()
                if i == 0:
                    b.update([x for x in changed if x in part], variant=1)
                    b.snapshot()
            b.delete(extra_ids)
            b.snapshot()
            b.update(changed, variant=0)
            b.snapshot()
            assert a.tables_cid() == b.tables_cid()
            # ...and equal to exporting everything from scratch.
            assert not a.snapshot(incremental=False).created
            assert a.snapshot(incremental=False).version.tables_cid == a.tables_cid()
        finally:
            a.close()
            b.close()


# --- O(change): appends, updates and deletes touch only their segments -----------------------


def segment_rows(node: Node) -> list[int]:
    head = node.store.head()
    assert head is not None
    link = snapshot.table_files(node.blocks.get, head)["performance_results"]
    assert link.parts is not None
    doc = node.store._read_index(head)["performance_results"]["segments"]
    return [int(s[1]) for s in doc]


def test_update_and_delete_touch_only_their_segment(tmp_path: Path, small_segments: None) -> None:
    node = Node(tmp_path / "n")
    try:
        node.insert(list(range(1, 401)))
        first = node.snapshot()
        assert first.version.manifest.tables["performance_results"].segments > 20
        # Every segment file is one leaf block (small files); a changed segment adds it,
        # its table directory, tables/, the manifest and the root: 5 blocks.
        node.update([200], variant=3)
        updated = node.snapshot()
        assert updated.created
        assert updated.new_blocks == 5, updated
        seg = next(n for n in _segments_around(node, 200))
        assert updated.exported_rows == seg
        # A delete that is not a boundary key: its segment only.
        victim = next(k for k in range(150, 250) if not segments.is_boundary(k))
        node.delete([victim])
        deleted = node.snapshot()
        assert deleted.new_blocks == 5
        assert deleted.exported_rows == _segments_around(node, victim)[0]
        # Deleting a boundary key merges its segment with the next: two re-read, one written.
        boundary = next(k for k in range(100, 300) if segments.is_boundary(k))
        before = segment_rows(node)
        node.delete([boundary])
        merged = node.snapshot()
        assert len(segment_rows(node)) == len(before) - 1
        assert merged.new_blocks == 5
    finally:
        node.close()


def _segments_around(node: Node, key: int) -> list[int]:
    """Rows of the segment that holds `key` now (in a one-element list)."""
    head = node.store.head()
    assert head is not None
    doc = node.store._read_index(head)["performance_results"]["segments"]
    lo = None
    for hi, rows, *_ in doc:
        if (lo is None or key > lo) and (hi is None or key <= hi):
            return [int(rows)]
        lo = hi
    raise AssertionError(f"no segment holds {key}")


def perf(start: int, n: int) -> list[dict[str, Any]]:
    return [
        {
            "model_name": f"model-{i % 4}",
            "hardware_type": "cpu",
            "test_case": f"case-{i}",
            "batch_size": 1,
            "latency_p90": float(i),
        }
        for i in range(start, start + n)
    ]


def test_appends_through_the_database_touch_only_the_last_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 6)  # 64 rows per segment on average
    with LocalDataset(tmp_path / "node", "lab") as ds:
        ds.db.ingest_records("perf", perf(0, 3000))
        first = ds.snapshot()  # a freshly opened database: everything is exported
        assert first.exported_rows >= 3000
        ds.db.ingest_records("perf", perf(3000, 30))
        second = ds.snapshot()
        assert second.created
        # Only the tail of performance_results (its last segment, plus the 30 new rows)
        # was exported again; the other tables had nothing new.
        tail = second.version.manifest.tables["performance_results"]
        assert second.exported_rows < 30 + 64 * 8, second.exported_rows
        assert second.new_blocks <= 2 + 4 + 3 * 2, second.new_blocks  # a few segments + dirs
        assert tail.rows == 3030
        # The same rows exported from scratch give the same tables CID.
        with ds.db.reader() as conn:
            full = ds.snapshots.snapshot(conn)
        assert not full.created and full.version.tables_cid == second.version.tables_cid
        # Nothing written since: nothing exported.
        assert ds.snapshot().exported_rows == 0


@pytest.fixture
def snapshotted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalDataset]:
    """A dataset of 500 results in ~8 segments, snapshotted."""
    use_bits(monkeypatch, 6)
    with LocalDataset(tmp_path / "node", "lab") as ds:
        ds.db.ingest_records("perf", perf(0, 500))
        ds.snapshot()
        yield ds


def test_a_write_of_unknown_extent_exports_everything_once(snapshotted: LocalDataset) -> None:
    ds = snapshotted
    ds.db.write(lambda c: c.execute("DELETE FROM performance_results WHERE result_id = 7"))
    after = ds.snapshot()
    assert after.created and after.exported_rows >= 499
    assert ds.snapshot().exported_rows == 0


def test_a_failed_snapshot_keeps_its_changes_for_the_next(
    snapshotted: LocalDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = snapshotted
    ds.db.ingest_records("perf", perf(500, 5))
    real = unixfs.add_directory

    def failing(entries: Any, put: Any) -> Any:
        raise OSError("injected")

    monkeypatch.setattr(unixfs, "add_directory", failing)
    with pytest.raises(snapshot.SnapshotError):
        ds.snapshot()
    monkeypatch.setattr(unixfs, "add_directory", real)
    again = ds.snapshot()
    assert again.created
    assert again.version.manifest.tables["performance_results"].rows == 505


def test_segmented_version_restores_and_installs_as_a_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 6)
    with LocalDataset(tmp_path / "a", "peera") as a, LocalDataset(tmp_path / "b", "peerb") as b:
        a.db.ingest_records("perf", perf(0, 1000))
        v1 = a.snapshot().version
        assert (v1.manifest.tables["performance_results"].segments or 0) > 4
        a.db.ingest_records("perf", perf(1000, 10))
        a.snapshot()
        restored = a.restore(v1.cid)
        assert a.db.table_counts()["performance_results"] == 1000
        assert restored.manifest.digests() == v1.manifest.digests()
        assert not a.snapshot().created  # the same rows: no change
        car = tmp_path / "v1.car"
        with open(car, "wb") as f:
            root, _ = a.export_car(f)
        with open(car, "rb") as f:
            b.import_cars([(car.name, f)])
        replica = b.install_replica(root)
        path = replica.tables["performance_results"]
        assert path.is_dir() and len(segments.parquet_files(path)) == v1.manifest.tables[
            "performance_results"
        ].segments
        got = b.query("SELECT count(*) AS n FROM performance_results", scope="replicas")
        assert got.to_pylist() == [{"n": 1000}]


def test_validator_refuses_a_segment_directory_with_a_stray_entry(tmp_path: Path) -> None:
    with LocalDataset(tmp_path / "a", "peera") as a:
        a.db.ingest_records("perf", perf(0, 10))
        v = a.snapshot().version
        get = a.blocks.get
        entries = unixfs.list_directory(get, CID.decode(v.tables_cid))
        put = lambda c, d: a.blocks.put(c, d, verify=False)  # noqa: E731
        name, cid, tsize = next(e for e in entries if e[0] == "performance_results")
        parts = unixfs.list_directory(get, cid)
        for bad in (
            parts + [("part-0001.parquet.tmp", parts[0][1], parts[0][2])],
            [("part-0001.parquet", parts[0][1], parts[0][2])],
            [("part-00000.parquet", parts[0][1], parts[0][2])],
        ):
            dcid, dtsize = unixfs.add_directory(bad, put)
            tables = [(n, dcid if n == name else c, dtsize if n == name else t)
                      for n, c, t in entries]
            tcid, _ = unixfs.add_directory(tables, put)
            info = v.manifest.tables["performance_results"]
            manifest = snapshot.Manifest(
                dataset="peerz", seq=1, parent=None, created_at=0.0,
                schema_version=v.manifest.schema_version,
                tables={**v.manifest.tables,
                        "performance_results": snapshot.TableInfo(
                            rows=info.rows, bytes=info.bytes, cid=str(dcid), segments=1)},
            )
            version = snapshot.Version(cid="x", tables_cid=str(tcid), manifest=manifest)
            with pytest.raises(snapshot.BadSnapshot, match="segment|part-"):
                snapshot.table_files(get, version)


def test_a_write_that_declares_its_changes_exports_only_their_segments(
    snapshotted: LocalDataset,
) -> None:
    ds = snapshotted
    ds.db.write(
        lambda c: c.execute("DELETE FROM performance_results WHERE result_id = 170"),
        changes={"performance_results": [(170, 170)]},
    )
    after = ds.snapshot()
    assert after.created and after.version.manifest.tables["performance_results"].rows == 499
    assert after.exported_rows == 12  # its segment (166, 179], one row fewer


def test_a_snapshot_lowers_duckdbs_memory_limit_only_while_it_runs(
    snapshotted: LocalDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = snapshotted
    setting = "SELECT current_setting('memory_limit') AS m"
    before = ds.db.query(setting).to_pylist()
    seen: list[Any] = []
    real = snapshot._TableExport.full

    def full(self: Any) -> Any:
        seen.append(self.conn.execute(setting).fetchone()[0])
        return real(self)

    monkeypatch.setattr(snapshot._TableExport, "full", full)
    ds.db.write(lambda c: None)  # unknown changes: every table exported in full
    ds.snapshot()
    assert seen and set(seen) == {"64.0 MiB"}
    assert ds.db.query(setting).to_pylist() == before


def one_file_head(ds: LocalDataset, tmp: Path) -> snapshot.Version:
    """Record the live rows as a version in the one-file layout (as nodes before issue 14)."""
    tmp.mkdir()
    files = {}
    with ds.db.reader() as conn:
        for table in snapshot.snapshot_tables(conn):
            files[table] = tmp / f"{table}.parquet"
            key = snapshot.schema.PRIMARY_KEYS[table]
            conn.execute(
                f"COPY (SELECT * FROM {table} ORDER BY {key}) TO '{files[table]}' "
                "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 8192)"
            )
    put = lambda c, d: ds.blocks.put(c, d, verify=False)  # noqa: E731
    tables_cid, tsize, added = snapshot.add_tables(files, put)
    head = ds.head()
    manifest = snapshot.Manifest(
        dataset="lab", seq=head.seq + 1 if head else 1, parent=head.cid if head else None,
        created_at=0.0, schema_version=snapshot.schema.SCHEMA_VERSION,
        tables={t: snapshot.TableInfo(rows=pq_rows(p), bytes=added[t][1], cid=str(added[t][0]),
                                      digest=snapshot.parquet_digest(p, t))
                for t, p in files.items()},
    )
    return ds.snapshots._commit(manifest, tables_cid, tsize, put)


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def test_a_one_file_head_of_the_same_rows_stays_the_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_bits(monkeypatch, 6)
    with LocalDataset(tmp_path / "node", "lab") as ds:
        ds.db.ingest_records("perf", perf(0, 300))
        ds.snapshot()
        old = one_file_head(ds, tmp_path / "onefile")
        # Unchanged rows: no new version, by the old head's rows/1 digests, once in full
        # and then from the index without exporting anything.
        ds.db.write(lambda c: None)
        first = ds.snapshot()
        assert not first.created and first.version.cid == old.cid
        again = ds.snapshot()
        assert not again.created and again.exported_rows == 0
        # A change is a new version in the segment layout.
        ds.db.ingest_records("perf", perf(300, 3))
        changed = ds.snapshot()
        assert changed.created
        assert changed.version.manifest.tables["performance_results"].segments


def test_a_table_with_repeated_keys_segments_restores_and_verifies(
    tmp_path: Path, small_segments: None
) -> None:
    """Legacy rows may repeat a key (assertion ids restarting per result): rows of one key
    stay in one segment, ordered by every column, and the restore's digest, cut by the
    rule from the restored table, equals the files'."""

    def insert(conn: Any) -> None:
        conn.execute(
            "INSERT INTO performance_results (result_id, model_id, hardware_id, test_case) "
            "SELECT i // 2, 1, 1, 'case-' || (i % 2) || '-' || (i // 2) FROM range(0, 400) t(i)"
        )

    with LocalDataset(tmp_path / "node", "lab") as ds:
        ds.db.write(insert)
        v = ds.snapshot().version
        info = v.manifest.tables["performance_results"]
        assert info.rows == 400 and (info.segments or 0) > 10 and info.digest
        ds.db.write(lambda c: c.execute("DELETE FROM performance_results WHERE result_id < 50"))
        ds.snapshot()
        restored = ds.restore(v.cid)  # verified: rows, checksums and the rows/2 digest
        assert restored.manifest.digests() == v.manifest.digests()
        assert ds.db.table_counts()["performance_results"] == 400
        with ds.db.reader() as conn:
            same = ds.snapshots.snapshot(conn)
        assert not same.created and same.version.tables_cid == v.tables_cid
