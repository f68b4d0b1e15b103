"""Bitswap against a real Kubo (issue 12's measurements), each figure a same-run ratio.

1. serve: a Kubo `Download`s an N MiB benchsync snapshot (a node's own Parquet,
   `bitswap_serve = all`) from a benchsync node over Bitswap, next to a Kubo
   downloading the same files (the snapshot's bytes, added to another Kubo with its
   defaults) from that Kubo: ratio = benchsync MiB/s / Kubo->Kubo MiB/s.
2. get: `benchsync get CID --peer KUBO` of an N MiB file only a Kubo holds (Kubo's
   default CIDv0 DAG), next to another Kubo downloading it: the same ratio. The CLI's
   start-up (`benchsync --help`, also printed) is part of the figure, as it is of a
   user's wait; at 100 MiB it is a small part.

Each timing is the median of --repeat runs, Kubo->Kubo and benchsync runs alternating
(the shared machine's load drifts); every run uses a fresh downloader (nothing
cached). The CLI runs with its bytecode compiled once beforehand (into a temporary
PYTHONPYCACHEPREFIX), as an installed package has it, even where the environment
sets PYTHONDONTWRITEBYTECODE (which made every run compile ~40 modules, 0.25 s).
Kubo is v0.22 from the `kubo-python` wheel (tests/kubo.py: a child process per
node, loopback only).

    .venv/bin/python bench/bench_bitswap.py [--mib 8] [--repeat 3]   # quick
    .venv/bin/python bench/bench_bitswap.py --mib 100                # the issue's size
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.kubo: the Kubo harness the interop tests use

from bench_snapshot import ROWS_PER_MIB, fill  # noqa: E402  (same directory)
from multiformats import CID  # noqa: E402

from benchsync.daemon.demo import NodeProcess, free_port  # noqa: E402
from benchsync.storage import unixfs  # noqa: E402
from benchsync.storage.dataset import LocalDataset  # noqa: E402
from benchsync.storage.unixfs import GetBlock, UnixFSError  # noqa: E402
from tests.kubo import Kubo, KuboError, library_path  # noqa: E402

MIB = 1024 * 1024  # bytes
NETWORK = "bench-bitswap"
DOWNLOAD_TIMEOUT_BASE = 60.0  # seconds, plus DOWNLOAD_TIMEOUT_PER_MIB per MiB
DOWNLOAD_TIMEOUT_PER_MIB = 2.0  # seconds: 0.5 MiB/s would be a failure, not a figure
CLI_TIMEOUT = 60.0  # seconds for `benchsync --help`


def download_timeout(nbytes: int) -> float:
    return DOWNLOAD_TIMEOUT_BASE + DOWNLOAD_TIMEOUT_PER_MIB * nbytes / MIB


def extract(get: GetBlock, cid: CID, dest: Path) -> None:
    """Write the UnixFS DAG `cid` (file or directory) to `dest`, as `ipfs get` would."""
    try:
        entries = unixfs.list_directory(get, cid)
    except UnixFSError:  # not a directory: a file
        with open(dest, "wb") as f:
            for chunk in unixfs.cat(get, cid):
                f.write(chunk)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name, child, _tsize in entries:
        extract(get, child, dest / name)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else (
        root.stat().st_size
    )


def timed_download(work: Path, source_addr: str, cid: str, nbytes: int, label: str) -> float:
    """Seconds a fresh Kubo, connected to `source_addr`, takes to Download `cid`."""
    with Kubo(work / f"kubo-{label}") as kubo:
        kubo.connect(source_addr)
        dest = work / f"got-{label}"
        start = time.perf_counter()
        kubo.download(cid, dest, timeout=download_timeout(nbytes))
        seconds = time.perf_counter() - start
    got = tree_bytes(dest)
    if got != nbytes:
        raise SystemExit(f"{label}: Kubo wrote {got} bytes, expected {nbytes}")
    shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink()
    shutil.rmtree(work / f"kubo-{label}", ignore_errors=True)
    return seconds


def median_rate(nbytes: int, runs: list[float]) -> tuple[float, str]:
    med = statistics.median(runs)
    spread = ", ".join(f"{nbytes / MIB / s:.1f}" for s in runs)
    return nbytes / MIB / med, spread


def report(title: str, nbytes: int, baseline: list[float], ours: list[float],
           ours_label: str) -> None:  # fmt: skip
    base_rate, base_runs = median_rate(nbytes, baseline)
    print(f"{title}: {nbytes / MIB:.1f} MiB, median of {len(baseline)}")
    print(f"  Kubo -> Kubo            {base_rate:8.1f} MiB/s  (runs: {base_runs})")
    rate, runs = median_rate(nbytes, ours)
    print(f"  {ours_label:23s} {rate:8.1f} MiB/s  (runs: {runs})")
    print(f"  ratio {ours_label} / Kubo->Kubo = {rate / base_rate:.2f}")


# --- 1. Kubo fetching a benchsync snapshot -------------------------------------------------


def make_snapshot(node: NodeProcess, mib: int) -> tuple[str, int]:
    """Fill the node's own database with ~mib MiB of Parquet and snapshot it (offline)."""
    with LocalDataset(node.home, node.peer_id) as ds:
        fill(ds, 0, mib * ROWS_PER_MIB)
        version = ds.snapshot().version
    return version.cid, version.manifest.total_bytes


