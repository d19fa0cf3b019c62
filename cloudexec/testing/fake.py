"""An in-process batch service and its provider: fast tests, and the model of a new provider.

``FakeBatchExecutor`` is a complete cloudexec provider in one module, written
the way a fourth cloud provider would be: a status table (`FakeJobStatus`), a
`Provider` subclass speaking to "the service" (`FakeBatchService`), and a
`BatchExecutor` subclass that wires them to storage. It passes the same
contract suites as the AWS, Azure and local providers.

The service lives in this process. Each job (each array child) runs the real
runner code, ``cloudexec.runner.run_job``, in a thread, against ``memory://``
storage by default, so a test of your pipeline needs no subprocess, no
emulator and no cloud account::

    from cloudexec.testing.fake import FakeBatchExecutor

    with FakeBatchExecutor() as ex:
        assert list(ex.map(abs, [-1, -2])) == [1, 2]

What a thread cannot do, the fake does not pretend to:

- a job that ends its process (``os._exit``, a segfault) ends yours: use
  ``LocalBatchExecutor`` to test such crashes;
- ``memory`` is accepted and not enforced;
- a cancelled or timed-out attempt is reported ended at once (exit code 137,
  as a killed container), but its thread runs on to its end unobserved: a
  thread cannot be killed. Its output and result are ignored.

Data flow (one attempt)::

    FakeBatchProvider.submit(spec) ──► FakeBatchService.submit ──► QUEUED
                                              │ a slot frees
                                              ▼
      attempt thread: run_job(spec.job_url, index) ──► RUNNING
          writes results/<index>.pkl to storage; stdout/stderr kept per attempt
                                              │ exit code 0 / other / cancel / timeout
                                              ▼
                       SUCCEEDED │ retry (QUEUED) │ FAILED with a reason
"""

from __future__ import annotations

import io
import itertools
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, TextIO

from cloudexec._base import BatchExecutor
from cloudexec._provider import JobInfo, JobSpec, JobStatus, Phase, Provider
from cloudexec.errors import SubmissionError

__all__ = ["FakeJobStatus", "FakeBatchService", "FakeBatchProvider", "FakeBatchExecutor", "default_service"]

#: Exit code reported for an attempt the service stopped (cancel, timeout), as
#: a container runtime reports SIGKILL.
KILLED_EXIT_CODE = 137
REASON_TIMEOUT = "Job attempt duration exceeded timeout"
REASON_EXITED = "Essential container in task exited"


class FakeJobStatus(JobStatus):
    """The fake service's job states (they keep the service's names, as every provider's do)."""

    QUEUED = ("QUEUED", Phase.QUEUED)
    RUNNING = ("RUNNING", Phase.RUNNING)
    SUCCEEDED = ("SUCCEEDED", Phase.SUCCEEDED)
    FAILED = ("FAILED", Phase.FAILED)


# -- per-thread console output ------------------------------------------------------------

# A job thread's writes to sys.stdout/sys.stderr go to its attempt's buffer;
# every other thread's writes go where they went before. Keyed by thread id.
_ROUTES: dict[int, dict[str, io.StringIO]] = {}


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr; sends a job thread's text to its attempt."""

    def __init__(self, name: str, fallback: TextIO) -> None:
        self._name = name
        self.fallback = fallback

    def write(self, text: str) -> int:
        route = _ROUTES.get(threading.get_ident())
        if route is None:
            return self.fallback.write(text)
        return route[self._name].write(text)

    def flush(self) -> None:
        if threading.get_ident() not in _ROUTES:
            self.fallback.flush()

    def writable(self) -> bool:
        return True


def _route_console() -> None:
    # Re-checked at every attempt: test runners swap sys.stdout between tests.
    for name in ("stdout", "stderr"):
        current = getattr(sys, name)
        if not isinstance(current, _RoutedStream):
            setattr(sys, name, _RoutedStream(name, current))


# -- the service -----------------------------------------------------------------------------


