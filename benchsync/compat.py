"""The original "benchmark DB on IPFS" API, as a thin layer over benchsync.

Code written against the original classes runs with one changed import line::

    from benchsync.compat import BenchmarkDBAPIIPFS   # was data.duckdb.core.benchmark_db_api_ipfs

Every method delegates to the real API; nothing is implemented twice:

- the database is a `BenchmarkDB` on the file the caller names (`db_path`);
- "IPFS" is benchsync's content-addressed storage: a `LocalDataset` whose state
  (blocks, history) lives in `.{db}.benchsync/` beside the file, so that a
  version is a snapshot (`sync_to_ipfs`), the history is the snapshot chain and
  a restore is `LocalDataset.restore`; the sidecar `.{db}.ipfs.json` is kept;
- a single result (`store_result_to_ipfs`) is a UnixFS file of its JSON, with
  the CID `ipfs add --cid-version=1` gives those bytes;
- "distributed" is the local node (`benchsync up`): its control API answers
  `execute_distributed_query` (scope network), `get_status`, and fetches from
  its peers a version this machine never had (`restore_from_ipfs`).

The old JSON configuration is accepted (`IPFSConfig`, `IPFSConfig.from_file`);
every field either maps onto a benchsync setting or is reported once, as a
`logging` warning, as having no effect (`FIELD_EFFECTS`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiformats import CID

from benchsync.storage import unixfs
from benchsync.storage.cid import parse_cid_text
from benchsync.storage.dataset import LocalDataset, sidecar_path
from benchsync.storage.db import BenchmarkDB
from benchsync.storage.errors import StorageError
from benchsync.storage.migrate import MigrationError, backup_file, validate_legacy
from benchsync.storage.snapshot import Version, atomic_write, missing_blocks

__all__ = [
    "BenchmarkDBAPI",
    "BenchmarkDBAPIIPFS",
    "CompatError",
    "FIELD_EFFECTS",
    "IPFSConfig",
    "IPFSDBBackend",
    "IPFSDBMigration",
]

log = logging.getLogger("benchsync.compat")

DEFAULT_DB_PATH = "./benchmark_db.duckdb"
STATE_SUFFIX = ".benchsync"  # `.{db file name}.benchsync/`: blocks and history of a file
MAX_RESULT_BYTES = 16 * 1024 * 1024  # a stored result read back larger than this is refused
NODE_TIMEOUT = 300.0  # seconds a node-backed call may take (a network query, a fetch)

# Each old configuration field: what it does in benchsync, or None when it has no effect
# (then it is reported once, with the reason, when set to anything but its default).
FIELD_EFFECTS: dict[str, tuple[str | None, str]] = {
    "enable_ipfs_storage": ("turns on content-addressed versions (the `enable_ipfs` argument)", ""),
    "enable_distributed": ("routes execute_distributed_query and get_status through the local "
                           "node (`benchsync up`)", ""),
    "enable_knowledge_graph": ("search_similar_benchmarks and get_benchmark_relationships "
                               "(always available)", ""),
    "enable_cache": (None, "benchsync keeps every block locally; there is no separate cache"),
    "ipfs_api_url": (None, "there is no IPFS daemon: the local node is reached over its control "
                           "socket ($BENCHSYNC_HOME)"),
    "ipfs_gateway_url": (None, "blocks are served to peers by the node, not by an HTTP gateway"),
    "local_cache_dir": (None, "blocks and history live in `.{db}.benchsync/` beside the database"),
    "auto_pin": ("sync_to_ipfs pins each version (versions are also kept as history)", ""),
    "cache_ttl_seconds": (None, "blocks do not expire; `benchsync gc` removes unreferenced ones"),
}
_warned: set[str] = set()


class CompatError(StorageError):
    """A call of the original API that benchsync cannot answer; the message says why."""


@dataclass
class IPFSConfig:
    """The original configuration; see `FIELD_EFFECTS` for what each field does now."""

    enable_ipfs_storage: bool = False
    enable_distributed: bool = False
    enable_knowledge_graph: bool = False
    enable_cache: bool = True
    ipfs_api_url: str = "http://127.0.0.1:5001"
    ipfs_gateway_url: str = "http://127.0.0.1:8080"
    local_cache_dir: str = "~/.ipfs_benchmarks/cache"
    auto_pin: bool = True
    cache_ttl_seconds: int = 3600

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            effect, why = FIELD_EFFECTS[f.name]
            if effect is None and getattr(self, f.name) != f.default:
                _warn_once(f.name, f"IPFSConfig.{f.name} has no effect in benchsync: {why}")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> IPFSConfig:
        """A config from the old JSON object; unknown fields raise CompatError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise CompatError(f"unknown configuration field(s) {unknown}; known: {sorted(names)}")
        return cls(**doc)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> IPFSConfig:
        """A config from the old JSON file. Raises CompatError (not JSON, unknown fields)."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CompatError(f"cannot read the JSON configuration {path}: {e}") from None
        if not isinstance(doc, dict):
            raise CompatError(f"{path}: expected a JSON object of configuration fields")
        return cls.from_dict(doc)

    def effects(self) -> list[tuple[str, str | None, str]]:
        """(field, what it does or None, why not) for every field, in declaration order."""
        return [(f.name, *FIELD_EFFECTS[f.name]) for f in dataclasses.fields(self)]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _config(config: IPFSConfig | dict[str, Any] | str | os.PathLike[str] | None) -> IPFSConfig:
    if config is None:
        return IPFSConfig()
    if isinstance(config, IPFSConfig):
        return config
    if isinstance(config, dict):
        return IPFSConfig.from_dict(config)
    return IPFSConfig.from_file(config)


# ---- the file's content-addressed state ---------------------------------------------------


class _FileDataset(LocalDataset):
    """A `LocalDataset` on a database file the caller names, its state beside it."""

    def __init__(self, db_path: Path) -> None:
        super().__init__(state_dir(db_path), f"compat-{db_path.name}")
        self.db_path = db_path  # opened on first use, so not yet opened at the default path


def state_dir(db_path: Path) -> Path:
    """Where blocks and history of a standalone database file live."""
    return db_path.with_name(f".{db_path.name}{STATE_SUFFIX}")


def _version_json(version: Version) -> dict[str, Any]:
    return {"cid": version.cid, "timestamp": version.created_at, **version.to_json()}


def _old_sidecar(dataset: LocalDataset) -> None:
    """Add the original sidecar's `timestamp` and `size` to the one benchsync wrote."""
    path = sidecar_path(dataset.db_path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(timestamp=doc["created_at"], size=doc["db_size"])
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")


# ---- the local node ------------------------------------------------------------------------


def _node_client() -> Any:
    """A control client of the node running on $BENCHSYNC_HOME (or the XDG data dir), or None."""
    from benchsync.daemon.cli.common import control_sockets, data_dir
    from benchsync.daemon.config import load_config
    from benchsync.daemon.control import ControlClient

    home = data_dir()
    if not home.exists():
        return None
    config = load_config(home, None)
    for path in control_sockets(home, config.control_socket, config.sources.get("control_socket")):
        client = ControlClient(socket_path=path, timeout=NODE_TIMEOUT)
        if client.available():
            return client
    return None


def _node_dataset() -> LocalDataset:
    """The local node's data directory, for its blocks only (no lock, no database)."""
    from benchsync.daemon.cli.common import data_dir

    return LocalDataset(data_dir(), "compat", read_only=True)


def _copy_version(src: LocalDataset, dst: LocalDataset, cid: str) -> None:
    """Copy the blocks of version `cid` as a verified CAR; the importer pins the root."""
    with tempfile.TemporaryFile(dir=src.tmp) as car_file:
        src.export_car(car_file, cid)
        car_file.seek(0)
        dst.import_cars([(f"{cid}.car", car_file)])


def _require_node() -> Any:
    client = _node_client()
    if client is None:
        raise CompatError(
            "no benchsync node is running on this machine: start one with `benchsync up` "
            "(or point $BENCHSYNC_HOME at its data directory)"
        )
    return client


# ---- the classes ---------------------------------------------------------------------------


class IPFSDBBackend:
    """Content-addressed versions of one database file (the original `IPFSDBBackend`)."""

    def __init__(self, db_path: str | os.PathLike[str],
                 config: IPFSConfig | dict[str, Any] | str | None = None,
                 auto_sync: bool = False) -> None:
        self.db_path = Path(db_path).expanduser().absolute()
        self.config = _config(config)
        self.auto_sync = auto_sync
        self.dataset = _FileDataset(self.db_path)

    @property
    def db(self) -> BenchmarkDB:
        return self.dataset.db

    def close(self) -> None:
        self.dataset.close()

    def is_ipfs_enabled(self) -> bool:
        """Always True: content-addressed storage is built in, no daemon is needed."""
        return True

    def sync_to_ipfs(self, pin: bool = True) -> str | None:
        """Snapshot the database; its root CID (the same content gives the same CID)."""
        version = self.dataset.snapshot().version
        if pin:
            self.dataset.pin(version.cid)
        _old_sidecar(self.dataset)
        self._publish(version.cid)
        return version.cid

    def restore_from_ipfs(self, cid: str | None = None) -> bool:
        """Make version `cid` (None: the newest) current; False, with a logged reason, if not.

        A version this machine does not hold is fetched by the local node from its peers.
        """
        if cid is None:
            head = self.dataset.head()
            if head is None:
                log.warning("restore_from_ipfs: %s has no version yet", self.db_path)
                return False
            cid = head.cid
        try:
            if not self._held(cid) and not self._fetch_from_node(cid):  # ask the lab
                return False
            self.dataset.restore(cid)
        except StorageError as e:
            log.warning("restore_from_ipfs(%s) failed: %s", cid, e)
            return False
        _old_sidecar(self.dataset)
        return True

    def _held(self, cid: str) -> bool:
        """Is version `cid` (a CID, prefix or tag) here with every block of its DAG?"""
        try:
            root = CID.decode(self.dataset.find(cid).cid)
        except (StorageError, ValueError):  # not in our history, or its root is not here
            return False
        return not missing_blocks(self.dataset.blocks, root)

    def _fetch_from_node(self, cid: str) -> bool:
        """Have the local node fetch `cid` from its peers, then copy its blocks here."""
        from benchsync.daemon.control import ControlAPIError

        client = _node_client()
        if client is None:
            log.warning("restore_from_ipfs(%s): not on this machine and no local node "
                        "runs to fetch it (start one with `benchsync up`)", cid)
            return False
        try:
            client.post("/v1/fetch", {"cid": cid})
            node = _node_dataset()
            try:
                _copy_version(node, self.dataset, cid)
            finally:
                node.close()
        except (ControlAPIError, StorageError) as e:
            log.warning("restore_from_ipfs(%s): the local node could not fetch it: %s", cid, e)
            return False
        return True

    def _publish(self, cid: str) -> None:
        """Put version `cid` in the local node's blockstore (pinned), where peers fetch it."""
        if _node_client() is None:
            return
        node = _node_dataset()
        try:
            _copy_version(self.dataset, node, cid)
        finally:
            node.close()

    def get_current_cid(self) -> str | None:
        head = self.dataset.head()
        return None if head is None else head.cid

    def get_version_history(self) -> list[dict[str, Any]]:
        """Every version, newest first: {"cid", "timestamp", ...}."""
        return [_version_json(v) for v in self.dataset.history()]

    def store_result_to_ipfs(self, result_data: dict[str, Any]) -> str | None:
        """Store one result as a UnixFS file of its canonical JSON; its CID (as `ipfs add`)."""
        data = json.dumps(result_data, sort_keys=True, separators=(",", ":"), default=str).encode()
        with self.dataset.blocks.batch():
            root, _, _ = unixfs.add_bytes(data, self.dataset.blocks.put)
        self.dataset.pin(root)
        return str(root)

    def retrieve_result_from_ipfs(self, cid: str) -> dict[str, Any] | None:
        """The result stored under `cid`, or None (unknown CID, not a stored result)."""
        try:
            data = b"".join(unixfs.cat(self.dataset.blocks.get, parse_cid_text(cid)))
            if len(data) > MAX_RESULT_BYTES:
                return None
            doc = json.loads(data)
        except (StorageError, ValueError, KeyError) as e:
            log.warning("retrieve_result_from_ipfs(%s): %s", cid, e)
            return None
        return doc if isinstance(doc, dict) else None

    def get_ipfs_stats(self) -> dict[str, Any]:
        """The file's versions and blocks, and the local node's state when one runs."""
        head = self.dataset.head()
        client = _node_client()
        return {
            "enabled": True,
            "db_path": str(self.db_path),
            "cid": None if head is None else head.cid,
            "versions": len(self.dataset.history()),
            "blocks": sum(1 for _ in self.dataset.blocks.cids()),
            "bytes": self.dataset.blocks.total_bytes(),
            "pinned": len(self.dataset._pins()),
            "state_dir": str(self.dataset.home),
            "node": None if client is None else client.get("/v1/status"),
        }


class BenchmarkDBAPI:
    """The plain original API over one database file."""

    def __init__(self, db_path: str = DEFAULT_DB_PATH, debug: bool = False) -> None:
        self.db_path = str(db_path)
        self.debug = debug
        if debug:
            log.setLevel(logging.DEBUG)
        self._backend = IPFSDBBackend(db_path)

    @property
    def db(self) -> BenchmarkDB:
        return self._backend.db

    def close(self) -> None:
        self._backend.close()

    def _stored(self, kind: str, new_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        return {"success": True, "result_id": new_id, f"{kind}_id": new_id}

    def store_performance_result(self, **kwargs: Any) -> dict[str, Any]:
        """{"success": True, "result_id": id}; raises InvalidRecord."""
        return self._stored("performance", self.db.store_performance_result(**kwargs), kwargs)

    def store_hardware_compatibility(self, **kwargs: Any) -> dict[str, Any]:
        return self._stored("compatibility",
                            self.db.store_hardware_compatibility(**kwargs), kwargs)

    def store_integration_test_result(self, **kwargs: Any) -> dict[str, Any]:
        return self._stored("test_result",
                            self.db.store_integration_test_result(**kwargs), kwargs)

    def query_performance_results(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.db.query_performance_results(**kwargs)

    def query_hardware_compatibility(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.db.query_hardware_compatibility(**kwargs)

    def query_integration_test_results(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.db.query_integration_test_results(**kwargs)

    def get_model_performance_summary(self, model_name: str) -> dict[str, Any]:
        """{"model_name", "total_results", "summary": [per hardware/batch/precision rows]}."""
        rows = self.db.get_model_performance_summary(model_name)
        return {"model_name": model_name, "total_results": sum(r["results"] for r in rows),
                "summary": rows}

    def get_hardware_benchmark_summary(self, hardware_type: str) -> dict[str, Any]:
        """{"hardware_type", "total_results", "summary": [per model/batch/precision rows]}."""
        rows = self.db.get_hardware_benchmark_summary(hardware_type)
        return {"hardware_type": hardware_type, "total_results": sum(r["results"] for r in rows),
                "summary": rows}


class BenchmarkDBAPIIPFS(BenchmarkDBAPI):
    """The original API with versions, single-result storage, the graph and the network."""

    def __init__(self, db_path: str = DEFAULT_DB_PATH, debug: bool = False,
                 enable_ipfs: bool = False, ipfs_config: IPFSConfig | dict[str, Any] | None = None,
                 enable_distributed: bool = False, enable_knowledge_graph: bool = False) -> None:
        super().__init__(db_path, debug)
        self.ipfs_config = _config(ipfs_config)
        self.enable_ipfs = enable_ipfs or self.ipfs_config.enable_ipfs_storage
        self.enable_distributed = enable_distributed or self.ipfs_config.enable_distributed
        self.enable_knowledge_graph = (enable_knowledge_graph
                                       or self.ipfs_config.enable_knowledge_graph)
        self._backend.config = self.ipfs_config
        self.ipfs_backend = self._backend if self.enable_ipfs else None

    def _stored(self, kind: str, new_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        out = super()._stored(kind, new_id, fields)
        if self.enable_ipfs:
            out["ipfs_cid"] = self._backend.store_result_to_ipfs(
                {"kind": kind, "result_id": new_id, **fields})
            if self._backend.auto_sync:
                self.sync_to_ipfs()
        return out

    def _ipfs(self, name: str) -> bool:
        if not self.enable_ipfs:
            log.warning("%s: IPFS storage is off; create the API with enable_ipfs=True", name)
        return self.enable_ipfs

    def sync_to_ipfs(self, pin: bool = True) -> str | None:
        """Snapshot the database; its CID, or None when IPFS storage is off."""
        if not self._ipfs("sync_to_ipfs"):
            return None
        return self._backend.sync_to_ipfs(pin=pin and self.ipfs_config.auto_pin)

    def restore_from_ipfs(self, cid: str | None = None) -> bool:
        return self._ipfs("restore_from_ipfs") and self._backend.restore_from_ipfs(cid)

    def get_ipfs_cid(self) -> str | None:
        return self._backend.get_current_cid() if self.enable_ipfs else None

    def get_ipfs_stats(self) -> dict[str, Any]:
        if not self.enable_ipfs:
            return {"enabled": False}
        return self._backend.get_ipfs_stats()

    def get_version_history(self) -> list[dict[str, Any]]:
        return self._backend.get_version_history() if self.enable_ipfs else []

    def search_similar_benchmarks(self, model_name: str, top_k: int = 5) -> list[dict[str, Any]]:
        return self.db.search_similar_benchmarks(model_name, top_k)

    def get_benchmark_relationships(self, node_id: str) -> list[dict[str, Any]]:
        return self.db.get_benchmark_relationships(node_id)

    def execute_distributed_query(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Rows of `query` over every node of the lab (through the local node), as dicts.

        kwargs: `params`, `peers`, `timeout`, `allow_partial`. Without
        enable_distributed the query runs on this file alone. Raises CompatError
        when no node runs or the answer would miss a dataset (unless allow_partial).
        """
        from benchsync.daemon.control import ControlAPIError

        if not self.enable_distributed:
            table = self._backend.dataset.query(query, kwargs.get("params"))
            return table.to_pylist()
        body = {"sql": query, "scope": "network", **kwargs}
        try:
            answer = _require_node().post("/v1/query", body)
        except ControlAPIError as e:
            raise CompatError(f"the distributed query failed: {e}") from e
        columns = answer["columns"]
        return [dict(zip(columns, row, strict=True)) for row in answer["rows"]]

    def get_status(self) -> dict[str, Any]:
        """This API's settings and file, and the local node's status (None when none runs)."""
        client = _node_client() if self.enable_distributed else None
        return {
            "db_path": self.db_path,
            "ipfs_enabled": self.enable_ipfs,
            "distributed_enabled": self.enable_distributed,
            "knowledge_graph_enabled": self.enable_knowledge_graph,
            "cid": self._backend.get_current_cid(),
            "tables": self.db.table_counts(),
            "node": None if client is None else client.get("/v1/status"),
        }


class IPFSDBMigration:
    """Bring existing database files under content addressing (the original migration)."""

    def __init__(self, config: IPFSConfig | dict[str, Any] | str | None = None) -> None:
        self.config = _config(config)

    def migrate_database(self, db_path: str, create_backup: bool = True) -> str | None:
        """Back the file up beside itself, then version it: its CID, or None (logged why)."""
        path = Path(db_path)
        try:
            validate_legacy(path)
            if create_backup:
                backup = backup_file(path)
                log.info("%s: backed up to %s", path, backup)
            backend = IPFSDBBackend(path, self.config)
            try:
                return backend.sync_to_ipfs(pin=self.config.auto_pin)
            finally:
                backend.close()
        except (MigrationError, StorageError, OSError) as e:
            log.warning("migrate_database(%s) failed: %s", db_path, e)
            return None

    def batch_migrate(self, db_paths: list[str],
                      create_backups: bool = True) -> dict[str, str | None]:
        """{path: CID, or None for a file that failed}; the others still migrate."""
        return {p: self.migrate_database(p, create_backup=create_backups) for p in db_paths}

