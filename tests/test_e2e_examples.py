"""The examples in `examples/` run, exit 0 and print what their docstrings promise.

Each example runs as a subprocess, as a user would run it; the three run
concurrently to keep the file fast. The expectations are the numbers the
examples compute from the data they record, so an example that silently
stops syncing or querying fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TIMEOUT = 60.0  # seconds for one example (the slowest starts three node processes)
OWNED_ELSEWHERE = {"migrate.py"}  # tested with the migration code


def _run_all() -> dict[str, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    procs = {
        name: subprocess.Popen([sys.executable, str(EXAMPLES / name)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        for name in ("local_db.py", "two_nodes_sync.py", "network_query.py")
    }  # fmt: skip
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=EXAMPLE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    return _run_all()


def _ok(runs: dict[str, subprocess.CompletedProcess[str]], name: str) -> str:
    r = runs[name]
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_every_example_is_checked() -> None:
    checked = {"local_db.py", "two_nodes_sync.py", "network_query.py"}
    present = {p.name for p in EXAMPLES.glob("*.py")} - OWNED_ELSEWHERE
    assert present == checked, "add the new example's expected output to this file"


def test_local_db(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = _ok(runs, "local_db.py")
    assert "recorded 12 performance results" in out
    assert "'performance_results': 12" in out and "'hardware_compatibility': 1" in out
    # batch 8 on cuda: 1200 * 8 * 0.8 items/s
    assert re.search(r"batch  8\s+7680\.0 items/s", out), out
    assert "whisper-tiny on rocm: missing kernel for conv1d" in out
    fastest = out.split("fastest model per hardware")[1].splitlines()[1:3]
    assert [line.split()[:2] for line in fastest] == [["cpu", "distilbert-base"],
                                                      ["cuda", "distilbert-base"]]
    similar = out.split("most similar to bert-base-uncased")[1].splitlines()[1:]
    # distilbert has bert's profile (same hardware, batch sizes, closer figures) so ranks first
    assert similar[0].split()[0] == "distilbert-base" and similar[1].split()[0] == "whisper-tiny"


def test_two_nodes_sync(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = _ok(runs, "two_nodes_sync.py")
    peers = dict(re.findall(r"node ([AB]) (12D3KooW\w+) listening", out))
    assert set(peers) == {"A", "B"} and peers["A"] != peers["B"]
    assert "both nodes installed each other's snapshot" in out
    assert re.search(rf"node A holds replica {peers['B'][:12]}… seq 1 .*lag 0", out), out
    assert re.search(rf"node B holds replica {peers['A'][:12]}… seq 1 .*lag 0", out), out
    assert "replicas scope (5 rows from both nodes)" in out
    rows = re.findall(r"^\s+(cpu|cuda)\s+(\S+)\s+([\d.]+) items/s\s+from (\S+)…$", out, re.M)
    assert len(rows) == 5
    assert {(hw, origin) for hw, _, _, origin in rows} == {("cuda", peers["A"][:12]),
                                                           ("cpu", peers["B"][:12])}
    assert out.rstrip().endswith("both nodes stopped")


def test_network_query(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = _ok(runs, "network_query.py")
    assert len(re.findall(r"recorded 50 results", out)) == 3
    table = dict(
        (m[0], (int(m[1]), float(m[2])))
        for m in re.findall(r"^(cuda|rocm|cpu)\s+(\d+)\s+([\d.]+)\s+[\d.]+\s*$", out, re.M)
    )
    # 50 results per node cycle through batch sizes 1, 4, 8, 16 in blocks of 5 models: 10 at batch 8
    assert {hw: runs_ for hw, (runs_, _) in table.items()} == {"cuda": 10, "rocm": 10, "cpu": 10}
    assert table["cuda"][1] > table["rocm"][1] > table["cpu"][1]  # ordered by mean throughput
    assert len(re.findall(r"\banswered\s+\d+ partial row", out)) == 3
    assert "node0 (local)" in out
    assert "all nodes stopped cleanly" in out
