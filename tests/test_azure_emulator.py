"""The offline Azure Batch emulator, driven through the real azure-batch SDK.

Every test talks to the local Batch service with ``azure.batch.BatchClient``
and shared-key auth, and to Azurite with azure-storage-blob / adlfs, over real
sockets on 127.0.0.1. One emulator (two task slots) serves the whole module.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

pytest.importorskip("azure.batch")
pytest.importorskip("azure.storage.blob")

from azure.batch import BatchClient  # noqa: E402
from azure.batch import models as m  # noqa: E402
from azure.batch.models._models import BatchJobTerminateOptions  # noqa: E402 - not re-exported in 15.1
from azure.core.credentials import AzureNamedKeyCredential  # noqa: E402
from azure.core.exceptions import (  # noqa: E402
    HttpResponseError,
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceNotFoundError,
)

from cloudexec.testing.azure import AzureBatchEmulator, azure_batch_emulator  # noqa: E402

pytestmark = pytest.mark.azure

T = TypeVar("T")
SLOTS = 2
POLL_S = 0.05


@pytest.fixture(scope="module")
def emu() -> Iterator[AzureBatchEmulator]:
    # task_env={} so that a task reaches Azurite only through what the test
    # passes it (emu.env()), which is what test_task_process_writes_blob checks.
    with azure_batch_emulator(slots=SLOTS, task_env={}, kill_grace_s=1.0) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def client(emu: AzureBatchEmulator) -> Iterator[BatchClient]:
    with emu.batch_client() as batch_client:
        yield batch_client


def wait_for(fetch: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 15.0) -> T:
    """Poll ``fetch`` until ``done`` holds for its value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s; last value: {value!r}")
        time.sleep(POLL_S)


def wait_task(client: BatchClient, job_id: str, task_id: str, state: str, timeout_s: float = 15.0) -> m.BatchTask:
    return wait_for(lambda: client.get_task(job_id, task_id), lambda t: t.state == state, timeout_s)


def new_job(client: BatchClient, pool_id: str, **options: Any) -> str:
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id), **options))
    return job_id


def py(code: str) -> str:
    """A task command line running ``code`` with Python (quoted for shlex, no shell)."""
    return "python -c " + shlex.quote(code)


def read_file(client: BatchClient, job_id: str, task_id: str, path: str) -> str:
    return b"".join(client.download_task_file(job_id, task_id, path)).decode()


@pytest.mark.timeout(30)
def test_bad_shared_key_is_rejected_with_401(emu: AzureBatchEmulator) -> None:
    wrong_key = base64.b64encode(b"not the account key" * 3).decode()
    before = emu.api_calls["authentication_failed"]
    with BatchClient(emu.batch_url, AzureNamedKeyCredential(emu.account_name, wrong_key)) as bad:
        with pytest.raises(ClientAuthenticationError) as excinfo:
            bad.get_pool(emu.pool_id)
    assert excinfo.value.status_code == 401
    assert excinfo.value.error is not None and excinfo.value.error.code == "AuthenticationFailed"
    assert emu.api_calls["authentication_failed"] == before + 1


@pytest.mark.timeout(30)
def test_pool_is_reported_and_unknown_pool_is_not_found(emu: AzureBatchEmulator, client: BatchClient) -> None:
    pool = client.get_pool(emu.pool_id)
    assert pool.task_slots_per_node == SLOTS
    assert pool.state == m.BatchPoolState.ACTIVE
    assert pool.current_dedicated_nodes == 1
    with pytest.raises(ResourceNotFoundError) as excinfo:
        client.get_pool("no-such-pool")
    assert excinfo.value.error is not None and excinfo.value.error.code == "PoolNotFound"


@pytest.mark.timeout(30)
def test_duplicate_job_conflicts_and_job_on_unknown_pool_never_runs(client: BatchClient) -> None:
    # Azure accepts a job whose pool does not exist; its tasks wait for the pool.
    job_id = new_job(client, "no-such-pool")
    with pytest.raises(ResourceExistsError) as excinfo:
        client.create_job(
            m.BatchJobCreateOptions(id=job_id.upper(), pool_info=m.BatchPoolInfo(pool_id="no-such-pool"))
        )
    assert excinfo.value.error is not None and excinfo.value.error.code == "JobExists"
    client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line="true"))
    time.sleep(0.3)
    assert client.get_task(job_id, "t").state == m.BatchTaskState.ACTIVE
    assert client.get_job(job_id).execution_info.pool_id == "no-such-pool"


