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
