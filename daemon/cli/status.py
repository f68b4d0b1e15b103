"""`benchsync status [--json]` and `benchsync peers`: what the node knows right now."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchsync.daemon.cli.common import CLIError, add_node_arguments, call_node, node_client

WATCH_INTERVAL = 1.0  # seconds between status polls of `status --watch`


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="peer ID, addresses, network, head, peers and replica lag")
    add_node_arguments(p)
    p.add_argument("--config", metavar="FILE", help="config file (default: <home>/config.toml)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--watch", action="store_true",
        help="follow transfers live (a redrawn view on a terminal, a line per change otherwise)",
    )  # fmt: skip
    p.add_argument("--interval", type=float, default=WATCH_INTERVAL, help="seconds between updates")
    p.set_defaults(func=run_status)

    p = sub.add_parser("peers", help="connected peers and their heads")
    add_node_arguments(p)
    p.add_argument("--config", metavar="FILE", help="config file (default: <home>/config.toml)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_peers)


def _short(cid: str | None) -> str:
    return "-" if not cid else (cid if len(cid) <= 20 else f"{cid[:12]}…{cid[-6:]}")


def offline_status(args: argparse.Namespace) -> dict[str, Any]:
    """What can be told without a running node: identity, head, installed replicas."""
    from benchsync.daemon.cli.common import open_dataset

    with open_dataset(args) as ds:
        head = ds.head()
        return {
            "running": False,
            "peer_id": ds.dataset,
            "network": None,
            "addrs": [],
            "head": head.cid if head else None,
            "head_seq": head.seq if head else None,
            "rows": ds.db.table_counts(),
            "peers": [],
            "replicas": [
                {
                    "dataset": r.dataset,
                    "head_seen": None,
                    "head_installed": r.root,
                    "seq_installed": r.seq,
                    "lag": None,
                    "bytes": r.bytes,
                    "last_error": None,
                }
                for r in ds.replicas.all()
            ],  # fmt: skip
            "transfers": [],
            # Offline there is time to walk the blockstore: the accounting, measured now.
            "disk": ds.disk_usage().to_json(),
        }


def run_status(args: argparse.Namespace) -> int:
    if args.watch:
        return watch(args)
    client = node_client(args)
    if client is not None:
        doc = call_node(client, "GET", "/v1/status") | {"running": True}
    else:
        doc = offline_status(args)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(
        f"node      {'running' if doc['running'] else 'not running (showing the data directory)'}"
    )
    print(f"peer id   {doc['peer_id']}")
    if doc["running"]:
        print(f"network   {doc['network']}")
        for a in doc["addrs"]:
            print(f"address   {a}")
    print(f"head      {doc['head'] or '- (no snapshot yet)'}"
          + (f"  seq {doc['head_seq']}" if doc.get("head_seq") else ""))  # fmt: skip
    rows = doc.get("rows") or {}
    print(
        f"rows      {sum(rows.values())} ({rows.get('performance_results', 0)} performance results)"
    )
    for line in _snapshot_lines(doc.get("snapshots")):
        print(line)
    for line in _disk_lines(doc.get("disk")):
        print(line)
    if doc["running"]:
        print(f"peers     {len(doc['peers'])} connected")
        for line in _dial_lines(doc.get("dials")):
            print(line)
    if doc["replicas"]:
        print("replicas")
        for r in doc["replicas"]:
            lag = "?" if r.get("lag") is None else r["lag"]
            err = f"  error: {r['last_error']}" if r.get("last_error") else ""
            print(f"  {r['dataset']}  installed {_short(r.get('head_installed'))}"
                  f"  seen {_short(r.get('head_seen'))}  lag {lag}{err}")  # fmt: skip
    if doc.get("transfers"):
        print(f"transfers {', '.join(doc['transfers'])}")
    return 0


def _snapshot_lines(snapshots: dict[str, Any] | None) -> list[str]:
    """The "snapshots" lines of `status`: nothing while they run, else why they are
    paused (a full disk), since when, and what to do."""
    if not snapshots or snapshots.get("state") != "paused":
        return []
    reason = str(snapshots.get("reason", "")).replace("_", " ")
    since = snapshots.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    lines = [f"snapshots PAUSED ({reason}) since {when}: {snapshots.get('error')}"]
    if snapshots.get("free_bytes") is not None:
        lines.append(f"          {snapshots['free_bytes'] / 1e6:.1f} MB free at the last attempt")
    if snapshots.get("hint"):
        lines.append(f"          try: {snapshots['hint']}")
    return lines


MAX_DIAL_LINES = 5  # failing dials shown by `status`; --json has them all
MAX_DIAL_ERROR = 72  # characters of a dial's last error shown by `status`


def _dial_lines(dials: list[dict[str, Any]] | None) -> list[str]:
    """The "dials" lines of `status`: known peers we fail to reach (bootstrap or not),
    each with its last error and when the next attempt is; short, one line each."""
    failing = [d for d in dials or [] if d.get("last_error")]
    if not failing:
        return []
    lines = [f"dials     {len(failing)} failing (known peers not reachable)"]
    for d in failing[:MAX_DIAL_LINES]:
        kind = "bootstrap" if d.get("bootstrap") else "peer"
        error = " ".join(str(d["last_error"]).split())
        if len(error) > MAX_DIAL_ERROR:
            error = error[: MAX_DIAL_ERROR - 1] + "…"
        retry = d.get("next_retry_seconds")
        when = "?" if retry is None else f"{retry:.0f} s"
        lines.append(f"  {_short(d.get('peer_id'))} {kind}, {d.get('failures', '?')} failed, "
                     f"retry in {when}: {error}")  # fmt: skip
    if len(failing) > MAX_DIAL_LINES:
        lines.append(f"  … and {len(failing) - MAX_DIAL_LINES} more (`benchsync status --json`)")
    return lines


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _disk_lines(disk: dict[str, Any] | None) -> list[str]:
    """The "disk" lines of `status`: where the bytes are, the budget, and a warning
    when the node stays over it."""
    if not disk:
        return []
    parts = [f"database {_mb(disk.get('database_bytes'))}"]
    if "history_bytes" in disk:
        parts += [f"history {_mb(disk['history_bytes'])}", f"replicas {_mb(disk['replica_bytes'])}"]
        if disk.get("other_bytes"):
            parts.append(f"other {_mb(disk['other_bytes'])}")
    parts.append(f"free {_mb(disk.get('free_bytes'))}")
    lines = [f"disk      {', '.join(parts)}"]
    if disk.get("versions") is not None:
        lines.append(f"          {disk['versions']} versions, {disk['versions_kept']} restorable, "
                     f"{disk['versions_thinned']} thinned")  # fmt: skip
    if disk.get("budget"):
        used = _mb(disk.get("total_bytes"))
        lines.append(f"          budget {_mb(disk['budget'])}, using {used}")
    if disk.get("warning"):
        lines.append(f"WARNING   {disk['warning']}")
        if disk.get("hint"):
            lines.append(f"          try: {disk['hint']}")
    if disk.get("error"):
        lines.append(f"          maintenance failed: {disk['error']}")
    return lines


def _replica_lines(doc: dict[str, Any], rate: float) -> list[str]:
    lines = [f"peers {len(doc['peers'])}  head {_short(doc['head'])}  "
             f"received {doc['received_bytes'] / 1e6:.1f} MB ({rate / 1e6:.1f} MB/s)"]  # fmt: skip
    for r in doc["replicas"]:
        state = "syncing" if r["syncing"] else ("error" if r.get("last_error") else "idle")
        lines.append(f"  {r['dataset'][:20]}…  installed seq {r.get('seq_installed') or '-'}"
                     f" / seen {r.get('seq_seen') or '-'}  lag {r['lag']}  {state}")  # fmt: skip
    return lines


def watch(args: argparse.Namespace) -> int:
    """Follow a running node's transfers until interrupted."""
    client = node_client(args)
    if client is None:
        raise CLIError("no node is running on this data directory", "start one with `benchsync up`")
    tty = sys.stdout.isatty()
    last_bytes, last_time, drawn, previous = None, time.monotonic(), 0, None
    try:
        while True:
            doc = call_node(client, "GET", "/v1/status")
            now = time.monotonic()
            got = doc["received_bytes"]
            rate = 0.0 if last_bytes is None else (got - last_bytes) / max(now - last_time, 1e-9)
            last_bytes, last_time = got, now
            lines = _replica_lines(doc, rate)
            if tty:  # redraw the block in place
                print(f"\x1b[{drawn}F\x1b[J" if drawn else "", end="")
                print("\n".join(lines), flush=True)
                drawn = len(lines)
            elif lines[1:] != previous:  # a log-friendly line per change
                print("\n".join(lines), flush=True)
                previous = lines[1:]
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def run_peers(args: argparse.Namespace) -> int:
    client = node_client(args)
    if client is None:
        raise CLIError("no node is running on this data directory", "start one with `benchsync up`")
    peers = call_node(client, "GET", "/v1/peers")["peers"]
    if args.json:
        print(json.dumps(peers, indent=1))
        return 0
    if not peers:
        print("no peers connected")
    for p in peers:
        head = p.get("head") or {}
        seq = head.get("seq", "-") if isinstance(head, dict) else "-"
        root = head.get("root") if isinstance(head, dict) else None
        lab = p.get("membership", "-")  # member, stranger or pending (issue 20)
        print(f"{p['peer_id']}  {lab}  head {_short(root)} seq {seq}  "
              f"{' '.join(p.get('addrs', [])[:1])}")
    return 0
