"""Migrating original-schema `.duckdb` files: import, merge, provenance, idempotency, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import trio
from multiformats import CID

from benchsync.daemon.cli import main
from benchsync.daemon.config import load_config
from benchsync.daemon.control import ControlClient
from benchsync.daemon.node import Node
from benchsync.storage.dataset import LocalDataset, sidecar_path
from benchsync.storage.migrate import (
    BACKUP_DIR,
    BACKUP_SUFFIX,
    ROWS_TABLE,
    migrate_file,
    migrate_files,
    snapshot_legacy,
)
from benchsync.storage.schema import PRIMARY_KEYS, TABLES

sys.path.insert(0, str(Path(__file__).parent))
from legacy_fixtures import LegacyContents, build_legacy_db  # noqa: E402

LOCK_HOLDER_TIMEOUT = 20.0  # seconds to wait for the helper process holding a lock
NODE_TIMEOUT = 60.0  # seconds to start a node on a loaded machine


def make_node(home: Path) -> Node:
    config = load_config(home, env={}, overrides={
        "network": "migrate-test", "listen": ["/ip4/127.0.0.1/tcp/0"], "bootstrap": [],
        "snapshot_interval": 0, "snapshot_after_writes": 0,
    })  # fmt: skip
    return Node(config)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[LocalDataset]:
    d = LocalDataset(tmp_path / "node", "12D3KooWTestNode")
    yield d
    d.close()


@pytest.fixture
def lab_a(tmp_path: Path) -> LegacyContents:
    return build_legacy_db(tmp_path / "lab_a.duckdb", seed=0)


@pytest.fixture
def lab_b(tmp_path: Path) -> LegacyContents:
    # Same ids as lab A (both files start at 1), overlapping models and hardware, quirks.
    return build_legacy_db(tmp_path / "lab_b.duckdb", seed=1, quirks=True)


def schema_rows(c: LegacyContents) -> int:
    return sum(n for t, n in c.rows.items() if t in TABLES)


def assert_ids_unique(ds: LocalDataset) -> None:
    for table, pk in PRIMARY_KEYS.items():
        dup = ds.db.query(f"SELECT count(*) - count(DISTINCT {pk}) AS d FROM {table}")
        assert dup.column("d")[0].as_py() == 0, table


def perf_counts(ds: LocalDataset) -> dict[str, int]:
    rows = ds.db.query(
        "SELECT m.model_name, count(*) AS n FROM performance_results "
        "JOIN models m USING (model_id) GROUP BY 1"
    ).to_pylist()
    return {r["model_name"]: r["n"] for r in rows}


def test_single_file_keeps_every_row_and_column(ds: LocalDataset, lab_a: LegacyContents) -> None:
    result = migrate_file(ds, lab_a.path)

    assert result.status == "migrated", result.error
    assert result.verified is True and all(t.verified for t in result.tables)
    assert result.rows == lab_a.total_rows
    counts = ds.db.table_counts()
    for table in TABLES:
        assert counts[table] == lab_a.rows[table], table
    # The snapshot taken afterwards is the dataset's head.
    head = ds.head()
    assert head is not None and result.cid == head.cid
    assert head.manifest.tables["performance_results"].rows == lab_a.rows["performance_results"]
    # The backup is a byte-identical copy, in the data directory (not beside the file).
    assert result.backup == ds.home / BACKUP_DIR / (lab_a.path.name + BACKUP_SUFFIX)
    assert result.backup.read_bytes() == lab_a.path.read_bytes()
    assert sorted(p.name for p in lab_a.path.parent.iterdir() if p.is_file()) == [
        lab_a.path.name
    ]
    # Every column of every performance result, joined back through the provenance table.
    src = duckdb.connect(str(lab_a.path), read_only=True)
    try:
        legacy = src.execute(
            "SELECT p.*, m.model_name, h.device_name FROM performance_results p "
            "JOIN models m USING (model_id) JOIN hardware_platforms h "
            "USING (hardware_id) ORDER BY result_id"
        ).fetchall()
        cols = [d[0] for d in src.description]
    finally:
        src.close()
    node = ds.db.query(f"""
        SELECT p.*, m.model_name, h.device_name, r.source_id FROM performance_results p
        JOIN {ROWS_TABLE} r ON r.table_name = 'performance_results' AND r.new_id = p.result_id
        JOIN models m USING (model_id) JOIN hardware_platforms h USING (hardware_id)
        ORDER BY r.source_id""").to_pylist()
    assert len(node) == len(legacy)
    for old, new in zip(legacy, node, strict=True):
        old_d = dict(zip(cols, old, strict=True))
        assert new["source_id"] == old_d["result_id"]
        for col in (
            "test_case",
            "batch_size",
            "precision",
            "total_time_seconds",
            "average_latency_ms",
            "throughput_items_per_second",
            "memory_peak_mb",
            "iterations",
            "warmup_iterations",
            "created_at",
            "model_name",
            "device_name",
        ):
            assert new[col] == old_d[col], col
        assert json.loads(new["metrics"]) == json.loads(old_d["metrics"])


def test_batch_remaps_ids_and_merges_models(
    ds: LocalDataset, lab_a: LegacyContents, lab_b: LegacyContents
) -> None:
    # The node already has a result of a model both files have.
    ds.db.store_performance_result(
        model_name="t5-small",
        hardware_type="cpu",
        device_name="Intel Xeon Gold 6338",
        throughput=1.0,
        latency_avg=1.0,
    )
    results = migrate_files(ds, [lab_a.path, lab_b.path])

    assert [r.status for r in results] == ["migrated", "migrated"]
    assert results[0].cid == results[1].cid == ds.head().cid
    assert_ids_unique(ds)
    names = ds.db.query("SELECT model_name, count(*) AS n FROM models GROUP BY 1").to_pylist()
    assert all(r["n"] == 1 for r in names)
    assert {r["model_name"] for r in names} == set(lab_a.model_names) | set(lab_b.model_names)
    expected = dict.fromkeys(set(lab_a.perf_by_model) | set(lab_b.perf_by_model), 0)
    for c in (lab_a, lab_b):
        for name, n in c.perf_by_model.items():
            expected[name] += n
    expected["t5-small"] += 1
    assert perf_counts(ds) == expected
    # The original API's summaries see both files' results under one model.
    summary = ds.db.get_model_performance_summary("t5-small")
    assert sum(r["results"] for r in summary) == expected["t5-small"]
    hw = ds.db.get_hardware_benchmark_summary("rocm")
    assert sum(r["results"] for r in hw) == 2 * 4 * 3  # per file: 4 models x 3 batch sizes
    # Assertions still hang off the right test results.
    tests = ds.db.query_integration_test_results(status="fail")
    assert len(tests) == 2
    assert all(
        [a["assertion_name"] for a in t["assertions"]] == ["check_1", "check_2"] for t in tests
    )


def test_remigration_imports_nothing(
    ds: LocalDataset, lab_a: LegacyContents, tmp_path: Path
) -> None:
    first = migrate_file(ds, lab_a.path)
    counts = ds.db.table_counts()
    # Same path again, then a copy under another name (content, not path, identifies it).
    copy = tmp_path / "copied.duckdb"
    shutil.copy(lab_a.path, copy)
    again = migrate_files(ds, [lab_a.path, copy, copy])

    assert [r.status for r in again] == ["already-migrated"] * 3
    assert ds.db.table_counts() == counts
    assert again[0].cid == first.cid  # nothing changed, so no new version
    assert len(ds.history()) == 1
    sources = ds.db.query("SELECT count(*) AS n FROM migration_sources").column("n")[0].as_py()
    assert sources == 1


def test_original_quirks_are_imported_faithfully(ds: LocalDataset, lab_b: LegacyContents) -> None:
    result = migrate_file(ds, lab_b.path)
    assert result.status == "migrated", result.error

    # Assertion ids restarted per result: each keeps its original id and parent in provenance.
    prov = ds.db.query(
        f"SELECT source_id, source_parent_id FROM {ROWS_TABLE} "
        "WHERE table_name = 'integration_test_assertions'"
    ).to_pylist()
    assert len(prov) == lab_b.rows["integration_test_assertions"]
    assert len({(p["source_id"], p["source_parent_id"]) for p in prov}) == len(prov)
    assert len({p["source_id"] for p in prov}) < len(prov)
    # NULL run ids stay NULL, never pointed at some other run.
    nulls = ds.db.query("SELECT count(*) AS n FROM performance_results WHERE run_id IS NULL")
    assert nulls.column("n")[0].as_py() == 12  # every 4th of 48
    # JSON stored as text: a Python-repr dict is kept verbatim as a JSON string.
    metrics = ds.db.query("SELECT metrics FROM performance_results LIMIT 1").column(0)[0].as_py()
    assert json.loads(metrics).startswith("{'p50_ms'")
    meta = ds.db.query("SELECT metadata FROM models LIMIT 1").column(0)[0].as_py()
    assert json.loads(meta)["hub"] == "huggingface"
    # FLOAT values are bit-identical (no round trip through another type).
    src = duckdb.connect(str(lab_b.path), read_only=True)
    try:
        legacy = sorted(
            r[0]
            for r in src.execute(
                "SELECT throughput_items_per_second FROM performance_results"
            ).fetchall()
        )
    finally:
        src.close()
    node = sorted(
        ds.db.query("SELECT throughput_items_per_second FROM performance_results")
        .column(0)
        .to_pylist()
    )
    assert node == legacy


def test_unknown_tables_and_views_are_carried(
    ds: LocalDataset, lab_a: LegacyContents, lab_b: LegacyContents
) -> None:
    results = migrate_files(ds, [lab_a.path, lab_b.path])
    assert all(r.ok for r in results)
    assert results[0].views == ["cross_platform_performance", "latest_performance_metrics"]

    web = ds.db.query("SELECT count(*) AS n FROM web_platform_results").column("n")[0].as_py()
    assert web == lab_a.rows["web_platform_results"] + lab_b.rows["web_platform_results"]
    # The carried view joins remapped ids: lab A's (bert, cpu) and lab B's (t5, cpu) rows.
    cross = ds.db.query(
        "SELECT model_name, hardware_type FROM cross_platform_performance "
        "WHERE hardware_type = 'cpu' ORDER BY 1"
    ).to_pylist()
    assert cross == [
        {"model_name": "bert-base-uncased", "hardware_type": "cpu"},
        {"model_name": "t5-small", "hardware_type": "cpu"},
    ]
    latest = ds.db.query("SELECT count(*) AS n FROM latest_performance_metrics")
    assert latest.column("n")[0].as_py() > 0
    # The snapshot carries the extra table too.
    assert "web_platform_results" in ds.head().manifest.tables


def test_a_node_database_file_carries_none_of_its_bookkeeping(tmp_path: Path) -> None:
    """Migrating a file that is itself a node's database: its rows, not its change log."""
    from benchsync.storage.db import CHANGES_TABLE
    from benchsync.storage.migrate import NOT_CARRIED, inspect_legacy

    with LocalDataset(tmp_path / "other", "other") as other:
        other.db.store_performance_result(
            {"model_name": "m", "hardware_type": "cpu", "batch_size": 1, "throughput": 1.0})
        path = other.db_path
    legacy = inspect_legacy(path)
    assert CHANGES_TABLE in legacy.tables  # the node logs its writes' changes in the file
    assert CHANGES_TABLE in NOT_CARRIED and CHANGES_TABLE not in legacy.carried_tables