@pytest.mark.timeout(30)
def test_task_runs_with_clean_env_and_reports_exit_code(
    emu: AzureBatchEmulator, client: BatchClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDEXEC_TEST_SECRET", "must-not-leak")
    job_id = new_job(client, emu.pool_id)
    code = (
        "import os, sys\n"
        "print(os.environ['AZ_BATCH_TASK_ID'], os.environ['AZ_BATCH_JOB_ID'], flush=True)\n"
        "print(os.getcwd() == os.environ['AZ_BATCH_TASK_WORKING_DIR'], os.environ.get('CLOUDEXEC_TEST_SECRET'),"
        " os.environ.get('AZURE_STORAGE_CONNECTION_STRING'), os.environ['MY_SETTING'])\n"
        "print('oops', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    client.create_task(
        job_id,
        m.BatchTaskCreateOptions(
            id="t-exit3",
            command_line=py(code),
            environment_settings=[m.EnvironmentSetting(name="MY_SETTING", value="from-task")],
        ),
    )
    task = wait_task(client, job_id, "t-exit3", "completed")
    info = task.execution_info
    assert info.exit_code == 3
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info is not None and info.failure_info.code == "FailureExitCode"
    assert info.retry_count == 0 and info.start_time <= info.end_time
    assert task.node_info is not None and task.node_info.pool_id == emu.pool_id
    assert read_file(client, job_id, "t-exit3", "stdout.txt").splitlines() == [
        f"t-exit3 {job_id}",
        "True None None from-task",
    ]
    assert read_file(client, job_id, "t-exit3", "stderr.txt") == "oops\n"
    props = client.get_task_file_properties(job_id, "t-exit3", "stderr.txt")
    assert props.content_length == 5 and props.is_directory is False
    assert props.url.endswith("/files/stderr.txt")
    names = {f.name: f.is_directory for f in client.list_task_files(job_id, "t-exit3")}
    assert names == {"stdout.txt": False, "stderr.txt": False, "wd": True}


@pytest.mark.timeout(150)
def test_create_tasks_in_collections_and_list_with_paging_and_filter(
    emu: AzureBatchEmulator, client: BatchClient
) -> None:
    job_id = new_job(client, emu.pool_id)
    tasks = [
        m.BatchTaskCreateOptions(id=f"t{i:03d}", command_line="false" if i % 5 == 0 else "true")
        for i in range(150)
    ]
    collections_before = emu.api_calls["create_task_collection"]
    result = client.create_tasks(job_id, tasks)
    assert emu.api_calls["create_task_collection"] - collections_before == 2  # 100 + 50
    assert len(result.result_values) == 150
    assert {r.status for r in result.result_values} == {m.BatchTaskAddStatus.SUCCESS}

    wait_for(
        lambda: client.get_job_task_counts(job_id).task_counts,
        lambda counts: counts.completed == 150,
        timeout_s=120,  # 150 processes on a busy 2-core machine
    )
    lists_before = emu.api_calls["list_tasks"]
    completed = list(client.list_tasks(job_id, filter="state eq 'completed'", max_results=60, select=["id", "state"]))
    assert emu.api_calls["list_tasks"] - lists_before == 3  # pages of 60, 60, 30 via odata.nextLink
    assert sorted(t.id for t in completed) == [f"t{i:03d}" for i in range(150)]
    assert completed[0].command_line is None  # $select left it out
    failed = list(
        client.list_tasks(job_id, filter="state eq 'completed' and executionInfo/result eq 'failure'", max_results=30)
    )
    assert sorted(t.id for t in failed) == [f"t{i:03d}" for i in range(0, 150, 5)]
    assert list(client.list_tasks(job_id, filter="state eq 'active'")) == []


@pytest.mark.timeout(30)
def test_task_counts(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    options = [m.BatchTaskCreateOptions(id=f"ok{i}", command_line="true") for i in range(3)]
    options += [m.BatchTaskCreateOptions(id=f"bad{i}", command_line="false") for i in range(2)]
    # Needs more slots than the node has, so it stays active for ever.
    options.append(m.BatchTaskCreateOptions(id="huge", command_line="true", required_slots=SLOTS + 1))
    client.create_tasks(job_id, options)
    result = wait_for(lambda: client.get_job_task_counts(job_id), lambda r: r.task_counts.completed == 5)
    counts, slot_counts = result.task_counts, result.task_slot_counts
    assert (counts.active, counts.running, counts.completed, counts.succeeded, counts.failed) == (1, 0, 5, 3, 2)
    assert (slot_counts.active, slot_counts.completed) == (SLOTS + 1, 5)


@pytest.mark.timeout(30)
def test_required_slots_are_packed_without_overlap(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    code = (
        "import time\n"
        "start = time.time(); time.sleep(0.4)\n"
        "open('times.txt', 'w').write(f'{start} {time.time()}')\n"
    )
    client.create_tasks(
        job_id,
        [m.BatchTaskCreateOptions(id=f"wide{i}", command_line=py(code), required_slots=SLOTS) for i in range(2)],
    )
    spans = []
    for task_id in ("wide0", "wide1"):
        task = wait_task(client, job_id, task_id, "completed")
        assert task.required_slots == SLOTS and task.execution_info.exit_code == 0
        start, end = map(float, read_file(client, job_id, task_id, "wd/times.txt").split())
        spans.append((start, end))
    (first_start, first_end), (second_start, second_end) = sorted(spans)
    assert first_end <= second_start, f"tasks needing all {SLOTS} slots overlapped: {spans}"


@pytest.mark.timeout(30)
def test_higher_priority_job_runs_first(emu: AzureBatchEmulator, client: BatchClient) -> None:
    blocker = new_job(client, emu.pool_id)
    client.create_task(blocker, m.BatchTaskCreateOptions(
        id="block", command_line=py("import time; time.sleep(1)"), required_slots=SLOTS))
    wait_task(client, blocker, "block", "running")
    low = new_job(client, emu.pool_id, priority=-10)
    high = new_job(client, emu.pool_id, priority=500)
    for job_id in (low, high):  # low is queued first, yet high must start first
        client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line="true", required_slots=SLOTS))
    low_task = wait_task(client, low, "t", "completed")
    high_task = wait_task(client, high, "t", "completed")
    assert high_task.execution_info.start_time <= low_task.execution_info.start_time


@pytest.mark.timeout(30)
def test_max_wall_clock_time_kills_the_task(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    client.create_task(
        job_id,
        m.BatchTaskCreateOptions(
            id="slow",
            command_line=py("import time; time.sleep(60)"),
            constraints=m.BatchTaskConstraints(max_wall_clock_time=dt.timedelta(seconds=1)),
        ),
    )
    task = wait_task(client, job_id, "slow", "completed", timeout_s=20)
    info = task.execution_info
    assert task.constraints.max_wall_clock_time == dt.timedelta(seconds=1)
    assert info.result == m.BatchTaskExecutionResult.FAILURE
    assert info.failure_info is not None and info.failure_info.code == "TaskEnded"
    assert "maximum execution time" in str(info.failure_info.details)
    assert info.exit_code == 128 + 15  # SIGTERM
    assert (info.end_time - info.start_time) < dt.timedelta(seconds=10)


@pytest.mark.timeout(30)
def test_max_task_retry_count_reruns_failed_tasks(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    flaky = (
        "import os, sys\n"
        "attempt = int(os.environ['AZ_BATCH_TASK_RETRY_COUNT'])\n"
        "print('attempt', attempt)\n"
        "sys.exit(0 if attempt >= 2 else 1)\n"
    )
    retry_twice = m.BatchTaskConstraints(max_task_retry_count=2)
    client.create_tasks(
        job_id,
        [
            m.BatchTaskCreateOptions(id="flaky", command_line=py(flaky), constraints=retry_twice),
            m.BatchTaskCreateOptions(id="broken", command_line="false", constraints=retry_twice),
        ],
    )
    flaky_task = wait_task(client, job_id, "flaky", "completed")
    assert flaky_task.execution_info.retry_count == 2
    assert flaky_task.execution_info.exit_code == 0
    assert flaky_task.execution_info.result == m.BatchTaskExecutionResult.SUCCESS
    assert flaky_task.execution_info.failure_info is None
    assert flaky_task.execution_info.last_retry_time is not None
    assert read_file(client, job_id, "flaky", "stdout.txt") == "attempt 2\n"
    broken = wait_task(client, job_id, "broken", "completed")
    assert broken.execution_info.retry_count == 2 and broken.execution_info.exit_code == 1
    assert broken.execution_info.failure_info.code == "FailureExitCode"


@pytest.mark.timeout(30)
def test_terminate_task_kills_it(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    client.create_task(job_id, m.BatchTaskCreateOptions(id="sleeper", command_line="sleep 60"))
    wait_task(client, job_id, "sleeper", "running")
    client.terminate_task(job_id, "sleeper")
    task = wait_task(client, job_id, "sleeper", "completed")
    assert task.execution_info.failure_info is not None
    assert task.execution_info.failure_info.code == "TaskEnded"
    assert task.execution_info.result == m.BatchTaskExecutionResult.FAILURE
    with pytest.raises(ResourceExistsError) as excinfo:
        client.terminate_task(job_id, "sleeper")
    assert excinfo.value.error is not None and excinfo.value.error.code == "TaskCompleted"


@pytest.mark.timeout(30)
def test_terminate_job_with_reason(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    # One at a time: create_tasks would submit them in reverse order.
    client.create_task(job_id, m.BatchTaskCreateOptions(id="running", command_line="sleep 60", required_slots=SLOTS))
    client.create_task(job_id, m.BatchTaskCreateOptions(id="waiting", command_line="true", required_slots=SLOTS))
    wait_task(client, job_id, "running", "running")
    poller = client.begin_terminate_job(
        job_id, BatchJobTerminateOptions(termination_reason="CancelledByTest"), polling_interval=0.05
    )
    poller.result(timeout=15)
    job = client.get_job(job_id)
    assert job.state == m.BatchJobState.COMPLETED
    assert job.execution_info.termination_reason == "CancelledByTest"
    assert job.execution_info.end_time is not None
    killed = client.get_task(job_id, "running")
    assert killed.state == m.BatchTaskState.COMPLETED and killed.execution_info.failure_info.code == "TaskEnded"
    # Azure leaves tasks that never started in the active state, and never runs them.
    time.sleep(0.2)
    assert client.get_task(job_id, "waiting").state == m.BatchTaskState.ACTIVE
    with pytest.raises(ResourceExistsError) as excinfo:
        client.create_task(job_id, m.BatchTaskCreateOptions(id="late", command_line="true"))
    assert excinfo.value.error is not None and excinfo.value.error.code == "JobCompleted"


@pytest.mark.timeout(30)
def test_delete_job_kills_tasks_and_removes_it(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    sleeper = py("import os, time; print(os.getpid(), flush=True); time.sleep(60)")
    client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line=sleeper))
    wait_task(client, job_id, "t", "running")
    pid = int(wait_for(lambda: read_file(client, job_id, "t", "stdout.txt"), lambda text: text.strip() != ""))
    client.begin_delete_job(job_id, polling_interval=0.05).result(timeout=15)
    with pytest.raises(ResourceNotFoundError) as excinfo:
        client.get_job(job_id)
    assert excinfo.value.error is not None and excinfo.value.error.code == "JobNotFound"
    assert not emu.task_dir(job_id, "t").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_task_process_writes_blob_to_azurite_via_env(emu: AzureBatchEmulator, client: BatchClient) -> None:
    from adlfs import AzureBlobFileSystem
    from azure.storage.blob import BlobServiceClient

    job_id = new_job(client, emu.pool_id)
    code = (
        "import os\n"
        "from azure.storage.blob import BlobServiceClient\n"
        "service = BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING'])\n"
        f"blob = service.get_blob_client({emu.container!r}, 'from-task/' + os.environ['AZ_BATCH_TASK_ID'])\n"
        "blob.upload_blob(b'written by a task', overwrite=True)\n"
    )
    env = [m.EnvironmentSetting(name=k, value=v) for k, v in emu.env().items()]
    client.create_task(job_id, m.BatchTaskCreateOptions(id="writer", command_line=py(code), environment_settings=env))
    task = wait_task(client, job_id, "writer", "completed", timeout_s=40)
    assert task.execution_info.exit_code == 0, read_file(client, job_id, "writer", "stderr.txt")
    with BlobServiceClient.from_connection_string(emu.blob_connection_string) as service:
        data = service.get_blob_client(emu.container, "from-task/writer").download_blob().readall()
    assert data == b"written by a task"
    fs = AzureBlobFileSystem(**emu.adlfs_options())
    assert fs.cat(f"{emu.container}/from-task/writer") == b"written by a task"
    assert emu.storage_url == f"az://{emu.container}/jobs"


@pytest.mark.timeout(90)
def test_tls_serves_https_and_tasks_trust_its_ca_through_their_environment(emu: AzureBatchEmulator) -> None:
    """tls=True: Batch and blobs over HTTPS; a task reaches blobs with emu.env() alone (CA variables included)."""
    assert not emu.tls and emu.batch_url.startswith("http://")  # the default is unchanged
    with azure_batch_emulator(slots=1, task_env={}, kill_grace_s=1.0, tls=True) as secure:
        assert secure.batch_url.startswith("https://") and secure.blob_endpoint.startswith("https://")
        assert secure.env()["SSL_CERT_FILE"] == str(secure.ca_path)
        with secure.batch_client() as client:
            job_id = new_job(client, secure.pool_id)
            code = (
                "import os\n"
                "from azure.storage.blob import BlobServiceClient\n"
                "service = BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING'])\n"
                f"service.get_blob_client({secure.container!r}, 'tls').upload_blob(b'over https', overwrite=True)\n"
            )
            env = [m.EnvironmentSetting(name=k, value=v) for k, v in secure.env().items()]
            client.create_task(job_id, m.BatchTaskCreateOptions(id="w", command_line=py(code), environment_settings=env))
            task = wait_task(client, job_id, "w", "completed", timeout_s=60)
            assert task.execution_info.exit_code == 0, read_file(client, job_id, "w", "stderr.txt")
        from adlfs import AzureBlobFileSystem

        fs = AzureBlobFileSystem(**secure.adlfs_options())  # this process trusts the CA while the emulator runs
        assert fs.cat(f"{secure.container}/tls") == b"over https"


@pytest.mark.timeout(30)
def test_python_in_command_line_is_this_interpreter(emu: AzureBatchEmulator, client: BatchClient) -> None:
    job_id = new_job(client, emu.pool_id)
    client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line=py("import sys; print(sys.executable)")))
    wait_task(client, job_id, "t", "completed")
    assert read_file(client, job_id, "t", "stdout.txt").strip() == sys.executable


def test_repr_names_the_endpoints_and_no_key(emu: AzureBatchEmulator) -> None:
    text = repr(emu)
    assert text.startswith(f"AzureBatchEmulator(batch_url={emu.batch_url!r}, blob_endpoint={emu.blob_endpoint!r}")
    assert f"pool_id={emu.pool_id!r}" in text and f"slots={emu.slots}" in text
    assert emu.account_key not in text and emu.storage_account_key not in text


# -- task dependencies --------------------------------------------------------------


@pytest.mark.timeout(30)
def test_dependencies_need_a_job_created_with_uses_task_dependencies(
    emu: AzureBatchEmulator, client: BatchClient
) -> None:
    job_id = new_job(client, emu.pool_id)
    assert client.get_job(job_id).uses_task_dependencies is False
    client.create_task(job_id, m.BatchTaskCreateOptions(id="1", command_line="true"))
    dependent = m.BatchTaskCreateOptions(
        id="2", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["1"])
    )
    with pytest.raises(ResourceExistsError) as excinfo:  # 409, as Azure answers
        client.create_task(job_id, dependent)
    assert excinfo.value.error is not None and excinfo.value.error.code == "TaskDependenciesNotSpecifiedOnJob"
    with pytest.raises(Exception) as update:  # it cannot be switched on later
        client.update_job(job_id, m.BatchJobUpdateOptions(uses_task_dependencies=True))  # type: ignore[call-arg]
    assert "usesTaskDependencies" in str(update.value) or "uses_task_dependencies" in str(update.value)


@pytest.mark.timeout(60)
def test_dependents_wait_for_task_ids_and_ranges_and_failures_block_them(
    emu: AzureBatchEmulator, client: BatchClient, tmp_path: Any
) -> None:
    job_id = new_job(client, emu.pool_id, uses_task_dependencies=True)
    assert client.get_job(job_id).uses_task_dependencies is True
    gate = tmp_path / "gate"
    wait = py(f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)")
    client.create_tasks(
        job_id,
        [
            m.BatchTaskCreateOptions(id="10", command_line=wait),
            m.BatchTaskCreateOptions(id="11", command_line="true"),
            m.BatchTaskCreateOptions(
                id="after-range", command_line="true",
                depends_on=m.BatchTaskDependencies(task_id_ranges=[m.BatchTaskIdRange(start=10, end=11)]),
            ),
            m.BatchTaskCreateOptions(
                id="after-id", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["after-range"])
            ),
            m.BatchTaskCreateOptions(id="bad", command_line="false"),
            m.BatchTaskCreateOptions(
                id="blocked", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["bad"])
            ),
        ],
    )
    wait_task(client, job_id, "11", "completed")
    wait_task(client, job_id, "bad", "completed")
    time.sleep(0.5)  # a scheduling pass or more: nothing may start them meanwhile
    for held in ("after-range", "after-id", "blocked"):
        assert client.get_task(job_id, held).state == m.BatchTaskState.ACTIVE
    gate.touch()
    wait_task(client, job_id, "after-id", "completed")
    assert client.get_task(job_id, "after-range").execution_info.result == m.BatchTaskExecutionResult.SUCCESS
    assert client.get_task(job_id, "after-id").depends_on.task_ids == ["after-range"]
    # A failed task blocks its dependents for good (dependencyAction "block" by default).
    assert client.get_task(job_id, "blocked").state == m.BatchTaskState.ACTIVE


