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
