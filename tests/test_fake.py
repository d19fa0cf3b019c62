"""FakeBatchExecutor (cloudexec.testing.fake): both contract suites, plus what only the fake does.

This file is the whole test of a provider module: one class per contract
suite, and the few things the provider does differently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import jobs
from cloudexec.errors import JobFailedError
from cloudexec.testing.fake import FakeBatchExecutor, FakeBatchService, FakeJobStatus
from contract import ExecutorContract, executor_factory
from provider_contract import ProviderContract


@pytest.fixture
def make_executor() -> Iterator[Any]:
    io_url = f"memory://fake-tests/{time.time_ns()}"  # shared by the executors of one test, for attach

    def build(**kwargs: Any) -> FakeBatchExecutor:
        kwargs.setdefault("max_workers", 4)
        return FakeBatchExecutor(io_url, **kwargs)

    yield from executor_factory(build, shutdown_limit_s=10)


class TestFakeContract(ExecutorContract):
    """The executor contract, on the in-process fake service."""

    memory_limit = None  # threads share one process: memory is not limited
    isolated_processes = False


class TestFakeProviderContract(ProviderContract):
    """The provider contract, on the in-process fake service."""


@pytest.mark.timeout(30)
def test_a_job_that_ends_without_a_result() -> None:
    service = FakeBatchService(runner=lambda job_url, index, environ: 3)  # "exits" 3, writes nothing
    with FakeBatchExecutor(service=service) as ex:
        fut = ex.submit(jobs.double, 1)
        with pytest.raises(JobFailedError, match="exit code: 3") as info:
            fut.result(timeout=20)
        assert info.value.job_id == fut.job_id and fut.job_status is FakeJobStatus.FAILED


@pytest.mark.timeout(30)
def test_own_service_counts_calls_and_expires_jobs() -> None:
    service = FakeBatchService(slots=2)
    with FakeBatchExecutor(service=service, max_workers=10) as ex:
        futures = [ex.submit(jobs.double, i) for i in range(10)]
        assert [f.result(timeout=20) for f in futures] == [2 * i for i in range(10)]
        assert service.api_calls["submit"] == 10
        assert service.api_calls["describe"] < 10 * 5  # bulk polls, not one per job
        assert service.expire_job(futures[0].provider_job_id or "")
        with FakeBatchExecutor(ex.io_url, service=service) as other:
            again = other.attach(futures[0].job_id)
            assert again.result(timeout=20) == 0 and again.job_status is None


def test_bad_slots_are_refused() -> None:
    with pytest.raises(ValueError, match="slots must be a positive int; got 0"):
        FakeBatchService(slots=0)


@pytest.mark.timeout(60)
def test_more_dependencies_than_the_provider_allows_are_refused_at_submit(
    make_executor: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from cloudexec.testing.fake import FakeBatchProvider

    monkeypatch.setattr(FakeBatchProvider, "max_dependencies", 2)
    ex = make_executor()
    gate = str(tmp_path / "gate")
    ups = [ex.submit(jobs.wait_for_file, gate, i) for i in range(3)]
    try:
        with pytest.raises(ValueError, match="wait for 3 jobs.*at most 2 dependencies.*Restructure"):
            ex.submit(jobs.total, ups)
        with pytest.raises(ValueError, match="array job .* wait for 3 jobs"):
            ex.submit_map(jobs.double, ups)  # an array waits as a whole: three upstream jobs
        two = ex.submit(jobs.total, ups[:2])  # within the limit
    finally:
        open(gate, "w").close()
    assert two.result(timeout=30) == 1


def test_sequential_arrays_refused_where_the_provider_cannot_order_children(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudexec.testing.fake import FakeBatchProvider

    monkeypatch.setattr(FakeBatchProvider, "dependency_kinds", frozenset({"job"}))
    with FakeBatchExecutor() as ex:
        with pytest.raises(TypeError, match="one after another"):
            ex.submit_map(jobs.double, range(3), sequential=True)


def test_a_refused_storage_write_fails_the_submit_naming_the_job_and_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudexec.errors import SubmissionError

    with FakeBatchExecutor() as ex:
        def refuse(self: Any, items: Any) -> None:
            raise PermissionError("403 Forbidden: the token expired")

        monkeypatch.setattr(type(ex._core.store), "write_many", refuse)
        fut = ex.submit(jobs.double, 2)
        error = fut.exception(timeout=30)
        assert isinstance(error, SubmissionError), error
        assert fut.job_id in str(error) and "403" in str(error) and "credentials" in str(error)
        monkeypatch.undo()
        assert ex.submit(jobs.double, 2).result(timeout=30) == 4  # the executor goes on


@pytest.mark.timeout(60)
def test_a_result_read_while_the_service_cannot_be_asked_still_gets_the_jobs_final_status(tmp_path: Any) -> None:
    # Describe fails (an outage) just as the result is stored: the future is
    # resolved from storage, and its status, read right after result(), waits
    # for the service to say how the job ended, as after an early delivery.
    import threading

    from contract import wait_until

    gate = str(tmp_path / "gate")
    with FakeBatchExecutor(service=FakeBatchService(), poll_interval_s=(0.01, 0.05)) as ex:
        provider = ex._core.provider
        describe = provider.describe
        outage = threading.Event()

        def failing_describe(refs: Any) -> Any:
            if outage.is_set():
                raise ConnectionError("the service cannot be reached")
            return describe(refs)

        provider.describe = failing_describe  # type: ignore[method-assign]
        fut = ex.submit(jobs.wait_for_file, gate, 7)
        wait_until(lambda: fut.job_status == FakeJobStatus.RUNNING, 30)
        outage.set()
        open(gate, "w").close()
        assert fut.result(timeout=30) == 7
        threading.Timer(0.5, outage.clear).start()
        assert fut.job_status is FakeJobStatus.SUCCEEDED and fut.job_exit_code == 0
