"""Fixtures shared by test modules."""

import pytest

from elbox import data
from elbox.data import sources


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Dataset lookup isolated from the machine: no $ELBOX_DATA, a private user cache, no system dirs, a fresh
    array cache."""
    monkeypatch.delenv("ELBOX_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [])
    data.clear_cache()
    yield
    data.clear_cache()
