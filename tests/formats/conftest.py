"""Fixtures for the format tests; plain helpers live in _formats_helpers.py (a unique module name)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _formats_helpers import FIXTURES


@pytest.fixture
def golden() -> Path:
    return FIXTURES / "golden"
