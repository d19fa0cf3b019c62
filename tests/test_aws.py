"""AWSBatchExecutor against the AWS Batch emulator (moto server over real HTTP, every
job really run by the runner as a local process): the contract suite plus AWS specifics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

import jobs
from cloudexec import AWSBatchExecutor, AWSJobStatus
from cloudexec.errors import CloudExecError, JobFailedError, StorageError
from cloudexec.providers.aws import AWSBatchProvider, sanitize_job_name
from cloudexec.testing import aws_batch_emulator
from contract import ExecutorContract, executor_factory, wait_until
from provider_contract import ProviderContract

pytestmark = pytest.mark.aws

FAST_POLL = (0.05, 0.5)


@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    # inherit_sys_path=False: the jobs must not import the tests folder, so that
    # shipping client-only modules is really exercised.
    with aws_batch_emulator(timeout_scale=0.02, inherit_sys_path=False) as emulator:
        yield emulator


@pytest.fixture
def make_executor(emu: Any) -> Iterator[Any]:
    def build(**kwargs: Any) -> AWSBatchExecutor:
        kwargs.setdefault("poll_interval_s", FAST_POLL)
        return emu.executor(**kwargs)  # type: ignore[no-any-return]

    yield from executor_factory(build)


class TestAWSContract(ExecutorContract):
    """The executor contract, on the AWS Batch emulator."""

    timeout_setting = 60  # AWS's minimum; 1.2 s at the emulator's timeout_scale of 0.02
    timeout_exit_code = 143  # SIGTERM at the timeout, as docker stop sends it
    memory_limit = 128  # MiB, as the job definition states it


class TestAWSProviderContract(ProviderContract):
    """The provider contract, on the AWS Batch emulator."""



def _describe(emu: Any, job_id: str) -> dict[str, Any]:
    jobs_ = emu.client("batch").describe_jobs(jobs=[job_id])["jobs"]
    assert jobs_, f"the emulator does not know {job_id}"
    return dict(jobs_[0])


# -- statuses, properties, logs --------------------------------------------------


@pytest.mark.timeout(90)
def test_statuses_are_seen_in_aws_order() -> None:
    with aws_batch_emulator(state_dwell_s=0.4, inherit_sys_path=False) as slow:
        with slow.executor(poll_interval_s=(0.05, 0.1)) as ex:
            fut = ex.submit(jobs.double, 2)
            seen: list[AWSJobStatus] = []
            while not fut.done():
                status = fut.job_status
                if status is not None and (not seen or seen[-1] is not status):
                    seen.append(status)
                time.sleep(0.05)
            assert fut.result(timeout=30) == 4
            seen.append(fut.job_status)
    order = list(AWSJobStatus)
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), seen
    assert AWSJobStatus.RUNNABLE in seen and AWSJobStatus.RUNNING in seen and seen[-1] is AWSJobStatus.SUCCEEDED


@pytest.mark.timeout(60)
def test_properties_and_cloudwatch_log(make_executor: Any, emu: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.shout, "aws")
    assert fut.result(timeout=45) == "AWS"
    assert fut.job_status is AWSJobStatus.SUCCEEDED and fut.job_status == "SUCCEEDED"
    log = fut.job_log or ""
    assert "stdout says aws" in log and "stderr says aws" in log  # one CloudWatch stream
    assert fut.job_stderr_log is None
    assert fut.attempts == 1
    job = _describe(emu, fut.provider_job_id)
    assert fut.log_stream_name == job["container"]["logStreamName"]
    assert job["container"]["environment"] and any(
        e["name"] == "CLOUDEXEC_JOB_ID" and e["value"] == fut.job_id for e in job["container"]["environment"]
    )


@pytest.mark.timeout(60)
def test_settings_reach_submit_job(make_executor: Any, emu: Any) -> None:
    ex = make_executor().with_settings(
        vcpus=1,
        memory="1 GiB",
        timeout=120,
        retries=2,
        tags={"team": "sim"},
        job_name="my job/№1",
        scheduling_priority=7,
        share_identifier="blue",
    )
    fut = ex.submit(jobs.double, 3)
    assert fut.result(timeout=45) == 6
    job = _describe(emu, fut.provider_job_id)
    requirements = {r["type"]: r["value"] for r in job["container"]["resourceRequirements"]}
    assert requirements["VCPU"] == "1" and requirements["MEMORY"] == "1024"
    assert job["timeout"]["attemptDurationSeconds"] == 120
    assert job["retryStrategy"]["attempts"] == 3
    assert job["tags"] == {"team": "sim"}
    assert job["jobName"] == "my_job_1"
    assert job["schedulingPriority"] == 7 and job["shareIdentifier"] == "blue"


def test_command_line_names_the_index_variable() -> None:
    provider = object.__new__(AWSBatchProvider)  # command_for needs no client
    assert provider.command_for("s3://b/job-1", array=False) == ("python", "-m", "cloudexec.runner", "s3://b/job-1")
    assert provider.command_for("s3://b/job-1", array=True) == (
        "python", "-m", "cloudexec.runner", "s3://b/job-1", "--array", "--index-env", "AWS_BATCH_JOB_ARRAY_INDEX"
    )


@pytest.mark.parametrize(
    "name, expected",
    [("simulate", "simulate"), ("my job/№1", "my_job_1"), ("_private", "private"), ("<lambda>", "lambda"),
     ("x" * 200, "x" * 128), ("---", "cloudexec")],
)
def test_job_names_are_sanitised_to_aws_rules(name: str, expected: str) -> None:
    assert sanitize_job_name(name) == expected


# -- failures -------------------------------------------------------------------------




def test_timeout_below_the_aws_minimum_is_refused(make_executor: Any) -> None:
    with pytest.raises(ValueError, match="minimum attempt duration of 60 s"):
        make_executor().with_settings(timeout=30)




# -- cancel ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cancel_queued_job_uses_cancel_job(emu: Any, make_executor: Any) -> None:
    ex = make_executor()
    blockers = [ex.with_settings(vcpus=emu.max_vcpus).submit(jobs.nap, 3)]
    wait_until(blockers[0].running, 30)
    queued = ex.submit(jobs.double, 1)
    wait_until(lambda: queued.job_status is AWSJobStatus.RUNNABLE, 30)
    # Count this executor's own calls: the module's emulator also serves other executors.
    provider = ex._core.provider
    batch, calls = provider.batch, []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            method = getattr(batch, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                if "jobId" in kwargs:
                    calls.append((name, kwargs["jobId"]))
                return method(*args, **kwargs)

            return call

    provider.batch = Recording()
    try:
        assert queued.cancel() is True
    finally:
        provider.batch = batch
    assert calls[:1] == [("cancel_job", queued.provider_job_id)], calls
    wait_until(lambda: queued.job_status is AWSJobStatus.FAILED, 30)
    assert "cloudexec" in (queued.job_status_reason or "")
    blockers[0].result(timeout=45)




# -- arrays ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_more_children_than_aws_allows_are_split_in_order(emu: Any) -> None:
    with emu.executor(max_array_size=3, poll_interval_s=FAST_POLL) as ex:
        arr = ex.submit_map(jobs.double, range(7))  # parts of 3, 3 and 1 (a plain job)
        assert arr.result(timeout=60) == [2 * i for i in range(7)]
        assert arr.child_job_exit_codes == [0] * 7
        manifest = json.loads(ex._core.store.read(f"{arr.job_id}/job.json"))
        parts = manifest["provider_ref"][len("array:") :].split(",")
        assert [p.rsplit("/", 1)[1] for p in parts] == ["3", "3", "1"]
        # Each part's command line tells its children where their global index starts.
        commands = [_describe(emu, p.rsplit("/", 1)[0])["container"]["command"] for p in parts]
        assert commands[0][-2:] == ["--index-env", "AWS_BATCH_JOB_ARRAY_INDEX"]
        assert commands[1][-2:] == ["--index-offset", "3"] and commands[2][-2:] == ["--index", "6"]
        assert list(ex.map(jobs.double, range(8), chunksize=2)) == [2 * i for i in range(8)]
        assert arr.status_counts is not None and arr.status_counts["SUCCEEDED"] == 7


@pytest.mark.timeout(60)
def test_array_children_report_exit_codes_and_reasons(make_executor: Any) -> None:
    ex = make_executor()
    arr = ex.submit_map(jobs.fail_on, range(4))
    with pytest.raises(jobs.Boom):
        arr.result(timeout=45)
    assert arr.child_job_exit_codes == [0, 0, 0, 1]
    assert arr.job_status is AWSJobStatus.FAILED
    assert arr.children[2].provider_job_id and arr.children[2].provider_job_id.endswith(":2")
    assert arr.status_counts is not None and arr.status_counts["FAILED"] == 1


# -- economy, throttling, expiry -------------------------------------------------------


@pytest.mark.timeout(90)
def test_polls_are_bulk_and_throttling_is_retried(emu: Any) -> None:
    with emu.executor(poll_interval_s=(0.5, 0.5)) as ex:
        emu.reset_api_calls()
        emu.inject_throttling(3)  # the next 3 Batch calls answer 429 TooManyRequestsException
        started = time.monotonic()
        futures = [ex.submit(jobs.double, i) for i in range(12)]
        assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(12)]
        elapsed = time.monotonic() - started
        calls = emu.api_calls
    # botocore retried the 3 throttled SubmitJob calls (adaptive mode), nothing failed.
    assert calls["SubmitJob"] == 12 + 3
    # One DescribeJobs per poll covers every job in flight (< 100 ids).
    assert calls["DescribeJobs"] <= elapsed / 0.5 + 5, calls


@pytest.mark.timeout(60)
def test_expired_metadata_still_gives_the_result(emu: Any, make_executor: Any) -> None:
    ex = make_executor()
    fut = ex.submit(jobs.double, 8)
    assert fut.result(timeout=45) == 16
    assert emu.expire_job(fut.provider_job_id)
    again = make_executor().attach(fut.job_id)
    assert again.result(timeout=45) == 16
    assert again.job_status is None and again.job_exit_code is None and again.job_log is None


# -- bad input ------------------------------------------------------------------------


def test_bad_environment_fails_at_construction(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="job_queue='nope' does not exist"):
        emu.executor(job_queue="nope")
    with pytest.raises(ValueError, match="job_definition='missing:1' is not an active"):
        emu.executor(job_definition="missing:1")
    with pytest.raises(ValueError, match="io_bucket must be an s3:// URL"):
        emu.executor(io_bucket="gs://elsewhere")
    with pytest.raises(StorageError, match="no-such-bucket"):
        emu.executor(io_bucket="s3://no-such-bucket/x")
    with pytest.raises(TypeError, match="unknown job setting 'container_image'"):
        emu.executor(container_image="img:1")
    # No credentials anywhere (and no instance metadata lookups off this machine).
    import boto3

    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CloudExecError, match="no AWS credentials found"):
        AWSBatchExecutor(
            emu.job_queue,
            emu.job_definition,
            emu.io_url,
            session=boto3.Session(region_name=emu.region),
            endpoint_url=emu.endpoint_url,
        )


@pytest.mark.timeout(60)
def test_refused_submissions_raise_submission_error_and_leave_nothing(emu: Any, make_executor: Any) -> None:
    from cloudexec.errors import SubmissionError

    batch = emu.client("batch")
    made = batch.register_job_definition(
        jobDefinitionName="short-lived",
        type="container",
        containerProperties={
            "image": "cloudexec/runner:latest",
            "command": ["python", "-m", "cloudexec.runner"],
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}],
        },
    )
    ex = make_executor(job_definition=made["jobDefinitionArn"])
    batch.deregister_job_definition(jobDefinition=made["jobDefinitionArn"])
    fut = ex.submit(jobs.double, 1)
    with pytest.raises(SubmissionError) as info:
        fut.result(timeout=30)
    assert info.value.code and fut.job_id in str(info.value)
    assert not ex._core.store.exists(f"{fut.job_id}/call.pkl")  # nothing half-written
    # A request above AWS's 30 KiB SubmitJob limit never leaves the client.
    big = make_executor().with_settings(tags={f"k{i}": "v" * 1000 for i in range(40)})
    with pytest.raises(SubmissionError, match="30 KiB"):
        big.submit(jobs.double, 1).result(timeout=30)


# -- dependsOn, from JobSpec.depends_on (pure function) -----------------------------------------


def _spec(size: int | None, *deps: Any) -> Any:
    from cloudexec._provider import JobSpec
    from cloudexec.settings import JobSettings

    return JobSpec("down", "s3://b/down", "down", JobSettings(), size, ("python",), {}, tuple(deps))


def test_depends_on_maps_kinds_and_parts() -> None:
    from cloudexec._provider import Dependency
    from cloudexec.providers.aws import _dependencies

    single, split = "up-1", "array:p0/3,p1/3,p2/1"
    assert _dependencies(_spec(None, Dependency("job", single)), 0, None, None) == [{"jobId": "up-1"}]
    # A whole split array: every part; one child: the part that holds it.
    assert _dependencies(_spec(None, Dependency("job", split)), 0, None, None) == [
        {"jobId": "p0"}, {"jobId": "p1"}, {"jobId": "p2"}
    ]
    assert _dependencies(_spec(None, Dependency("job", split, index=4)), 0, None, None) == [{"jobId": "p1"}]
    # N_TO_N part by part (a lone child is a plain job: a plain dependency on the lone upstream child).
    n_to_n = Dependency("n_to_n", split)
    assert _dependencies(_spec(7, n_to_n), 3, 3, "prev") == [{"jobId": "p1", "type": "N_TO_N"}]
    assert _dependencies(_spec(7, n_to_n), 6, None, "prev") == [{"jobId": "p2"}]
    # Parts laid out otherwise: every upstream part the children need.
    assert _dependencies(_spec(7, n_to_n), 2, 2, None) == [{"jobId": "p0"}, {"jobId": "p1"}]
    # SEQUENTIAL inside a part; a later part waits for the one before.
    sequential = Dependency("sequential")
    assert _dependencies(_spec(7, sequential), 0, 3, None) == [{"type": "SEQUENTIAL"}]
    assert _dependencies(_spec(7, sequential), 3, 3, "p0") == [{"type": "SEQUENTIAL"}, {"jobId": "p0"}]
    assert _dependencies(_spec(7, sequential), 6, None, "p1") == [{"jobId": "p1"}]


def test_depends_on_more_than_twenty_is_refused_with_how_to_restructure() -> None:
    from cloudexec._provider import Dependency
    from cloudexec.errors import SubmissionError
    from cloudexec.providers.aws import _dependencies

    many = [Dependency("job", f"up-{i}") for i in range(21)]
    with pytest.raises(SubmissionError, match="limit of 20.*Restructure"):
        _dependencies(_spec(None, *many), 0, None, None)
