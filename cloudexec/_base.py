"""The generic executor and its futures; providers plug in through `Provider`.

How a call travels (the manager is one thread per executor)::

    submit(fn, *args)                      manager thread                      provider / cloud
    ─────────────────                      ──────────────                      ────────────────
    validate, pickle the call  ──queue──►  write call.pkl, job.json (manifest)
    return BatchFuture (PENDING)           provider.submit(JobSpec)  ────────►  job queued
                                           job.json again, with the provider's id
                                           every poll: provider.describe(all
                                           jobs in flight, bulk) ◄──────────── statuses
                                           list results/ of arrays             runner writes
                                           job ended: read result.pkl  ◄────── result.pkl
    future.result() ◄── set_result / set_exception

``submit_map`` writes ONE ``inputs.bin`` for the whole array and submits one
array job; ``map`` is built on it. Only the manager thread changes a future's
state after submission (besides ``cancel``), through the stdlib's own
``set_running_or_notify_cancel``/``set_result``/``set_exception``.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from cloudexec._log import log
from cloudexec import _depends, _keys, _payload, _progress
from cloudexec._children import CANCELLED as _CHILD_CANCELLED
from cloudexec._children import FAILED as _CHILD_FAILED
from cloudexec._children import Children
from cloudexec._provider import JobInfo, JobStatus, Provider
from cloudexec._storage import Store, open_store
from cloudexec._version import __version__
from cloudexec.errors import IntegrityError, JobFailedError, JobNotFoundError, StorageError
from cloudexec.settings import JobSettings

if TYPE_CHECKING:
    from cloudexec._poller import Manager

__all__ = ["BatchExecutor", "BatchFuture", "ArrayFuture"]

T = TypeVar("T")

CANCEL_REASON = "Terminated by cloudexec (future.cancel())"
#: The runner's exit code when a stored call or input fails verification
#: (kept equal to ``cloudexec.runner.EXIT_INTEGRITY``; the runner must not import this module).
EXIT_INTEGRITY = 3
# How long a non-terminal property value may be served from the cache before
# a property read asks the provider again.
_FRESH_S = 1.0


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
        if info is not None and (info.terminal or time.monotonic() - self._info_at < _FRESH_S):
            return info
        fresh = self._core.describe_one(self._record, self._index)
        if fresh is not None:
            self._set_info(fresh)
            return fresh
        return info if info is not None and info.terminal else None

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

    def _finish(self, *, result: Any = None, exception: BaseException | None = None) -> None:
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


#: Default of the executors' ``give_up_s``: ride out a few minutes of API or storage outage.
DEFAULT_GIVE_UP_S = 300.0
_MAX_GIVE_UP_S = 7 * 24 * 3600.0
_MAX_POLL_INTERVAL_S = 3600.0


def _check_seconds(name: str, value: object, most: float, shown: object = None) -> float:
    """``value`` as seconds in ``(0, most]``; TypeError/ValueError naming the bad value otherwise."""
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds; got {shown!r} ({type(value).__name__})")
    if not math.isfinite(value) or not 0 < value <= most:
        raise ValueError(f"{name} must be above 0 and at most {most:g} seconds; got {shown!r}")
    return float(value)


def check_poll_interval(value: object) -> tuple[float, float]:
    """A valid ``poll_interval_s`` pair ``(first, longest)``, as floats.

    Raises:
        TypeError: not a pair of numbers (the message shows the value).
        ValueError: a pause not in ``(0, 3600]`` s (0 would busy-spin), or
            ``first > longest``.
    """
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            f"poll_interval_s must be a pair (first, longest) of seconds, like (1.0, 10.0); got {value!r}"
        )
    first = _check_seconds("poll_interval_s[0] (first pause)", value[0], _MAX_POLL_INTERVAL_S, value)
    longest = _check_seconds("poll_interval_s[1] (longest pause)", value[1], _MAX_POLL_INTERVAL_S, value)
    if first > longest:
        raise ValueError(
            f"poll_interval_s={value!r}: the first pause ({first:g} s) must not exceed the longest ({longest:g} s); "
            "polls start at the first and back off to the longest"
        )
    return first, longest


#: Most children a map gets when no ``chunksize`` is given: one AWS Batch array
#: job's worth. Every child pays a container start and a few storage calls,
#: so beyond this, items share children rather than add them.
DEFAULT_MAX_CHILDREN = 10_000


def default_chunksize(n_items: int) -> int:
    """Items per child for a map of ``n_items`` without a ``chunksize``: 1 up to
    `DEFAULT_MAX_CHILDREN` items, then as few as keep it to that many children."""
    return max(1, math.ceil(n_items / DEFAULT_MAX_CHILDREN))


def _default_name(fn: Callable[..., Any]) -> str:
    target = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(target, "__name__", None) or type(target).__name__)


def _function_path(fn: Callable[..., Any]) -> str:
    target = getattr(fn, "func", fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', _default_name(fn))}"


def new_job_id(name: str) -> str:
    """A unique job id that every provider accepts as a name: ``<name>-<utc time>-<random>``."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:24] or "job"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stem}-{stamp}-{uuid.uuid4().hex[:8]}"


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
    ) -> None:
        from cloudexec._poller import Manager

        self.provider = provider
        self.store = store
        self.keys = keys
        self.max_workers = max_workers
        self.give_up_s = give_up_s
        self.shutdown_lock = threading.Lock()
        self.shutdown = False
        self.manager: Manager = Manager(self, poll_interval_s)
        # The future of every job this executor follows, by job id, so that
        # attach() hands back the same object (weak: a future nobody holds,
        # of a job that ended, is not kept).
        self.futures: weakref.WeakValueDictionary[str, BatchFuture[Any]] = weakref.WeakValueDictionary()
        self.futures_lock = threading.Lock()
        self._handles = 0  # live executor objects (an executor and its with_settings views)

    def hold(self, executor: BatchExecutor) -> None:
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


