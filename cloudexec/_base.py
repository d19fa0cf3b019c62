"""The generic executor; providers plug in through `Provider`, its futures live in `_futures`.

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

import itertools
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import CancelledError, Executor
from typing import Any, ClassVar

from cloudexec import _depends, _keys, _payload, _progress
from cloudexec._children import CANCELLED as _CHILD_CANCELLED
from cloudexec._children import FAILED as _CHILD_FAILED
from cloudexec._children import Children
from cloudexec._provider import Provider
from cloudexec._storage import Store, open_store
from cloudexec.errors import IntegrityError, JobNotFoundError, StorageError
from cloudexec.settings import JobSettings

from cloudexec._futures import _NOT_PICKLABLE, ArrayFuture, BatchFuture, T, _Core, _JobRecord
from cloudexec._poller import Manager

__all__ = ["BatchExecutor", "BatchFuture", "ArrayFuture"]

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
        self._core = _Core(provider, store, max_workers, intervals, keys, give_up_s=give_up_s, manager=Manager)
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
            pickled, refers_to = _payload.dumps_chunk_modules(chunk)
            modules |= refers_to
            inputs.add(_keys.seal(job_key, "input", job_id, index, pickled))
        del columns, items
        call = _keys.seal(
            job_key,
            "call",
            job_id,
            None,
            # ``children``: a child that knows the table's size reads its slice in two requests, not three.
            _payload.pack(
                "call", (fn, None, None), ship=True, ship_names=modules, array=True, chunksize=chunksize, children=size
            ),
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

