"""Helpers for the realistic-profile tests: counting the SDKs' own retries, the faulted 2,000-item map."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import logging
from collections.abc import Iterator
from typing import Any

# botocore (and aiobotocore, which reuses its logger) writes this record for every retry.
_BOTOCORE_LOGGER = "botocore.retries.standard"
_BOTOCORE_PREFIX = "Retry needed, retrying"

# The Azure SDKs do not log retries: their retry policies' increment() says whether
# to retry, so that is what is counted ("module:Class").
_AZURE_POLICIES = (
    "azure.core.pipeline.policies._retry:RetryPolicyBase",
    "azure.storage.blob._shared.policies:StorageRetryPolicy",
)


class _BotocoreRetries(logging.Handler):
    def __init__(self, counts: collections.Counter[str]) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(_BOTOCORE_PREFIX):
            self.counts["botocore"] += 1


@contextlib.contextmanager
def count_sdk_retries() -> Iterator[collections.Counter[str]]:
    """Count the retries botocore/aiobotocore and the Azure SDKs make inside the block."""
    counts: collections.Counter[str] = collections.Counter()
    handler = _BotocoreRetries(counts)
    logger = logging.getLogger(_BOTOCORE_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    patched: list[tuple[Any, Any]] = []
    for spec in _AZURE_POLICIES:
        module_name, class_name = spec.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        original = cls.__dict__["increment"]

        @functools.wraps(original)
        def increment(self: Any, *args: Any, __original: Any = original, __name: str = class_name, **kwargs: Any) -> Any:
            retry = __original(self, *args, **kwargs)
            if retry:
                counts[__name] += 1
            return retry

        cls.increment = increment
        patched.append((cls, original))
    try:
        yield counts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for cls, original in patched:
            cls.increment = original


# The contract tests that status lag, transient faults and cancellation exercise,
# run a second time on each emulator's realistic profile. The rest of the contract
# (settings, pickling, the crash matrix...) does not depend on timing or faults
# and would only double the CI time. Order under faults is the 2,000-item maps'
# own test (test_<provider>_realistic.py); a 25-job map of cold processes here
# would only measure the machine.

import pytest  # noqa: E402

from contract import ExecutorContract, executor_factory  # noqa: E402

REALISTIC_SUBSET = frozenset(
    {
        "test_submit_returns_result_and_properties",
        "test_map_raises_at_the_failing_item",
        "test_array_with_a_failing_child",
        "test_cancel_running_job_aborts_it_at_the_provider",
        "test_cancel_array_terminates_every_child",
        "test_cancel_pending_and_finished",
        "test_attach_by_job_id_from_another_executor",
        "test_depend_chain_with_futures_nested_in_containers_and_kwargs",
        "test_depend_failed_upstream_fails_dependents_without_running",
    }
)


class RealisticContract(ExecutorContract):
    """:data:`REALISTIC_SUBSET` of the executor contract on an emulator started with ``realistic=True``.

    A subclass names the emulator and the executors' defaults; its module gives
    the ``realistic_emu`` fixture (the running emulator).
    """

    timeout_exit_code = 143
    memory_limit = None
    #: The emulator's name, for the faults line the suite prints.
    emulator_name = ""
    #: Keyword arguments of every executor the tests make (poll intervals).
    executor_defaults: dict[str, Any] = {}

    @pytest.fixture
    def make_executor(self, realistic_emu: Any) -> Iterator[Any]:
        def build(**kwargs: Any) -> Any:
            return realistic_emu.executor(**{**self.executor_defaults, **kwargs})

        yield from executor_factory(build, shutdown_limit_s=30)
        print(f"\n{self.emulator_name} realistic contract: faults so far {dict(realistic_emu.faults_injected)}")


for _name in dir(ExecutorContract):
    if _name.startswith("test_") and _name not in REALISTIC_SUBSET:
        # None is not collected by pytest: the test is left out of this class only.
        setattr(RealisticContract, _name, None)



#: Credentials that expire after 3 s, statuses lagging, no faults (the credential-rotation tests' profile).
EXPIRING = dict(status_lag_s=0.2, visibility_lag_s=0.1, batch_fault_rate=0.0, storage_fault_rate=0.0,
                credential_lifetime_s=3.0)

#: >= 10% of Batch and storage calls faulted, statuses lagging (the 2,000-item map's profile).
FAULTED = dict(status_lag_s=0.2, visibility_lag_s=0.1, batch_fault_rate=0.12, storage_fault_rate=0.12, seed=8)


def map_2000_items_under_faults(emu: Any, name: str, **executor_kwargs: Any) -> None:
    """Run a 2,000-item map on ``emu`` (started with the `FAULTED` profile): every result, exactly once, in order."""
    import jobs

    # The rate alone may miss the few Batch calls a chunked map makes: a throttle
    # and a reset are certain on each side on top of it.
    for target in ("batch", "storage"):
        emu.inject_faults(count=1, kind="throttle", target=target)
        emu.inject_faults(count=1, kind="reset", target=target)
    with count_sdk_retries() as retries:
        with emu.executor(**executor_kwargs) as ex:
            results = list(ex.map(jobs.double, range(2000), chunksize=250, timeout=240))
    faults = emu.faults_injected
    calls = emu.api_calls
    print(
        f"\n{name}: faults injected {dict(faults)} (total {sum(faults.values())}), "
        f"SDK retries {sum(retries.values())}, Batch calls {sum(calls.values())}, "
        f"results lost {2000 - len(results)}"
    )
    assert results == [2 * i for i in range(2000)]  # every result, exactly once, in order
    assert faults["batch:throttle"] + faults["batch:error"] + faults["batch:reset"] > 0
    assert faults["storage:throttle"] + faults["storage:error"] + faults["storage:reset"] > 0
