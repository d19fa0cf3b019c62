"""The emulated compute node: schedules tasks into slots and runs them as processes.

One thread owns every child process. The HTTP handlers only change records in
the shared :class:`~cloudexec.testing._azure_batch_model.BatchStore` and call
:meth:`ComputeNode.wake`; the node thread then starts, reaps, times out and
kills processes. That keeps the thread count fixed however many tasks a test
submits (1,000 tasks cost one thread, not 1,000)::

    HTTP handler threads                      node thread
    --------------------                      -----------
    create task  --> job.queue.append ---+
    terminate    --> task.kill_reason ---+--> wake pipe --> step():
    delete job   --> job.state=deleting -+                   reap exited processes
                                                             signal tasks to kill
                                                             time out tasks / jobs
                                                             fill free slots
                                                             sleep until a pidfd, the
                                                             wake pipe or a deadline fires

Processes start through `cloudexec._forkserver`: a task whose command line
is ``python -m cloudexec.runner ...`` (or ``python -c ...``) is forked by one
server that already imported the runner and the Azure storage stack, so it
costs a fork rather than an interpreter start-up and ~0.5 s of imports; any
other command line starts as a fresh process. Either way each task is a
process of its own, leading its own process group.

An exit is seen at once: the fork server's socket turns readable when one of
its processes ended, and on Linux a fresh process is watched through a pidfd;
elsewhere the thread polls running processes every 10 ms.

Capacity: ``slots`` tasks run at once (one process each, plus the fork
server); the node thread's work per step is bounded by the running tasks and
the jobs with queued tasks, so 10,000 queued tasks cost memory for their
records, not threads or processes.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloudexec import _forkserver
from cloudexec.testing._azure_batch_model import BatchStore, JobRecord, TaskRecord, utc_now
from cloudexec.testing import _azure_batch_depends as _depends

__all__ = ["ComputeNode"]

# failureInfo bodies, as real Azure Batch reports them. Codes come from the
# Batch service's task failure codes (Microsoft.Azure.Batch
# TaskFailureInformationCodes); the messages are the service's own wording.
_FAILURE_EXIT_CODE: dict[str, Any] = {
    "category": "usererror",
    "code": "FailureExitCode",
    "message": "The task process exited with an unexpected exit code",
    "details": [
        {"name": "Message", "value": "The task process exited with an unexpected exit code"},
        {"name": "AdditionalErrorCode", "value": "FailureExitCode"},
    ],
}
# Azure reports both a user's terminate and a maxWallClockTime kill as
# TaskEnded; only the detail tells the wall-clock case apart.
_TASK_ENDED: dict[str, Any] = {
    "category": "usererror",
    "code": "TaskEnded",
    "message": "Task Was Ended by User Request",
}
_TASK_ENDED_WALL_CLOCK: dict[str, Any] = {
    **_TASK_ENDED,
    "details": [
        {"name": "Message", "value": "The maximum execution time configured on the task was exceeded"},
    ],
}
_COMMAND_NOT_FOUND: dict[str, Any] = {
    "category": "usererror",
    "code": "CommandProgramNotFound",
    "message": "The specified command program is not found.",
}
_COMMAND_LAUNCH_FAILED: dict[str, Any] = {
    "category": "usererror",
    "code": "CommandLaunchFailed",
    "message": "Failed to launch the specified command line.",
}

# What the runner needs in an Azure task, imported once by the fork server.
FORKSERVER_PRELOAD = (
    "cloudexec._storage",
    "cloudexec.providers._azure_conventions",
    "dill",
    "fsspec",
    "adlfs",
    # Imported by azure-core on a client's first request, so by every task.
    "azure.core.rest._aiohttp",
)

# Variables a task inherits from the emulator's own environment. Azure starts
# tasks with a clean environment; these few keep a local process usable.
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH", "SYSTEMROOT")
# Put on every task's path, standing in for a runner image that has cloudexec
# installed (``python -m cloudexec.runner``).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
# How often running processes are polled where pidfds are unavailable (macOS).
_POLL_INTERVAL_S = 0.01
# Why a task was killed -> the failureInfo it completes with.
_KILL_FAILURES: dict[str, dict[str, Any]] = {
    "user": _TASK_ENDED,
    "job": _TASK_ENDED,
    "wallclock": _TASK_ENDED_WALL_CLOCK,
}


class ComputeNode:
    """A single emulated node of the pool, with ``slots`` task slots.

    Args:
        store: The service state shared with the HTTP layer.
        pool_id: The pool this node belongs to; jobs on other pools never run.
        slots: ``taskSlotsPerNode`` of the pool.
        root_dir: ``AZ_BATCH_NODE_ROOT_DIR``; task directories live below it.
        account_name: ``AZ_BATCH_ACCOUNT_NAME`` given to tasks.
        account_url: ``AZ_BATCH_ACCOUNT_URL`` given to tasks.
        task_env: Extra variables every task sees (what the pool would provide).
        kill_grace_s: Time between SIGTERM and SIGKILL when a task is killed.
        status_lag_s: Seconds a task whose process exited stays ``running``
            (its outputs already uploaded) before it is reported ``completed``.
    """

    def __init__(
        self,
        store: BatchStore,
        *,
        pool_id: str,
        slots: int,
        root_dir: Path,
        account_name: str,
        account_url: str,
        task_env: Mapping[str, str],
        kill_grace_s: float,
        status_lag_s: float = 0.0,
    ) -> None:
        self.store = store
        self.status_lag_s = status_lag_s
        # Tasks whose process ended but which are reported completed only later,
        # as Azure does: (due, task, exit_code, failure_info).
        self._lagging: list[tuple[float, TaskRecord, int | None, dict[str, Any] | None]] = []
        self.pool_id = pool_id
        self.slots = slots
        self.root_dir = root_dir
        self.account_name = account_name
        self.account_url = account_url
        self.task_env = dict(task_env)
        self.kill_grace_s = kill_grace_s
        self.node_id = "tvm-emulator_1-" + utc_now().strftime("%Y%m%dt%H%M%Sz")
        self._used_slots = 0
        self._running: set[TaskRecord] = set()
        self._check_jobs: set[JobRecord] = set()
        # Tasks waiting for the tasks they depend on (or blocked by one that
        # failed), looked at again after any task completed.
        self._held: set[TaskRecord] = set()
        self._deps_due = False
        self._stopping = False
        self.failure: str | None = None
        """Traceback of the exception that stopped the node thread, if any."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._use_pidfd = hasattr(os, "pidfd_open")
        self.forks: _forkserver.ForkServer | None = None
        """Forks the runner's processes once the first task starts (None: switched off)."""
        self._forks_fd: int | None = None  # the fork server's socket, in the selector
        self._thread = threading.Thread(target=self._run, name="azure-batch-emulator-node", daemon=True)
        for sub in ("workitems", "shared", "startup", "fsmounts"):
            (root_dir / sub).mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        """Start the node thread."""
        self._thread.start()

    def stop(self) -> None:
        """Kill every task process, stop the thread and release its resources."""
        with self.store.lock:
            self._stopping = True
        self.wake()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
        else:
            self._kill_all()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wake(self) -> None:
        """Make the node thread run a scheduling step soon."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------- called by the service, locked
    def task_dir(self, job_id: str, task_id: str) -> Path:
        """Return ``AZ_BATCH_TASK_DIR`` for a task (Azure's on-node layout)."""
        return self.root_dir / "workitems" / job_id / "job-1" / task_id

    def submit(self, task: TaskRecord) -> None:
        """Queue a new task if it can ever run on this node.

        Tasks of jobs on another (non-existent) pool, and tasks needing more
        slots than the node has, stay ``active`` forever, as on Azure.
        """
        if task.job.pool_id != self.pool_id or task.required_slots > self.slots:
            return
        if task.spec.get("dependsOn"):
            # Looked at in the next scheduling pass, once every task of the same
            # request exists (a range may name tasks added after this one).
            self._held.add(task)
            self._deps_due = True
            self.wake()
            return
        task.queued = True
        task.job.queue.append(task)
        self.wake()

    def terminate_task(self, task: TaskRecord) -> None:
        """End a task at a user's request: kill it if running, else complete it."""
        if task.proc is not None:
            task.kill_reason = task.kill_reason or "user"
        else:
            task.queued = False
            self._complete(task, exit_code=None, failure_info=_TASK_ENDED)
        self.wake()

    def terminate_job(self, job: JobRecord, reason: str) -> None:
        """Start terminating a job; it completes once its running tasks are gone.

        Active tasks are left ``active`` and are never scheduled, which is what
        the Terminate Job REST reference describes.
        """
        now = utc_now()
        job.set_state("terminating", now)
        job.terminate_reason = reason
        job.last_modified = now
        job.etag = self.store.new_etag()
        for task in job.tasks.values():
            if task.proc is not None:
                task.kill_reason = task.kill_reason or "job"
        self.wake()

    def delete_job(self, job: JobRecord) -> None:
        """Start deleting a job; it disappears once its running tasks are gone."""
        now = utc_now()
        job.set_state("deleting", now)
        job.last_modified = now
        for task in job.tasks.values():
            task.queued = False
            if task.proc is not None:
                task.kill_reason = task.kill_reason or "job"
        self.wake()

    def delete_task(self, task: TaskRecord) -> None:
        """Remove a task from its job, killing its process if it runs."""
        task.queued = False
        if task.proc is not None:
            task.kill_reason = task.kill_reason or "user"
        task.job.tasks.pop(task.id.lower(), None)
        self._check_jobs.add(task.job)
        shutil.rmtree(self.task_dir(task.job.id, task.id), ignore_errors=True)
        self.wake()

    def recheck_job(self, job: JobRecord) -> None:
        """Ask the node to re-evaluate a job's end conditions (after an update)."""
        self._check_jobs.add(job)
        self.wake()

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        try:
            while True:
                with self.store.lock:
                    if self._stopping:
                        break
                    try:
                        timeout = self._step()
                    except Exception:
                        # A bug in the emulator: stop scheduling and let the
                        # service report it (HTTP 500) instead of tests hanging.
                        self.failure = traceback.format_exc()
                        break
                for key, _ in self._selector.select(timeout):
                    if key.fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            while os.read(self._wake_r, 4096):
                                pass
                    elif key.fd == self._forks_fd and self.forks is not None:
                        # Read the report now (the next step sees the ended task),
                        # or an unread one would wake this loop again and again.
                        self.forks.poll()
        finally:
            self._kill_all()

    def _step(self) -> float | None:
        """Reap, kill, time out and schedule; return how long the thread may sleep."""
        now = time.monotonic()
        for task in list(self._running):
            if task.proc is None:
                self._finish(task, 128 + signal.SIGKILL)
            elif task.proc.exited():
                self._finish(task, task.proc.reap())
        self._complete_due(now)
        self._signal_kills(now)
        self._update_jobs(now)
        self._release_held()
        self._schedule()
        return self._sleep_time(time.monotonic())

    def _signal_kills(self, now: float) -> None:
        for task in self._running:
            if task.kill_reason is None and task.deadline_mono is not None and now >= task.deadline_mono:
                task.kill_reason = "wallclock"
            if task.kill_reason is None:
                continue
            if task.kill_sent_mono is None:
                self._signal(task, signal.SIGTERM)
                task.kill_sent_mono = now
            elif not task.killed_hard and now - task.kill_sent_mono >= self.kill_grace_s:
                self._signal(task, signal.SIGKILL)
                task.killed_hard = True

    def _update_jobs(self, now: float) -> None:
        for job in list(self.store.jobs.values()):
            if job.state == "active" and job.deadline_mono is not None and now >= job.deadline_mono:
                self.terminate_job(job, "MaxWallClockTimeExpiry")
            if job.state == "active" and job in self._check_jobs and job.on_all_tasks_complete == "terminatejob":
                # An empty job counts as complete, as on Azure — which is why
                # Azure suggests setting onAllTasksComplete after adding tasks.
                if all(task.state == "completed" for task in job.tasks.values()):
                    self.terminate_job(job, "AllTasksComplete")
            if job.state == "terminating" and job.running == 0:
                when = utc_now()
                job.set_state("completed", when)
                job.end_time = when
                job.last_modified = when
                job.etag = self.store.new_etag()
            elif job.state == "deleting" and job.running == 0:
                self.store.jobs.pop(job.id.lower(), None)
                shutil.rmtree(self.root_dir / "workitems" / job.id, ignore_errors=True)
        self._check_jobs.clear()

    def _release_held(self) -> None:
        """Queue the held tasks whose dependencies are all met (after a task completed)."""
        if not self._deps_due:
            return
        self._deps_due = False
        for task in list(self._held):
            if task.state != "active" or task.id.lower() not in task.job.tasks:
                self._held.discard(task)
            elif not _depends.waiting(task):
                self._held.discard(task)
                task.queued = True
                task.job.queue.append(task)

    def _schedule(self) -> None:
        ready = sorted(
            (job for job in self.store.jobs.values() if job.state == "active" and job.queue),
            key=lambda job: (-job.priority, job.seq),
        )
        for job in ready:
            while job.queue:
                task = job.queue[0]
                if not task.queued or task.state != "active":
                    job.queue.popleft()
                    continue
                if 0 < job.max_parallel_tasks <= job.running:
                    break
                if task.required_slots > self.slots - self._used_slots:
                    # No backfill: the first task that does not fit holds back
                    # everything after it, so a task needing many slots is not
                    # starved by a stream of one-slot tasks.
                    return
                job.queue.popleft()
                task.queued = False
                self._spawn(task, retry=False)

    def _sleep_time(self, now: float) -> float | None:
        deadlines: list[float] = []
        for task in self._running:
            if task.kill_reason is None and task.deadline_mono is not None:
                deadlines.append(task.deadline_mono)
            elif task.kill_sent_mono is not None and not task.killed_hard:
                deadlines.append(task.kill_sent_mono + self.kill_grace_s)
        deadlines.extend(
            job.deadline_mono
            for job in self.store.jobs.values()
            if job.state == "active" and job.deadline_mono is not None
        )
        deadlines.extend(entry[0] for entry in self._lagging)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        if any(task.proc is not None and task.proc.exited() for task in self._running):
            return 0.0  # its end was read while starting another task: no wake-up will come
        if self._running and not self._use_pidfd:
            timeout = _POLL_INTERVAL_S if timeout is None else min(timeout, _POLL_INTERVAL_S)
        return timeout

    # ------------------------------------------------------------- processes
    def _spawn(self, task: TaskRecord, *, retry: bool) -> None:
        job = task.job
        task_dir = self.task_dir(job.id, task.id)
        work_dir = task_dir / "wd"
        work_dir.mkdir(parents=True, exist_ok=True)
        now = utc_now()
        task.ran_on_node = True
        task.start_time = now
        if retry:
            task.last_retry_time = now
        try:
            # Azure does not run the command line through a shell.
            argv = shlex.split(str(task.spec.get("commandLine", "")))
        except ValueError as exc:
            self._launch_failed(task, _COMMAND_LAUNCH_FAILED, str(exc))
            return
        if not argv:
            self._launch_failed(task, _COMMAND_NOT_FOUND, "empty command line")
            return
        if self.forks is None and _forkserver.enabled():
            # Started from the node thread, which lives as long as the emulator.
            self.forks = _forkserver.ForkServer(
                self._server_environment(), FORKSERVER_PRELOAD, name="Azure Batch emulator"
            )
        try:
            with open(task_dir / "stdout.txt", "wb") as out, open(task_dir / "stderr.txt", "wb") as err:
                # The node's "python" is the interpreter running the emulator, so
                # tasks see the same installed packages as the test.
                proc = _forkserver.start(
                    self.forks, argv, env=self._environment(task, task_dir), cwd=work_dir, stdout=out, stderr=err
                )
        except FileNotFoundError as exc:
            self._launch_failed(task, _COMMAND_NOT_FOUND, str(exc))
            return
        except OSError as exc:
            self._launch_failed(task, _COMMAND_LAUNCH_FAILED, str(exc))
            return
        task.proc = proc
        if isinstance(proc, _forkserver.ForkedProcess):
            fd = proc.server.fileno()
            if fd is not None and fd != self._forks_fd:
                # Readable whenever the server reports that one of its processes ended
                # (a new server, after one was killed, has a new socket).
                if self._forks_fd is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._selector.unregister(self._forks_fd)
                self._selector.register(fd, selectors.EVENT_READ)
                self._forks_fd = fd
        elif self._use_pidfd:
            try:
                task.pidfd = os.pidfd_open(proc.pid)
                self._selector.register(task.pidfd, selectors.EVENT_READ)
            except OSError:
                # Kernels before 5.3 lack pidfd_open; fall back to polling.
                self._use_pidfd = False
                task.pidfd = None
        task.set_state("running", now)
        task.last_modified = now
        task.etag = self.store.new_etag()
        wall_clock = task.max_wall_clock_s
        task.deadline_mono = time.monotonic() + wall_clock if wall_clock is not None else None
        task.kill_reason = None
        task.kill_sent_mono = None
        task.killed_hard = False
        job.running += 1
        self._used_slots += task.required_slots
        self._running.add(task)

    def _server_environment(self) -> dict[str, str]:
        """The fork server's environment: what every task shares (each task brings its own)."""
        env = {name: os.environ[name] for name in _PASSTHROUGH_ENV if name in os.environ}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.update(self.task_env)
        return env

    def _environment(self, task: TaskRecord, task_dir: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in _PASSTHROUGH_ENV if name in os.environ}
        # Put this cloudexec on the task's path, standing in for a runner image
        # that has cloudexec installed (``python -m cloudexec.runner``).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.update(self.task_env)
        for source in (task.job.spec.get("commonEnvironmentSettings"), task.spec.get("environmentSettings")):
            for item in source or []:
                env[str(item.get("name"))] = str(item.get("value") or "")
        env.update(
            {
                "AZ_BATCH_ACCOUNT_NAME": self.account_name,
                "AZ_BATCH_ACCOUNT_URL": self.account_url,
                "AZ_BATCH_POOL_ID": self.pool_id,
                "AZ_BATCH_NODE_ID": self.node_id,
                "AZ_BATCH_NODE_IS_DEDICATED": "true",
                "AZ_BATCH_NODE_ROOT_DIR": str(self.root_dir),
                "AZ_BATCH_NODE_SHARED_DIR": str(self.root_dir / "shared"),
                "AZ_BATCH_NODE_STARTUP_DIR": str(self.root_dir / "startup"),
                "AZ_BATCH_NODE_MOUNTS_DIR": str(self.root_dir / "fsmounts"),
                "AZ_BATCH_JOB_ID": task.job.id,
                "AZ_BATCH_TASK_ID": task.id,
                "AZ_BATCH_TASK_DIR": str(task_dir),
                "AZ_BATCH_TASK_WORKING_DIR": str(task_dir / "wd"),
                # Emulator extension: real Azure sets no such variable.
                "AZ_BATCH_TASK_RETRY_COUNT": str(task.retry_count),
            }
        )
        return env

    def _launch_failed(self, task: TaskRecord, failure: dict[str, Any], detail: str) -> None:
        info = {**failure, "details": [{"name": "Message", "value": detail}]}
        self._complete(task, exit_code=None, failure_info=info)

    def _finish(self, task: TaskRecord, exit_code: int) -> None:
        """Handle a task process that ended (reaped, its group killed): retry it or complete it.

        ``exit_code`` is 128 + N for death by signal N, as a shell reports it.
        """
        self._release(task)
        task.proc = None
        job = task.job
        if task.id.lower() not in job.tasks:
            return  # deleted while it ran
        if task.kill_reason is not None:
            self._complete(task, exit_code=exit_code, failure_info=_KILL_FAILURES.get(task.kill_reason, _TASK_ENDED))
        elif exit_code == 0:
            self._complete_later(task, exit_code=0, failure_info=None)
        elif job.state == "active" and (
            task.max_task_retry_count == -1 or task.retry_count < task.max_task_retry_count
        ):
            # Azure retries on the same node straight away; the task stays running.
            task.retry_count += 1
            self._spawn(task, retry=True)
        else:
            self._complete_later(task, exit_code=exit_code, failure_info=_FAILURE_EXIT_CODE)

    def _complete_later(self, task: TaskRecord, *, exit_code: int | None, failure_info: dict[str, Any] | None) -> None:
        """Complete a task after the status lag (at once without one)."""
        if self.status_lag_s <= 0:
            self._complete(task, exit_code=exit_code, failure_info=failure_info)
            return
        self._lagging.append((time.monotonic() + self.status_lag_s, task, exit_code, failure_info))

    def _complete_due(self, now: float) -> None:
        due = [entry for entry in self._lagging if entry[0] <= now]
        if not due:
            return
        self._lagging = [entry for entry in self._lagging if entry[0] > now]
        for _, task, exit_code, failure_info in due:
            if task.state == "running" and task.id.lower() in task.job.tasks:
                self._complete(task, exit_code=exit_code, failure_info=failure_info)

    def _release(self, task: TaskRecord) -> None:
        if task.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(task.pidfd)
            os.close(task.pidfd)
            task.pidfd = None
        if task in self._running:
            self._running.discard(task)
            self._used_slots -= task.required_slots
            task.job.running -= 1

    def _complete(self, task: TaskRecord, *, exit_code: int | None, failure_info: dict[str, Any] | None) -> None:
        now = utc_now()
        task.set_state("completed", now)
        task.end_time = now
        task.exit_code = exit_code
        task.failure_info = failure_info
        task.result = "success" if failure_info is None else "failure"
        task.last_modified = now
        task.etag = self.store.new_etag()
        task.deadline_mono = None
        if task.job.state == "active" and _depends.job_action(task) == "terminate":
            self.terminate_job(task.job, "TaskFailed")
        self._check_jobs.add(task.job)
        self._deps_due = True
        self.wake()  # so the job's end conditions are looked at in the next step

    def _signal(self, task: TaskRecord, signum: int) -> None:
        if task.proc is not None:
            task.proc.signal(signum)

    def _kill_all(self) -> None:
        """SIGKILL every task process group, wait for the processes, stop the fork server."""
        with self.store.lock:
            running = list(self._running)
            for task in running:
                self._signal(task, signal.SIGKILL)
            for task in running:
                if task.proc is not None:
                    with contextlib.suppress(OSError, ValueError):
                        task.proc.reap(timeout=10)
                self._release(task)
                task.proc = None
            if self.forks is not None:
                self.forks.close()
