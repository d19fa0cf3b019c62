"""The AWS Batch emulator, observed only through plain boto3 calls.

Each test states the AWS behaviour it pins down; moto alone gets most of them wrong
(see the docstring of ``cloudexec.testing.aws``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cloudexec.testing.aws import AWSBatchEmulator, aws_batch_emulator

pytestmark = pytest.mark.aws

TERMINAL = ("SUCCEEDED", "FAILED")


@pytest.fixture(scope="module")
def emu() -> Iterator[AWSBatchEmulator]:
    # timeout_scale=0.02 turns AWS's 60 s minimum timeout into 1.2 s.
    with aws_batch_emulator(timeout_scale=0.02, max_vcpus=2) as emulator:
        print(f"\nAWS Batch emulator start-up (first in process): {emulator.startup_s:.2f} s")
        yield emulator


@pytest.fixture(scope="module")
def slow_emu() -> Iterator[AWSBatchEmulator]:
    # One vCPU so a second job must queue; a dwell so every status can be seen.
    with aws_batch_emulator(max_vcpus=1, state_dwell_s=0.3) as emulator:
        yield emulator


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def submit(emu: AWSBatchEmulator, command: list[str], name: str = "test", **kwargs: Any) -> str:
    overrides = kwargs.pop("containerOverrides", {})
    overrides["command"] = command
    response = emu.client("batch").submit_job(
        jobName=name,
        jobQueue=emu.job_queue,
        jobDefinition=emu.job_definition,
        containerOverrides=overrides,
        **kwargs,
    )
    return str(response["jobId"])


def describe(emu: AWSBatchEmulator, job_id: str) -> dict[str, Any]:
    jobs = emu.client("batch").describe_jobs(jobs=[job_id])["jobs"]
    assert len(jobs) == 1, jobs
    return dict(jobs[0])


def wait_for(
    emu: AWSBatchEmulator, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout_s: float = 30
) -> dict[str, Any]:
    batch = emu.client("batch")
    deadline = time.monotonic() + timeout_s
    while True:
        job = batch.describe_jobs(jobs=[job_id])["jobs"][0]
        if job["status"] in statuses:
            return dict(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s")
        time.sleep(0.05)


def log_lines(emu: AWSBatchEmulator, stream: str) -> list[str]:
    events = emu.client("logs").get_log_events(
        logGroupName="/aws/batch/job", logStreamName=stream, startFromHead=True
    )
    return [e["message"] for e in events["events"]]


def client_error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# ----------------------------------------------------------------------- start-up


@pytest.mark.timeout(30)
def test_startup_time_and_clean_teardown(emu: AWSBatchEmulator) -> None:
    """A second emulator starts in < 2 s, and its exit leaves no process or thread."""
    threads_before = threading.active_count()
    started = time.perf_counter()
    with aws_batch_emulator() as other:
        entered = time.perf_counter() - started
        # flush=True: stdout to a file is block-buffered, as in a container.
        job_id = submit(other, py("import os, time; print(os.getpid(), flush=True); time.sleep(60)"))
        job = wait_for(other, job_id, ("RUNNING",))
        deadline = time.monotonic() + 10
        while not (lines := log_lines(other, job["container"]["logStreamName"])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = int(lines[0])
        os.kill(pid, 0)  # alive while the emulator runs
    print(f"\nAWS Batch emulator start-up: first {emu.startup_s:.2f} s, second {other.startup_s:.2f} s "
          f"(context entry {entered:.2f} s)")
    assert other.startup_s < 2.0
    # The first start also pays moto's one-off imports (~1.2 s on a quiet machine);
    # the bound leaves room for a loaded CI runner.
    assert emu.startup_s < 6.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert threading.active_count() <= threads_before


@pytest.mark.timeout(30)
def test_clients_and_sessions_default_to_the_emulator(emu: AWSBatchEmulator) -> None:
    """No helper may produce a client that talks to real AWS."""
    assert emu.session().client("s3").meta.endpoint_url == emu.endpoint_url
    assert emu.client("batch").meta.endpoint_url == emu.endpoint_url
    assert emu.io_url == f"s3://{emu.bucket}/cloudexec"
    assert emu.env()["AWS_ENDPOINT_URL"] == emu.endpoint_url
    batch = emu.client("batch")
    definition = batch.describe_job_definitions(jobDefinitions=[emu.job_definition])["jobDefinitions"][0]
    assert definition["containerProperties"]["command"] == ["python", "-m", "cloudexec.runner"]
    assert emu.client("s3").head_bucket(Bucket=emu.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


@pytest.mark.timeout(30)
def test_s3fs_options_reach_the_bucket(emu: AWSBatchEmulator) -> None:
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(**emu.s3fs_options(), skip_instance_cache=True)
    fs.pipe(f"{emu.bucket}/s3fs/probe", b"hello")
    assert fs.cat(f"{emu.bucket}/s3fs/probe") == b"hello"


# ----------------------------------------------------------------------- life cycle


@pytest.mark.timeout(30)
def test_statuses_are_seen_in_order(slow_emu: AWSBatchEmulator) -> None:
    """SUBMITTED -> PENDING -> RUNNABLE -> STARTING -> RUNNING -> SUCCEEDED (moto skips RUNNABLE)."""
    job_id = submit(slow_emu, py("import time; time.sleep(0.3)"))
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while not seen or seen[-1] not in TERMINAL:
        status = describe(slow_emu, job_id)["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        assert time.monotonic() < deadline, seen
        time.sleep(0.03)
    assert seen == ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED"]
    job = describe(slow_emu, job_id)
    assert job["createdAt"] <= job["startedAt"] <= job["stoppedAt"]


@pytest.mark.timeout(30)
def test_exit_code_reason_and_logs(emu: AWSBatchEmulator) -> None:
    """A non-zero exit gives FAILED, container.exitCode, AWS's reason, and both streams in CloudWatch."""
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    job_id = submit(emu, py(code))
    job = wait_for(emu, job_id)
    assert job["status"] == "FAILED"
    assert job["statusReason"] == "Essential container in task exited"
    assert job["container"]["exitCode"] == 3
    stream = job["container"]["logStreamName"]
    assert stream.startswith("cloudexec-job/default/")
    [attempt] = job["attempts"]
    assert attempt["container"]["exitCode"] == 3
    assert attempt["container"]["logStreamName"] == stream
    assert attempt["startedAt"] <= attempt["stoppedAt"]
    assert sorted(log_lines(emu, stream)) == ["to stderr", "to stdout"]

    ok = wait_for(emu, submit(emu, py("pass")))
    assert (ok["status"], ok["container"]["exitCode"]) == ("SUCCEEDED", 0)


