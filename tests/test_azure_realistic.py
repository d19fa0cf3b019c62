"""The Azure provider under real-cloud conditions, on the Azure emulator's realistic
profile: transient faults on Batch REST and blob calls, lagging states, expiring
Entra ID tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("azure.batch")
pytest.importorskip("adlfs")

import time  # noqa: E402

import jobs  # noqa: E402
from cloudexec.testing.azure import azure_batch_emulator  # noqa: E402
from cloudexec.testing._hooks import RealisticProfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

from realistic import EXPIRING, FAULTED, RealisticContract, map_2000_items_under_faults  # noqa: E402

pytestmark = [pytest.mark.azure, pytest.mark.realistic]

FAST = {"poll_interval_s": (0.05, 0.3), "lro_polling_interval_s": 0.1}
LIFETIME_S = EXPIRING["credential_lifetime_s"]


@pytest.fixture(scope="module")
def expiring_emu() -> Iterator[Any]:
    profile = RealisticProfile(**EXPIRING)
    with azure_batch_emulator(slots=2, kill_grace_s=1.0, realistic=profile) as emulator:
        yield emulator


class _FrozenToken:
    """A credential that keeps handing out one token: what copying a token once amounts to."""

    def __init__(self, token: Any) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self.token


@pytest.mark.timeout(60)
def test_expired_tokens_are_refused_with_azure_codes(expiring_emu: Any) -> None:
    """Batch and Blob refuse a token past its lifetime with Azure's 401s (expiry is enforced)."""
    from azure.batch import BatchClient
    from azure.core.exceptions import ClientAuthenticationError
    from azure.storage.blob import BlobServiceClient

    fresh = expiring_emu.token_credential()
    batch_token = fresh.get_token("https://batch.core.windows.net//.default")
    blob_token = fresh.get_token("https://storage.azure.com/.default")
    verify = str(expiring_emu.ca_path)
    batch = BatchClient(expiring_emu.batch_url, _FrozenToken(batch_token), connection_verify=verify, retry_total=0)
    blobs = BlobServiceClient(
        expiring_emu.blob_endpoint, credential=_FrozenToken(blob_token), connection_verify=verify, retry_total=0
    )
    refused_before = expiring_emu.faults_injected["credentials:expired"]
    assert [pool.id for pool in batch.list_pools()] == [expiring_emu.pool_id]
    assert expiring_emu.container in [c.name for c in blobs.list_containers()]
    time.sleep(max(0.0, max(batch_token.expires_on, blob_token.expires_on) + 1 - time.time()))
    with pytest.raises(ClientAuthenticationError) as batch_error:
        list(batch.list_pools())
    assert batch_error.value.status_code == 401
    assert batch_error.value.error is not None and batch_error.value.error.code == "AuthenticationFailed"
    with pytest.raises(ClientAuthenticationError) as blob_error:
        list(blobs.list_containers())
    assert blob_error.value.status_code == 401
    assert blob_error.value.error_code == "InvalidAuthenticationInfo"
    assert blob_error.value.response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert expiring_emu.faults_injected["credentials:expired"] - refused_before >= 2
    # The refreshing credential is past its token's expiry too and simply gets a new one.
    assert [pool.id for pool in BatchClient(expiring_emu.batch_url, fresh, connection_verify=verify).list_pools()] == [
        expiring_emu.pool_id
    ]


@pytest.mark.timeout(120)
def test_map_spans_several_token_expiries(expiring_emu: Any) -> None:
    """Batch and Blob follow the executor's token credential, and tasks their managed identity's,
    so a map outliving many tokens completes."""
    credential = expiring_emu.token_credential()
    issued_before = expiring_emu.credentials_issued
    refused_before = expiring_emu.faults_injected["credentials:expired"]
    started = time.monotonic()
    with expiring_emu.executor(credential=credential, **FAST) as ex:
        # This call outlives the tokens its task started with.
        futures = [ex.submit(jobs.slow_double, 0, LIFETIME_S * 1.5)]
        # New calls after each half lifetime: some start after the client's tokens expired.
        for i in range(1, 3):
            time.sleep(LIFETIME_S / 2)
            futures.append(ex.submit(jobs.slow_double, i, 0.2))
        # Each item of the map outlives a token: the map alone spans more than one lifetime.
        results = list(ex.map(jobs.slow_double, range(3, 7), [LIFETIME_S] * 4, timeout=90))
        results = [f.result(timeout=60) for f in futures] + results
    elapsed = time.monotonic() - started
    issued = expiring_emu.credentials_issued - issued_before
    refused = expiring_emu.faults_injected["credentials:expired"] - refused_before
    print(
        f"\nAzure: tokens issued {issued} (client {credential.fetched}, tasks {issued - credential.fetched}), "
        f"elapsed {elapsed:.1f} s ({elapsed / LIFETIME_S:.1f} lifetimes), requests refused as expired {refused}, "
        f"results lost {7 - len(results)}"
    )
    assert results == [2 * i for i in range(7)]
    assert elapsed > 2 * LIFETIME_S, "the test's own sleeps and the map's span two token lifetimes"
    assert credential.fetched > 2, "one token each for Batch and Blob, then refreshed ones"
    assert issued > credential.fetched, "the tasks fetched tokens of their own (managed identity)"


@pytest.mark.timeout(300)
def test_map_of_2000_items_under_transient_faults_loses_nothing() -> None:
    """>=10% of Batch REST and blob calls fail (503 ServerBusy/500/resets); azure-core's retries absorb them."""
    with azure_batch_emulator(slots=4, kill_grace_s=1.0, realistic=RealisticProfile(**FAULTED)) as emu:
        map_2000_items_under_faults(emu, "Azure", **FAST)


@pytest.fixture(scope="module")
def realistic_emu() -> Iterator[Any]:
    with azure_batch_emulator(slots=4, kill_grace_s=1.0, realistic=True) as emulator:
        yield emulator


class TestAzureContractRealistic(RealisticContract):
    """The contract's lag/fault/cancel subset on the Azure emulator's default realistic profile."""

    emulator_name = "Azure"
    executor_defaults = FAST


@pytest.mark.timeout(120)
def test_dropped_job_and_task_creation_is_resent() -> None:
    """azure-core does not resend a POST whose connection dropped; the provider does, safely."""
    quiet = RealisticProfile(status_lag_s=0, visibility_lag_s=0, batch_fault_rate=0, storage_fault_rate=0)
    with azure_batch_emulator(slots=2, kill_grace_s=1.0, realistic=quiet) as emu:
        with emu.executor(**FAST) as ex:
            emu.inject_faults(count=2, kind="reset")  # the next two Batch calls: create_job, create_task
            fut = ex.submit(jobs.double, 21)
            assert fut.result(timeout=60) == 42
            assert ex.submit_map(jobs.double, range(3)).result(timeout=60) == [0, 2, 4]
        assert emu.faults_injected["batch:reset"] == 2
        assert emu.api_calls["create_job"] >= 2  # the first one was dropped and sent again