@pytest.mark.timeout(60)
def test_dependency_action_satisfy_lets_dependents_of_a_failure_run(
    emu: AzureBatchEmulator, client: BatchClient
) -> None:
    job_id = new_job(client, emu.pool_id, uses_task_dependencies=True)
    satisfy = m.ExitOptions(dependency_action=m.DependencyAction.SATISFY)
    block = m.ExitOptions(dependency_action=m.DependencyAction.BLOCK)
    client.create_tasks(
        job_id,
        [
            m.BatchTaskCreateOptions(
                id="fails", command_line="false", exit_conditions=m.ExitConditions(default=satisfy)
            ),
            m.BatchTaskCreateOptions(
                id="runs-anyway", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["fails"])
            ),
            m.BatchTaskCreateOptions(
                id="exit-3", command_line=py("raise SystemExit(3)"),
                exit_conditions=m.ExitConditions(
                    exit_codes=[m.ExitCodeMapping(code=3, exit_options=block)], default=satisfy
                ),
            ),
            m.BatchTaskCreateOptions(
                id="held", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["exit-3"])
            ),
        ],
    )
    task = wait_task(client, job_id, "runs-anyway", "completed")
    assert task.execution_info.result == m.BatchTaskExecutionResult.SUCCESS
    wait_task(client, job_id, "exit-3", "completed")
    time.sleep(0.5)
    assert client.get_task(job_id, "held").state == m.BatchTaskState.ACTIVE  # exit code 3 maps to block
    on_plain_job = new_job(client, emu.pool_id)
    with pytest.raises(ResourceExistsError) as excinfo:
        client.create_task(
            on_plain_job,
            m.BatchTaskCreateOptions(id="x", command_line="true", exit_conditions=m.ExitConditions(default=satisfy)),
        )
    assert excinfo.value.error is not None and excinfo.value.error.code == "TaskDependenciesNotSpecifiedOnJob"


