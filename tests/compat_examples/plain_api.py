# ruff: noqa
# was: from data.duckdb.core.benchmark_db_api_ipfs import BenchmarkDBAPIIPFS
from benchsync.compat import BenchmarkDBAPIIPFS

api = BenchmarkDBAPIIPFS()                       # behaves like the plain API
r = api.store_performance_result(model_name="bert-base-uncased", hardware_type="cuda", batch_size=8,
                                 throughput=812.5, latency_avg=9.8)
r["result_id"]