def bench_serve(work: Path, mib: int, repeat: int) -> None:
    node = NodeProcess(work / "node", free_port(), NETWORK,
                       extra_args=["--no-mdns", "--bitswap-serve", "all"])  # fmt: skip
    root, _ = make_snapshot(node, mib)
    files = work / "snapshot-files"
    with LocalDataset(node.home, node.peer_id, read_only=True) as ds:
        extract(ds.blocks.get, CID.decode(root), files)
    nbytes = tree_bytes(files)
    baseline: list[float] = []
    ours: list[float] = []
    node.start()
    try:
        node.wait_ready()
        with Kubo(work / "kubo-source") as source:
            kubo_root = source.add(files)
            for i in range(repeat):
                baseline.append(timed_download(work, source.addr, kubo_root, nbytes, f"base{i}"))
                ours.append(timed_download(work, node.addr, root, nbytes, f"ours{i}"))
    finally:
        node.stop()
    report("serve: Kubo fetches a benchsync snapshot", nbytes, baseline, ours, "benchsync -> Kubo")


# --- 2. benchsync get from a Kubo ------------------------------------------------------------


PYCACHE = Path(tempfile.gettempdir()) / "bench-bitswap-pycache"  # the CLI's bytecode


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BENCHSYNC_") and k != "PYTHONDONTWRITEBYTECODE"}  # fmt: skip
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)  # outside the source tree
    return subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def timed_get(work: Path, kubo: Kubo, cid: str, payload: bytes, label: str) -> float:
    home = work / f"home-{label}"
    out = work / f"get-{label}.bin"
    start = time.perf_counter()
    r = cli("get", cid, "-o", str(out), "--peer", kubo.addr, "--home", str(home),
            timeout=download_timeout(len(payload)))  # fmt: skip
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"benchsync get failed ({r.returncode}):\n{r.stderr}")
    if out.read_bytes() != payload:
        raise SystemExit("benchsync get wrote different bytes")
    out.unlink()
    shutil.rmtree(home, ignore_errors=True)
    return seconds


def bench_get(work: Path, mib: int, repeat: int) -> None:
    payload = os.urandom(mib * MIB)
    src = work / "payload.bin"
    src.write_bytes(payload)
    baseline: list[float] = []
    ours: list[float] = []
    with Kubo(work / "kubo-holder") as holder:
        cid = holder.add(src)
        # Compiles the CLI's bytecode (and warms the page cache) before anything is timed.
        timed_get(work, holder, cid, payload, "warm-up")
        for i in range(repeat):
            baseline.append(timed_download(work, holder.addr, cid, len(payload), f"getbase{i}"))
            ours.append(timed_get(work, holder, cid, payload, f"get{i}"))
    report("get: a file only a Kubo holds (CIDv0)", len(payload), baseline, ours,
           "Kubo -> benchsync get")  # fmt: skip
    start = time.perf_counter()
    cli("--help", timeout=CLI_TIMEOUT)
    print(f"  (of which CLI start-up, `benchsync --help`: {time.perf_counter() - start:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=8, help="MiB to move (default 8; issue: 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (median kept)")
    parser.add_argument("--only", choices=("serve", "get"), help="run one of the two")
    args = parser.parse_args()
    try:
        library_path()
    except KuboError as e:
        raise SystemExit(f"cannot run Kubo here: {e}") from None
    work = Path(tempfile.mkdtemp(prefix="bench-bitswap-"))
    try:
        if args.only in (None, "serve"):
            bench_serve(work, args.mib, args.repeat)
        if args.only in (None, "get"):
            bench_get(work, args.mib, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(PYCACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