@pytest.mark.timeout(60)
def test_a_failed_task_terminates_a_job_that_performs_exit_option_job_actions(
    emu: AzureBatchEmulator, client: BatchClient
) -> None:
    none = m.ExitOptions(job_action=m.BatchJobActionKind.NONE)
    plain = new_job(client, emu.pool_id)
    with pytest.raises(HttpResponseError) as refused:  # jobAction needs onTaskFailure performExitOptionsJobAction
        client.create_task(
            plain, m.BatchTaskCreateOptions(id="x", command_line="true", exit_conditions=m.ExitConditions(default=none))
        )
    assert refused.value.status_code == 400 and "jobAction" in str(refused.value)
    job_id = new_job(
        client,
        emu.pool_id,
        uses_task_dependencies=True,
        task_failure_mode=m.BatchTaskFailureMode.PERFORM_EXIT_OPTIONS_JOB_ACTION,
    )
    client.create_tasks(
        job_id,
        [
            m.BatchTaskCreateOptions(
                id="tolerated", command_line="false", exit_conditions=m.ExitConditions(default=none)
            ),
            m.BatchTaskCreateOptions(id="ok", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["tolerated"])),
        ],
    )
    wait_task(client, job_id, "tolerated", "completed")
    assert client.get_job(job_id).state == m.BatchJobState.ACTIVE  # jobAction none: the job goes on
    client.create_tasks(
        job_id,
        [
            m.BatchTaskCreateOptions(id="fails", command_line="false"),  # default jobAction: terminate
            m.BatchTaskCreateOptions(id="never", command_line="true", depends_on=m.BatchTaskDependencies(task_ids=["fails"])),
        ],
    )
    deadline = time.monotonic() + 15
    while client.get_job(job_id).state != m.BatchJobState.COMPLETED and time.monotonic() < deadline:
        time.sleep(0.1)
    job = client.get_job(job_id)
    assert job.state == m.BatchJobState.COMPLETED and job.execution_info.termination_reason == "TaskFailed"
    assert client.get_task(job_id, "never").state == m.BatchTaskState.ACTIVE  # never scheduled


