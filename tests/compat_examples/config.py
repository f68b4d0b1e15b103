# ruff: noqa
# was: from data.duckdb.core.benchmark_db_api_ipfs import BenchmarkDBAPIIPFS
#      from data.duckdb.ipfs_integration import IPFSConfig
from benchsync.compat import BenchmarkDBAPIIPFS, IPFSConfig

config = IPFSConfig(enable_ipfs_storage=True, enable_distributed=True, enable_knowledge_graph=True,
                    enable_cache=True, ipfs_api_url="http://127.0.0.1:5001", auto_pin=True)
api = BenchmarkDBAPIIPFS(enable_ipfs=True, ipfs_config=config, enable_distributed=True, enable_knowledge_graph=True)