@pytest.mark.timeout(30)
def test_job_environment(emu: AWSBatchEmulator) -> None:
    """AWS_BATCH_* variables, the definition/override environment, and the endpoint reach the job."""
    code = (
        "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith(('AWS_', 'MY_'))}))"
    )
    job_id = submit(emu, py(code), containerOverrides={"environment": [{"name": "MY_VAR", "value": "42"}]})
    job = wait_for(emu, job_id)
    assert job["status"] == "SUCCEEDED", job
    env = json.loads(log_lines(emu, job["container"]["logStreamName"])[0])
    assert env["AWS_BATCH_JOB_ID"] == job_id
    assert env["AWS_BATCH_JOB_ATTEMPT"] == "1"
    assert env["AWS_BATCH_JQ_NAME"] == "cloudexec-queue"
    assert env["AWS_BATCH_CE_NAME"] == "cloudexec-ce"
    assert "AWS_BATCH_JOB_ARRAY_INDEX" not in env
    assert env["MY_VAR"] == "42"
    assert env["AWS_ENDPOINT_URL"] == emu.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == "testing"
    # moto appends AWS_BATCH_JOB_ID to the described environment on every call.
    assert describe(emu, job_id)["container"]["environment"] == [{"name": "MY_VAR", "value": "42"}]
    assert describe(emu, job_id)["container"]["environment"] == [{"name": "MY_VAR", "value": "42"}]


