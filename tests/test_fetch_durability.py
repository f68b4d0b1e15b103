"""A transfer's durability: batched syncs, crash recovery, resuming, blocks by reference.

Real py-libp2p hosts on 127.0.0.1 and real fsynced `FsBlockstore`s throughout;
the crash is a real requester process killed with SIGKILL at a fault point
(`tests/fetch_crash_child.py`), then restarted on the same blockstore.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from multiformats import CID

import benchsync.daemon.fetch as fetch_mod
from benchsync.daemon.fetch import FetchFailed
from benchsync.daemon.host import StreamReader, new_benchsync_host
from benchsync.daemon.network import P2PNode
from benchsync.protocol.fetch import (
    CAR_PROTOCOL_ID,
    MAX_FETCH_FRAME,
    FetchRequest,
    FetchStatus,
)
from benchsync.protocol.frames import decode_json, encode_json_frame
from benchsync.storage import blockstore, car, unixfs
from benchsync.storage.blockstore import (
    TMP_PREFIX,
    Blockstore,
    FsBlockstore,
    MemoryBlockstore,
    add_file_by_reference,
)
from benchsync.storage.cid import RAW
from tests.test_fetch_transfer import complete, make_dag
from tests.test_p2p import LAB_KEY, join_lab

NETWORK = "lab"
TIMEOUT = 60  # seconds: bound for one scenario on a loaded 2-core box (a child process starts)
CHUNK = unixfs.CHUNK_SIZE
MIB = 1024 * 1024
CHILD = Path(__file__).with_name("fetch_crash_child.py")
REPO = Path(__file__).resolve().parents[1]


def leaves_of(store: Blockstore, root: CID) -> list[CID]:
    return [c for c, _ in unixfs.walk(store.get, root) if c.codec.code == RAW]


def node(tmp: Path, name: str, store: Blockstore) -> P2PNode:
    return P2PNode(tmp / name, network=NETWORK, blockstore=store, retry_delay=0.2,
                   lab_key=LAB_KEY)  # fmt: skip


class SyncCounter:
    """Counts the store's syncs (syncfs) and single-file fsyncs, calling the real ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.syncfs = self.fsync = 0
        real_syncfs, real_fsync = blockstore._syncfs, os.fsync

        def syncfs(fd: int) -> int:
            self.syncfs += 1
            assert real_syncfs is not None
            return real_syncfs(fd)

        def fsync(fd: int) -> None:
            self.fsync += 1
            real_fsync(fd)

        if real_syncfs is not None:
            monkeypatch.setattr(blockstore, "_syncfs", syncfs)
        monkeypatch.setattr(os, "fsync", fsync)

    @property
    def total(self) -> int:
        return self.syncfs + self.fsync


# --- batched syncs ------------------------------------------------------------------------


@pytest.mark.parametrize("batch_bytes", [4 * MIB, 0])
async def test_a_transfer_syncs_once_per_batch_not_once_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_bytes: int
) -> None:
    monkeypatch.setattr(fetch_mod, "DURABLE_BATCH_BYTES", batch_bytes)
    # Only the size bound here: on a loaded box the time slice would add syncs.
    monkeypatch.setattr(fetch_mod, "DURABLE_BATCH_SECONDS", 3600.0)
    a = node(tmp_path, "a", MemoryBlockstore())
    b = node(tmp_path, "b", FsBlockstore(tmp_path / "b" / "blocks"))  # fsync on
    payload = os.urandom(48 * CHUNK)  # 12 MiB: 48 leaves
    root = make_dag(a.blockstore, payload)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await b.connect(a.addrs[0])
            syncs = SyncCounter(monkeypatch)
            result = await b.fetcher.fetch(root, [a.peer_id])
            monkeypatch.undo()
            nursery.cancel_scope.cancel()
    assert complete(b.blockstore, root) and result.stats.blocks == 50
    if batch_bytes:
        # Three 4 MiB batches of leaves and one per inner level, two syncs each
        # (data, then names), and the transfer mark: nowhere near one per block
        # (a few fsyncs are the node's own files, e.g. its peer store).
        assert syncs.total <= 2 * (3 + 2) + 6, vars(syncs)
    else:
        assert syncs.fsync >= 50  # the switch's baseline: every block on its own


