"""Every script in examples/ runs, as a user would run it, on the local provider."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# What each example must print: a line that shows it computed the right thing.
EXPECTED = {
    "monte_carlo.py": r"pi ~ 3\.1[34]\d* from 4,000,000 points",
    "parameter_sweep.py": r"best of 12: damping=2\.0 stiffness=4\.0",
    "asyncio_run_in_executor.py": r"the event loop stayed responsive: [1-9]\d* heartbeats",
    "scipy_differential_evolution.py": r"minimum \S+ at \(1\.00\d, 1\.0\d\d\)",
}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.timeout(240)
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=tmp_path, capture_output=True, text=True, timeout=230, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(EXPECTED[name], proc.stdout), proc.stdout
