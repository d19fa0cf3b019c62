"""How the Azure provider describes jobs: Azure's answers as `JobInfo`, with few REST calls per poll.

The status table (`AzureJobStatus`), the pure functions from Azure's task,
job and task-count objects to `JobInfo`, and `BulkDescribe`, the
`AzureBatchProvider` mixin holding the describe verbs and the memory they
keep between polls (``_seen``).

REST calls per poll, for the jobs in flight (many jobs per call):
one ``list_jobs`` (``$filter`` on ``creationTime`` since the oldest of them,
``$select`` id, state, creationTime, executionInfo; one page per 1,000 jobs)
tells which are still active and which completed, and why (the job's
``terminateReason``). A single job costs one GET of its task the moment the
list shows it completed (for its exit code and failureInfo; that terminal
answer is kept and never asked again), and at most `_REFRESH_PER_POLL` active
single jobs get their task fetched per poll: half the oldest not seen running
yet, half in rotation, so each is seen ``Running`` eventually; between two
fetches a job keeps its last answer (``Running`` stays ``Running`` until the
list says the job completed). An array costs its ``taskcounts``. A job the
list does not show (deleted, or created before a client clock far off) and a
lone job asked about (a property read) are asked about directly: a GET of its
task, plus one of its job while the task is queued (a terminated job leaves
its queued task ``active`` for ever, so only the job tells it ended); an
array's ``taskcounts``, plus its job when the counts did not move since the
last look (a terminated job's counts stop) or it ended with failed tasks: a
map being polled costs one call per poll while its tasks progress. Those calls
go out on a few threads at once. When an array ends, its tasks are listed in
pages of 1,000 (``$select`` keeps the bodies small). Tasks of the executor's
shared job (``shared_job=True``) cost one ``list_tasks`` per poll of the tasks
whose state changed (see `BulkDescribe._describe_shared`).

Status reasons come from the task's ``failureInfo`` (code, message and its
``Message`` detail, e.g. ``TaskEnded: … (The maximum execution time configured
on the task was exceeded)``), preceded by the job's ``terminateReason`` when
something other than Azure's own ``AllTasksComplete`` ended the job.
"""

from __future__ import annotations

import datetime as _dt
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from cloudexec._provider import JobInfo, JobStatus, Phase

__all__ = ["AzureJobStatus", "BulkDescribe", "task_status", "task_id_for", "task_info", "array_info"]

#: Task id of array child 0 (Wolfram's scheme): child i is task 10000001 + i.
AZURE_FIRST_CHILD_TASK_ID = 10000001
#: Task id of a single job.
SINGLE_TASK_ID = str(AZURE_FIRST_CHILD_TASK_ID - 1)
#: The terminate reason Azure gives a job that ended through onAllTasksComplete.
ALL_TASKS_COMPLETE = "AllTasksComplete"
#: The terminate reason of a job ended by a failed task's exit-option job action (a sequential array).
TASK_FAILED = "TaskFailed"
_PAGE = 1000  # tasks per list page (Azure's maximum)
_TASK_SELECT = ["id", "state", "executionInfo", "nodeInfo", "requiredSlots"]
_JOB_SELECT = ["id", "state", "executionInfo"]
_LIST_JOB_SELECT = ["id", "state", "creationTime", "executionInfo"]
_SHARED_TASK_SELECT = [*_TASK_SELECT, "stateTransitionTime"]
# A shared job's tasks are listed from the latest state change seen, less this
# margin: a list that lags a little behind still shows every change once.
_SHARED_MARGIN = _dt.timedelta(seconds=60)
_DESCRIBE_THREADS = 16
#: Active single jobs whose task one poll GETs (the rest keep their last answer).
_REFRESH_PER_POLL = 8
# Client-side creation bounds (submit time, the stamp in a job id) may run
# ahead of Azure's clock by this much without a job falling out of the list.
_CLOCK_SKEW = _dt.timedelta(minutes=15)
# Jobs the provider remembers (creation time, last and final answers).
_SEEN_MAX = 20_000
# The UTC stamp cloudexec puts in its job ids (`cloudexec._base.new_job_id`).
_ID_STAMP_RE = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{8}$")