@pytest.mark.skipif(blockstore._syncfs is None, reason="counts syncfs(2) calls (Linux)")
async def test_a_small_fetch_of_several_rounds_is_made_durable_by_one_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = node(tmp_path, "a", MemoryBlockstore())
    b = node(tmp_path, "b", FsBlockstore(tmp_path / "b" / "blocks"))
    # A small change's DAG: root -> (manifest, tables) -> results: three rounds.
    fcid, _, fsize = unixfs.add_bytes(os.urandom(1000), a.blockstore.put)
    tables, tsize = unixfs.add_directory([("results.parquet", fcid, fsize)], a.blockstore.put)
    mcid, _, msize = unixfs.add_bytes(b'{"seq": 2}', a.blockstore.put)
    root, _ = unixfs.add_directory([("manifest.json", mcid, msize), ("tables", tables, tsize)],
                                   a.blockstore.put)  # fmt: skip
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await b.connect(a.addrs[0])
            syncs = SyncCounter(monkeypatch)
            result = await b.fetcher.fetch(root, [a.peer_id])
            monkeypatch.undo()
            nursery.cancel_scope.cancel()
    assert result.stats.rounds == 3 and result.stats.blocks == 4
    assert complete(b.blockstore, root)
    # The transfer mark, then one commit for the three rounds: its data, its names.
    assert syncs.syncfs == 3


async def test_a_slow_transfer_is_synced_every_time_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_mod, "DURABLE_BATCH_SECONDS", 0.2)
    source = MemoryBlockstore()
    root = make_dag(source, os.urandom(8 * CHUNK))
    leaves = leaves_of(source, root)
    r = node(tmp_path, "r", FsBlockstore(tmp_path / "r" / "blocks"))
    seen_durable: list[bool] = []

    async def pausing_provider(stream: INetStream) -> None:
        # Five leaves (over one IO_BATCH), then nothing until the requester has
        # made the first four durable: under 16 MiB, only the time slice does it.
        body = await StreamReader(stream, max_frame=MAX_FETCH_FRAME).frame()
        request = FetchRequest.from_json(decode_json(body))
        status = FetchStatus(count=len(request.want), bytes=len(request.want) * CHUNK, missing=())
        sections = [car.encode_section(c, source.get(c)) for c in request.want]
        await stream.write(encode_json_frame(status.to_json()) + car.encode_header([root])
                           + b"".join(sections[:5]))  # fmt: skip
        with trio.move_on_after(20):
            while not all(r.blockstore.has(c) for c in leaves[:4]):
                await trio.sleep(0.02)
            seen_durable.append(True)
        await stream.write(b"".join(sections[5:]))
        await stream.close()

    host = new_benchsync_host(create_new_key_pair())
    join_lab(host, LAB_KEY)
    with trio.fail_after(TIMEOUT):
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(TProtocol(CAR_PROTOCOL_ID), pausing_provider)
            async with trio.open_nursery() as nursery:
                await nursery.start(r.run)
                await r.connect(f"{host.get_addrs()[0]}/p2p/{host.get_id()}")
                assert await r.fetcher.fetch_round(host.get_id(), root, leaves) == 8
                nursery.cancel_scope.cancel()
            await host.close()
    assert seen_durable == [True]
    assert all(r.blockstore.has(c) for c in leaves)


# --- a crash, a restart, a resumed transfer ------------------------------------------------


