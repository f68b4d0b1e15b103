"""benchsync.protocol: wire formats, validation, the query planner. Pure: no I/O, trio or libp2p."""