class _Task:
    """One single job or array child, with the state the service reports about it."""

    def __init__(self, job: _Job, index: int | None) -> None:
        self.job = job
        self.index = index
        self.status = FakeJobStatus.QUEUED
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.attempts = 0
        self.logs: dict[str, io.StringIO] | None = None
        self.stop_reason: str | None = None
        self.stopped = threading.Event()
        self.waits: list[_Task] = []  # tasks that must succeed before this one is queued

    @property
    def provider_job_id(self) -> str:
        return self.job.ref if self.index is None else f"{self.job.ref}:{self.index}"

    def info(self) -> JobInfo:
        return JobInfo(
            status=self.status,
            exit_code=self.exit_code,
            status_reason=self.reason,
            provider_job_id=self.provider_job_id,
            attempts=self.attempts,
        )


class _Job:
    def __init__(self, ref: str, spec: JobSpec) -> None:
        self.ref = ref
        self.spec = spec
        indices: Sequence[int | None] = range(spec.array_size) if spec.array_size else [None]
        self.tasks = [_Task(self, i) for i in indices]

    def info(self) -> JobInfo:
        if self.spec.array_size is None:
            return self.tasks[0].info()
        counts = Counter(t.status.value for t in self.tasks)
        failed = [t for t in self.tasks if t.status is FakeJobStatus.FAILED]
        if all(t.status.terminal for t in self.tasks):
            status = FakeJobStatus.FAILED if failed else FakeJobStatus.SUCCEEDED
        elif any(t.status is not FakeJobStatus.QUEUED for t in self.tasks):
            status = FakeJobStatus.RUNNING
        else:
            status = FakeJobStatus.QUEUED
        reasons = {t.reason for t in failed}
        reason = reasons.pop() if len(reasons) == 1 else (f"{len(failed)} children failed" if failed else None)
        return JobInfo(
            status=status,
            status_reason=reason if status.terminal else None,
            provider_job_id=self.ref,
            status_counts={s.value: counts.get(s.value, 0) for s in FakeJobStatus},
        )


