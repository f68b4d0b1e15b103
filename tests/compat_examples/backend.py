# ruff: noqa
# was: from data.duckdb.ipfs_integration import IPFSDBBackend
from benchsync.compat import IPFSDBBackend

backend = IPFSDBBackend("benchmarks.db")
cid = backend.sync_to_ipfs(); backend.restore_from_ipfs(cid); backend.get_ipfs_stats()