class BatchExecutor(Executor):
    """A `concurrent.futures.Executor` that runs each call as a batch job.

    Generic over the batch service: a `Provider` does the talking.
    ``submit`` becomes one job, ``map``/``submit_map`` one array job. Use a
    provider's class (`LocalBatchExecutor`, `AWSBatchExecutor`,
    `AzureBatchExecutor`) rather than this one directly.

    Args:
        provider: the batch service.
        io_url: storage folder for calls and results (any fsspec URL the
            provider's containers can reach).
        storage_options: fsspec options for ``io_url``.
        max_workers: jobs in flight at once (an array job counts once; a
            job the service holds for its upstream jobs does not count);
            default: the provider's.
        poll_interval_s: (first, longest) pause between status polls, in
            seconds, each above 0 and at most 3600; default: the provider's.
        give_up_s: how long the manager keeps retrying a job whose status or
            result it cannot read (the provider's API or the storage keep
            failing) before it ends the job's futures with
            `JobUnreachableError`; a few failures in a row never do. Above 0,
            at most a week; default 300.
        key: the master key that signs calls and verifies results (one key,
            or a list newest first while rotating); default: the
            ``CLOUDEXEC_KEY`` environment variable, else the key file
            ``~/.config/cloudexec/key`` (created, mode 0600, if missing).
            See docs/security.md.
        **settings: default job settings (see `cloudexec.settings`).

    Raises:
        ValueError: ``max_workers <= 0``, a ``poll_interval_s`` or
            ``give_up_s`` out of range, a bad setting value or a short key.
        TypeError: a ``max_workers``, ``poll_interval_s`` or ``give_up_s``
            of the wrong type, or an unknown setting.
        TypeError: an unknown setting.
        StorageError: ``io_url`` cannot be written.
        PermissionError: the key file is readable by others.
    """

    #: Future classes a provider's executor may specialise (extra properties).
    future_class: ClassVar[type[BatchFuture[Any]]] = BatchFuture
    array_future_class: ClassVar[type[ArrayFuture[Any]]] = ArrayFuture

    def __init__(
        self,
        provider: Provider,
        io_url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        max_workers: int | None = None,
        poll_interval_s: tuple[float, float] | None = None,
        give_up_s: float = DEFAULT_GIVE_UP_S,
        key: str | bytes | list[str | bytes] | None = None,
        **settings: Any,
    ) -> None:
        if max_workers is None:
            max_workers = provider.default_max_workers
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int (jobs in flight at once, 1 or more); got {max_workers!r}")
        if max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0 (jobs in flight at once); got {max_workers!r}")
        intervals = check_poll_interval(poll_interval_s if poll_interval_s is not None else provider.poll_interval_s)
        give_up_s = _check_seconds("give_up_s", give_up_s, _MAX_GIVE_UP_S)
        self._settings = self._validate(provider, settings)
        store = open_store(io_url, storage_options)
        _probe_storage(store)
        keys = _keys.load_keys(key)
        self._core = _Core(provider, store, max_workers, intervals, keys, give_up_s=give_up_s)
        self._core.hold(self)
        self._provider = provider

    @staticmethod
    def _validate(provider: Provider, settings: dict[str, Any]) -> JobSettings:
        parsed = JobSettings.from_kwargs(provider.settings, provider.provider_settings, **settings)
        provider.validate_settings(parsed)
        return parsed

    # -- configuration ------------------------------------------------------
    @property
    def provider(self) -> Provider:
        """The provider object this executor submits through."""
        return self._core.provider

    @property
    def io_url(self) -> str:
        """The storage folder of this executor's jobs."""
        return self._core.store.url

    @property
    def max_workers(self) -> int:
        """Jobs in flight at once (an array job counts once)."""
        return self._core.max_workers

    @property
    def _max_workers(self) -> int:
        # The stdlib executors' attribute, which schedulers (e.g. joblib, dask's
        # helpers) read off any executor to size the work they hand it.
        return self._core.max_workers

    @property
    def settings(self) -> JobSettings:
        """The job settings calls of this executor (or view) get."""
        return self._settings

    def with_settings(self, **overrides: Any) -> BatchExecutor:
        """A view of this executor whose jobs get other settings.

        The view shares the executor's provider, storage, poller and shutdown
        state; only the job settings differ. Settings are validated now.

        Example:
            ``big = ex.with_settings(vcpus=4, memory="8 GiB"); big.submit(f, x)``
        """
        parsed = self._validate(self._core.provider, overrides)
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._settings = self._settings.merged(parsed)
        self._core.hold(view)
        return view

    # -- Executor API -------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> BatchFuture[T]:
        """Submit ``fn(*args, **kwargs)`` as one batch job; return its future.

        A future of this executor among the arguments (also inside lists,
        tuples, dicts and sets) stands for its result: a finished one is
        replaced by its value; for an unfinished one the job is handed to the
        provider with a dependency, the service holds it until that job
        succeeded, and the job receives the result in its place (an
        `ArrayFuture` gives the list of its results). ``submit`` does not
        wait for it. If it fails or is cancelled, this job fails without
        running, its error naming the upstream job.

        Raises:
            RuntimeError: the executor was shut down.
            TypeError: ``fn`` is not callable, or the provider cannot hold a
                job for another and a future is among the arguments.
            ValueError: a future of another executor, or more upstream jobs
                than the provider allows per job.
            PayloadError: the call cannot be pickled (nothing was submitted).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {fn!r} ({type(fn).__name__})")
        name = self._settings.job_name or _default_name(fn)
        job_id = new_job_id(name)
        found: dict[int, BatchFuture[Any]] = {}
        args = _depends.swap_futures(self._core, args, found)
        kwargs = _depends.swap_futures(self._core, kwargs, found)
        # Made and signed in one buffer: a big argument is copied once, into the pickle.
        buffer, start = _payload.pack_with_room(
            "call", (fn, args, kwargs), room=_keys.seal_room("call", job_id, None), ship=True
        )
        call = _keys.seal_in_place(self._core.keys.job_key(job_id), "call", job_id, None, buffer, start)
        del buffer
        record = _JobRecord(
            job_id=job_id,
            store=self._core.store,
            name=name,
            settings=self._settings,
            size=None,
            call=call,
            function=_function_path(fn),
        )
        _depends.plan_single(self._core, record, found)
        future: BatchFuture[T] = self.future_class(self._core, record)
        record.future = future
        self._enqueue(record)
        return future

    def submit_map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: bool = False,
        sequential: bool = False,
    ) -> ArrayFuture[T]:
        """Submit ``fn`` over the zipped iterables as ONE array job.

        Items may be (or contain) futures of this executor, as `submit`'s
        arguments may. An `ArrayFuture` of the same size given as an iterable
        stands for its children: child i of this array waits only for child
        i of that one, and gets its result.

        Args:
            fn: the function, called as ``fn(*items)``.
            *iterables: argument iterables, consumed now (like ``map``), or
                `ArrayFuture` objects (submitted with ``chunksize=1``).
            chunksize: items per array child; default: 1, or as many as keep
                the map to `DEFAULT_MAX_CHILDREN` children (one AWS array job)
                when it has more items than that.
            progress: show a tqdm bar of the array's children (queued,
                running, succeeded, failed) until it ends; needs ``tqdm``.
            sequential: run the children one after another, in index order,
                each only once the previous one succeeded (the service
                enforces it; a failed child fails the ones after it).

        Returns:
            An `ArrayFuture` whose result is the list of results, in order.

        Raises:
            RuntimeError: the executor was shut down.
            TypeError/ValueError: bad ``fn`` or ``chunksize``; futures the
                provider cannot wait for (see `submit`).
            PayloadError: the function or an argument cannot be pickled.
            ImportError: ``progress=True`` without tqdm installed (nothing was submitted).
        """
        return self._submit_array(fn, iterables, chunksize, streaming=False, progress=progress, sequential=sequential)

    def _submit_array(
        self,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        chunksize: int | None,
        *,
        streaming: bool,
        progress: bool = False,
        sequential: bool = False,
    ) -> ArrayFuture[T]:
        tqdm_class = _progress.load_tqdm() if progress else None
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {fn!r} ({type(fn).__name__})")
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)):
            raise TypeError(f"chunksize must be an int or None; got {chunksize!r}")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1 (items per array child); got {chunksize!r}")
        columns = _depends.expand_arrays(iterables)
        if not all(isinstance(c, Sized) for c in columns):
            columns = (list(zip(*columns)),)  # one pass to count them: an iterator is read once
            items: Iterator[tuple[Any, ...]] = iter(columns[0])
        else:
            items = zip(*columns)
        n_items = min((len(c) for c in columns), default=0)
        if chunksize is None:
            chunksize = default_chunksize(n_items)
        size = math.ceil(n_items / chunksize)
        name = self._settings.job_name or _default_name(fn)
        job_id = new_job_id(name)
        job_key = self._core.keys.job_key(job_id)
        # Streamed: one child's items at a time are pickled, sealed (each child
        # reads only its own slice) and appended to the one inputs buffer, so
        # no list of N pickles (nor of N chunks) is ever held.
        inputs = _payload.InputsBuffer(size)
        modules: set[str] = set()
        per_child: dict[int, dict[int, BatchFuture[Any]]] = {}
        for index in range(size):
            found: dict[int, BatchFuture[Any]] = {}
            chunk = _depends.swap_futures(self._core, list(itertools.islice(items, chunksize)), found)
            if found:
                per_child[index] = found
            pickled = _payload.dumps_chunk(chunk)
            modules |= _payload.pickled_module_names(pickled)
            inputs.add(_keys.seal(job_key, "input", job_id, index, pickled))
        del columns, items
        call = _keys.seal(
            job_key,
            "call",
            job_id,
            None,
            _payload.pack("call", (fn, None, None), ship=True, ship_names=modules, array=True, chunksize=chunksize),
        )
        record = _JobRecord(
            job_id=job_id,
            store=self._core.store,
            name=name,
            settings=self._settings,
            size=size,
            chunksize=chunksize,
            n_items=n_items,
            call=call,
            inputs=inputs.getvalue(),
            function=_function_path(fn),
        )
        del inputs
        _depends.plan_array(self._core, record, size, per_child, sequential)
        future: ArrayFuture[T] = self.array_future_class(self._core, record)
        record.future = future
        record.streaming = streaming
        record.children = self._new_children(record)
        if not size:
            # Nothing to run: an empty array job would be rejected by every provider.
            with self._core.shutdown_lock:
                if self._core.shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
            future._finish(result=[])
            return future
        self._enqueue(record)
        if tqdm_class is not None:
            future._progress = _progress.ProgressBar(future, self._core.provider.status_enum, tqdm_class)
            future._progress.start()
        return future

    def _new_children(self, record: _JobRecord) -> Children:
        """An array's children: none of their futures is made until asked for."""
        core, future_class = self._core, self.future_class
        children = Children(record.size or 0, record.job_id, lambda index: future_class(core, record, index))
        children.chunksize = record.chunksize
        return children

    def _enqueue(self, record: _JobRecord) -> None:
        with self._core.shutdown_lock:
            if self._core.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            assert record.future is not None
            with self._core.futures_lock:
                self._core.futures[record.job_id] = record.future
            self._core.manager.enqueue(record)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Like ``ProcessPoolExecutor.map``, as one array job.

        Results are yielded in order; a call's exception is raised when the
        iteration reaches it; ``TimeoutError`` if a result is not ready
        ``timeout`` seconds after this call. Leaving the loop early cancels
        what has not finished. ``chunksize`` as for `submit_map`. ``progress=True`` shows a tqdm bar (see
        `submit_map`).
        """
        end_time = None if timeout is None else timeout + time.monotonic()
        array = self._submit_array(fn, iterables, chunksize, streaming=True, progress=progress)
        return _map_results(array, end_time)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; see ``concurrent.futures.Executor.shutdown``.

        Args:
            wait: block until every job in flight has ended and its future is set.
            cancel_futures: cancel jobs not yet handed to the provider.
        """
        core = self._core
        with core.shutdown_lock:
            core.shutdown = True
        if cancel_futures:
            core.manager.cancel_queued()
        core.manager.stop(wait=wait)

    # -- re-attach -------------------------------------------------------------
    def attach(self, job_id: str) -> BatchFuture[Any]:
        """Get the future of an earlier job back, from its id alone.

        Works in a new process after the submitting client died, while the
        job's stored objects exist: the result comes from storage even after
        the provider forgot the job.

        Args:
            job_id: a cloudexec job id (``future.job_id``, optionally with an
                ``[index]`` for an array child) or the provider's job id.

        Raises:
            ValueError: ``job_id`` is not a job id (path separators, ``..``,
                a URL scheme...).
            JobNotFoundError: neither storage nor the provider knows the id.
            IntegrityError: the stored manifest is not signed with this
                executor's key (not a cloudexec job, or tampered with).
        """
        core = self._core
        if not isinstance(job_id, str):
            raise TypeError(f"job_id must be a str; got {job_id!r}")
        match = re.fullmatch(r"(.+)\[(\d+)\]", job_id)
        index = int(match.group(2)) if match else None
        base_id = _payload.check_job_id(match.group(1) if match else job_id)
        # A job this executor already follows keeps its one future (a second
        # one would leave the first never resolving).
        future = core.futures.get(base_id)
        manifest = None
        if future is None:
            manifest = _read_manifest(core, base_id)
            if manifest is None:
                url = core.provider.find_job_url(base_id)
                if url is not None:
                    found = _payload.check_job_id(url.rstrip("/").rsplit("/", 1)[-1], what="the provider's job folder")
                    future = core.futures.get(found)
                    if future is None:
                        manifest = _read_manifest(core, found)
        if future is None:
            if manifest is None:
                raise JobNotFoundError(
                    f"no job {job_id!r} under {core.store.url}: no manifest job.json there and the "
                    f"{core.provider.name} provider does not know it. Check the id and that this "
                    "executor uses the same io storage as the one that submitted the job."
                )
            future = self._track_attached(manifest)
        if index is None:
            return future
        if not isinstance(future, ArrayFuture) or not 0 <= index < future.size:
            raise JobNotFoundError(f"job {future.job_id} has no array child {index}")
        return future._child(index)

    def _track_attached(self, manifest: dict[str, Any]) -> BatchFuture[Any]:
        core = self._core
        with core.futures_lock:
            # Two threads attaching at once: the second gets the first one's future.
            existing = core.futures.get(manifest["job_id"])
            if existing is not None:
                return existing
            return self._new_attached(manifest)

    def _new_attached(self, manifest: dict[str, Any]) -> BatchFuture[Any]:
        core = self._core
        is_array = manifest.get("kind") == "array"
        record = _JobRecord(
            job_id=manifest["job_id"],
            store=core.store,
            name=manifest.get("name", ""),
            settings=JobSettings(),
            size=manifest.get("size") if is_array else None,
            chunksize=manifest.get("chunksize", 1),
            n_items=manifest.get("n_items", 1),
            function=manifest.get("function", ""),
        )
        record.ref = manifest.get("provider_ref")
        future: BatchFuture[Any]
        record.attached = True
        if is_array:
            future = self.array_future_class(core, record)
            record.children = self._new_children(record)
        else:
            future = self.future_class(core, record)
        record.future = future
        with core.shutdown_lock:
            if core.shutdown:
                raise RuntimeError("cannot attach to jobs after shutdown")
        # A job that ended long ago is finished at once (else it reads pending
        # until the next poll); one still running is then followed.
        core.manager.refresh(record)
        if not (future.done() and record.children.all_done()):
            with core.shutdown_lock:
                if core.shutdown:
                    raise RuntimeError("cannot attach to jobs after shutdown")
                core.manager.track(record)
        core.futures[record.job_id] = future
        return future

    def __repr__(self) -> str:
        core = self._core
        state = " shutdown" if core.shutdown else ""
        return (
            f"<{type(self).__name__} provider={core.provider.name} io_url={self.io_url!r} "
            f"max_workers={core.max_workers}{state}>"
        )

    def __reduce__(self) -> Any:
        raise TypeError(_NOT_PICKLABLE)


