"""Azure Batch at scale: the account's active-job quota, the shared job, add-task-collection limits.

One emulator whose Batch account allows three active jobs serves the module;
everything goes through the real azure-batch SDK and adlfs on 127.0.0.1.
Counts are asserted, never timings.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("azure.batch")
pytest.importorskip("adlfs")

import jobs  # noqa: E402
from azure.batch import models as m  # noqa: E402
from azure.core.exceptions import HttpResponseError, ResourceExistsError  # noqa: E402

from cloudexec.providers.azure import QUOTA_REACHED, AzureBatchExecutor  # noqa: E402
from cloudexec.testing.azure import AzureBatchEmulator, azure_batch_emulator  # noqa: E402
from contract import CountingClient, count_polls, executor_factory, wait_until  # noqa: E402

pytestmark = pytest.mark.azure

QUOTA = 3
FAST = {"poll_interval_s": (0.05, 0.5), "lro_polling_interval_s": 0.1}


@pytest.fixture(scope="module")
def emu() -> Iterator[AzureBatchEmulator]:
    with azure_batch_emulator(slots=2, kill_grace_s=1.0, active_job_quota=QUOTA) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def batch(emu: AzureBatchEmulator) -> Iterator[Any]:
    with emu.batch_client(retry_total=0) as client:
        yield client


@pytest.fixture
def make_executor(emu: AzureBatchEmulator) -> Iterator[Any]:
    def build(**kwargs: Any) -> AzureBatchExecutor:
        return emu.executor(**{**FAST, **kwargs})

    yield from executor_factory(build, shutdown_limit_s=30)


def _state(batch: Any, job_id: str) -> str:
    state = batch.get_job(job_id).state
    return str(getattr(state, "value", state))


def _job_ids(batch: Any) -> set[str]:
    return {job.id for job in batch.list_jobs(select=["id"])}


def _wait_quota_free(batch: Any) -> None:
    """Earlier tests' jobs leave the quota once they completed."""
    wait_until(
        lambda: not list(batch.list_jobs(filter="state ne 'completed' and state ne 'deleting'", select=["id"])), 30
    )


# -- the emulator -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_emulator_refuses_a_job_beyond_the_quota_with_azures_code(emu: AzureBatchEmulator, batch: Any) -> None:
    _wait_quota_free(batch)
    made = []
    for _ in range(QUOTA):
        job_id = f"quota-{uuid.uuid4().hex[:8]}"
        batch.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=emu.pool_id)))
        made.append(job_id)
    with pytest.raises(ResourceExistsError) as caught:  # azure-core's type for a 409
        batch.create_job(m.BatchJobCreateOptions(id="quota-over", pool_info=m.BatchPoolInfo(pool_id=emu.pool_id)))
    assert caught.value.status_code == 409
    assert caught.value.error is not None and caught.value.error.code == QUOTA_REACHED
    assert "quota of active jobs" in str(caught.value)
    # A completed job no longer counts.
    complete = m.BatchJobUpdateOptions(all_tasks_complete_mode=m.BatchAllTasksCompleteMode.TERMINATE_JOB)
    batch.update_job(made[0], complete)
    wait_until(lambda: _state(batch, made[0]) == "completed", 10)
    batch.create_job(m.BatchJobCreateOptions(id="quota-after", pool_info=m.BatchPoolInfo(pool_id=emu.pool_id)))
    for job_id in [*made[1:], "quota-after"]:
        batch.update_job(job_id, complete)


@pytest.mark.timeout(60)
def test_emulator_refuses_more_than_100_tasks_or_1_mib_per_collection(emu: AzureBatchEmulator, batch: Any) -> None:
    _wait_quota_free(batch)
    job_id = f"limits-{uuid.uuid4().hex[:8]}"
    # On no pool: the tasks are accepted but never run.
    batch.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id="no-such-pool")))
    try:
        many = [m.BatchTaskCreateOptions(id=f"t{i}", command_line="true") for i in range(101)]
        with pytest.raises(HttpResponseError) as too_many:
            batch.create_task_collection(job_id, m.BatchTaskGroup(task_values=many))
        assert too_many.value.status_code == 400
        assert too_many.value.error is not None and too_many.value.error.code == "InvalidPropertyValue"
        big = [
            m.BatchTaskCreateOptions(
                id=f"b{i}",
                command_line="true",
                environment_settings=[m.EnvironmentSetting(name="PAD", value="x" * 20_000)],
            )
            for i in range(60)
        ]
        with pytest.raises(HttpResponseError) as too_large:
            batch.create_task_collection(job_id, m.BatchTaskGroup(task_values=big))
        assert too_large.value.status_code == 413
        assert too_large.value.error is not None and too_large.value.error.code == "RequestBodyTooLarge"
        assert not list(batch.list_tasks(job_id))  # refused whole
    finally:
        batch.begin_delete_job(job_id, polling_interval=0.1)


# -- the provider -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_submits_beyond_the_quota_wait_and_all_complete(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any
) -> None:
    _wait_quota_free(batch)
    before = _job_ids(batch)
    ex = make_executor()
    futures = [ex.submit(jobs.nap, 0.3) for _ in range(10)]
    # The last ones wait for the quota, and say so.
    reason = wait_until(lambda: futures[-1].job_status_reason, 30)
    assert reason.startswith("waiting for Azure Batch active-job quota (")
    assert reason.endswith(f"({QUOTA} active)")
    assert not futures[-1].done() and futures[-1].provider_job_id is None
    for fut in futures:
        fut.result(timeout=90)  # none fails
    created = _job_ids(batch) - before
    assert created == {f.job_id for f in futures}  # one Azure job each, each created once
    assert emu.api_calls["create_job"] >= 10


