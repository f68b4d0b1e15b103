"""The local lab demo: N real nodes as separate processes on loopback.

`run_demo` starts `benchsync up` processes with temporary data directories,
records a realistic set of results on each (different hardware per node),
snapshots, waits until every node holds every other node's replica, runs a
cross-node aggregate query and prints it, shows each node's head, then stops
every node with SIGTERM. With `serve`, node 0 also serves the dashboard on
127.0.0.1 and the lab keeps running (its URL printed) until Ctrl-C.

`NodeProcess` is also what the end-to-end tests use to drive real nodes.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from benchsync.daemon.control import ControlClient
from benchsync.daemon.identity import load_or_create_identity, peer_id_of
from benchsync.daemon.lab import LAB_KEY_FILENAME, write_new_key

READY_TIMEOUT = 30.0  # seconds for a node process to print its ready line
CONVERGE_TIMEOUT = 60.0  # seconds for every node to install every replica
STOP_TIMEOUT = 15.0  # seconds for a node to exit after SIGTERM
POLL_INTERVAL = 0.1  # seconds between status polls

HARDWARE = [
    ("cuda", "NVIDIA A100-SXM4-80GB"),
    ("rocm", "AMD Instinct MI250X"),
    ("cpu", "Intel Xeon Platinum 8380"),
    ("mps", "Apple M2 Max"),
    ("openvino", "Intel Arc A770"),
    ("webgpu", "Chrome 131 / RTX 4090"),
]
MODELS = [
    ("bert-base-uncased", "bert", 1.0),
    ("t5-small", "t5", 0.8),
    ("vit-base-patch16-224", "vit", 1.4),
    ("whisper-tiny", "whisper", 0.6),
    ("llama-3.2-1b", "llama", 3.5),
]
DEMO_QUERY = """
SELECT h.hardware_type, m.model_name,
       count(*) AS runs,
       round(avg(p.throughput_items_per_second)::DOUBLE, 1) AS mean_throughput,
       round(median(p.average_latency_ms)::DOUBLE, 2) AS p50_latency_ms