T = TypeVar("T")
R = TypeVar("R")


class AzureJobStatus(JobStatus):
    """Azure Batch statuses, named as Azure (and Wolfram's AzureBatch) names them.

    Single jobs and array children: ``Active`` → ``Running`` → ``Succeeded`` or
    ``Failed``. Arrays: ``Active`` → ``Completed`` when every task succeeded,
    ``Failed`` when one failed or the job was terminated before all ran.
    """

    ACTIVE = ("Active", Phase.QUEUED)
    RUNNING = ("Running", Phase.RUNNING)
    SUCCEEDED = ("Succeeded", Phase.SUCCEEDED)
    FAILED = ("Failed", Phase.FAILED)
    COMPLETED = ("Completed", Phase.SUCCEEDED)


def _name(value: Any) -> str | None:
    """An SDK enum (or plain string) as its lower-case wire value."""
    if value is None:
        return None
    return str(getattr(value, "value", value)).lower()


def task_status(state: str | None, result: str | None) -> AzureJobStatus | None:
    """Map an Azure task state (and, once completed, its result) to an `AzureJobStatus`.

    Args:
        state: ``active``, ``preparing``, ``running`` or ``completed``.
        result: ``success`` or ``failure`` (``executionInfo.result``).
    """
    state = _name(state)
    if state in ("active", "preparing"):
        return AzureJobStatus.ACTIVE
    if state == "running":
        return AzureJobStatus.RUNNING
    if state == "completed":
        return AzureJobStatus.SUCCEEDED if _name(result) == "success" else AzureJobStatus.FAILED
    return None


def task_id_for(index: int | None) -> str:
    """The Azure task id of a single job (``index`` None) or of array child ``index``."""
    return SINGLE_TASK_ID if index is None else str(AZURE_FIRST_CHILD_TASK_ID + index)


#: Prefix of the reference of a job held as a task of its upstream job's Azure job.
HOSTED_PREFIX = "task:"


def hosted(ref: str) -> tuple[str, str] | None:
    """``(host job id, task id)`` of a job run as a task of another job, else ``None``."""
    if not ref.startswith(HOSTED_PREFIX):
        return None
    host, _, task_id = ref[len(HOSTED_PREFIX) :].partition("/")
    return host, task_id


#: Prefix of the reference of a single job run as a task of the executor's shared job.
SHARED_REF = "shared:"


def shared_ref(job_id: str, task_id: str) -> str:
    """The reference of task ``task_id`` of the shared job ``job_id``."""
    return f"{SHARED_REF}{job_id}/{task_id}"


def _task_of(ref: str) -> tuple[str, str]:
    """``(azure_job_id, task_id)`` of a single job's reference (its own job, its upstream's, or the shared one)."""
    where = hosted(ref)
    if where is not None:
        return where
    if ref.startswith(SHARED_REF):
        job_id, task_id = ref[len(SHARED_REF) :].split("/", 1)
        return job_id, task_id
    return ref, SINGLE_TASK_ID


def _parse_ref(ref: str) -> tuple[str, int | None]:
    """``(azure_job_id, array size or None)`` of a provider reference."""
    if ref.startswith(SHARED_REF):
        return _task_of(ref)[0], None
    if ref.startswith("array:"):
        job_id, size = ref[len("array:") :].rsplit("/", 1)
        return job_id, int(size)
    return ref, None


def _failure_text(failure: Any) -> str | None:
    """``code: message (detail)`` of a task's failureInfo."""
    if failure is None:
        return None
    code, message = failure.code, failure.message
    details = [
        d.value for d in (failure.details or []) if d.name == "Message" and d.value and d.value != message
    ]
    text = f"{code}: {message}" if code and message else (code or message or "")
    if details:
        text += f" ({'; '.join(details)})"
    return text or None


