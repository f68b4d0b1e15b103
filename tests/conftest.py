"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory, also exported as $BENCHSYNC_HOME."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("BENCHSYNC_HOME", str(h))
    return h


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Full-count fuzzing (marker `fuzz`) runs only when `-m` asks for it (`make fuzz`)."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="full-count fuzzing runs with `-m fuzz` (make fuzz)")
    for item in items:
        if item.get_closest_marker("fuzz") is not None:
            item.add_marker(skip)
