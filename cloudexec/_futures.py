"""The futures, the job records and the state an executor shares with its manager thread.

Both sides import this module and nothing of each other::

    _base.BatchExecutor ──creates──► _Core ◄──polls through── _poller.Manager
          │                           │  provider, store, keys, futures by id
          └──returns── BatchFuture ───┘  (ArrayFuture: its children in _children)
                          ▲
                          └── the manager changes a future only through its
                              _mark_running / _set_info / _finish methods

`_Core` holds the manager as a `ManagerLike` (the calls the futures and the
executor make on it), built by a factory the executor passes in, so that no
import cycle joins this module, `_base` and `_poller`.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import Any, Generic, Protocol, TypeVar

from cloudexec._log import log
from cloudexec import _keys, _payload, _progress
from cloudexec._children import Children
from cloudexec._provider import JobInfo, JobStatus, Provider
from cloudexec._storage import Store
from cloudexec._version import __version__
from cloudexec.errors import JobFailedError
from cloudexec.settings import JobSettings

__all__ = [
    "BatchFuture",
    "ArrayFuture",
    "ManagerLike",
    "CANCEL_REASON",
    "job_failed",
    "succeeded",
    "how_it_ended",
    "upstream_hint",
]

T = TypeVar("T")

CANCEL_REASON = "Terminated by cloudexec (future.cancel())"
#: The runner's exit code when a stored call or input fails verification
#: (kept equal to ``cloudexec.runner.EXIT_INTEGRITY``; the runner must not import this module).
EXIT_INTEGRITY = 3
# How long a non-terminal property value may be served from the cache before
# a property read asks the provider again.
_FRESH_S = 1.0
# How long a property of a future resolved before its job's reported end waits
# for that end, and how often it asks meanwhile (`BatchFuture._ended_info`).
_ENDED_WAIT_S = 30.0
_ENDED_POLL_S = 0.25


#: Lines of each log stream a `JobFailedError` quotes.
_LOG_TAIL_LINES = 10


class _JobRecord:
    """One provider job the executor tracks (a single job or a whole array)."""

    def __init__(
        self,
        *,
        job_id: str,
        store: Store,
        name: str,
        settings: JobSettings,
        size: int | None,
        chunksize: int = 1,
        n_items: int = 1,
        call: bytes | memoryview | None = None,
        inputs: bytes | bytearray | None = None,
        function: str = "",
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.name = name
        self.settings = settings
        self.size = size  # None: single job
        self.chunksize = chunksize
        self.n_items = n_items
        self.call = call
        self.inputs = inputs
        self.function = function
        self.ref: str | None = None
        self.future: BatchFuture[Any] | None = None
        # An array's children: state bytes, and futures only for those asked for.
        self.children = Children(0, job_id)
        self.done_below = 0  # every child below this index has its result: results are listed from here
        self.deferred: set[int] = set()  # children whose stored result is an error, kept until the end
        self.missing_polls = 0
        self.first_missing: float | None = None
        self.attached = False  # re-attached jobs take no worker slot
        self.manifest_pending = False  # the provider's id is not in the stored manifest yet
        self.stored = False  # call, inputs and manifest are written (a submission held back retries)
        # map()'s own array: its iterator takes each child's values, and the
        # array future keeps no list of them all (a 100,000-item map).
        self.streaming = False
        # Failed attempts in a row to learn the job's state (describe or a
        # storage read raising), since when, and the last error.
        self.failures = 0
        self.failing_since: float | None = None
        self.last_error = ""
        # Result objects that failed verification, by child index (None: a
        # single job): when first seen so, and their size then.
        self.unverified: dict[int | None, tuple[float, int]] = {}
        # Futures passed as arguments (see cloudexec._depends): what the job
        # waits for until it is submitted, then only their ids, for messages.
        self.depends: list[tuple[str, BatchFuture[Any] | None]] = []
        self.upstream_ids: list[tuple[str, weakref.ref[BatchFuture[Any]]]] = []
        self.held = False  # handed over with dependencies: the service holds it
        self.client_hold = False  # the provider could not hold it: the manager does

    @property
    def is_array(self) -> bool:
        return self.size is not None

    def manifest(self, provider: str) -> dict[str, Any]:
        return {
            "format": 1,
            "job_id": self.job_id,
            "kind": "array" if self.is_array else "single",
            "size": self.size,
            "chunksize": self.chunksize,
            "n_items": self.n_items,
            "name": self.name,
            "function": self.function,
            "provider": provider,
            "provider_ref": self.ref,
            "settings": self.settings.as_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "cloudexec": __version__,
            "python": _payload.PY_VERSION,
        }


class BatchFuture(Future[T], Generic[T]):
    """A `concurrent.futures.Future` for one batch job (or one array child).

    It works wherever a Future does (``wait``, ``as_completed``,
    ``asyncio.wrap_future``) and also tells what the provider knows of the
    job. Property values are live while the job runs (asked of the provider at
    most about once a second) and fixed once it ended; a property the provider
    no longer knows (metadata expired) reads ``None``.

    ``cancel()`` also works on a job that already runs: it is terminated at the
    provider with a reason saying cloudexec did it, and the future ends
    cancelled. It never raises.
    """

    def __init__(self, core: _Core, record: _JobRecord, index: int | None = None) -> None:
        super().__init__()
        self._core = core
        self._record = record
        self._index = index
        self._info: JobInfo | None = None
        self._info_at = 0.0
        # Resolved with its stored result while the service still said running
        # (`_finish(..., before_end=True)`): its properties wait for the end.
        self._before_end = False
        self._logs: dict[str, str | None] = {}

    def __repr__(self) -> str:
        # Only what is known locally: a repr must never call the provider.
        base = super().__repr__()
        info = self._info
        status = f" status={info.status}" if info is not None and info.status is not None else ""
        return base[:-1] + f" job={self.job_id} provider={self._core.provider.name}{status}>"

    # -- identity ---------------------------------------------------------
    @property
    def job_id(self) -> str:
        """cloudexec's id of the job (``<id>[<index>]`` for an array child); enough to `attach`."""
        if self._index is None:
            return self._record.job_id
        return f"{self._record.job_id}[{self._index}]"

    @property
    def index(self) -> int | None:
        """Index of this child in its array job, ``None`` for a single job."""
        return self._index

    # -- provider properties ---------------------------------------------
    def _current_info(self) -> JobInfo | None:
        info = self._info
        if self._before_end and (info is None or not info.terminal):
            return self._ended_info()
        if info is not None and (info.terminal or time.monotonic() - self._info_at < _FRESH_S):
            return info
        fresh = self._core.describe_one(self._record, self._index)
        if fresh is not None:
            self._set_info(fresh)
            return fresh
        return info if info is not None and info.terminal else None

    def _ended_info(self) -> JobInfo | None:
        """For a future resolved before the service reported its job ended: wait (bounded) for the end.

        The result is final, but ``job_status``/``job_exit_code`` read right
        after ``result()`` should be the job's final ones too, as they are for
        a job whose end was reported first. The service reports it seconds
        later (AWS's status lag); after `_ENDED_WAIT_S` the current answer is
        returned as it is.
        """
        deadline = time.monotonic() + _ENDED_WAIT_S
        while True:
            fresh = self._core.describe_one(self._record, self._index)
            if fresh is not None:
                self._set_info(fresh)
            if (fresh is not None and fresh.terminal) or time.monotonic() >= deadline:
                return self._info
            time.sleep(_ENDED_POLL_S)

    def _set_info(self, info: JobInfo) -> None:
        self._info = info
        self._info_at = time.monotonic()

    @property
    def job_status(self) -> JobStatus | None:
        """The provider's status, a member of its `JobStatus` enum (e.g. ``AWSJobStatus.RUNNABLE``)."""
        info = self._current_info()
        return info.status if info else None

    @property
    def job_exit_code(self) -> int | None:
        """Exit code of the job's container process, once it ended."""
        info = self._current_info()
        return info.exit_code if info else None

    @property
    def job_status_reason(self) -> str | None:
        """The provider's explanation of the current status."""
        info = self._current_info()
        return info.status_reason if info else None

    @property
    def provider_job_id(self) -> str | None:
        """The provider's id of this job (or array child)."""
        info = self._current_info()
        if info and info.provider_job_id:
            return info.provider_job_id
        return None

    @property
    def attempts(self) -> int | None:
        """Attempts made so far (retries included)."""
        info = self._current_info()
        return info.attempts if info else None

    def _log(self, stream: str) -> str | None:
        if stream in self._logs:
            return self._logs[stream]
        text = self._core.read_log(self._record, self._index, stream)
        if self.done() and (self._info is None or self._info.terminal):
            self._logs[stream] = text  # a finished job's log no longer changes
        return text

    @property
    def job_log(self) -> str | None:
        """The job's console output (stdout; where the provider merges them, stderr too)."""
        return self._log("stdout")

    @property
    def job_stderr_log(self) -> str | None:
        """The job's stderr where the provider keeps it apart from stdout, else ``None``."""
        return self._log("stderr")

    def properties(self) -> dict[str, Any]:
        """Every job property as a dict (provider-specific ones included)."""
        info = self._current_info()
        props: dict[str, Any] = {
            "job_id": self.job_id,
            "job_status": info.status if info else None,
            "job_exit_code": info.exit_code if info else None,
            "job_status_reason": info.status_reason if info else None,
            "provider_job_id": self.provider_job_id,
            "attempts": info.attempts if info else None,
        }
        if info:
            props.update(info.extra)
        props["job_log"] = self.job_log
        props["job_stderr_log"] = self.job_stderr_log
        return props

    # -- state changes -------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the job: dequeue it, or terminate it at the provider if it runs.

        Returns:
            False if the job already finished, True otherwise. Never raises.
        """
        changed = self._cancel_state()
        if changed is None:
            return False
        if not changed:
            return True  # cancelled before: idempotent
        self._invoke_callbacks()  # type: ignore[attr-defined]  # the stdlib's own hook
        self._core.on_cancel(self)
        return True

    def _cancel_state(self) -> bool | None:
        """Move to CANCELLED_AND_NOTIFIED from PENDING or RUNNING.

        Returns:
            True if this call cancelled the future, False if it was cancelled
            before, None if it had already FINISHED.

        One hold of the future's own (reentrant) condition covers the whole
        change: the manager marking the future running can never come between
        the cancel and the notification (that window made ``cancel()`` raise
        ``RuntimeError`` now and then).
        """
        with self._condition:
            if self._state == FINISHED:
                return None
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return False
            self._state = CANCELLED
            # The stdlib tells waiters (wait/as_completed) only when the executor
            # calls set_running_or_notify_cancel; do it now so they wake.
            self.set_running_or_notify_cancel()
            self._condition.notify_all()
            return True

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == PENDING:
                self.set_running_or_notify_cancel()

    def _finish(self, *, result: Any = None, exception: BaseException | None = None, before_end: bool = False) -> None:
        """Set the outcome (the manager's one way to end a future).

        Args:
            before_end: the service still reports the job running (its result
                came first): property reads then wait for its end.
        """
        self._before_end = before_end
        self._mark_running()
        try:
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)
        except InvalidStateError:  # cancelled meanwhile: the user's choice wins
            pass


class ArrayFuture(BatchFuture[list[T]]):
    """The future of a whole array job (``submit_map``).

    ``result()`` is the list of every item's result, in order; it raises the
    first failing item's exception. ``children`` are the futures of the array's
    children (with ``chunksize > 1`` each child holds a chunk of items and its
    result is the list of their results).
    """

    def __init__(self, core: _Core, record: _JobRecord) -> None:
        super().__init__(core, record, None)
        self._progress: _progress.ProgressBar | None = None
        self._children_info: list[JobInfo | None] | None = None
        self._children_info_at = 0.0

    @property
    def children(self) -> list[BatchFuture[Any]]:
        """The children's futures, in index order (made on first use: a big map keeps none it need not)."""
        children = self._record.children
        return [children.get(i) for i in range(children.size)]

    def _child(self, index: int) -> BatchFuture[Any]:
        return self._record.children.get(index)

    @property
    def size(self) -> int:
        """Number of children (provider array size)."""
        return self._record.size or 0

    @property
    def status_counts(self) -> dict[str, int] | None:
        """Children per provider status name, as the provider counts them."""
        info = self._current_info()
        return info.status_counts if info else None

    def _children_infos(self) -> list[JobInfo | None]:
        cached = self._children_info
        if cached is not None and (
            all(i is not None and i.terminal for i in cached) or time.monotonic() - self._children_info_at < _FRESH_S
        ):
            return cached
        infos = self._core.describe_children(self._record)
        if infos is None:
            return cached or [None] * self.size
        made = self._record.children.futures
        for index, info in enumerate(infos):
            child = made.get(index)
            if child is not None and info is not None:
                child._set_info(info)
        self._children_info = infos
        self._children_info_at = time.monotonic()
        return infos

    @property
    def child_job_exit_codes(self) -> list[int | None]:
        """Each child's `job_exit_code`, in order."""
        return [i.exit_code if i else None for i in self._children_infos()]

    @property
    def child_job_status_reasons(self) -> list[str | None]:
        """Each child's `job_status_reason`, in order."""
        return [i.status_reason if i else None for i in self._children_infos()]

    @property
    def child_job_statuses(self) -> list[JobStatus | None]:
        """Each child's `job_status`, in order."""
        return [i.status if i else None for i in self._children_infos()]

    def properties(self) -> dict[str, Any]:
        """Every array property, with the children's exit codes and reasons."""
        props = super().properties()
        props["status_counts"] = self.status_counts
        props["child_job_exit_codes"] = self.child_job_exit_codes
        props["child_job_status_reasons"] = self.child_job_status_reasons
        return props

    def cancel(self) -> bool:
        """Cancel the whole array (terminating it at the provider); never raises."""
        with self._condition:
            if self._state == FINISHED:
                return False
        cancelled = super().cancel()
        # Local state only: the array was cancelled at the provider as a whole.
        for child in self._record.children.cancel_pending():
            if child._cancel_state() is True:
                child._invoke_callbacks()  # type: ignore[attr-defined]  # the stdlib's own hook
        return cancelled


_NOT_PICKLABLE = (
    "a cloudexec executor (or its state, which a BatchFuture refers to) cannot be pickled: it holds the "
    "provider's clients and credentials, the environment and the signing key, none of which may reach a job "
    "or the storage. Do not capture the executor in a function you submit (a closure, a bound method, a "
    "global); pass plain values instead."
)



class ManagerLike(Protocol):
    """What the futures and the executor ask of the manager thread (`cloudexec._poller.Manager`)."""

    def enqueue(self, record: _JobRecord) -> None:
        """Queue a new job for dispatch."""

    def track(self, record: _JobRecord) -> None:
        """Follow a job submitted earlier (re-attach)."""

    def refresh(self, record: _JobRecord) -> None:
        """Bring a just-attached job's future up to date."""

    def waiting_info(self, record: _JobRecord) -> JobInfo | None:
        """What a job not handed to the provider yet reads."""

    def wake(self) -> None:
        """Look at the queue now."""

    def cancel_queued(self) -> None:
        """Cancel every job not yet handed to the provider."""

    def stop(self, wait: bool) -> None:
        """Finish what is in flight, then end the thread."""


class _Core:
    """What an executor and all its `with_settings` views share."""

    def __init__(
        self,
        provider: Provider,
        store: Store,
        max_workers: int,
        poll_interval_s: tuple[float, float],
        keys: _keys.KeyRing,
        *,
        give_up_s: float = 300.0,
        manager: Callable[[_Core, tuple[float, float]], ManagerLike],
    ) -> None:
        self.provider = provider
        self.store = store
        self.keys = keys
        self.max_workers = max_workers
        self.give_up_s = give_up_s
        self.shutdown_lock = threading.Lock()
        self.shutdown = False
        # Built by the caller (the executor passes `cloudexec._poller.Manager`):
        # this module, which the manager imports, does not import it back.
        self.manager = manager(self, poll_interval_s)
        # The future of every job this executor follows, by job id, so that
        # attach() hands back the same object (weak: a future nobody holds,
        # of a job that ended, is not kept).
        self.futures: weakref.WeakValueDictionary[str, BatchFuture[Any]] = weakref.WeakValueDictionary()
        self.futures_lock = threading.Lock()
        self._handles = 0  # live executor objects (an executor and its with_settings views)

    def hold(self, executor: Executor) -> None:
        """Count ``executor`` as a user of this core until it is garbage-collected."""
        with self.shutdown_lock:
            self._handles += 1
        # The manager holds the core, never the executor: once the user drops
        # every executor object, the thread finishes what is in flight and ends.
        finalizer = weakref.finalize(executor, self._release)
        finalizer.atexit = False

    def _release(self) -> None:
        with self.shutdown_lock:
            self._handles -= 1
            if self._handles > 0:
                return
        self.manager.stop(wait=False)

    def __reduce__(self) -> Any:
        raise TypeError(_NOT_PICKLABLE)

    # Provider calls made on behalf of futures; they never raise.
    def describe_one(self, record: _JobRecord, index: int | None) -> JobInfo | None:
        if record.ref is None:
            return self.manager.waiting_info(record)
        try:
            if index is None:
                return self.provider.describe([record.ref]).get(record.ref)
            return self.provider.describe_child(record.ref, record.size or 0, index)
        except Exception as exc:  # noqa: BLE001 - a property must not raise
            log.warning("cloudexec: could not describe job %s: %s", record.job_id, exc)
            return None

    def describe_children(self, record: _JobRecord) -> list[JobInfo | None] | None:
        if record.ref is None:
            return None
        try:
            return self.provider.describe_children(record.ref, record.size or 0)
        except Exception as exc:  # noqa: BLE001
            log.warning("cloudexec: could not describe the children of %s: %s", record.job_id, exc)
            return None

    def read_log(self, record: _JobRecord, index: int | None, stream: str) -> str | None:
        if record.ref is None:
            return None
        try:
            return self.provider.read_log(record.ref, index=index, stream=stream)
        except Exception as exc:  # noqa: BLE001
            log.warning("cloudexec: could not read the log of %s: %s", record.job_id, exc)
            return None

    def on_cancel(self, future: BatchFuture[Any]) -> None:
        record = future._record
        self.manager.wake()
        if record.ref is None:
            return  # not dispatched yet: the manager drops it, or cancels right after submitting
        is_whole = future._index is None
        if not is_whole and record.future is not None and record.future.cancelled():
            return  # the array was cancelled as a whole
        try:
            self.provider.cancel(record.ref, CANCEL_REASON, index=future._index)
        except Exception as exc:  # noqa: BLE001 - cancel() never raises
            log.warning("cloudexec: could not cancel job %s at the provider: %s", future.job_id, exc)


def job_failed(record: _JobRecord, index: int | None, info: JobInfo | None, provider: Provider) -> JobFailedError:
    """The error for a job that ended without writing a result, with the last lines of its log."""
    job_id = record.job_id if index is None else f"{record.job_id}[{index}]"
    if info is None:
        return JobFailedError(
            job_id,
            status=None,
            status_reason="the provider no longer knows this job and it wrote no result",
            exit_code=None,
        )
    hint = provider.failure_hint(info)
    if info.exit_code is None and record.upstream_ids:
        hint = upstream_hint(record)
    if info.exit_code == EXIT_INTEGRITY:
        hint = (
            f"The runner refused the job's stored call or input: it failed signature verification "
            f"(exit code {EXIT_INTEGRITY}; its log says which object). Someone else wrote to the job storage, "
            "or the job did not get its key. " + (hint or "")
        ).strip()
    return JobFailedError(
        job_id,
        status=str(info.status) if info.status else None,
        status_reason=info.status_reason,
        exit_code=info.exit_code,
        hint=hint,
        log_tail=_log_tail(record, index, provider),
    )


def _log_tail(record: _JobRecord, index: int | None, provider: Provider, lines: int = _LOG_TAIL_LINES) -> str | None:
    """The last ``lines`` lines of each of a job's log streams, indented; ``None`` if there are none."""
    if record.ref is None:
        return None
    tails: list[str] = []
    for stream in ("stdout", "stderr"):
        try:
            text = provider.read_log(record.ref, index=index, stream=stream)
        except Exception as exc:  # noqa: BLE001 - the error is worth more than its log
            log.warning("cloudexec: could not read the %s of job %s: %s", stream, record.job_id, exc)
            continue
        if text and text.strip():
            tails.extend(f"  {stream}: {line}" for line in text.rstrip("\n").splitlines()[-lines:])
    return "\n".join(tails) or None


def succeeded(future: BatchFuture[Any]) -> bool:
    """Whether ``future`` finished with a result (not cancelled, no exception)."""
    return future.done() and not future.cancelled() and future.exception(0) is None


def how_it_ended(future: BatchFuture[Any]) -> str:
    """How an ended upstream future ended, for messages: ``was cancelled`` or ``failed (<error>)``."""
    if future.cancelled():
        return "was cancelled"
    error = future.exception(0)
    text = f"{type(error).__name__}: {error}"
    return "failed (" + (text if len(text) <= 300 else text[:297] + "...") + ")"


def upstream_hint(record: _JobRecord) -> str | None:
    """For a dependent that ended without a result: which upstream job failed, and how."""
    if not record.upstream_ids:
        return None
    failed = []
    for job_id, ref in record.upstream_ids:
        future = ref()
        if future is not None and future.done() and not succeeded(future):
            failed.append(f"upstream job {job_id} {how_it_ended(future)}")
    if failed:
        return "It did not run because " + "; ".join(failed) + "."
    ids = ", ".join(job_id for job_id, _ in record.upstream_ids)
    return f"It waited for job(s) {ids}; if one of them failed, it never ran (see their futures)."