def _job_end(job: Any) -> tuple[bool, str | None]:
    """``(terminated, reason)``: whether something other than ``AllTasksComplete`` completed the job, and why."""
    if job is None or _name(job.state) != "completed":
        return False, None
    info = job.execution_info
    reason = info.termination_reason if info is not None else None
    if reason == ALL_TASKS_COMPLETE:
        return False, None
    if reason == TASK_FAILED:
        return True, "TaskFailed: a task failed, so Azure Batch terminated the job and ran none of its queued tasks"
    return True, reason or "the job was terminated"


def _ended(task: Any) -> bool:
    """Whether a task was ended by a terminate request or its wall-clock limit (failureInfo ``TaskEnded``)."""
    execution = task.execution_info
    failure = execution.failure_info if execution is not None else None
    return failure is not None and failure.code == "TaskEnded"


def _settled(task: Any, job: Any) -> bool:
    """Whether a terminal task's answer can be kept for good.

    A task that completed on its own never changes again; one ended by a
    terminate is kept only once its job completed, because the job carries
    the terminate reason and may not show it yet.
    """
    return not _ended(task) or (job is not None and _name(job.state) == "completed")


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, _dt.datetime) else None


def task_info(task: Any, job_id: str, job: Any = None) -> JobInfo:
    """Turn an Azure task (and, when fetched, its job) into a `JobInfo`."""
    execution = task.execution_info
    result = execution.result if execution is not None else None
    status = task_status(task.state, result)
    terminated, job_reason = _job_end(job)
    reasons = [r for r in (job_reason, _failure_text(execution.failure_info if execution else None)) if r]
    if terminated and status is not None and not status.terminal:
        # A terminated job leaves its queued tasks active for ever: they will never run.
        status = AzureJobStatus.FAILED
    started = execution is not None and execution.start_time is not None
    node = task.node_info
    extra: dict[str, Any] = {
        "provider_task_id": task.id,
        "azure_task_state": _name(task.state),
        "node_id": node.node_id if node is not None else None,
        "pool_id": node.pool_id if node is not None else None,
        "required_slots": task.required_slots,
        "started_at": _iso(execution.start_time) if execution else None,
        "stopped_at": _iso(execution.end_time) if execution else None,
    }
    return JobInfo(
        status=status,
        exit_code=execution.exit_code if execution is not None else None,
        status_reason="; ".join(reasons) or None,
        provider_job_id=job_id,
        attempts=((execution.retry_count or 0) + 1) if started and execution is not None else 0,
        extra=extra,
    )


def array_info(job_id: str, size: int, counts: Any, job: Any = None) -> JobInfo:
    """Turn a job's task counts (and, when fetched, the job) into the `JobInfo` of an array."""
    tc = counts.task_counts
    terminated, job_reason = _job_end(job)
    reasons = [job_reason] if job_reason else []
    if tc.failed:
        reasons.append(f"{tc.failed} of {size} tasks failed")
    if tc.completed >= size:
        status = AzureJobStatus.FAILED if tc.failed else AzureJobStatus.COMPLETED
    elif terminated:
        status = AzureJobStatus.FAILED
    else:
        # Azure's task counts may lag the job by a few seconds: an
        # AllTasksComplete job whose counts are not complete yet is still Active.
        status = AzureJobStatus.ACTIVE
    return JobInfo(
        status=status,
        status_reason="; ".join(reasons) or None,
        provider_job_id=job_id,
        status_counts={
            AzureJobStatus.ACTIVE.value: tc.active,
            AzureJobStatus.RUNNING.value: tc.running,
            AzureJobStatus.SUCCEEDED.value: tc.succeeded,
            AzureJobStatus.FAILED.value: tc.failed,
        },
        extra={"provider_first_task_id": task_id_for(0), "azure_job_state": _name(job.state) if job else None},
    )


def _queued_info(ref: str) -> JobInfo:
    """What an active single job whose task was not fetched yet reads: ``Active``."""
    job_id, task_id = _task_of(ref)
    return JobInfo(status=AzureJobStatus.ACTIVE, provider_job_id=job_id, extra={"provider_task_id": task_id})


