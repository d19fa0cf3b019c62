"""The provider contract: what `cloudexec._provider.Provider` documents, checked verb by verb.

`contract.ExecutorContract` tests executors; this suite tests the seam under
them, calling a provider's verbs directly, as the generic executor does. A
provider's test file binds it with one small class next to the executor
contract one::

    class TestLocalProviderContract(ProviderContract):
        \"\"\"The provider contract, on local processes.\"\"\"

It uses the same ``make_executor`` fixture: jobs are submitted through an
executor (so the call is in storage) and the provider is then asked about them.
"""

from __future__ import annotations

from typing import Any

import pytest

import jobs
from cloudexec import BatchFuture, JobInfo, Phase
from cloudexec.settings import COMMON_SETTINGS
from contract import MakeExecutor, wait_until

REASON = "cloudexec provider-contract: stopped on purpose"


def _ref(fut: BatchFuture[Any]) -> str:
    wait_until(lambda: fut._record.ref, 30)
    ref = fut._record.ref
    assert ref is not None
    return ref


class ProviderContract:
    """Mixin of provider-contract tests. See the module docstring."""

    #: A reference in the provider's own format that names no job.
    unknown_ref = "cloudexec-no-such-job-0000"
    #: How long a provider may take to report a stopped job ended.
    end_timeout_s = 30.0

    def test_status_table_covers_every_phase(self, make_executor: MakeExecutor) -> None:
        provider = make_executor().provider
        table = provider.status_enum
        assert {member.phase for member in table} == set(Phase)
        for member in table:
            assert isinstance(member.phase, Phase) and table.parse(member.value) is member
            assert member == member.value and str(member) == member.value
        with pytest.raises(ValueError, match="is not a"):
            table.parse("NO SUCH STATE")

    def test_class_attributes(self, make_executor: MakeExecutor) -> None:
        provider = make_executor().provider
        assert provider.name and provider.name.isidentifier()
        assert COMMON_SETTINGS <= provider.settings
        first, longest = provider.poll_interval_s
        assert 0 < first <= longest
        assert provider.default_max_workers > 0
        size = getattr(provider, "max_array_size", None)
        assert size is None or size > 0

    def test_command_names_the_job_url(self, make_executor: MakeExecutor) -> None:
        provider = make_executor().provider
        url = "memory://somewhere/job-1"
        single, array = provider.command_for(url, array=False), provider.command_for(url, array=True)
        assert url in single and url in array and single != array

    @pytest.mark.timeout(90)
    def test_describe_is_bulk_and_leaves_unknown_jobs_out(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        futures = [ex.submit(jobs.double, i) for i in range(3)]
        assert [f.result(timeout=60) for f in futures] == [0, 2, 4]
        refs = [_ref(f) for f in futures]
        provider = ex.provider
        assert provider.describe([]) == {}
        infos = provider.describe([*refs, self.unknown_ref])
        assert set(infos) == set(refs)  # the unknown job is left out, never an error
        for ref in refs:
            info = infos[ref]
            assert isinstance(info, JobInfo) and isinstance(info.status, provider.status_enum)
            assert info.status.phase is Phase.SUCCEEDED and info.terminal
            assert info.exit_code == 0
        assert provider.describe([self.unknown_ref]) == {}

    @pytest.mark.timeout(90)
    def test_describe_children_in_index_order(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        arr = ex.submit_map(jobs.fail_on, range(4))
        with pytest.raises(jobs.Boom):
            arr.result(timeout=60)
        ref, provider = _ref(arr), ex.provider
        children = wait_until(
            lambda: (c := provider.describe_children(ref, 4)) and all(i is not None and i.terminal for i in c) and c,
            self.end_timeout_s,
        )
        assert len(children) == 4
        assert [i.status.phase for i in children] == [Phase.SUCCEEDED] * 3 + [Phase.FAILED]
        assert [i.exit_code == 0 for i in children] == [True, True, True, False]
        one = provider.describe_child(ref, 4, 3)
        assert one is not None and one.status is children[3].status and one.exit_code == children[3].exit_code
        whole = provider.describe([ref])[ref]
        assert whole.status is not None and whole.status.phase is Phase.FAILED

    @pytest.mark.timeout(90)
    def test_cancel_of_an_ended_job_does_not_raise_nor_change_it(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        single = ex.submit(jobs.double, 1)
        arr = ex.submit_map(jobs.double, [1, 2])
        assert single.result(timeout=60) == 2 and arr.result(timeout=60) == [2, 4]
        provider = ex.provider
        refs = [_ref(single), _ref(arr)]
        wait_until(lambda: all(i.terminal for i in provider.describe(refs).values()) and len(refs) == 2, 30)
        provider.cancel(refs[0], REASON)
        provider.cancel(refs[1], REASON, index=0)
        provider.cancel(refs[1], REASON)
        infos = provider.describe(refs)
        assert [infos[r].status.phase for r in refs] == [Phase.SUCCEEDED, Phase.SUCCEEDED]  # type: ignore[union-attr]
        assert single.result() == 2 and arr.result() == [2, 4]

    @pytest.mark.timeout(90)
    def test_cancel_stops_a_running_job_with_the_reason(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.nap, 60)
        ref, provider = _ref(fut), ex.provider

        def phase() -> Phase | None:
            info = provider.describe([ref]).get(ref)
            return info.status.phase if info and info.status else None

        wait_until(lambda: phase() is Phase.RUNNING, self.end_timeout_s)
        provider.cancel(ref, REASON)
        wait_until(lambda: phase() is Phase.FAILED, self.end_timeout_s, 0.1)
        info = provider.describe([ref])[ref]
        assert REASON in (info.status_reason or ""), info
        provider.cancel(ref, REASON)  # again: it has ended now

    @pytest.mark.timeout(60)
    def test_read_log_of_a_job_and_a_child(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        fut = ex.submit(jobs.shout, "single")
        arr = ex.submit_map(jobs.shout, ["zero", "one"])
        assert fut.result(timeout=45) == "SINGLE" and arr.result(timeout=45) == ["ZERO", "ONE"]
        provider = ex.provider
        log = wait_until(lambda: provider.read_log(_ref(fut)), 20)
        assert "stdout says single" in log
        err = provider.read_log(_ref(fut), stream="stderr")
        # A provider that merges the streams returns the merged log for stdout, None for stderr.
        assert "stderr says single" in (err if err is not None else log)
        child = wait_until(lambda: provider.read_log(_ref(arr), index=1), 20)
        assert "stdout says one" in child and "stdout says zero" not in child
        assert provider.read_log(self.unknown_ref) is None

    def test_find_job_url_of_an_unknown_job_is_none(self, make_executor: MakeExecutor) -> None:
        assert make_executor().provider.find_job_url(self.unknown_ref) is None

    def test_failure_hints_name_the_setting_to_change(self, make_executor: MakeExecutor) -> None:
        provider = make_executor().provider
        oom = JobInfo(status_reason="OutOfMemoryError: Container killed due to memory usage")
        assert "memory" in (provider.failure_hint(oom) or "")
        assert provider.failure_hint(JobInfo(status_reason=None)) is None
