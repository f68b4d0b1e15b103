"""`benchsync snapshot | log | restore | export | import` as a user runs them (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

import benchsync
from benchsync.storage import car


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    env["BENCHSYNC_HOME"] = str(home)
    if not home.exists():  # only init and up create a data directory
        subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", "init"], env=env,
                       capture_output=True, check=True, timeout=120)  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def record(home: Path, model: str, throughput: str) -> None:
    r = cli(home, "record", "perf", "--model", model, "--hardware", "cuda",
            "--throughput", throughput)  # fmt: skip
    assert r.returncode == 0, r.stderr


def count(home: Path) -> int:
    r = cli(home, "query", "SELECT count(*) AS n FROM performance_results", "--format", "json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)[0]["n"])


def test_snapshot_log_restore_export_import(tmp_path: Path) -> None:
    home = tmp_path / "a"
    record(home, "bert", "10")
    first = cli(home, "snapshot")
    assert first.returncode == 0, first.stderr
    v1 = first.stdout.strip()
    assert v1.startswith("bafy")
    again = cli(home, "snapshot")
    assert again.stdout.strip() == v1 and "no change" in again.stderr

    record(home, "t5", "20")
    v2 = json.loads(cli(home, "snapshot", "--json").stdout)
    assert v2["seq"] == 2 and v2["parent"] == v1 and v2["rows"]["performance_results"] == 2

    log = json.loads(cli(home, "log", "--json").stdout)
    assert [v["cid"] for v in log] == [v2["cid"], v1]
    text = cli(home, "log").stdout
    assert v1 in text and "performance_results=2" in text

    restored = cli(home, "restore", v1)
    assert restored.returncode == 0, restored.stderr
    assert count(home) == 1
    assert len(json.loads(cli(home, "log", "--json").stdout)) == 3  # history kept

    out = tmp_path / "v2.car"
    exported = cli(home, "export", v2["cid"], "--car", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == v2["cid"]
    with open(out, "rb") as f:
        roots, blocks = car.read_car(f)
        assert [str(r) for r in roots] == [v2["cid"]] and sum(1 for _ in blocks) > 3

    parts = cli(home, "export", "--car", str(tmp_path / "split.car"), "--max-size", "300K")
    assert parts.returncode == 0, parts.stderr
    files = [Path(p) for p in parts.stdout.split()]
    assert files and all(p.is_file() and p.stat().st_size <= 300 * 1024 for p in files)

    other = tmp_path / "b"
    imported = cli(other, "import", str(out), "--json")
    assert imported.returncode == 0, imported.stderr
    doc = json.loads(imported.stdout)
    assert doc["roots"] == [v2["cid"]] and doc["new_blocks"] > 0
    twice = json.loads(cli(other, "import", str(out), "--json").stdout)
    assert twice["new_blocks"] == 0
    assert cli(other, "restore", v2["cid"]).returncode == 0
    assert count(other) == 2


def test_bad_input_gets_error_and_hint(tmp_path: Path) -> None:
    home = tmp_path / "a"
    r = cli(home, "restore", "bafybeinotacid")
    assert r.returncode != 0 and "Error:" in r.stderr and "Try:" in r.stderr
    r = cli(home, "export", "--car", str(tmp_path / "x.car"))
    assert r.returncode != 0 and "no snapshot yet" in r.stderr
    bad = tmp_path / "bad.car"
    bad.write_bytes(b"\x0a not a car at all")
    r = cli(home, "import", str(bad))
    assert r.returncode != 0 and "Error:" in r.stderr
    r = cli(home, "import", str(tmp_path / "missing.car"))
    assert r.returncode != 0 and "no such file" in r.stderr


def test_log_json_names_the_writer(tmp_path: Path) -> None:
    home = tmp_path / "a"
    record(home, "bert", "10")
    assert cli(home, "snapshot").returncode == 0
    log = json.loads(cli(home, "log", "--json").stdout)
    assert log[0]["writer"] == {"duckdb": duckdb.__version__, "benchsync": benchsync.__version__}
