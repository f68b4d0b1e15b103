"""Memory of one real node under a steady write + snapshot load: what grows, and why.

Issue 19's soak saw a node's RSS grow for minutes (177 -> 338 MiB in 7 min with
3 nodes, 192 -> 260 MiB in 150 s alone). RSS alone cannot tell a leak from an
allocator that keeps freed memory, so this driver starts one node whose process
also runs a sampler thread (`child` mode: `benchsync up` with the sampler
installed; the node itself is unchanged) and reports, every `--sample` seconds:

- RSS (anonymous part), threads, open FDs, the RSS of the node's query workers;
- glibc malloc's own view (`mallinfo2`): bytes in use vs bytes free but kept
  in its arenas, and the number of arenas;
- Arrow: the default pool's backend, its bytes allocated, `total_allocated_bytes`;
- DuckDB: `duckdb_memory()` of the node's database;
- Python: objects tracked by the GC, and with `--tracemalloc` the traced heap and,
  at the end, the allocation sites that grew most since the first sample after
  `--warmup` seconds, and the object types whose counts grew.

`--trim` (or `BENCH_MEMORY_TRIM=1` in one node's environment) calls
`malloc_trim(0)` at each sample and reports RSS after it ("trimmed"): what falls
back was memory glibc kept after it was freed, not a leak. `--env K=V` starts
the node with an environment variable; `--compare NAME:K=V[,K=V]` starts
another node NAME beside it, with that environment, under the same writes, and
the end reports each node's RSS at 1, 3 and 7 minutes as a ratio to the first
node's (same run, same machine load). `benchsync` sets its own allocators
(daemon/cli/up.py); a value in the environment wins, so the state before that
fix is `--compare before:ARROW_DEFAULT_MEMORY_POOL=mimalloc,MALLOC_ARENA_MAX=16`
(Arrow's default pool; glibc's default of 8 arenas per core, on 2 cores).

    .venv/bin/python bench/bench_memory.py --minutes 3
    .venv/bin/python bench/bench_memory.py --minutes 7.5 \
        --compare before:ARROW_DEFAULT_MEMORY_POOL=mimalloc,MALLOC_ARENA_MAX=16
    .venv/bin/python bench/bench_memory.py --minutes 3 --tracemalloc 10 --warmup 60
    .venv/bin/python bench/bench_memory.py --minutes 3 --trim

Findings (issue 19; 2 cores shared with other work): Python objects, Arrow's
allocated bytes and glibc's bytes in use (DuckDB's, growing with the data) did
not explain the growth. Arrow's mimalloc pool kept freed memory (malloc_trim
does not reach it); on the system pool, glibc's 16 arenas kept free chunks.
Same run, RSS MiB at 1, 3, 7 min: the node 203, 212, 221; system pool on 16
arenas 198, 220, 242; both defaults 225, 271, 327 (1.48x at 7 min).

Not part of the test run.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import gc
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 2**20


# --- inside the node's process -----------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _malloc_arenas(libc: Any) -> int:
    """Number of glibc arenas, from malloc_info's XML (on a temp file: it wants a FILE*)."""
    with tempfile.TemporaryFile() as f:
        libc.fdopen.restype = ctypes.c_void_p  # a FILE*: the default int would truncate it
        fp = libc.fdopen(os.dup(f.fileno()), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        f.seek(0)
        return f.read().count(b"<heap nr=")


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmSize"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children_rss() -> int:
    total = 0
    for task in os.listdir("/proc/self/task"):
        for pid in Path(f"/proc/self/task/{task}/children").read_text().split():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except FileNotFoundError:
                pass
    return total


class Sampler:
    """Samples the process it runs in; one JSON line per sample to `path`."""

    def __init__(self, path: Path, every: float, trim: bool, traced: bool, warmup: float) -> None:
        self.path = path
        self.every = every
        self.trim = trim
        self.traced = traced
        self.warmup = warmup
        self.node: Any = None  # the Node, once built
        self.libc = _libc()
        self.libc.mallinfo2.restype = _Mallinfo2
        self.start = time.monotonic()
        self.base: tracemalloc.Snapshot | None = None
        self.base_types: collections.Counter[str] | None = None
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.duckdb_tags: dict[str, int] = {}
        self.referrers = os.environ.get("BENCH_MEMORY_REFERRERS", "")

    def run(self) -> None:
        with open(self.path, "a") as out:
            while not self.stop.wait(self.every):
                out.write(json.dumps(self.sample()) + "\n")
                out.flush()

    def sample(self) -> dict[str, Any]:
        import pyarrow as pa

        t = time.monotonic() - self.start
        gc.collect()
        info = self.libc.mallinfo2()
        doc: dict[str, Any] = {"t": t, **_proc_status()}
        if self.trim:  # what glibc gives back when asked: memory it kept, not a leak
            self.libc.malloc_trim(0)
            doc["trimmed"] = _proc_status()["VmRSS"]
        doc |= {
            "threads": len(os.listdir("/proc/self/task")),
            "fds": len(os.listdir("/proc/self/fd")),
            "children_rss": _children_rss(),
            "malloc_in_use": info.uordblks + info.hblkhd,
            "malloc_free": info.fordblks,
            "malloc_arenas": _malloc_arenas(self.libc),
            "arrow_backend": pa.default_memory_pool().backend_name,
            "arrow_pool": pa.default_memory_pool().bytes_allocated(),
            "arrow_total": pa.total_allocated_bytes(),
            "duckdb": self._duckdb(),
            "duckdb_tags": self.duckdb_tags,
            "gc_objects": len(gc.get_objects()),
        }
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        if self.traced:
            doc["traced"] = tracemalloc.get_traced_memory()[0]
        if t >= self.warmup and self.base_types is None:
            self.base_types = types
            if self.traced:
                self.base = tracemalloc.take_snapshot()
        elif self.base_types is not None:
            grown = (types - self.base_types).most_common(12)
            doc["types_grown"] = grown
            if self.base is not None:
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])
                stats = snap.compare_to(self.base, "traceback")[:8]
                doc["sites_grown"] = [
                    {"bytes": s.size_diff, "count": s.count_diff,
                     "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                               for f in s.traceback][-6:]}
                    for s in stats
                ]  # fmt: skip
        if self.errors:
            doc["errors"], self.errors = self.errors, []
        if self.referrers:
            doc["referrers"] = _referrer_chain(self.referrers)
        return doc

    def _duckdb(self) -> int | None:
        node = self.node
        if node is None:
            return None
        try:
            with node.dataset.db.reader() as cur:
                rows = cur.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory() "
                                   "WHERE memory_usage_bytes > 0").fetchall()  # fmt: skip
            self.duckdb_tags = {str(tag): int(n) for tag, n in rows}
            return sum(self.duckdb_tags.values())
        except Exception as e:  # closed, or swapped by a restore: not this bench's concern
            self.errors.append(repr(e))
            return None


