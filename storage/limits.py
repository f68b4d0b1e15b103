"""Fixed size limits of the formats benchsync stores and exchanges.

These are properties of the formats, not settings: a setting may lower them
(`max_block_bytes` in daemon/config.py is checked against `MAX_BLOCK_SIZE`),
never raise them. The module imports nothing, so that the settings table can
use it without loading the codecs.
"""

# IPFS's own block limit: Kubo and Bitswap refuse blocks over 2 MiB, so a
# bigger block could not be fetched by any IPFS peer either. Ours are far
# smaller (leaves are 256 KiB; a 174-link node is ~8 KiB).
MAX_BLOCK_SIZE = 2 * 1024 * 1024  # bytes
MAX_CID_BYTES = 128  # bytes; a sha2-512 CIDv1 is 68, so this is generous

# Default limits of one query. The Python API (`LocalDataset.query`) uses these;
# the node's settings (query_timeout, query_max_rows, query_max_bytes,
# query_memory_limit in daemon/config.py) take their defaults from here.
QUERY_TIMEOUT = 30.0  # seconds
QUERY_MAX_ROWS = 100_000  # rows in one answer
QUERY_MAX_BYTES = 64 * 1024 * 1024  # bytes of Arrow data in one answer
QUERY_MEMORY_LIMIT = 1024 * 1024 * 1024  # bytes of DuckDB memory for one query
