"""`LocalBatchExecutor`: the batch lifecycle on this machine, no cloud needed.

Jobs run as separate OS processes through the same runner the cloud
containers use (``python -m cloudexec.runner``), with the cloud-like status
sequence Submitted → Runnable → Running → Succeeded/Failed, stdout and stderr
captured per job, vCPU-aware packing onto a fixed number of vCPUs, the memory
limit enforced (a job whose resident memory exceeds it is killed with
AWS's ``OutOfMemoryError: Container killed due to memory usage``), and
timeouts and retries honoured.

A single job is one ``python -m cloudexec.runner <job-url>`` process. An
array job gets one *fork server* (``runner --serve``) that loads the call once
and forks one process per child on request, so children still run in
separate processes (own memory limit, own kill, own exit code) without paying
an interpreter start-up each; that is what keeps a 1,000-item local ``map``
within a small factor of ``ProcessPoolExecutor``. POSIX only.

Dependencies (futures passed as arguments) are held by the scheduler as
AWS Batch holds them: a dependent stays ``Pending`` until every job (or
array child) it waits for succeeded, and fails without running, its reason
naming the upstream job and how it ended, when one of them fails or is
cancelled. The scheduler lives in the client process; on a persistent
``io_root`` a keeper process (`cloudexec.providers._local_keeper`) is told
of every held job and, if the client dies, adopts those still held: it waits
for their upstream jobs (which run on) and runs or fails them, so a pipeline
outlives its client as it does on AWS Batch.

When ``io_root`` is a local folder, each job's prefix also holds
``local.json`` (its last known state) and ``logs/``, so another process can
re-attach to it by id.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO, Any

from cloudexec import _keys, _payload
from cloudexec._base import BatchExecutor
from cloudexec._log import log
from cloudexec._process import PopenProcess, Process, Watcher, identity_alive, kill_group, process_identity, running, start, tree_rss_bytes
from cloudexec._provider import JobInfo, JobSpec, JobStatus, Phase, Provider
from cloudexec._storage import LocalStore, is_local_url, local_path, make_temp_root, open_store
from cloudexec.errors import SubmissionError
from cloudexec.providers._local_keeper import Keeper
from cloudexec.settings import COMMON_SETTINGS, JobSettings

__all__ = ["LocalBatchExecutor", "LocalJobStatus", "LocalProvider"]
#: The names `cloudexec` itself exports from this provider (see `cloudexec.providers`).
EXPORTS = ("LocalBatchExecutor", "LocalJobStatus")
#: Executor arguments that locate earlier jobs and have no usable default (see `cloudexec.providers.stored_job_arguments`):
#: the default io_root is a new temporary folder, which never holds an earlier job.
STORED_JOB_ARGUMENTS = ("io_root",)


OOM_REASON = "OutOfMemoryError: Container killed due to memory usage"
LOST_REASON = "the client process that scheduled this local job exited before it could finish; resubmit it"
_KILLED_EXIT = 128 + signal.SIGKILL  # what a container runtime reports for SIGKILL
# Local jobs are plain processes: no container to blame in a failure's reason.
_REASON_EXITED = "The job process exited with a non-zero exit code"
_SAMPLE_S = 0.02  # resident-memory sampling period while a memory limit applies


class LocalJobStatus(JobStatus):
    """Statuses of local jobs, named like AWS Batch's (in title case)."""

    SUBMITTED = ("Submitted", Phase.QUEUED)
    PENDING = ("Pending", Phase.QUEUED)
    RUNNABLE = ("Runnable", Phase.QUEUED)
    RUNNING = ("Running", Phase.RUNNING)
    SUCCEEDED = ("Succeeded", Phase.SUCCEEDED)
    FAILED = ("Failed", Phase.FAILED)


S = LocalJobStatus
_STATUSES = list(S)
_STATUS_CODE = {status: chr(48 + i) for i, status in enumerate(_STATUSES)}
# The history of a child that was queued at once, ran once and succeeded: what
# most children of a big array go through, so they are kept without a record.
_QUEUED = _STATUS_CODE[S.SUBMITTED] + _STATUS_CODE[S.RUNNABLE]
_FIRST_TIME_OK = _QUEUED + _STATUS_CODE[S.RUNNING] + _STATUS_CODE[S.SUCCEEDED]


class _Task:
    """A single job or one array child: what the scheduler starts and watches."""

    __slots__ = (
        "job",
        "index",
        "status",
        "attempts",
        "exit_code",
        "reason",
        "pid",
        "proc",
        "started",
        "kill_reason",
        "history",
        "waits",
    )
    pid: int | None

    def __init__(self, job: _LocalJob, index: int | None) -> None:
        self.job = job
        self.index = index
        self.status = S.SUBMITTED
        self.attempts = 0
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.pid: int | None = None
        self.proc: Process | None = None  # its own process (a single job), not a warm worker
        self.started: float | None = None
        self.kill_reason: str | None = None
        # One character per status it went through (an index into _STATUSES):
        # a 100,000-child array keeps a short string per child, not a list.
        self.history = _STATUS_CODE[S.SUBMITTED]
        # Tasks that must succeed before this one may run (its dependencies);
        # the shared empty tuple for the many that wait for none.
        self.waits: Sequence[_Task] = ()

    def set(self, status: LocalJobStatus) -> None:
        counts = self.job.counts
        counts[self.status] -= 1
        counts[status] += 1
        self.status = status
        self.history += _STATUS_CODE[status]

    def info(self) -> JobInfo:
        return JobInfo(
            status=self.status,
            exit_code=self.exit_code,
            status_reason=self.reason,
            provider_job_id=self.job.job_id if self.index is None else f"{self.job.job_id}:{self.index}",
            attempts=self.attempts,
            extra={"status_history": [_STATUSES[ord(c) - 48].value for c in self.history], "pid": self.pid},
        )

    def log_path(self, stream: str) -> str:
        name = "job" if self.index is None else str(self.index)
        return os.path.join(self.job.log_dir, f"{name}.{'out' if stream == 'stdout' else 'err'}")


