"""benchsync.protocol: wire formats, validation and the query planner. Pure: no I/O, no trio, no libp2p."""