@pytest.mark.timeout(30)
def test_job_reaches_s3_through_the_endpoint(emu: AWSBatchEmulator) -> None:
    code = (
        "import boto3, os; boto3.client('s3').put_object("
        "Bucket=os.environ['BUCKET'], Key='from-job/' + os.environ['AWS_BATCH_JOB_ID'], "
        "Body=b'written by job')"
    )
    overrides = {"environment": [{"name": "BUCKET", "value": emu.bucket}]}
    job_id = submit(emu, py(code), containerOverrides=overrides)
    job = wait_for(emu, job_id)
    assert job["status"] == "SUCCEEDED", log_lines(emu, job["container"]["logStreamName"])
    body = emu.client("s3").get_object(Bucket=emu.bucket, Key=f"from-job/{job_id}")["Body"].read()
    assert body == b"written by job"


@pytest.mark.timeout(30)
def test_retry_strategy_reruns_failed_attempts(emu: AWSBatchEmulator) -> None:
    """Two failing attempts then a success: three attempts recorded, AWS_BATCH_JOB_ATTEMPT counting up."""
    code = (
        "import os, sys; n = int(os.environ['AWS_BATCH_JOB_ATTEMPT']); print(n); "
        "sys.exit(0 if n == 3 else 10 + n)"
    )
    job = wait_for(emu, submit(emu, py(code), retryStrategy={"attempts": 3}))
    assert job["status"] == "SUCCEEDED"
    assert [a["container"]["exitCode"] for a in job["attempts"]] == [11, 12, 0]
    streams = [a["container"]["logStreamName"] for a in job["attempts"]]
    assert len(set(streams)) == 3
    assert [log_lines(emu, s) for s in streams] == [["1"], ["2"], ["3"]]

    # evaluateOnExit: EXIT on code 5 stops retrying even though attempts remain.
    strategy = {"attempts": 5, "evaluateOnExit": [{"onExitCode": "5", "action": "EXIT"}]}
    job = wait_for(emu, submit(emu, py("raise SystemExit(5)"), retryStrategy=strategy))
    assert (job["status"], len(job["attempts"])) == ("FAILED", 1)

    with pytest.raises(ClientError) as exc:
        submit(emu, py("pass"), retryStrategy={"attempts": 11})
    assert client_error_code(exc) == "ClientException"


@pytest.mark.timeout(30)
def test_timeout_below_60_s_is_rejected(emu: AWSBatchEmulator) -> None:
    batch = emu.client("batch")
    with pytest.raises(ClientError) as exc:
        submit(emu, py("pass"), timeout={"attemptDurationSeconds": 59})
    assert client_error_code(exc) == "ClientException"
    with pytest.raises(ClientError) as exc:
        batch.register_job_definition(
            jobDefinitionName="too-short",
            type="container",
            containerProperties={"image": "x", "vcpus": 1, "memory": 128},
            timeout={"attemptDurationSeconds": 30},
        )
    assert client_error_code(exc) == "ClientException"


@pytest.mark.timeout(30)
def test_timeout_kills_the_attempt(emu: AWSBatchEmulator) -> None:
    """60 s at timeout_scale=0.02 is 1.2 s of real time; a timed-out job is not retried."""
    started = time.monotonic()
    job_id = submit(
        emu,
        py("import time; time.sleep(30)"),
        timeout={"attemptDurationSeconds": 60},
        retryStrategy={"attempts": 2},
    )
    job = wait_for(emu, job_id)
    assert time.monotonic() - started < 10
    assert job["status"] == "FAILED"
    assert job["statusReason"] == "Job attempt duration exceeded timeout"
    assert len(job["attempts"]) == 1
    assert job["container"]["exitCode"] in (137, 143)  # SIGTERM, then SIGKILL after the grace


@pytest.mark.timeout(30)
def test_memory_limit_is_enforced(emu: AWSBatchEmulator) -> None:
    code = "b = b'x' * (400 * 2**20); import time; time.sleep(2)"
    job_id = submit(
        emu, py(code), containerOverrides={"resourceRequirements": [{"type": "MEMORY", "value": "128"}]}
    )
    job = wait_for(emu, job_id)
    assert job["status"] == "FAILED"
    assert job["statusReason"] == "OutOfMemoryError: Container killed due to memory usage"
    assert job["container"]["exitCode"] == 137
    assert job["container"]["reason"] == "OutOfMemoryError: Container killed due to memory usage"
    assert job["attempts"][0]["container"]["exitCode"] == 137


