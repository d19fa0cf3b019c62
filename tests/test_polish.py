"""Everyday behaviour a user meets in the first hour: the ``cloudexec`` logger (and no
prints), reprs, ``help(cloudexec)``, ``_max_workers``, clear argument errors, local
wording, attached futures that show their state at once, ``map`` that leaves finished
arrays alone."""

from __future__ import annotations

import ast
import dataclasses
import logging
import pydoc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobs
from cloudexec import JobInfo, LocalBatchExecutor
from cloudexec._log import RepeatFilter, log
from cloudexec.errors import JobFailedError
from cloudexec.testing.fake import FakeBatchExecutor, FakeBatchService, FakeJobStatus

PACKAGE = Path(__file__).resolve().parent.parent / "cloudexec"
FAST_POLL = (0.02, 0.2)


# -- logging ---------------------------------------------------------------------


def test_identical_warnings_are_folded() -> None:
    now = [0.0]
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("cloudexec-test-fold")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    folder = RepeatFilter(window_s=60, clock=lambda: now[0])
    logger.addFilter(folder)

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    for _ in range(1000):
        logger.warning("describing %d jobs failed (will retry): %s", 3, "timeout")
    logger.warning("another message")
    logger.info("info is never held back")
    logger.info("info is never held back")
    assert [r.getMessage() for r in records] == [
        "describing 3 jobs failed (will retry): timeout",
        "another message",
        "info is never held back",
        "info is never held back",
    ]
    now[0] = 61.0
    logger.warning("describing %d jobs failed (will retry): %s", 3, "timeout")
    assert records[-1].getMessage() == (
        "describing 3 jobs failed (will retry): timeout (and 999 identical messages in the last 60 s)"
    )


def test_the_library_logger_folds_repeats() -> None:
    assert log.name == "cloudexec"
    assert any(isinstance(f, RepeatFilter) for f in log.filters)


