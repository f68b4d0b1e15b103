# ruff: noqa
# was: from data.duckdb.core.benchmark_db_api_ipfs import BenchmarkDBAPIIPFS
from benchsync.compat import BenchmarkDBAPIIPFS

cid_v1 = CID_V1  # noqa: F821 (given by the test: a version made on another machine of the lab)

# "access from any machine": on another machine of the lab
api2 = BenchmarkDBAPIIPFS(enable_ipfs=True)
api2.restore_from_ipfs(cid_v1)                   # downloads it from the network
