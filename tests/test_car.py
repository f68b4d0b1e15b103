"""CARv1 writer and sans-IO reader: interop with ipfs-car, limits, distinct errors, fuzzing."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiformats import CID

from benchsync.storage import car, unixfs
from benchsync.storage.blockstore import MemoryBlockstore, verify_block
from benchsync.storage.cid import block_cid
from benchsync.storage.errors import CorruptBlock, StorageError, TooLarge

FIXTURES = Path(__file__).parent / "fixtures" / "car"
HELLO_CID = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
DIR_IPFSCAR_CID = "bafybeiggcmqpejwawuxxwoyksuks5vlnhydpmdvbpqszen2ioqd2lludim"

BROKEN = {
    "broken-truncated-section.car": car.CarTruncated,
    "broken-truncated-header.car": car.CarTruncated,
    "broken-flipped-byte.car": car.CarBlockMismatch,
    "broken-bad-varint.car": car.CarBadVarint,
    "broken-oversized-section.car": car.CarTooLarge,
    "broken-unknown-codec.car": car.CarUnknownCodec,
    "broken-unknown-hash.car": car.CarUnsupportedHash,
    "broken-carv2-header.car": car.CarBadHeader,
    "broken-header-not-map.car": car.CarBadHeader,
}
FUZZ_SEEDS = ["good-hello-ipfscar.car", *BROKEN]


def read_all(data: bytes, **limits: int) -> tuple[list[CID], list[tuple[CID, bytes]]]:
    roots, blocks = car.read_car(io.BytesIO(data), **limits)
    return roots, list(blocks)


def snapshot_dag(tmp_path: Path) -> tuple[CID, MemoryBlockstore]:
    """A small snapshot-like directory with a multi-level file, in a memory blockstore."""
    root = tmp_path / "snap"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "models.parquet").write_bytes(os.urandom(200_000))
    (root / "manifest.json").write_bytes(b'{"seq": 1}')
    blocks = MemoryBlockstore()
    # small chunks so the file has internal nodes, like a real multi-MiB table
    cid = unixfs.add_path(root, blocks.put, chunk_size=16 * 1024, max_links=4)
    return cid, blocks


def test_our_car_of_a_file_is_byte_identical_to_ipfs_car() -> None:
    theirs = (FIXTURES / "good-hello-ipfscar.car").read_bytes()
    blocks = MemoryBlockstore()
    cid, _, _ = unixfs.add_bytes(b"hello world\n", blocks.put)
    assert str(cid) == HELLO_CID
    out = io.BytesIO()
    written = car.write_car(out, [cid], unixfs.walk(blocks.get, cid))
    assert out.getvalue() == theirs
    assert written == len(theirs)
    assert theirs.startswith(car.encode_header([cid]))


def test_read_ipfs_car_directory_and_rebuild_it(tmp_path: Path) -> None:
    roots, blocks = read_all((FIXTURES / "good-dir-ipfscar.car").read_bytes())
    assert [str(r) for r in roots] == [DIR_IPFSCAR_CID]
    store = MemoryBlockstore()
    for cid, data in blocks:
        store.put(cid, data)
    names = [name for name, _, _ in unixfs.list_directory(store.get, roots[0])]
    assert names == ["a.parquet", "b.parquet"]
    b = b"".join(unixfs.cat(store.get, unixfs.resolve(store.get, roots[0], "b.parquet")))
    assert len(b) == 1024
    # The CAR is complete: every block the DAG needs is in it.
    assert {str(c) for c, _ in unixfs.walk(store.get, roots[0])} == {str(c) for c, _ in blocks}


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    root, store = snapshot_dag(tmp_path)
    out = io.BytesIO()
    writer = car.CarWriter(out, [root])
    expected = list(unixfs.walk(store.get, root))
    for cid, data in expected:
        writer.write_block(cid, data)
    assert writer.bytes_written == len(out.getvalue())
    assert len(expected) > 10
    roots, blocks = read_all(out.getvalue())
    assert roots == [root]
    assert blocks == expected


def test_sections_concatenate_to_the_same_stream(tmp_path: Path) -> None:
    root, store = snapshot_dag(tmp_path)
    blocks = list(unixfs.walk(store.get, root))
    streamed = car.encode_header([root]) + b"".join(car.encode_section(c, d) for c, d in blocks)
    assert streamed == car.car_bytes([root], blocks)


def test_header_with_several_roots_and_none() -> None:
    a, b = block_cid(0x55, b"a"), block_cid(0x55, b"b")
    assert read_all(car.encode_header([a, b]))[0] == [a, b]
    assert read_all(car.encode_header([])) == ([], [])


@pytest.mark.parametrize(("name", "error"), BROKEN.items())
def test_broken_fixtures_raise_distinct_errors(name: str, error: type[car.CarError]) -> None:
    with pytest.raises(error) as info:
        read_all((FIXTURES / name).read_bytes())
    assert isinstance(info.value, car.CarError)
    assert isinstance(info.value, StorageError)


def test_errors_carry_their_numbers() -> None:
    with pytest.raises(car.CarTooLarge) as too_large:
        read_all((FIXTURES / "broken-oversized-section.car").read_bytes())
    assert isinstance(too_large.value, TooLarge)
    assert (too_large.value.limit, too_large.value.got) == (car.DEFAULT_MAX_SECTION, 64 << 20)

    with pytest.raises(car.CarBlockMismatch) as mismatch:
        read_all((FIXTURES / "broken-flipped-byte.car").read_bytes())
    assert isinstance(mismatch.value, CorruptBlock)
    assert str(mismatch.value.cid) == HELLO_CID

    with pytest.raises(car.CarBadHeader, match="CARv2"):
        read_all((FIXTURES / "broken-carv2-header.car").read_bytes())


def test_block_and_section_limits_are_enforced() -> None:
    data = os.urandom(300_000)
    cid = block_cid(0x55, data)
    stream = car.car_bytes([cid], [(cid, data)])
    assert read_all(stream)[1] == [(cid, data)]
    with pytest.raises(car.CarTooLarge, match="block") as info:
        read_all(stream, max_block=256 * 1024)
    assert info.value.got == len(data)
    with pytest.raises(car.CarTooLarge, match="section"):
        read_all(stream, max_section=256 * 1024)
    with pytest.raises(car.CarTooLarge, match="header"):
        read_all(stream, max_header=10)


def test_decoder_is_sans_io_and_split_agnostic(tmp_path: Path) -> None:
    root, store = snapshot_dag(tmp_path)
    data = car.car_bytes([root], unixfs.walk(store.get, root))
    whole = car.CarDecoder()
    expected = whole.feed(data)
    whole.close()

    dec = car.CarDecoder()
    got: list[tuple[CID, bytes]] = []
    got += dec.feed(data[:5])
    assert dec.roots is None and got == []  # header incomplete
    for i in range(5, len(data), 997):
        got += dec.feed(data[i : i + 997])
    dec.close()
    assert dec.roots == [root]
    assert got == expected
    assert dec.bytes_read == len(data) and dec.blocks_read == len(expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_decoder_gives_the_same_blocks_for_any_split(cuts: list[int]) -> None:
    blocks = [(block_cid(0x55, bytes([i]) * 50), bytes([i]) * 50) for i in range(30)]
    data = car.car_bytes([blocks[0][0]], blocks)
    points = sorted({min(c, len(data)) for c in cuts})
    dec = car.CarDecoder()
    got = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        got += dec.feed(data[start:end])
    dec.close()
    assert got == blocks
    assert dec.roots == [blocks[0][0]]


def test_good_blocks_before_a_bad_one_are_delivered_first() -> None:
    good = [(block_cid(0x55, bytes([i])), bytes([i])) for i in range(3)]
    bad_cid = block_cid(0x55, b"expected")
    data = car.car_bytes([good[0][0]], [*good, (bad_cid, b"tampered")])
    dec = car.CarDecoder()
    assert dec.feed(data) == good
    with pytest.raises(car.CarBlockMismatch):
        dec.close()
    with pytest.raises(car.CarBlockMismatch):  # the decoder stays failed
        dec.feed(b"")
    # read_car yields the good blocks, then raises
    roots, blocks = car.read_car(io.BytesIO(data))
    assert [next(blocks) for _ in range(3)] == good
    with pytest.raises(car.CarBlockMismatch):
        next(blocks)


def test_end_of_stream_errors() -> None:
    dec = car.CarDecoder()
    with pytest.raises(car.CarTruncated, match="before the header"):
        dec.close()
    data = car.car_bytes([], [(block_cid(0x55, b"abc"), b"abc")])
    dec = car.CarDecoder()
    dec.feed(data[:-1])
    with pytest.raises(car.CarTruncated, match="section 1"):
        dec.close()


def test_cidv0_blocks_are_read() -> None:
    node = b"\x0a\x02\x08\x01"  # an empty UnixFS directory, as Kubo's CIDv0 DAGs hold
    v0 = block_cid(0x70, node).set(version=0, base="base58btc")
    roots, blocks = read_all(car.car_bytes([v0], [(v0, node)]))
    assert roots == [v0] and blocks == [(v0, node)]


def _mutations() -> st.SearchStrategy[bytes]:
    seeds = [(FIXTURES / name).read_bytes() for name in FUZZ_SEEDS]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "flip" and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set" and data:
                data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x12, 0x20, 0x55]))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
            elif op == "delete":
                del data[pos : pos + draw(st.integers(1, 8))]
            elif op == "truncate":
                del data[pos:]
        return bytes(data)

    return mutate()


@settings(max_examples=50, deadline=None)
@given(data=_mutations(), step=st.integers(min_value=1, max_value=64))
def test_fuzzed_streams_only_raise_car_errors(data: bytes, step: int) -> None:
    dec = car.CarDecoder(max_section=4096, max_block=4096)
    try:
        for i in range(0, len(data), step):
            for cid, block in dec.feed(data[i : i + step]):
                verify_block(cid, block)  # whatever comes out is verified
        dec.close()
    except car.CarError:
        pass


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_car_errors(data: bytes) -> None:
    dec = car.CarDecoder()
    try:
        dec.feed(data)
        dec.close()
    except car.CarError:
        pass


def _ipfs_car() -> list[str] | None:
    exe = os.environ.get("IPFS_CAR_BIN") or shutil.which("ipfs-car")
    return [exe] if exe else None


@pytest.mark.skipif(
    _ipfs_car() is None, reason="ipfs-car not installed (or set IPFS_CAR_BIN)"
)
def test_ipfs_car_unpacks_our_car(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "tables").mkdir(parents=True)
    big = os.urandom(3 * unixfs.CHUNK_SIZE + 5)  # several raw leaves under one dag-pb node
    (src / "tables" / "models.parquet").write_bytes(big)
    (src / "manifest.json").write_bytes(b'{"seq": 1}')
    store = MemoryBlockstore()
    root = unixfs.add_path(src, store.put)
    car_path = tmp_path / "snap.car"
    with car_path.open("wb") as f:
        car.write_car(f, [root], unixfs.walk(store.get, root))
    cmd = _ipfs_car()
    assert cmd is not None
    roots = subprocess.run(
        [*cmd, "roots", str(car_path)], capture_output=True, text=True, check=True, timeout=60
    )
    assert roots.stdout.split() == [str(root)]
    out = tmp_path / "out"
    subprocess.run(
        [*cmd, "unpack", str(car_path), "--output", str(out)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert (out / "tables" / "models.parquet").read_bytes() == big
    assert (out / "manifest.json").read_bytes() == b'{"seq": 1}'
