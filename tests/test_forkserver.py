"""The emulators' fork server: one warm interpreter, one forked process per job (real processes, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cloudexec import _forkserver, _process
from contract import wait_until

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux-only"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[_forkserver.ForkServer]:
    fs = _forkserver.ForkServer(_process.job_environment(), ["json"], name="test")
    yield fs
    fs.close()


def _run(server: _forkserver.ForkServer, code: str, tmp_path: Path, **env: str) -> tuple[int, str]:
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = server.start_process(
            ["python", "-c", code, "arg1"], env={**_process.job_environment(), **env}, cwd=tmp_path,
            stdout=out, stderr=subprocess.STDOUT,
        )
    return proc.reap(60), log.read_text()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("pass", 0),
        ("import sys; sys.exit(4)", 4),
        ("import os; os._exit(3)", 3),
        ("raise ValueError('bad')", 1),
        ("import ctypes; ctypes.string_at(0)", 128 + signal.SIGSEGV),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
        ("raise KeyboardInterrupt", 128 + signal.SIGINT),
    ],
    ids=["ok", "sys.exit", "os._exit", "raises", "segfault", "sigterm", "keyboardinterrupt"],
)
def test_exit_codes_are_a_fresh_interpreters(server: _forkserver.ForkServer, tmp_path: Path, code: str, expected: int) -> None:
    assert _run(server, code, tmp_path)[0] == expected


def test_child_gets_its_environment_cwd_argv_and_output(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    code = (
        "import os, sys; print(os.environ['JOB_VAR'], os.getcwd(), sys.argv, __name__);"
        "print('to stderr', file=sys.stderr)"
    )
    exit_code, log = _run(server, code, tmp_path, JOB_VAR="job-value")
    assert exit_code == 0
    assert f"job-value {tmp_path} ['-c', 'arg1'] __main__" in log
    assert "to stderr" in log


def test_each_job_is_a_forked_process_of_its_own_group(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    before = server.started_count
    procs = [
        server.start_process(["python", "-c", "import time; time.sleep(60)"], env=_process.job_environment(), cwd=tmp_path)
        for _ in range(3)
    ]
    try:
        assert server.started_count == before + 3
        assert len({p.pid for p in procs}) == 3
        for proc in procs:
            # Forked by the server (no interpreter of its own), leading its own group.
            assert psutil.Process(proc.pid).ppid() == server.pid
            assert os.getpgid(proc.pid) == proc.pid
            assert os.getsid(proc.pid) == proc.pid
            assert proc.rss_bytes() > 0
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.reap(30) for proc in procs] == [128 + signal.SIGKILL] * 3


def test_the_end_of_a_job_kills_its_whole_group(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    assert _run(server, code, tmp_path)[0] == 0
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie", timeout=10)


def test_terminate_then_escalate_reaches_the_group(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = server.start_process(["python", "-c", code], env=_process.job_environment(), cwd=tmp_path, stdout=out)
    wait_until(lambda: "ready" in log.read_text(), timeout=30)
    proc.terminate(0.2)
    time.sleep(0.3)
    assert not proc.exited()  # it ignores SIGTERM
    assert proc.escalate()
    assert proc.reap(30) == 128 + signal.SIGKILL


def test_a_missing_working_directory_fails_the_start(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        server.start_process(["python", "-c", "pass"], env=_process.job_environment(), cwd=tmp_path / "missing")


def test_only_python_module_and_code_command_lines_are_forked(server: _forkserver.ForkServer) -> None:
    assert server.can_run(["python", "-m", "cloudexec.runner", "file:///x"])
    assert server.can_run(["python3", "-c", "pass"])
    assert not server.can_run(["python", "-m", "not_preloaded"])
    assert not server.can_run(["python", "-u", "-c", "pass"])
    assert not server.can_run(["sh", "-c", "true"])


def test_jobs_die_with_a_killed_server(tmp_path: Path) -> None:
    fs = _forkserver.ForkServer(_process.job_environment(), name="doomed")
    try:
        proc = fs.start_process(["python", "-c", "import time; time.sleep(60)"], env=_process.job_environment(), cwd=tmp_path)
        assert fs.pid is not None
        os.kill(fs.pid, signal.SIGKILL)
        assert proc.reap(30) == 128 + signal.SIGKILL
        wait_until(lambda: not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie", timeout=10)
        # A new server takes over the next job.
        again = fs.start_process(["python", "-c", "pass"], env=_process.job_environment(), cwd=tmp_path)
        assert again.reap(30) == 0
    finally:
        fs.close()


def test_closing_the_server_kills_its_jobs(tmp_path: Path) -> None:
    fs = _forkserver.ForkServer(_process.job_environment(), name="closing")
    proc = fs.start_process(["python", "-c", "import time; time.sleep(60)"], env=_process.job_environment(), cwd=tmp_path)
    server_pid = fs.pid
    fs.close()
    assert proc.exited()
    assert server_pid is not None and not psutil.pid_exists(server_pid)
    wait_until(lambda: not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie", timeout=10)


def test_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_forkserver.ENV_SWITCH, "0")
    assert not _forkserver.enabled()
    monkeypatch.setenv(_forkserver.ENV_SWITCH, "1")
    assert _forkserver.enabled()


def test_an_uncaught_exception_prints_as_python_prints_it(server: _forkserver.ForkServer, tmp_path: Path) -> None:
    exit_code, log = _run(server, "raise ValueError('bad')", tmp_path)
    assert exit_code == 1
    assert log.startswith("Traceback (most recent call last):")
    assert 'File "<string>", line 1, in <module>' in log and log.rstrip().endswith("ValueError: bad")
    assert "_forkserver" not in log
