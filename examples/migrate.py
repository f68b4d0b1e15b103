"""Migrate legacy benchmark `.duckdb` files into a node's dataset with the Python API.

    .venv/bin/python examples/migrate.py DATA_DIR FILE.duckdb [FILE.duckdb ...]

Each file is imported in its own transaction (ids remapped, models and hardware
merged by name, provenance in `migrated_rows`), verified, and the dataset is
snapshotted once at the end; re-running imports nothing new.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchsync.storage.dataset import LocalDataset
from benchsync.storage.migrate import migrate_files


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with LocalDataset(Path(argv[0]), "example-node") as ds:
        results = migrate_files(ds, [Path(p) for p in argv[1:]], progress=print)
        for r in results:
            print(f"{r.path}: {r.status}, {r.rows} rows, snapshot {r.cid}, error {r.error}")
        for model in ds.query("SELECT model_name FROM models ORDER BY 1").column(0).to_pylist():
            summary = ds.db.get_model_performance_summary(model)
            print(model, sum(row["results"] for row in summary), "performance results")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
