"""README's first command runs the demo on the local default: keep it working."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_readme_demo_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "cloudexec.demo"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "single job:" in out and "Succeeded exit 0" in out
    assert "map of 100: mean 3.1" in out
    assert "array job: 20 results; child exit codes {0}" in out
    assert "simulate(0) done" in out
