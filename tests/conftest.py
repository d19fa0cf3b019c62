"""Shared fixtures. Every emulator listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import sys

import pytest

# Job functions live in tests/jobs.py; make it importable for the client side
# only (the runner processes never see this folder).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def io_root(tmp_path: "os.PathLike[str]") -> str:
    return str(tmp_path / "io")
