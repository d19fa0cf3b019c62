"""A process running an emulator is SIGKILLed: its job processes and its temporary
folder must not outlive it (real subprocesses, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from contract import wait_until

pytestmark = pytest.mark.realistic

_AWS_OWNER = """
import sys, time
from cloudexec.testing import aws_batch_emulator
pid_file = sys.argv[1]
with aws_batch_emulator(timeout_scale=0.02) as emu:
    emu.client("batch").submit_job(
        jobName="long", jobQueue=emu.job_queue, jobDefinition=emu.job_definition,
        containerOverrides={"command": ["python", "-c", LONG_JOB, pid_file]},
    )
    print("submitted", flush=True)
    time.sleep(600)
"""

_AZURE_OWNER = """
import sys, time
from azure.batch import models
from cloudexec.testing import azure_batch_emulator
pid_file = sys.argv[1]
with azure_batch_emulator(slots=1) as emu:
    client = emu.batch_client()
    client.create_job(models.BatchJobCreateOptions(id="j", pool_info=models.BatchPoolInfo(pool_id=emu.pool_id)))
    import shlex
    client.create_task("j", models.BatchTaskCreateOptions(
        id="t", command_line="python -c " + shlex.quote(LONG_JOB) + " " + pid_file))
    print("submitted", flush=True)
    time.sleep(600)
"""

# The job writes its pid, then outlives any test by far.
_LONG_JOB = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", ["aws", "azure"])
def test_sigkilled_emulator_leaves_no_job_process_and_no_temp_folder(provider: str, tmp_path: Path) -> None:
    if provider == "azure":
        pytest.importorskip("azure.batch")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    pid_file = tmp_path / "job.pid"
    script = f"LONG_JOB = {_LONG_JOB!r}\n" + textwrap.dedent(_AWS_OWNER if provider == "aws" else _AZURE_OWNER)
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    owner = subprocess.Popen([sys.executable, "-c", script, str(pid_file)], env=env, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == b"submitted"
        job_pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=60))
        assert psutil.pid_exists(job_pid)
        assert any(scratch.iterdir()), "the emulator keeps its files under TMPDIR"
        # Its servers too (Azurite is a Node.js process of its own).
        helpers = [c.pid for c in psutil.Process(owner.pid).children() if c.pid != job_pid]
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        started = time.monotonic()
        wait_until(lambda: _gone(job_pid), timeout=10)
        wait_until(lambda: not list(scratch.iterdir()), timeout=10)
        wait_until(lambda: all(_gone(pid) for pid in helpers), timeout=10)
        print(f"\n{provider}: job process gone and temp folder removed {time.monotonic() - started:.2f} s after SIGKILL")
    finally:
        if owner.poll() is None:
            owner.kill()
        if pid_file.exists() and pid_file.read_text():
            pid = int(pid_file.read_text())
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
