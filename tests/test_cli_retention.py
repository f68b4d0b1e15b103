"""`benchsync pin`, `tag`, `log` marks, `restore NAME`, `gc` thinning and `status` disk, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PERF = ["perf", "--model", "bert", "--hardware", "cpu", "--throughput", "10"]


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCHSYNC_")}
    env["BENCHSYNC_HOME"] = str(home)
    done = subprocess.run([sys.executable, "-m", "benchsync.daemon.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_pins_tags_and_thinning_from_the_command_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cli(home, "init")
    # Seconds: every version older than 0.5 s but the newest (the head claims the one
    # interval) is thinned, unless pinned or tagged.
    (home / "config.toml").write_text("history_retention = 0.5\nhistory_interval = 1e9\n")
    cids = []
    for i in range(4):
        cli(home, "record", *PERF, "--batch-size", str(i + 1))
        cids.append(cli(home, "snapshot").stdout.strip())
    assert cli(home, "tag", "paper", cids[0]).stdout.strip() == cids[0]
    assert cli(home, "pin", "add", cids[1][:20]).stdout.strip() == cids[1]
    assert cids[1] in cli(home, "pin", "ls").stdout
    assert cli(home, "tag").stdout.split() == ["paper", cids[0]]
    bad = cli(home, "tag", "bafyfake", check=False)
    assert bad.returncode == 1 and "looks like a CID" in bad.stderr

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the versions age past the 0.5 s retention
        doc = json.loads(cli(home, "gc", "--json").stdout)
        if doc["thinned"] >= 1:
            break
    assert doc["thinned"] == 1 and doc["kept"] == 3 and doc["removed_blocks"] > 0
    log = {v["cid"]: v for v in json.loads(cli(home, "log", "--json").stdout)}
    assert log[cids[0]]["tags"] == ["paper"] and log[cids[1]]["pinned"]
    assert log[cids[2]]["thinned"] and not log[cids[3]]["thinned"]
    human = cli(home, "log").stdout
    assert "(tag: paper)" in human and "(pinned)" in human
    assert "thinned: tables deleted, not restorable" in human

    restored = cli(home, "restore", "paper", "--json")
    assert json.loads(restored.stdout)["tables_cid"] == log[cids[0]]["tables_cid"]
    refused = cli(home, "restore", cids[2], check=False)
    assert refused.returncode == 1 and "thinned by history retention" in refused.stderr

    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["disk"]["history_bytes"] > 0 and status["disk"]["database_bytes"] > 0
    assert "disk      database" in cli(home, "status").stdout

    cli(home, "pin", "rm", cids[1])
    cli(home, "tag", "-d", "paper")
    assert cli(home, "pin", "ls").stdout == "" and cli(home, "tag").stdout == ""
