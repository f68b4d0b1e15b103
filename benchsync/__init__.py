"""benchsync: peer-to-peer sync of machine-learning benchmark results.

The Python API's public names::

    from benchsync import BenchmarkDB

The code lives in three subpackages, the architecture (see DESIGN.md):
`benchsync.storage` (everything on disk), `benchsync.protocol` (wire formats,
pure) and `benchsync.daemon` (libp2p host, services, control API, CLI).

The names below load on first use, so `import benchsync` stays cheap: it
imports neither DuckDB nor trio nor libp2p until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (storage names only: no networking)
_PUBLIC = {
    "BenchmarkDB": "benchsync.storage.db",
    "LocalDataset": "benchsync.storage.dataset",
    "StorageError": "benchsync.storage.errors",
    "InvalidRecord": "benchsync.storage.errors",
    "NotFound": "benchsync.storage.errors",
    "CorruptBlock": "benchsync.storage.errors",
    "TooLarge": "benchsync.storage.errors",
    "QueryError": "benchsync.storage.sandbox",
}

__all__ = [
    "BenchmarkDB",
    "CorruptBlock",
    "InvalidRecord",
    "LocalDataset",
    "NotFound",
    "QueryError",
    "StorageError",
    "TooLarge",
    "__version__",
]

if TYPE_CHECKING:
    from benchsync.storage.dataset import LocalDataset
    from benchsync.storage.db import BenchmarkDB
    from benchsync.storage.errors import (
        CorruptBlock,
        InvalidRecord,
        NotFound,
        StorageError,
        TooLarge,
    )
    from benchsync.storage.sandbox import QueryError


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    try:
        module = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'benchsync' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
