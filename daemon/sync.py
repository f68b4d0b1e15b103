"""Following the datasets of peers: what head each one has, what we hold, and fetching the rest.

This service owns the replica table: for every dataset of the network (or
only the `trusted_peers` when that set is non-empty) the head seen, the head
installed, the bytes fetched, the lag and the last error. One worker task per
dataset fetches the newest head seen (older heads are skipped, not queued),
from the peers known to hold that root first and then any connected peer,
and retries with backoff. Only when the root's whole DAG is present and
verified is `on_complete(head)` awaited (the replica installer); the head
counts as installed once that returns. A partial root is never reported
complete.

Identities cost nothing, so a peer can sign heads for thousands of datasets
(a Sybil flood). Three bounds keep that from growing without end: at most
`max_followed` datasets are followed; `admit(dataset, source)` lets one source
(the connection that delivered the head) introduce new datasets only at a
limited rate (`NewDatasetLimiter`); and a dataset whose fetch fails backs off
exponentially up to `MAX_RETRY_DELAY`, cut short only by a newer head or a
provider not known before, never by the same head announced again.

Fast catch-up: a peer's head response lists the heads of the datasets it
holds, each with its writer's signed announcement, so a late joiner need not
wait up to a re-announce interval for every writer. The announcer verifies
that signature as it verifies gossip (`daemon/announce.py`) and hands only
verified heads to `replica_hint`: such a head is its writer's word, relayed by
a peer that holds it, and is followed like a gossip head (`admit`:
`max_followed` and the source's rate of new datasets). An unsigned replica
head never reaches the syncer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from multiformats import CID

from benchsync.daemon.config import SETTINGS_BY_NAME
from benchsync.daemon.fetch import Fetcher, FetchFailed
from benchsync.daemon.host import AccessPolicy
from benchsync.protocol.heads import Head, NewDatasetLimiter
from benchsync.storage.errors import StorageError
from benchsync.storage.snapshot import BadSnapshot

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from benchsync.storage.replica_files import ReplicaPlacement

log = logging.getLogger(__name__)

RETRY_DELAY = 0.5  # seconds before the first retry of a failed fetch
MAX_RETRY_DELAY = 300.0  # seconds: the backoff stops growing here
MAX_PROVIDERS_PER_ROOT = 64  # peers remembered as holders of one root
DEFAULT_MAX_FOLLOWED: int = SETTINGS_BY_NAME["max_followed_datasets"].default  # datasets

CompleteCallback = Callable[[Head], Awaitable[None]]
# Where a fetch of a head writes its table files' leaves (None: kept as blocks).
PlacementFactory = Callable[[Head], "ReplicaPlacement | None"]


async def _nothing(head: Head) -> None:
    return None


@dataclass
class ReplicaState:
    """Where we stand with one peer's dataset."""

    dataset: str
    head_seen: Head | None = None
    head_installed: Head | None = None
    bytes: int = 0  # block bytes fetched for this dataset so far
    last_error: str | None = None
    syncing: bool = False

    @property
    def lag_seq(self) -> int:
        """Versions we are behind (seen minus installed; all of them when none installed)."""
        if self.head_seen is None:
            return 0
        installed = -1 if self.head_installed is None else self.head_installed.seq
        return max(0, self.head_seen.seq - installed)

    @property
    def lag_seconds(self) -> float:
        """How much older our installed snapshot is than the one seen (by their created_at)."""
        if self.head_seen is None:
            return 0.0
        if self.head_installed is None:
            return max(0.0, time.time() - self.head_seen.created_at)
        return max(0.0, self.head_seen.created_at - self.head_installed.created_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "head_seen": None if self.head_seen is None else self.head_seen.to_json(),
            "head_installed": (
                None if self.head_installed is None else self.head_installed.to_json()
            ),
            "bytes": self.bytes,
            "lag_seq": self.lag_seq,
            "lag_seconds": round(self.lag_seconds, 3),
            "last_error": self.last_error,
            "syncing": self.syncing,
        }