@dataclass
class _Seen:
    """What the provider remembers of one Azure job between polls."""

    #: Azure's creationTime once listed, else a lower bound from the client's clock.
    created: _dt.datetime | None = None
    #: The last answer from a GET of its task.
    info: JobInfo | None = None
    #: `time.monotonic` of that GET.
    refreshed_at: float = float("-inf")
    #: The terminal answer once the job completed: it never changes.
    final: JobInfo | None = None


def _is_not_found(exc: BaseException) -> bool:
    return type(exc).__name__ == "ResourceNotFoundError" or getattr(exc, "status_code", None) == 404


class BulkDescribe:
    """The describe verbs of `AzureBatchProvider` (a mixin), and what they remember between polls.

    The provider supplies ``client`` (an ``azure.batch.BatchClient``), and
    calls `_init_describe` from its constructor.
    """

    client: Any

    def _init_describe(self) -> None:
        self._threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        # Per shared job: list its tasks whose state changed since then.
        self._shared_since: dict[str, _dt.datetime] = {}
        # Per array: its task counts at the last look (active, running, completed, failed).
        # Per array: its task counts at the last look (active, running, completed,
        # failed), that answer, and whether the next poll asks the job instead.
        self._array_counts: OrderedDict[str, tuple[tuple[int, int, int, int], Any, bool]] = OrderedDict()

    # -- helpers -------------------------------------------------------------------
    def _parallel(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) …]``, on a few threads when there are several (one HTTP call each)."""
        if len(items) <= 2:
            return [fn(item) for item in items]
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(_DESCRIBE_THREADS, thread_name_prefix="cloudexec-azure")
            pool = self._threads
        return list(pool.map(fn, items))

    def _get_job(self, job_id: str) -> Any:
        try:
            return self.client.get_job(job_id, select=_JOB_SELECT)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise

    # -- describe -------------------------------------------------------------------
    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        unique = [ref for ref in dict.fromkeys(refs) if hosted(ref) is None]
        shared = [ref for ref in unique if ref.startswith(SHARED_REF)]
        out: dict[str, JobInfo] = self._describe_shared(shared) if shared else {}
        for ref in dict.fromkeys(refs):
            where = hosted(ref)
            if where is not None:
                info = self.describe_hosted(*where)
                if info is not None:
                    out[ref] = info
        pending: list[str] = []
        with self._lock:
            for ref in unique:
                if ref.startswith(SHARED_REF):
                    continue
                seen = self._seen.get(_parse_ref(ref)[0])
                if seen is not None and seen.final is not None:
                    out[ref] = seen.final
                else:
                    pending.append(ref)
        if len(pending) == 1:
            # A lone job (a property read): asking about it directly is exact and as cheap.
            infos = [self._describe_ref(pending[0])]
            out.update({ref: info for ref, info in zip(pending, infos) if info is not None})
            return out
        if pending:
            out.update(self._describe_listed(pending))
        return out

    def _describe_shared(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        """Describe tasks of shared jobs: one ``list_tasks`` per shared job, of the tasks that changed.

        The list asks for the tasks whose ``stateTransitionTime`` is at or
        after the latest change seen by the previous list (less
        `_SHARED_MARGIN`): a poll pays one call plus one per 1,000 tasks that
        changed, however many wait. A task not in the answer keeps its last
        state (``Active`` until first seen otherwise); a completed one is never
        asked about again.
        """
        out: dict[str, JobInfo] = {}
        by_job: dict[str, list[tuple[str, str]]] = {}
        with self._lock:
            for ref in refs:
                seen = self._seen.get(ref)
                if seen is not None and seen.final is not None:
                    out[ref] = seen.final
                else:
                    job_id, task_id = _task_of(ref)
                    by_job.setdefault(job_id, []).append((ref, task_id))
        for job_id, items in by_job.items():
            since = self._shared_since.get(job_id)
            stamp = since.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if since else None
            try:
                tasks = list(
                    self.client.list_tasks(
                        job_id,
                        filter=f"stateTransitionTime ge DateTime'{stamp}'" if stamp else None,
                        select=_SHARED_TASK_SELECT,
                        max_results=_PAGE,
                    )
                )
            except Exception as exc:
                if _is_not_found(exc):
                    continue  # the shared job is gone: its tasks read unknown
                raise
            changes = [t.state_transition_time for t in tasks if t.state_transition_time is not None]
            if changes:
                bound = max(changes) - _SHARED_MARGIN
                if since is None or bound > since:
                    self._shared_since[job_id] = bound
            with self._lock:
                # Every task listed is remembered, asked about or not: the next
                # list starts after these changes.
                for task in tasks:
                    info = task_info(task, job_id)
                    seen = self._entry(shared_ref(job_id, str(task.id)))
                    seen.info = info
                    if info.terminal:
                        seen.final = info
                for ref, _task_id in items:
                    seen = self._seen.get(ref)
                    out[ref] = seen.info if seen is not None and seen.info is not None else _queued_info(ref)
        return out

    def _describe_listed(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        """Describe many jobs with one ``list_jobs`` (paged) and a bounded number of task GETs."""
        arrays = [ref for ref in refs if _parse_ref(ref)[1] is not None]
        # Task counts before the job list: a job listed after its counts is at
        # least as fresh, so an array whose tasks were killed by a terminate
        # shows the job's terminate reason.
        counts = dict(zip(arrays, self._parallel(self._task_counts, arrays)))
        listed = self._list_jobs([_parse_ref(ref)[0] for ref in refs])
        out: dict[str, JobInfo] = {}
        unlisted: list[str] = []
        finished: list[tuple[str, Any]] = []
        active: list[tuple[str, Any]] = []
        for ref in refs:
            job_id, size = _parse_ref(ref)
            job = listed.get(job_id)
            if job is None:
                unlisted.append(ref)
            elif size is not None:
                if counts.get(ref) is not None:
                    out[ref] = array_info(job_id, size, counts[ref], job)
            elif _name(job.state) == "completed":
                finished.append((ref, job))
            else:
                active.append((ref, job))
        refresh = self._pick_refresh(active)
        # Not listed: no creation time to filter on, a clock far off, or a job
        # deleted since (the direct GET then finds nothing and it reads unknown).
        work: list[tuple[str, Any, bool]] = [(ref, None, False) for ref in unlisted]
        work += [(ref, job, True) for ref, job in finished]
        work += [(ref, job, False) for ref, job in refresh]
        for (ref, _job, _final), info in zip(work, self._parallel(self._describe_work, work)):
            if info is not None:
                out[ref] = info
        with self._lock:
            for ref, job in active:
                if ref in out:
                    continue
                seen = self._seen.get(_parse_ref(ref)[0])
                # Between its refreshes a job keeps what it last showed: Running
                # stays Running until the list says the job completed.
                out[ref] = seen.info if seen is not None and seen.info is not None else _queued_info(ref)
        return out

    def _describe_work(self, item: tuple[str, Any, bool]) -> JobInfo | None:
        ref, job, final = item
        if job is None:
            return self._describe_ref(ref)
        job_id, _ = _parse_ref(ref)
        try:
            task = self.client.get_task(job_id, SINGLE_TASK_ID, select=_TASK_SELECT)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        if not final and _ended(task):
            # Ended while the listed job was still active: a terminate is under
            # way, and the job fetched now may already carry its reason.
            job = self._get_job(job_id) or job
        info = task_info(task, job_id, job)
        self._remember(job_id, info, final=final or _settled(task, job))
        return info

    def _pick_refresh(self, active: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """The active single jobs whose task this poll GETs: at most `_REFRESH_PER_POLL`.

        Half go to the oldest jobs not seen running yet (Azure starts jobs
        roughly in submission order), the rest rotate over every other active
        job, least recently refreshed first, so that each is seen running
        eventually and running ones refresh their attempts and node.
        """
        if len(active) <= _REFRESH_PER_POLL:
            return list(active)
        with self._lock:
            seen = {ref: self._seen.get(_parse_ref(ref)[0]) for ref, _ in active}

        def running(ref: str) -> bool:
            entry = seen[ref]
            info = entry.info if entry is not None else None
            return info is not None and info.status is AzureJobStatus.RUNNING

        def created(item: tuple[str, Any]) -> _dt.datetime:
            return item[1].creation_time or _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)

        def refreshed(item: tuple[str, Any]) -> float:
            entry = seen[item[0]]
            return entry.refreshed_at if entry is not None else float("-inf")

        queued = sorted((item for item in active if not running(item[0])), key=created)
        picked = queued[: _REFRESH_PER_POLL // 2]
        chosen = {ref for ref, _ in picked}
        rest = sorted((item for item in active if item[0] not in chosen), key=refreshed)
        return picked + rest[: _REFRESH_PER_POLL - len(picked)]

    def _list_jobs(self, job_ids: Sequence[str]) -> dict[str, Any]:
        """The listed jobs among ``job_ids`` (by id), from one paged ``list_jobs``.

        The filter keeps the list to jobs created since the oldest of them
        (Azure's List Jobs filters ``creationTime`` with ge): a job's own
        creation time once it was listed, else a lower bound from the clock
        at submit or the UTC stamp in its cloudexec id, less `_CLOCK_SKEW`.
        Jobs with no bound at all are left out, for a direct GET.
        """
        with self._lock:
            bounds = [b for b in (self._creation_bound(job_id) for job_id in job_ids) if b is not None]
        if not bounds:
            return {}
        since = min(bounds).astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        wanted = set(job_ids)
        found: dict[str, Any] = {}
        for job in self.client.list_jobs(
            filter=f"creationTime ge DateTime'{since}'", select=_LIST_JOB_SELECT, max_results=_PAGE
        ):
            if job.id in wanted:
                found[job.id] = job
        with self._lock:
            for job_id, job in found.items():
                if job.creation_time is not None:
                    self._entry(job_id).created = job.creation_time
        return found

    def _creation_bound(self, job_id: str) -> _dt.datetime | None:
        """A time at or before the job's creation (Azure's clock); call under the lock."""
        seen = self._seen.get(job_id)
        if seen is not None and seen.created is not None:
            return seen.created
        match = _ID_STAMP_RE.search(job_id)
        if match is None:
            return None
        try:
            stamp = _dt.datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            return None
        return stamp - _CLOCK_SKEW

    def _entry(self, job_id: str) -> _Seen:
        """The record of ``job_id``, created when missing; call under the lock."""
        seen = self._seen.get(job_id)
        if seen is None:
            seen = self._seen[job_id] = _Seen()
            while len(self._seen) > _SEEN_MAX:
                # Forgetting a job only costs calls (it is asked about afresh).
                self._seen.pop(next(iter(self._seen)))
        return seen

    def _remember(self, job_id: str, info: JobInfo, *, final: bool) -> None:
        """Keep what a task GET said; a completed job's terminal answer never changes."""
        with self._lock:
            seen = self._entry(job_id)
            seen.info = info
            seen.refreshed_at = time.monotonic()
            if final and info.terminal:
                seen.final = info

    def _task_counts(self, ref: str) -> Any:
        try:
            return self.client.get_job_task_counts(_parse_ref(ref)[0])
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise

    def _describe_ref(self, ref: str) -> JobInfo | None:
        if ref.startswith(SHARED_REF):
            return self._describe_shared([ref]).get(ref)
        job_id, size = _parse_ref(ref)
        if size is None:
            return self._describe_task(job_id, SINGLE_TASK_ID, remember=True)
        # One call per poll: the task counts, or — on the poll after they stood
        # still — the job instead. The job tells whether it was terminated (and
        # why, e.g. a sequential array's failed child): while the counts move
        # the job is plainly running its tasks; a terminate stops them moving.
        with self._lock:
            last = self._array_counts.get(ref)
        if last is not None and last[2]:
            job = self._get_job(job_id)
            with self._lock:
                self._array_counts[ref] = (last[0], last[1], False)
            if job is None:
                return None
            return array_info(job_id, size, last[1], job)
        counts = self._task_counts(ref)
        if counts is None:
            return None
        tc = counts.task_counts
        now = (tc.active, tc.running, tc.completed, tc.failed)
        moving = last is not None and last[0] != now
        with self._lock:
            self._array_counts[ref] = (now, counts, tc.completed < size and not moving)
            while len(self._array_counts) > _SEEN_MAX:
                self._array_counts.pop(next(iter(self._array_counts)))
        # Every task completed and some failed: the job once more, now (killed
        # by a terminate, and why?) — the array's last poll.
        job = self._get_job(job_id) if tc.completed >= size and tc.failed else None
        return array_info(job_id, size, counts, job)

    def _describe_task(self, job_id: str, task_id: str, *, remember: bool = False) -> JobInfo | None:
        try:
            task = self.client.get_task(job_id, task_id, select=_TASK_SELECT)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        job = None
        if task_status(task.state, None) is AzureJobStatus.ACTIVE or _ended(task):
            # Only the job tells whether a queued task will never run, and why a
            # task was ended (its terminateReason).
            job = self._get_job(job_id)
        info = task_info(task, job_id, job)
        if remember:
            self._remember(job_id, info, final=_settled(task, job))
        return info

    def describe_hosted(self, host: str, task_id: str) -> JobInfo | None:
        """A job held as task ``task_id`` of Azure job ``host`` (see `cloudexec.providers.azure`).

        Azure never fails a task whose dependency failed: it stays ``active``
        for ever. Such a task is reported failed, naming the dependency, and
        terminated (so that its host job can complete).
        """
        try:
            task = self.client.get_task(host, task_id, select=[*_TASK_SELECT, "dependsOn"])
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        job = self._get_job(host) if task_status(task.state, None) is AzureJobStatus.ACTIVE or _ended(task) else None
        info = task_info(task, host, job)
        if info.status is AzureJobStatus.ACTIVE:
            for dep_id in (task.depends_on.task_ids or []) if task.depends_on is not None else []:
                try:
                    dep = self.client.get_task(host, dep_id, select=_TASK_SELECT)
                except Exception as exc:
                    if _is_not_found(exc):
                        continue
                    raise
                status = task_status(dep.state, dep.execution_info.result if dep.execution_info else None)
                if status is AzureJobStatus.FAILED:
                    try:
                        self.client.terminate_task(host, task_id)
                    except Exception as exc:  # noqa: BLE001 - reported failed either way; retried next poll
                        if not (_is_not_found(exc) or getattr(exc, "status_code", None) == 409):
                            raise
                    failure = _failure_text(dep.execution_info.failure_info if dep.execution_info else None)
                    info.status = AzureJobStatus.FAILED
                    info.status_reason = (
                        f"Dependency task {dep_id} of Azure job {host} failed"
                        + (f" ({failure})" if failure else "")
                        + "; Azure Batch blocks its dependents, so cloudexec terminated this task"
                    )
                    break
        return info

    def describe_children(self, ref: str, size: int) -> list[JobInfo | None]:
        job_id, _ = _parse_ref(ref)
        try:
            tasks = list(self.client.list_tasks(job_id, select=_TASK_SELECT, max_results=_PAGE))
        except Exception as exc:
            if _is_not_found(exc):
                return [None] * size
            raise
        # Tasks not completed may belong to a terminated job (they never run
        # then), and ended ones were ended for the job's terminate reason.
        if any(_name(t.state) != "completed" or _ended(t) for t in tasks):
            job = self._get_job(job_id)
        else:
            job = None
        infos: list[JobInfo | None] = [None] * size
        for task in tasks:
            if not str(task.id).isdigit():
                continue
            index = int(task.id) - AZURE_FIRST_CHILD_TASK_ID
            if 0 <= index < size:
                infos[index] = task_info(task, job_id, job)
        return infos

    def describe_child(self, ref: str, size: int, index: int) -> JobInfo | None:
        job_id, _ = _parse_ref(ref)
        return self._describe_task(job_id, task_id_for(index))

    def _note_submitted(self, job_id: str) -> None:
        """Remember a lower bound of a job's creation (the client's clock), for the next list."""
        with self._lock:
            self._entry(job_id).created = _dt.datetime.now(_dt.timezone.utc) - _CLOCK_SKEW

    def _close_describe(self) -> None:
        """Stop the threads the describe calls ran on."""
        with self._lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=True)
