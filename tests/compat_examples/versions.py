# ruff: noqa
# was: from data.duckdb.core.benchmark_db_api_ipfs import BenchmarkDBAPIIPFS
from benchsync.compat import BenchmarkDBAPIIPFS

api = BenchmarkDBAPIIPFS(enable_ipfs=True)
r = api.store_performance_result(model_name="bert-base-uncased", hardware_type="cuda",
                                 batch_size=8, throughput=812.5, latency_avg=9.8); r["ipfs_cid"]
cid_v1 = api.sync_to_ipfs()                      # same content -> same CID
api.store_performance_result(model_name="t5-small", hardware_type="cpu",   # more results
                             batch_size=1, throughput=40.0, latency_avg=25.0)
cid_v2 = api.sync_to_ipfs()                      # a new version
api.get_version_history()                        # [{"cid": ..., "timestamp": ...}, ...]
api.restore_from_ipfs(cid_v1)                    # rollback -> True