FROM performance_results p
JOIN models m ON p.model_id = m.model_id
JOIN hardware_platforms h ON p.hardware_id = h.hardware_id
GROUP BY h.hardware_type, m.model_name
ORDER BY h.hardware_type, m.model_name
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """A `benchsync up` child process on its own data directory."""

    home: Path
    port: int
    network: str
    bootstrap: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    lab_key: Path | None = None  # the lab's key file (`--lab-key`); None: the home's own
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # The identity is made up front so peers can bootstrap to each other in parallel.
        self.peer_id = peer_id_of(load_or_create_identity(self.home))

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.peer_id}"

    @property
    def socket_path(self) -> Path:
        return self.home / "control.sock"

    @property
    def client(self) -> ControlClient:
        return ControlClient(socket_path=self.socket_path, timeout=60.0)

    def start(self) -> None:
        args = [
            sys.executable, "-m", "benchsync.daemon.cli", "up",
            "--home", str(self.home),
            "--network", self.network,
            "--listen", f"/ip4/127.0.0.1/tcp/{self.port}",
            "--control-socket", str(self.socket_path),
            *[a for b in self.bootstrap for a in ("--bootstrap", b)],
            *(["--lab-key", str(self.lab_key)] if self.lab_key is not None else []),
            *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
        env.update(self.env)
        self.log_path = self.home / "node.log"
        log: TextIO = open(self.log_path, "a")  # noqa: SIM115 - owned by the child's lifetime
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env
        )
        log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        # readline() alone would block past the deadline on a node that hangs
        # silently; wait for the pipe to become readable first.
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if not readable:
                break
            line = self.proc.stdout.readline()
            if line.startswith("ready "):
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.home.name} exited with code "
                                   f"{self.proc.returncode}:\n{self.tail_log()}")  # fmt: skip
        raise RuntimeError(
            f"node {self.home.name} not ready after {timeout:g} s:\n{self.tail_log()}"
        )

    def tail_log(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def status(self) -> dict[str, Any]:
        return dict(self.client.get("/v1/status"))


def lab_key_file(base: Path) -> Path:
    """`<base>/lab.key`, created (mode 0600) if missing: one key for a demo's nodes."""
    base.mkdir(parents=True, exist_ok=True)
    path = base / LAB_KEY_FILENAME
    if not path.exists():
        write_new_key(path)
    return path


def start_lab(
    base: Path, n: int, network: str, extra_args: Iterable[str] = (),
    first_args: Iterable[str] = (),
) -> list[NodeProcess]:
    """Start n nodes in parallel, each bootstrapping to every other, all holding one lab
    key (`<base>/lab.key`, created if missing); wait until all are ready. Node 0 also
    gets `first_args`."""
    key = lab_key_file(base)
    nodes = [NodeProcess(base / f"node{i}", free_port(), network,
                         extra_args=[*extra_args, *(first_args if i == 0 else ())], lab_key=key)
             for i in range(n)]  # fmt: skip
    for node in nodes:
        node.bootstrap = [o.addr for o in nodes if o is not node]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
    except BaseException:
        for node in nodes:
            node.stop(signal.SIGKILL)
        raise
    return nodes


def sample_results(node_index: int, count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Realistic performance results for one lab machine (its own hardware)."""
    rng = random.Random(seed * 1000 + node_index)
    hw, device = HARDWARE[node_index % len(HARDWARE)]
    speed = {"cuda": 9.0, "rocm": 7.0, "cpu": 1.0, "mps": 3.0, "openvino": 2.0, "webgpu": 2.5}[hw]
    start = datetime(2026, 11, 1) + timedelta(hours=node_index)
    out = []
    for i in range(count):
        model, family, cost = MODELS[i % len(MODELS)]
        batch = [1, 4, 8, 16][(i // len(MODELS)) % 4]
        latency = cost * 10.0 / speed * (1 + 0.1 * batch) * rng.uniform(0.9, 1.15)
        out.append({
            "model_name": model, "model_family": family, "hardware_type": hw, "device_name": device,
            "batch_size": batch, "precision": "fp16" if hw in ("cuda", "rocm") else "fp32",
            "test_case": "inference", "throughput": round(batch * 1000.0 / latency, 3),
            "latency_avg": round(latency, 3), "latency_p90": round(latency * 1.2, 3),
            "latency_p95": round(latency * 1.3, 3), "latency_p99": round(latency * 1.6, 3),
            "memory_peak": round(cost * 900 * (1 + batch / 16), 1), "iterations": 100,
            "warmup_iterations": 10, "created_at": (start + timedelta(minutes=i)).isoformat(),
        })  # fmt: skip
    return out


def wait_converged(nodes: list[NodeProcess], timeout: float = CONVERGE_TIMEOUT) -> dict[str, str]:
    """Wait until every node has installed every other node's head; returns peer -> head."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {n.peer_id: n.status() for n in nodes}
        heads = {p: s["head"] for p, s in statuses.items()}
        done = all(
            {r["dataset"]: r["head_installed"] for r in s["replicas"]}.get(other) == heads[other]
            for p, s in statuses.items()
            for other in heads
            if other != p and heads[other]
        )
        if done:
            return heads
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes did not converge within {timeout:g} s: {statuses}")
        time.sleep(POLL_INTERVAL)


def render_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]  # fmt: skip
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def serve_until_interrupted(node: NodeProcess, url: str, say: Callable[[str], None]) -> None:
    """Say the dashboard's URL and wait for Ctrl-C (SIGINT), or for `node` to exit."""
    assert node.proc is not None
    say(f"\ndashboard of node0: {url}\nthe lab keeps running; Ctrl-C stops it")
    sys.stdout.flush()  # a pipe (`| tee`) gets the URL now, not when the lab stops
    try:
        code = node.proc.wait()
        say(f"node0 exited (code {code}); stopping the lab")
    except KeyboardInterrupt:
        say("\nstopping the lab…")


def run_demo(n: int, base: Path, say: Callable[[str], None] = print, per_node: int = 200,
             *, serve: bool = False) -> int:  # fmt: skip
    started = time.monotonic()
    network = f"demo-{os.getpid()}"
    say(f"starting {n} nodes on 127.0.0.1 (network {network!r}, data in {base})")
    web_port = free_port() if serve else None
    web_args = ["--web-listen", f"127.0.0.1:{web_port}"] if serve else []
    nodes = start_lab(base, n, network, extra_args=["--snapshot-interval", "0"],
                      first_args=web_args)  # fmt: skip
    try:
        for i, node in enumerate(nodes):
            hw = HARDWARE[i % len(HARDWARE)][0]
            stored = node.client.post("/v1/record/perf", {"records": sample_results(i, per_node)})
            version = node.client.post("/v1/snapshot", {})
            say(f"  node{i} {node.peer_id[:16]}…  {hw:<8} recorded {stored['stored']} results,"
                f" snapshot seq {version['seq']}")  # fmt: skip
        say("waiting until every node holds every other node's snapshot…")
        heads = wait_converged(nodes)
        say(f"converged in {time.monotonic() - started:.1f} s since start\n")
        answer = nodes[0].client.post("/v1/query", {"sql": DEMO_QUERY, "scope": "network"})
        say(f"cross-node query from node0 (strategy: {answer.get('strategy')}):")
        say(render_table(answer["columns"], answer["rows"]))
        say("")
        for p in answer.get("peers", []):
            say(f"  peer {p['peer_id'][:16]}…  {p['status']}  rows={p.get('rows')}")
        say("\nheads:")
        for i, node in enumerate(nodes):
            say(f"  node{i}  {heads[node.peer_id]}")
        if serve:
            serve_until_interrupted(nodes[0], f"http://127.0.0.1:{web_port}/", say)
    finally:
        codes = [node.stop() for node in nodes]
    if any(codes):
        say(f"\nsome nodes exited uncleanly (exit codes {codes}); logs are in {base}")
        return 1
    say(f"\nall nodes stopped cleanly; demo took {time.monotonic() - started:.1f} s")
    return 0