def _map_results(array: ArrayFuture[Any], end_time: float | None) -> Iterator[Any]:
    """The values of a streaming array's children, in order (the body of ``map``).

    Like the stdlib's ``result_iterator`` it keeps no reference to a value
    once yielded: each child lets go of its values when they are taken, and
    no local variable holds the value across a ``yield``.
    """
    consumed = False
    children = array._record.children
    try:
        for index in range(children.size):
            # One condition for the whole array: no per-child Future is made.
            code = children.wait(index, end_time)
            outcomes = children.take(index)
            if outcomes is not None:
                outcomes.reverse()
                while outcomes:
                    yield _payload.outcome_value(outcomes.pop())
            if code == _CHILD_CANCELLED:
                raise CancelledError()
            if code == _CHILD_FAILED:
                raise children.error(index)
        consumed = True
    finally:
        # Only an iterator left before its end (closed, collected, or raising
        # at an item) cancels what remains, as the stdlib's map does. A fully
        # consumed one has every result, while the provider may still report
        # the array running for seconds (AWS's status lags its containers, and
        # Azure uploads logs after the result): cancelling then would fail a
        # successful array and cut its log uploads.
        if not consumed and not array.done():
            array.cancel()
        if array._progress is not None:
            # Let the bar draw its last state before the caller prints anything.
            array._progress.join(timeout=2.0)


