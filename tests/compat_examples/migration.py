# ruff: noqa
# was: from data.duckdb.ipfs_integration import IPFSDBMigration
from benchsync.compat import IPFSDBMigration

migration = IPFSDBMigration()
cid = migration.migrate_database("existing_benchmark.duckdb", create_backup=True)
results = migration.batch_migrate(["db1.duckdb", "db2.duckdb", "db3.duckdb"], create_backups=True)
for path, cid in results.items():
    print(path, cid)
