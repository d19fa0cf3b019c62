"""`AzureBatchExecutor`: Azure Batch jobs and tasks, Blob storage through adlfs.

How calls become Azure objects (azure-batch 15.x, ``azure.batch.BatchClient``)::

    submit(fn, *args)      one Azure job, id = the cloudexec job id, with one
                           task "10000000"
    submit_map / map       one Azure job with one task per child: "10000001",
                           "10000002", … (child i is task 10000001 + i; the
                           command line tells the runner to read its index
                           from AZ_BATCH_TASK_ID minus 10000001), added
                           in collections of at most 100 (Azure's limit per
                           addtaskcollection request), sent in index order a
                           few at once (`cloudexec.providers._azure_tasks`)
    then                   the job's onAllTasksComplete is set to terminatejob,
                           so it completes by itself and leaves the account's
                           active-job quota; Azure advises setting it only after
                           the tasks are added, as an empty job counts as complete

If adding the tasks (or that last update) fails, the job is terminated and
deleted, and its conventions container removed: nothing is left half-submitted.

Settings (validated when given, nothing submitted on a bad value):

=====================  ==================================================================
``container_image``    the task's ``containerSettings.imageName`` (default
                       `DEFAULT_CONTAINER_IMAGE`, what ``container/Dockerfile`` builds);
                       on a pool without a container configuration tasks run
                       directly on the node and asking for an image is an error
``vcpus``              the task's ``requiredSlots``. This assumes the pool's
                       ``taskSlotsPerNode`` equals its VM size's vCPUs (as Wolfram's
                       AzureBatch does); more than the pool's slots per node is refused
``priority``           -1..+1, the job's priority scaled to Azure's -1000..1000
``timeout``            the task's ``constraints.maxWallClockTime``
``retries``            the task's ``constraints.maxTaskRetryCount``
``tags``               the job's ``metadata`` (besides cloudexec's own entry)
``job_name``           the job's ``displayName``
``memory``, ``gpus``   refused: the pool's VM size decides them
=====================  ==================================================================

Statuses (`AzureJobStatus`): a single job or array child is its task's state,
``Active`` (active/preparing), ``Running``, then ``Succeeded`` or ``Failed``
(the task's ``executionInfo.result``). An array is ``Active`` until every
task completed, then ``Completed``; Azure's own job state is ``completed``
either way, but cloudexec reports an array with a failed (or never run) task
as ``Failed``, so that ``job_status.phase`` says how the array ended.

How a poll asks Azure about many jobs with few REST calls, and how Azure's
answers become statuses and reasons: `cloudexec.providers._azure_describe`.

``cancel()`` terminates the job with a reason naming cloudexec: Azure's
terminate-task request carries no reason, so for a single job the job is
terminated first (its reason is what ``job_status_reason`` shows) and the task
is then terminated too, in case it had not started. An array child is
cancelled by terminating its task alone.

Logs: ``job_log``/``job_stderr_log`` read the node's ``stdout.txt``/``stderr.txt``
while the task runs and the Batch File Conventions blobs
(``job-<jobId>/<taskId>/$TaskLog/``, written by the runner's output
capture, see `cloudexec.providers._azure_conventions`) after it ended,
falling back to the node's files for a task that was killed before it could
upload them. Files a job writes to
``./JobOutput/`` are listed by ``future.output_files()`` and fetched by
``future.download_output(name, dest)``.

Futures passed as arguments: Azure Batch task dependencies exist only between
tasks of one job created with ``usesTaskDependencies`` (every job is, since it
cannot be switched on later). A single job whose upstream jobs are single jobs
of one Azure job (or are held in one, as here) is added as a task of that job,
with the cloudexec job id as task id, its own environment, and ``dependsOn``
their task ids; its reference is ``task:<azure job id>/<task id>``. Azure
leaves a task whose dependency failed ``active`` for ever: describe reports it
failed, naming the dependency, and terminates it. Any other dependent (an
array, one waiting for an array or for several Azure jobs, or one whose host
job completed meanwhile) is kept in the client until its upstream jobs ended.
``sequential=True``: child task i depends on task i - 1 of the same job, and
the job is created with ``onTaskFailure: performExitOptionsJobAction``, so
the first child that fails terminates the job (``TaskFailed``) and the later
children never run — Azure itself holds the order, as AWS ``SEQUENTIAL`` does.

The active-job quota: an Azure Batch account runs at most its quota of jobs
that are not completed (``activeJobAndJobScheduleQuota``, 100-300 by default).
When creating a job answers 409 ``ActiveJobAndScheduleQuotaReached``, no
``submit`` fails: the job waits in the executor (its future's
``job_status_reason`` reads ``waiting for Azure Batch active-job quota (N
active)``) and is submitted as soon as one of the executor's jobs completed
(or after a pause, as other clients' jobs may end too).

Which to pick for many calls:

* ``map``/``submit_map``: one Azure job for the whole map, its tasks added 100
  per request; the best choice when the calls are known together.
* ``shared_job=True``: every single ``submit`` becomes a task (id = the
  cloudexec job id) of ONE Azure job the executor creates at its first
  ``submit`` and lets complete at shutdown (or when the interpreter exits
  without it). 10,000 submits are 10,000 tasks
  of one job: one quota slot, and a poll lists only the tasks that changed.
  Single submissions then share that job's priority and tags (the ``priority``
  and ``tags`` settings are refused for them), and ``cancel()`` terminates
  the task alone.
* the default (one Azure job per ``submit``): each job has its own priority,
  tags and terminate reason, but takes a quota slot while it runs.

Provider references (kept in each job's manifest): the Azure job id for a
single job, ``array:<jobId>/<size>`` for an array, ``shared:<sharedJobId>/<taskId>``
for a single job run in the shared job, ``task:<hostJobId>/<taskId>`` for one
held as a task of its upstream's job.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from cloudexec._log import log
import threading

from cloudexec._base import ArrayFuture, BatchExecutor, BatchFuture, new_job_id
from cloudexec._provider import CannotHold, CapacityReached, JobInfo, JobSpec, Provider
from cloudexec._version import __version__
from cloudexec.errors import CloudExecError, StorageError, SubmissionError
from cloudexec.providers import _azure_conventions as _conventions
from cloudexec.providers import _azure_tasks as _tasks
from cloudexec.providers._azure_describe import (  # task_status, task_info, array_info: public here too
    AZURE_FIRST_CHILD_TASK_ID,
    HOSTED_PREFIX,
    SHARED_REF as _SHARED_PREFIX,
    SINGLE_TASK_ID,
    AzureJobStatus,
    BulkDescribe,
    _is_not_found,
    _name,
    _parse_ref,
    _task_of,
    array_info,
    hosted,
    shared_ref,
    task_id_for,
    task_info,
    task_status,
)
from cloudexec.providers._azure_tasks import error_code as _error_code
from cloudexec.settings import COMMON_SETTINGS, JobSettings

__all__ = [
    "AzureBatchExecutor",
    "AzureBatchFuture",
    "AzureArrayFuture",
    "AzureJobStatus",
    "AzureBatchProvider",
    "DEFAULT_CONTAINER_IMAGE",
    "SINGLE_TASK_ID",
]
#: The names `cloudexec` itself exports from this provider (see `cloudexec.providers`).
EXPORTS = ("AzureBatchExecutor", "AzureBatchFuture", "AzureJobStatus")



#: The runner image ``container/Dockerfile`` builds (``docker build … -t cloudexec:<major.minor>``).
DEFAULT_CONTAINER_IMAGE = "cloudexec:" + ".".join(__version__.split(".")[:2])
#: Azure's limit of tasks per addtaskcollection request.
MAX_TASKS_PER_REQUEST = 100
#: Azure's error code for a job created beyond the account's active-job quota.
QUOTA_REACHED = "ActiveJobAndScheduleQuotaReached"
# Longest pause before a job held back by the quota is submitted again when
# none of the executor's own jobs ended meanwhile (other clients' may have).
_QUOTA_RETRY_S = 10.0
# Job states that count against the quota (the service counts every job not completed).
_QUOTA_FILTER = "state ne 'completed' and state ne 'deleting'"
#: Job metadata entry holding the job's storage URL (for re-attach by Azure job id).
URL_METADATA = "cloudexec_job_url"
# Azure job ids: 1-64 letters, digits, hyphens and underscores.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STORAGE_RE = re.compile(r"^(az|abfs)://([^/]+)(/.*)?$")
_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")
_STORAGE_AUTH_KEYS = ("connection_string", "account_key", "sas_token", "credential", "anon", "client_secret")



def azure_priority(priority: float) -> int:
    """Scale cloudexec's priority (-1..+1) to an Azure job priority (-1000..1000)."""
    return max(-1000, min(1000, round(priority * 1000)))