@pytest.mark.parametrize("point", ["written", "synced"])
async def test_kill_9_at_a_fault_point_then_a_restart_verifies_and_resumes(
    tmp_path: Path, point: str
) -> None:
    a = node(tmp_path, "a", MemoryBlockstore())
    payload = os.urandom(24 * CHUNK)  # 6 MiB: 24 leaves
    root = make_dag(a.blockstore, payload)
    leaves = leaves_of(a.blockstore, root)
    home = tmp_path / "b"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            # 1 MiB batches (the root and file node ride in the first): two get
            # synced, then the process is killed: "written", when the third is
            # written but not synced; "synced", just after the second sync.
            nth = {"written": "3", "synced": "2"}[point]
            argv = [sys.executable, str(CHILD), str(home), a.addrs[0], str(root), str(MIB),
                    point, nth, LAB_KEY.hex()]  # fmt: skip
            child = await trio.run_process(argv, cwd=REPO, check=False, capture_stderr=True)
            assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

            store = FsBlockstore(home / "blocks")
            assert store.interrupted_transfers() == [root]
            held = [c for c in leaves if store.has(c)]
            assert 7 <= len(held) <= 10  # two synced batches of 1 MiB and a little more
            temps = list((home / "blocks").glob(f"*/{TMP_PREFIX}*"))
            if point == "written":
                assert temps  # the written, unsynced batch: under no CID
            # A power cut now: the unsynced tail is lost, and a disk that lied
            # about a sync tore one block it had acknowledged.
            for tmp in temps:
                tmp.write_bytes(b"")
            torn = held[-1]
            torn_path = next((home / "blocks").glob(f"*/{torn}"))
            torn_path.write_bytes(torn_path.read_bytes()[: CHUNK // 3])

            b = node(tmp_path, "b", store)  # the restart, on the same home
            await nursery.start(b.run)
            # Re-hashed as the node starts, before it serves or trusts any of it.
            assert not store.has(torn) and store.interrupted_transfers() == []
            assert await b.fetcher.recover() == []  # once a process
            await b.connect(a.addrs[0])
            result = await b.fetcher.fetch(root, [a.peer_id])
            nursery.cancel_scope.cancel()
    # Resumed: only the leaves not durably held came again (the torn one too).
    assert result.stats.blocks == len(leaves) - len(held) + 1
    assert store.verify() == []  # every stored block hashes to its CID
    assert store.interrupted_transfers() == []
    file_cid = unixfs.resolve(store.get, root, "results.parquet")
    assert b"".join(unixfs.cat(store.get, file_cid)) == payload


async def test_a_provider_dying_halfway_the_transfer_resumes_from_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_mod, "IO_BATCH", CHUNK)  # the death lands between blocks
    dying: list[Callable[[], None]] = []

    class DiesAtTheNinthLeaf(MemoryBlockstore):
        leaves_read = 0

        def get(self, cid: CID) -> bytes:
            if cid.codec.code == RAW:
                self.leaves_read += 1
                if self.leaves_read == 9:
                    trio.from_thread.run_sync(dying[0])
            return super().get(cid)

    a = node(tmp_path, "a", DiesAtTheNinthLeaf())
    dying.append(a.stop)
    c = node(tmp_path, "c", MemoryBlockstore())
    b = node(tmp_path, "b", FsBlockstore(tmp_path / "b" / "blocks"))
    payload = os.urandom(16 * CHUNK)
    root = make_dag(a.blockstore, payload)
    make_dag(c.blockstore, payload)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in (a, c, b):
                await nursery.start(n.run)
            await b.connect(a.addrs[0])
            await b.connect(c.addrs[0])
            result = await b.fetcher.fetch(root, [a.peer_id, c.peer_id])
            nursery.cancel_scope.cancel()
    assert not a.running, "the provider did not die mid-transfer"
    assert result.providers_used == [a.peer_id, c.peer_id]
    total = sum(len(d) for _, d in unixfs.walk(c.blockstore.get, root))
    # What came from a before it died was kept (durably): nothing came twice.
    assert result.stats.block_bytes == total
    assert 0 < a.provider.served.blocks < 18
    assert not b.policy.is_banned(a.peer_id)
    assert b.blockstore.verify() == [] and complete(b.blockstore, root)


# --- blocks by reference, served ---------------------------------------------------------


async def test_blocks_by_reference_are_served_as_the_same_dag_and_never_once_changed(
    tmp_path: Path,
) -> None:
    payload = os.urandom(6 * CHUNK + 5)
    segment = tmp_path / "part-0000.parquet"
    segment.write_bytes(payload)
    a = node(tmp_path, "a", FsBlockstore(tmp_path / "a" / "blocks", fsync=False))
    fcid, _, ftsize = add_file_by_reference(a.blockstore, segment)
    root, _ = unixfs.add_directory([("results.parquet", fcid, ftsize)], a.blockstore.put)
    assert root == make_dag(MemoryBlockstore(), payload)  # Kubo's CID, copied or not
    b = node(tmp_path, "b", MemoryBlockstore())
    d = node(tmp_path, "d", MemoryBlockstore())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in (a, b, d):
                await nursery.start(n.run)
            await b.connect(a.addrs[0])
            await b.fetcher.fetch(root, [a.peer_id])
            # The file changes under the provider: it serves none of the changed bytes.
            segment.write_bytes(os.urandom(len(payload)))
            await d.connect(a.addrs[0])
            with pytest.raises(FetchFailed) as failed:
                await d.fetcher.fetch(root, [a.peer_id])
            nursery.cancel_scope.cancel()
    assert b"".join(unixfs.cat(b.blockstore.get, fcid)) == payload
    assert b.blockstore.verify() == []
    assert "misbehaved" not in str(failed.value)  # it sent nothing wrong: not banned
    assert not d.policy.is_banned(a.peer_id)
    assert not any(d.blockstore.has(c) for c in leaves_of(b.blockstore, root))


# --- leaves received into the files they belong to ---------------------------------------


def bench_dag(store: Blockstore, payload: bytes) -> tuple[CID, CID]:
    """root -> (manifest.json, tables -> results.parquet): (root, the file's CID)."""
    fcid, _, fsize = unixfs.add_bytes(payload, store.put)
    tables, tsize = unixfs.add_directory([("results.parquet", fcid, fsize)], store.put)
    mcid, _, msize = unixfs.add_bytes(b'{"seq": 1}', store.put)
    root, _ = unixfs.add_directory([("manifest.json", mcid, msize), ("tables", tables, tsize)],
                                   store.put)  # fmt: skip
    return root, fcid


@pytest.mark.parametrize("held_before", [0, 5])
async def test_leaves_are_received_once_into_their_file(
    tmp_path: Path, held_before: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = node(tmp_path, "a", MemoryBlockstore())
    payload = os.urandom(12 * CHUNK + 777)
    root, fcid = bench_dag(a.blockstore, payload)
    store = FsBlockstore(tmp_path / "b" / "blocks")
    # An older version already brought some leaves: they are not received again.
    for leaf in leaves_of(a.blockstore, fcid)[3 : 3 + held_before]:
        store.put(leaf, a.blockstore.get(leaf))
    b = node(tmp_path, "b", store)
    segments = tmp_path / "replica"
    segments.mkdir()

    def target(path: str) -> Path | None:
        return segments / "results.parquet" if path == "tables/results.parquet" else None

    place = blockstore.FilePlacement(store, root, target)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await b.connect(a.addrs[0])
            result = await b.fetcher.fetch(root, [a.peer_id], place=place)
            nursery.cancel_scope.cancel()
    looked_up: list[CID] = []
    file_ref = store.file_ref

    def counting_file_ref(cid: CID) -> blockstore.FileRef | None:
        looked_up.append(cid)
        return file_ref(cid)

    monkeypatch.setattr(store, "file_ref", counting_file_ref)
    assert place.finish() == [segments / "results.parquet"]
    # What it wrote itself, finish knows: it asks the store about the earlier leaves only.
    assert len(looked_up) == held_before
    monkeypatch.undo()
    assert (segments / "results.parquet").read_bytes() == payload
    leaves = leaves_of(store, fcid)
    received = [c for c in leaves if store.file_ref(c) is not None]
    assert len(received) == len(leaves) - held_before  # each received leaf: in the file only
    assert result.stats.block_bytes < len(payload) + 2 * CHUNK
    # The store holds the inner nodes, the manifest, the earlier leaves and small records.
    assert store.disk_bytes() < (held_before + 1) * CHUNK
    assert store.verify() == [] and complete(store, root)
    assert b"".join(unixfs.cat(store.get, fcid)) == payload


async def test_kill_9_while_receiving_into_a_file_then_a_restart_completes_it(
    tmp_path: Path,
) -> None:
    a = node(tmp_path, "a", MemoryBlockstore())
    payload = os.urandom(24 * CHUNK)
    root = make_dag(a.blockstore, payload)
    leaves = leaves_of(a.blockstore, root)
    home = tmp_path / "b"
    out = tmp_path / "results.parquet"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            argv = [sys.executable, str(CHILD), str(home), a.addrs[0], str(root), str(MIB),
                    "written", "3", LAB_KEY.hex(), str(out)]  # fmt: skip
            child = await trio.run_process(argv, cwd=REPO, check=False, capture_stderr=True)
            assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

            store = FsBlockstore(home / "blocks")
            placed = [c for c in leaves if store.has(c)]
            assert 7 <= len(placed) <= 10
            assert all(store.file_ref(c) is not None for c in placed)  # in the file only
            # The disk lost the file bytes under one reference it had named.
            ref = store.file_ref(placed[-1])
            assert ref is not None and ref.path == out
            with out.open("r+b") as f:
                f.seek(ref.offset)
                f.write(os.urandom(ref.length))

            b = node(tmp_path, "b", store)
            await nursery.start(b.run)  # re-hashes the interrupted transfer as it starts
            assert not store.has(placed[-1]) and store.interrupted_transfers() == []
            await b.connect(a.addrs[0])
            place = blockstore.FilePlacement(
                store, root, lambda path: out if path == "results.parquet" else None
            )
            result = await b.fetcher.fetch(root, [a.peer_id], place=place)
            nursery.cancel_scope.cancel()
    assert place.finish() == [out]
    assert out.read_bytes() == payload
    assert result.stats.blocks == len(leaves) - len(placed) + 1
    assert store.verify() == [] and complete(store, root)
    assert all(store.file_ref(c) is not None for c in leaves)
