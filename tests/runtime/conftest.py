"""Fixtures of the runtime's cache tests (test_cache.py, test_cache_tiers.py)."""

from __future__ import annotations

import pytest

from helpers import count_reads


@pytest.fixture
def reads(monkeypatch):
    """Names of the experts whose weights were read (each read of a weights file)."""
    return count_reads(monkeypatch)