class _LocalJob:
    def __init__(self, spec: JobSpec, state_dir: str, env: dict[str, str]) -> None:
        self.job_id = spec.job_id
        self.spec = spec
        self.vcpus = spec.settings.vcpus or 1
        self.memory_mib = spec.settings.memory_mib
        self.timeout_s = spec.settings.timeout_s
        self.max_attempts = (spec.settings.retries or 0) + 1
        self.dir = os.path.join(state_dir, spec.job_id)
        self.log_dir = os.path.join(self.dir, "logs")
        self.work_dir = os.path.join(self.dir, "work")
        os.makedirs(self.log_dir, exist_ok=True)
        os.makedirs(self.work_dir, exist_ok=True)
        self.env = env
        self.is_array = spec.array_size is not None
        self.size = spec.array_size or 1
        # A 100,000-child array keeps no record per child while the child is in
        # its common states: None = not started yet (status `fresh_status`),
        # an int = succeeded at its first attempt in the process with that pid
        # (the worker's pid object, shared). Any other child has a _Task
        # (`task` creates it on demand). A single job always has its _Task.
        self.tasks: list[_Task | int | None] = [None] * self.size if self.is_array else [_Task(self, None)]
        self.fresh_status = S.SUBMITTED
        self.fresh_left = self.size if self.is_array else 0  # children still None
        self.fresh_next = 0  # no None child before this index
        # Kept up to date by _Task.set, so the job's status costs O(1), not O(children).
        self.counts: dict[LocalJobStatus, int] = {s: 0 for s in S}
        self.counts[S.SUBMITTED] = self.size
        self.runnable: deque[_Task] = deque()  # runnable records, before the None children
        self.workers: list[_Worker] = []
        self.skip: set[int | None] = set()  # children withdrawn from a worker's pipe
        self.persisted: str | None = None
        # Every warm worker this array had, as process_identity: after the client
        # dies, a worker still runs the children already piped to it.
        self.worker_identities: list[list[float]] = []
        # The keeper process that adopts this job if its client dies while it
        # is held for its upstream jobs (`_local_keeper`), as process_identity.
        self.keeper: list[float] | None = None

    def _record(self, index: int | None) -> _Task:
        """Child ``index``'s record: its _Task, or a new one made from its compact form (not kept)."""
        held = self.tasks[index or 0]
        if isinstance(held, _Task):
            return held
        task = _Task(self, index)
        if held is None:
            task.status = self.fresh_status
            task.history = _QUEUED if self.fresh_status is S.RUNNABLE else _STATUS_CODE[S.SUBMITTED]
        else:
            task.status, task.attempts, task.exit_code, task.pid = S.SUCCEEDED, 1, 0, held
            task.history = _FIRST_TIME_OK
        return task

    def task(self, index: int | None) -> _Task:
        """Child ``index``'s record (the single job's for None), kept from now on: for a child that changes."""
        held = self.tasks[index or 0]
        if isinstance(held, _Task):
            return held
        task = self._record(index)
        self.tasks[index or 0] = task
        if held is None:
            self.fresh_left -= 1
        return task

    def all_tasks(self) -> list[_Task]:
        """Every child's kept record (for dependencies and cancelling the whole job)."""
        return [self.task(i if self.is_array else None) for i in range(self.size)]

    def infos(self) -> list[JobInfo]:
        """Every child's state, without keeping a record per child."""
        return [self._record(i).info() for i in range(self.size)]

    def child_info(self, index: int) -> JobInfo:
        """Child ``index``'s state."""
        return self._record(index).info()

    def has_runnable(self) -> bool:
        """Whether a child waits for a process to run it."""
        return bool(self.runnable) or (self.fresh_status is S.RUNNABLE and self.fresh_left > 0)

    def pop_runnable(self) -> _Task:
        """The next child to run (retried and released ones first, then in index order)."""
        if self.runnable:
            return self.runnable.popleft()
        while self.tasks[self.fresh_next] is not None:
            self.fresh_next += 1
        return self.task(self.fresh_next)

    def compact(self, task: _Task) -> None:
        """Drop the record of an array child that succeeded at its first attempt (its pid is all it keeps)."""
        if (
            self.is_array
            and task.history == _FIRST_TIME_OK
            and task.exit_code == 0
            and task.reason is None
            and task.pid is not None
        ):
            self.tasks[task.index or 0] = task.pid

    def status(self) -> LocalJobStatus:
        c = self.counts
        ended = c[S.SUCCEEDED] + c[S.FAILED]
        if ended == self.size:
            return S.FAILED if c[S.FAILED] else S.SUCCEEDED
        if c[S.RUNNING] or ended:
            return S.RUNNING
        if c[S.RUNNABLE]:
            return S.RUNNABLE
        return S.PENDING if c[S.PENDING] else S.SUBMITTED

    def info(self) -> JobInfo:
        if not self.is_array:
            return self.task(None).info()
        status = self.status()
        counts = {s.value: n for s, n in self.counts.items()}
        failed = counts[S.FAILED.value]
        reason = f"{failed} of {self.size} array children failed" if status is S.FAILED else None
        return JobInfo(status=status, status_reason=reason, provider_job_id=self.job_id, status_counts=counts)


