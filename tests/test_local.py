"""LocalBatchExecutor: the contract suite plus what only the local provider does.

Jobs run as real subprocesses through the real runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import jobs
from cloudexec import LocalBatchExecutor, LocalJobStatus, _keys, _payload
from cloudexec.errors import JobFailedError, StorageError
from contract import ExecutorContract, executor_factory, run_script, wait_until
from provider_contract import ProviderContract

KEY = _keys.job_key(b"a test master key, 32 bytes long", "job")


@pytest.fixture
def make_executor(io_root: str) -> Iterator[Any]:
    def build(**kwargs: Any) -> LocalBatchExecutor:
        kwargs.setdefault("max_workers", 2)
        return LocalBatchExecutor(io_root, **kwargs)

    yield from executor_factory(build, shutdown_limit_s=30)


class TestLocalContract(ExecutorContract):
    """The executor contract, on local processes."""


class TestLocalProviderContract(ProviderContract):
    """The provider contract, on local processes."""



# -- local lifecycle -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_sequence_and_separate_logs(make_executor: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.shout, "x")
    assert fut.result(timeout=45) == "X"
    assert fut.properties()["status_history"] == ["Submitted", "Runnable", "Running", "Succeeded"]
    assert fut.job_status is LocalJobStatus.SUCCEEDED and fut.job_status == "Succeeded"
    assert fut.job_log == "stdout says x\n"
    assert fut.job_stderr_log == "stderr says x\n"
    arr = ex.submit_map(jobs.shout, ["p", "q"])
    arr.result(timeout=45)
    assert arr.children[1].job_stderr_log == "stderr says q\n"
    assert arr.status_counts == {
        "Submitted": 0, "Pending": 0, "Runnable": 0, "Running": 0, "Succeeded": 2, "Failed": 0
    }






@pytest.mark.timeout(90)
def test_running_jobs_and_workers_cost_no_thread_each(io_root: str, tmp_path: Any) -> None:
    # One scheduler thread waits for every job process and worker pipe (one
    # selector), as a batch service would: 6 running jobs, 0 threads more.
    import threading

    release = str(tmp_path / "go")
    with LocalBatchExecutor(io_root, max_workers=8) as ex:
        ex.submit(jobs.double, 1).result(timeout=45)  # the executor's own threads exist now
        before = {t.name for t in threading.enumerate()}
        singles = [ex.submit(jobs.wait_for_file, release, i) for i in range(4)]
        arr = ex.submit_map(jobs.wait_for_file, [release] * 4, [10, 11, 12, 13], chunksize=1)
        try:
            wait_until(lambda: sum(f.job_status == "Running" for f in singles) == 4, 45)
            wait_until(lambda: (arr.status_counts or {}).get("Running", 0) >= 2, 45)
            assert {t.name for t in threading.enumerate()} <= before | {"cloudexec-progress"}
        finally:
            open(release, "w").close()  # the jobs end, so the executor's shutdown does not wait
        assert [f.result(timeout=45) for f in singles] == [0, 1, 2, 3]
        assert arr.result(timeout=45) == [10, 11, 12, 13]


@pytest.mark.timeout(60)
def test_a_local_job_end_is_delivered_without_waiting_for_a_poll(io_root: str) -> None:
    # The local scheduler sees its processes end and tells the executor
    # (Provider.watch), so even a long poll pause does not delay a result.
    with LocalBatchExecutor(io_root, max_workers=2, poll_interval_s=(20.0, 20.0)) as ex:
        assert ex.submit(jobs.double, 21).result(timeout=15) == 42
        assert list(ex.map(jobs.double, range(3), chunksize=1, timeout=15)) == [0, 2, 4]


@pytest.mark.timeout(60)
def test_retries_show_in_the_status_history(make_executor: Any, tmp_path: Any) -> None:
    ex = make_executor()
    fut = ex.with_settings(retries=2).submit(jobs.flaky, str(tmp_path / "count"), 2)
    assert fut.result(timeout=45) == 3
    hist = fut.properties()["status_history"]
    assert hist.count("Running") == 3 and hist[-1] == "Succeeded"


@pytest.mark.timeout(90)
def test_vcpu_aware_packing(io_root: str) -> None:
    with LocalBatchExecutor(io_root, max_workers=4, max_vcpus=2) as ex:
        wide = ex.with_settings(vcpus=2)
        spans = [f.result(timeout=60) for f in [wide.submit(jobs.nap, 0.7) for _ in range(3)]]
        spans.sort()
        for (s1, e1), (s2, _) in zip(spans, spans[1:]):
            assert s2 >= e1 - 0.05, "two 2-vCPU jobs overlapped on 2 vCPUs"
        narrow = [f.result(timeout=60) for f in [ex.submit(jobs.nap, 1.0) for _ in range(2)]]
        assert narrow[1][0] < narrow[0][1], "two 1-vCPU jobs should share 2 vCPUs"
        with pytest.raises(ValueError, match="vcpus=3 is more than"):
            ex.with_settings(vcpus=3)
        with pytest.raises(ValueError, match="cannot give jobs GPUs"):
            ex.with_settings(gpus=1)


def test_bad_io_roots(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="memory://"):
        LocalBatchExecutor("memory://nope")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "a-file"
            target.write_text("")
            bad = str(target / "io")
        else:
            bad = str(ro / "io")
        with pytest.raises(StorageError, match="cannot write to the job storage"):
            LocalBatchExecutor(bad)
    finally:
        ro.chmod(0o700)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        LocalBatchExecutor(max_workers=-1)


@pytest.mark.timeout(60)
def test_default_io_root_is_a_temporary_folder() -> None:
    with LocalBatchExecutor(max_workers=1) as ex:
        assert ex.io_url.startswith("file://")
        assert ex.submit(jobs.double, 2).result(timeout=45) == 4


@pytest.mark.timeout(60)
def test_jobs_on_the_default_temporary_folder_end_before_it_is_removed_at_exit() -> None:
    """Nothing can attach to a job in a folder removed at exit: its process must not outlive the folder."""
    import psutil

    out = run_script(
        f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jobs
        from cloudexec import LocalBatchExecutor
        ex = LocalBatchExecutor(max_workers=1)  # no shutdown(): the interpreter just ends
        fut = ex.submit(jobs.nap, 30.0)
        while not fut.running():
            time.sleep(0.02)
        print(fut.properties()["pid"], ex.io_url, flush=True)
        """
    )
    pid, url = out.split()
    folder = url.removeprefix("file://")
    assert not os.path.exists(folder)
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_main_module_functions_run(io_root: str) -> None:
    out = run_script(
        f"""
        import math
        from cloudexec import LocalBatchExecutor
        SCALE = 3
        def scaled(x):
            return math.floor(x * SCALE)
        if __name__ == "__main__":
            with LocalBatchExecutor({io_root!r}, max_workers=2) as ex:
                print(ex.submit(scaled, 2.5).result(timeout=40), list(ex.map(scaled, [1, 2])))
        """
    )
    assert out.strip() == "7 [3, 6]"


