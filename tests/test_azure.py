"""AzureBatchExecutor against the offline Azure Batch (Azurite + the local Batch REST service).

The contract suite runs unchanged; the provider tests below take issue 4 item
by item. Everything goes through the real azure-batch SDK and adlfs over
sockets on 127.0.0.1; task processes run the real runner. One emulator (four
task slots) serves the module.
"""

from __future__ import annotations

import importlib

import asyncio
import base64
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.batch")
pytest.importorskip("adlfs")

import jobs  # noqa: E402
from azure.core.credentials import AzureNamedKeyCredential  # noqa: E402
from azure.core.exceptions import ResourceNotFoundError  # noqa: E402

from cloudexec._futures import CANCEL_REASON  # noqa: E402
from cloudexec.errors import CloudExecError, JobFailedError, StorageError, SubmissionError  # noqa: E402
from cloudexec.providers import _azure_conventions as _conventions  # noqa: E402
from cloudexec.providers import _azure_tasks as _tasks  # noqa: E402
from cloudexec.providers._azure_describe import _REFRESH_PER_POLL  # noqa: E402
from cloudexec.providers.azure import (  # noqa: E402
    DEFAULT_CONTAINER_IMAGE,
    MAX_TASKS_PER_REQUEST,
    AzureArrayFuture,
    AzureBatchExecutor,
    AzureBatchFuture,
    AzureBatchProvider,
    AzureJobStatus,
    _AsyncTokenCredential,
    azure_priority,
    task_status,
)
from cloudexec.testing.azure import AzureBatchEmulator, azure_batch_emulator  # noqa: E402
from contract import CountingClient, ExecutorContract, executor_factory, wait_until  # noqa: E402
from provider_contract import ProviderContract  # noqa: E402

pytestmark = pytest.mark.azure

SLOTS = 4
FAST = {"poll_interval_s": (0.05, 0.5), "lro_polling_interval_s": 0.1}


@pytest.fixture(scope="module")
def emu() -> Iterator[AzureBatchEmulator]:
    # Default task_env: every task reaches Azurite through
    # AZURE_STORAGE_CONNECTION_STRING, as a pool's managed identity would.
    with azure_batch_emulator(slots=SLOTS, kill_grace_s=1.0) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def batch(emu: AzureBatchEmulator) -> Iterator[Any]:
    with emu.batch_client() as client:
        yield client


@pytest.fixture(scope="module")
def blobs(emu: AzureBatchEmulator) -> Any:
    from adlfs import AzureBlobFileSystem

    return AzureBlobFileSystem(**emu.adlfs_options())


@pytest.fixture
def make_executor(emu: AzureBatchEmulator) -> Iterator[Any]:
    def build(**kwargs: Any) -> AzureBatchExecutor:
        return emu.executor(**{**FAST, **kwargs})

    yield from executor_factory(build, shutdown_limit_s=30)


class TestAzureContract(ExecutorContract):
    """The executor contract, on the Azure Batch emulator."""

    timeout_exit_code = 143  # the node sends SIGTERM at maxWallClockTime
    memory_limit = None  # Azure Batch sizes memory by VM, not per task


class TestAzureProviderContract(ProviderContract):
    """The provider contract, on the Azure Batch emulator."""



def py_exec(code: str) -> tuple[Any, str, dict[str, Any]]:
    """``(exec, code, {})``: a job running ``code`` that needs no importable module."""
    return exec, textwrap.dedent(code), {}


# -- pure logic: status table, names, priority --------------------------------------------


@pytest.mark.parametrize(
    "state, result, status, phase",
    [
        ("active", None, AzureJobStatus.ACTIVE, "queued"),
        ("preparing", None, AzureJobStatus.ACTIVE, "queued"),
        ("running", None, AzureJobStatus.RUNNING, "running"),
        ("completed", "success", AzureJobStatus.SUCCEEDED, "succeeded"),
        ("completed", "failure", AzureJobStatus.FAILED, "failed"),
        ("Completed", "Failure", AzureJobStatus.FAILED, "failed"),
    ],
)
def test_task_status_table(state: str, result: str | None, status: AzureJobStatus, phase: str) -> None:
    assert task_status(state, result) is status
    assert status.phase.value == phase
    assert AzureJobStatus.parse(status.value) is status