# Fields of a manifest that attach relies on, and the types they must have.
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "job_id": (str,),
    "kind": (str,),
    "size": (int, type(None)),
    "chunksize": (int,),
    "n_items": (int,),
    "name": (str,),
    "function": (str,),
    "provider_ref": (str, type(None)),
}


def _read_manifest(core: _Core, job_id: str) -> dict[str, Any] | None:
    """The manifest of ``job_id``, checked as data: ``None`` if there is none.

    Raises:
        JobNotFoundError: the folder holds something that is not a cloudexec manifest.
        IntegrityError: the manifest is not signed with this executor's key.
    """
    where = f"{core.store.url.rstrip('/')}/{job_id}/{_payload.MANIFEST}"
    try:
        raw = core.store.read(f"{job_id}/{_payload.MANIFEST}")
    except FileNotFoundError:
        return None

    def foreign(why: str) -> JobNotFoundError:
        return JobNotFoundError(
            f"{where} is not a cloudexec job manifest ({why}); {job_id!r} is not a cloudexec job. "
            "Check the id, and that this executor uses the io storage the job was submitted with."
        )

    try:
        data = json.loads(raw)
    except ValueError:
        raise foreign("not JSON") from None
    if not isinstance(data, dict):
        raise foreign("not a JSON object")
    for field, types in _MANIFEST_FIELDS.items():
        if not isinstance(data.get(field), types) or isinstance(data.get(field), bool):
            raise foreign(f"field {field!r} is missing or not {' or '.join(t.__name__ for t in types)}")
    if data["job_id"] != job_id:
        raise IntegrityError(
            f"refused the manifest {where}: it names job {data['job_id']!r}, not {job_id!r} (copied from "
            "another job)",
            job_id=job_id,
            what=_payload.MANIFEST,
        )
    _keys.verify_manifest(core.keys.job_keys(job_id), job_id, data)
    size = data["size"]
    if data["kind"] not in ("single", "array") or (data["kind"] == "array") != (size is not None):
        raise foreign(f"kind {data['kind']!r} with size {size!r}")
    if size is not None and not 0 <= size <= 10_000_000 or data["chunksize"] < 1:
        raise foreign(f"size {size!r} or chunksize {data['chunksize']!r} out of range")
    manifest: dict[str, Any] = data
    return manifest


def _probe_storage(store: Store) -> None:
    """Fail at construction, not at the first job, when storage is unusable."""
    key = f".cloudexec-probe-{uuid.uuid4().hex[:8]}"
    try:
        store.write(key, b"ok")
        store.delete(key)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(
            f"cannot write to the job storage {store.url!r}: {type(exc).__name__}: {exc}. "
            "Give an io location that exists and that these credentials may write to."
        ) from exc


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
        hint = _depends.upstream_hint(record)
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