@pytest.mark.timeout(90)
def test_reattach_after_the_client_died(io_root: str) -> None:
    out = run_script(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jobs
        from cloudexec import LocalBatchExecutor
        ex = LocalBatchExecutor({io_root!r}, max_workers=2)
        fut = ex.submit(jobs.nap, 2.0)
        arr = ex.submit_map(jobs.double, [1, 2, 3])
        import time
        while not (fut.running() and arr.done()):
            time.sleep(0.02)
        print(fut.job_id, arr.job_id, flush=True)
        os._exit(0)  # the client dies hard, its job still running
        """
    )
    job_id, array_id = out.split()
    with LocalBatchExecutor(io_root, max_workers=1) as ex:
        fut = ex.attach(job_id)
        start, end = fut.result(timeout=60)
        assert end - start >= 2.0
        assert fut.job_status is LocalJobStatus.SUCCEEDED
        assert ex.attach(array_id).result(timeout=30) == [2, 4, 6]






@pytest.mark.timeout(60)
def test_job_manifest_describes_the_prefix(make_executor: Any, io_root: str) -> None:
    ex = make_executor(retries=1)
    fut = ex.submit(jobs.double, 1)
    fut.result(timeout=45)
    with open(os.path.join(io_root, fut.job_id, "job.json")) as fh:
        manifest = json.load(fh)
    assert manifest["kind"] == "single" and manifest["provider"] == "local"
    assert manifest["function"] == "jobs.double" and manifest["settings"] == {"retries": 1}
    assert manifest["provider_ref"] == fut.job_id


@pytest.mark.timeout(60)
def test_runner_exit_codes_and_array_index_from_environment(make_executor: Any, io_root: str) -> None:
    ex = make_executor()
    arr = ex.submit_map(jobs.fail_on, [1, 3])
    with pytest.raises(jobs.Boom):
        arr.result(timeout=45)
    url = os.path.join(io_root, arr.job_id)
    first_result = os.path.join(url, *_payload.result_key(0).split("/"))
    os.remove(first_result)
    keyed = dict(os.environ, CLOUDEXEC_JOB_KEY=ex._core.keys.job_key(arr.job_id).hex())
    runner = [sys.executable, "-m", "cloudexec.runner", url, "--array"]

    def run(*options: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*runner, *options], env=dict(keyed, **env), capture_output=True)

    # Each provider's command line says where the index is; the runner names none of them.
    aws_style = run("--index-env", "AWS_BATCH_JOB_ARRAY_INDEX", AWS_BATCH_JOB_ARRAY_INDEX="0")
    assert aws_style.returncode == 0 and os.path.exists(first_result)
    split_part = run("--index-env", "JOB_INDEX", "--index-offset", "1", JOB_INDEX="0")
    assert split_part.returncode == 1 and b"item 3 is bad" in split_part.stderr
    azure_style = run("--index-env", "TASK_ID", "--index-base", "10000001", TASK_ID="10000002")
    assert azure_style.returncode == 1 and b"item 3 is bad" in azure_style.stderr
    bad = run(CLOUDEXEC_ARRAY_INDEX="1")  # the variable read when the command line names none
    assert bad.returncode == 1 and b"item 3 is bad" in bad.stderr
    unset = run("--index-env", "AWS_BATCH_JOB_ARRAY_INDEX", CLOUDEXEC_ARRAY_INDEX="1")
    assert unset.returncode == 2 and b"expected AWS_BATCH_JOB_ARRAY_INDEX in the environment" in unset.stderr
    garbled = run("--index-env", "TASK_ID", "--index-base", "10000001", TASK_ID="task-7")
    assert garbled.returncode == 2 and b"TASK_ID='task-7' is not an array index" in garbled.stderr
    missing = subprocess.run([sys.executable, "-m", "cloudexec.runner", url + "-nope"], env=keyed, capture_output=True)
    assert missing.returncode == 2
    keyless = subprocess.run([sys.executable, "-m", "cloudexec.runner", url, "--index", "1"], capture_output=True)
    assert keyless.returncode == 3 and b"CLOUDEXEC_JOB_KEY is missing" in keyless.stderr


@pytest.mark.timeout(120)
def test_libraries_that_take_an_executor(make_executor: Any) -> None:
    import scipy.optimize

    ex = make_executor()
    result = scipy.optimize.differential_evolution(
        jobs.sphere, [(-2, 2), (-2, 2)], workers=ex.map, updating="deferred", maxiter=3, popsize=4, seed=1, polish=False
    )
    assert result.nfev > 0 and result.fun < 8


@pytest.mark.timeout(60)
def test_runner_refuses_a_call_from_another_python_with_both_versions(tmp_path: Any) -> None:
    from cloudexec import _payload
    from cloudexec._storage import LocalStore
    from cloudexec.errors import VersionMismatchError

    store = LocalStore(str(tmp_path / "job"))
    body = _payload._dill().dumps((jobs.double, (1,), {}))
    store.write(_payload.CALL, _keys.seal(KEY, "call", "job", None, _payload.pack_raw("call", body, python="3.99.0")))
    env = dict(os.environ, CLOUDEXEC_JOB_KEY=KEY.hex())
    proc = subprocess.run([sys.executable, "-m", "cloudexec.runner", store.url], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Python 3.99.0" in proc.stderr
    outcomes = _payload.open_result([KEY], "job", None, store.read(_payload.RESULT))
    with pytest.raises(VersionMismatchError, match=r"Python 3\.99\.0.*runs Python 3\.\d+"):
        _payload.raise_or_return(outcomes)


@pytest.mark.timeout(60)
def test_runner_on_local_storage_imports_no_cloud_or_fsspec_code(tmp_path: Any) -> None:
    from cloudexec import _payload
    from cloudexec._storage import LocalStore

    store = LocalStore(str(tmp_path / "job"))
    store.write(_payload.CALL, _keys.seal(KEY, "call", "job", None, _payload.pack("call", (abs, (-3,), {}))))
    out = run_script(
        f"""
        import sys
        from cloudexec import runner
        assert runner.run_job({store.url!r}, environ={{"CLOUDEXEC_JOB_KEY": {KEY.hex()!r}}}) == 0
        print(sorted(m for m in ("fsspec", "boto3", "s3fs", "adlfs", "azure", "concurrent.futures.process")
                     if m in sys.modules))
        """
    )
    assert out.strip() == "[]"
    outcomes = _payload.open_result([KEY], "job", None, store.read(_payload.RESULT))
    assert _payload.raise_or_return(outcomes) == 3
