"""benchsync.storage: everything on disk (DuckDB, Parquet, UnixFS, CAR, blocks). No networking."""
