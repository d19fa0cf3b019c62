"""The one background thread of an executor: dispatches jobs, polls, sets futures.

Economy matters more than latency here: cloud batch APIs are rate limited
(AWS allows about 50 Batch calls per second per account), so the manager asks
the provider about *all* jobs in flight with one bulk `Provider.describe` per
poll, learns about finished array children by listing the ``results/`` folder
instead of describing each child (only the names after the last child every
earlier one of which has its result: one LIST per 1,000 new names, not per
1,000 children) and reads the new results in one bulk read, and backs off
from the provider's first to its longest poll interval while nothing changes.
A provider whose quota of active jobs is reached (`CapacityReached`) holds
the queue back until one of the executor's jobs ended, without failing a job.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudexec._log import log
from cloudexec import _depends, _keys, _payload
from cloudexec._futures import CANCEL_REASON, ArrayFuture, _JobRecord, job_failed
from cloudexec._children import FAILED as _CHILD_FAILED
from cloudexec._children import naming_the_job
from cloudexec._provider import CannotHold, CapacityReached, JobInfo, JobSpec, Phase
from cloudexec._storage import Store
from cloudexec.errors import CloudExecError, IntegrityError, JobUnreachableError, SubmissionError

if TYPE_CHECKING:
    from cloudexec._futures import _Core


# A job the provider does not (yet, or any more) know, and that left no result,
# is declared lost after this many polls and seconds: AWS DescribeJobs may not
# show a job for a moment after SubmitJob, and shows none 24 h after it ended.
_MISSING_POLLS = 5
_MISSING_S = 30.0
# A poll is followed by a pause of at least this many times its own duration
# (never beyond the longest poll interval).
_POLL_COST_RATIO = 4.0
# The shortest pause between polls the provider's own change reports (`Provider.watch`) may bring.
_NUDGE_PAUSE_S = 0.005
# Longest stretch the manager spends submitting before it polls again.
_DISPATCH_SLICE_S = 1.0
# A job is given up only after this many failed polls in a row AND the
# executor's give_up_s: a few transient faults never fail a future.
_MIN_FAILURES = 3
# A result object that fails verification is read again for this long (and
# while its size changes) before it is refused: on fsspec filesystems whose
# writes are not atomic a reader can see a half-written object.
_SETTLE_S = 3.0
# How long a single job's stored successful result waits for the service to
# report the job ended before it is delivered anyway (`Manager._deliver_early`).
_EARLY_GRACE_S = 2.0
# What `_read_outcomes` returns for a result object that is not settled yet.
_UNSETTLED = object()
# `_read_outcomes` without bytes read already: it reads the object itself.
_UNREAD = object()


_LIVE: weakref.WeakSet[Manager] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_HOOKED = False


def _register_at_exit(manager: Manager) -> None:
    """Have `Manager.flush_at_exit` of ``manager`` run when the interpreter exits.

    ``threading._register_atexit`` (what the stdlib executors use) runs before
    the interpreter stops daemon threads, so the manager threads can still
    submit; plain ``atexit`` is too late for that.
    """
    global _HOOKED
    with _LIVE_LOCK:
        _LIVE.add(manager)
        if _HOOKED:
            return
        _HOOKED = True
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(_flush_all_at_exit)
            return
    except RuntimeError:  # the interpreter is already exiting
        return
    import atexit

    atexit.register(_flush_all_at_exit)


def _flush_all_at_exit() -> None:
    with _LIVE_LOCK:
        managers = list(_LIVE)
    for manager in managers:
        try:
            manager.flush_at_exit()
        except Exception:  # noqa: BLE001 - the other executors' jobs still go out
            log.exception("cloudexec: handing queued jobs over at exit failed")


def _fail_unfinished(record: _JobRecord, error: Callable[[str], BaseException], *, children_first: bool = True) -> None:
    """End a job's future and its unfinished children with ``error(job id)`` (each child's made on demand)."""
    made = record.children.fail_pending(error)
    futures = [*made, record.future] if children_first else [record.future, *made]
    for future in futures:
        if future is not None and not future.done():
            try:
                future._finish(exception=error(future.job_id))
            except BaseException:  # noqa: BLE001 - a callback raised; the other futures still end
                log.exception("cloudexec: a done-callback of %s raised", future.job_id)


class _Hold:
    """Submissions paused because the provider's capacity (a quota of active jobs) is reached."""

    def __init__(self, reason: str, until: float, inflight: int) -> None:
        self.reason = reason
        self.until = until  # try again at this time (others' jobs may end too) …
        self.inflight = inflight  # … or as soon as fewer of our jobs than this are in flight