def test_array_statuses_and_their_phases() -> None:
    assert [s.value for s in AzureJobStatus] == ["Active", "Running", "Succeeded", "Failed", "Completed"]
    assert AzureJobStatus.COMPLETED.phase.value == "succeeded" and AzureJobStatus.COMPLETED.terminal
    assert not AzureJobStatus.ACTIVE.terminal


@pytest.mark.parametrize(
    "job_id",
    [
        "shout-20260101-000000-deadbeef",
        "MixedCase_Job",
        "a",
        "x" * 64,
        "--weird__id--",
        "Job-1",
    ],
)
def test_conventions_container_names_are_valid(job_id: str) -> None:
    name = _conventions.container_name(job_id)
    assert 3 <= len(name) <= 63 and name.startswith("job-")
    assert _conventions._CONTAINER_RE.match(name), name
    assert _conventions.container_name(job_id) == name  # deterministic
    if job_id == "shout-20260101-000000-deadbeef":
        assert name == "job-" + job_id  # cloudexec's own ids are kept as they are


def test_conventions_container_names_do_not_collide() -> None:
    long_a, long_b = "x" * 63 + "a", "x" * 63 + "b"
    assert _conventions.container_name(long_a) != _conventions.container_name(long_b)
    assert _conventions.container_name("My_Job") != _conventions.container_name("my-job")


@pytest.mark.parametrize("priority, azure", [(-1, -1000), (-0.5, -500), (0, 0), (0.25, 250), (1, 1000)])
def test_priority_scale(priority: float, azure: int) -> None:
    assert azure_priority(priority) == azure


def test_async_credential_adapter_serves_a_sync_token_credential() -> None:
    class Sync:
        def get_token(self, *scopes: str, **kwargs: Any) -> str:
            return f"token for {scopes[0]}"

    adapter = _AsyncTokenCredential(Sync())
    assert asyncio.run(adapter.get_token("https://storage.azure.com/.default")) == (
        "token for https://storage.azure.com/.default"
    )


