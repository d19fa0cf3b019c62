"""The executor contract: what every cloudexec executor must do, whatever the provider.

Written once against "an executor" and run per provider by a small subclass
in each provider's test file (the CPython mixin / fsspec abstract-suite
pattern). A subclass provides the fixture ``make_executor(**kwargs)`` that
returns a fresh executor of its provider (``max_workers`` and job settings
pass through). Class attributes state the real differences between providers
(how a timeout is expressed and reported, whether a memory limit is enforced);
everything else is asserted the same way for every provider.

Every test that waits has a timeout; teardown checks ``shutdown()`` returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import gc
import os
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import jobs
from cloudexec import ArrayFuture, BatchExecutor, BatchFuture, Phase
from cloudexec.errors import JobFailedError, JobUnreachableError, PayloadError, RemoteTraceback

MakeExecutor = Callable[..., BatchExecutor]


def executor_factory(build: Callable[..., BatchExecutor], shutdown_limit_s: float = 60.0) -> Iterator[MakeExecutor]:
    """Body of a provider's ``make_executor`` fixture.

    Yields a function that builds executors with ``build(**kwargs)``; at
    teardown it shuts each down and checks ``shutdown()`` returned promptly.
    """
    made: list[BatchExecutor] = []

    def make(**kwargs: Any) -> BatchExecutor:
        ex = build(**kwargs)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        started = time.monotonic()
        ex.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - started < shutdown_limit_s, f"{ex!r}: shutdown() did not return promptly"


class CountingClient:
    """Wraps an SDK client and counts the calls made through it (``calls``: method names, in order).

    Unlike a service's own counts, it sees only the calls of the executor it is given
    to, not those of other executors on the same (emulated) account.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def count_polls(ex: BatchExecutor) -> list[int]:
    """Count the manager's polls of ``ex`` (each is one bulk ``provider.describe``) in ``[0]``."""
    polls = [0]
    provider: Any = ex.provider
    describe = provider.describe

    def counted(refs: Any) -> Any:
        polls[0] += 1
        return describe(refs)

    provider.describe = counted
    return polls


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@dataclasses.dataclass(frozen=True)
class Crash:
    """One row of the crash matrix: a call, and how its future must end."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    error: type[BaseException]
    match: str = ""  # in the message (errors other than JobFailedError)
    output: str = ""  # a line the job printed before it died, in the error's log tail
    needs_process: bool = False  # the call ends its process


CRASHES = [
    Crash("segfault", jobs.segfault, (), JobFailedError, output="about to segfault", needs_process=True),
    Crash("os._exit", jobs.exit_hard_after_output, (3,), JobFailedError, output="about to os._exit",
          needs_process=True),
    Crash("sys.exit", jobs.exit_soft, (4,), JobFailedError, output="about to sys.exit"),
    Crash("raises", jobs.fail_on, (3,), jobs.Boom, match="item 3 is bad"),
    Crash("argument-unpickle", jobs.identity, (jobs.LoadsNowhere(),), PayloadError,
          match="cannot be unpickled (LoadsNowhere)"),
    Crash("result-pickle", jobs.unpicklable_result, (), PayloadError, match="cannot be pickled"),
    Crash("result-unpickle", jobs.unloadable_result, (), PayloadError, match="cannot be unpickled (LoadsNowhere)"),
    Crash("memory", jobs.hog, (300,), JobFailedError, needs_process=True),
    Crash("timeout", jobs.nap, (30,), JobFailedError),
    Crash("cancel", jobs.nap, (60,), cf.CancelledError),
]


class ExecutorContract:
    """Mixin of contract tests. See the module docstring."""

    #: How long a started job may take to be seen running and to be cancelled.
    cancel_timeout_s = 30.0
    #: A ``timeout`` setting (seconds) the provider accepts that ends a 30 s nap early.
    timeout_setting: float = 1
    #: Exit code the provider reports for an attempt killed at its timeout.
    timeout_exit_code: int = 137
    #: A ``memory`` setting small enough for a 300 MiB allocation to be killed;
    #: ``None`` where the provider enforces no per-job memory limit (Azure Batch).
    memory_limit: str | int | None = "80 MiB"
    #: The provider's status reason for a job killed for its memory.
    oom_reason = "OutOfMemoryError: Container killed due to memory usage"
    #: Whether each job runs in a process of its own. ``False`` (the in-process
    #: fake) leaves out the calls that end their process, which would end the tests.
    isolated_processes = True
    #: Whether the batch service holds a job for the jobs whose futures it was
    #: given (``False``: the executor keeps it in the client until they ended).
    holds_dependents = True

    # -- submit -----------------------------------------------------------------
    @pytest.mark.timeout(60)
    def test_submit_returns_result_and_properties(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.shout, "hi")
        assert isinstance(fut, BatchFuture) and isinstance(fut, cf.Future)
        assert fut.result(timeout=45) == "HI"
        assert fut.job_status is not None and fut.job_status.phase is Phase.SUCCEEDED
        assert fut.job_exit_code == 0
        assert "stdout says hi" in (fut.job_log or "")
        assert fut.provider_job_id
        props = fut.properties()
        for key in ("job_status", "job_exit_code", "job_status_reason", "provider_job_id", "job_log"):
            assert key in props
        assert props["job_id"] == fut.job_id

    @pytest.mark.timeout(60)
    def test_function_kwargs_named_like_settings_reach_the_function(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.add, 1, b=2, memory="not a setting", timeout=7)
        assert fut.result(timeout=45) == (3, "not a setting", 7)

    @pytest.mark.timeout(60)
    def test_module_globals_and_client_only_modules_travel(
        self, make_executor: MakeExecutor, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A module that exists only on the client: the runner cannot import it.
        pkg = tmp_path / "clientonly_pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("BASE = 100\n")
        (pkg / "calc.py").write_text(
            textwrap.dedent(
                """
                from clientonly_pkg import BASE
                from clientonly_pkg.helpers import triple
                def compute(x):
                    return BASE + triple(x)
                """
            )
        )
        (pkg / "helpers.py").write_text("def triple(x):\n    return 3 * x\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import clientonly_pkg.calc as calc  # type: ignore[import-not-found]

        ex = make_executor()
        assert ex.submit(calc.compute, 2).result(timeout=45) == 106
        assert ex.submit(jobs.offset, 1).result(timeout=45) == 11
        assert list(ex.map(calc.compute, [1, 2])) == [103, 106]

    @pytest.mark.timeout(60)
    def test_user_exception_comes_back_as_its_own_type_with_remote_traceback(
        self, make_executor: MakeExecutor
    ) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.fail_on, 3)
        with pytest.raises(jobs.Boom, match="item 3 is bad") as info:
            fut.result(timeout=45)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "fail_on" in str(info.value.__cause__)
        assert fut.job_exit_code not in (None, 0)
        assert fut.job_status is not None and fut.job_status.phase is Phase.FAILED

    def test_unpicklable_call_fails_at_submit_with_nothing_submitted(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        before = set(ex._core.store.list(""))
        with pytest.raises(PayloadError, match="pickle"):
            ex.submit(jobs.double, (x for x in range(3)))
        with pytest.raises(TypeError, match="callable"):
            ex.submit(42)  # type: ignore[arg-type]
        assert set(ex._core.store.list("")) == before

    @pytest.mark.timeout(60)
    def test_unpicklable_result_is_reported(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        with pytest.raises(PayloadError, match="cannot be pickled"):
            ex.submit(jobs.unpicklable_result).result(timeout=45)

    # -- jobs that end without a result ------------------------------------------
    @pytest.mark.timeout(60)
    def test_job_that_exits_without_a_result(self, make_executor: MakeExecutor) -> None:
        if not self.isolated_processes:
            pytest.skip("jobs share the test process: os._exit would end it")
        ex = make_executor()
        fut = ex.submit(jobs.exit_hard, 3)
        with pytest.raises(JobFailedError) as info:
            fut.result(timeout=45)
        err = info.value
        assert err.exit_code == 3 and fut.job_exit_code == 3 and err.job_id == fut.job_id
        assert fut.job_status is not None and fut.job_status.phase is Phase.FAILED
        assert err.status == fut.job_status.value
        assert fut.job_id in str(err) and "exit code: 3" in str(err) and "job_log" in str(err)

    @pytest.mark.timeout(60)
    def test_timeout_kills_the_attempt(self, make_executor: MakeExecutor) -> None:
        ex = make_executor().with_settings(timeout=self.timeout_setting)
        fut = ex.submit(jobs.nap, 30)
        with pytest.raises(JobFailedError) as info:
            fut.result(timeout=45)
        assert "timeout" in (info.value.hint or "")
        assert fut.job_exit_code == self.timeout_exit_code
        assert fut.job_status is not None and fut.job_status.phase is Phase.FAILED

    @pytest.mark.timeout(90)
    def test_memory_limit_kills_the_job(self, make_executor: MakeExecutor) -> None:
        if self.memory_limit is None:
            pytest.skip("this provider enforces no per-job memory limit")
        ex = make_executor().with_settings(memory=self.memory_limit)
        fut = ex.submit(jobs.hog, 300)
        with pytest.raises(JobFailedError) as info:
            fut.result(timeout=45)
        assert self.oom_reason in str(info.value)
        assert "memory" in (info.value.hint or "")
        assert fut.job_exit_code == 137 and fut.job_status_reason == self.oom_reason
        # An array child is killed alone; its siblings succeed.
        arr = ex.submit_map(jobs.hog, [1, 300, 1], [0.0, 3.0, 0.0])
        with pytest.raises(JobFailedError):
            arr.result(timeout=45)
        assert arr.child_job_exit_codes == [0, 137, 0]
        assert arr.children[0].result() == 1024 * 1024

    @pytest.mark.timeout(60)
    def test_retries_rerun_failed_attempts(self, make_executor: MakeExecutor, tmp_path: Any) -> None:
        ex = make_executor()
        fut = ex.with_settings(retries=2).submit(jobs.flaky, str(tmp_path / "count"), 2)
        assert fut.result(timeout=45) == 3
        assert fut.attempts == 3 and fut.job_exit_code == 0
        # Without retries the first failure is final.
        with pytest.raises(RuntimeError, match="attempt 1 fails"):
            ex.submit(jobs.flaky, str(tmp_path / "count2"), 1).result(timeout=45)

    @pytest.mark.timeout(90)
    def test_cancel_array_terminates_every_child(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        arr = ex.submit_map(jobs.nap, [30, 30, 30])
        wait_until(lambda: arr.child_job_statuses[0] is not None and arr.child_job_statuses[0].phase is Phase.RUNNING,
                   self.cancel_timeout_s)
        assert arr.cancel() is True
        assert all(c.cancelled() for c in arr.children)
        wait_until(lambda: arr.job_status is not None and arr.job_status.terminal, self.cancel_timeout_s, 0.1)
        assert arr.job_status is not None and arr.job_status.phase is Phase.FAILED
        # Child properties are re-read at most about once a second: wait for the ended children.
        wait_until(lambda: all(s is not None and s.terminal for s in arr.child_job_statuses), self.cancel_timeout_s)
        reasons = arr.child_job_status_reasons
        assert all("cloudexec" in (r or "") for r in reasons), reasons

    @pytest.mark.timeout(60)
    def test_describe_failing_for_good_ends_the_future(self, make_executor: MakeExecutor,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        ex = make_executor(give_up_s=0.5)

        def unreachable(refs: Any) -> Any:
            raise ConnectionError("the batch service is unreachable")

        monkeypatch.setattr(ex.provider, "describe", unreachable)
        fut = ex.submit(jobs.nap, 3)
        with pytest.raises(JobUnreachableError, match="the batch service is unreachable") as info:
            fut.result(timeout=30)
        assert info.value.job_id == fut.job_id and "attach" in str(info.value)

    # -- the crash matrix -----------------------------------------------------------
    # Every way a call can end badly. Each ends its future with a specific
    # exception, in bounded time, and the same executor keeps working.
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("case", CRASHES, ids=[c.name for c in CRASHES])
    def test_crash_matrix(self, make_executor: MakeExecutor, case: Crash) -> None:
        if case.needs_process and not self.isolated_processes:
            pytest.skip("jobs share the test process: this call would end it")
        ex = make_executor()
        settings: dict[str, Any] = {}
        if case.name == "memory":
            if self.memory_limit is None:
                pytest.skip("this provider enforces no per-job memory limit")
            settings["memory"] = self.memory_limit
        if case.name == "timeout":
            settings["timeout"] = self.timeout_setting
        fut = (ex.with_settings(**settings) if settings else ex).submit(case.fn, *case.args)
        if case.name == "cancel":
            wait_until(fut.running, self.cancel_timeout_s)
            assert fut.cancel() is True
        started = time.monotonic()
        with pytest.raises(case.error) as info:
            fut.result(timeout=60)
        assert time.monotonic() - started < 60
        err = info.value
        if isinstance(err, JobFailedError):
            assert err.job_id == fut.job_id and fut.job_id in str(err)
            assert fut.job_status is not None and err.status == fut.job_status.value
            assert err.status_reason == fut.job_status_reason
            assert err.exit_code == fut.job_exit_code
            expected_code = {"segfault": 139, "os._exit": 3, "sys.exit": 4, "memory": 137,
                             "timeout": self.timeout_exit_code}[case.name]
            assert err.exit_code == expected_code, str(err)
            if case.output:
                assert case.output in (err.log_tail or ""), str(err)
                assert case.output in str(err)
        elif case.name == "raises":
            assert isinstance(err.__cause__, RemoteTraceback) and case.match in str(err)
            assert fut.job_exit_code == 1
        elif case.name != "cancel":
            assert fut.job_id in str(err) and case.match in str(err), str(err)
            expected_code = {"argument-unpickle": 2, "result-pickle": 1, "result-unpickle": 0}[case.name]
            assert fut.job_exit_code == expected_code
        # The same executor keeps working.
        assert ex.submit(jobs.double, 21).result(timeout=45) == 42

    # -- map --------------------------------------------------------------------
    @pytest.mark.timeout(90)
    def test_map_in_order_with_chunks(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        assert list(ex.map(jobs.double, range(25))) == [2 * i for i in range(25)]
        assert list(ex.map(jobs.add, range(7), range(7), chunksize=3)) == [(2 * i, "", 0) for i in range(7)]
        assert list(ex.map(jobs.double, [])) == []

    @pytest.mark.timeout(60)
    def test_map_raises_at_the_failing_item(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        results = ex.map(jobs.fail_on, range(6), chunksize=2)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(jobs.Boom):
            next(results)

    @pytest.mark.timeout(60)
    def test_map_timeout(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        results = ex.map(jobs.nap, [5, 5], timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)

    @pytest.mark.timeout(60)
    def test_submit_map_array_future(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        arr = ex.submit_map(jobs.shout, ["a", "b", "c"])
        assert isinstance(arr, ArrayFuture)
        assert arr.result(timeout=45) == ["A", "B", "C"]
        assert len(arr.children) == 3
        assert [c.result() for c in arr.children] == ["A", "B", "C"]
        assert arr.child_job_exit_codes == [0, 0, 0]
        assert "stdout says b" in (arr.children[1].job_log or "")
        assert arr.job_status is not None and arr.job_status.phase is Phase.SUCCEEDED

    @pytest.mark.timeout(60)
    def test_fully_consumed_map_cancels_nothing(self, make_executor: MakeExecutor,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        ex = make_executor()
        cancels: list[tuple[Any, ...]] = []
        real_cancel = ex.provider.cancel

        def recording_cancel(*args: Any, **kwargs: Any) -> None:
            cancels.append(args)
            real_cancel(*args, **kwargs)

        monkeypatch.setattr(ex.provider, "cancel", recording_cancel)
        assert list(ex.map(jobs.double, range(3))) == [0, 2, 4]
        ex.shutdown(wait=True)
        assert cancels == []

    @pytest.mark.timeout(60)
    def test_one_item_map(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        assert list(ex.map(jobs.double, [21])) == [42]

    @pytest.mark.timeout(60)
    def test_array_with_a_failing_child(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        arr = ex.submit_map(jobs.fail_on, range(5))
        with pytest.raises(jobs.Boom):
            arr.result(timeout=45)
        codes = arr.child_job_exit_codes
        assert codes[3] not in (None, 0) and [c for i, c in enumerate(codes) if i != 3] == [0, 0, 0, 0]
        assert arr.children[4].result() == 4
        assert arr.job_status is not None and arr.job_status.phase is Phase.FAILED

    # -- settings ---------------------------------------------------------------
    def test_bad_settings_fail_at_the_call(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        with pytest.raises(TypeError, match="unknown job setting 'colour'.*valid settings are"):
            ex.with_settings(colour="red")
        with pytest.raises(ValueError, match="memory"):
            ex.with_settings(memory="lots")
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            make_executor(max_workers=0)
        with pytest.raises(TypeError, match="poll_interval_s must be a pair .*got 5"):
            make_executor(poll_interval_s=5)
        with pytest.raises(ValueError, match=r"poll_interval_s.*got \(0, 0\)"):
            make_executor(poll_interval_s=(0, 0))
        with pytest.raises(ValueError, match="give_up_s must be above 0"):
            make_executor(give_up_s=-1)

    @pytest.mark.timeout(60)
    def test_with_settings_view_shares_the_executor(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        view = ex.with_settings(job_name="renamed", retries=1)
        assert view.settings.retries == 1 and ex.settings.retries is None
        assert view._core is ex._core
        assert view.submit(jobs.double, 4).result(timeout=45) == 8

    # -- executor semantics -----------------------------------------------------
    @pytest.mark.timeout(60)
    def test_shutdown_and_context_manager(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        with ex:
            fut = ex.submit(jobs.double, 5)
        assert fut.done() and fut.result() == 10
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex.submit(jobs.double, 1)
        started = time.monotonic()
        ex.shutdown()
        assert time.monotonic() - started < 5

    @pytest.mark.timeout(90)
    def test_max_workers_bounds_jobs_in_flight(self, make_executor: MakeExecutor) -> None:
        ex = make_executor(max_workers=2)
        spans = [f.result(timeout=80) for f in [ex.submit(jobs.nap, 1.0) for _ in range(4)]]
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak <= 2

    @pytest.mark.timeout(90)
    def test_shutdown_cancel_futures_cancels_queued_work(self, make_executor: MakeExecutor) -> None:
        ex = make_executor(max_workers=1)
        first = ex.submit(jobs.nap, 1.5)
        queued = [ex.submit(jobs.double, i) for i in range(3)]
        wait_until(first.running, self.cancel_timeout_s)
        ex.shutdown(wait=True, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        assert first.done() and not first.cancelled()

    @pytest.mark.timeout(120)
    def test_cancel_running_job_aborts_it_at_the_provider(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.nap, 60)
        wait_until(lambda: fut.running() or fut.done(), self.cancel_timeout_s)
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done()
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=1)
        # The provider ends the job and says who ended it.
        wait_until(lambda: fut.job_status is not None and fut.job_status.terminal, self.cancel_timeout_s, 0.2)
        assert "cloudexec" in (fut.job_status_reason or "")
        assert fut.cancel() is True  # idempotent

    @pytest.mark.timeout(60)
    def test_cancel_pending_and_finished(self, make_executor: MakeExecutor) -> None:
        ex = make_executor(max_workers=1)
        blocker = ex.submit(jobs.nap, 1.0)
        pending = ex.submit(jobs.double, 1)
        assert pending.cancel() is True and pending.cancelled()
        done, _ = cf.wait([pending], timeout=5)
        assert pending in done  # waiters learn of the cancellation at once
        blocker.result(timeout=45)
        assert blocker.cancel() is False

    @pytest.mark.timeout(90)
    def test_wait_as_completed_and_asyncio(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        futs = [ex.submit(jobs.double, i) for i in range(3)]
        done, not_done = cf.wait(futs, timeout=60)
        assert not not_done and {f.result() for f in done} == {0, 2, 4}
        assert sorted(f.result() for f in cf.as_completed([ex.submit(jobs.double, i) for i in range(3)], 60)) == [
            0,
            2,
            4,
        ]

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            wrapped = asyncio.wrap_future(ex.submit(jobs.double, 10))
            in_exec = loop.run_in_executor(ex, jobs.double, 20)
            return list(await asyncio.gather(wrapped, in_exec))

        assert asyncio.run(asyncio.wait_for(main(), 60)) == [20, 40]

    @pytest.mark.timeout(90)
    def test_attach_by_job_id_from_another_executor(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.double, 21)
        arr = ex.submit_map(jobs.double, [1, 2, 3])
        assert fut.result(timeout=60) == 42 and arr.result(timeout=60) == [2, 4, 6]
        other = make_executor()
        again = other.attach(fut.job_id)
        assert again.result(timeout=60) == 42
        assert again.job_exit_code == 0
        assert other.attach(arr.job_id).result(timeout=60) == [2, 4, 6]
        assert other.attach(f"{arr.job_id}[1]").result(timeout=60) == 4
        if fut.provider_job_id:
            assert other.attach(fut.provider_job_id).result(timeout=60) == 42

    @pytest.mark.timeout(60)
    def test_attach_of_a_tracked_job_returns_the_same_future(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.double, 21)
        arr = ex.submit_map(jobs.double, [1, 2])
        assert ex.attach(fut.job_id) is fut
        assert ex.attach(arr.job_id) is arr and ex.attach(f"{arr.job_id}[1]") is arr.children[1]
        assert fut.result(timeout=45) == 42 and arr.result(timeout=45) == [2, 4]
        assert ex.attach(fut.job_id) is fut

    @pytest.mark.timeout(60)
    def test_free_reference(self, make_executor: MakeExecutor) -> None:
        # CPython's executors test this: a done call's function and arguments,
        # and results the caller dropped, are not kept (100,000-item maps).
        ex = make_executor()
        arg = jobs.Dummy(21)
        arg_ref = weakref.ref(arg)
        fut = ex.submit(jobs.identity, arg)
        assert fut.result(timeout=45).value == 21
        assert ex.submit(arg.double).result(timeout=45) == 42  # a bound method holds its object
        del arg
        gc.collect()
        assert arg_ref() is None
        for obj in ex.map(jobs.make_dummy, range(3)):
            obj_ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert obj_ref() is None

    # -- pipelines: futures as arguments ---------------------------------------------
    @pytest.mark.timeout(120)
    def test_depend_chain_with_futures_nested_in_containers_and_kwargs(
        self, make_executor: MakeExecutor, tmp_path: Any
    ) -> None:
        ex = make_executor()
        gate = str(tmp_path / "gate")
        a = ex.submit(jobs.wait_for_file, gate, 1)
        try:
            b = ex.submit(jobs.double, a)
            c = ex.submit(jobs.echo, [a, (b,)], {"k": a}, key=b)
            # submit returned without waiting: the service holds b and c.
            assert not a.done() and not b.done() and not c.done()
            if self.holds_dependents:
                assert wait_until(lambda: c.job_status, 60).phase is Phase.QUEUED
                assert not c.done()
        finally:
            open(gate, "w").close()
        assert c.result(timeout=90) == (([1, (2,)], {"k": 1}), {"key": 2})
        assert b.result(timeout=10) == 2

    @pytest.mark.timeout(90)
    def test_depend_on_a_finished_future_passes_its_value(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        a = ex.submit(jobs.double, 2)
        assert a.result(timeout=60) == 4
        b = ex.submit(jobs.echo, a, x=[a])
        assert not b._record.depends and not b._record.upstream_ids  # the value went in the call
        assert b.result(timeout=60) == ((4,), {"x": [4]})

    @pytest.mark.timeout(120)
    def test_depend_map_items_that_are_futures(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        a, b = ex.submit(jobs.double, 1), ex.submit(jobs.double, 2)
        assert list(ex.map(jobs.double, [a, b, 5], timeout=90)) == [4, 8, 10]
        assert ex.submit_map(jobs.echo, [a, 3], [{"b": b}, None]).result(timeout=90) == [
            ((2, {"b": 4}), {}),
            ((3, None), {}),
        ]

    @pytest.mark.timeout(150)
    def test_depend_n_to_n_array_and_whole_array_argument(self, make_executor: MakeExecutor, tmp_path: Any) -> None:
        ex = make_executor()
        gate = str(tmp_path / "gate")
        first = ex.submit_map(jobs.wait_for_file, [gate] * 3, [1, 2, 3])
        try:
            second = ex.submit_map(jobs.double, first)  # child i waits for child i
            whole = ex.submit(jobs.total, second)  # the list of every result
            assert not whole.done() and not second.done()
        finally:
            open(gate, "w").close()
        assert second.result(timeout=120) == [2, 4, 6]
        assert whole.result(timeout=60) == 12

    @pytest.mark.timeout(150)
    def test_depend_sequential_array_runs_children_in_order(self, make_executor: MakeExecutor, tmp_path: Any) -> None:
        ex = make_executor()
        path = str(tmp_path / "lines")
        arr = ex.submit_map(jobs.append_line, [path] * 4, range(4), sequential=True)
        assert arr.result(timeout=120) == [1, 2, 3, 4]
        with open(path, encoding="utf-8") as fh:
            assert fh.read().split() == ["0", "1", "2", "3"]

    @pytest.mark.timeout(150)
    def test_depend_sequential_array_runs_nothing_after_a_failed_child(
        self, make_executor: MakeExecutor, tmp_path: Any
    ) -> None:
        ex = make_executor()
        path = str(tmp_path / "lines")
        arr = ex.submit_map(jobs.append_line_unless, [path] * 4, range(4), [1] * 4, sequential=True)
        assert isinstance(arr.exception(timeout=120), jobs.Boom)  # the first child's error
        first, failed, *never = arr.children
        assert first.result(timeout=30) == 1
        with pytest.raises(jobs.Boom):
            failed.result(timeout=30)
        for child in never:
            error = child.exception(timeout=60)
            assert isinstance(error, JobFailedError), error
            assert child.job_status_reason, "a child that never ran says why"
        with open(path, encoding="utf-8") as fh:
            assert fh.read().split() == ["0", "1"], "no child ran after the failed one"

    @pytest.mark.timeout(150)
    def test_depend_failed_upstream_fails_dependents_without_running(
        self, make_executor: MakeExecutor, tmp_path: Any
    ) -> None:
        ex = make_executor()
        ran = tmp_path / "ran"
        up = ex.submit(jobs.fail_on, 3)
        down = ex.submit(jobs.touch, str(ran), up)
        further = ex.submit(jobs.touch, str(ran), down)
        with pytest.raises(jobs.Boom):
            up.result(timeout=90)
        for future in (down, further):
            error = future.exception(timeout=90)
            assert isinstance(error, JobFailedError), error
            assert up.job_id in str(error) or down.job_id in str(error)
        assert up.job_id in str(down.exception())
        assert not ran.exists()
        # A failed future passed after the fact: the job is never submitted.
        late = ex.submit(jobs.touch, str(ran), up)
        error = late.exception(timeout=60)
        assert isinstance(error, JobFailedError) and up.job_id in str(error) and "Boom" in str(error)
        assert not ran.exists()

    @pytest.mark.timeout(150)
    def test_depend_cancelled_upstream_fails_its_dependents(self, make_executor: MakeExecutor, tmp_path: Any) -> None:
        ex = make_executor()
        gate, ran = str(tmp_path / "gate"), tmp_path / "ran"
        up = ex.submit(jobs.wait_for_file, gate, 1)
        try:
            down = ex.submit(jobs.touch, str(ran), up)
            if self.holds_dependents:
                wait_until(lambda: down.job_status, 60)  # handed to the service, held there
            assert up.cancel()
            error = down.exception(timeout=90)
        finally:
            open(gate, "w").close()
        assert isinstance(error, JobFailedError), error
        assert up.job_id in str(error) and "cancel" in str(error)
        assert not ran.exists()

    def test_depend_on_another_executors_future_is_refused(self, make_executor: MakeExecutor) -> None:
        ex, other = make_executor(), make_executor()
        up = other.submit(jobs.double, 1)
        with pytest.raises(ValueError, match="another executor"):
            ex.submit(jobs.double, up)
        with pytest.raises(ValueError, match="another executor"):
            ex.submit_map(jobs.double, [1, up])
        assert up.result(timeout=60) == 2

    def test_attach_unknown_id(self, make_executor: MakeExecutor) -> None:
        from cloudexec.errors import JobNotFoundError

        with pytest.raises(JobNotFoundError, match="no job"):
            make_executor().attach("no-such-job-20260101-000000-deadbeef")


def run_script(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a Python script in a fresh interpreter (its own ``__main__``); return stdout."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
