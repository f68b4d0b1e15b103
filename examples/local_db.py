"""Local use of the Python API: record benchmark results, query them, summarise them.

Runs without any node or network: `BenchmarkDB` is the embedded DuckDB
database a node keeps in its data directory. This example writes to a
temporary directory (or to the directory given as the first argument),
records a handful of results of each kind, then shows the original API's
queries, the per-model and per-hardware summaries, plain SQL, and the
similarity search.

    python examples/local_db.py [DATA_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchsync.storage.db import DB_FILENAME, BenchmarkDB

# (model, family, hardware, device, throughput at batch 1 in items/s)
RUNS = [
    ("bert-base-uncased", "bert", "cuda", "NVIDIA A100", 1200.0),
    ("bert-base-uncased", "bert", "cpu", "Intel Xeon 8380", 140.0),
    ("distilbert-base", "bert", "cuda", "NVIDIA A100", 2100.0),
    ("distilbert-base", "bert", "cpu", "Intel Xeon 8380", 260.0),
    ("whisper-tiny", "whisper", "cuda", "NVIDIA A100", 310.0),
    ("whisper-tiny", "whisper", "cpu", "Intel Xeon 8380", 22.0),
]
BATCH_SIZES = (1, 8)


def record_all(db: BenchmarkDB) -> int:
    """Record a performance result per run and batch size; returns how many were stored."""
    count = 0
    for model, family, hw, device, base in RUNS:
        for batch in BATCH_SIZES:
            throughput = base * batch * 0.8 if batch > 1 else base
            db.store_performance_result(
                model_name=model, model_family=family, hardware_type=hw, device_name=device,
                batch_size=batch, precision="fp16" if hw == "cuda" else "fp32",
                throughput=throughput, latency_avg=1000.0 * batch / throughput,
                memory_peak=900.0 * batch, iterations=100,
            )  # fmt: skip
            count += 1
    db.store_hardware_compatibility(
        model_name="whisper-tiny", hardware_type="rocm", device_name="AMD MI250X",
        is_compatible=False, error_message="missing kernel for conv1d", error_type="RuntimeError",
    )  # fmt: skip
    run_id = db.create_test_run("nightly", "integration", git_branch="main")
    db.store_integration_test_result(
        run_id=run_id, test_module="tests.test_bert", test_name="test_forward",
        status="pass", model_name="bert-base-uncased", hardware_type="cuda",
        execution_time_seconds=1.8,
    )  # fmt: skip
    return count


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="benchsync-example-") as tmp:
        home = Path(argv[1]) if len(argv) > 1 else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        with BenchmarkDB(home / DB_FILENAME) as db:
            stored = record_all(db)
            print(f"recorded {stored} performance results in {db.path}")
            print(f"rows per table: {db.table_counts()}")

            print("\nbert-base-uncased on cuda (query_performance_results):")
            for r in db.query_performance_results("bert-base-uncased", "cuda"):
                print(f"  batch {r['batch_size']:>2}  {r['throughput']:>8.1f} items/s"
                      f"  {r['latency_avg']:.2f} ms")  # fmt: skip

            print("\nsummary of bert-base-uncased (get_model_performance_summary):")
            for s in db.get_model_performance_summary("bert-base-uncased"):
                print(f"  {s['hardware_type']:<5} batch {s['batch_size']:>2}"
                      f"  mean {s['avg_throughput']:.1f} items/s over {s['results']} result(s)")

            print("\nsummary of cpu (get_hardware_benchmark_summary):")
            for s in db.get_hardware_benchmark_summary("cpu"):
                print(f"  {s['model_name']:<18} batch {s['batch_size']:>2}"
                      f"  mean {s['avg_throughput']:.1f} items/s")

            print("\nfastest model per hardware (plain SQL):")
            answer = db.query("""
                SELECT h.hardware_type,
                       arg_max(m.model_name, r.throughput_items_per_second) AS best,
                       max(r.throughput_items_per_second) AS items_per_s
                FROM performance_results r JOIN models m USING (model_id)
                     JOIN hardware_platforms h USING (hardware_id)
                GROUP BY h.hardware_type ORDER BY h.hardware_type
            """)
            for row in answer.to_pylist():
                print(f"  {row['hardware_type']:<5} {row['best']:<18} {row['items_per_s']:.1f}")

            print("\nincompatible (query_hardware_compatibility):")
            for c in db.query_hardware_compatibility(is_compatible=False):
                print(f"  {c['model_name']} on {c['hardware_type']}: {c['error_message']}")

            print("\nmodels most similar to bert-base-uncased (search_similar_benchmarks):")
            for s in db.search_similar_benchmarks("bert-base-uncased", top_k=3):
                print(f"  {s['model_name']:<18} score {s['score']:.3f}"
                      f"  over {s['shared_measurements']} shared measurement(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