class FakeBatchService:
    """The in-process "cloud": jobs by reference, a pool of slots, call counts.

    Args:
        slots: attempts that run at once (threads).
        runner: what runs an attempt (default ``cloudexec.runner.run_job``);
            called as ``runner(job_url, index, environ)`` with the array index
            (``None`` for a single job) and the job's environment (its signing
            key among it); returns an exit code.
    """

    def __init__(self, slots: int = 8, runner: Any = None) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive int; got {slots!r}")
        self.slots = slots
        self._runner = runner
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._queue: list[_Task] = []
        self._held: list[_Task] = []  # waiting for their dependencies
        self._running = 0
        self._ids = itertools.count()
        #: Calls made to the service, by verb (``submit``, ``describe``, …).
        self.api_calls: Counter[str] = Counter()

    # -- the API the provider speaks ------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        """Queue a job; return its reference."""
        with self._lock:
            self.api_calls["submit"] += 1
            ref = f"fake-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            job = _Job(ref, spec)
            self._link(job)
            self._jobs[ref] = job
            for task in job.tasks:
                (self._held if task.waits else self._queue).append(task)
        self._start_queued()
        return ref

    def _link(self, job: _Job) -> None:
        """Each task's dependencies, from ``spec.depends_on`` (caller holds the lock)."""
        for dep in job.spec.depends_on:
            upstream = job if dep.kind == "sequential" else self._jobs.get(dep.ref or "")
            if upstream is None:
                raise SubmissionError(f"job {job.spec.job_id}: dependency {dep.ref} is not a job of this service",
                                      code="UnknownDependency", job_id=job.spec.job_id)
            for task, waits in zip(job.tasks, dep.waits(job.tasks, upstream.tasks)):
                task.waits.extend(waits)

    def _release(self) -> None:
        """Queue held tasks whose dependencies succeeded; fail those with a failed one (lock held)."""
        changed = True
        while changed:
            changed = False
            for task in list(self._held):
                failed = next((t for t in task.waits if t.status is FakeJobStatus.FAILED), None)
                if failed is not None:
                    self._held.remove(task)
                    self._end(task, FakeJobStatus.FAILED, None,
                              f"Dependency {failed.provider_job_id} failed: {failed.reason or 'no reason given'}")
                    changed = True
                elif all(t.status is FakeJobStatus.SUCCEEDED for t in task.waits):
                    self._held.remove(task)
                    self._queue.append(task)

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        """Every known job among ``refs``, in one call."""
        with self._lock:
            self.api_calls["describe"] += 1
            return {ref: self._jobs[ref].info() for ref in refs if ref in self._jobs}

    def children(self, ref: str) -> list[JobInfo] | None:
        """Every child of an array job, in index order (``None``: unknown job)."""
        with self._lock:
            self.api_calls["children"] += 1
            job = self._jobs.get(ref)
            return None if job is None else [t.info() for t in job.tasks]

    def cancel(self, ref: str, reason: str, index: int | None = None) -> None:
        """Stop a job (or one child): queued tasks end at once, running ones are stopped."""
        with self._lock:
            self.api_calls["cancel"] += 1
            job = self._jobs.get(ref)
            if job is None:
                return
            for task in job.tasks:
                if index is not None and task.index != index or task.status.terminal:
                    continue
                if task in self._queue or task in self._held:
                    (self._queue if task in self._queue else self._held).remove(task)
                    self._end(task, FakeJobStatus.FAILED, None, reason)
                else:
                    task.stop_reason = reason
                    task.stopped.set()
        self._start_queued()  # settles the dependents of what was cancelled

    def log(self, ref: str, index: int | None, stream: str) -> str | None:
        """The console output of a task's latest attempt (``None`` before it started)."""
        with self._lock:
            self.api_calls["log"] += 1
            job = self._jobs.get(ref)
            if job is None:
                return None
            task = job.tasks[index or 0]
            return None if task.logs is None else task.logs[stream].getvalue()

    def job_url(self, provider_job_id: str) -> str | None:
        """The storage URL of a job named by its reference (or a child's ``ref:index``)."""
        with self._lock:
            job = self._jobs.get(provider_job_id.rsplit(":", 1)[0]) or self._jobs.get(provider_job_id)
            return None if job is None else job.spec.job_url

    # -- test hooks --------------------------------------------------------------------
    def expire_job(self, ref: str) -> bool:
        """Forget a job, as services forget ended jobs after a while; ``True`` if it was known."""
        with self._lock:
            return self._jobs.pop(ref, None) is not None

    # -- the scheduler -------------------------------------------------------------------
    def _end(self, task: _Task, status: FakeJobStatus, exit_code: int | None, reason: str | None) -> None:
        task.status, task.exit_code, task.reason = status, exit_code, reason

    def _start_queued(self) -> None:
        with self._lock:
            self._release()
            while self._queue and self._running < self.slots:
                task = self._queue.pop(0)
                self._running += 1
                task.status = FakeJobStatus.RUNNING
                task.attempts += 1
                task.logs = {"stdout": io.StringIO(), "stderr": io.StringIO()}
                threading.Thread(target=self._attempt, args=(task,), name=f"fake-{task.provider_job_id}",
                                 daemon=True).start()

    def _attempt(self, task: _Task) -> None:
        logs = task.logs or {"stdout": io.StringIO(), "stderr": io.StringIO()}
        codes: list[int] = []
        spec = task.job.spec

        def run() -> None:
            _ROUTES[threading.get_ident()] = logs
            try:
                if self._runner is not None:
                    codes.append(self._runner(spec.job_url, task.index, dict(spec.environment)))
                else:
                    from cloudexec import runner

                    # The job's environment (its key) is the spec's: no process env here.
                    codes.append(runner.run_job(spec.job_url, index=task.index, environ=spec.environment))
            finally:
                _ROUTES.pop(threading.get_ident(), None)

        _route_console()
        worker = threading.Thread(target=run, name=f"fake-run-{task.provider_job_id}", daemon=True)
        worker.start()
        timeout_s = spec.settings.timeout_s
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        timed_out = False
        while worker.is_alive():
            if task.stopped.wait(0.02):
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
        with self._lock:
            self._running -= 1
            if task.stopped.is_set():
                self._end(task, FakeJobStatus.FAILED, KILLED_EXIT_CODE, task.stop_reason)
            elif timed_out:
                # Like AWS Batch: an attempt that timed out is not retried.
                self._end(task, FakeJobStatus.FAILED, KILLED_EXIT_CODE, REASON_TIMEOUT)
            else:
                code = codes[0] if codes else 1
                if code == 0:
                    self._end(task, FakeJobStatus.SUCCEEDED, 0, None)
                elif task.attempts <= (spec.settings.retries or 0):
                    task.status = FakeJobStatus.QUEUED
                    self._queue.append(task)
                else:
                    self._end(task, FakeJobStatus.FAILED, code, REASON_EXITED)
        self._start_queued()


