"""Client memory of big maps, counted: objects alive per child, values let go of, one copy of results.

Counts, not timings or bytes (those live in benchmarks/bench_local.py): a map
makes no `Future` (nor a ``Condition``) per child unless one is asked for, and
drops each value once yielded, as the stdlib's ``map`` does.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

import jobs
from cloudexec import LocalBatchExecutor, _payload
from cloudexec._base import ArrayFuture, BatchFuture
from cloudexec.testing.fake import FakeBatchExecutor

TIMEOUT_S = 120


def _alive(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def _array_of(results: Any) -> ArrayFuture[Any]:
    """The array job behind a map's iterator (other tests' arrays may still be alive)."""
    array: ArrayFuture[Any] = results.gi_frame.f_locals["array"]
    return array


def _conditions() -> int:
    # Not those of Events: the fake service's own per-child Event is the service's, not the client's.
    return _alive(threading.Condition) - _alive(threading.Event)


@pytest.fixture
def fake() -> Iterator[FakeBatchExecutor]:
    with FakeBatchExecutor(f"memory://memory-tests/{time.time_ns()}", max_workers=4) as ex:
        yield ex


@pytest.mark.timeout(TIMEOUT_S)
def test_a_map_makes_no_future_nor_condition_per_child(fake: FakeBatchExecutor) -> None:
    n = 3_000
    futures_before, conditions_before = _alive(Future), _conditions()
    results = fake.map(jobs.double, range(n), chunksize=1)
    seen = 0
    for value in results:
        assert value == 2 * seen
        seen += 1
        if seen == n // 2:
            # Halfway: one array future (and the fake service's own few), not thousands.
            assert _alive(BatchFuture) - futures_before <= 2
            assert _alive(Future) - futures_before <= 2
            assert _conditions() - conditions_before <= 10
    assert seen == n


@pytest.mark.timeout(TIMEOUT_S)
def test_a_map_on_the_local_provider_keeps_no_future_per_child(io_root: str) -> None:
    n = 1_500
    with LocalBatchExecutor(io_root, max_workers=2) as ex:
        before = _alive(Future)
        results = ex.map(jobs.double, range(n), chunksize=1)
        array = _array_of(results)
        for i, value in enumerate(results):
            assert value == 2 * i
            if i == n // 2:
                assert _alive(Future) - before <= 2
        # Nothing left once consumed: every value was taken out as it was yielded.
        assert array._record.children.all_done() and not array._record.children.outcomes


@pytest.mark.timeout(TIMEOUT_S)
def test_the_local_scheduler_keeps_no_record_per_child_that_ran_as_usual(io_root: str, tmp_path: Any) -> None:
    # The local "batch service" lives in the client, so its per-child state is
    # client memory: a child queued at once that succeeded at its first
    # attempt is kept as its worker's pid, not as a record of its own.
    from cloudexec.providers.local import LocalProvider, _Task

    n = 600
    with LocalBatchExecutor(io_root, max_workers=2) as ex:
        before = _alive(_Task)
        results = ex.map(jobs.double, range(n), chunksize=1)
        array = _array_of(results)
        for i, value in enumerate(results):
            assert value == 2 * i
            if i == n // 2:
                assert _alive(_Task) - before <= 2 * 5  # the children in the 2 workers' pipes
        assert _alive(_Task) - before == 0
        # The unusual children keep their records: a retried one, a failed one.
        flaky = ex.with_settings(retries=1).submit_map(
            jobs.flaky, [str(tmp_path / f"count-{i}") for i in range(3)], [1, 0, 0], chunksize=1
        )
        assert flaky.result(timeout=60) == [2, 1, 1]
        assert [c.job_status_reason for c in flaky.children] == [None, None, None]
        assert flaky.children[0].properties()["attempts"] == 2
        assert flaky.children[1].properties()["attempts"] == 1
        assert flaky.children[0].properties()["status_history"] == [
            "Submitted", "Runnable", "Running", "Runnable", "Running", "Succeeded"
        ]
        assert flaky.children[1].properties()["status_history"] == ["Submitted", "Runnable", "Running", "Succeeded"]
        provider = ex._core.provider
        assert isinstance(provider, LocalProvider)
        job = provider._job(array._record.ref)
        assert job is not None and not any(isinstance(t, _Task) for t in job.tasks)
        retried = provider._job(flaky._record.ref)
        assert retried is not None and [isinstance(t, _Task) for t in retried.tasks] == [True, False, False]


@pytest.mark.timeout(TIMEOUT_S)
def test_children_are_made_on_demand_and_share_the_arrays_results(fake: FakeBatchExecutor) -> None:
    arr = fake.submit_map(jobs.make_dummy, range(20), chunksize=4)
    values = arr.result(timeout=60)
    assert not arr._record.children.futures  # nobody asked for a child yet
    child = fake.attach(f"{arr.job_id}[2]")
    assert list(arr._record.children.futures) == [2]  # only the one asked for
    assert child.done() and child is arr.children[2]
    # The child's values are the array's own objects: the results are not kept twice.
    assert all(a is b for a, b in zip(child.result(), values[8:12]))
    assert [c.index for c in arr.children] == list(range(5))


@pytest.mark.timeout(TIMEOUT_S)
def test_a_map_lets_go_of_pending_values_when_abandoned(fake: FakeBatchExecutor) -> None:
    results = fake.map(jobs.make_dummy, range(40), chunksize=1)
    first = next(results)
    array = _array_of(results)
    ref = weakref.ref(first)
    del first
    results.close()  # abandoned: the rest is cancelled
    gc.collect()
    assert ref() is None
    assert array.cancelled() or array.done()  # (done: every child had ended before the close)


def test_inputs_buffer_has_the_table_layout() -> None:
    chunks = [b"a", b"", b"ccc", bytes(range(256))]
    packed = _payload.pack_inputs(chunks)
    for i, chunk in enumerate(chunks):
        assert _payload.read_input_slice(lambda lo, hi: packed[lo:hi], i) == chunk
    buffer = _payload.InputsBuffer(1)
    with pytest.raises(ValueError, match="got 0"):
        buffer.getvalue()
    buffer.add(b"x")
    with pytest.raises(ValueError, match="one more"):
        buffer.add(b"y")


def test_an_abandoned_map_cancels_children_never_made(fake: FakeBatchExecutor) -> None:
    results: Any = fake.map(jobs.slow_double, range(30), [0.2] * 30, chunksize=1)
    assert next(results) == 0
    array = _array_of(results)
    results.close()
    children = array._record.children
    assert children.all_done() and not children.futures
    # A child asked for afterwards reads as the others ended: cancelled, or finished before the cancel.
    assert all(c.done() for c in array.children)
    assert any(c.cancelled() for c in array.children)


@pytest.mark.timeout(TIMEOUT_S)
def test_submit_copies_a_big_argument_once(io_root: str) -> None:
    import tracemalloc

    size = 8 * 2**20
    argument = bytes(size)
    with LocalBatchExecutor(io_root, max_workers=1) as ex:
        assert ex.submit(len, b"warm").result(timeout=60) == 4  # imports and threads before measuring
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            future = ex.submit(len, argument)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert future.result(timeout=60) == size
    # One copy (the pickle, signed in place) and the buffer's growth margin; not two.
    assert peak < 1.3 * size, peak / size
