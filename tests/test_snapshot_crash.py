"""A snapshot's change set survives restarts, and kill -9 at every step of a snapshot (issue 14).

The change log (`db.CHANGES_TABLE`) is written in each write's own
transaction and cleared by the snapshot that exported it, so a restarted node
(closed and reopened, or a real process killed with SIGKILL) exports only
what changed since its last snapshot. Each fault point of the snapshot path
(`snapshot.SNAPSHOT_FAULT_POINTS`) kills a real child process
(tests/snapshot_crash_child.py); the restarted node must open its database
with every acknowledged write, name a complete, verifying version in HEAD,
use a segment index only when it matches HEAD, and take a next snapshot
whose tables CID equals a full export of the same rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.storage import snapshot
from benchsync.storage.blockstore import FsBlockstore, verify_block
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.db import CHANGES_TABLE, DB_FILENAME
from benchsync.storage.snapshot import Segment, SnapshotStore, add_segments
from tests.fuzzing import FUZZ_SETTINGS
from tests.snapshot_crash_child import UPDATED_CASE, UPDATED_ID, perf
from tests.test_segments import use_bits

BITS = 6  # about 64 rows per segment: a few hundred rows make many segments
BASE = 600  # rows of the snapshotted history before the crash
NEW = 30  # rows the child appends before it snapshots
TAIL_MAX = 64 * 8  # generous bound for "the last segment or two": far below BASE
CHILD = Path(__file__).with_name("snapshot_crash_child.py")
CHILD_TIMEOUT = 120.0  # seconds: a child on a loaded 2-core machine


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node home with BASE results in many segments, snapshotted, closed."""
    use_bits(monkeypatch, BITS)
    path = tmp_path / "node"
    with LocalDataset(path, "lab") as ds:
        ds.db.ingest_records("perf", perf(0, BASE))
        assert ds.snapshot().created
    return path


def full_export_tables_cid(ds: LocalDataset, scratch: Path) -> str:
    """The tables CID of the database's rows exported from scratch (no index, no head)."""
    store = SnapshotStore(scratch / "snapshots", FsBlockstore(scratch / "blocks"), "lab")
    with ds.db.reader() as conn:
        result = store.snapshot(conn)
    assert result.created
    return result.version.tables_cid


# --- the change set survives a restart ---------------------------------------------------


def test_a_reopened_dataset_exports_only_the_tail_after_one_more_row(
    home: Path, tmp_path: Path
) -> None:
    with LocalDataset(home, "lab") as ds:
        again = ds.snapshot()  # reopened, nothing written: nothing to export
        assert not again.created and again.exported_rows == 0
        ds.db.ingest_records("perf", perf(BASE, 1))
        after = ds.snapshot()
        assert after.created
        assert after.version.manifest.tables["performance_results"].rows == BASE + 1
        assert 0 < after.exported_rows < TAIL_MAX, after.exported_rows
        assert after.new_blocks <= 2 + 4 + 3 * 2, after.new_blocks  # a segment or two + dirs
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


def test_writes_not_yet_snapshotted_survive_a_close(home: Path, tmp_path: Path) -> None:
    with LocalDataset(home, "lab") as ds:
        ds.db.ingest_records("perf", perf(BASE, 1))
        ds.db.write(
            lambda c: c.execute(
                "UPDATE performance_results SET test_case = 'x' WHERE result_id = ?", [UPDATED_ID]
            ),
            changes={"performance_results": [(UPDATED_ID, UPDATED_ID)]},
        )
    with LocalDataset(home, "lab") as ds:
        after = ds.snapshot()
        assert after.created
        # The tail and the updated row's segment, not the table.
        assert 0 < after.exported_rows < 2 * TAIL_MAX, after.exported_rows
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


def test_a_database_without_the_change_log_is_exported_whole(
    home: Path, tmp_path: Path
) -> None:
    # A file written by a benchsync without the log (or by another tool): nothing says
    # what changed since the index was written, so everything is dirty.
    conn = duckdb.connect(str(home / DB_FILENAME))
    conn.execute(f"DROP TABLE {CHANGES_TABLE}")  # sql: the module's constant
    conn.execute("UPDATE performance_results SET test_case = 'behind-our-back' WHERE result_id = 3")
    conn.close()
    with LocalDataset(home, "lab") as ds:
        after = ds.snapshot()
        assert after.created and after.exported_rows >= BASE
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")
        assert ds.snapshot().exported_rows == 0  # and then it is known again


def test_the_change_log_is_not_part_of_a_snapshot(home: Path) -> None:
    with LocalDataset(home, "lab") as ds:
        head = ds.head()
        assert head is not None
        assert CHANGES_TABLE not in head.manifest.tables
        with ds.db.reader() as conn:
            assert CHANGES_TABLE not in snapshot.snapshot_tables(conn)
            # The snapshot that exported them deleted the changes it took.
            left = conn.execute(f"SELECT count(*) FROM {CHANGES_TABLE}").fetchall()  # sql: constant
        assert left == [(0,)]