def test_no_backup_no_verify(ds: LocalDataset, lab_a: LegacyContents) -> None:
    result = migrate_file(ds, lab_a.path, backup=False, verify=False)
    assert result.status == "migrated"
    assert result.backup is None and result.verified is None
    assert not lab_a.path.with_name(lab_a.path.name + BACKUP_SUFFIX).exists()
    assert ds.db.table_counts()["performance_results"] == lab_a.rows["performance_results"]


# ---- bad input: each file fails alone, the node's database is untouched ------------------------


def _not_duckdb(p: Path) -> None:
    p.write_text("model,throughput\nbert,12.5\n" * 200)


def _other_schema(p: Path) -> None:
    c = duckdb.connect(str(p))
    c.execute("CREATE TABLE invoices (id INTEGER, amount DECIMAL(10,2))")
    c.execute("INSERT INTO invoices VALUES (1, 9.99)")
    c.close()


def _corrupt(p: Path) -> None:
    build_legacy_db(p, seed=3)
    data = bytearray(p.read_bytes())
    for i in range(3 * 4096, len(data) - 4096, 4096):  # flip a byte in every block
        data[i + 100] ^= 0xFF
    p.write_bytes(bytes(data))


def _dangling(p: Path) -> None:
    build_legacy_db(p, seed=4, quirks=True)
    c = duckdb.connect(str(p))
    # Older files had no foreign key constraints at all.
    c.execute("CREATE TABLE a2 AS SELECT * FROM integration_test_assertions")
    c.execute("DROP TABLE integration_test_assertions")
    c.execute("ALTER TABLE a2 RENAME TO integration_test_assertions")
    c.execute(
        "INSERT INTO integration_test_assertions VALUES (1, 999, 'orphan', true, "
        "NULL, NULL, NULL, NULL)"
    )
    c.close()


