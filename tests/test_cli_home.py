"""One way to find the node (issue 11, observations 6 and 7).

A mistyped --home is refused by every command that needs a data directory
(only `init` and `up` create one): no identity, no empty version. The CLI finds
a node on a non-default control socket from BENCHSYNC_CONTROL_SOCKET and never
opens the database that node owns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "benchsync.daemon.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [["snapshot"], ["log"], ["record", "perf", "--model", "m", "--hardware", "cpu"],
     ["export", "--car", "x.car"], ["query", "SELECT 1", "--scope", "local"]],
)
def test_a_mistyped_home_is_refused_and_nothing_is_created(
    tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "typo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    r = run(*command, env=env | {"BENCHSYNC_HOME": str(typo)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and lines[1].startswith("Try: "), lines
    if command[0] != "query":  # the query command words its own (no database there)
        assert "not a benchsync data directory" in lines[0] and "benchsync init" in lines[1]
    assert not typo.exists(), list(typo.rglob("*"))