def _process_env(extra: dict[str, str]) -> dict[str, str]:
    """A job process's environment: the client's, as it is now, plus the job's own variables."""
    return {**os.environ, **extra}


def _kept(state: dict[str, Any]) -> bool:
    """Whether a held job's keeper lives, so it is still to be adopted (its client may be gone)."""
    keeper = state.get("keeper")
    if state.get("status") != S.PENDING.value or not keeper:
        return False
    return identity_alive(keeper)


# Children queued to one warm worker beyond the one it runs: hides the round
# trip between a child's end and the next child's start.
_PIPELINE = 4


class _Worker:
    """A warm ``runner --serve`` process running one array job's children in turn."""

    def __init__(self, job: _LocalJob, proc: Process, stdin: IO[bytes], control_fd: int) -> None:
        self.job = job
        self.proc = proc
        self.pid = proc.pid
        self.stdin = stdin
        self.control_fd = control_fd  # the read end of the pipe it reports "start"/"exit" lines on
        self.buffer = b""  # an incomplete line read from it
        self.assigned: deque[_Task] = deque()  # sent to it and not ended; the first may run
        self.retired = False  # told to stop; its vCPUs were given back
        # It is gone once both its control pipe closed and it exited (in either order).
        self.eof = False
        self.exit_code: int | None = None

    def send(self, task: _Task) -> None:
        self.assigned.append(task)
        line = f"run {task.index} {task.log_path('stdout')} {task.log_path('stderr')}\n"
        self.stdin.write(line.encode())
        self.stdin.flush()

    def retire(self, scheduler: _Scheduler) -> None:
        """Stop taking children and give the vCPUs back (once)."""
        if self.retired:
            return
        self.retired = True
        scheduler.free_vcpus += self.job.vcpus
        try:
            self.stdin.close()  # EOF: the worker exits after its current child
        except OSError:
            pass