@pytest.mark.timeout(30)
def test_terminate_running_job(emu: AWSBatchEmulator) -> None:
    job_id = submit(emu, py("import time; time.sleep(60)"))
    wait_for(emu, job_id, ("RUNNING",))
    emu.client("batch").terminate_job(jobId=job_id, reason="stopped by test")
    job = wait_for(emu, job_id, timeout_s=10)
    assert job["status"] == "FAILED"
    assert job["statusReason"] == "stopped by test"
    assert job["container"]["exitCode"] == 137
    assert job["isTerminated"] is True


@pytest.mark.timeout(30)
def test_cancel_only_affects_queued_jobs(slow_emu: AWSBatchEmulator) -> None:
    """With one vCPU busy the second job waits in RUNNABLE; cancel fails it but not a RUNNING one."""
    batch = slow_emu.client("batch")
    blocker = submit(slow_emu, py("import time; time.sleep(60)"))
    wait_for(slow_emu, blocker, ("RUNNING",))
    queued = submit(slow_emu, py("pass"))
    wait_for(slow_emu, queued, ("RUNNABLE",))
    time.sleep(0.5)  # longer than the dwell: it is waiting for vCPUs, not for time
    assert describe(slow_emu, queued)["status"] == "RUNNABLE"

    batch.cancel_job(jobId=queued, reason="not needed")
    job = wait_for(slow_emu, queued, timeout_s=5)
    assert (job["status"], job["statusReason"], job["isCancelled"]) == ("FAILED", "not needed", True)
    assert "exitCode" not in job["container"]

    batch.cancel_job(jobId=blocker, reason="too late")
    time.sleep(0.3)
    assert describe(slow_emu, blocker)["status"] == "RUNNING"
    batch.terminate_job(jobId=blocker, reason="cleanup")
    assert wait_for(slow_emu, blocker)["statusReason"] == "cleanup"


@pytest.mark.timeout(30)
def test_depends_on(emu: AWSBatchEmulator) -> None:
    """A job waits in PENDING for its dependency and fails when the dependency fails."""
    first = submit(emu, py("import time; time.sleep(0.5)"))
    second = submit(emu, py("pass"), dependsOn=[{"jobId": first}])
    assert describe(emu, second)["status"] in ("SUBMITTED", "PENDING")
    done = wait_for(emu, second)
    assert done["status"] == "SUCCEEDED"
    assert done["startedAt"] >= describe(emu, first)["stoppedAt"]

    failing = submit(emu, py("raise SystemExit(1)"))
    doomed = wait_for(emu, submit(emu, py("pass"), dependsOn=[{"jobId": failing}]))
    assert (doomed["status"], doomed["statusReason"]) == ("FAILED", "Dependent Job failed")
    assert doomed["attempts"] == []


@pytest.mark.timeout(60)
def test_array_dependencies_n_to_n_sequential_and_whole_array(emu: AWSBatchEmulator, tmp_path: Any) -> None:
    """N_TO_N pairs children by index, SEQUENTIAL orders them, a plain jobId waits for the whole array."""
    log = tmp_path / "order"
    note = (
        "import os, time; i = os.environ['AWS_BATCH_JOB_ARRAY_INDEX']; time.sleep(0.1 * (3 - int(i))); "
        f"open({str(log)!r}, 'a').write(os.environ['TAG'] + i + chr(10))"
    )

    def tagged(tag: str) -> dict[str, Any]:
        return {"environment": [{"name": "TAG", "value": tag}]}

    first = submit(emu, py(note), arrayProperties={"size": 3}, containerOverrides=tagged("a"))
    paired = submit(
        emu, py(note), arrayProperties={"size": 3}, containerOverrides=tagged("b"),
        dependsOn=[{"jobId": first, "type": "N_TO_N"}],
    )
    ordered = submit(
        emu, py(note), arrayProperties={"size": 3}, containerOverrides=tagged("s"),
        dependsOn=[{"type": "SEQUENTIAL"}],
    )
    after_all = submit(emu, py(note.replace("os.environ['AWS_BATCH_JOB_ARRAY_INDEX']", "'0'")),
                       containerOverrides=tagged("w"), dependsOn=[{"jobId": paired}])
    assert describe(emu, after_all)["status"] in ("SUBMITTED", "PENDING")
    assert wait_for(emu, after_all)["status"] == "SUCCEEDED"
    assert wait_for(emu, ordered)["status"] == "SUCCEEDED"
    lines = log.read_text().split()
    for i in "012":
        assert lines.index("a" + i) < lines.index("b" + i)  # child i after child i
    assert [line for line in lines if line[0] == "s"] == ["s0", "s1", "s2"]  # in index order
    assert lines.index("w0") > max(lines.index("b" + i) for i in "012")  # after the whole array