@pytest.mark.timeout(120)
def test_shared_job_runs_many_submits_as_tasks_of_one_job(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any
) -> None:
    _wait_quota_free(batch)
    before = _job_ids(batch)
    ex = make_executor(shared_job=True)
    polls = count_polls(ex)
    calls = emu.api_calls
    futures = [ex.submit(jobs.double, i) for i in range(10)]
    assert [f.result(timeout=90) for f in futures] == [2 * i for i in range(10)]
    after = emu.api_calls
    # A poll of the ten tasks is ONE list of the shared job's tasks that changed:
    # no list of jobs, no GET per task.
    assert after["create_job"] - calls["create_job"] == 1
    assert 0 < after["list_tasks"] - calls["list_tasks"] <= polls[0]
    assert after["get_task"] == calls["get_task"] and after["list_jobs"] == calls["list_jobs"]
    created = _job_ids(batch) - before
    assert len(created) == 1  # not 10 jobs: one quota slot
    (shared,) = created
    assert shared.startswith("cloudexec-shared-")
    assert {t.id for t in batch.list_tasks(shared)} == {f.job_id for f in futures}
    first = futures[0]
    assert first.provider_task_id == first.job_id and first.provider_job_id == shared
    assert first.properties()["job_status"].value == "Succeeded"
    # A map still gets an Azure job of its own, beside the shared one.
    assert list(ex.map(jobs.double, [1, 2])) == [2, 4]
    assert len(_job_ids(batch) - before) == 2
    ex.shutdown(wait=True)
    # Once the executor is shut down the shared job completes and leaves the quota.
    wait_until(lambda: _state(batch, shared) == "completed", 30)


@pytest.mark.timeout(120)
def test_shared_job_completes_after_an_exit_without_shutdown(make_executor: Any, batch: Any) -> None:
    _wait_quota_free(batch)
    ex = make_executor(shared_job=True)
    fut = ex.submit(jobs.nap, 1.0)
    wait_until(lambda: fut._record.ref is not None, 30)
    shared = fut.provider_job_id
    # What the interpreter's exit runs for an executor never shut down (the
    # jobs handed over go on): the shared job must not stay active, holding a
    # quota slot, for ever.
    ex._core.manager.flush_at_exit()
    assert fut.result(timeout=60) is not None  # its task was not cut short
    wait_until(lambda: _state(batch, shared) == "completed", 30)


@pytest.mark.timeout(120)
def test_shared_job_refuses_a_priority_per_submit(make_executor: Any, batch: Any) -> None:
    from cloudexec.errors import SubmissionError

    _wait_quota_free(batch)
    ex = make_executor(shared_job=True)
    with pytest.raises(SubmissionError, match="shared_job=True"):
        ex.with_settings(priority=0.5).submit(jobs.double, 1).result(timeout=60)


@pytest.mark.timeout(120)
def test_task_collections_hold_at_most_100_tasks_and_split_below_1_mib(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wait_quota_free(batch)
    ex = make_executor()
    provider = ex.provider
    plain = provider.task_options

    def padded(spec: Any, index: int | None, **kwargs: Any) -> Any:
        # About 15 kB per task: 100 of them are above Azure's 1 MiB per request.
        pad = [m.EnvironmentSetting(name="PAD", value="x" * 15_000)]
        return plain(spec, index, **{**kwargs, "environment": pad})

    before = emu.api_calls["create_task_collection"]
    arr = ex.submit_map(jobs.double, range(150))
    wait_until(lambda: arr._record.ref is not None, 60)
    # 150 tasks: two requests (100 + 50), each within the emulator's limits.
    assert emu.api_calls["create_task_collection"] - before == 2
    assert len(list(batch.list_tasks(arr.job_id, select=["id"]))) == 150
    arr.cancel()

    monkeypatch.setattr(provider, "task_options", padded)
    before = emu.api_calls["create_task_collection"]
    big = ex.submit_map(jobs.double, range(100))
    wait_until(lambda: big._record.ref is not None, 60)
    # One request refused as RequestBodyTooLarge, then two halves of 50.
    assert emu.api_calls["create_task_collection"] - before == 3
    assert len(list(batch.list_tasks(big.job_id, select=["id"]))) == 100
    big.cancel()


@pytest.mark.timeout(120)
def test_a_polled_map_costs_its_task_counts_and_the_job_only_when_they_stand_still(
    make_executor: Any, emu: AzureBatchEmulator, batch: Any
) -> None:
    _wait_quota_free(batch)
    ex = make_executor()
    polls = count_polls(ex)
    # This executor's calls only: jobs of earlier tests may still be polled by theirs.
    counting = ex.provider.client = CountingClient(ex.provider.client)
    assert list(ex.map(jobs.double, range(8))) == [2 * i for i in range(8)]
    ex.shutdown(wait=True)
    calls = collections.Counter(counting.calls)
    counts, job_gets = calls["get_job_task_counts"], calls["get_job"]
    assert 0 < counts <= polls[0]  # at most one taskcounts per poll ...
    assert counts + job_gets <= polls[0]  # ... or the job instead, on the poll after the counts stood still
    assert calls["list_tasks"] == 0 and calls["list_jobs"] == 0
