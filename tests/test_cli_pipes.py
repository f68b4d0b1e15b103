"""No tracebacks (issue 11, observation 9): a closed pipe and a missing directory.

`benchsync ... | head` must end quietly when `head` stops reading, and
`export --car` into a directory that does not exist says Error:/Try:.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "benchsync.daemon.cli"]


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    # `head -1` reads one line and exits; the rest of the long output hits a closed pipe.
    r = subprocess.run(" ".join([*CLI, "config", "docs"]) + " | head -1", shell=True,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.stdout.count("\n") == 1, r.stdout
    assert r.stderr == "", r.stderr


def test_stdout_closed_before_the_first_write(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    p = subprocess.Popen([*CLI, "cid", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_export_into_a_missing_directory_is_an_error_not_a_traceback(home: Path) -> None:
    subprocess.run([*CLI, "init"], check=True, capture_output=True, timeout=120)
    missing = home.parent / "missing" / "dir" / "x.car"
    r = subprocess.run([*CLI, "export", "--car", str(missing)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and str(missing.parent) in lines[0], lines
    assert lines[1].startswith("Try: "), lines
