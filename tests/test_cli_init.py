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


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchsync.daemon.cli", *args],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )  # fmt: skip


def test_init_creates_a_private_lab_key_and_lab_key_new_shares_one(tmp_path: Path) -> None:
    """Issue 20: a fresh home is a closed lab of one; `init --lab-key` joins a lab."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _init("init", "--home", str(a)).returncode == 0
    own = a / "lab.key"
    assert own.stat().st_mode & 0o777 == 0o600
    key = tmp_path / "lab.key"
    made = _init("lab-key", "new", str(key))
    assert made.returncode == 0 and key.stat().st_mode & 0o777 == 0o600
    again = _init("lab-key", "new", str(key))  # never overwritten
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert _init("init", "--home", str(b), "--lab-key", str(key)).returncode == 0
    assert _init("init", "--home", str(c), "--lab-key", str(key)).returncode == 0
    assert (b / "lab.key").read_text() == (c / "lab.key").read_text() == key.read_text()
    assert own.read_text() != key.read_text()
    # A home that already holds another key is not silently moved to another lab.
    refused = _init("init", "--home", str(a), "--lab-key", str(key))
    assert refused.returncode != 0 and "another lab key" in refused.stderr
