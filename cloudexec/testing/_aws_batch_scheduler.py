"""The AWS Batch emulator's scheduler: job states, dependencies, timers, vCPU packing.

One :class:`JobScheduler` owns every job and one thread drives it; API request
threads call its entry points (``submit``, ``describe``, ``list_jobs``,
``cancel``, ``terminate``, ``expire``) under the same lock::

    SubmitJob -> SUBMITTED --dwell--> PENDING --deps met, dwell--> RUNNABLE
        RUNNABLE --fits free vCPUs (FIFO, bounded backfill)--> STARTING --dwell-->
        RUNNING (Node starts the process) --exit / timeout / OOM / terminate-->
        SUCCEEDED | FAILED | back to RUNNABLE for a retry

An array parent only counts its children (``statusSummary``); its status follows
theirs. Per scheduling pass the work is bounded by the timers that fire and a
backfill window, never by the number of jobs, so a 10,000-child array costs no
quadratic work and no thread per job.

Lock order: the scheduler's lock may be held while taking the moto lock (to write
logs before a status becomes visible), never the other way round.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import threading
import time
import uuid
from typing import Any

from cloudexec.testing._aws_batch_model import (
    MAX_OVERRIDES_CHARS,
    NOT_STARTED,
    REASON_DEPENDENCY_FAILED,
    REASON_EXITED,
    REASON_OOM,
    REASON_OVERRIDES_TOO_LONG,
    REASON_TIMEOUT,
    STATUSES,
    TERMINAL,
    REASON_CHILD_FAILED,
    Job,
    JobSpec,
    client_error,
    filter_matches,
    job_id_from,
    now_ms,
    should_retry,
)
from cloudexec.testing._aws_batch_node import WATCH_INTERVAL_S, Attempt, Node

__all__ = ["JobScheduler"]

#: Most ``dependsOn`` entries one SubmitJob takes.
MAX_DEPENDENCIES = 20

_log = logging.getLogger(__name__)

# How far past the head of the RUNNABLE queue the scheduler looks for a job that fits
# the free vCPUs; bounded so a 10,000-job queue costs little per scheduling pass.
_BACKFILL_WINDOW = 64


class JobScheduler:
    """All job state, guarded by one condition, driven by one scheduler thread.

    Lock order: ``_cond`` may be held while taking the moto lock (to write logs
    before a status becomes visible), never the other way round.
    """

    def __init__(
        self,
        *,
        region: str,
        account_id: str,
        dwell_s: float,
        max_vcpus: int,
        scratch_dir: str,
        moto_lock: threading.RLock,
        status_lag_s: float = 0.0,
        visibility_lag_s: float = 0.0,
    ) -> None:
        self._region = region
        self._status_lag = status_lag_s
        self._visibility_lag_ms = visibility_lag_s * 1000.0
        self._account_id = account_id
        self._dwell = dwell_s
        self._max_vcpus = float(max_vcpus)
        self._free_vcpus = float(max_vcpus)
        self._node = Node(region=region, account_id=account_id, scratch_dir=scratch_dir, moto_lock=moto_lock)
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._top: list[Job] = []
        self._timers: list[tuple[float, int, Job, int]] = []
        self._runnable: collections.deque[tuple[Job, int, float]] = collections.deque()
        self._seq = itertools.count()
        self._tiebreak = itertools.count()
        self._closing = False
        # Set when vCPUs are freed or a job joins the RUNNABLE queue: dispatching is
        # due even if no timer or process would wake the scheduler.
        self._dispatch_due = False
        self._thread: threading.Thread | None = None
        self._warned_too_big = False

    # -- lifecycle

    def start(
        self, *, endpoint_url: str, base_env: dict[str, str], logs_backend: Any, timeout_scale: float
    ) -> None:
        """Give the node what jobs need and start the scheduler thread."""
        base_env.update(
            {
                "AWS_ENDPOINT_URL": endpoint_url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": self._region,
                "AWS_REGION": self._region,
            }
        )
        self._node.base_env = base_env
        self._node.logs = logs_backend
        self._node.timeout_scale = timeout_scale
        self._thread = threading.Thread(target=self._loop, name="cloudexec-aws-batch-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the scheduler thread and kill every running attempt."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._cond:
            self._node.close()

    @property
    def fork_server(self) -> Any:
        """The node's `cloudexec._forkserver.ForkServer`, once a job started (None if switched off)."""
        return self._node.forks

    # -- API entry points (called from request threads)

    def submit(self, spec: JobSpec, array_size: int | None, depends_on: list[dict[str, Any]]) -> Job:
        now = time.monotonic()
        created_ms = now_ms()
        with self._cond:
            deps = self._resolve_dependencies(depends_on, array_size)
            job_id = str(uuid.uuid4())
            job = Job(
                seq=next(self._seq),
                job_id=job_id,
                arn=self._job_arn(job_id),
                spec=spec,
                created_ms=created_ms,
                status="SUBMITTED",
            )
            job.depends_on = [dict(d) for d in depends_on]
            self._jobs[job_id] = job
            self._top.append(job)
            if array_size:
                # Children are spawned in PENDING (API reference: a child's createdAt
                # is "when the child job was spawned by its parent and entered the
                # PENDING state"); no thread or process exists until one is STARTING.
                job.summary = dict.fromkeys(STATUSES, 0)
                job.summary["PENDING"] = array_size
                job.children = []
                due = now + self._dwell
                for index in range(array_size):
                    child_id = f"{job_id}:{index}"
                    child = Job(
                        seq=next(self._seq),
                        job_id=child_id,
                        arn=self._job_arn(child_id),
                        spec=spec,
                        created_ms=created_ms,
                        status="PENDING",
                        parent=job,
                        index=index,
                    )
                    job.children.append(child)
                    self._jobs[child_id] = child
                    self._push_timer(due, child)
                for index, child in enumerate(job.children):
                    for dep, kind in deps:
                        if dep is None:  # SEQUENTIAL: each child waits for the previous one
                            if index:
                                self._link(child, job.children[index - 1])
                        elif kind == "N_TO_N" and dep.children is not None:
                            self._link(child, dep.children[index])
                        else:
                            self._link(child, dep)
            else:
                for dep, _ in deps:
                    if dep is not None:
                        self._link(job, dep)
                self._push_timer(now + self._dwell, job)
            self._cond.notify_all()
            return job

    def _hidden(self, job: Job, now_wall_ms: float) -> bool:
        """Whether a just-submitted job is not yet visible (AWS is eventually consistent)."""
        return bool(self._visibility_lag_ms) and now_wall_ms - job.created_ms < self._visibility_lag_ms

    def describe(self, job_ids: list[str]) -> list[dict[str, Any]]:
        now_wall = now_ms()
        with self._cond:
            seen: set[str] = set()
            out = []
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None or job_id in seen or self._hidden(job, now_wall):
                    continue
                seen.add(job_id)
                out.append(job.describe())
            return out

    def list_jobs(
        self,
        *,
        queue_arn: str | None,
        array_job_id: str | None,
        status: str | None,
        filters: list[dict[str, Any]],
        page: int,
        after_seq: int,
    ) -> tuple[list[dict[str, Any]], int | None]:
        with self._cond:
            if array_job_id is not None:
                parent = self._jobs.get(array_job_id)
                candidates = (parent.children or []) if parent is not None else []
            else:
                # ListJobs on a queue lists plain jobs and array parents, not children.
                candidates = [j for j in self._top if j.spec.queue_arn == queue_arn]
            matched: list[Job] = []
            now_wall = now_ms()
            for job in candidates:
                if job.seq <= after_seq or job.expired or self._hidden(job, now_wall):
                    continue
                if status is not None and job.status != status:
                    continue
                if filters and not all(filter_matches(job, f) for f in filters):
                    continue
                matched.append(job)
                if len(matched) > page:
                    break
            more = len(matched) > page
            matched = matched[:page]
            return [j.summarize() for j in matched], (matched[-1].seq if more else None)

    def _stop_targets(self, job_id: str, reason: str, flag: str) -> list[Job]:
        """The jobs a CancelJob/TerminateJob on ``job_id`` acts on (an array: its children).

        Marks an unfinished array parent with ``flag`` (``is_cancelled`` or
        ``is_terminated``) and the reason; the caller holds ``self._cond``.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return []
        if job.children is None:
            return [job]
        if job.status not in TERMINAL:
            setattr(job, flag, True)
            job.stop_reason = reason
        return list(job.children)

    def cancel(self, job_id: str, reason: str) -> None:
        with self._cond:
            # "AWS Batch attempts to cancel all child jobs. The array parent job is
            # canceled when all child jobs are completed."
            for target in self._stop_targets(job_id, reason, "is_cancelled"):
                # STARTING/RUNNING jobs are not cancelled; the call still succeeds.
                if target.status in NOT_STARTED:
                    target.is_cancelled = True
                    self._finish(target, "FAILED", reason)
            self._cond.notify_all()

    def terminate(self, job_id: str, reason: str) -> None:
        with self._cond:
            for target in self._stop_targets(job_id, reason, "is_terminated"):
                self._terminate_one(target, reason)
            self._cond.notify_all()

    def expire(self, job_id: str) -> bool:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            for victim in [job, *(job.children or [])]:
                self._node.discard(victim)
                self._release(victim)
                victim.expired = True
                victim.token += 1
                self._jobs.pop(victim.job_id, None)
            if job.parent is None:
                with contextlib.suppress(ValueError):
                    self._top.remove(job)
            self._cond.notify_all()
            return True

    # -- formatting (caller holds the lock)

    def _job_arn(self, job_id: str) -> str:
        return f"arn:aws:batch:{self._region}:{self._account_id}:job/{job_id}"

    # -- dependencies (caller holds the lock)

    def _resolve_dependencies(
        self, depends_on: list[dict[str, Any]], array_size: int | None
    ) -> list[tuple[Job | None, str]]:
        """Checks ``dependsOn``; a SEQUENTIAL entry (no jobId) pairs with None."""
        resolved: list[tuple[Job | None, str]] = []
        if len(depends_on) > MAX_DEPENDENCIES:
            # "Job A can express a dependency on up to 20 other jobs" (AWS Batch user guide).
            raise client_error(
                f"Too many dependencies: a job can depend on at most {MAX_DEPENDENCIES} jobs, got {len(depends_on)}"
            )
        for dependency in depends_on:
            kind = str(dependency.get("type") or "").upper()
            if kind not in ("", "N_TO_N", "SEQUENTIAL"):
                raise client_error(f"Invalid dependency type {dependency.get('type')!r}: expected N_TO_N or SEQUENTIAL")
            dep_id = dependency.get("jobId")
            if kind == "SEQUENTIAL" and not dep_id:
                if not array_size:
                    raise client_error("A SEQUENTIAL dependency without jobId needs an array job")
                resolved.append((None, "SEQUENTIAL"))
                continue
            if not isinstance(dep_id, str) or not dep_id:
                raise client_error(f"dependsOn entries need a jobId, got {dependency!r}")
            dep = self._jobs.get(job_id_from(dep_id))
            if dep is None:
                raise client_error(f"Dependent job {dep_id} does not exist")
            if kind == "N_TO_N":
                if not array_size or dep.children is None or len(dep.children) != array_size:
                    raise client_error("An N_TO_N dependency needs two array jobs of the same size")
            resolved.append((dep, kind))
        return resolved

    def _link(self, waiter: Job, dep: Job) -> None:
        if dep.status == "SUCCEEDED":
            return
        if dep.status == "FAILED":
            waiter.dependency_failed = True
            return
        waiter.waiting += 1
        dep.dependents.append(waiter)

    def _release_dependents(self, job: Job, now: float) -> None:
        dependents, job.dependents = job.dependents, []
        for waiter in dependents:
            if waiter.expired or waiter.status in TERMINAL:
                continue
            if job.status == "FAILED":
                self._finish(waiter, "FAILED", REASON_DEPENDENCY_FAILED)
            else:
                waiter.waiting -= 1
                if waiter.status == "PENDING":
                    self._maybe_runnable(waiter, now)

    # -- state machine (caller holds the lock)

    def _set_status(self, job: Job, status: str) -> None:
        old = job.status
        if old == status:
            return
        job.status = status
        job.token += 1
        parent = job.parent
        if parent is not None and parent.summary is not None:
            parent.summary[old] -= 1
            parent.summary[status] += 1
            # "An array parent job is updated to PENDING when any child job is updated
            # to RUNNABLE"; a parent is only ever SUBMITTED, PENDING, FAILED, SUCCEEDED.
            if status == "RUNNABLE" and parent.status == "SUBMITTED":
                parent.status = "PENDING"
                parent.token += 1

    def _push_timer(self, due: float, job: Job) -> None:
        heapq.heappush(self._timers, (due, next(self._tiebreak), job, job.token))

    def _maybe_runnable(self, job: Job, now: float) -> None:
        if job.dependency_failed:
            self._finish(job, "FAILED", REASON_DEPENDENCY_FAILED)
            return
        if job.waiting > 0 or not job.dwell_done:
            return
        self._enqueue_runnable(job, now)

    def _enqueue_runnable(self, job: Job, now: float) -> None:
        self._set_status(job, "RUNNABLE")
        self._runnable.append((job, job.token, now + self._dwell))
        self._dispatch_due = True

    def _finish(self, job: Job, status: str, reason: str | None) -> None:
        if job.status in TERMINAL or job.expired:
            return
        self._release(job)
        job.status_reason = reason
        job.stopped_ms = now_ms()
        job.outcome = None
        self._set_status(job, status)
        now = time.monotonic()
        self._release_dependents(job, now)
        parent = job.parent
        if parent is not None and parent.children is not None:
            parent.done += 1
            if status == "FAILED":
                parent.failed += 1
            if parent.done == len(parent.children):
                if parent.failed:
                    self._finish(parent, "FAILED", parent.stop_reason or REASON_CHILD_FAILED)
                else:
                    self._finish(parent, "SUCCEEDED", None)

    def _release(self, job: Job) -> None:
        if job.holds_vcpus:
            job.holds_vcpus = False
            self._free_vcpus = min(self._max_vcpus, self._free_vcpus + job.spec.vcpus)
            self._dispatch_due = True

    def _terminate_one(self, job: Job, reason: str) -> None:
        if job.status in TERMINAL:
            return
        job.is_terminated = True
        if job.status in NOT_STARTED or job.status == "STARTING":
            self._finish(job, "FAILED", reason)
            return
        if self._node.stop(job, "terminate", reason):
            return
        if job.outcome is not None and job.outcome[0] == "RETRY":
            # The attempt already ended and was due for a retry: terminated jobs are
            # not retried.
            job.outcome = ("FAILED", reason)

    def _loop(self) -> None:
        with self._cond:
            while not self._closing:
                try:
                    now = time.monotonic()
                    self._fire_timers(now)
                    wake = self._dispatch(now)
                    self._fire_timers(now)
                    for job, attempt, code in self._node.poll(time.monotonic()):
                        self._end_attempt(job, attempt, code, time.monotonic())
                    timeout = self._next_wait(time.monotonic(), wake)
                except Exception:  # keep scheduling other jobs; the bug is logged
                    _log.exception("AWS Batch emulator scheduler error")
                    timeout = WATCH_INTERVAL_S
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)

    def _next_wait(self, now: float, runnable_wake: float | None) -> float | None:
        if self._dispatch_due:
            return 0.0
        candidates = []
        if self._timers:
            candidates.append(self._timers[0][0] - now)
        if runnable_wake is not None:
            candidates.append(runnable_wake - now)
        if self._node.running:
            candidates.append(WATCH_INTERVAL_S)
        if not candidates:
            return None
        return max(0.0, min(candidates))

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, job, token = heapq.heappop(self._timers)
            if token != job.token or job.expired:
                continue
            if job.status == "SUBMITTED":
                self._set_status(job, "PENDING")
                self._push_timer(now + self._dwell, job)
            elif job.status == "PENDING":
                job.dwell_done = True
                self._maybe_runnable(job, now)
            elif job.status == "STARTING":
                self._start_attempt(job, now)
            elif job.status == "RUNNING" and job.outcome is not None:
                self._apply_outcome(job, now)

    def _dispatch(self, now: float) -> float | None:
        """Moves RUNNABLE jobs that fit the free vCPUs to STARTING; FIFO with backfill.

        Returns:
            When the head of the queue finishes its RUNNABLE dwell, if that is what
            blocks dispatching.
        """
        self._dispatch_due = False
        queue = self._runnable
        while queue and (queue[0][0].token != queue[0][1] or queue[0][0].expired):
            queue.popleft()
        if not queue or self._free_vcpus <= 1e-9:
            return None
        chosen: list[Job] = []
        rejected: list[Job] = []
        wake: float | None = None
        looked = 0
        for job, token, ready_at in queue:
            if job.token != token or job.expired:
                continue
            if ready_at > now:
                wake = ready_at
                break
            looked += 1
            if job.spec.overrides_chars > MAX_OVERRIDES_CHARS:
                rejected.append(job)
            elif job.spec.vcpus <= self._free_vcpus + 1e-9:
                self._free_vcpus -= job.spec.vcpus
                job.holds_vcpus = True
                chosen.append(job)
                if self._free_vcpus <= 1e-9:
                    break
            elif job.spec.vcpus > self._max_vcpus and not self._warned_too_big:
                self._warned_too_big = True
                _log.warning(
                    "job %s needs %s vCPUs but the emulated compute environment has %s; "
                    "like on AWS it stays RUNNABLE (raise max_vcpus)",
                    job.job_id, job.spec.vcpus, self._max_vcpus,
                )
            if looked >= _BACKFILL_WINDOW:
                break
        # Transitions happen after the scan: they may append to the queue.
        for job in rejected:
            self._finish(job, "FAILED", REASON_OVERRIDES_TOO_LONG)
        for job in chosen:
            self._set_status(job, "STARTING")
            self._push_timer(now + self._dwell, job)
        return wake

    # -- attempts (caller holds the lock)

    def _start_attempt(self, job: Job, now: float) -> None:
        job.attempts_started += 1
        job.started_ms = now_ms()
        job.running_since = now
        self._set_status(job, "RUNNING")
        failure = self._node.launch(job, now)
        if failure is not None:
            self._conclude(job, failed=True, reason=failure, retryable=True, exit_code=None, now=now)

    def _end_attempt(self, job: Job, attempt: Attempt, exit_code: int, now: float) -> None:
        # The node already forwarded the last log lines, so a client that sees the
        # job finished also sees its whole log.
        container_reason: str | None = None
        retryable = True
        if attempt.stop_kind == "oom":
            exit_code = 137
            container_reason = reason = REASON_OOM
        elif attempt.stop_kind == "timeout":
            # job_timeouts.html: a job that times out is not retried.
            reason, retryable = REASON_TIMEOUT, False
        elif attempt.stop_kind == "terminate":
            exit_code = 137
            reason, retryable = attempt.stop_reason or "Terminated", False
        else:
            reason = REASON_EXITED
        container: dict[str, Any] = {
            "containerInstanceArn": attempt.instance_arn,
            "taskArn": attempt.task_arn,
            "exitCode": exit_code,
            "logStreamName": attempt.stream,
            "networkInterfaces": [],
        }
        if container_reason is not None:
            container["reason"] = container_reason
        job.attempts.append(
            {
                "container": container,
                "startedAt": attempt.started_ms,
                "stoppedAt": now_ms(),
                "statusReason": reason,
            }
        )
        job.exit_code = exit_code
        job.container_reason = container_reason
        failed = exit_code != 0 or attempt.stop_kind is not None
        self._conclude(job, failed=failed, reason=reason, retryable=retryable, exit_code=exit_code, now=now)

    def _conclude(
        self, job: Job, *, failed: bool, reason: str, retryable: bool, exit_code: int | None, now: float
    ) -> None:
        if not failed:
            outcome: tuple[str, str | None] = ("SUCCEEDED", reason)
        elif retryable and job.attempts_started < job.spec.max_attempts and should_retry(
            job.spec.evaluate_on_exit, reason, job.container_reason, exit_code
        ):
            outcome = ("RETRY", reason)
        else:
            outcome = ("FAILED", reason)
        job.outcome = outcome
        # The RUNNING status lasts at least the dwell time too, so pollers see it;
        # and, like AWS, the terminal status may lag the container's exit (and the
        # result it stored) by the profile's status lag.
        due = max(job.running_since + self._dwell, now + self._status_lag)
        if due > now:
            self._push_timer(due, job)
        else:
            self._apply_outcome(job, now)

    def _apply_outcome(self, job: Job, now: float) -> None:
        if job.outcome is None:
            return
        status, reason = job.outcome
        job.outcome = None
        if status == "RETRY":
            # A failed attempt with retries left goes back to RUNNABLE.
            self._release(job)
            self._enqueue_runnable(job, now)
        else:
            self._finish(job, status, reason)

