"""The top-level package: `from benchsync import BenchmarkDB` works, from any
directory, without importing the network stack."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import benchsync
from benchsync.storage.dataset import LocalDataset
from benchsync.storage.db import BenchmarkDB

HEAVY = ("trio", "libp2p", "duckdb", "pyarrow")


def test_public_names_resolve_to_the_storage_classes() -> None:
    assert benchsync.BenchmarkDB is BenchmarkDB
    assert benchsync.LocalDataset is LocalDataset
    assert set(benchsync.__all__) == {*benchsync._PUBLIC, "__version__"}
    for name in benchsync.__all__:
        assert getattr(benchsync, name) is not None, name
    assert issubclass(benchsync.InvalidRecord, benchsync.StorageError)


def test_version_is_the_distribution_version() -> None:
    # One definition: pyproject.toml reads it from benchsync.__version__; the node reports it.
    assert benchsync.__version__ == importlib.metadata.version("benchsync")


def test_import_from_another_directory_is_light(tmp_path: Path) -> None:
    """Run in a fresh interpreter outside the repository: the editable install
    must resolve the top package and every subpackage, and `import benchsync`
    alone must not pull in DuckDB, trio or libp2p."""
    code = f"""
import json, sys
import benchsync
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
from benchsync import BenchmarkDB
import benchsync.storage.car, benchsync.protocol.heads, benchsync.daemon.config
with BenchmarkDB("results.duckdb") as db:
    db.store_performance_result(model_name="m", hardware_type="cpu", batch_size=1,
                                throughput=1.0, latency_avg=2.0)
print(json.dumps({{"heavy": heavy, "files": [benchsync.__file__,
    benchsync.storage.car.__file__, benchsync.protocol.heads.__file__,
    benchsync.daemon.config.__file__]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["heavy"] == []
    repo = Path(__file__).resolve().parent.parent
    assert [Path(f).relative_to(repo).as_posix() for f in got["files"]] == [
        "benchsync/__init__.py", "storage/car.py", "protocol/heads.py", "daemon/config.py",
    ]  # fmt: skip
    assert (tmp_path / "results.duckdb").exists()