class _Scheduler:
    """A tiny batch service: a FIFO of jobs, a fixed pool of vCPUs, watched processes.

    One thread runs it: it waits on one selector (`cloudexec._process.Watcher`)
    for every job process's end and every warm worker's control pipe, so a
    thousand running jobs cost one thread. Requests from other threads change
    the state under ``cond`` and wake the selector.
    """

    def __init__(self, max_vcpus: int, listeners: list[Callable[[], None]]) -> None:
        self.max_vcpus = max_vcpus
        self.free_vcpus = max_vcpus
        self.cond = threading.Condition()
        self.jobs: dict[str, _LocalJob] = {}
        self.queue: deque[_LocalJob] = deque()  # jobs with runnable tasks, FIFO
        self.pending: set[_Task] = set()  # tasks waiting for their dependencies
        self.running: set[_Task] = set()
        self.watcher = Watcher()
        self.closed = False
        self.changed = False  # a job changed since listeners were last told
        self.listeners = listeners  # the provider's: told after each change (Provider.watch)
        self.thread = threading.Thread(target=self._loop, name="cloudexec-local-scheduler", daemon=True)
        self.thread.start()

    # -- requests ------------------------------------------------------------
    def add(self, job: _LocalJob) -> None:
        with self.cond:
            self._link(job)
            self.jobs[job.job_id] = job
            if job.is_array and not job.spec.depends_on:
                # Every child is queued at once: a count, not a record each.
                job.counts[S.SUBMITTED] -= job.size
                job.counts[S.RUNNABLE] += job.size
                job.fresh_status = S.RUNNABLE
            else:
                for task in job.all_tasks():
                    if task.waits:
                        task.set(S.PENDING)
                        self.pending.add(task)
                    else:
                        task.set(S.RUNNABLE)
                        job.runnable.append(task)
            if job.has_runnable():
                self.queue.append(job)
            self._release()
            self._after_change(job)
        self.watcher.wake()

    def _link(self, job: _LocalJob) -> None:
        """Fill each task's ``waits`` from the job's dependencies."""
        for dep in job.spec.depends_on:
            upstream = job if dep.kind == "sequential" else self.jobs.get(dep.ref or "")
            if upstream is None:
                # Scheduled by another process: it ended (the executor passes no
                # dependency on a job it saw succeed), or cannot be followed.
                raise SubmissionError(
                    f"job {job.job_id} cannot wait for job {dep.job_id}: this process did not schedule it. "
                    "Pass its result instead (future.result())."
                )
            tasks = job.all_tasks()
            for task, waits in zip(tasks, dep.waits(tasks, upstream.all_tasks())):
                if waits:
                    task.waits = [*task.waits, *waits]

    def _release(self) -> None:
        """Queue the pending tasks whose dependencies all succeeded; fail those of which one failed."""
        changed = True
        while changed and self.pending:
            changed = False
            for task in list(self.pending):
                failed = next((t for t in task.waits if t.status is S.FAILED), None)
                if failed is not None:
                    self.pending.discard(task)
                    name = failed.job.job_id if failed.index is None else f"{failed.job.job_id}[{failed.index}]"
                    task.reason = f"Dependency {name} failed: {failed.reason or 'no reason given'}"
                    task.set(S.FAILED)
                    self._after_change(task.job)
                    changed = True  # its own dependents fail in turn
                elif all(t.status is S.SUCCEEDED for t in task.waits):
                    self.pending.discard(task)
                    task.set(S.RUNNABLE)
                    task.job.runnable.append(task)
                    if task.job not in self.queue:
                        self.queue.append(task.job)
                    changed = True

    def cancel(self, job: _LocalJob, reason: str, index: int | None) -> None:
        with self.cond:
            tasks = job.all_tasks() if index is None else [job.task(index)]
            if job.is_array:
                # Workers that outlive the client must not start what was cancelled.
                _withdraw_from_orphans(job, index)
            for task in tasks:
                if task.status in (S.SUBMITTED, S.PENDING, S.RUNNABLE):
                    self.pending.discard(task)
                    self._unqueue(task)
                    task.reason = reason
                    task.set(S.FAILED)
                elif task.status is S.RUNNING:
                    task.kill_reason = reason
                    self._kill(task)
            self._after_change(job)
        self.watcher.wake()

    def _unqueue(self, task: _Task) -> None:
        try:
            task.job.runnable.remove(task)
        except ValueError:
            pass
        for worker in task.job.workers:
            if task in worker.assigned and task is not worker.assigned[0]:
                # Queued in a worker's pipe: it would still run, so replace the
                # worker's future by retiring it once its current child ends.
                worker.assigned.remove(task)
                task.job.skip.add(task.index)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            procs = [t.proc for t in self.running if t.proc is not None]
            procs += [w.proc for job in self.jobs.values() for w in job.workers]
            for proc in procs:
                proc.kill()
        self.watcher.wake()
        self.thread.join(timeout=5)
        for proc in procs:
            try:
                proc.reap(timeout=1)  # killed: no zombie is left behind
            except Exception:  # noqa: BLE001 - an unkillable process must not stop the close
                log.debug("cloudexec: could not reap local job process %s", proc.pid, exc_info=True)
        if not self.thread.is_alive():
            self.watcher.close()

    # -- the loop --------------------------------------------------------------
    def _loop(self) -> None:
        events: list[tuple[str, Any, Any]] = []
        while True:
            with self.cond:
                if self.closed:
                    return
                self._handle_events(events)
                self._release()
                self._start_tasks()
                timeout = self._watch()
                changed, self.changed = self.changed, False
                listeners = list(self.listeners)
            if changed:
                for listener in listeners:  # outside the lock: they take locks of their own
                    listener()
            events = self.watcher.wait(timeout)

    def _handle_events(self, events: list[tuple[str, Any, Any]]) -> None:
        for kind, target, detail in events:
            if kind == "exit" and isinstance(target, _Task):
                self.watcher.remove_process(detail)
                self._task_exited(target, detail.reap())
            elif kind == "exit":
                self.watcher.remove_process(detail)
                target.exit_code = detail.reap()
                self._worker_maybe_gone(target)
            elif detail:  # a worker's control lines
                self._worker_lines(target, detail)
            else:  # its control pipe closed
                os.close(target.control_fd)
                target.eof = True
                self._worker_maybe_gone(target)

    def _worker_lines(self, worker: _Worker, chunk: bytes) -> None:
        *lines, worker.buffer = (worker.buffer + chunk).split(b"\n")
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == b"start":
                self._worker_started(worker, int(parts[1]))
            elif parts[0] == b"exit":
                index, code = int(parts[1]), int(parts[2])
                if worker.assigned and worker.assigned[0].index == index:
                    worker.assigned.popleft()
                if index in worker.job.skip:
                    worker.job.skip.discard(index)
                else:
                    self._task_exited(worker.job.task(index), code)
                self._maybe_retire(worker)

    def _worker_maybe_gone(self, worker: _Worker) -> None:
        # Its last "exit" lines may still be in the pipe when it exits: the
        # worker is gone once both the pipe closed and the process ended.
        if worker.eof and worker.exit_code is not None:
            self._worker_gone(worker)

    def _start_tasks(self) -> None:
        for job in list(self.queue):
            while job.has_runnable():
                if job.is_array:
                    # An idle worker first, then a new one while vCPUs are free
                    # (children run in parallel, as a pool's do), and only then
                    # the pipe of the least busy one.
                    live = [w for w in job.workers if not w.retired]
                    worker = next((w for w in live if not w.assigned), None)
                    if worker is None and job.vcpus <= self.free_vcpus:
                        worker = self._spawn_worker(job)
                    if worker is None and live:
                        worker = min(live, key=lambda w: len(w.assigned))
                        worker = worker if len(worker.assigned) < _PIPELINE else None
                    if worker is None or not job.has_runnable():
                        break
                    worker.send(job.pop_runnable())
                    continue
                if job.vcpus > self.free_vcpus:
                    break
                task = job.pop_runnable()
                self.free_vcpus -= job.vcpus
                try:
                    self._launch_single(task)
                except Exception as exc:  # noqa: BLE001 - report it as the job's failure
                    self.free_vcpus += job.vcpus
                    task.reason = f"Could not start the job process: {type(exc).__name__}: {exc}"
                    task.set(S.FAILED)
                    self._after_change(job)
            if not job.has_runnable():
                self.queue.remove(job)
            if self.free_vcpus <= 0:
                break

    def _begin(self, task: _Task, pid: int) -> None:
        task.attempts += 1
        task.kill_reason = task.kill_reason if task.status is S.RUNNING else None
        task.exit_code = None
        task.reason = None
        task.pid = pid
        task.started = time.monotonic()
        task.set(S.RUNNING)
        self.running.add(task)
        self._after_change(task.job)

    def _launch_single(self, task: _Task) -> None:
        job = task.job
        with open(task.log_path("stdout"), "wb") as out, open(task.log_path("stderr"), "wb") as err:
            # Its own session: a kill reaches everything the job started.
            proc = start(
                [sys.executable, "-m", "cloudexec.runner", job.spec.job_url],
                stdout=out,
                stderr=err,
                cwd=job.work_dir,
                env=_process_env(job.env),
            )
        task.proc = proc
        self._begin(task, proc.pid)
        self.watcher.add_process(proc, task)

    def _spawn_worker(self, job: _LocalJob) -> _Worker | None:
        read_fd, write_fd = os.pipe()
        try:
            with open(os.path.join(job.log_dir, "worker.log"), "ab") as worker_log:
                proc = start(
                    [
                        sys.executable, "-m", "cloudexec.runner", job.spec.job_url,
                        "--serve", "--control-fd", str(write_fd),
                        # After a client's death its workers finish the array (see runner._Orphans).
                        "--claims", os.path.join(job.dir, "claims"),
                        "--size", str(job.size),
                        "--log-dir", job.log_dir,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=worker_log,
                    stderr=worker_log,
                    cwd=job.work_dir,
                    env=_process_env(job.env),
                    pass_fds=(write_fd,),
                )
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            while job.has_runnable():
                task = job.pop_runnable()
                task.reason = f"Could not start the job process: {exc}"
                task.set(S.FAILED)
            self._after_change(job)
            return None
        os.close(write_fd)
        assert isinstance(proc, PopenProcess) and proc.popen.stdin is not None
        os.set_blocking(read_fd, False)
        worker = _Worker(job, proc, proc.popen.stdin, read_fd)
        job.workers.append(worker)
        job.worker_identities.append(process_identity(proc.pid))
        _persist(job)
        self.free_vcpus -= job.vcpus
        self.watcher.add_reader(read_fd, worker)
        self.watcher.add_process(proc, worker)
        return worker

    def _worker_started(self, worker: _Worker, index: int) -> None:
        if index in worker.job.skip:
            return
        task = worker.job.task(index)
        self._begin(task, worker.pid)
        if task.kill_reason is not None:  # cancelled before it started
            self._kill(task)

    def _worker_gone(self, worker: _Worker) -> None:
        """A worker ended: by EOF when retired, or killed (timeout, memory, cancel)."""
        worker.retire(self)
        job = worker.job
        if worker in job.workers:
            job.workers.remove(worker)
        requeue: list[_Task] = []
        for task in worker.assigned:
            if task.status is S.RUNNING and task in self.running:
                # The child that was running ended the worker (os._exit, a signal).
                self._task_exited(task, worker.exit_code if worker.exit_code is not None else _KILLED_EXIT)
            elif task.index in job.skip:
                job.skip.discard(task.index)
            else:
                requeue.append(task)
        worker.assigned.clear()
        if requeue:
            job.runnable.extendleft(reversed(requeue))
            if job not in self.queue:
                self.queue.append(job)

    def _maybe_retire(self, worker: _Worker) -> None:
        job = worker.job
        if not worker.assigned and not job.has_runnable():
            worker.retire(self)

    def _kill(self, task: _Task) -> None:
        if task.proc is not None:
            task.proc.kill()  # a no-op once it was reaped, so never a reused pid
        elif task.pid:
            kill_group(task.pid)  # a warm worker's child: the worker goes with it

    def _task_exited(self, task: _Task, code: int) -> None:
        if task not in self.running:
            return
        self.running.discard(task)
        job = task.job
        if not job.is_array:
            self.free_vcpus += job.vcpus
        task.exit_code = code
        if task.kill_reason is not None:
            task.reason = task.kill_reason
            task.exit_code = _KILLED_EXIT
        elif code != 0:
            task.reason = _REASON_EXITED
        if code == 0 and task.kill_reason is None:
            task.set(S.SUCCEEDED)
            job.compact(task)
        elif task.attempts < job.max_attempts and not (task.kill_reason or "").startswith("Terminated"):
            task.set(S.RUNNABLE)
            job.runnable.append(task)
            if job not in self.queue:
                self.queue.append(job)
        else:
            task.set(S.FAILED)
        self._after_change(job)

    def _after_change(self, job: _LocalJob) -> None:
        self.changed = True
        status = job.status()
        if status.terminal:
            for worker in job.workers:
                worker.retire(self)
        if job.persisted != status.value:
            job.persisted = status.value
            _persist(job)

    def _watch(self) -> float | None:
        """Enforce timeouts and memory limits; return how long to sleep."""
        now = time.monotonic()
        wake: float | None = None
        for task in list(self.running):
            job = task.job
            if task.kill_reason is not None or task.pid is None:
                continue
            if job.timeout_s is not None and task.started is not None:
                left = task.started + job.timeout_s - now
                if left <= 0:
                    task.kill_reason = f"Job attempt duration exceeded timeout ({job.timeout_s:g} s)"
                    self._kill(task)
                    continue
                wake = left if wake is None else min(wake, left)
            if job.memory_mib is not None:
                if tree_rss_bytes(task.pid) > job.memory_mib * 1024 * 1024:
                    task.kill_reason = OOM_REASON
                    self._kill(task)
                    continue
                wake = _SAMPLE_S if wake is None else min(wake, _SAMPLE_S)
        return wake


def _end_jobs_and_remove(provider: weakref.ref[LocalProvider], folder: str) -> None:
    """At exit: end the job processes of an executor on a temporary folder, then remove the folder."""
    alive = provider()
    if alive is not None:
        try:
            alive.close()
        except Exception:  # noqa: BLE001 - the folder must go all the same
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _withdraw_from_orphans(job: _LocalJob, index: int | None) -> None:
    """Mark child ``index`` (every child if None) as not to be run by orphaned workers (runner._Orphans)."""
    claims = os.path.join(job.dir, "claims")
    try:
        os.makedirs(claims, exist_ok=True)
        name = "closed" if index is None else f"ordered-{index}"
        os.close(os.open(os.path.join(claims, name), os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError:
        pass


def fail_unstarted(spec: JobSpec, state_dir: str, env: dict[str, str], reason: str) -> None:
    """Record a job that will never run (an upstream job failed) as failed with ``reason``."""
    job = _LocalJob(spec, state_dir, env)
    for task in job.all_tasks():
        task.reason = reason
        task.set(S.FAILED)
    _persist(job)


def _persist(job: _LocalJob) -> None:
    """Record the job's state next to it, for re-attach from another process."""
    status = job.status()
    state: dict[str, Any] = {"status": status.value, "owner": os.getpid(), "array": job.is_array}
    if job.keeper is not None and status is S.PENDING:
        state["keeper"] = job.keeper
    if not job.is_array:
        task = job.task(None)
        state.update(exit_code=task.exit_code, reason=task.reason, attempts=task.attempts, pid=task.pid)
    elif status.terminal:
        # The children that succeeded at their first attempt are the rule, not listed.
        state["size"] = job.size
        state["exceptions"] = {
            str(i): [t.status.value, t.exit_code, t.reason, t.attempts]
            for i, t in enumerate(job.tasks)
            if isinstance(t, _Task)
        }
    else:
        state.update(size=job.size, workers=job.worker_identities)
    try:
        LocalStore(job.dir).write("local.json", json.dumps(state).encode())
    except OSError:
        pass


class LocalProvider(Provider):
    """Runs jobs as local processes. See the module docstring."""

    name = "local"
    status_enum = LocalJobStatus
    settings = COMMON_SETTINGS
    poll_interval_s = (0.01, 0.25)
    dependency_kinds = frozenset({"job", "n_to_n", "sequential"})

    def __init__(
        self, *, state_dir: str, max_vcpus: int, env: dict[str, str] | None = None, keep_held: bool = False
    ) -> None:
        """
        Args:
            keep_held: jobs held for their upstream jobs outlive this process:
                a keeper process adopts them if it dies (see
                `cloudexec.providers._local_keeper`); for a ``state_dir``
                that outlives this process.
        """
        self.state_dir = state_dir
        self.max_vcpus = max_vcpus
        # Only the variables cloudexec adds: a job process inherits the client's
        # environment when it starts (`_process_env`), so no copy of it is kept.
        self.env = dict(env or {})
        self._keeper = Keeper(state_dir, max_vcpus, self.env) if keep_held else None
        self._scheduler: _Scheduler | None = None
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # Children of other processes' arrays known to have ended, by job: their
        # result objects are read once, not at every poll.
        self._foreign_ended: dict[str, dict[int, JobInfo]] = {}

    @property
    def scheduler(self) -> _Scheduler:
        with self._lock:
            if self._scheduler is None:
                self._scheduler = _Scheduler(self.max_vcpus, self._listeners)
            return self._scheduler

    def watch(self, on_change: Callable[[], None]) -> None:
        # Kept by the provider: the scheduler (and its thread) starts with the first job, not here.
        self._listeners.append(on_change)

    def validate_settings(self, settings: JobSettings) -> None:
        if settings.vcpus is not None and settings.vcpus > self.max_vcpus:
            raise ValueError(
                f"vcpus={settings.vcpus} is more than this LocalBatchExecutor has ({self.max_vcpus}); "
                f"ask for at most {self.max_vcpus} or create it with max_vcpus={settings.vcpus}"
            )
        if settings.gpus:
            raise ValueError(
                f"gpus={settings.gpus}: LocalBatchExecutor cannot give jobs GPUs; "
                "leave gpus unset locally and ask for them on AWSBatchExecutor"
            )

    def submit(self, spec: JobSpec) -> str:
        if sys.platform == "win32":
            raise SubmissionError("LocalBatchExecutor needs a POSIX system (fork, process groups)")
        env = dict(self.env)
        env["CLOUDEXEC_JOB_ID"] = spec.job_id
        env.update(spec.environment)
        job = _LocalJob(spec, self.state_dir, env)
        kept = self._keeper is not None and any(dep.kind != "sequential" for dep in spec.depends_on)
        if kept:
            assert self._keeper is not None
            # In local.json before the job is: a process attaching after this
            # one died knows that the keeper will adopt it.
            job.keeper = self._keeper.identity()
        self.scheduler.add(job)
        if kept:
            assert self._keeper is not None
            self._keeper.hold(spec)
        return spec.job_id

    def _job(self, ref: str) -> _LocalJob | None:
        scheduler = self._scheduler
        return scheduler.jobs.get(ref) if scheduler is not None else None

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        out: dict[str, JobInfo] = {}
        scheduler = self._scheduler
        for ref in refs:
            job = self._job(ref)
            if job is not None and scheduler is not None:
                with scheduler.cond:
                    out[ref] = job.info()
            else:
                info = self._describe_foreign(ref)
                if info is not None:
                    out[ref] = info
        return out

    def describe_children(self, ref: str, size: int) -> list[JobInfo | None]:
        job = self._job(ref)
        if job is not None and self._scheduler is not None:
            with self._scheduler.cond:
                children: list[JobInfo | None] = list(job.infos())
                return children
        state = self._read_state(ref)
        exceptions = (state or {}).get("exceptions")
        if exceptions is not None and state is not None and S.parse(state["status"]).terminal:
            rule = [S.SUCCEEDED.value, 0, None, 1]
            rows = (exceptions.get(str(i), rule) for i in range(int(state["size"])))
            return [
                JobInfo(status=S.parse(c[0]), exit_code=c[1], status_reason=c[2], provider_job_id=f"{ref}:{i}", attempts=c[3])
                for i, c in enumerate(rows)
            ]
        if state is not None and not running(state.get("owner")):
            return list(self._orphaned_children(ref, state, size))
        return [self._foreign_from_result(ref, i) for i in range(size)]

    def describe_child(self, ref: str, size: int, index: int) -> JobInfo | None:
        job = self._job(ref)
        if job is not None and self._scheduler is not None:
            with self._scheduler.cond:
                return job.child_info(index) if index < job.size else None
        return super().describe_child(ref, size, index)

    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        job = self._job(ref)
        if job is not None:
            self.scheduler.cancel(job, reason, index)

    def read_log(self, ref: str, *, index: int | None = None, stream: str = "stdout") -> str | None:
        name = "job" if index is None else str(index)
        path = os.path.join(self.state_dir, ref, "logs", f"{name}.{'out' if stream == 'stdout' else 'err'}")
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    # -- jobs scheduled by another (perhaps dead) process -------------------
    def _read_state(self, ref: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.state_dir, ref, "local.json"), encoding="utf-8") as fh:
                state: dict[str, Any] = json.load(fh)
                return state
        except (OSError, ValueError):
            return None

    def _result_ok(self, ref: str, key: str) -> bool | None:
        try:
            with open(os.path.join(self.state_dir, ref, *key.split("/")), "rb") as fh:
                # Only a status hint (the header's "ok" flag, read unverified):
                # the client verifies the result itself before unpickling it.
                header, _ = _payload.read_header(_keys.unverified_payload(fh.read(65536 * 16)))
            return bool(header.get("ok"))
        except (OSError, ValueError, Exception):  # noqa: BLE001
            return None

    def _foreign_from_result(self, ref: str, index: int | None) -> JobInfo | None:
        ok = self._result_ok(ref, _payload.result_key(index))
        if ok is None:
            return None
        child_id = ref if index is None else f"{ref}:{index}"
        if ok:
            return JobInfo(status=S.SUCCEEDED, exit_code=0, provider_job_id=child_id)
        return JobInfo(status=S.FAILED, exit_code=1, status_reason=_REASON_EXITED, provider_job_id=child_id)

    def _describe_foreign(self, ref: str) -> JobInfo | None:
        state = self._read_state(ref)
        if state is None:
            return None
        status = S.parse(state["status"])
        if not state.get("array"):
            info = JobInfo(
                status=status,
                exit_code=state.get("exit_code"),
                status_reason=state.get("reason"),
                provider_job_id=ref,
                attempts=state.get("attempts"),
            )
            if status.terminal or running(state.get("owner")) or _kept(state):
                return info
            found = self._foreign_from_result(ref, None)
            if found is not None:
                return found
            if running(state.get("pid")):
                return JobInfo(status=S.RUNNING, provider_job_id=ref, attempts=state.get("attempts"))
            return JobInfo(status=S.FAILED, status_reason=LOST_REASON, provider_job_id=ref)
        if status.terminal or running(state.get("owner")) or _kept(state):
            return JobInfo(status=status, provider_job_id=ref)
        children = self._orphaned_children(ref, state, int(state.get("size") or 0))
        counts = {s.value: 0 for s in S}
        for child in children:
            counts[str(child.status)] += 1
        failed = counts[S.FAILED.value]
        if counts[S.RUNNING.value]:
            return JobInfo(status=S.RUNNING, provider_job_id=ref, status_counts=counts)
        if failed:
            lost = sum(1 for c in children if c.status_reason == LOST_REASON)
            reason = f"{failed} of {len(children)} array children failed"
            if lost:
                reason += f" ({lost} never ran: {LOST_REASON})"
            return JobInfo(status=S.FAILED, status_reason=reason, provider_job_id=ref, status_counts=counts)
        return JobInfo(status=S.SUCCEEDED, provider_job_id=ref, status_counts=counts)

    def _orphaned_children(self, ref: str, state: dict[str, Any], size: int) -> list[JobInfo]:
        """The children of an array whose scheduling process died, from what it left behind.

        A child with a result ended as the result says. The others still run
        while any of the array's warm workers lives (a worker finishes the
        children already piped to it, then sees EOF); once none does, they
        never will, and are reported lost.
        """
        ended = self._foreign_ended.setdefault(ref, {})
        workers_alive = any(identity_alive(w) for w in state.get("workers") or [])
        out: list[JobInfo] = []
        for i in range(size):
            info = ended.get(i) or self._foreign_from_result(ref, i)
            if info is not None:
                ended[i] = info
            elif workers_alive:
                info = JobInfo(status=S.RUNNING, provider_job_id=f"{ref}:{i}")
            else:
                info = JobInfo(status=S.FAILED, status_reason=LOST_REASON, provider_job_id=f"{ref}:{i}")
            out.append(info)
        return out

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
        if self._scheduler is not None:
            self._scheduler.close()


class LocalBatchExecutor(BatchExecutor):
    """Run jobs as local processes with the batch lifecycle (no cloud account needed).

    Example:
        >>> with LocalBatchExecutor(max_workers=4) as ex:      # doctest: +SKIP
        ...     print(list(ex.map(abs, [-1, -2])))
        [1, 2]

    When the client process dies: the local "compute environment" is this
    process, so it decides what a client's death means. Jobs it had started
    run on (each in its own session) and write their results under
    ``io_root``; an array's warm workers go on to run every child nobody had
    started yet (not those a cancel withdrew); single jobs waiting for a vCPU
    never run, and attaching reports them as ended without a result. Jobs held
    for their upstream jobs (futures passed as arguments) are adopted by a
    keeper process, which runs them once their upstream jobs succeeded (or
    fails them, naming the one that failed), so a pipeline outlives its
    client. A new process with the same ``io_root`` attaches by job id and
    sees the array running, then gets every result. Give a persistent ``io_root`` (the
    default temporary folder goes with the process; an orderly exit ends the
    job processes first, so none writes into a folder that is gone).

    Args:
        io_root: storage folder for calls and results: a local path or
            ``file://`` URL (default: a new temporary folder, removed when the
            interpreter exits), or any fsspec URL that local processes can reach
            (not ``memory://``).
        max_workers: jobs in flight at once (an array counts once); default the
            number of CPUs, like ``ProcessPoolExecutor``.
        max_vcpus: vCPUs the local "compute environment" packs jobs onto
            (default: ``max_workers`` if given, else the number of CPUs).
        storage_options: fsspec options for a non-local ``io_root``.
        poll_interval_s: (first, longest) pause between status polls.
        **settings: default job settings: ``vcpus``, ``memory``, ``timeout``,
            ``retries``, ``job_name`` (``gpus`` cannot be honoured locally).

    Raises:
        ValueError: bad ``max_workers``, ``memory://`` storage, or a bad setting.
        StorageError: ``io_root`` cannot be written.
    """

    def __init__(
        self,
        io_root: str | None = None,
        max_workers: int | None = None,
        *,
        max_vcpus: int | None = None,
        storage_options: dict[str, Any] | None = None,
        poll_interval_s: tuple[float, float] | None = None,
        **settings: Any,
    ) -> None:
        if isinstance(max_workers, int) and not isinstance(max_workers, bool) and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        cpus = os.cpu_count() or 1
        if max_vcpus is None:
            max_vcpus = max_workers if isinstance(max_workers, int) and not isinstance(max_workers, bool) else cpus
        if isinstance(max_vcpus, bool) or not isinstance(max_vcpus, int) or max_vcpus <= 0:
            raise ValueError(f"max_vcpus must be a positive int; got {max_vcpus!r}")
        temporary = io_root is None
        if io_root is None:
            io_root = make_temp_root(remove_at_exit=False)
        if not isinstance(io_root, str):
            io_root = os.fspath(io_root)
        if io_root.startswith("memory://"):
            raise ValueError(
                f"io_root={io_root!r}: memory:// lives inside this process, so the job processes cannot "
                "read it; use a folder (the default is a temporary one) or a bucket URL"
            )
        if is_local_url(io_root) and not storage_options:
            state_dir = os.path.abspath(local_path(io_root))
        else:
            open_store(io_root, storage_options)  # fail early on a bad URL
            state_dir = local_path(make_temp_root())
        env = {}
        if storage_options:
            env["CLOUDEXEC_STORAGE_OPTIONS"] = json.dumps(storage_options)
        # A held job outlives this process only where it can be attached to again.
        keep_held = not temporary and is_local_url(io_root) and not storage_options
        provider = LocalProvider(state_dir=state_dir, max_vcpus=max_vcpus, env=env, keep_held=keep_held)
        if temporary:
            # Nothing can attach to a job in a folder removed at exit, so its
            # processes end first: none goes on writing into a deleted folder.
            atexit.register(_end_jobs_and_remove, weakref.ref(provider), local_path(io_root))
        super().__init__(
            provider,
            io_root,
            storage_options=storage_options,
            max_workers=max_workers if max_workers is not None else cpus,
            poll_interval_s=poll_interval_s,
            **settings,
        )