def _unrecreatable_view(p: Path) -> None:
    build_legacy_db(p, seed=5)
    c = duckdb.connect(str(p))
    c.execute("CREATE MACRO speedup(a, b) AS a / b")  # macros do not travel with the data
    c.execute(
        "CREATE VIEW speedups AS SELECT speedup(throughput_items_per_second, 2) AS s "
        "FROM performance_results"
    )
    c.close()


@pytest.mark.parametrize(
    ("make", "error_type", "words"),
    [
        (None, "LegacyFileMissing", "no such file"),
        (_not_duckdb, "NotADuckDBFile", "not a DuckDB database"),
        (_other_schema, "UnknownSchema", "invoices"),
        (_corrupt, "CorruptLegacyFile", "restore it from a backup"),
        (_dangling, "InconsistentLegacyData", "test_result_id = 999"),
        (_unrecreatable_view, "InconsistentLegacyData", "view speedups"),
    ],
)
def test_bad_file_fails_alone(
    ds: LocalDataset,
    lab_a: LegacyContents,
    tmp_path: Path,
    make: object,
    error_type: str,
    words: str,
) -> None:
    bad = tmp_path / "bad.duckdb"
    if callable(make):
        make(bad)
    ds.db.store_performance_result(model_name="resnet-50", hardware_type="cpu", throughput=3.0)
    before = ds.db.table_counts()

    bad_result, good = migrate_files(ds, [bad, lab_a.path])

    assert bad_result.status == "failed" and not bad_result.ok
    assert bad_result.error_type == error_type
    assert words in (bad_result.error or "")
    assert str(bad) in (bad_result.error or "")
    assert good.status == "migrated"
    after = ds.db.table_counts()
    assert {t: after[t] - before[t] for t in TABLES} == {t: lab_a.rows[t] for t in TABLES}
    tables = {
        r["table_name"] for r in ds.db.query("SELECT table_name FROM duckdb_tables()").to_pylist()
    }
    assert "invoices" not in tables


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(LOCK_HOLDER_TIMEOUT)


