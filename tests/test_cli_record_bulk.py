"""`benchsync record --from` of any size through a running node (issue 11, observation 8).

A real `benchsync up` process owns the database; the CLI stages the file's records in
batches within the control API's body limit and commits them in one transaction
(daemon/staging.py). The staging bounds are tested on `RecordStaging` with a fake clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchsync.daemon.cli.record import batches
from benchsync.daemon.control import MAX_BODY_BYTES, ApiError, ControlAPIError, ControlClient
from benchsync.daemon.demo import NodeProcess, free_port
from benchsync.daemon.staging import RecordStaging

pytestmark = pytest.mark.slow

ROWS = 20_000
CLI_TIMEOUT = 120.0  # seconds for one CLI command


def perf(i: int) -> dict[str, Any]:
    return {"model_name": f"model-{i % 50}", "hardware_type": "cuda", "device_name": "A100",
            "batch_size": 1 + i % 64, "precision": "fp16", "throughput": 100.0 + i,
            "latency_avg": 5.5, "metrics": {"run": i}}  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    return subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", *args],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)  # fmt: skip


def written(client: ControlClient) -> float:
    """benchsync_records_written_total: rows the node's own writer stored (results and
    the model and hardware rows they name)."""
    for line in client.get_text("/metrics").splitlines():
        if line.startswith("benchsync_records_written_total "):
            return float(line.split()[1])
    raise AssertionError("no benchsync_records_written_total in /metrics")


def perf_rows(client: ControlClient) -> int:
    answer = client.post("/v1/query", {"sql": "SELECT count(*) AS n FROM performance_results"})
    return int(answer["rows"][0][0])


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    # Short paths: the control socket lives in the home (107-byte limit).
    with tempfile.TemporaryDirectory(prefix="bsb-", dir="/tmp") as d:
        n = NodeProcess(Path(d) / "n", free_port(), "bulk", extra_args=["--no-mdns"])
        n.start()
        try:
            n.wait_ready()
            yield n
        finally:
            n.stop()


def test_a_file_over_the_body_limit_goes_through_the_node_all_or_nothing(
    node: NodeProcess, tmp_path: Path
) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(perf(i)) + "\n" for i in range(ROWS)))
    assert big.stat().st_size > MAX_BODY_BYTES
    r = run_cli("record", "perf", "--from", str(big), "--home", str(node.home))
    assert r.returncode == 0, r.stderr
    assert f"Recorded {ROWS} perf record(s)" in r.stdout and "through the node" in r.stdout
    assert "Traceback" not in r.stderr
    client = node.client
    assert written(client) >= ROWS  # the node's writer, not the offline path
    assert perf_rows(client) == ROWS
    before = written(client)

    # One bad line in the middle: refused before anything is sent; nothing written.
    rows = [json.dumps(perf(i)) for i in range(ROWS)]
    rows[ROWS // 2] = json.dumps(perf(0) | {"throughput": -3})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    r = run_cli("record", "perf", "--from", str(bad), "--home", str(node.home))
    assert r.returncode == 1, r.stdout
    assert f"bad.jsonl:{ROWS // 2 + 1}" in r.stderr and "throughput" in r.stderr
    assert "Try:" in r.stderr and "Traceback" not in r.stderr
    assert written(client) == before and perf_rows(client) == ROWS
    assert node.client.get("/v1/status")  # still up


def test_the_node_commits_all_or_nothing_and_forgets_the_batch(node: NodeProcess) -> None:
    """A client that skips the CLI's checks: the commit itself refuses the whole batch."""
    client = node.client
    records = [perf(i) for i in range(3000)]
    records[2500] = perf(1) | {"throughput": float("-1")}
    runs = list(batches(records))
    assert len(runs) > 1  # the bad record is in a later batch than the first
    base = "/v1/record/perf/batches"
    batch = client.post(base, {})["batch"]
    for run, _ in runs:
        client.post(f"{base}/{batch}", {"records": run})
    with pytest.raises(ControlAPIError) as e:
        client.post(f"{base}/{batch}/commit", {})
    assert e.value.status == 422 and "record 2500" in e.value.message
    assert written(client) == 0
    with pytest.raises(ControlAPIError) as e:  # a batch is gone after its commit
        client.post(f"{base}/{batch}/commit", {})
    assert e.value.status == 404 and e.value.code == "no_batch"

    batch = client.post(base, {})["batch"]
    client.post(f"{base}/{batch}", {"records": records[:10]})
    assert client.post(f"{base}/{batch}/commit", {})["stored"] == 10
    assert written(client) >= 10 and perf_rows(client) == 10
    with pytest.raises(ControlAPIError) as e:
        client.post("/v1/record/nope/batches", {})
    assert e.value.status == 404 and e.value.code == "unknown_kind"


def test_staging_is_bounded_in_bytes_batches_and_time() -> None:
    now = [0.0]
    staging = RecordStaging(max_bytes=100, max_batches=2, timeout=60.0, clock=lambda: now[0])
    a = staging.open("perf")
    staging.append(a, b"x" * 60, 3)
    b = staging.open("perf")
    with pytest.raises(ApiError) as e:
        staging.append(b, b"y" * 41, 1)
    assert e.value.status == 413 and e.value.code == "staging_full"
    assert "STAGING_MAX_BYTES" in e.value.message and e.value.hint
    with pytest.raises(ApiError) as e:
        staging.open("perf")
    assert e.value.status == 503 and e.value.code == "staging_busy"
    now[0] = 30.0
    staging.get("perf", a.id)  # touched: a lives on
    now[0] = 61.0  # b untouched for 61 s: dropped, its bytes and slot freed
    staging.expire()
    assert list(staging.batches) == [a.id]
    with pytest.raises(ApiError) as e:
        staging.get("compat", a.id)  # a batch belongs to its kind
    assert e.value.status == 404
    staging.open("test")
    now[0] = 200.0
    with pytest.raises(ApiError) as e:
        staging.get("perf", a.id)
    assert e.value.code == "no_batch" and staging.staged_bytes == 0


def test_batches_fit_the_body_limit() -> None:
    records = [perf(i) for i in range(5000)]
    runs = list(batches(records, max_bytes=64 * 1024))
    assert [r for run, _ in runs for r in run] == records
    for run, size in runs:
        assert size == len(json.dumps({"records": run})) <= 64 * 1024