@pytest.mark.timeout(30)
def test_dependency_failures_and_limits(emu: AWSBatchEmulator) -> None:
    """A failing N_TO_N child fails its partner only; more than 20 or an unknown type is refused."""
    code = "import os, sys; sys.exit(int(os.environ['AWS_BATCH_JOB_ARRAY_INDEX']) == 1)"
    first = submit(emu, py(code), arrayProperties={"size": 2})
    paired = submit(emu, py("pass"), arrayProperties={"size": 2}, dependsOn=[{"jobId": first, "type": "N_TO_N"}])
    assert wait_for(emu, paired)["status"] == "FAILED"
    children = emu.client("batch").describe_jobs(jobs=[f"{paired}:0", f"{paired}:1"])["jobs"]
    by_index = {c["arrayProperties"]["index"]: c for c in children}
    assert by_index[0]["status"] == "SUCCEEDED"
    assert (by_index[1]["status"], by_index[1]["statusReason"]) == ("FAILED", "Dependent Job failed")
    batch = emu.client("batch")
    many = [{"jobId": first}] * 21
    for depends, match in ((many, "at most 20"), ([{"jobId": first, "type": "BOTH"}], "Invalid dependency type")):
        with pytest.raises(ClientError, match=match):
            batch.submit_job(jobName="x", jobQueue=emu.job_queue, jobDefinition=emu.job_definition,
                             containerOverrides={"command": py("pass")}, dependsOn=depends)


# ----------------------------------------------------------------------- arrays


@pytest.mark.timeout(30)
def test_array_with_one_failing_child(emu: AWSBatchEmulator) -> None:
    code = (
        "import os, sys; i = int(os.environ['AWS_BATCH_JOB_ARRAY_INDEX']); print(i); "
        "sys.exit(7 if i == 3 else 0)"
    )
    parent_id = submit(emu, py(code), arrayProperties={"size": 5})
    parent = wait_for(emu, parent_id)
    assert parent["status"] == "FAILED"
    assert parent["statusReason"]
    assert parent["arrayProperties"]["size"] == 5
    summary = parent["arrayProperties"]["statusSummary"]
    assert (summary["SUCCEEDED"], summary["FAILED"]) == (4, 1)
    children = emu.client("batch").describe_jobs(jobs=[f"{parent_id}:{i}" for i in range(5)])["jobs"]
    by_index = {c["arrayProperties"]["index"]: c for c in children}
    assert [by_index[i]["container"]["exitCode"] for i in range(5)] == [0, 0, 0, 7, 0]
    assert by_index[3]["status"] == "FAILED"
    assert log_lines(emu, by_index[2]["container"]["logStreamName"]) == ["2"]


@pytest.mark.timeout(30)
def test_array_size_limits(emu: AWSBatchEmulator) -> None:
    for size in (1, 10_001):
        with pytest.raises(ClientError) as exc:
            submit(emu, py("pass"), arrayProperties={"size": size})
        assert client_error_code(exc) == "ClientException"


