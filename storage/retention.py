"""History retention: which versions of the own history keep their tables.

Parent links live inside content-addressed manifests, so the history cannot
be rewritten. Thinning therefore keeps every version's root and manifest
(a few hundred bytes: `log` still walks the whole chain) and drops only the
tables of the versions it thins; block GC then frees what no kept version,
replica or pin references. A thinned version stays in `log`, marked, and is
no longer restorable.

The rule, as Litestream's `retention` and Iceberg's `expire_snapshots` put it:
every version newer than `retention` keeps its tables; older ones are thinned
to the newest of each `interval` (UTC-aligned buckets, so a version kept
yesterday is kept today). The head, pinned and tagged versions are kept
forever. A disk budget thins harder (`over_budget`): the oldest versions the
rule kept go first, never the head, a pin or a tag.

This module decides (`plan`, `tighten`) and records: `snapshots/thinned.json`
(versions whose tables were given up: written *before* any block is deleted,
so a crash leaves at worst a version marked thinned whose blocks are still
there) and `snapshots/tags.json` (name -> version). It deletes nothing itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchsync.storage.errors import StorageError

if TYPE_CHECKING:  # the settings table imports this module's defaults: keep it light
    from benchsync.storage.snapshot import Version

HISTORY_RETENTION = 3 * 86400.0  # seconds: every version newer than this keeps its tables
HISTORY_INTERVAL = 86400.0  # seconds: older versions are thinned to one per this interval
REPLICA_EXPIRY = 30 * 86400.0  # seconds a replica is kept after its dataset was last seen
THINNED_FILENAME = "thinned.json"
TAGS_FILENAME = "tags.json"
# A tag names a version for people: short, printable, and never mistaken for a CID.
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CID_LIKE_RE = re.compile(r"^(baf[a-z2-7]|Qm)")


class BadTag(StorageError):
    """A tag name is not acceptable (the caller's fault)."""


@dataclass(frozen=True)
class RetentionPolicy:
    """How much history keeps its tables; see the module docstring."""

    retention: float = HISTORY_RETENTION  # seconds
    interval: float = HISTORY_INTERVAL  # seconds


@dataclass
class RetentionPlan:
    """One decision over the history (newest first, as `SnapshotStore.history`)."""

    keep: list[Version]  # keep their tables, newest first
    thin: list[Version]  # lose their tables now (not yet recorded as thinned)
    thinned: list[Version]  # lost them in an earlier pass
    protected: set[str] = field(default_factory=set)  # roots kept forever (head, pins, tags)

    def droppable(self) -> list[Version]:
        """Kept versions a budget may still thin, oldest first."""
        return [v for v in reversed(self.keep) if v.cid not in self.protected]


def plan(
    history: list[Version],
    now: float,
    policy: RetentionPolicy,
    *,
    protected: Iterable[str] = (),
    thinned: Iterable[str] = (),
) -> RetentionPlan:
    """Which versions of `history` (newest first) keep their tables at time `now`.

    The head (history[0]), `protected` roots and versions newer than
    `policy.retention` are kept; older ones keep the newest of each
    `policy.interval` bucket. Versions in `thinned` stay thinned (their tables
    are gone): a plan never promises what is not there.
    """
    gone = set(thinned)
    keep_forever = set(protected)
    if history:
        keep_forever.add(history[0].cid)
    result = RetentionPlan(keep=[], thin=[], thinned=[], protected=keep_forever)
    buckets: set[int] = set()
    cutoff = now - policy.retention
    for version in history:  # newest first: the first version seen in a bucket is its newest
        if version.cid in gone and version.cid not in keep_forever:
            result.thinned.append(version)
            continue
        bucket = int(version.created_at // policy.interval) if policy.interval > 0 else 0
        # Recent versions claim their bucket too: older ones in it are thinned.
        if version.cid in keep_forever or version.created_at >= cutoff or bucket not in buckets:
            result.keep.append(version)
            buckets.add(bucket)
        else:
            result.thin.append(version)
    return result


def tighten(
    result: RetentionPlan,
    cost: Callable[[Version], set[str]],
    sizes: Mapping[str, int],
    fixed_bytes: int,
    budget: int,
) -> tuple[int, bool]:
    """Thin the oldest droppable kept versions until the total fits `budget`.

    `cost(version)` is the set of block keys its tables hold (shared blocks
    count once), `sizes` their bytes, `fixed_bytes` what stays whatever is
    thinned (the database, replicas, manifests). Moves versions from `keep`
    to `thin`. Returns (bytes of the kept history, whether it fits).
    """
    refs: dict[str, int] = {}
    blocks: dict[str, set[str]] = {}
    for version in result.keep:
        blocks[version.cid] = cost(version)
        for key in blocks[version.cid]:
            refs[key] = refs.get(key, 0) + 1
    held = sum(sizes.get(k, 0) for k in refs)
    for version in result.droppable():
        if fixed_bytes + held <= budget:
            break
        result.keep.remove(version)
        result.thin.append(version)
        for key in blocks[version.cid]:
            refs[key] -= 1
            if refs[key] == 0:
                held -= sizes.get(key, 0)
    return held, fixed_bytes + held <= budget


# --- records ----------------------------------------------------------------------------


def read_thinned(state_dir: Path) -> dict[str, float]:
    """Root CID -> when its tables were given up; {} when nothing was thinned."""
    return {str(k): float(v) for k, v in _read_map(state_dir / THINNED_FILENAME).items()}


def record_thinned(state_dir: Path, versions: Iterable[Version], when: float) -> None:
    """Add `versions` to the thinned record, durably (before their blocks go)."""
    from benchsync.storage.snapshot import atomic_write
    current = read_thinned(state_dir)
    added = {v.cid: when for v in versions if v.cid not in current}
    if added:
        atomic_write(state_dir / THINNED_FILENAME,
                     json.dumps(current | added, sort_keys=True).encode())  # fmt: skip


def read_tags(state_dir: Path) -> dict[str, str]:
    """Tag name -> root CID."""
    return {str(k): str(v) for k, v in _read_map(state_dir / TAGS_FILENAME).items()}


def write_tags(state_dir: Path, tags: Mapping[str, str]) -> None:
    from benchsync.storage.snapshot import atomic_write

    atomic_write(state_dir / TAGS_FILENAME, json.dumps(dict(tags), sort_keys=True).encode())


def check_tag(name: str) -> str:
    """`name` if it may name a version; raises BadTag saying why not."""
    if not isinstance(name, str) or not TAG_RE.fullmatch(name):
        raise BadTag(
            f"tag {str(name)[:80]!r} is not a valid name: use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    if CID_LIKE_RE.match(name):
        raise BadTag(f"tag {name!r} looks like a CID; choose a name that does not start "
                     "with 'baf' or 'Qm'")  # fmt: skip
    return name


def _read_map(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {path}: {e}; fix or delete it") from e
    if not isinstance(doc, dict):
        raise StorageError(f"{path} is damaged (not a JSON object); fix or delete it")
    return doc
