"""History that survives a DuckDB upgrade (issue 18): restore and "no change" by content.

The fixtures in `tests/fixtures/duckdb_history/` are data directories written
by `make_fixture.py` under DuckDB releases other than (and including) the one
installed here: each is restored version by version with the installed DuckDB,
snapshotted again without change, and synced to a second node as a replica.
Run under an older DuckDB, the newer fixtures test the other direction.
"""

from __future__ import annotations

import json
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from benchsync.storage import schema, snapshot
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.schema import PRIMARY_KEYS, TABLES
from benchsync.storage.snapshot import Manifest, add_tables, export_tables

FIXTURES = Path(__file__).parent / "fixtures" / "duckdb_history"
WRITTEN_BY = sorted(p.name.removesuffix(".json") for p in FIXTURES.glob("duckdb-*.json"))


def test_some_fixture_was_written_by_another_duckdb() -> None:
    assert any(name != f"duckdb-{duckdb.__version__}" for name in WRITTEN_BY), WRITTEN_BY


def _value(v: Any) -> Any:  # as make_fixture.py writes rows
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def rows(ds: LocalDataset) -> dict[str, list[list[Any]]]:
    with ds.db.reader() as conn:
        return {
            t: [
                [_value(v) for v in row]
                for row in conn.execute(
                    f'SELECT * FROM "{t}" ORDER BY "{PRIMARY_KEYS[t]}"'
                ).fetchall()
            ]
            for t in TABLES
        }