def test_locked_file_fails_with_a_clear_error(ds: LocalDataset, lab_a: LegacyContents) -> None:
    proc = _hold_lock(lab_a.path)
    try:
        result = migrate_file(ds, lab_a.path)
    finally:
        _release(proc)
    assert result.error_type == "LegacyFileLocked"
    assert "open in another process" in (result.error or "")
    assert ds.db.table_counts()["performance_results"] == 0
    # Once released, the same file migrates.
    assert migrate_file(ds, lab_a.path).status == "migrated"


# ---- snapshot-only ---------------------------------------------------------------------------


def test_snapshot_only_makes_a_standalone_snapshot(ds: LocalDataset, lab_a: LegacyContents) -> None:
    first = snapshot_legacy(ds, lab_a.path)
    second = snapshot_legacy(ds, lab_a.path)

    assert first.status == "snapshot" and first.cid is not None
    assert ds.blocks.has(CID.decode(first.cid))
    doc = json.loads(sidecar_path(lab_a.path).read_text())
    assert doc["cid"] == second.cid
    # Content-addressed: the same file gives the same tables/ CID.
    assert doc["tables_cid"] == json.loads(sidecar_path(lab_a.path).read_text())["tables_cid"]
    # The node's own dataset is untouched: no import, no version.
    assert ds.db.table_counts()["performance_results"] == 0
    assert ds.head() is None
    # The root is pinned, so gc keeps its blocks.
    ds.gc()
    assert ds.blocks.has(CID.decode(first.cid))


# ---- the command line ------------------------------------------------------------------------