@pytest.mark.timeout(60)
def test_python_tasks_are_forked_by_one_warm_server(emu: AzureBatchEmulator, client: BatchClient) -> None:
    """Each task is a process of its own, forked by one server: no interpreter start-up per task."""
    job_id = new_job(client, emu.pool_id)
    before = emu.forked_processes
    client.create_tasks(
        job_id, [m.BatchTaskCreateOptions(id=f"t{i}", command_line=py("import os; print(os.getppid())")) for i in range(4)]
    )
    for i in range(4):
        assert wait_task(client, job_id, f"t{i}", "completed", timeout_s=30).execution_info.exit_code == 0
    assert emu.forked_processes - before == 4
    parents = {read_file(client, job_id, f"t{i}", "stdout.txt").strip() for i in range(4)}
    assert parents == {str(emu.fork_server_pid)}


@pytest.mark.timeout(300)
def test_10000_tasks_cost_no_thread_or_process_per_task(emu: AzureBatchEmulator, client: BatchClient) -> None:
    import threading

    import psutil

    job_id = new_job(client, emu.pool_id)
    threads_before = threading.active_count()
    sleeper = py("import time; time.sleep(120)")
    client.create_tasks(job_id, [m.BatchTaskCreateOptions(id=f"t{i:05d}", command_line=sleeper) for i in range(10_000)])
    counts = wait_for(
        lambda: client.get_job_task_counts(job_id).task_counts, lambda c: c.running == SLOTS, timeout_s=120
    )
    assert counts.active == 10_000 - SLOTS
    assert threading.active_count() <= threads_before + 4  # HTTP handler threads come and go
    assert emu.fork_server_pid is not None
    # The running tasks (one per slot) are the fork server's; nothing else was started.
    assert len(psutil.Process(emu.fork_server_pid).children()) == SLOTS
    client.begin_terminate_job(job_id, BatchJobTerminateOptions(termination_reason="done"), polling_interval=0.05).result()
    wait_for(lambda: client.get_job(job_id), lambda j: j.state == m.BatchJobState.COMPLETED, timeout_s=60)