def unpack(name: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    with tarfile.open(FIXTURES / f"{name}.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    return dest, json.loads((FIXTURES / f"{name}.json").read_text())


def fresh_tables_cid(ds: LocalDataset, tmp: Path) -> str:
    """The `tables/` CID the installed DuckDB exports the live database to."""
    tmp.mkdir()
    with ds.db.reader() as conn:
        cid, _, _ = add_tables(export_tables(conn, tmp), lambda c, d: None)
    return str(cid)


@pytest.mark.parametrize("name", WRITTEN_BY)
def test_every_version_restores_and_no_change_stays_a_no_op(name: str, tmp_path: Path) -> None:
    home, expected = unpack(name, tmp_path / "home")
    versions = expected["versions"]
    with LocalDataset(home, expected["dataset"]) as ds:
        head = ds.head()
        assert head is not None and head.cid == versions[-1]["cid"]
        assert head.manifest.writer == {"duckdb": expected["duckdb"], "benchsync": "0.1.0"}
        if expected["duckdb"] != duckdb.__version__:
            # The installed DuckDB writes other bytes for the same rows...
            assert fresh_tables_cid(ds, tmp_path / "export") != head.tables_cid
        # ...and yet, after the "upgrade", a snapshot of unchanged rows is no new version;
        # unless opening the directory migrated its schema (a column type changed: that
        # is a change, recorded once).
        migrated = head.manifest.schema_version < schema.SCHEMA_VERSION
        again = ds.snapshot()
        assert again.created == migrated
        assert not ds.snapshot().created

        for version in versions:
            before = ds.head()
            assert before is not None
            restored = ds.restore(version["cid"])
            assert rows(ds) == version["rows"]
            assert restored.tables_cid == ds.snapshots.find(version["cid"]).tables_cid
            if not migrated:
                # The snapshot restore takes of the live state found nothing new.
                assert restored.seq == before.seq + 1
                assert not ds.snapshot().created
            else:  # the restored rows are current in the migrated types: at most one version
                ds.snapshot()
                assert not ds.snapshot().created


@pytest.mark.parametrize("name", WRITTEN_BY)
def test_replica_written_by_another_duckdb_installs_and_answers(
    name: str, tmp_path: Path
) -> None:
    home, expected = unpack(name, tmp_path / "a")
    with LocalDataset(home, expected["dataset"]) as a, LocalDataset(tmp_path / "b", "peerb") as b:
        car_path = tmp_path / "head.car"
        with open(car_path, "wb") as f:
            root, _ = a.export_car(f)
        with open(car_path, "rb") as f:
            b.import_cars([(car_path.name, f)])
        replica = b.install_replica(root)
        assert replica.rows["performance_results"] == len(
            expected["versions"][-1]["rows"]["performance_results"]
        )
        # Read by the installed DuckDB, as the replicas scope reads it.
        got = duckdb.connect().execute(
            "SELECT result_id, throughput_items_per_second FROM read_parquet(?) "
            "ORDER BY result_id LIMIT 1",
            [str(replica.tables["performance_results"])],
        ).fetchall()
        assert got == [(1, 815.0)]


def _record(ds: LocalDataset, first: int, n: int) -> None:
    def write(conn: Any) -> None:
        conn.execute(
            "INSERT INTO performance_results (result_id, model_id, hardware_id, test_case, "
            "throughput_items_per_second) SELECT i, 1, 1, 'x', i * 0.5 FROM range(?, ?) t(i)",
            [first, first + n],
        )

    ds.db.write(write)


def test_no_change_when_bytes_differ_but_rows_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDataset(tmp_path / "home", "lab") as ds:
        _record(ds, 1, 3000)
        v1 = ds.snapshot().version
        # Another writer: other row groups, so other Parquet bytes for the same rows.
        monkeypatch.setattr(snapshot, "ROW_GROUP_SIZE", 1000)
        assert fresh_tables_cid(ds, tmp_path / "export") != v1.tables_cid
        again = ds.snapshot()
        assert not again.created and again.version.cid == v1.cid
        # A real change is still one, whatever the writer.
        _record(ds, 3001, 1)
        v2 = ds.snapshot()
        assert v2.created and v2.version.seq == 2
        monkeypatch.undo()
        # A version written with other row groups restores under this writer's settings.
        restored = ds.restore(v2.version.cid)
        assert restored.seq == 3
        assert rows(ds)["performance_results"][-1][0] == 3001


def _strip_digests(ds: LocalDataset) -> str:
    """Rewrite the head as a manifest from before the digest (no digests, no writer)."""
    head = ds.head()
    assert head is not None
    old = Manifest(
        dataset=head.manifest.dataset,
        seq=head.seq,
        parent=head.parent,
        created_at=head.created_at,
        schema_version=head.manifest.schema_version,
        tables={
            # The layout (segments) stays: it is how tables/ is laid out, not content identity.
            t: snapshot.TableInfo(rows=i.rows, bytes=i.bytes, cid=i.cid, segments=i.segments)
            for t, i in head.manifest.tables.items()
        },
    )
    assert b'"digest"' not in old.to_bytes() and b"writer" not in old.to_bytes()

    def put(cid: Any, data: bytes) -> None:
        ds.blocks.put(cid, data, verify=False)

    from multiformats import CID

    tables_cid = CID.decode(head.tables_cid)
    tsize = sum(len(d) for _, d in snapshot.dag_blocks(ds.blocks, tables_cid))
    return ds.snapshots._commit(old, tables_cid, tsize, put).cid


def test_manifest_without_digests_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDataset(tmp_path / "home", "lab") as ds:
        _record(ds, 1, 10)
        ds.snapshot()
        old = _strip_digests(ds)
        # Same bytes: no change, by the tables/ CID.
        assert not ds.snapshot().created
        _record(ds, 11, 5)
        ds.snapshot()
        # The digest-less version restores (verified against digests of its files), and the
        # head recording the restore carries the digests its manifest lacked...
        restored = ds.restore(old)
        assert len(rows(ds)["performance_results"]) == 10
        assert all(i.digest for i in restored.manifest.tables.values())
        # ...so that from now on another writer's bytes are no change either.
        monkeypatch.setattr(snapshot, "ROW_GROUP_SIZE", 3)
        assert not ds.snapshot().created


def test_two_writers_same_rows_same_digests(tmp_path: Path) -> None:
    """The fixtures hold the same rows written by two DuckDB releases: other bytes, same digests."""
    manifests = []
    for name in WRITTEN_BY[:2]:
        home, expected = unpack(name, tmp_path / name)
        with LocalDataset(home, expected["dataset"]) as ds:
            manifests.append([ds.snapshots.find(v["cid"]).manifest for v in expected["versions"]])
    if len(manifests) < 2:
        pytest.skip("one fixture only")
    for a, b in zip(*manifests, strict=True):
        assert a.writer != b.writer
        assert {t: i.cid for t, i in a.tables.items()} != {t: i.cid for t, i in b.tables.items()}
        assert a.digests() == b.digests() and None not in a.digests().values()
