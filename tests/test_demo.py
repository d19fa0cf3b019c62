"""README's first command runs the demo on the local default: keep it working."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest


@pytest.mark.timeout(180)
def test_readme_demo_runs_and_its_job_id_attaches(tmp_path: "os.PathLike[str]") -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "cloudexec.demo"], capture_output=True, text=True, timeout=110, env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "single job:" in out and "Succeeded exit 0" in out
    assert "map of 100: mean 3.1" in out
    assert "array job: 20 results; child exit codes {0}" in out
    assert "simulate(0) done" in out
    assert os.path.isdir(os.path.join(tmp_path, "cloudexec", "demo"))
    # The printed command attaches the job from a new process after the demo exited.
    command = re.search(r"^  (python -c .*)$", out, re.M)
    assert command, out
    argv = shlex.split(command.group(1))
    argv[0] = sys.executable
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0, again.stderr
    single = re.search(r"single job: (\S+)", out)
    assert single, out
    assert round(float(again.stdout), 3) == float(single.group(1))
    # So does the printed `cloudexec ... status` command (run through the module the console script calls).
    status = re.search(r"^  (cloudexec .* status .*)$", out, re.M)
    assert status, out
    argv = [sys.executable, "-m", "cloudexec.cli", *shlex.split(status.group(1))[1:]]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"job_status:\s+Succeeded", shown.stdout), shown.stdout
