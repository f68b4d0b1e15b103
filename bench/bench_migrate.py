"""Rows per second of `benchsync migrate` on a legacy file of ~1M performance results.

Baseline, measured in the same run on the same file: a plain DuckDB
`INSERT INTO ... SELECT` of every table from the ATTACHed legacy file into a
fresh database of our schema (no id remapping, no provenance, no checks). The
figures that matter are the ratios: migrate / baseline, with and without
verification.

    .venv/bin/python bench/bench_migrate.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from benchsync.storage.dataset import LocalDataset
from benchsync.storage.migrate import migrate_file
from benchsync.storage.schema import TABLES, ensure_schema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from legacy_fixtures import build_legacy_db  # noqa: E402

DEFAULT_ROWS = 1_000_000  # performance results in the legacy file


def baseline(legacy: Path, work: Path) -> float:
    """Seconds for a plain INSERT ... SELECT of every schema table from the attached file."""
    target = work / "baseline.duckdb"
    conn = duckdb.connect(str(target))
    try:
        ensure_schema(conn)
        started = time.perf_counter()
        conn.execute(f"ATTACH '{legacy}' AS legacy (READ_ONLY)")
        conn.begin()
        for table in TABLES:
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM legacy.{table}")
        conn.commit()
        return time.perf_counter() - started
    finally:
        conn.close()


def migrate(legacy: Path, work: Path, name: str, verify: bool) -> float:
    """Seconds for `migrate_file` (no backup, no snapshot: the import itself)."""
    with LocalDataset(work / name, "bench") as ds:
        _ = ds.db
        started = time.perf_counter()
        result = migrate_file(ds, legacy, backup=False, verify=verify, snapshot=False)
        seconds = time.perf_counter() - started
        if result.status != "migrated":
            raise SystemExit(f"migration failed: {result.error}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        legacy = build_legacy_db(work / "legacy.duckdb", bulk_perf=args.rows)
        rows = sum(n for t, n in legacy.rows.items() if t in TABLES)
        print(f"legacy file: {rows} rows ({legacy.path.stat().st_size / 1e6:.1f} MB)")
        base = baseline(legacy.path, work)
        verified = migrate(legacy.path, work, "verified", verify=True)
        unverified = migrate(legacy.path, work, "unverified", verify=False)
        print(f"{'':24}{'seconds':>9}{'rows/s':>12}{'x baseline':>12}")
        for label, secs in (("plain INSERT SELECT", base), ("migrate --no-verify", unverified),
                            ("migrate (verified)", verified)):
            print(f"{label:24}{secs:9.2f}{rows / secs:12,.0f}{secs / base:12.2f}")


if __name__ == "__main__":
    main()
