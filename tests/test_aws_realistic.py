"""The AWS provider under real-cloud conditions, on the AWS emulator's realistic profile:
rotating credentials, transient faults on Batch and S3, lagging statuses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import jobs
from cloudexec.testing import aws_batch_emulator
from cloudexec.testing._hooks import RealisticProfile
from realistic import EXPIRING, FAULTED, RealisticContract, map_2000_items_under_faults

pytestmark = [pytest.mark.aws, pytest.mark.realistic]

FAST_POLL = (0.05, 0.3)
LIFETIME_S = EXPIRING["credential_lifetime_s"]


@pytest.fixture(scope="module")
def rotating_emu() -> Iterator[Any]:
    profile = RealisticProfile(**EXPIRING)
    with aws_batch_emulator(timeout_scale=0.02, max_vcpus=2, realistic=profile) as emulator:
        yield emulator


def test_expired_keys_are_refused_with_aws_codes(rotating_emu: Any) -> None:
    """The emulator refuses stale temporary keys on Batch and S3, as AWS does."""
    issued = rotating_emu.issue_credentials()
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = boto3.Session(
        aws_access_key_id=issued.access_key_id,
        aws_secret_access_key=issued.secret_access_key,
        aws_session_token=issued.session_token,
        region_name=rotating_emu.region,
    )
    config = Config(retries={"mode": "standard", "max_attempts": 1})
    batch = session.client("batch", endpoint_url=rotating_emu.endpoint_url, config=config)
    s3 = session.client("s3", endpoint_url=rotating_emu.endpoint_url, config=config)
    batch.describe_jobs(jobs=[])
    s3.list_objects_v2(Bucket=rotating_emu.bucket)
    time.sleep(max(0.0, issued.expires_at - time.time()) + 0.1)
    with pytest.raises(ClientError) as batch_error:
        batch.describe_jobs(jobs=[])
    assert batch_error.value.response["Error"]["Code"] == "ExpiredTokenException"
    with pytest.raises(ClientError) as s3_error:
        s3.list_objects_v2(Bucket=rotating_emu.bucket)
    assert s3_error.value.response["Error"]["Code"] == "ExpiredToken"


@pytest.mark.timeout(90)
def test_map_spans_several_credential_expiries(rotating_emu: Any) -> None:
    """S3 follows the session's refreshing credentials, so a map outliving them completes."""
    session = rotating_emu.refreshing_session()
    issued_before = rotating_emu.credentials_issued
    started = time.monotonic()
    with rotating_emu.executor(session=session, poll_interval_s=FAST_POLL) as ex:
        futures = [ex.submit(jobs.slow_double, i, 0.2) for i in range(4)]
        # Spread the work over several lifetimes: a new call after each expiry.
        for i in range(4, 8):
            time.sleep(LIFETIME_S / 2)
            futures.append(ex.submit(jobs.slow_double, i, 0.2))
        results = list(ex.map(jobs.slow_double, range(8, 10), timeout=60))
        results = [f.result(timeout=60) for f in futures] + results
    elapsed = time.monotonic() - started
    rotations = rotating_emu.credentials_issued - issued_before
    print(f"\ncredentials issued: {rotations}, elapsed {elapsed:.1f} s, "
          f"expired-token refusals: {rotating_emu.faults_injected['credentials:expired']}")
    assert results == [2 * i for i in range(10)]
    assert elapsed > 2 * LIFETIME_S, "the run must outlive several credential lifetimes"
    assert rotations >= 3


@pytest.mark.timeout(300)
def test_map_of_2000_items_under_transient_faults_loses_nothing() -> None:
    """>=10% of Batch and S3 calls fail (429/5xx/resets); botocore's retries absorb them."""
    with aws_batch_emulator(timeout_scale=0.02, realistic=RealisticProfile(**FAULTED)) as emu:
        map_2000_items_under_faults(emu, "AWS", poll_interval_s=FAST_POLL)


@pytest.fixture(scope="module")
def realistic_emu() -> Iterator[Any]:
    with aws_batch_emulator(timeout_scale=0.02, max_vcpus=4, realistic=True) as emulator:
        yield emulator


class TestAWSContractRealistic(RealisticContract):
    """The contract's lag/fault/cancel subset on the AWS emulator's default realistic profile."""

    emulator_name = "AWS"
    executor_defaults = {"poll_interval_s": FAST_POLL}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["lost", "error", "reset"])
def test_submit_whose_answer_is_lost_or_failed_starts_exactly_one_job(kind: str) -> None:
    """SubmitJob has no idempotency token: after a lost answer the job is looked up, not resent blindly."""
    quiet = RealisticProfile(status_lag_s=0, visibility_lag_s=0.2, batch_fault_rate=0, storage_fault_rate=0)
    with aws_batch_emulator(timeout_scale=0.02, max_vcpus=2, realistic=quiet) as emu:
        with emu.executor(poll_interval_s=FAST_POLL) as ex:
            emu.reset_api_calls()
            emu.inject_faults(count=1, kind=kind, target="batch")  # the next Batch call: SubmitJob
            single = ex.with_settings(job_name="once-single").submit(jobs.double, 21)
            assert single.result(timeout=60) == 42
            emu.inject_faults(count=1, kind=kind, target="batch")
            array = ex.with_settings(job_name="once-array").submit_map(jobs.double, range(3))
            assert array.result(timeout=60) == [0, 2, 4]
            batch = emu.client("batch")
            for name in ("once-single", "once-array"):
                found = batch.list_jobs(jobQueue=emu.job_queue, filters=[{"name": "JOB_NAME", "values": [name]}])
                assert len(found["jobSummaryList"]) == 1, (kind, name, found["jobSummaryList"])
        calls = emu.api_calls
    print(f"\n{kind}: SubmitJob calls {calls['SubmitJob']}, ListJobs lookups {calls['ListJobs']}")
    assert emu.faults_injected[f"batch:{kind}"] == 2
    if kind == "lost":  # the job was created: found by the lookup, never resent
        assert calls["SubmitJob"] == 2 and calls["ListJobs"] >= 2
    elif kind == "reset":  # nothing was created: looked up, not found, sent again
        assert calls["SubmitJob"] == 4 and calls["ListJobs"] >= 2