@pytest.mark.timeout(30)
def test_runner_loads_conventions_only_when_asked() -> None:
    code = (
        "import sys, cloudexec.runner\n"
        "assert 'cloudexec.providers._azure_conventions' not in sys.modules\n"
        "import cloudexec.providers._azure_conventions\n"
        "assert not [m for m in sys.modules if m.startswith(('adlfs', 'azure', 'fsspec'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_command_line_names_the_index_variable_the_capture_and_the_storage_setup() -> None:
    provider = object.__new__(AzureBatchProvider)  # command_for needs no client
    single = provider.command_for("az://c/job-1", array=False)
    array = provider.command_for("az://c/job-1", array=True)
    assert single == (
        "python", "-m", "cloudexec.runner", "az://c/job-1",
        "--capture-output", _conventions.CAPTURE_HOOK, "--storage-setup", _conventions.STORAGE_HOOK,
    )
    assert array == (
        *single[:4], "--array", *single[4:], "--index-env", "AZ_BATCH_TASK_ID", "--index-base", "10000001"
    )


def test_a_task_gives_its_blob_client_the_providers_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a task, the blob SDK's default first backoff (15 s) would stall a job behind one throttle."""
    from adlfs import AzureBlobFileSystem

    from cloudexec._storage import FsspecStore

    fs = AzureBlobFileSystem(account_name="devstoreaccount1", account_key="a2V5", skip_instance_cache=True)
    policy = fs.service_client._config.retry_policy
    assert policy.initial_backoff == 15  # azure-storage-blob's own default
    monkeypatch.setenv(_conventions.ATTEMPTS_ENV_VAR, "7")
    module, _, name = _conventions.STORAGE_HOOK.partition(":")
    hook = getattr(importlib.import_module(module), name)
    hook(FsspecStore("az://c/jobs/j", fs=fs))
    assert (policy.initial_backoff, policy.total_retries, policy.status_retries) == (0.5, 6, 6)
    hook(object())  # a local folder: nothing to tune, nothing raised


@pytest.mark.timeout(30)
def test_capture_tees_output_and_uploads_logs_and_job_output(tmp_path: Path) -> None:
    """Inside a task: the node still sees the output; the container gets $TaskLog and $TaskOutput."""
    work, dest = tmp_path / "wd", tmp_path / "container"
    work.mkdir()
    code = textwrap.dedent(
        """
        import os, sys
        from cloudexec import runner
        from cloudexec.providers._azure_conventions import CAPTURE_HOOK
        capture = runner._call_hook(CAPTURE_HOOK, "output capture")  # what the command line's --capture-output does
        print("from python", flush=True)
        os.system("echo from a subprocess; echo to stderr >&2")
        os.makedirs("JobOutput/sub")
        open("JobOutput/result.txt", "w").write("42")
        open("JobOutput/sub/more.txt", "w").write("more")
        os.chdir("/")  # the job may move; ./JobOutput/ is the task's
        capture.finish()
        print("after the capture")
        """
    )
    env = {**os.environ, _conventions.ENV_VAR: f"file://{dest}", "AZ_BATCH_TASK_ID": "10000007"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout == "from python\nfrom a subprocess\nafter the capture\n"  # the node's file is complete
    assert proc.stderr == "to stderr\n"
    logs = dest / "10000007" / "$TaskLog"
    assert (logs / "stdout.txt").read_text() == "from python\nfrom a subprocess\n"
    assert (logs / "stderr.txt").read_text() == "to stderr\n"
    outputs = dest / "10000007" / "$TaskOutput"
    assert (outputs / "result.txt").read_text() == "42" and (outputs / "sub" / "more.txt").read_text() == "more"


# -- statuses, exit codes, logs -------------------------------------------------------------


def _statuses_until_done(fut: Any, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = fut.job_status
        if status is not None and (not seen or seen[-1] != status.value):
            seen.append(status.value)
        if status is not None and status.terminal:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"no terminal status within {timeout} s; saw {seen}")


@pytest.mark.timeout(60)
def test_single_job_goes_active_running_succeeded_and_vcpus_are_required_slots(
    make_executor: Any, batch: Any
) -> None:
    ex = make_executor()
    # A task that needs every slot holds the next one back: it is seen Active.
    blocker = ex.with_settings(vcpus=SLOTS).submit(jobs.nap, 1.5)
    wait_until(blocker.running, 30)
    fut = ex.submit(jobs.nap, 1.5)
    assert _statuses_until_done(fut, 45) == ["Active", "Running", "Succeeded"]
    assert fut.job_status is AzureJobStatus.SUCCEEDED and fut.job_exit_code == 0 and fut.attempts == 1
    start_blocker, end_blocker = blocker.result(timeout=5)
    start, _ = fut.result(timeout=5)
    assert start >= end_blocker - 0.05  # packed by slots, not overlapping
    assert batch.get_task(blocker.job_id, "10000000").required_slots == SLOTS
    assert batch.get_task(fut.job_id, "10000000").required_slots == 1
    # The job ends by itself (onAllTasksComplete=terminatejob), freeing the account's job quota.
    job = wait_until(lambda: (j := batch.get_job(fut.job_id)).state == "completed" and j, 10)
    assert job.execution_info.termination_reason == "AllTasksComplete"


@pytest.mark.timeout(60)
def test_failed_job_status_reason_from_failure_info(make_executor: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.exit_hard, 3)
    with pytest.raises(JobFailedError):
        fut.result(timeout=45)
    assert fut.job_status is AzureJobStatus.FAILED
    assert fut.job_status_reason == "FailureExitCode: The task process exited with an unexpected exit code"


@pytest.mark.timeout(60)
def test_array_goes_active_then_completed_with_counts(make_executor: Any) -> None:
    ex = make_executor()
    arr = ex.submit_map(jobs.nap, [1.0, 1.0])
    seen = _statuses_until_done(arr, 45)
    assert seen[0] == "Active" and seen[-1] == "Completed" and set(seen) <= {"Active", "Completed"}
    assert arr.job_status is AzureJobStatus.COMPLETED
    assert arr.status_counts == {"Active": 0, "Running": 0, "Succeeded": 2, "Failed": 0}
    assert [c.job_status for c in arr.children] == [AzureJobStatus.SUCCEEDED] * 2
    failing = ex.submit_map(jobs.fail_on, [1, 3])
    with pytest.raises(jobs.Boom):
        failing.result(timeout=45)
    assert failing.job_status is AzureJobStatus.FAILED and failing.job_status_reason == "1 of 2 tasks failed"
    assert failing.child_job_exit_codes == [0, 1]
    assert failing.child_job_status_reasons[1] == (
        "FailureExitCode: The task process exited with an unexpected exit code"
    )


@pytest.mark.timeout(60)
def test_logs_stdout_and_stderr_apart_and_task_log_blobs(
    make_executor: Any, emu: AzureBatchEmulator, blobs: Any
) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.shout, "x")
    arr = ex.submit_map(jobs.shout, ["p", "q"])
    assert fut.result(timeout=45) == "X" and arr.result(timeout=45) == ["P", "Q"]
    container = f"job-{fut.job_id}"
    assert blobs.cat_file(f"{container}/10000000/$TaskLog/stdout.txt") == b"stdout says x\n"
    assert blobs.cat_file(f"{container}/10000000/$TaskLog/stderr.txt") == b"stderr says x\n"
    assert blobs.cat_file(f"job-{arr.job_id}/10000002/$TaskLog/stderr.txt") == b"stderr says q\n"
    downloads = emu.api_calls["download_task_file"]
    # After the task ended the logs come from Blob storage, not from the node.
    assert fut.job_log == "stdout says x\n" and fut.job_stderr_log == "stderr says x\n"
    assert arr.children[1].job_log == "stdout says q\n" and arr.children[1].job_stderr_log == "stderr says q\n"
    assert emu.api_calls["download_task_file"] == downloads
    ex.shutdown()  # futures outlive their executor: their properties still work
    assert arr.children[0].job_log == "stdout says p\n"


@pytest.mark.timeout(60)
def test_log_streams_from_the_node_while_the_task_runs(make_executor: Any, emu: AzureBatchEmulator) -> None:
    ex = make_executor()
    fut = ex.submit(*py_exec("import time\nprint('early', flush=True)\ntime.sleep(30)\n"))
    wait_until(fut.running, 30)
    downloads = emu.api_calls["download_task_file"]
    assert wait_until(lambda: "early" in (fut.job_log or ""), 20)
    assert emu.api_calls["download_task_file"] > downloads
    assert fut.cancel()


@pytest.mark.timeout(60)
def test_task_ids_follow_wolframs_scheme(make_executor: Any, batch: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.env, "AZ_BATCH_TASK_ID")
    assert isinstance(fut, AzureBatchFuture) and fut.result(timeout=45) == "10000000"
    assert fut.provider_task_id == "10000000" and fut.provider_job_id == fut.job_id
    assert fut.properties()["provider_task_id"] == "10000000"
    arr = ex.submit_map(jobs.env, ["AZ_BATCH_TASK_ID"] * 3)
    assert isinstance(arr, AzureArrayFuture) and arr.provider_first_task_id == "10000001"
    assert arr.result(timeout=45) == ["10000001", "10000002", "10000003"]
    children = arr.children
    assert all(isinstance(c, AzureBatchFuture) for c in children)
    assert [getattr(c, "provider_task_id") for c in children] == ["10000001", "10000002", "10000003"]
    assert sorted(t.id for t in batch.list_tasks(arr.job_id)) == ["10000001", "10000002", "10000003"]
    assert arr.properties()["provider_first_task_id"] == "10000001"


@pytest.mark.timeout(60)
def test_tasks_are_added_in_collections_in_index_order(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any
) -> None:
    assert MAX_TASKS_PER_REQUEST == 100 and AzureBatchProvider.tasks_per_request == 100
    ex = make_executor()
    ex.provider.tasks_per_request = 2  # so that five tasks need three requests
    before = emu.api_calls["create_task_collection"]
    arr = ex.submit_map(jobs.double, range(5))
    assert arr.result(timeout=45) == [0, 2, 4, 6, 8]
    assert emu.api_calls["create_task_collection"] - before == 3
    tasks = sorted(batch.list_tasks(arr.job_id), key=lambda t: t.creation_time)
    order = [int(t.id) - 10000001 for t in tasks]
    assert sorted(order) == list(range(5))
    # The collections go out a few at once: each one's tasks are added in index order.
    for collection in ([0, 1], [2, 3], [4]):
        assert [i for i in order if i in collection] == collection


@pytest.mark.timeout(60)
def test_describe_is_a_few_calls_per_poll(make_executor: Any, emu: AzureBatchEmulator) -> None:
    ex = make_executor()
    singles = [ex.submit(jobs.nap, 1.5) for _ in range(3)]
    queued = ex.with_settings(vcpus=SLOTS).submit(jobs.nap, 0.1)  # waits for the slots the others use
    arr = ex.submit_map(jobs.nap, [1.5])
    # Every job handed to Azure (a loaded machine may still be submitting the
    # last ones) and the first three running.
    wait_until(lambda: all(f._record.ref for f in [*singles, queued, arr]), 20)
    wait_until(lambda: all(f.running() for f in singles), 20)
    # A provider of its own, so that the executor's poller does not add to the count.
    counting = CountingClient(emu.batch_client())
    provider = AzureBatchProvider(
        counting, batch_url=emu.batch_url, pool_id=emu.pool_id, storage_url=emu.storage_url,
        storage_options=emu.adlfs_options(),
    )
    refs = [f._record.ref for f in [*singles, queued, arr]]
    infos = provider.describe(refs)
    assert set(infos) == set(refs)
    assert [infos[r].status for r in refs[:3]] == [AzureJobStatus.RUNNING] * 3
    assert infos[refs[3]].status is AzureJobStatus.ACTIVE
    # One list of the jobs (it says which are active, and why one ended); a GET
    # of each active single job's task (at most a few per poll); an array's taskcounts.
    assert sorted(counting.calls) == sorted(["list_jobs"] + ["get_task"] * 4 + ["get_job_task_counts"])
    counting.calls.clear()
    assert provider.describe(refs[:1])[refs[0]].status is AzureJobStatus.RUNNING
    assert counting.calls == ["get_task"]  # a lone job (a property read) is asked about directly
    provider.close()
    for fut in [*singles, queued, arr]:
        fut.result(timeout=45)


@pytest.mark.timeout(120)
def test_describe_of_many_jobs_costs_a_list_and_a_few_gets(make_executor: Any, emu: AzureBatchEmulator) -> None:
    ex = make_executor()
    blocker = ex.with_settings(vcpus=SLOTS).submit(jobs.nap, 4)  # holds every slot: the others queue
    wait_until(blocker.running, 30)
    singles = [ex.submit(jobs.nap, 0.5) for _ in range(20)]
    wait_until(lambda: all(f._record.ref for f in singles), 30)  # all submitted
    counting = CountingClient(emu.batch_client())
    provider = AzureBatchProvider(
        counting, batch_url=emu.batch_url, pool_id=emu.pool_id, storage_url=emu.storage_url,
        storage_options=emu.adlfs_options(),
    )
    refs = [f._record.ref or "" for f in singles]
    before = dict(emu.api_calls)
    infos = provider.describe(refs)
    # All queued behind the blocker: one list of the jobs, and the tasks of a few of them.
    assert [infos[r].status for r in refs] == [AzureJobStatus.ACTIVE] * 20
    assert sorted(counting.calls) == sorted(["list_jobs"] + ["get_task"] * _REFRESH_PER_POLL)
    assert emu.api_calls["list_jobs"] - before.get("list_jobs", 0) >= 1  # the list went over the wire

    def finals() -> int:
        return sum(1 for s in provider._seen.values() if s.final is not None)

    seen: dict[str, list[str]] = {r: [infos[r].status.value] for r in refs}  # type: ignore[union-attr]
    deadline = time.monotonic() + 90
    while not all(s[-1] == "Succeeded" for s in seen.values()):
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
        counting.calls.clear()
        done_before = finals()
        infos = provider.describe(refs)
        assert set(infos) == set(refs)
        if len(refs) - done_before == 1:
            # The last job left is a lone property read: its task (and job) directly.
            assert "list_jobs" not in counting.calls and len(counting.calls) <= 2, counting.calls
        else:
            # One list, at most a few task GETs, and one GET per job the moment it completes.
            assert counting.calls.count("list_jobs") == 1 and "get_job" not in counting.calls
            assert len(counting.calls) <= 1 + _REFRESH_PER_POLL + (finals() - done_before), counting.calls
        for ref in refs:
            status = infos[ref].status
            assert status is not None
            if status.value != seen[ref][-1]:
                seen[ref].append(status.value)
    order = ["Active", "Running", "Succeeded"]
    for statuses in seen.values():
        assert statuses == sorted(statuses, key=order.index) and statuses[-1] == "Succeeded", seen
    assert any("Running" in statuses for statuses in seen.values()), seen
    counting.calls.clear()
    assert all(i.exit_code == 0 for i in provider.describe(refs).values())
    assert counting.calls == []  # a completed job's answer is kept: it never changes
    provider.close()
    assert [f.result(timeout=45)[1] > 0 for f in singles] == [True] * 20 and blocker.result(timeout=45)


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_priority_image_tags_and_name_reach_the_job(make_executor: Any, batch: Any) -> None:
    ex = make_executor()
    high = ex.with_settings(priority=0.5, tags={"team": "fit"}, job_name="nightly-fit").submit(jobs.double, 1)
    low = ex.with_settings(priority=-1, container_image="myregistry.azurecr.io/cloudexec:1.0").submit(jobs.double, 2)
    assert high.result(timeout=45) == 2 and low.result(timeout=45) == 4
    job = batch.get_job(high.job_id)
    assert job.priority == 500 and job.display_name == "nightly-fit"
    assert {m.name: m.value for m in job.metadata}["team"] == "fit"
    assert batch.get_job(low.job_id).priority == -1000
    assert batch.get_task(low.job_id, "10000000").container_settings.image_name == "myregistry.azurecr.io/cloudexec:1.0"
    settings = batch.get_task(high.job_id, "10000000").container_settings
    assert settings.image_name == DEFAULT_CONTAINER_IMAGE == "cloudexec:0.1"
    assert settings.working_directory == "taskWorkingDirectory"


@pytest.mark.timeout(60)
def test_timeout_is_max_wall_clock_time(make_executor: Any, batch: Any) -> None:
    ex = make_executor().with_settings(timeout=1)
    fut = ex.submit(jobs.nap, 30)
    with pytest.raises(JobFailedError):
        fut.result(timeout=45)
    assert "maximum execution time" in (fut.job_status_reason or "")
    assert batch.get_task(fut.job_id, "10000000").constraints.max_wall_clock_time == dt.timedelta(seconds=1)


@pytest.mark.timeout(60)
def test_retries_are_max_task_retry_count(make_executor: Any, batch: Any, tmp_path: Path) -> None:
    ex = make_executor().with_settings(retries=2)
    fut = ex.submit(jobs.flaky, str(tmp_path / "count"), 2)
    assert fut.result(timeout=45) == 3
    assert batch.get_task(fut.job_id, "10000000").constraints.max_task_retry_count == 2


# -- cancel -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_single_running_and_queued(make_executor: Any, batch: Any) -> None:
    ex = make_executor()
    blocker = ex.with_settings(vcpus=SLOTS).submit(jobs.nap, 30)
    wait_until(blocker.running, 30)
    queued = ex.submit(jobs.double, 1)
    wait_until(lambda: queued.job_status is AzureJobStatus.ACTIVE, 20)
    for fut in (queued, blocker):
        assert fut.cancel()
        wait_until(lambda: fut.job_status is not None and fut.job_status.terminal, 20, 0.1)
        assert fut.job_status is AzureJobStatus.FAILED
        assert (fut.job_status_reason or "").startswith(CANCEL_REASON)
        job = batch.get_job(fut.job_id)
        assert job.execution_info.termination_reason == CANCEL_REASON
        task = batch.get_task(fut.job_id, "10000000")
        assert task.state == "completed" and task.execution_info.failure_info.code == "TaskEnded"
    assert blocker.job_exit_code == 143


@pytest.mark.timeout(60)
def test_cancel_array_terminates_the_job_with_a_reason(make_executor: Any, batch: Any) -> None:
    ex = make_executor()
    arr = ex.submit_map(jobs.nap, [30, 30, 30])
    wait_until(lambda: (arr.status_counts or {}).get("Running", 0) == 3, 30, 0.1)
    assert arr.cancel()
    wait_until(lambda: arr.job_status is not None and arr.job_status.terminal, 20, 0.1)
    assert CANCEL_REASON in (arr.job_status_reason or "")
    assert batch.get_job(arr.job_id).execution_info.termination_reason == CANCEL_REASON
    wait_until(lambda: all(t.state == "completed" for t in batch.list_tasks(arr.job_id)), 20, 0.1)
    assert {t.execution_info.failure_info.code for t in batch.list_tasks(arr.job_id)} == {"TaskEnded"}


# -- Batch File Conventions outputs -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_output_files_listed_and_downloaded(make_executor: Any, blobs: Any, tmp_path: Path) -> None:
    ex = make_executor()
    fut = ex.submit(
        *py_exec(
            """
            import os
            os.makedirs("JobOutput/plots")
            open("JobOutput/x.txt", "w").write("hello from the task")
            open("JobOutput/plots/fit.csv", "w").write("a,b\\n1,2\\n")
            """
        )
    )
    fut.result(timeout=45)
    assert fut.output_files() == ["plots/fit.csv", "x.txt"]
    assert blobs.cat_file(f"job-{fut.job_id}/10000000/$TaskOutput/x.txt") == b"hello from the task"
    path = fut.download_output("x.txt", tmp_path)
    assert path == str(tmp_path / "x.txt") and Path(path).read_text() == "hello from the task"
    nested = fut.download_output("plots/fit.csv", tmp_path / "copy" / "fit.csv")
    assert Path(nested).read_text() == "a,b\n1,2\n"
    with pytest.raises(FileNotFoundError, match=r"no output file 'nope.txt'.*x\.txt"):
        fut.download_output("nope.txt", tmp_path)
    with pytest.raises(ValueError, match="relative"):
        fut.download_output("../x.txt", tmp_path)
    writes_b = "import os; os.makedirs('JobOutput'); open('JobOutput/b.txt', 'w').write('1')"
    arr = ex.submit_map(exec, ["x = 0", writes_b], [{}, {}])
    assert arr.result(timeout=45) == [None, None]
    assert arr.children[0].output_files() == [] and arr.children[1].output_files() == ["b.txt"]


# -- re-attach ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reattach_by_cloudexec_and_azure_job_id(make_executor: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.double, 5)
    arr = ex.submit_map(jobs.double, [1, 2])
    assert fut.result(timeout=45) == 10 and arr.result(timeout=45) == [2, 4]
    assert ex.provider.find_job_url(fut.provider_job_id) == f"{ex.io_url}/{fut.job_id}"
    assert ex.provider.find_job_url("no-such-job") is None
    other = make_executor()
    again = other.attach(fut.provider_job_id)
    assert isinstance(again, AzureBatchFuture) and again.result(timeout=45) == 10
    assert again.provider_task_id == "10000000" and again.job_log is not None
    arr_again = other.attach(arr.provider_job_id)
    assert isinstance(arr_again, AzureArrayFuture) and arr_again.result(timeout=45) == [2, 4]
    assert other.attach(f"{arr.provider_job_id}[1]").result(timeout=45) == 4


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_unknown_pool_names_azure_code_and_fix(emu: AzureBatchEmulator) -> None:
    with pytest.raises(ValueError, match=r"pool_id='no-such-pool'.*PoolNotFound.*create the pool"):
        emu.executor(pool_id="no-such-pool")


@pytest.mark.timeout(30)
def test_wrong_batch_key_is_a_clear_error(emu: AzureBatchEmulator) -> None:
    wrong = AzureNamedKeyCredential(emu.account_name, base64.b64encode(b"not the key" * 6).decode())
    match = r"refused the credential \(AuthenticationFailed\).*AzureNamedKeyCredential"
    with pytest.raises(CloudExecError, match=match):
        emu.executor(credential=wrong)


@pytest.mark.timeout(30)
def test_missing_container_and_wrong_storage_key(emu: AzureBatchEmulator) -> None:
    with pytest.raises(StorageError, match=r"'no-such-container' .*does not exist.*ContainerNotFound.*create it"):
        emu.executor(storage="az://no-such-container/jobs")
    bad = emu.blob_connection_string.replace(emu.storage_account_key, base64.b64encode(b"y" * 64).decode())
    with pytest.raises(StorageError, match=r"refused the credentials \(AuthorizationFailure\)"):
        emu.executor(storage_options={"connection_string": bad})


@pytest.mark.timeout(30)
def test_malformed_arguments(emu: AzureBatchEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_BATCH_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="storage must be an az:// URL"):
        emu.executor(storage="s3://bucket/jobs")
    with pytest.raises(ValueError, match="not a valid blob container name"):
        emu.executor(storage="az://Bad_Container/jobs")
    with pytest.raises(ValueError, match="batch_url must be the Batch account endpoint"):
        emu.executor(batch_url=None)
    with pytest.raises(ValueError, match="pool_id must be"):
        emu.executor(pool_id="")
    with pytest.raises(TypeError, match="credential must be an AzureNamedKeyCredential"):
        emu.executor(credential="my-key")


@pytest.mark.timeout(30)
def test_bad_settings_name_the_value_and_the_fix(make_executor: Any) -> None:
    ex = make_executor()
    with pytest.raises(ValueError, match=r"priority must be from -1 \(lowest\) to \+1 \(highest\); got 1.5"):
        ex.with_settings(priority=1.5)
    with pytest.raises(ValueError, match=r"memory=4096 MiB .*VM size \(standard_d2s_v3\).*vcpus="):
        ex.with_settings(memory="4 GiB")
    with pytest.raises(ValueError, match=r"gpus=1 .*VM size"):
        ex.with_settings(gpus=1)
    with pytest.raises(ValueError, match=rf"vcpus={SLOTS + 1} .*{SLOTS} per node \(taskSlotsPerNode\)"):
        ex.with_settings(vcpus=SLOTS + 1)
    with pytest.raises(ValueError, match="memory"):
        make_executor(memory=512)  # executor-level defaults are checked at construction


@pytest.mark.timeout(60)
def test_failed_task_add_leaves_nothing_behind(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any, blobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = make_executor()
    provider = ex.provider
    provider.tasks_per_request = 2
    build, build_child = provider.task_options, _tasks.child_body

    def bad_single_task(spec: Any, index: int | None) -> Any:
        options = build(spec, index)
        if index is None:
            options.required_slots = 0  # Azure refuses: requiredSlots must be at least 1
        return options

    def one_bad_child(template: Any, index: int, *, sequential: bool) -> dict[str, Any]:
        body = build_child(template, index, sequential=sequential)
        return {**body, "requiredSlots": 0} if index == 3 else body

    monkeypatch.setattr(provider, "task_options", bad_single_task)
    monkeypatch.setattr(_tasks, "child_body", one_bad_child)
    before = dict(emu.api_calls)
    # Array: tasks 0-2 were added (and start running) before task 3 is refused.
    arr = ex.submit_map(jobs.nap, [30] * 5)
    error = arr.exception(timeout=30)
    assert isinstance(error, SubmissionError) and error.code == "InvalidPropertyValue"
    assert "task 10000004" in str(error) and "terminated and deleted" in str(error)
    # Single: create_task itself fails.
    single = ex.submit(jobs.double, 1)
    single_error = single.exception(timeout=30)
    assert isinstance(single_error, SubmissionError) and single_error.code == "InvalidPropertyValue"
    assert "terminated and deleted" in str(single_error)
    for job_id in (error.job_id, single_error.job_id):
        assert job_id is not None

        def gone(job_id: str = job_id) -> bool:
            try:
                batch.get_job(job_id)
            except ResourceNotFoundError:
                return True
            return False

        wait_until(gone, 20, 0.1)
        assert not blobs.exists(f"job-{job_id}")
        assert ex._core.store.list(job_id) == []
    assert emu.api_calls["terminate_job"] - before.get("terminate_job", 0) == 2
    assert emu.api_calls["delete_job"] - before.get("delete_job", 0) == 2


@pytest.mark.timeout(30)
def test_emulator_executor_passes_arguments_through(emu: AzureBatchEmulator) -> None:
    ex = emu.executor(vcpus=2, **FAST)
    try:
        assert isinstance(ex, AzureBatchExecutor) and ex.settings.vcpus == 2
        assert ex.io_url == emu.storage_url and ex.provider.pool_id == emu.pool_id
        assert ex.provider.slots_per_node == SLOTS and ex.provider.vm_size == emu.vm_size
        env = dict(ex.provider.task_environment)
        assert env == {}  # the emulator's pool provides storage access, as a managed identity would
        assert json.dumps(ex.provider.storage_options) == json.dumps(emu.adlfs_options())
    finally:
        ex.shutdown()