def future_done(record: _JobRecord) -> bool:
    return record.future is not None and record.future.done()


class Manager:
    """Dispatcher and poller for one executor (and its `with_settings` views)."""

    def __init__(self, core: _Core, poll_interval_s: tuple[float, float]) -> None:
        self.core = core
        self.min_interval, self.max_interval = poll_interval_s
        self.cond = threading.Condition()
        self.queue: deque[_JobRecord] = deque()
        # Dependents the provider cannot hold, kept until their upstream jobs end.
        self.waiting: list[_JobRecord] = []
        self.inflight: dict[str, _JobRecord] = {}
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.closed = False
        self.broken: str | None = None  # why the thread died, once it did
        self.dispatching: _JobRecord | None = None  # the job being handed over right now
        self._job_stores: dict[str, Store] = {}
        # Single jobs whose successful result is stored while the service still
        # says running: when it was first seen, and its outcomes (`_deliver_early`).
        self._early: dict[str, tuple[float, Any]] = {}
        self.hold: _Hold | None = None
        # Why queued jobs wait, while the provider's capacity keeps them back.
        self.hold_reason: str | None = None
        # The provider said a job changed (`Provider.watch`): poll soon, not at the next pause.
        self._nudged = False
        core.provider.watch(self.nudge)

    # -- called from user threads ------------------------------------------
    def _check_alive(self) -> None:
        if self.broken is not None:
            raise BrokenExecutor(self.broken)

    def enqueue(self, record: _JobRecord) -> None:
        """Queue a new job for dispatch.

        Raises:
            BrokenExecutor: the manager thread died; nothing would ever run.
        """
        with self.cond:
            self._check_alive()
            self.queue.append(record)
            self._ensure_thread()
            self.cond.notify_all()

    def track(self, record: _JobRecord) -> None:
        """Follow a job that was submitted earlier (re-attach); it takes no worker slot."""
        with self.cond:
            self._check_alive()
            record.missing_polls = 0
            self.inflight[record.job_id] = record
            self._ensure_thread()
            self.cond.notify_all()

    def refresh(self, record: _JobRecord) -> None:
        """Bring a just-attached job's future up to date before anyone looks at it.

        Without this an attached job that ended long ago reads ``pending`` until
        the manager's next poll. Called before :meth:`track`, so no poll of this
        record runs concurrently; any failure is left to the regular polls.
        """
        if record.ref is None:
            return
        try:
            info = self.core.provider.describe([record.ref]).get(record.ref)
            if info is not None:
                self._update(record, info)
            elif not record.is_array and self.job_store(record).exists(_payload.RESULT):
                # Metadata expired at the provider, but the result is there.
                self._finish_single(record, None)
        except Exception as exc:  # noqa: BLE001 - the manager's polls retry
            log.debug("cloudexec: first look at attached job %s failed: %s", record.job_id, exc)
        finally:
            with self.cond:
                self._job_stores.pop(record.job_id, None)

    def waiting_info(self, record: _JobRecord) -> JobInfo | None:
        """What a job not handed to the provider yet reads: why it waits, if it is held back."""
        reason = self.hold_reason
        if record.ref is None and reason is not None and not future_done(record):
            return JobInfo(status_reason=reason)
        return None

    def wake(self) -> None:
        """Make the manager look at its queue now (after a cancel)."""
        with self.cond:
            self.cond.notify_all()

    def nudge(self) -> None:
        """Poll as soon as the shortest pause allows: the provider saw a job change."""
        with self.cond:
            self._nudged = True
            self.cond.notify_all()

    def cancel_queued(self) -> None:
        """Cancel every job not yet handed to the provider."""
        with self.cond:
            queued = list(self.queue) + self.waiting
            self.queue.clear()
            self.waiting.clear()
        for record in queued:
            if record.future is not None:
                record.future.cancel()

    def stop(self, wait: bool) -> None:
        """Finish what is in flight, then end the thread (and close the provider)."""
        with self.cond:
            self.stopping = True
            thread = self.thread
            self.cond.notify_all()
        if thread is None:
            self._close_provider()
        elif wait and thread is not threading.current_thread():
            thread.join()

    def _ensure_thread(self) -> None:
        if self.thread is None:
            # Daemon: jobs live on at the provider when the interpreter exits
            # and can be re-attached; a blocking exit would hold a client for
            # hours. But every job whose submit() returned is handed over
            # first: `flush_at_exit` runs before the interpreter stops threads.
            _register_at_exit(self)
            self.thread = threading.Thread(target=self._run, name="cloudexec-manager", daemon=True)
            self.thread.start()

    def flush_at_exit(self) -> None:
        """Hand every queued job that ``max_workers`` lets go to the provider; warn about the others.

        Called as the interpreter exits without ``shutdown()``; waits for
        the submissions, not for the jobs.
        """
        with self.cond:
            self.cond.notify_all()
            while self.thread is not None and self.thread.is_alive() and self.broken is None:
                blocked = not self._can_dispatch() or self._held()
                if blocked and self.dispatching is None:
                    break
                self.cond.wait(0.05)
            left = list(self.queue)
            waiting = self.waiting
            self.queue.clear()
            self.waiting = []
        if waiting:
            log.warning(
                "cloudexec: the interpreter exits without shutdown(): %d job(s) were still waiting in this client "
                "for their upstream jobs (the %s provider cannot hold a job for another), and are cancelled: %s. "
                "Call shutdown(wait=True) (or use the executor in a with-block) before the script ends to have "
                "them run.",
                len(waiting),
                self.core.provider.name,
                ", ".join(r.job_id for r in waiting),
            )
            for record in waiting:
                if record.future is not None:
                    record.future.cancel()
        try:
            self.core.provider.at_exit()
        except Exception as exc:  # noqa: BLE001 - the jobs handed over matter more
            log.warning("cloudexec: the %s provider's exit step failed: %s", self.core.provider.name, exc)
        if left:
            log.warning(
                "cloudexec: the interpreter exits without shutdown(): %d job(s) were never handed to the %s "
                "provider because max_workers=%d jobs were still in flight, and are cancelled: %s. Call "
                "shutdown(wait=True) (or use the executor in a with-block) before the script ends to have them run.",
                len(left),
                self.core.provider.name,
                self.core.max_workers,
                ", ".join(r.job_id for r in left),
            )
            for record in left:
                if record.future is not None:
                    record.future.cancel()

    def _close_provider(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
        try:
            self.core.provider.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("cloudexec: closing the %s provider failed: %s", self.core.provider.name, exc)

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - fail every future rather than hang them
            log.exception("cloudexec: the manager thread died")
            with self.cond:
                self.broken = (
                    f"the cloudexec manager thread died ({type(exc).__name__}: {exc}), so no job of this executor "
                    "is followed or submitted any more. Jobs already handed to the provider may still run: get "
                    "them back with attach(job_id) on a new executor, and submit new work there. (A done-callback "
                    "that raises SystemExit or KeyboardInterrupt kills this thread; let callbacks return.)"
                )
            self._break_all()
        finally:
            self._close_provider()

    def _loop(self) -> None:
        interval = self.min_interval
        next_poll = time.monotonic() + self.min_interval
        earliest = 0.0  # when a nudge may make the next poll happen
        while True:
            if self._dispatch():
                next_poll = min(next_poll, time.monotonic() + self.min_interval)
            if self._nudged:
                # Still not at once after a poll (nor sooner than its cost
                # allows): a map that ends a child every millisecond is polled in batches.
                self._nudged = False
                interval = self.min_interval
                next_poll = min(next_poll, earliest)
            if self.inflight and time.monotonic() >= next_poll:
                started = time.monotonic()
                changed = self._poll()
                interval = self.min_interval if changed else min(interval * 1.5, self.max_interval)
                # A poll that costs much (listing a folder of 100,000 results)
                # waits in proportion: the manager keeps to a share of the CPU
                # and the GIL, and collects more results per poll.
                spent = time.monotonic() - started
                cost_pause = min(_POLL_COST_RATIO * spent, self.max_interval)
                next_poll = time.monotonic() + max(interval, cost_pause)
                earliest = time.monotonic() + max(_NUDGE_PAUSE_S, cost_pause)
            with self.cond:
                if self.stopping and not self.queue and not self.inflight and not self.waiting:
                    return
                if (self._can_dispatch() and not self._held()) or self._nudged:
                    continue
                kinds = self.core.provider.dependency_kinds
                if any(not _depends.waits_in_client(r, kinds) for r in self.waiting):
                    continue  # an upstream job ended in this poll: its dependents go out now
                timeout = max(0.0, next_poll - time.monotonic()) if self.inflight else None
                if self.queue and self.hold is not None:
                    until = max(0.0, self.hold.until - time.monotonic())
                    timeout = until if timeout is None else min(timeout, until)
                self.cond.wait(timeout)

    def _counted(self) -> list[_JobRecord]:
        # A job the service holds for its upstream jobs takes no worker slot:
        # it cannot run before they end, and they hold slots of their own. A
        # pipeline is thus handed over whole, and survives its client.
        return [r for r in self.inflight.values() if not r.attached and not r.held]

    def _can_dispatch(self) -> bool:
        """Whether the head of the queue may be handed over now (caller holds ``cond``)."""
        if not self.queue:
            return False
        head = self.queue[0]
        if len(self._counted()) < self.core.max_workers:
            return True
        kinds = self.core.provider.dependency_kinds
        # A dependent goes to the service's hold, or to the client's, without a slot.
        return _depends.waits_in_client(head, kinds) or any(
            kind in kinds and kind != "sequential" and f is not None and not f.done() for kind, f in head.depends
        )

    def _held(self) -> bool:
        """Whether submissions still wait for the provider's capacity; call under ``cond``."""
        hold = self.hold
        if hold is None:
            return False
        if time.monotonic() >= hold.until or len(self._counted()) < hold.inflight:
            self.hold = None  # one of our jobs ended, or the pause is over: try again
            return False
        return True

    def _break_all(self) -> None:
        with self.cond:
            records = list(self.queue) + self.waiting + list(self.inflight.values())
            self.queue.clear()
            self.waiting.clear()
            self.inflight.clear()
            self.cond.notify_all()
        broken = self.broken
        for record in records:
            _fail_unfinished(record, lambda job_id: BrokenExecutor(f"job {job_id}: {broken}"))

    def job_store(self, record: _JobRecord) -> Store:
        store = self._job_stores.get(record.job_id)
        if store is None:
            store = self._job_stores[record.job_id] = record.store.child(record.job_id)
        return store

    # -- dispatch ------------------------------------------------------------
    def _dispatch(self) -> bool:
        progressed = False
        # Submitting is a few round trips per job: hand the loop back now and
        # then, so that polls of the jobs already in flight are not starved
        # while thousands of submissions go out.
        deadline = time.monotonic() + _DISPATCH_SLICE_S
        kinds = self.core.provider.dependency_kinds
        with self.cond:
            ready = [r for r in self.waiting if not _depends.waits_in_client(r, kinds)]
            if ready:
                self.waiting = [r for r in self.waiting if r not in ready]
                self.queue.extendleft(reversed(ready))  # they were queued before what is queued now
        while time.monotonic() < deadline:
            with self.cond:
                if not self._can_dispatch() or self._held():
                    return progressed
                record = self.queue.popleft()
                future = record.future
                if future is None or future.cancelled():
                    if record.stored:  # held back, then cancelled: it never reached the provider
                        self._discard_stored(record)
                    continue
                if _depends.waits_in_client(record, kinds):
                    self.waiting.append(record)
                    continue
                self.inflight[record.job_id] = record
                self.dispatching = record
            progressed = True
            try:
                self._submit(record)
            except CannotHold:
                _depends.hold_in_client(record)
                with self.cond:
                    self.inflight.pop(record.job_id, None)
                    self._job_stores.pop(record.job_id, None)
                    self.waiting.append(record)
            except CapacityReached as exc:
                # Not the job's failure: it waits, first in line, until the
                # service takes jobs again.
                with self.cond:
                    self.inflight.pop(record.job_id, None)
                    self.queue.appendleft(record)
                    pause = min(max(exc.retry_after_s, self.min_interval), self.max_interval)
                    self.hold = _Hold(exc.reason, time.monotonic() + pause, len(self._counted()))
                    self.hold_reason = exc.reason
                log.info("cloudexec: job %s waits: %s", record.job_id, exc.reason)
                return progressed
            except BaseException as exc:  # noqa: BLE001 - the future carries it
                with self.cond:
                    self.inflight.pop(record.job_id, None)
                    self._job_stores.pop(record.job_id, None)
                _fail_unfinished(record, lambda _job_id, exc=exc: exc, children_first=False)  # type: ignore[misc]
            else:
                with self.cond:
                    self.hold_reason = None
            finally:
                with self.cond:
                    self.dispatching = None
                    self.cond.notify_all()
        return progressed

    def _discard_stored(self, record: _JobRecord) -> None:
        try:
            record.store.child(record.job_id).delete("")
        except Exception as exc:  # noqa: BLE001 - only storage left over
            log.warning("cloudexec: could not remove the stored call of cancelled job %s: %s", record.job_id, exc)

    def _manifest_bytes(self, record: _JobRecord) -> bytes:
        manifest = _keys.sign_manifest(
            self.core.keys.job_key(record.job_id), record.job_id, record.manifest(self.core.provider.name)
        )
        return json.dumps(manifest, indent=1).encode()

    def _write_manifest(self, record: _JobRecord) -> None:
        self.job_store(record).write(_payload.MANIFEST, self._manifest_bytes(record))

    def _submit(self, record: _JobRecord) -> None:
        provider = self.core.provider
        store = self.job_store(record)
        depends_on = _depends.depends_on(record)
        if isinstance(depends_on, BaseException):
            raise depends_on  # an upstream job failed: this one never reaches the provider
        try:
            if not record.stored:  # a job held back by the provider's capacity is stored already
                assert record.call is not None
                objects: dict[str, bytes | bytearray | memoryview] = {_payload.CALL: record.call}
                if record.inputs is not None:
                    objects[_payload.INPUTS] = record.inputs
                # The manifest goes before the job: once the provider has the job
                # it may run, and attach() must find it from then on, even if this
                # client dies before it learns the provider's id (written just below).
                objects[_payload.MANIFEST] = self._manifest_bytes(record)
                # One bulk write: the objects go out concurrently, not one round trip each.
                try:
                    store.write_many(objects)
                except Exception as exc:
                    raise SubmissionError(
                        f"job {record.job_id} was not submitted: writing its call to {store.url} failed "
                        f"({type(exc).__name__}: {exc}). Check that the storage credentials are valid and may "
                        "write there (an expired or revoked credential is refused with 401/403), then submit again",
                        job_id=record.job_id,
                    ) from exc
                record.stored = True
            spec = JobSpec(
                job_id=record.job_id,
                job_url=store.url,
                name=record.name,
                settings=record.settings,
                array_size=record.size,
                command=provider.command_for(store.url, array=record.is_array),
                # The job's own derived key, never the master key; it reaches the
                # job only through the provider's environment channel.
                environment=_keys.job_environment(
                    self.core.keys, record.job_id, [job_id.split("[")[0] for job_id, _ in record.upstream_ids]
                ),
                depends_on=depends_on,
            )
            try:
                record.ref = provider.submit(spec)
            except (CloudExecError, CannotHold, CapacityReached):
                raise
            except Exception as exc:
                raise SubmissionError(
                    f"the {provider.name} provider did not accept job {record.job_id}: {type(exc).__name__}: {exc}",
                    job_id=record.job_id,
                ) from exc
        except CapacityReached:
            raise  # submitted again later: what is stored stays
        except BaseException:
            # Nothing half-written: the job never reached the provider. A job
            # the client then holds (CannotHold) is written again when it goes.
            record.stored = False
            try:
                store.delete("")
            except Exception:  # noqa: BLE001
                pass
            raise
        record.call = record.inputs = None  # free the client's memory
        _depends.submitted(record)
        # From here on the job exists at the provider: nothing may fail its future
        # as if nothing had been submitted.
        self._record_provider_ref(record)
        if record.future is not None and record.future.cancelled():
            # cancel() ran while we were submitting: it could not reach the job then.
            try:
                provider.cancel(record.ref, CANCEL_REASON)
            except Exception as exc:  # noqa: BLE001
                log.warning("cloudexec: could not cancel job %s: %s", record.job_id, exc)

    def _record_provider_ref(self, record: _JobRecord) -> None:
        """Rewrite the manifest with the provider's id; retried at every poll until it is stored."""
        try:
            self._write_manifest(record)
        except Exception as exc:  # noqa: BLE001 - the job runs anyway; attach falls back on storage
            record.manifest_pending = True
            log.warning(
                "cloudexec: job %s was handed to the provider, but recording its provider id in %s failed "
                "(will retry): %s",
                record.job_id,
                _payload.MANIFEST,
                exc,
            )
        else:
            record.manifest_pending = False

    def _learn_ref(self, record: _JobRecord) -> bool:
        """A job attached before its submitter recorded the provider's id: look again, else use storage.

        Returns whether its future changed.
        """
        try:
            raw = self.job_store(record).read(_payload.MANIFEST)
            data = json.loads(raw)
            _keys.verify_manifest(self.core.keys.job_keys(record.job_id), record.job_id, data)
            ref = data.get("provider_ref")
            if isinstance(ref, str):
                record.ref = ref
                return False
            if record.is_array:
                changed = self._collect_children(record, final=False)
                if record.children.all_done():
                    self._finish_array(record)
                    self._drop(record)
                    return True
                if changed:
                    return True
            elif self.job_store(record).exists(_payload.RESULT) and self._finish_single(record, None):
                self._drop(record)
                return True
            raise LookupError(
                f"the manifest of job {record.job_id} names no provider job yet: its submitting client has not "
                "recorded the provider's id (it may have stopped right after handing the job over), and the job "
                "has stored no result"
            )
        except Exception as exc:  # noqa: BLE001 - counted, bounded by give_up_s
            return self._failed(record, exc)

    # -- poll ------------------------------------------------------------------
    def _poll(self) -> bool:
        changed = False
        with self.cond:
            records = [r for r in self.inflight.values() if r.ref is not None]
            unknown = [r for r in self.inflight.values() if r.ref is None and r.attached]
        for record in unknown:
            changed |= self._learn_ref(record)
        for record in records:
            if record.manifest_pending:
                self._record_provider_ref(record)
        if not records:
            return changed
        provider = self.core.provider
        try:
            infos = provider.describe([r.ref for r in records if r.ref is not None])
        except Exception as exc:  # noqa: BLE001 - a passing API fault must not kill the poller
            log.warning("cloudexec: describing %d jobs failed (will retry): %s", len(records), exc)
            return self._poll_storage_only(records, exc) or changed
        for record in records:
            try:
                changed |= self._update(record, infos.get(record.ref or ""))
            except Exception as exc:  # noqa: BLE001
                log.warning("cloudexec: updating job %s failed (will retry): %s", record.job_id, exc)
                changed |= self._failed(record, exc)
            else:
                record.failures, record.failing_since = 0, None
        return self._deliver_early(records, infos) or changed

    def _deliver_early(self, records: list[_JobRecord], infos: dict[str, JobInfo]) -> bool:
        """Deliver the successful results of single jobs the service keeps reporting running.

        AWS Batch reports a job ``SUCCEEDED`` seconds (at times a minute) after
        its container stored the result, Azure after the task's logs were
        uploaded. The first successful result of a job is final, so a future
        does not wait for that: once its result has been stored for
        `_EARLY_GRACE_S` and the service still says running, it is delivered
        (its status and exit code properties then wait for the reported end:
        `BatchFuture._ended_info`). The grace lets a job that is merely exiting
        end first, so that in the common case ``result()`` returns with the
        job's final status and exit code in hand. Only jobs reported running are looked for (one bulk read
        per poll); a stored error waits for the job's end, as a retry may
        still succeed.
        """
        now = time.monotonic()
        changed = False
        running = []
        for record in records:
            info = infos.get(record.ref or "")
            phase = info.status.phase if info is not None and info.status is not None else None
            if record.is_array or future_done(record) or phase is not Phase.RUNNING:
                self._early.pop(record.job_id, None)
                continue
            seen = self._early.get(record.job_id)
            if seen is None:
                running.append(record)
            elif now - seen[0] >= _EARLY_GRACE_S:
                del self._early[record.job_id]
                if self._finish_single(record, None, seen[1], before_end=True):
                    self._drop(record)
                    changed = True
        groups: dict[int, tuple[Store, list[_JobRecord]]] = {}
        for record in running:
            groups.setdefault(id(record.store), (record.store, []))[1].append(record)
        for store, group in groups.values():
            keys = {f"{record.job_id}/{_payload.result_key(None)}": record for record in group}
            try:
                fetched = store.read_many(list(keys))
            except Exception as exc:  # noqa: BLE001 - the job's end delivers it all the same
                log.debug("cloudexec: looking for early results failed: %s", exc)
                continue
            for key, record in keys.items():
                data = fetched.get(key)
                if not isinstance(data, bytes):
                    continue  # absent, or not readable now: the job's end delivers it
                outcomes = self._read_outcomes(record, None, data)
                if isinstance(outcomes, list) and outcomes and all(o[0] == "ok" for o in outcomes):
                    self._early[record.job_id] = (now, outcomes)
                    changed = True  # polled again soon: delivered when the grace ends
        return changed

    def _poll_storage_only(self, records: list[_JobRecord], error: Exception) -> bool:
        """The provider cannot be asked: deliver the successful results storage already holds."""
        changed = False
        for record in records:
            try:
                if record.is_array:
                    changed |= self._collect_children(record, final=False)
                    if record.children.all_done() and not future_done(record):
                        self._finish_array(record)
                    if future_done(record):
                        self._drop(record)
                        changed = True
                        continue
                else:
                    outcomes = self._read_outcomes(record, None)
                    if isinstance(outcomes, list) and all(o[0] == "ok" for o in outcomes):
                        # The service could not say whether the job ended: its
                        # properties wait for that end, as after an early delivery.
                        self._finish_single(record, None, outcomes, before_end=True)
                        self._drop(record)
                        changed = True
                        continue
            except Exception as exc:  # noqa: BLE001 - counted like the describe failure
                error = exc
            changed |= self._failed(record, error)
        return changed

    def _failed(self, record: _JobRecord, error: BaseException) -> bool:
        """Count a failed attempt to learn a job's state; give the job up once the budget is spent."""
        now = time.monotonic()
        record.failures += 1
        if record.failing_since is None:
            record.failing_since = now
        record.last_error = f"{type(error).__name__}: {error}"
        waited = now - record.failing_since
        if record.failures < _MIN_FAILURES or waited < self.core.give_up_s:
            return False
        log.error("cloudexec: giving up job %s after %d failures: %s", record.job_id, record.failures, error)
        _fail_unfinished(
            record,
            lambda job_id: JobUnreachableError(job_id, reason=record.last_error, failures=record.failures, waited_s=waited),
        )
        self._drop(record)
        return True

    def _drop(self, record: _JobRecord) -> None:
        self._early.pop(record.job_id, None)
        with self.cond:
            self.inflight.pop(record.job_id, None)
            self._job_stores.pop(record.job_id, None)
            self.cond.notify_all()

    def _update(self, record: _JobRecord, info: JobInfo | None) -> bool:
        future = record.future
        assert future is not None
        if future.cancelled():
            self._drop(record)
            return True
        if info is None:
            return self._update_unknown(record)
        record.missing_polls = 0
        record.first_missing = None
        old = future._info
        future._set_info(info)
        changed = old is None or old.status != info.status or old.status_counts != info.status_counts
        if info.status is not None and info.status.phase is not Phase.QUEUED:
            future._mark_running()
        if record.is_array:
            changed |= self._collect_children(record, final=info.terminal)
            if info.terminal and future_done(record):
                self._drop(record)
        elif info.terminal and self._finish_single(record, info):
            self._drop(record)
            changed = True
        return changed

    def _update_unknown(self, record: _JobRecord) -> bool:
        """The provider does not know the job: expired metadata, or not visible yet."""
        record.missing_polls += 1
        if record.first_missing is None:
            record.first_missing = time.monotonic()
        store = self.job_store(record)
        if record.is_array:
            self._collect_children(record, final=False, accept_errors=True)
            if record.children.all_done():
                self._drop(record)
                return True
        elif store.exists(_payload.RESULT):
            if self._finish_single(record, None):
                self._drop(record)
                return True
            return False
        waited = time.monotonic() - record.first_missing
        if record.missing_polls >= _MISSING_POLLS and waited >= _MISSING_S:
            if record.is_array:
                self._collect_children(record, final=True, infos=[])
                if not future_done(record):
                    return False  # a result object is still settling
            else:
                assert record.future is not None
                record.future._finish(exception=job_failed(record, None, None, self.core.provider))
            self._drop(record)
            return True
        return False

    def _read_outcomes(self, record: _JobRecord, index: int | None, fetched: Any = _UNREAD) -> Any:
        """A stored result, verified before it is unpickled.

        Args:
            fetched: the object's bytes (``None``: absent) when read already,
                in a bulk read of many results.

        Returns:
            Its list of outcomes; ``None`` if there is none; the error refusing
            it; or ``_UNSETTLED`` while an object that fails verification may
            still be being written.

        Raises:
            Exception: the storage failed (the caller counts it and retries).
        """
        if fetched is _UNREAD:
            try:
                fetched = self.job_store(record).read(_payload.result_key(index))
            except FileNotFoundError:
                return None
        if fetched is None:
            return None
        data: bytes = fetched
        try:
            body = _payload.verify_result(self.core.keys.job_keys(record.job_id), record.job_id, index, data)
        except IntegrityError as exc:
            now = time.monotonic()
            first, size = record.unverified.get(index, (now, -1))
            if size != len(data):  # first seen, or still growing: a write in progress
                record.unverified[index] = (now, len(data))
                return _UNSETTLED
            if now - first < min(_SETTLE_S, self.core.give_up_s):
                return _UNSETTLED
            record.unverified.pop(index, None)
            return exc
        record.unverified.pop(index, None)
        try:
            return _payload.load_result(record.job_id, body)
        except CloudExecError as exc:
            return exc

    def _finish_single(
        self, record: _JobRecord, info: JobInfo | None, outcomes: Any = _UNREAD, *, before_end: bool = False
    ) -> bool:
        """Set a single job's future from its stored result; False while that result settles.

        Args:
            outcomes: what `_read_outcomes` returned, when read already.
            before_end: the service still reports the job running.
        """
        future = record.future
        assert future is not None
        if outcomes is _UNREAD:
            outcomes = self._read_outcomes(record, None)
        if outcomes is _UNSETTLED:
            return False
        if isinstance(outcomes, BaseException):
            future._finish(exception=naming_the_job(outcomes, record.job_id))
        elif outcomes:
            try:
                value = _payload.raise_or_return(outcomes)
            except BaseException as exc:  # noqa: BLE001 - the user's exception, re-raised by result()
                future._finish(exception=naming_the_job(exc, record.job_id))
            else:
                future._finish(result=value, before_end=before_end)
        else:
            future._finish(exception=job_failed(record, None, info, self.core.provider))
        return True

    def _collect_children(
        self,
        record: _JobRecord,
        *,
        final: bool,
        accept_errors: bool = False,
        infos: list[JobInfo | None] | None = None,
    ) -> bool:
        """Set the futures of children whose result objects appeared.

        A successful child's result is final (the runner never replaces one)
        and delivered at once. A failed child's result is taken only once the
        array ended (``final``): until then a retry may still replace it, so it
        is read again at each poll, and delivered as soon as a retry succeeded.
        """
        store = self.job_store(record)
        changed = False
        # Only the names after the last child every earlier one of which has its
        # result: a poll lists what is new (plus the few children that ended out
        # of order), not all N names again.
        children = record.children
        while record.done_below < children.size and children.done(record.done_below):
            record.done_below += 1
        start_after = _payload.result_name(record.done_below - 1) if record.done_below else None
        names = store.list(_payload.RESULTS_DIR, start_after=start_after)
        new: list[int] = []
        for name in names:
            stem = name[:-4] if name.endswith(".pkl") else None
            if stem is None or not stem.isdigit():
                continue
            index = int(stem)
            if index >= children.size or children.done(index):
                continue
            new.append(index)
        # The new results in one bulk read (concurrent GETs on object stores).
        fetched = store.read_many([_payload.result_key(i) for i in new]) if new else {}
        failed: Exception | None = None
        for index in new:
            data = fetched.get(_payload.result_key(index))
            if isinstance(data, Exception):
                failed = failed or data  # read again at the next poll; the others are delivered now
                continue
            outcomes = self._read_outcomes(record, index, data)
            if outcomes is None or outcomes is _UNSETTLED:
                continue
            if isinstance(outcomes, list) and not (final or accept_errors) and any(o[0] != "ok" for o in outcomes):
                record.deferred.add(index)
                continue
            record.deferred.discard(index)
            self._finish_child(record, index, outcomes)
            changed = True
        if failed is not None:
            # Counted as a failed look at the job (and retried): a child whose
            # result could not be read now must not count as missing.
            raise failed
        if final:
            missing = [i for i in children.pending() if i not in record.unverified]
            if missing:
                if infos is None:
                    infos = self.core.describe_children(record) or []
                for index in missing:
                    child_info = infos[index] if index < len(infos) else None
                    child = children.futures.get(index)
                    if child is not None and child_info is not None:
                        child._set_info(child_info)
                    error = job_failed(record, index, child_info, self.core.provider)
                    self._finish_child(record, index, error)
                changed = True
        # The array's own future ends with the array job (so that its properties
        # are final when result() returns), even if every child already has a result.
        ended = final or accept_errors
        if ended and children.all_done() and not future_done(record):
            self._finish_array(record)
            changed = True
        return changed

    def _finish_child(self, record: _JobRecord, index: int, outcomes: list[Any] | BaseException) -> None:
        children = record.children
        if isinstance(outcomes, BaseException):
            outcomes = naming_the_job(outcomes, children.child_id(index))
        children.finish(index, outcomes)

    def _finish_array(self, record: _JobRecord) -> None:
        future = record.future
        assert isinstance(future, ArrayFuture)
        children = record.children
        problem = children.first_problem()
        if problem is not None:
            index, code = problem
            if code == _CHILD_FAILED:
                future._finish(exception=children.error(index))
            else:
                future._finish(exception=CancelledError(f"child {children.child_id(index)} was cancelled"))
            return
        if record.streaming:
            future._finish(result=None)  # map()'s iterator has the values (and may have taken them already)
            return
        values: list[Any] = []
        for index in range(children.size):
            values.extend(outcome[1] for outcome in children.outcomes[index])
        children.keep_values(values)
        future._finish(result=values)