_DEFAULT: FakeBatchService | None = None
_DEFAULT_LOCK = threading.Lock()


def default_service() -> FakeBatchService:
    """The process-wide service that executors share unless given their own (so ``attach`` works across them)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = FakeBatchService()
        return _DEFAULT


# -- the provider --------------------------------------------------------------------------


class FakeBatchProvider(Provider):
    """The `Provider` verbs, each one call to the `FakeBatchService`."""

    name: ClassVar[str] = "fake"
    status_enum: ClassVar[type[JobStatus]] = FakeJobStatus
    poll_interval_s: ClassVar[tuple[float, float]] = (0.02, 0.2)
    default_max_workers: ClassVar[int] = 100
    dependency_kinds: ClassVar[frozenset[str]] = frozenset({"job", "n_to_n", "sequential"})

    def __init__(self, service: FakeBatchService | None = None) -> None:
        self.service = service if service is not None else default_service()

    def submit(self, spec: JobSpec) -> str:
        if spec.settings.gpus:
            # Nothing is left behind: the service never saw the job.
            raise SubmissionError(
                f"job {spec.job_id}: the fake service has no GPUs (gpus={spec.settings.gpus}); drop the setting",
                code="NoGPUs",
                job_id=spec.job_id,
            )
        return self.service.submit(spec)

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        return self.service.describe(refs) if refs else {}

    def describe_children(self, ref: str, size: int) -> list[JobInfo | None]:
        infos = self.service.children(ref)
        return [None] * size if infos is None else list(infos)

    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        self.service.cancel(ref, reason, index)

    def read_log(self, ref: str, *, index: int | None = None, stream: str = "stdout") -> str | None:
        return self.service.log(ref, index, stream)

    def find_job_url(self, provider_job_id: str) -> str | None:
        return self.service.job_url(provider_job_id)


class FakeBatchExecutor(BatchExecutor):
    """A `BatchExecutor` on the in-process `FakeBatchService` (see the module docstring).

    Args:
        io_url: storage for calls and results (default: a new ``memory://``
            folder); executors that should attach each other's jobs share it.
        max_workers: jobs in flight at once (an array counts once).
        service: the service to use (default: the process-wide one).
        poll_interval_s: (first, longest) pause between status polls.
        **settings: default job settings (``timeout``, ``retries``, …).
    """

    def __init__(
        self,
        io_url: str | None = None,
        max_workers: int | None = None,
        *,
        service: FakeBatchService | None = None,
        poll_interval_s: tuple[float, float] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(
            FakeBatchProvider(service),
            io_url if io_url is not None else f"memory://cloudexec-fake/{uuid.uuid4().hex}",
            max_workers=max_workers,
            poll_interval_s=poll_interval_s,
            **settings,
        )