class Syncer:
    """Keeps a replica of every followed dataset's newest head."""

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        me: str,
        policy: AccessPolicy,
        on_complete: CompleteCallback | None = None,
        connected_peers: Callable[[], list[str]] = list,
        retry_delay: float = RETRY_DELAY,
        max_followed: int = DEFAULT_MAX_FOLLOWED,
        limiter: NewDatasetLimiter | None = None,
        placement: PlacementFactory | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.me = me
        self.policy = policy
        self.on_complete = on_complete or _nothing
        self.connected_peers = connected_peers
        self.retry_delay = retry_delay
        self.max_followed = max_followed
        self.limiter = limiter or NewDatasetLimiter()
        # Replica leaves received straight into their content-addressed files; the
        # node sets it once its dataset is open.
        self.placement = placement
        self.refused_datasets = 0  # new datasets not followed (limit or rate); for status
        self.states: dict[str, ReplicaState] = {}
        self.providers: dict[CID, list[str]] = {}  # root -> peers that said they hold it
        self._wake: dict[str, trio.Event] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the dataset workers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for dataset in self.states:
                nursery.start_soon(self._worker, dataset)
            task_status.started()
            await trio.sleep_forever()

    # --- inputs -------------------------------------------------------------------

    def follows(self, dataset: str) -> bool:
        """Whether we replicate `dataset` (not ours; trusted when a trusted list is set)."""
        return dataset != self.me and self.policy.is_trusted(dataset)

    def admit(self, dataset: str, source: str) -> str | None:
        """Why a head of `dataset` delivered by `source` will not be followed, or None.

        A dataset already followed is always admitted; a new one only while
        fewer than `max_followed` are followed and `source` has not introduced
        too many new datasets lately (this takes one of its tokens).
        """
        if dataset in self.states:
            return None
        if not self.follows(dataset):
            return f"dataset {dataset} is not followed by this node"
        if len(self.states) >= self.max_followed:
            self.refused_datasets += 1
            return (
                f"already following {self.max_followed} datasets (max_followed_datasets); "
                f"not following {dataset}"
            )
        if not self.limiter.allow(source, time.monotonic()):
            self.refused_datasets += 1
            return f"peer {source} introduces new datasets too fast; not following {dataset} yet"
        return None

    async def head_seen(self, head: Head, peer: str) -> None:
        """A validated head of `head.dataset`, heard from `peer` (which can serve it).

        The caller has admitted the dataset (`admit`); a new dataset beyond
        `max_followed` is dropped all the same.
        """
        if not self.follows(head.dataset):
            return
        if head.dataset not in self.states and len(self.states) >= self.max_followed:
            self.refused_datasets += 1
            return
        state = self._state(head.dataset)
        new_provider = self.add_provider(head.root, peer)
        if state.head_seen is None or head.seq > state.head_seen.seq:
            if state.head_seen is not None and state.head_seen.root != head.root:
                # Nobody will fetch the old root for this dataset again.
                self.providers.pop(state.head_seen.root, None)
            state.head_seen = head
            self._notify(head.dataset)
        elif head == state.head_seen and state.head_installed != head and new_provider:
            # A holder we did not know: worth a retry now. The same head announced
            # again by the same peer is not (it would defeat the backoff).
            self._notify(head.dataset)

    async def replica_hint(self, head: Head, peer: str) -> None:
        """`peer` holds `head` and relayed its writer's signed announcement of it.

        The announcer verified that signature and admitted the dataset, so
        this is a signed head heard from `peer`, a provider of its root.
        """
        await self.head_seen(head, peer)

    def peer_connected(self, peer: str) -> None:
        """`peer` (re)connected: retry now the datasets it is known to hold and we lack."""
        for dataset, state in self.states.items():
            seen = state.head_seen
            if (
                seen is not None
                and seen != state.head_installed
                and peer in self.providers.get(seen.root, ())
            ):
                self._notify(dataset)

    def add_provider(self, root: CID, peer: str) -> bool:
        """Remember `peer` as a holder of `root`; True when it was not known yet."""
        peers = self.providers.setdefault(root, [])
        if peer in peers or peer == self.me:
            return False
        peers.append(peer)
        del peers[:-MAX_PROVIDERS_PER_ROOT]
        return True

    # --- outputs ------------------------------------------------------------------

    def replica_heads(self) -> list[Head]:
        """Installed heads of other datasets: what we can serve to others."""
        return [s.head_installed for s in self.states.values() if s.head_installed is not None]

    def replica_states(self) -> list[ReplicaState]:
        return sorted(self.states.values(), key=lambda s: s.dataset)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` is true; re-checked after every state change."""
        while not predicate():
            await self._changed.wait()

    def installed(self, dataset: str) -> Head | None:
        state = self.states.get(dataset)
        return None if state is None else state.head_installed

    # --- workers ------------------------------------------------------------------

    def _state(self, dataset: str) -> ReplicaState:
        state = self.states.get(dataset)
        if state is None:
            state = self.states[dataset] = ReplicaState(dataset)
            self._wake[dataset] = trio.Event()
            if self._nursery is not None:
                self._nursery.start_soon(self._worker, dataset)
        return state

    def _notify(self, dataset: str) -> None:
        self._wake[dataset].set()
        self._changed_now()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _worker(self, dataset: str) -> None:
        state = self.states[dataset]
        delay = self.retry_delay
        while True:
            await self._wake[dataset].wait()
            self._wake[dataset] = trio.Event()
            target = state.head_seen
            if target is None or target == state.head_installed:
                continue
            state.syncing = True
            self._changed_now()
            try:
                ok = await self._sync_one(state, target)
            finally:
                state.syncing = False
                self._changed_now()
            if ok:
                delay = self.retry_delay
                if state.head_seen != target:
                    self._wake[dataset].set()  # a newer head arrived meanwhile
                continue
            # Wait for news (new head, re-announcement, provider hint) or the backoff.
            with trio.move_on_after(delay):
                await self._wake[dataset].wait()
            self._wake[dataset].set()
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _sync_one(self, state: ReplicaState, target: Head) -> bool:
        hinted = self.providers.get(target.root, [])
        # The writer first (it surely holds its own head), then replica
        # holders, then anyone connected: a peer lacking the blocks says so in
        # one round trip.
        known = sorted(hinted, key=lambda p: p != target.dataset)
        providers = known + [p for p in self.connected_peers() if p not in known]
        place = None if self.placement is None else self.placement(target)
        try:
            return await self._fetch_install(state, target, providers, place)
        finally:
            if place is not None:
                place.close()

    async def _fetch_install(
        self,
        state: ReplicaState,
        target: Head,
        providers: list[str],
        place: ReplicaPlacement | None,
    ) -> bool:
        try:
            if place is None:
                result = await self.fetcher.fetch(target.root, providers)
            else:
                result = await self.fetcher.fetch(target.root, providers, place=place.files)
                # Write in the leaves held before (unchanged parts of a changed
                # file) and sync the files, before the installer checks them.
                await trio.to_thread.run_sync(place.finish)
        except FetchFailed as e:
            state.last_error = str(e)
            log.info("sync of %s seq %d: %s", state.dataset, target.seq, e)
            return False
        except BadSnapshot as e:  # placing its files found it invalid: the writer's fault
            state.last_error = f"snapshot {target.root} of {state.dataset} is not valid: {e}"
            log.error("sync of %s seq %d: %s", state.dataset, target.seq, state.last_error)
            return False
        except StorageError as e:
            state.last_error = f"local storage failed: {e}"
            log.error("sync of %s seq %d: %s", state.dataset, target.seq, state.last_error)
            return False
        state.bytes += result.stats.block_bytes
        try:
            await self.on_complete(target)
        except Exception as e:  # the installer's failure must not kill the syncer
            state.last_error = f"installing seq {target.seq} failed: {e!r}"
            log.error("sync of %s: %s", state.dataset, state.last_error)
            return False
        state.head_installed = target
        state.last_error = None
        log.info("installed %s seq %d (%s)", state.dataset, target.seq, target.root)
        return True