def _calls_print(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def test_the_library_never_prints() -> None:
    # The demo is a script; the runner and its output capture write to the job's own
    # stderr, which is the job's log, not the user's console.
    allowed = {"demo.py", "cli.py"}
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed:
            continue
        lines = _calls_print(ast.parse(path.read_text()))
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert not offenders, f"print() in library modules (log through cloudexec._log.log): {offenders}"


# -- help, reprs, executor attributes ---------------------------------------------


def test_help_cloudexec_is_a_guide() -> None:
    import cloudexec

    text = pydoc.render_doc(cloudexec, renderer=pydoc.plaintext)
    for needle in ("LocalBatchExecutor", "AWSBatchExecutor", "AzureBatchExecutor", "submit_map", "attach",
                   "JobFailedError", "cloudexec.testing", 'getLogger("cloudexec")'):
        assert needle in text, needle
    # The example in the docstring runs as written.
    doc = cloudexec.__doc__ or ""
    lines = []
    for line in doc.split("::\n\n", 1)[1].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    example = "\n".join(lines)
    assert "LocalBatchExecutor(max_workers=4)" in example
    namespace: dict[str, Any] = {}
    exec(compile(example.replace("print(", "_ = ("), "<cloudexec docstring>", "exec"), namespace)


@pytest.fixture
def local(io_root: str) -> Iterator[LocalBatchExecutor]:
    with LocalBatchExecutor(io_root, max_workers=3, poll_interval_s=FAST_POLL) as ex:
        yield ex


def test_executor_repr_and_max_workers(local: LocalBatchExecutor) -> None:
    assert local._max_workers == 3 == local.max_workers
    text = repr(local)
    assert text.startswith("<LocalBatchExecutor provider=local io_url='file://") and "max_workers=3" in text
    local.shutdown()
    assert repr(local).endswith(" shutdown>")


def test_max_workers_matches_the_process_pool_attribute() -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        assert pool._max_workers == 2  # type: ignore[attr-defined]
    with FakeBatchExecutor(max_workers=5) as ex:
        assert ex._max_workers == 5


def test_future_repr_shows_job_provider_and_status(local: LocalBatchExecutor) -> None:
    future = local.submit(jobs.double, 4)
    assert future.result(timeout=60) == 8
    assert future.job_status is not None
    text = repr(future)
    assert f"job={future.job_id}" in text and "provider=local" in text
    assert re.search(r"state=finished returned int .* status=Succeeded>$", text), text


def test_attached_future_of_a_finished_job_is_finished_at_once(io_root: str) -> None:
    with LocalBatchExecutor(io_root, poll_interval_s=FAST_POLL) as first:
        done = first.submit(jobs.double, 21)
        assert done.result(timeout=60) == 42
        array = first.submit_map(jobs.double, [1, 2, 3])
        assert array.result(timeout=60) == [2, 4, 6]
    # A slow poller: only attach itself can have brought the state up to date.
    with LocalBatchExecutor(io_root, poll_interval_s=(30.0, 30.0)) as second:
        attached = second.attach(done.job_id)
        assert attached.done(), repr(attached)
        assert "state=finished" in repr(attached) and "status=Succeeded" in repr(attached)
        assert attached.result(timeout=0) == 42
        attached_array = second.attach(array.job_id)
        assert attached_array.done() and all(c.done() for c in attached_array.children)  # type: ignore[attr-defined]
        assert attached_array.result(timeout=0) == [2, 4, 6]
        second.shutdown(wait=True)


def test_local_failure_reason_names_no_container(local: LocalBatchExecutor) -> None:
    future = local.submit(jobs.exit_hard, 3)
    with pytest.raises(JobFailedError) as info:
        future.result(timeout=60)
    assert future.job_exit_code == 3
    reason = future.job_status_reason or ""
    assert "container" not in reason.lower() and "process" in reason, reason
    assert "container" not in str(info.value).split("\n")[0].lower()
    raising = local.submit(int, "x")
    with pytest.raises(ValueError):
        raising.result(timeout=60)
    assert "container" not in (raising.job_status_reason or "").lower()


def test_map_does_not_terminate_an_array_whose_results_were_all_read() -> None:
    service = FakeBatchService(slots=4)
    cancels: list[str] = []
    original = service.cancel

    def spy(ref: str, reason: str, index: int | None = None) -> None:
        cancels.append(ref)
        original(ref, reason, index)

    service.cancel = spy  # type: ignore[method-assign]
    # As AWS does, the service reports the array running for a while after its
    # last child ended.
    lagging = [True]
    describe = service.describe

    def lagging_describe(refs: Any) -> dict[str, JobInfo]:
        infos = describe(refs)
        if lagging[0]:
            infos = {ref: dataclasses.replace(info, status=FakeJobStatus.RUNNING) for ref, info in infos.items()}
        return infos

    service.describe = lagging_describe  # type: ignore[method-assign]
    with FakeBatchExecutor(service=service, poll_interval_s=FAST_POLL) as ex:
        assert list(ex.map(abs, [-1, -2, -3], timeout=60)) == [1, 2, 3]
        lagging[0] = False
    assert cancels == []
    # Abandoning a map early still cancels what is left.
    with FakeBatchExecutor(service=service, poll_interval_s=FAST_POLL) as ex:
        results = ex.map(jobs.nap, [5.0, 5.0], timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)
        assert cancels


# -- argument errors that name the real problem -------------------------------------


@pytest.mark.parametrize(
    "url, needle",
    [
        ("s3://b/x", "the bucket name 'b' is 1 character long, but S3 bucket names are 3 to 63"),
        ("s3://" + "a" * 64, "is 64 characters long"),
        ("s3://My_Bucket/x", "'My_Bucket' is not a valid S3 bucket name"),
        ("gs://bucket/x", "io_bucket must be an s3:// URL"),
        (None, "io_bucket must be an s3:// URL"),
    ],
)
def test_io_bucket_errors_name_the_rule(url: Any, needle: str) -> None:
    pytest.importorskip("boto3")
    from cloudexec.providers.aws import AWSBatchExecutor

    with pytest.raises(ValueError) as info:
        AWSBatchExecutor(job_queue="q", job_definition="d", io_bucket=url)
    assert needle in str(info.value)


def test_azure_emulator_repr_without_starting_it() -> None:
    pytest.importorskip("azure.batch")
    from cloudexec.testing.azure import AzureBatchEmulator

    emulator = AzureBatchEmulator(slots=2, pool_id="pool-a")
    text = repr(emulator)
    assert text.startswith("AzureBatchEmulator(not running, pool_id='pool-a'") and "slots=2" in text
    assert emulator.account_key not in text
