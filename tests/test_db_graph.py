"""Knowledge-graph edges and model similarity, on a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchsync.storage.db import DB_FILENAME, BenchmarkDB
from benchsync.storage.errors import NotFound


@pytest.fixture
def db(tmp_path: Path):
    with BenchmarkDB(tmp_path / DB_FILENAME) as d:
        run = d.create_test_run("nightly", "performance")
        rows = []
        for model, family, scale in [("bert-base", "bert", 1.0), ("bert-large", "bert", 0.9),
                                     ("gpt2", "gpt", 0.3), ("resnet", None, 0.5)]:
            for hw in ("cuda", "cpu"):
                for bs in (1, 8):
                    if model == "resnet" and hw == "cuda":
                        continue  # measured only on cpu
                    rows.append({"model_name": model, "model_family": family,
                                 "hardware_type": hw, "batch_size": bs, "run_id": run,
                                 "throughput": 100.0 * bs * scale * (10 if hw == "cuda" else 1),
                                 "latency_avg": 10.0 / scale})
        rows.append({"model_name": "lonely", "hardware_type": "tpu", "throughput": 5.0})
        d.ingest_records("perf", rows)
        d.store_hardware_compatibility(model_name="gpt2", hardware_type="rocm",
                                       is_compatible=False)
        yield d


def test_model_edges(db: BenchmarkDB) -> None:
    edges = db.get_benchmark_relationships("model:bert-base")
    triples = {(e["type"], e["target"], e["count"]) for e in edges}
    assert ("ran_on", "hardware:cuda", 2) in triples
    assert ("ran_on", "hardware:cpu", 2) in triples
    assert ("same_family", "model:bert-large", 1) in triples
    assert ("tested_in", "run:1", 4) in triples
    assert all(e["source"] == "model:bert-base" for e in edges)
    assert not any(e["target"] == "model:gpt2" for e in edges)  # other family
    gpt = db.get_benchmark_relationships("gpt2")  # bare name = model
    assert {"source": "model:gpt2", "type": "incompatible_with", "target": "hardware:rocm",
            "count": 1} in gpt


def test_hardware_run_and_row_edges(db: BenchmarkDB) -> None:
    hw = db.get_benchmark_relationships("hardware:cpu")
    assert {e["source"] for e in hw if e["type"] == "ran_on"} == {
        "model:bert-base", "model:bert-large", "model:gpt2", "model:resnet"}
    run = db.get_benchmark_relationships("run:1")
    assert len(run) == 14 and {e["type"] for e in run} == {"result_of"}
    result = db.get_benchmark_relationships("result:1")
    assert {(e["type"], e["target"]) for e in result} == {
        ("result_of", "run:1"), ("measures", "model:bert-base"), ("measured_on", "hardware:cuda")}
    compat = db.get_benchmark_relationships("compat:1")
    assert {(e["type"], e["target"]) for e in compat} == {
        ("measures", "model:gpt2"), ("measured_on", "hardware:rocm")}


def test_unknown_nodes(db: BenchmarkDB) -> None:
    for node in ("model:nope", "hardware:fpga", "run:99", "result:999", "test:1"):
        with pytest.raises(NotFound):
            db.get_benchmark_relationships(node)
    with pytest.raises(ValueError, match="unknown node kind"):
        db.get_benchmark_relationships("widget:1")


def test_similarity_ranks_by_shared_profile(db: BenchmarkDB) -> None:
    similar = db.search_similar_benchmarks("bert-base")
    names = [s["model_name"] for s in similar]
    assert names[0] == "bert-large"  # 0.9x throughput, ~1.1x latency everywhere
    assert "lonely" not in names  # no shared (hardware, batch size): not similar
    top = similar[0]
    assert top["shared_measurements"] == 4 and top["shared_hardware"] == ["cpu", "cuda"]
    assert top["score"] == pytest.approx(0.9)
    by_name = {s["model_name"]: s for s in similar}
    assert by_name["resnet"]["shared_measurements"] == 2  # cpu only
    assert by_name["gpt2"]["score"] < top["score"]
    assert [s["score"] for s in similar] == sorted((s["score"] for s in similar), reverse=True)
    assert len(db.search_similar_benchmarks("bert-base", top_k=1)) == 1
    assert db.search_similar_benchmarks("lonely") == []
    with pytest.raises(NotFound):
        db.search_similar_benchmarks("nope")