def _referrer_chain(type_name: str, depth: int = 8) -> list[str]:
    """What holds the newest object of type `type_name`: one referrer per level."""
    objs = [o for o in gc.get_objects() if type(o).__qualname__ == type_name]
    if not objs:
        return []
    chain, obj, seen = [], objs[-1], {id(objs)}
    for _ in range(depth):
        refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and r is not objs]
        seen.add(id(obj))
        if not refs:
            break
        obj = refs[0]
        text = repr(obj)
        chain.append(f"{type(obj).__qualname__}: {text[:160]}")
    return chain


def child(argv: list[str]) -> int:
    """Run `benchsync up` (argv after `--`) with a sampler thread in this process."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--sample", type=float, default=30.0)
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--tracemalloc", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=60.0)
    split = argv.index("--")
    args = ap.parse_args(argv[:split])
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    trim = args.trim or os.environ.get("BENCH_MEMORY_TRIM") == "1"  # one node of a --compare
    sampler = Sampler(args.samples, args.sample, trim, bool(args.tracemalloc), args.warmup)
    from benchsync.daemon.cli.up import set_allocators

    set_allocators()  # as `benchsync up` does, before the imports below allocate Arrow memory
    import benchsync.daemon.node as node_mod

    init = node_mod.Node.__init__

    def capture(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        sampler.node = self
        # BENCH_DUCKDB_SET="name=value;...": DuckDB settings to try (the allocator's are global)
        for setting in filter(None, os.environ.get("BENCH_DUCKDB_SET", "").split(";")):
            name, _, value = setting.partition("=")
            with self.dataset.db.reader() as cur:
                cur.execute(f"SET {name} = '{value}'")  # sql: a bench's own literal settings

    setattr(node_mod.Node, "__init__", capture)  # noqa: B010 - mypy refuses the assignment
    threading.Thread(target=sampler.run, name="bench-sampler", daemon=True).start()
    from benchsync.daemon.cli import main as cli_main

    return cli_main(argv[split + 1 :])


# --- the driver --------------------------------------------------------------------------------


COLUMNS = [
    ("t", "t(s)", 1, "{:6.0f}"), ("VmRSS", "RSS", MiB, "{:5.0f}"),
    ("RssAnon", "anon", MiB, "{:5.0f}"),
    ("malloc_in_use", "m.use", MiB, "{:6.1f}"), ("malloc_free", "m.free", MiB, "{:6.1f}"),
    ("malloc_arenas", "arenas", 1, "{:6d}"), ("arrow_total", "arrow", MiB, "{:6.2f}"),
    ("trimmed", "trimmed", MiB, "{:7.0f}"), ("duckdb", "duckdb", MiB, "{:6.1f}"),
    ("gc_objects", "objects", 1, "{:8d}"),
    ("traced", "py.heap", MiB, "{:7.1f}"), ("threads", "thr", 1, "{:4d}"),
    ("fds", "fds", 1, "{:4d}"), ("children_rss", "workers", MiB, "{:7.0f}"),
]  # fmt: skip


def row(doc: dict[str, Any]) -> str:
    cells = []
    for key, title, scale, fmt in COLUMNS:
        value = doc.get(key)
        width = len(fmt.format(0))
        if value is None:
            cells.append("-".rjust(max(width, len(title))))
        else:
            cells.append(fmt.format(value / scale if scale != 1 else value).rjust(len(title)))
    return " ".join(cells)


@dataclass
class Run:
    """One node of the bench: its name, extra environment, process and samples."""

    name: str
    env: dict[str, str]
    home: Path
    proc: subprocess.Popen[str] | None = None
    docs: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0

    @property
    def samples(self) -> Path:
        return self.home / "samples.jsonl"

    def start(self, args: argparse.Namespace) -> None:
        from benchsync.daemon.demo import free_port

        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
        env.update(self.env)
        cmd = [sys.executable, __file__, "child", "--samples", str(self.samples),
               "--sample", str(args.sample), "--tracemalloc", str(args.tracemalloc),
               "--warmup", str(args.warmup), *(["--trim"] if args.trim else []), "--",
               "up", "--home", str(self.home), "--network", "bench-memory",
               "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}",
               "--control-socket", str(self.home / "control.sock"),
               "--history-retention", str(args.retention),
               "--history-interval", str(args.interval),
               "--maintenance-interval", str(args.maintenance)]  # fmt: skip
        with open(self.home / "node.log", "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)  # fmt: skip

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("ready "):
                    return
                if not line:
                    break
        raise RuntimeError(f"{self.name} not ready:\n"
                           f"{(self.home / 'node.log').read_text()[-3000:]}")  # fmt: skip

    def client(self) -> Any:
        from benchsync.daemon.control import ControlClient

        return ControlClient(socket_path=self.home / "control.sock", timeout=60.0)

    def new_samples(self) -> list[dict[str, Any]]:
        if not self.samples.exists():
            return []
        lines = self.samples.read_text().splitlines()
        new = [json.loads(line) for line in lines[len(self.docs):]]
        self.docs.extend(new)
        return new

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def parse_env(items: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in items)


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=150, help="rows per write")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between writes")
    ap.add_argument("--query-every", type=float, default=0.0,
                    help="seconds between local queries (0: none)")  # fmt: skip
    ap.add_argument("--retention", type=float, default=60.0, help="history_retention, seconds")
    ap.add_argument("--interval", type=float, default=20.0, help="history_interval, seconds")
    ap.add_argument("--maintenance", type=float, default=15.0, help="maintenance_interval, s")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--trim", action="store_true",
                    help="malloc_trim(0) at each sample (RSS after it: 'trimmed')")  # fmt: skip
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds before the baseline of the growth reports")  # fmt: skip
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="environment of the first node, named node")  # fmt: skip
    ap.add_argument("--compare", action="append", default=[], metavar="NAME:K=V[,K=V]",
                    help="also run a node NAME with this environment, under the same load\n"
                         f"(e.g. {BEFORE}:\nArrow's and glibc's defaults, as before the fix, "
                         "on 2 cores)")  # fmt: skip
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    runs = [Run("node", parse_env(args.env), base / "node")]
    for spec in args.compare:
        name, _, env = spec.partition(":")
        runs.append(Run(name, parse_env(env.split(",") if env else []), base / name))
    for run in runs:
        run.home.mkdir()
        run.start(args)
    try:
        for run in runs:
            run.wait_ready()
        print(f"{len(runs)} node(s) in {base}; {args.rows} rows every {args.every:g} s each; "
              f"retention {args.retention:g} s; " +
              "; ".join(f"{r.name}: env {r.env or '-'}" for r in runs), flush=True)  # fmt: skip
        print(f"{'node':>8} " + " ".join(title.rjust(len(fmt.format(0)) if key != "t" else 6)
                                        for key, title, _, fmt in COLUMNS))  # fmt: skip
        drive(runs, args)
    finally:
        for run in runs:
            run.stop()
    report(runs)
    return 0


BEFORE = "before:ARROW_DEFAULT_MEMORY_POOL=mimalloc,MALLOC_ARENA_MAX=16"  # 16: 8 x 2 cores


def drive(runs: list[Run], args: argparse.Namespace) -> None:
    """The same writes to every node (one random stream each, one seed) until the end."""
    # The soak's writes (imported here: the node's own process loads this module too).
    from bench_soak import records

    rngs = [random.Random(7) for _ in runs]
    clients = [run.client() for run in runs]
    start = time.monotonic()
    end = start + args.minutes * 60
    next_write = next_query = start
    while (now := time.monotonic()) < end + args.sample / 2:
        if now < end and now >= next_write:
            for run, client, rng in zip(runs, clients, rngs, strict=True):
                client.post("/v1/record/perf", {"records": records(rng, run.written, args.rows)})
                run.written += args.rows
            next_write += args.every
        if args.query_every and now < end and now >= next_query:
            for client in clients:
                client.post("/v1/query", {"sql": "SELECT count(*) FROM performance_results"})
            next_query += args.query_every
        for run in runs:
            for doc in run.new_samples():
                print(f"{run.name:>8} {row(doc)}", flush=True)
        time.sleep(0.05)


def report(runs: list[Run]) -> None:
    """Growth reports of the last sample; RSS at 1, 3, 7 minutes and the ratio to the
    first node's."""
    for run in runs:
        if not run.docs:
            continue
        last = run.docs[-1]
        for name, grown in (("object types grown since warm-up", last.get("types_grown")),
                            ("allocation sites grown", last.get("sites_grown"))):  # fmt: skip
            if grown:
                print(f"{run.name}: {name}:")
                for item in grown:
                    print("   ", item)
    marks = [60.0, 180.0, 420.0]

    def rss_at(run: Run, t: float) -> float | None:
        near = [d for d in run.docs if abs(d["t"] - t) <= 20]
        return min(near, key=lambda d: abs(d["t"] - t))["VmRSS"] / MiB if near else None

    print("RSS MiB at " + ", ".join(f"{m / 60:g} min" for m in marks) + " (ratio to "
          f"{runs[0].name})")  # fmt: skip
    for run in runs:
        cells = []
        for m in marks:
            mine, base = rss_at(run, m), rss_at(runs[0], m)
            if mine is None:
                cells.append("-")
            else:
                ratio = f" ({mine / base:.2f}x)" if base and run is not runs[0] else ""
                cells.append(f"{mine:.0f}{ratio}")
        print(f"{run.name:>8}: " + ", ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