def test_a_write_committed_during_a_snapshot_stays_owed_to_the_next(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDataset(home, "lab") as ds:
        ds.db.ingest_records("perf", perf(BASE, 1))
        wrote: list[int] = []

        def write_once(point: str) -> None:
            # After the snapshot's transaction began: it does not see this row, so the
            # snapshot must not clear its logged range.
            if point == "exported" and not wrote:
                wrote.append(ds.db.ingest_records("perf", perf(BASE + 1, 1)))

        monkeypatch.setattr(snapshot, "FAULT_HOOK", write_once)
        first = ds.snapshot()
        monkeypatch.setattr(snapshot, "FAULT_HOOK", None)
        assert wrote == [1]
        assert first.version.manifest.tables["performance_results"].rows == BASE + 1
        second = ds.snapshot()
        assert second.created and 0 < second.exported_rows < TAIL_MAX
        assert second.version.manifest.tables["performance_results"].rows == BASE + 2
        assert second.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


def test_snapshots_racing_a_stream_of_writes_miss_none(home: Path, tmp_path: Path) -> None:
    with LocalDataset(home, "lab") as ds:
        n = 120
        done = threading.Event()

        def stream() -> None:
            try:
                for i in range(n):  # one write each: the writer skips covered ranges
                    ds.db.store_performance_result(perf(BASE + i, 1)[0])
            finally:
                done.set()

        writer = threading.Thread(target=stream)
        writer.start()
        taken = 0
        while not done.is_set() or taken == 0:
            ds.snapshot()  # each begins between two commits of the stream
            taken += 1
        writer.join()
        last = ds.snapshot()
        assert last.version.manifest.tables["performance_results"].rows == BASE + n, taken
        assert last.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


def test_a_rolled_back_write_logs_nothing_and_bookkeeping_wakes_no_listener(
    home: Path,
) -> None:
    with LocalDataset(home, "lab") as ds:
        heard: list[int] = []
        ds.db.on_write.append(heard.append)

        def fails(conn: Any) -> None:
            conn.execute("DELETE FROM performance_results")
            raise RuntimeError("the caller's bug")

        with pytest.raises(RuntimeError):
            ds.db.write(fails)  # undeclared: it would log "everything" had it committed
        assert ds.snapshot().exported_rows == 0
        ds.db.ingest_records("perf", perf(BASE, 1))
        assert ds.snapshot().created
        # Clearing the log is a write of the writer thread, but no data changed: a node's
        # snapshot policy listening here would otherwise snapshot forever.
        assert heard == [1]


def test_a_segment_index_of_the_in_memory_era_is_not_trusted(
    home: Path, tmp_path: Path
) -> None:
    # Written by a benchsync that kept the change set in memory: writes it made after
    # that snapshot are in no log, so the index cannot be trusted.
    index = home / "snapshots" / snapshot.SEGMENT_INDEX_NAME
    doc = json.loads(index.read_text())
    index.write_text(json.dumps({**doc, "format": "benchsync-segment-index/1"}))
    conn = duckdb.connect(str(home / DB_FILENAME))
    conn.execute("UPDATE performance_results SET test_case = 'old-binary' WHERE result_id = 5")
    conn.close()
    with LocalDataset(home, "lab") as ds:
        after = ds.snapshot()
        assert after.created and after.exported_rows >= BASE
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


def test_appends_between_snapshots_log_one_range_not_one_per_write(
    home: Path, tmp_path: Path
) -> None:
    with LocalDataset(home, "lab") as ds:
        for i in range(20):
            ds.db.store_performance_result(perf(BASE + i, 1)[0])
        with ds.db.reader() as conn:  # sql: the module's constant
            logged = conn.execute(f"SELECT tbl, lo, hi FROM {CHANGES_TABLE}").fetchall()
        # The first append's (first id, unbounded) covers the others; the models touched
        # by the first writes of each model name add a few rows.
        assert ("performance_results", BASE + 1, None) in logged
        assert len([r for r in logged if r[0] == "performance_results"]) == 1, logged
        assert len(logged) <= 8, logged
        after = ds.snapshot()
        assert after.version.manifest.tables["performance_results"].rows == BASE + 20
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.sampled_from(["update", "delete"]), st.integers(1, BASE + 40)),
        st.tuples(st.sampled_from(["snapshot", "reopen"]), st.just(0)),
    ),
    max_size=8,
)