def _error_message(exc: BaseException) -> str:
    """The first line of an Azure error's message, without its final full stop."""
    error = getattr(exc, "error", None)
    message = getattr(error, "message", None) or getattr(exc, "message", None) or str(exc)
    lines = str(message).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__


class _AsyncTokenCredential:
    """Lets adlfs's asyncio Blob clients use a synchronous azure-identity credential.

    azure-core's async pipeline awaits ``get_token``; a sync credential returns
    the token directly. Tokens are cached by the credential, so the rare
    blocking refresh inside the event loop is acceptable.
    """

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._credential.get_token(*scopes, **kwargs)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> _AsyncTokenCredential:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class AzureBatchProvider(BulkDescribe, Provider):
    """Talks to one Azure Batch account (pool) and its Blob storage.

    Args:
        client: an ``azure.batch.BatchClient``.
        batch_url: the endpoint ``client`` talks to (for messages).
        pool_id: the pool every job runs on.
        storage_url: ``az://container/prefix`` of the jobs' storage (its account
            also holds the conventions containers ``job-<jobId>``).
        storage_options: adlfs options for that account.
        task_environment: variables every task gets (``commonEnvironmentSettings``).
        lro_polling_interval_s: pause between the SDK's checks of a job being
            terminated or deleted (they run on the SDK's own daemon threads).
        max_api_attempts: attempts per blob call (the Batch client's retries are
            set where it is built).
        shared_job: run single submissions as tasks of one Azure job shared
            by the executor (see the module's "Which to pick").
    """

    name = "azure"
    status_enum = AzureJobStatus
    settings = COMMON_SETTINGS | {"container_image", "priority", "tags"}
    poll_interval_s = (1.0, 15.0)
    # Task dependencies by task id, within one Azure job: a single job waiting
    # for single jobs (or for jobs held so) of one Azure job, and an array's
    # children one after another. Anything else is held in the client (`CannotHold`).
    dependency_kinds = frozenset({"job", "sequential"})
    #: Tasks per addtaskcollection request (Azure allows at most 100).
    tasks_per_request = MAX_TASKS_PER_REQUEST

    def __init__(
        self,
        client: Any,
        *,
        batch_url: str,
        pool_id: str,
        storage_url: str,
        storage_options: Mapping[str, Any] | None = None,
        task_environment: Mapping[str, str] | None = None,
        lro_polling_interval_s: float = 1.0,
        max_api_attempts: int = 10,
        shared_job: bool = False,
    ) -> None:
        self.client = client
        self.shared_job = shared_job
        self._shared_id: str | None = None
        self._shared_lock = threading.Lock()
        self.max_api_attempts = max_api_attempts
        self.batch_url = batch_url
        self.pool_id = pool_id
        self.storage_url = storage_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.task_environment = dict(task_environment or {})
        self.lro_polling_interval_s = lro_polling_interval_s
        self.scheme = self.storage_url.split("://", 1)[0]
        # Filled in by check_environment.
        self.slots_per_node: int | None = None
        self.vm_size: str | None = None
        self.pool_runs_containers = True
        self._fs: Any = None
        self._init_describe()

    # -- environment and settings ------------------------------------------------
    def check_environment(self) -> None:
        """Fail at construction when the pool is unknown or the credential is refused."""
        try:
            pool = self.client.get_pool(
                self.pool_id, select=["id", "state", "vmSize", "taskSlotsPerNode", "virtualMachineConfiguration"]
            )
        except Exception as exc:
            raise _batch_environment_error(exc, self.pool_id, self.batch_url) from exc
        if _name(pool.state) == "deleting":
            raise ValueError(f"pool_id={self.pool_id!r} is being deleted; give the id of an active Azure Batch pool")
        self.slots_per_node = pool.task_slots_per_node or 1
        self.vm_size = pool.vm_size
        vm_config = pool.virtual_machine_configuration
        self.pool_runs_containers = bool(vm_config is not None and vm_config.container_configuration)

    def command_for(self, job_url: str, *, array: bool) -> tuple[str, ...]:
        """The runner command: array children read their index from ``AZ_BATCH_TASK_ID``.

        Every task also tees its output, which the runner uploads with
        ./JobOutput/ under the Batch File Conventions when the run ends, and
        gives its blob client the provider's retry policy (not the blob SDK's
        15 s first backoff).
        """
        command = super().command_for(job_url, array=array) + (
            "--capture-output",
            _conventions.CAPTURE_HOOK,
            "--storage-setup",
            _conventions.STORAGE_HOOK,
        )
        if array:
            command += ("--index-env", "AZ_BATCH_TASK_ID", "--index-base", str(AZURE_FIRST_CHILD_TASK_ID))
        return command

    def validate_settings(self, settings: JobSettings) -> None:
        vm = f" ({self.vm_size})" if self.vm_size else ""
        if settings.memory_mib is not None:
            raise ValueError(
                f"memory={settings.memory_mib} MiB cannot be asked per task on Azure Batch: a task gets the "
                f"memory of the pool's VM size{vm}. Use a pool whose VM size has the memory you need, and "
                "reserve a share of a node with vcpus= instead"
            )
        if settings.gpus is not None:
            raise ValueError(
                f"gpus={settings.gpus} cannot be asked per task on Azure Batch: the pool's VM size{vm} decides "
                "the GPUs. Use a pool of a GPU VM size (NC/ND series) and reserve a node with vcpus= instead"
            )
        if settings.vcpus is not None and self.slots_per_node is not None and settings.vcpus > self.slots_per_node:
            raise ValueError(
                f"vcpus={settings.vcpus} needs {settings.vcpus} task slots, but pool {self.pool_id!r} has "
                f"{self.slots_per_node} per node (taskSlotsPerNode): the task would never be scheduled. Ask for "
                f"vcpus<={self.slots_per_node}, or use a pool with more task slots (one per vCPU)"
            )
        if settings.container_image is not None and not self.pool_runs_containers:
            raise ValueError(
                f"container_image={settings.container_image!r}: pool {self.pool_id!r} has no container "
                "configuration, so its tasks run directly on the nodes (which must have cloudexec installed). "
                "Leave container_image out, or use a pool created with a containerConfiguration"
            )

    # -- helpers -------------------------------------------------------------------
    def _models(self) -> Any:
        from azure.batch import models

        return models

    def filesystem(self) -> Any:
        """The adlfs filesystem of the storage account (for the conventions containers)."""
        if self._fs is None:
            import fsspec.core

            self._fs, _ = fsspec.core.url_to_fs(self.storage_url, **self.storage_options)
            _conventions.tune_blob_retries(self._fs, self.max_api_attempts)
        return self._fs

    # -- submit ---------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        if self.shared_job and spec.array_size is None:
            return self._submit_shared(spec)
        m = self._models()
        job_id = spec.job_id
        if not _JOB_ID_RE.match(job_id):
            raise SubmissionError(
                f"job id {job_id!r} is not a valid Azure job id (1-64 letters, digits, '-' or '_'); "
                "give a shorter job_name",
                job_id=job_id,
            )
        container = _conventions.container_name(job_id)
        fs = self.filesystem()
        try:
            fs.mkdir(container, exist_ok=True)
        except Exception as exc:
            raise SubmissionError(
                f"cannot create the blob container {container!r} for the logs and outputs of job {job_id} "
                f"({_error_code(exc) or type(exc).__name__}): {_error_message(exc)}. The storage credentials "
                "must be allowed to create containers in the account",
                job_id=job_id,
                code=_error_code(exc),
            ) from exc
        env = {
            "CLOUDEXEC_JOB_ID": job_id,
            _conventions.ENV_VAR: f"{self.scheme}://{container}",
            _conventions.ATTEMPTS_ENV_VAR: str(self.max_api_attempts),
            **self.task_environment,
            **spec.environment,
        }
        sequential = any(dep.kind == "sequential" for dep in spec.depends_on)
        if any(dep.kind != "sequential" for dep in spec.depends_on):
            return self._submit_hosted(spec, container, env)
        settings = spec.settings
        metadata = [m.BatchMetadataItem(name=URL_METADATA, value=spec.job_url)]
        metadata += [m.BatchMetadataItem(name=k, value=v) for k, v in sorted((settings.tags or {}).items())]
        job_options: dict[str, Any] = {
            "id": job_id,
            "display_name": spec.name[:1024],
            "pool_info": m.BatchPoolInfo(pool_id=self.pool_id),
            "common_environment_settings": [m.EnvironmentSetting(name=k, value=v) for k, v in sorted(env.items())],
            "metadata": metadata,
            # Set at creation or never: a later call may be held as a task of this job.
            "uses_task_dependencies": True,
        }
        if settings.priority is not None:
            job_options["priority"] = azure_priority(settings.priority)
        if sequential:
            # Each child waits for the previous one (a task dependency); a
            # child that fails terminates the job (its default exit-option job
            # action), so no later child runs and nothing stays active for ever.
            job_options["task_failure_mode"] = m.BatchTaskFailureMode.PERFORM_EXIT_OPTIONS_JOB_ACTION
        self._note_submitted(job_id)
        try:
            create_options = m.BatchJobCreateOptions(**job_options)
            _resend_if_dropped(lambda: self.client.create_job(create_options), self.max_api_attempts, "JobExists")
        except Exception as exc:
            self._remove_container(container)
            if _error_code(exc) == QUOTA_REACHED:
                raise self._quota_reached() from exc
            raise _submission_error(job_id, exc, "create the job") from exc
        try:
            if spec.array_size is None:
                task = self.task_options(spec, None)
                _resend_if_dropped(lambda: self.client.create_task(job_id, task), self.max_api_attempts, "TaskExists")
            else:
                self._add_children(spec, spec.array_size, sequential=sequential)
            # A PATCH: azure-core does not resend it when the connection drops,
            # and setting the same mode twice is harmless.
            update = m.BatchJobUpdateOptions(all_tasks_complete_mode=m.BatchAllTasksCompleteMode.TERMINATE_JOB)
            _resend_if_dropped(lambda: self.client.update_job(job_id, update), self.max_api_attempts)
        except BaseException as exc:
            self._discard(job_id, container)
            if isinstance(exc, CloudExecError) or not isinstance(exc, Exception):
                raise
            raise _submission_error(job_id, exc, "add the tasks of", discarded=True) from exc
        return job_id if spec.array_size is None else f"array:{job_id}/{spec.array_size}"

    def _submit_hosted(self, spec: JobSpec, container: str, env: dict[str, str]) -> str:
        """Add a dependent single job as a task of its upstream job's Azure job; return its reference.

        Raises:
            CannotHold: the job is an array, waits for an array or for tasks
                of several Azure jobs, or its host job no longer takes tasks.
        """
        m = self._models()
        hosts: set[str] = set()
        task_ids: list[str] = []
        for dep in spec.depends_on:
            where = hosted(dep.ref or "")
            if where is None:
                host, size = _parse_ref(dep.ref or "")
                where = (host, SINGLE_TASK_ID) if size is None and dep.kind == "job" else None
            if where is None or spec.array_size is not None:
                self._remove_container(container)
                raise CannotHold(f"job {spec.job_id}: Azure task dependencies cannot express {dep}")
            hosts.add(where[0])
            task_ids.append(where[1])
        if len(hosts) != 1:
            self._remove_container(container)
            raise CannotHold(f"job {spec.job_id} waits for tasks of several Azure jobs: {sorted(hosts)}")
        host = hosts.pop()
        task = self.task_options(
            spec,
            None,
            task_id=spec.job_id,
            environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in sorted(env.items())],
            depends_on=m.BatchTaskDependencies(task_ids=task_ids),
        )
        try:
            _resend_if_dropped(lambda: self.client.create_task(host, task), self.max_api_attempts, "TaskExists")
        except Exception as exc:
            self._remove_container(container)
            code = _error_code(exc)
            if code in ("JobCompleted", "JobBeingTerminated", "JobBeingDeleted", "JobNotFound"):
                # The upstream job ended meanwhile: its result is (or will never be) stored.
                raise CannotHold(f"job {spec.job_id}: its host job {host} takes no more tasks ({code})") from exc
            raise _submission_error(spec.job_id, exc, f"add a task to {host} for") from exc
        return f"{HOSTED_PREFIX}{host}/{spec.job_id}"

    def _quota_reached(self) -> CapacityReached:
        """What a job refused for the account's active-job quota waits for (with the count, if it can be had)."""
        try:
            # One list call (a page holds 1,000 jobs; quotas are 100-300 by default).
            active = sum(1 for _ in self.client.list_jobs(filter=_QUOTA_FILTER, select=["id"], max_results=1000))
        except Exception as exc:  # noqa: BLE001 - the count only decorates the reason
            log.debug("cloudexec: could not count the active Azure jobs: %s", exc)
            reason = "waiting for Azure Batch active-job quota"
        else:
            reason = f"waiting for Azure Batch active-job quota ({active} active)"
        return CapacityReached(reason, retry_after_s=_QUOTA_RETRY_S)

    def _shared_job_id(self, spec: JobSpec) -> str:
        """The executor's shared job, created (with its conventions container) at first use."""
        with self._shared_lock:
            if self._shared_id is not None:
                return self._shared_id
            m = self._models()
            job_id = new_job_id("cloudexec-shared")
            container = _conventions.container_name(job_id)
            try:
                self.filesystem().mkdir(container, exist_ok=True)
            except Exception as exc:
                raise SubmissionError(
                    f"cannot create the blob container {container!r} for the logs and outputs of the shared job "
                    f"{job_id} ({_error_code(exc) or type(exc).__name__}): {_error_message(exc)}. The storage "
                    "credentials must be allowed to create containers in the account",
                    job_id=spec.job_id,
                    code=_error_code(exc),
                ) from exc
            env = {_conventions.ENV_VAR: f"{self.scheme}://{container}", **self.task_environment}
            options = m.BatchJobCreateOptions(
                id=job_id,
                display_name="cloudexec shared job",
                pool_info=m.BatchPoolInfo(pool_id=self.pool_id),
                common_environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in sorted(env.items())],
            )
            self._note_submitted(job_id)
            try:
                _resend_if_dropped(lambda: self.client.create_job(options), self.max_api_attempts, "JobExists")
            except Exception as exc:
                self._remove_container(container)
                if _error_code(exc) == QUOTA_REACHED:
                    raise self._quota_reached() from exc
                raise _submission_error(spec.job_id, exc, "create the shared job for") from exc
            self._shared_id = job_id
            return job_id

    def _submit_shared(self, spec: JobSpec) -> str:
        """Add a single job as a task (id = its cloudexec id) of the executor's shared job."""
        if spec.settings.priority is not None or spec.settings.tags:
            raise SubmissionError(
                f"job {spec.job_id}: with shared_job=True single submissions are tasks of one Azure job, which "
                "has one priority and one set of tags; drop the priority/tags settings for submit(), or use an "
                "executor without shared_job (one Azure job per submit) for them",
                job_id=spec.job_id,
            )
        m = self._models()
        env = {"CLOUDEXEC_JOB_ID": spec.job_id, **spec.environment}
        task = self.task_options(
            spec, None, task_id=spec.job_id, environment=[m.EnvironmentSetting(name=k, value=v) for k, v in sorted(env.items())]
        )
        for attempt in (1, 2):
            job_id = self._shared_job_id(spec)
            try:
                _resend_if_dropped(lambda: self.client.create_task(job_id, task), self.max_api_attempts, "TaskExists")
            except Exception as exc:
                code = _error_code(exc)
                ended = _is_not_found(exc) or code in ("JobCompleted", "JobBeingTerminated", "JobBeingDeleted")
                if ended and attempt == 1:
                    # Someone ended the shared job: start another one.
                    with self._shared_lock:
                        if self._shared_id == job_id:
                            self._shared_id = None
                    continue
                raise _submission_error(spec.job_id, exc, "add the task of") from exc
            return shared_ref(job_id, spec.job_id)
        raise AssertionError("unreachable")  # pragma: no cover

    def task_options(
        self,
        spec: JobSpec,
        index: int | None,
        *,
        task_id: str | None = None,
        environment: list[Any] | None = None,
        **extra: Any,
    ) -> Any:
        """The ``BatchTaskCreateOptions`` of the single task (``index`` None) or of array child ``index``.

        Args:
            task_id: the task's id instead of the usual one (a task of the
                shared job, or a job held as a task of its upstream's job).
            environment: the task's own ``environmentSettings``.
            **extra: further options (``depends_on``).
        """
        m = self._models()
        s = spec.settings
        options: dict[str, Any] = {
            "id": task_id or task_id_for(index),
            "command_line": " ".join(shlex.quote(part) for part in spec.command),
            **extra,
        }
        if environment:
            options["environment_settings"] = environment
        constraints: dict[str, Any] = {}
        if s.timeout_s is not None:
            constraints["max_wall_clock_time"] = _dt.timedelta(seconds=s.timeout_s)
        if s.retries is not None:
            constraints["max_task_retry_count"] = s.retries
        if constraints:
            options["constraints"] = m.BatchTaskConstraints(**constraints)
        if s.vcpus is not None:
            options["required_slots"] = s.vcpus
        if self.pool_runs_containers:
            # taskWorkingDirectory: ./JobOutput/ then lands in the task's
            # directory, where the runner finds it, instead of the image's WORKDIR.
            options["container_settings"] = m.BatchTaskContainerSettings(
                image_name=s.container_image or DEFAULT_CONTAINER_IMAGE,
                working_directory=m.ContainerWorkingDirectory.TASK_WORKING_DIRECTORY,
            )
        return m.BatchTaskCreateOptions(**options)

    def _add_children(self, spec: JobSpec, size: int, *, sequential: bool = False) -> None:
        """Add the array's tasks, 100 per request, a few requests at once (see `_azure_tasks`)."""
        template = self.task_options(spec, 0).as_dict(exclude_readonly=True)
        _tasks.add_children(
            self.client,
            spec.job_id,
            template,
            size,
            per_request=self.tasks_per_request,
            sequential=sequential,
            send=lambda call: _resend_if_dropped(call, self.max_api_attempts),
        )

    def _terminate_job(self, job_id: str, reason: str) -> None:
        from azure.batch.models._models import BatchJobTerminateOptions  # not re-exported by azure-batch 15.1

        try:
            # The SDK's poller (a daemon thread) waits for the job to leave
            # "terminating"; nothing here waits for it.
            # Terminating twice answers 409, which counts as done below.
            _resend_if_dropped(
                lambda: self.client.begin_terminate_job(
                    job_id,
                    BatchJobTerminateOptions(termination_reason=reason),
                    polling_interval=self.lro_polling_interval_s,
                ),
                self.max_api_attempts,
            )
        except Exception as exc:
            # 409 JobCompleted / JobBeingTerminated / JobBeingDeleted, 404: it already ended.
            if not (_is_not_found(exc) or getattr(exc, "status_code", None) == 409):
                raise

    def _terminate_task(self, job_id: str, task_id: str) -> None:
        try:
            _resend_if_dropped(lambda: self.client.terminate_task(job_id, task_id), self.max_api_attempts)
        except Exception as exc:
            if not (_is_not_found(exc) or getattr(exc, "status_code", None) == 409):
                raise

    def _discard(self, job_id: str, container: str) -> None:
        """Terminate and delete a job whose submission failed half-way, and its container."""
        for step, call in (
            ("terminate", lambda: self._terminate_job(job_id, "cloudexec: task submission failed")),
            ("delete", lambda: self.client.begin_delete_job(job_id, polling_interval=self.lro_polling_interval_s)),
        ):
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the submission error matters more
                log.warning("cloudexec: could not %s Azure job %s after its submission failed: %s", step, job_id, exc)
        self._remove_container(container)

    def _remove_container(self, container: str) -> None:
        try:
            self.filesystem().rm(container, recursive=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("cloudexec: could not remove the blob container %s: %s", container, exc)

    # -- cancel -------------------------------------------------------------------------
    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        if hosted(ref) is not None or ref.startswith(_SHARED_PREFIX):
            # Only this task: its job belongs to the upstream job, or runs the
            # executor's other calls (the shared job).
            self._terminate_task(*_task_of(ref))
            return
        job_id, size = _parse_ref(ref)
        if index is not None:
            self._terminate_task(job_id, task_id_for(index))
            return
        self._terminate_job(job_id, reason)
        if size is None:
            # Terminating a job leaves a task that had not started "active";
            # ending the task too makes the single job's status final at once.
            self._terminate_task(job_id, SINGLE_TASK_ID)

    # -- logs and output files ---------------------------------------------------------
    def read_log(self, ref: str, *, index: int | None = None, stream: str = "stdout") -> str | None:
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr'; got {stream!r}")
        job_id, task_id = _task_of(ref) if index is None else (_parse_ref(ref)[0], task_id_for(index))
        container = _conventions.container_name(job_id)
        if hosted(ref) is not None:
            container = _conventions.container_name(task_id)  # the task id is its cloudexec job id
        try:
            task = self.client.get_task(job_id, task_id, select=["id", "state", "executionInfo"])
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            task = None
        state = _name(task.state) if task is not None else None
        if state in (None, "completed"):
            text = self._read_blob(f"{container}/{_conventions.log_blob(task_id, stream)}")
            if text is not None or task is None:
                return text
        if state in ("active", "preparing"):
            return None
        execution = getattr(task, "execution_info", None)
        if task is not None and (execution is None or execution.start_time is None):
            return None  # ended without ever running (terminated while queued): no node files
        try:
            chunks = self.client.download_task_file(job_id, task_id, f"{stream}.txt")
            return b"".join(chunks).decode("utf-8", errors="replace")
        except Exception as exc:
            if _is_not_found(exc) or getattr(exc, "status_code", None) == 409:
                return None  # the node is gone, or the file was never created
            raise

    def _read_blob(self, path: str) -> str | None:
        fs = self.filesystem()
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        return bytes(data).decode("utf-8", errors="replace")

    def output_files(self, job_id: str, task_id: str) -> list[str]:
        """Names (relative to ``./JobOutput/``) of the files a task uploaded, sorted."""
        fs = self.filesystem()
        prefix = f"{_conventions.container_name(job_id)}/{_conventions.output_prefix(task_id)}"
        fs.invalidate_cache(prefix)
        try:
            found = fs.find(prefix)
        except FileNotFoundError:
            return []
        return sorted(path[len(prefix) + 1 :] for path in found if path.startswith(prefix + "/"))

    def download_output(self, job_id: str, task_id: str, name: str, dest: str | os.PathLike[str]) -> str:
        """Download one output file of a task to ``dest`` (a file path, or an existing folder)."""
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"name must be a path relative to ./JobOutput/, as output_files() lists it; got {name!r}")
        target = os.fspath(dest)
        if os.path.isdir(target):
            target = os.path.join(target, name.rsplit("/", 1)[-1])
        blob = f"{_conventions.container_name(job_id)}/{_conventions.output_prefix(task_id)}/{name}"
        try:
            data = self.filesystem().cat_file(blob)
        except FileNotFoundError:
            data = None
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            data = None
        if data is None:
            listed = self.output_files(job_id, task_id)
            raise FileNotFoundError(
                f"job {job_id} (task {task_id}) has no output file {name!r}; it uploaded "
                f"{listed or 'none'}. A job's files under ./{_conventions.OUTPUT_DIR}/ are uploaded when it "
                "ends: check future.output_files() once it is done"
            )
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(bytes(data))
        return target

    # -- re-attach, hints, close ------------------------------------------------------------
    def find_job_url(self, provider_job_id: str) -> str | None:
        if not _JOB_ID_RE.match(provider_job_id):
            return None
        try:
            job = self.client.get_job(provider_job_id, select=["id", "metadata"])
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        for item in job.metadata or []:
            if item.name == URL_METADATA:
                return str(item.value)
        return None

    def failure_hint(self, info: JobInfo) -> str | None:
        if "maximum execution time" in (info.status_reason or "").lower():
            return (
                "The task ran past its time limit (maxWallClockTime): raise it with "
                "executor.with_settings(timeout=...)."
            )
        return super().failure_hint(info)

    def close(self) -> None:
        # The BatchClient stays open: futures outlive their executor, and their
        # properties (logs, output files) still ask Azure after shutdown().
        self._close_describe()
        self.at_exit()

    def at_exit(self) -> None:
        """Let the shared job complete (leaving the quota) after its last task; set once no more tasks come."""
        with self._shared_lock:
            shared, self._shared_id = self._shared_id, None
        if shared is not None:
            m = self._models()
            try:
                self.client.update_job(
                    shared, m.BatchJobUpdateOptions(all_tasks_complete_mode=m.BatchAllTasksCompleteMode.TERMINATE_JOB)
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("cloudexec: could not let the shared Azure job %s complete: %s", shared, exc)

    def job_location(self, ref: str, index: int | None) -> tuple[str, str]:
        """``(azure_job_id, task_id)`` of a single job's task (``index`` None) or of array child ``index``."""
        if index is None:
            return _task_of(ref)
        return _parse_ref(ref)[0], task_id_for(index)


def _batch_environment_error(exc: BaseException, pool_id: str, url: str) -> Exception:
    code = _error_code(exc)
    name = type(exc).__name__
    if code == "PoolNotFound" or (_is_not_found(exc) and code is None):
        return ValueError(
            f"pool_id={pool_id!r} does not exist in the Azure Batch account {url} (Azure error code "
            f"{code or 'PoolNotFound'}); create the pool (Azure portal, az batch pool create) or give the id of "
            "an existing one"
        )
    if name == "ClientAuthenticationError" or getattr(exc, "status_code", None) in (401, 403):
        return CloudExecError(
            f"the Azure Batch account {url} refused the credential ({code or name}): {_error_message(exc)}. "
            "For shared key, pass AzureNamedKeyCredential(<batch account name>, <key from the portal's Keys "
            "page>); for a token credential, give its identity a role on the Batch account"
        )
    if name in ("ServiceRequestError", "ServiceResponseError"):
        return CloudExecError(
            f"cannot reach the Azure Batch account at {url}: {exc}; check batch_url "
            "(https://<account>.<region>.batch.azure.com) and the network"
        )
    return CloudExecError(f"cannot check pool {pool_id!r} at {url} ({code or name}): {_error_message(exc)}")


def _submission_error(job_id: str, exc: BaseException, what: str, *, discarded: bool = False) -> SubmissionError:
    code = _error_code(exc)
    outcome = "the job was terminated and deleted, nothing of it runs" if discarded else "nothing of it runs"
    hint = "check the pool and the job's settings"
    if code == "JobExists":
        hint = "a job with this id exists already; submit again for a new id"
    elif code in ("RequestBodyTooLarge", "RequestEntityTooLarge"):
        hint = "the request is above Azure's 1 MiB; use fewer or shorter tags and a shorter job_name"
    return SubmissionError(
        f"Azure Batch refused to {what} job {job_id} ({code or type(exc).__name__}): {_error_message(exc)}; "
        f"{outcome}. {hint[0].upper() + hint[1:]}",
        job_id=job_id,
        code=code,
    )


class AzureBatchFuture(BatchFuture[Any]):
    """A `BatchFuture` of an Azure Batch task: a single job, or one child of an array."""

    def _azure(self) -> AzureBatchProvider:
        return cast(AzureBatchProvider, self._core.provider)

    def _location(self) -> tuple[str, str]:
        """``(azure_job_id, task_id)`` of this future's task."""
        ref = self._record.ref
        if ref is None:
            return self._record.job_id, task_id_for(self._index)
        return self._azure().job_location(ref, self._index)

    @property
    def provider_task_id(self) -> str:
        """The Azure task id: ``"10000000"`` for a single job, ``10000001 + index`` for an array child,
        the cloudexec job id for a task of the shared job (``shared_job=True``) or for a job held as a
        task of its upstream job's Azure job."""
        return self._location()[1]

    def output_files(self) -> list[str]:
        """Names of the files the job wrote under ``./JobOutput/`` (uploaded when it ended), sorted.

        Returns:
            Paths relative to ``./JobOutput/`` with ``/`` separators; ``[]``
            while the job runs or when it wrote none.
        """
        return self._azure().output_files(*self._location())

    def download_output(self, name: str, dest: str | os.PathLike[str]) -> str:
        """Download one of the job's output files.

        Args:
            name: a name from `output_files` (path relative to ``./JobOutput/``).
            dest: local file path, or an existing folder to put the file in.

        Returns:
            The path written.

        Raises:
            FileNotFoundError: the job uploaded no such file (the message lists
                what it did upload).
            ValueError: ``name`` is absolute or climbs out with ``..``.
        """
        return self._azure().download_output(*self._location(), name, dest)


class AzureArrayFuture(ArrayFuture[Any]):
    """An `ArrayFuture` of an Azure Batch job with one task per child."""

    @property
    def provider_first_task_id(self) -> str:
        """The Azure task id of child 0 (``"10000001"``); child i is ``10000001 + i``."""
        return task_id_for(0)


class AzureBatchExecutor(BatchExecutor):
    """Run calls as Azure Batch tasks on an existing pool; payloads travel through Blob storage.

    Example:
        >>> from azure.identity import DefaultAzureCredential                         # doctest: +SKIP
        >>> ex = AzureBatchExecutor(pool_id="cloudexec-pool",                           # doctest: +SKIP
        ...                         batch_url="https://acct.westeurope.batch.azure.com",
        ...                         storage="az://cloudexec-io/jobs",
        ...                         storage_options={"account_name": "acctstorage"},
        ...                         credential=DefaultAzureCredential())
        >>> f = ex.with_settings(vcpus=4, priority=0.5).submit(fit, data)           # doctest: +SKIP
        >>> f.job_status, f.job_log, f.provider_task_id, f.output_files()          # doctest: +SKIP

    Args:
        pool_id: the Azure Batch pool to run on (required). Its nodes run the
            image `DEFAULT_CONTAINER_IMAGE` (``container/Dockerfile``) or the
            ``container_image`` setting; a pool without a container
            configuration runs tasks directly on its nodes. Its
            ``taskSlotsPerNode`` should equal its VM size's vCPUs: ``vcpus``
            asks for that many slots.
        batch_url: the Batch account endpoint,
            ``https://<account>.<region>.batch.azure.com`` (default: the
            ``AZURE_BATCH_ENDPOINT`` environment variable).
        storage: ``az://<container>/<prefix>`` for calls and results (required);
            the container must exist. Each job also gets a container
            ``job-<jobId>`` in the same account for its logs and outputs.
        credential: for Batch, an ``AzureNamedKeyCredential(account, key)`` (default
            from ``AZURE_BATCH_ACCOUNT`` and ``AZURE_BATCH_ACCESS_KEY`` when both
            are set, as the Azure CLI reads them) or any
            azure-identity ``TokenCredential``; default ``DefaultAzureCredential()``.
        storage_options: adlfs options for the storage account: ``account_name``
            with ``account_key``/``sas_token``/``credential``, or
            ``connection_string`` (default: adlfs's environment variables,
            ``AZURE_STORAGE_CONNECTION_STRING``, ``AZURE_STORAGE_ACCOUNT_NAME`` …).
            With an ``account_name`` and no key, a token ``credential`` is used
            for Blob storage too.
        task_environment: variables every task gets, e.g.
            ``CLOUDEXEC_STORAGE_OPTIONS`` (JSON adlfs options for the runner) or
            ``AZURE_CLIENT_ID`` of the pool's managed identity. They are visible
            to anyone who can read the job: no secrets. By default the runner
            reaches storage with what the pool provides (a managed identity,
            or ``AZURE_STORAGE_CONNECTION_STRING`` set by a start task).
        max_workers: jobs in flight (an array job counts once); default 1000.
        poll_interval_s: (first, longest) pause between status polls.
        lro_polling_interval_s: pause between the SDK's checks while a job is
            being terminated or deleted.
        max_api_attempts: attempts per Batch REST and blob call (azure-core's
            ``RetryPolicy`` for Batch, azure-storage-blob's ``ExponentialRetry``
            for blobs, which retry throttling, 5xx and dropped connections).
        shared_job: run every single ``submit`` as a task of ONE Azure job the
            executor shares (created at the first submit, completing after
            shutdown) instead of one Azure job each: many single submissions
            then take one slot of the account's active-job quota and cost one
            task-list call per poll. ``map``/``submit_map`` still get a job of
            their own. Default False. Either way a submission beyond the quota
            waits instead of failing; see the module docstring for which to pick.
        **settings: default job settings: ``container_image``, ``vcpus``,
            ``priority`` (-1..+1), ``timeout`` (s), ``retries`` (0..9),
            ``job_name``, ``tags``. ``memory``/``gpus`` are refused (the pool's
            VM size decides them).

    Raises:
        ValueError: a missing or malformed argument, an unknown pool, a bad setting.
        TypeError: a credential of an unsupported type.
        CloudExecError: the Batch account refused the credential or cannot be reached.
        StorageError: the storage container is missing or refuses the credentials.
    """

    future_class = AzureBatchFuture
    array_future_class = AzureArrayFuture

    def __init__(
        self,
        pool_id: str,
        *,
        storage: str,
        batch_url: str | None = None,
        credential: Any = None,
        storage_options: Mapping[str, Any] | None = None,
        task_environment: Mapping[str, str] | None = None,
        max_workers: int | None = None,
        poll_interval_s: tuple[float, float] | None = None,
        lro_polling_interval_s: float = 1.0,
        max_api_attempts: int = 10,
        shared_job: bool = False,
        **settings: Any,
    ) -> None:
        if not isinstance(shared_job, bool):
            raise TypeError(f"shared_job must be True or False; got {shared_job!r}")
        if isinstance(max_api_attempts, bool) or not isinstance(max_api_attempts, int) or not 1 <= max_api_attempts <= 50:
            raise ValueError(f"max_api_attempts must be an int from 1 to 50; got {max_api_attempts!r}")
        if not isinstance(pool_id, str) or not _JOB_ID_RE.match(pool_id):
            raise ValueError(
                f"pool_id must be the id of an Azure Batch pool (1-64 letters, digits, '-' or '_'); got {pool_id!r}"
            )
        batch_url = batch_url or os.environ.get("AZURE_BATCH_ENDPOINT")
        if not isinstance(batch_url, str) or not re.fullmatch(r"https?://[^/\s]+/?", batch_url):
            raise ValueError(
                "batch_url must be the Batch account endpoint, such as "
                f"'https://myaccount.westeurope.batch.azure.com' (or set AZURE_BATCH_ENDPOINT); got {batch_url!r}"
            )
        match = _STORAGE_RE.match(storage) if isinstance(storage, str) else None
        if match is None:
            raise ValueError(
                f"storage must be an az:// URL such as 'az://cloudexec-io/jobs' (container/prefix); got {storage!r}"
            )
        container = match.group(2)
        if not _CONTAINER_RE.match(container):
            raise ValueError(
                f"storage container {container!r} is not a valid blob container name: 3-63 lowercase letters, "
                "digits and single hyphens, starting and ending with a letter or digit"
            )
        if lro_polling_interval_s <= 0:
            raise ValueError(f"lro_polling_interval_s must be positive; got {lro_polling_interval_s!r}")
        try:
            from azure.batch import BatchClient
            from azure.core.credentials import AzureNamedKeyCredential
        except ImportError as exc:
            raise ImportError("AzureBatchExecutor needs azure-batch and adlfs: pip install 'cloudexec[azure]'") from exc
        shared_key = (os.environ.get("AZURE_BATCH_ACCOUNT"), os.environ.get("AZURE_BATCH_ACCESS_KEY"))
        if credential is None and all(shared_key):
            # The Azure CLI's own variables for a Batch account's shared key
            # (az batch reads the same): what a config file or a CI job can give.
            credential = AzureNamedKeyCredential(*cast("tuple[str, str]", shared_key))
        if credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:
                raise ImportError(
                    "no credential given and azure-identity is missing for DefaultAzureCredential: "
                    "pip install 'cloudexec[azure]', or pass credential=AzureNamedKeyCredential(account, key)"
                ) from exc
            credential = DefaultAzureCredential()
        is_named_key = isinstance(credential, AzureNamedKeyCredential)
        if not is_named_key and not callable(getattr(credential, "get_token", None)):
            raise TypeError(
                f"credential must be an AzureNamedKeyCredential or an azure-identity TokenCredential; got "
                f"{type(credential).__name__}. Example: AzureNamedKeyCredential('<batch account>', '<key>')"
            )
        options = _storage_options(storage_options, None if is_named_key else credential)
        # azure-core's RetryPolicy retries 408/429/500/502/503/504 and dropped
        # connections with exponential backoff, honouring Retry-After.
        client = BatchClient(batch_url.rstrip("/"), credential, retry_total=max_api_attempts - 1)
        provider = AzureBatchProvider(
            client,
            batch_url=batch_url.rstrip("/"),
            pool_id=pool_id,
            storage_url=storage.rstrip("/"),
            storage_options=options,
            task_environment=task_environment,
            lro_polling_interval_s=lro_polling_interval_s,
            max_api_attempts=max_api_attempts,
            shared_job=shared_job,
        )
        try:
            provider.check_environment()
            _check_storage(provider, container)
            super().__init__(
                provider,
                storage.rstrip("/"),
                storage_options=options,
                max_workers=max_workers,
                poll_interval_s=poll_interval_s,
                **settings,
            )
        except BaseException:
            provider.close()
            client.close()
            raise

    @property
    def provider(self) -> AzureBatchProvider:
        """The `AzureBatchProvider` this executor submits through (its pool facts, its client)."""
        return cast(AzureBatchProvider, self._core.provider)


def _storage_options(given: Mapping[str, Any] | None, token_credential: Any) -> dict[str, Any]:
    """adlfs options; a token credential also serves Blob when an account has no other auth."""
    options = dict(given or {})
    has_auth = any(options.get(key) is not None for key in _STORAGE_AUTH_KEYS)
    has_account = options.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    has_env_auth = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if not (has_account or options.get("connection_string") or has_env_auth):
        raise ValueError(
            "storage needs a storage account: pass storage_options={'account_name': ...} (with account_key=, "
            "sas_token= or credential=) or {'connection_string': ...}, or set AZURE_STORAGE_CONNECTION_STRING "
            "or AZURE_STORAGE_ACCOUNT_NAME"
        )
    if not has_auth and not has_env_auth and token_credential is not None and has_account:
        options["credential"] = _AsyncTokenCredential(token_credential)
    return options


def _resend_if_dropped(call: Callable[[], Any], attempts: int, exists_code: str | None = None) -> Any:
    """Run ``call``, sending it again when the connection dropped before any answer.

    azure-core's RetryPolicy does not resend a POST whose connection dropped
    after the request went out (it may have been processed). Creating a job or
    tasks with our own ids is safe to resend: if the dropped attempt had gone
    through, the service answers ``exists_code`` (``JobExists``/``TaskExists``),
    which counts as success (None is returned); a task collection reports
    ``TaskExists`` per task, which the caller already accepts.
    """
    from azure.core.exceptions import ServiceResponseError

    dropped = False
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ServiceResponseError:
            if attempt == attempts:
                raise
            dropped = True
            time.sleep(min(0.2 * 2**attempt, 5.0))
        except Exception as exc:
            if dropped and exists_code is not None and _error_code(exc) == exists_code:
                return None
            raise
    return None


def _check_storage(provider: AzureBatchProvider, container: str) -> None:
    """Fail at construction with Azure's reason when the storage container cannot be used."""
    import uuid

    fs = provider.filesystem()
    probe = f"{provider.storage_url.split('://', 1)[1]}/.cloudexec-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as exc:
        code = _error_code(exc)
        if code == "ContainerNotFound":
            raise StorageError(
                f"the blob container {container!r} of storage={provider.storage_url!r} does not exist (Azure error "
                f"code ContainerNotFound); create it (az storage container create --name {container} "
                f"--account-name <account>, or BlobServiceClient.create_container({container!r})) or give an "
                "existing one"
            ) from exc
        if code in ("AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch") or getattr(
            exc, "status_code", None
        ) in (401, 403):
            raise StorageError(
                f"the storage account of {provider.storage_url!r} refused the credentials ({code or 'HTTP 403'}): "
                "check the account name and key, connection string or SAS token in storage_options, or that "
                "the identity has the 'Storage Blob Data Contributor' role on the account"
            ) from exc
        raise StorageError(
            f"cannot write to {provider.storage_url!r} ({code or type(exc).__name__}): {_error_message(exc)}. "
            "Give a container these credentials may write to"
        ) from exc
