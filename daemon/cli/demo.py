"""`benchsync demo [--nodes N] [--serve]`: the local lab on loopback, start to finish
(with --serve, left running with node 0's dashboard until Ctrl-C)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchsync.daemon.cli.common import CLIError

MAX_NODES = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run N real nodes on 127.0.0.1, sync them, query across them")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3, at most 10)")
    p.add_argument(
        "--results", type=int, default=200, help="results recorded per node (default 200)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    p.add_argument("--serve", action="store_true",
                   help="keep the lab running and serve node 0's dashboard on 127.0.0.1 (its "
                        "URL is printed) until Ctrl-C")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchsync.daemon.demo import run_demo

    if not 1 <= args.nodes <= MAX_NODES:
        raise CLIError(f"--nodes {args.nodes} is out of range", f"use 1 to {MAX_NODES}")
    base = Path(tempfile.mkdtemp(prefix="benchsync-demo-"))
    try:
        return run_demo(args.nodes, base, per_node=args.results, serve=args.serve)
    finally:
        if args.keep:
            print(f"data directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