@settings(FUZZ_SETTINGS, max_examples=8)  # a dataset and several full exports per case
@given(ops=OPS)
def test_any_history_of_writes_snapshots_and_restarts_snapshots_like_a_full_export(
    home: Path, ops: list[tuple[str, int]]
) -> None:
    # Hypothesis reuses the fixture's home across cases: each case works on a copy.
    with tempfile.TemporaryDirectory(dir=home.parent) as scratch:
        node = Path(scratch) / "node"
        shutil.copytree(home, node)
        ds = LocalDataset(node, "lab")
        try:
            next_id = BASE
            for op, arg in ops:
                if op == "append":
                    ds.db.ingest_records("perf", perf(next_id, arg))
                    next_id += arg
                elif op in ("update", "delete"):
                    sql = ("UPDATE performance_results SET test_case = 'u' WHERE result_id = ?"
                           if op == "update" else
                           "DELETE FROM performance_results WHERE result_id = ?")  # fmt: skip
                    ds.db.write(lambda c, sql=sql, i=arg: c.execute(sql, [i]),
                                changes={"performance_results": [(arg, arg)]})  # fmt: skip
                elif op == "snapshot":
                    ds.snapshot()
                else:
                    ds.close()
                    ds = LocalDataset(node, "lab")
            last = ds.snapshot()
            full = full_export_tables_cid(ds, Path(scratch) / "full")
            assert last.version.tables_cid == full, ops
        finally:
            ds.close()


def test_a_node_killed_with_sigkill_exports_only_the_tail_when_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `benchsync up` records one row (acknowledged), is killed -9, restarts."""
    use_bits(monkeypatch, BITS)
    # Snapshots only when asked: the row must still be owed when the node dies.
    env = {"BENCHSYNC_SNAPSHOT_AFTER_WRITES": "0", "BENCHSYNC_SNAPSHOT_INTERVAL": "0"}
    node = NodeProcess(tmp_path / "node", free_port(), "crashlab", env=env)
    with LocalDataset(node.home, node.peer_id) as ds:  # a node's dataset is its peer ID
        ds.db.ingest_records("perf", perf(0, BASE))
        assert ds.snapshot().created
    node.start()
    try:
        node.wait_ready()
        row = {"model_name": "model-1", "hardware_type": "cpu", "test_case": "after-restart",
               "batch_size": 1, "latency_p90": 1.0}  # fmt: skip
        assert node.client.post("/v1/record/perf", row)["stored"] == 1
        node.stop(signal.SIGKILL)
    finally:
        node.stop()
    with LocalDataset(node.home, node.peer_id) as ds:
        assert ds.db.table_counts()["performance_results"] == BASE + 1
        after = ds.snapshot()
        assert after.created, "the acknowledged row is in the next snapshot"
        assert 0 < after.exported_rows < TAIL_MAX, after.exported_rows
        assert after.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")


# --- kill -9 at every step of a snapshot --------------------------------------------------


def run_child(home: Path, point: str) -> list[str]:
    """Run the crash child to `point`; returns the writes it acknowledged."""
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(home), point, str(BITS), str(BASE), str(NEW)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    return [line for line in proc.stdout.splitlines() if line.startswith("acked ")]


def check_index(ds: LocalDataset, head: snapshot.Version) -> None:
    """The segment index is either ignored or describes exactly HEAD's tables."""
    index: dict[str, Any] = ds.snapshots._read_index(head)
    for table, entry in index.items():
        segs = [Segment.from_json(x) for x in entry["segments"]]
        cid, _, _ = add_segments(table, segs, lambda c, d: None)
        assert str(cid) == head.manifest.tables[table].cid, table


@pytest.mark.parametrize("point", snapshot.SNAPSHOT_FAULT_POINTS)
def test_kill_9_at_each_step_of_a_snapshot(home: Path, tmp_path: Path, point: str) -> None:
    with LocalDataset(home, "lab") as ds:
        before = ds.head()
    assert before is not None
    acked = run_child(home, point)
    assert acked == ["acked 10", "acked 10", "acked 10", "acked update"], acked

    with LocalDataset(home, "lab") as ds:
        ds.db.check()  # the database opens and reads
        # Every acknowledged write is present.
        assert ds.db.table_counts()["performance_results"] == BASE + NEW
        case = ds.db.query(
            "SELECT test_case FROM performance_results WHERE result_id = ?", [UPDATED_ID]
        ).column(0).to_pylist()
        assert case == [UPDATED_CASE]
        # HEAD names a complete version, every block of which verifies.
        head = ds.head()
        assert head is not None
        for cid, data in snapshot.dag_blocks(ds.blocks, CID.decode(head.cid)):
            verify_block(cid, data)
        moved = snapshot.SNAPSHOT_FAULT_POINTS.index(point) >= (
            snapshot.SNAPSHOT_FAULT_POINTS.index("head-written")
        )
        assert (head.cid != before.cid) == moved, (point, head.seq)
        if moved:
            assert head.manifest.tables["performance_results"].rows == BASE + NEW
        check_index(ds, head)
        # The next snapshot is correct: the tables CID of a full export of the same rows.
        nxt = ds.snapshot()
        assert nxt.created != moved
        if point == "head-written":  # the index names the old head: ignored, a full export
            assert nxt.exported_rows >= BASE + NEW
        else:  # the index and the logged changes still hold: only the changed segments
            assert nxt.exported_rows < BASE, nxt.exported_rows
        assert nxt.version.tables_cid == full_export_tables_cid(ds, tmp_path / "full")
        assert nxt.version.manifest.tables["performance_results"].rows == BASE + NEW
        if point != "done":  # the crash left changes logged, or the index behind: re-done once
            assert ds.snapshot().exported_rows == 0
