import subprocess
import sys
from pathlib import Path


def test_init_creates_home_from_env(tmp_path: Path) -> None:
    target = tmp_path / "node-a"
    env = {"BENCHSYNC_HOME": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", "init"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert target.is_dir()
    assert out.stdout.strip() == str(target)