@pytest.mark.timeout(30)
def test_list_jobs_paginates(emu: AWSBatchEmulator) -> None:
    batch = emu.client("batch")
    parent_id = submit(emu, py("import time; time.sleep(60)"), name="paged", arrayProperties={"size": 250})

    # With filters every status is listed, 100 per page at most.
    pages, token = [], None
    while True:
        kwargs = {"nextToken": token} if token else {}
        by_name = [{"name": "JOB_NAME", "values": ["pag*"]}]
        page = batch.list_jobs(arrayJobId=parent_id, filters=by_name, **kwargs)
        pages.append(page["jobSummaryList"])
        token = page.get("nextToken")
        if not token:
            break
    assert [len(p) for p in pages] == [100, 100, 50]
    assert sorted(s["arrayProperties"]["index"] for p in pages for s in p) == list(range(250))

    # Without jobStatus or filters only RUNNING jobs are listed (both vCPUs are busy).
    wait_for(emu, f"{parent_id}:1", ("RUNNING",))
    running = batch.list_jobs(arrayJobId=parent_id)["jobSummaryList"]
    assert {s["status"] for s in running} == {"RUNNING"}
    assert len(running) == 2

    batch.terminate_job(jobId=parent_id, reason="enough")
    wait_for(emu, parent_id)
    listed = []
    for page in batch.get_paginator("list_jobs").paginate(
        arrayJobId=parent_id, jobStatus="FAILED", PaginationConfig={"PageSize": 60}
    ):
        assert len(page["jobSummaryList"]) <= 60
        listed += page["jobSummaryList"]
    assert len(listed) == 250
    assert all(s["statusReason"] == "enough" for s in listed)
    assert {s["container"]["exitCode"] for s in listed if "container" in s} == {137}


@pytest.mark.timeout(30)
def test_list_jobs_by_queue_and_describe_limit(emu: AWSBatchEmulator) -> None:
    batch = emu.client("batch")
    job_id = submit(emu, py("pass"), name="listed-by-queue")
    wait_for(emu, job_id)
    found = batch.list_jobs(jobQueue=emu.job_queue, jobStatus="SUCCEEDED")["jobSummaryList"]
    summary = next(s for s in found if s["jobId"] == job_id)
    assert summary["container"]["exitCode"] == 0
    assert summary["statusReason"] == "Essential container in task exited"
    with pytest.raises(ClientError) as exc:
        batch.describe_jobs(jobs=[job_id] * 101)
    assert client_error_code(exc) == "ClientException"


@pytest.mark.timeout(30)
def test_ten_thousand_child_array_submits_fast(emu: AWSBatchEmulator) -> None:
    """moto needs ~16 s and ~9,000 threads for this; the emulator keeps it cheap and bounded."""
    batch = emu.client("batch")
    threads_before = threading.active_count()
    started = time.perf_counter()
    parent_id = submit(emu, py("import time; time.sleep(60)"), arrayProperties={"size": 10_000})
    elapsed = time.perf_counter() - started
    print(f"\nSubmitJob with 10,000 children: {elapsed:.3f} s")
    assert elapsed < 1.5
    last = describe(emu, f"{parent_id}:9999")
    assert last["arrayProperties"] == {"index": 9999}
    time.sleep(0.5)
    assert threading.active_count() <= threads_before + 5
    summary = describe(emu, parent_id)["arrayProperties"]["statusSummary"]
    assert summary["RUNNING"] + summary["STARTING"] <= emu.max_vcpus  # bounded concurrency
    assert sum(summary.values()) == 10_000

    batch.terminate_job(jobId=parent_id, reason="cleanup")
    parent = wait_for(emu, parent_id, timeout_s=10)
    assert parent["status"] == "FAILED"
    assert parent["arrayProperties"]["statusSummary"]["FAILED"] == 10_000


# ----------------------------------------------------------------------- test helpers


@pytest.mark.timeout(30)
def test_expire_job(emu: AWSBatchEmulator) -> None:
    job_id = wait_for(emu, submit(emu, py("pass")))["jobId"]
    assert emu.expire_job(job_id) is True
    assert emu.client("batch").describe_jobs(jobs=[job_id])["jobs"] == []
    assert emu.expire_job(job_id) is False