def test_cli_migrates_and_reports_json(
    home: Path, lab_a: LegacyContents, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.duckdb"
    rc = main(["migrate", "--db", str(lab_a.path), "--db", str(missing), "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert rc != 0
    assert [r["status"] for r in doc["results"]] == ["migrated", "failed"]
    assert doc["results"][0]["rows"] == lab_a.total_rows
    assert doc["results"][0]["cid"].startswith("bafy")
    assert f"Error: {missing}: no such file" in err
    assert "Try:" in err

    rc = main(["migrate", "--db", str(lab_a.path)])
    out, err = capsys.readouterr()
    assert rc == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["FILE", "STATUS", "TABLES", "ROWS"]
    assert row.split()[:2] == [str(lab_a.path), "already-migrated"]


def test_cli_snapshot_only_prints_cid(
    home: Path, lab_a: LegacyContents, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--db", str(lab_a.path), "--snapshot-only"]) == 0
    out, _ = capsys.readouterr()
    cid = json.loads(sidecar_path(lab_a.path).read_text())["cid"]
    assert cid in out


def test_cli_refuses_while_a_node_holds_the_database(
    home: Path, lab_a: LegacyContents, capsys: pytest.CaptureFixture[str]
) -> None:
    LocalDataset(home, "warmup").close()  # create the node's database file
    proc = _hold_lock(home / "benchsync.duckdb")
    try:
        rc = main(["migrate", "--db", str(lab_a.path)])
    finally:
        _release(proc)
    _, err = capsys.readouterr()
    assert rc != 0
    assert "in use by another process" in err
    assert "Try: if a node runs there" in err


# ---- never write beside what is not ours (issue 17, finding 12) ------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/bash\n"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("make", "error_type"),
    [
        (lambda p: p.write_text(PASSWD), "NotADuckDBFile"),
        (_other_schema, "UnknownSchema"),
        (lambda p: p.write_bytes(b""), "NotADuckDBFile"),
    ],
    ids=["passwd", "other-schema", "empty"],
)
def test_an_invalid_file_is_rejected_before_anything_is_written(
    ds: LocalDataset, tmp_path: Path, make: Any, error_type: str
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    target = etc / "passwd"
    make(target)
    before = _files(etc)
    for backup_beside in (False, True):
        [result] = migrate_files(ds, [target], backup_beside=backup_beside)
        assert result.status == "failed" and result.error_type == error_type, result.error
        assert result.backup is None
        assert _files(etc) == before  # nothing beside it, and it is unchanged
    assert not (ds.home / BACKUP_DIR).exists()


def test_unusable_paths_are_failed_results(ds: LocalDataset, tmp_path: Path) -> None:
    (tmp_path / "dir.duckdb").mkdir()
    results = migrate_files(
        ds, [tmp_path / "dir.duckdb", "bad\0name.duckdb", tmp_path / ("x" * 300)]
    )
    assert [r.error_type for r in results] == ["LegacyFileMissing"] * 3


def test_backup_beside_is_only_on_request(ds: LocalDataset, lab_a: LegacyContents) -> None:
    result = migrate_file(ds, lab_a.path, backup_beside=True)
    assert result.backup == lab_a.path.with_name(lab_a.path.name + BACKUP_SUFFIX)
    assert result.backup.read_bytes() == lab_a.path.read_bytes()


async def test_node_migrate_route_never_writes_beside_the_paths(
    tmp_path: Path, lab_a: LegacyContents, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control API route, on a real node over its real socket: the attack run's
    `{"paths": ["/etc/passwd"]}` (here a copy in tmp_path) leaves its directory alone;
    a valid file is backed up into the node's home; the CLI backs up beside the files
    its user named, in its own process."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(PASSWD)
    home = Path(tempfile.mkdtemp(prefix="bsm-", dir="/tmp"))  # a socket path under 107 bytes
    try:
        node = make_node(home)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(NODE_TIMEOUT):
                ep = await nursery.start(node.run)
            client = ControlClient(socket_path=ep.socket_path)
            answer = await trio.to_thread.run_sync(
                client.post, "/v1/migrate", {"paths": [str(etc / "passwd"), str(lab_a.path)]}
            )
            bad, good = answer["results"]
            assert bad["status"] == "failed" and bad["error_type"] == "NotADuckDBFile"
            assert bad["backup"] is None
            assert _files(etc) == {"passwd": PASSWD.encode()}
            assert good["status"] == "migrated"
            assert Path(good["backup"]) == home / BACKUP_DIR / (lab_a.path.name + BACKUP_SUFFIX)
            assert _files(lab_a.path.parent) == {lab_a.path.name: lab_a.path.read_bytes()}

            lab_b = build_legacy_db(tmp_path / "lab_b.duckdb", seed=1, quirks=True)
            rc = await trio.to_thread.run_sync(
                main, ["migrate", "--home", str(home), "--json", "--db", str(lab_b.path),
                       "--db", str(etc / "passwd")],
            )  # fmt: skip
            out, _ = capsys.readouterr()
            assert rc == 2  # one file failed
            good_b, bad_b = json.loads(out)["results"]
            beside = lab_b.path.with_name(lab_b.path.name + BACKUP_SUFFIX)
            assert good_b["status"] == "migrated" and good_b["backup"] == str(beside)
            assert beside.read_bytes() == lab_b.path.read_bytes()
            assert bad_b["status"] == "failed" and _files(etc) == {"passwd": PASSWD.encode()}
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(home, ignore_errors=True)
