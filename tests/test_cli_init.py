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


def test_init_makes_the_home_private_even_if_it_exists(tmp_path: Path) -> None:
    target = tmp_path / "node-b"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", "init", "--home", str(target)],
        capture_output=True, text=True, check=True,
    )
    assert target.stat().st_mode & 0o777 == 0o700