@pytest.mark.timeout(30)
def test_inject_throttling_and_call_counts(emu: AWSBatchEmulator) -> None:
    job_id = wait_for(emu, submit(emu, py("pass")))["jobId"]
    emu.reset_api_calls()

    # botocore's "max_attempts" counts retries; total_max_attempts=1 means no retry.
    no_retries = emu.client("batch", config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    emu.inject_throttling(1)
    with pytest.raises(ClientError) as exc:
        no_retries.describe_jobs(jobs=[job_id])
    assert client_error_code(exc) == "TooManyRequestsException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429

    retrying = emu.client("batch", config=Config(retries={"mode": "standard", "total_max_attempts": 3}))
    emu.inject_throttling(1)
    response = retrying.describe_jobs(jobs=[job_id])
    assert response["jobs"][0]["jobId"] == job_id
    assert response["ResponseMetadata"]["RetryAttempts"] == 1

    assert emu.api_calls == {"DescribeJobs": 3}


@pytest.mark.timeout(60)
def test_concurrent_requests_are_safe(emu: AWSBatchEmulator) -> None:
    """Describe, list, cancel and terminate from many threads: no 500s, consistent answers."""
    batch = emu.client("batch")
    parent_id = submit(emu, py("pass"), arrayProperties={"size": 40})
    ids = [f"{parent_id}:{i}" for i in range(40)]
    errors: list[BaseException] = []

    def hammer(worker: int) -> None:
        client = emu.client("batch")
        try:
            for round_ in range(15):
                client.describe_jobs(jobs=ids)
                client.list_jobs(arrayJobId=parent_id, jobStatus="SUCCEEDED")
                client.list_jobs(jobQueue=emu.job_queue)
                target = ids[(worker * 15 + round_) % 40]
                if round_ % 2:
                    client.cancel_job(jobId=target, reason="race")
                else:
                    client.terminate_job(jobId=target, reason="race")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    parent = wait_for(emu, parent_id)
    summary = parent["arrayProperties"]["statusSummary"]
    assert summary["SUCCEEDED"] + summary["FAILED"] == 40
    assert batch.describe_jobs(jobs=ids[:1])["jobs"][0]["status"] in TERMINAL


# ----------------------------------------------------------------------- scale


def test_python_jobs_are_forked_by_one_warm_server(emu: AWSBatchEmulator) -> None:
    """Each array child is a process of its own, forked by one server: no interpreter start-up per child."""
    before = emu.forked_processes
    job_id = submit(emu, py("import os; print('parent', os.getppid())"), arrayProperties={"size": 4})
    assert wait_for(emu, job_id)["status"] == "SUCCEEDED"
    assert emu.forked_processes - before == 4
    parents = set()
    for index in range(4):
        child = describe(emu, f"{job_id}:{index}")
        parents |= {line for line in log_lines(emu, child["container"]["logStreamName"]) if line.startswith("parent")}
    assert parents == {f"parent {emu.fork_server_pid}"}


@pytest.mark.timeout(300)
def test_a_10000_child_array_costs_no_thread_or_process_per_child(emu: AWSBatchEmulator) -> None:
    import psutil

    threads_before = threading.active_count()
    job_id = submit(emu, py("import time; time.sleep(120)"), arrayProperties={"size": 10_000})
    batch = emu.client("batch")

    def running() -> int:
        return int(batch.describe_jobs(jobs=[job_id])["jobs"][0]["arrayProperties"]["statusSummary"]["RUNNING"])

    deadline = time.monotonic() + 120
    while running() < emu.max_vcpus:
        assert time.monotonic() < deadline, "the array's first children never ran"
        time.sleep(0.1)
    try:
        assert threading.active_count() <= threads_before + 2  # HTTP handler threads come and go
        assert emu.fork_server_pid is not None
        # The running children (max_vcpus of them) are the fork server's; nothing else was started.
        assert len(psutil.Process(emu.fork_server_pid).children()) == emu.max_vcpus
        page = batch.list_jobs(arrayJobId=job_id, jobStatus="RUNNABLE", maxResults=100)
        assert len(page["jobSummaryList"]) == 100 and page.get("nextToken")
    finally:
        batch.terminate_job(jobId=job_id, reason="test done")
    assert wait_for(emu, job_id, timeout_s=120)["status"] == "FAILED"
