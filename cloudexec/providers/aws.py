"""`AWSBatchExecutor`: AWS Batch jobs, S3 storage, CloudWatch logs.

``submit`` is one SubmitJob; ``map``/``submit_map`` one array job
(``arrayProperties.size``). The runner command and the job's storage URL
travel in ``containerOverrides``; the container image is the job
definition's (AWS has no per-job image override).

AWS limits this module works within (AWS Batch API reference):

- arrays have 2..10,000 children: a one-item map is submitted as a plain job
  that knows it is child 0, and larger maps are split into several array jobs
  whose children learn their global index from ``AWS_BATCH_JOB_ARRAY_INDEX``
  plus their part's ``--index-offset`` on the runner's command line;
- DescribeJobs takes at most 100 ids; about 50 Batch calls per second per
  account are allowed, so polls are bulk and throttling
  (``TooManyRequestsException``) is retried by botocore's adaptive retry mode;
- ``timeout.attemptDurationSeconds`` is at least 60 s, ``retryStrategy.attempts``
  1..10, job names at most 128 letters, digits, ``-`` and ``_``;
- a SubmitJob request is at most 30 KiB;
- job metadata is deleted 24 h after a job ends: the result stays in S3 and
  properties read ``None``.

Provider references (stored in each job's manifest) are the AWS job id of a
single job, or ``array:<id>/<size>,<id>/<size>…`` for an array split into parts
(a part of size 1 is a plain job).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from cloudexec._base import ArrayFuture, BatchExecutor, BatchFuture
from cloudexec._log import log
from cloudexec._provider import JobInfo, JobSpec, JobStatus, Phase, Provider
from cloudexec.errors import CloudExecError, SubmissionError
from cloudexec.settings import COMMON_SETTINGS, JobSettings, int_in, non_empty_str

__all__ = ["AWSBatchExecutor", "AWSBatchFuture", "AWSArrayFuture", "AWSJobStatus", "AWSBatchProvider"]
#: The names `cloudexec` itself exports from this provider (see `cloudexec.providers`).
EXPORTS = ("AWSBatchExecutor", "AWSBatchFuture", "AWSJobStatus")


LOG_GROUP = "/aws/batch/job"
MAX_ARRAY_SIZE = 10_000
MIN_TIMEOUT_S = 60
#: Most jobs one AWS Batch job may depend on ("up to 20 other jobs", AWS Batch user guide).
MAX_DEPENDENCIES = 20
MAX_SUBMIT_BYTES = 30 * 1024
_DESCRIBE_BATCH = 100
_GENERIC_REASON = "Essential container in task exited"


class AWSJobStatus(JobStatus):
    """The seven AWS Batch job states, named as AWS names them."""

    SUBMITTED = ("SUBMITTED", Phase.QUEUED)
    PENDING = ("PENDING", Phase.QUEUED)
    RUNNABLE = ("RUNNABLE", Phase.QUEUED)
    STARTING = ("STARTING", Phase.QUEUED)
    RUNNING = ("RUNNING", Phase.RUNNING)
    SUCCEEDED = ("SUCCEEDED", Phase.SUCCEEDED)
    FAILED = ("FAILED", Phase.FAILED)


_ORDER: list[JobStatus] = list(AWSJobStatus)


def _rank(status: JobStatus) -> int:
    return _ORDER.index(status)


def sanitize_job_name(name: str) -> str:
    """Make ``name`` a valid AWS Batch job name (≤ 128 letters, digits, ``-``, ``_``; alphanumeric first)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or "cloudexec"
    if not clean[0].isalnum():
        clean = "j" + clean
    return clean[:128]


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


# Codes AWS answers when it refused a request for its rate (nothing was done).
_THROTTLING_CODES = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded", "SlowDown"}
)
_SUBMIT_BACKOFF_S = 0.25
# Looks taken for a job whose SubmitJob answer was lost: ListJobs may miss it for a moment.
_LOOKUP_PAUSES_S = (0.5, 1.0, 2.0)
_CLOCK_SKEW_S = 300.0


def _submit_failure(exc: BaseException) -> str:
    """How a failed SubmitJob ended: ``"retry"`` (surely not done), ``"ambiguous"`` or ``"final"``."""
    from botocore import exceptions as bex

    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return "retry"  # never reached the service
    if isinstance(exc, bex.ClientError):
        if _client_error_code(exc) in _THROTTLING_CODES:
            return "retry"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return "ambiguous" if status >= 500 else "final"
    if isinstance(exc, (bex.HTTPClientError, bex.ReadTimeoutError, bex.ResponseStreamingError)):
        return "ambiguous"  # sent, and the answer did not arrive
    return "final"


def _refused(spec: JobSpec, exc: BaseException) -> SubmissionError:
    """The SubmissionError for a SubmitJob that failed for good."""
    code = _client_error_code(exc)
    message = str(exc)
    hint = "check the job queue, job definition and settings"
    if "memory" in message.lower():
        hint = "ask for memory the job definition and compute environment allow"
    return SubmissionError(
        f"AWS Batch refused job {spec.job_id} ({code or type(exc).__name__}): {message}; {hint}",
        job_id=spec.job_id,
        code=code,
    )


def _parse_ref(ref: str) -> list[tuple[str, int | None]]:
    """``[(aws_job_id, size or None for a single job)]``."""
    if not ref.startswith("array:"):
        return [(ref, None)]
    parts: list[tuple[str, int | None]] = []
    for item in ref[len("array:") :].split(","):
        job_id, size = item.rsplit("/", 1)
        parts.append((job_id, int(size)))
    return parts


def _dependencies(spec: JobSpec, offset: int, size: int | None, previous: str | None) -> list[dict[str, str]]:
    """SubmitJob's ``dependsOn`` for the part of ``spec`` at ``offset`` (``size`` ``None``: a plain job).

    AWS can wait for a whole job (every child of an array), child i for child
    i (``N_TO_N``, arrays of the same size) and each child for the one before
    (``SEQUENTIAL``); a dependency on one child of an array waits for that
    child's whole part. An array split into parts is matched part by part,
    and its later parts of a ``sequential`` array wait for the part before.

    Raises:
        SubmissionError: more than AWS's 20 dependencies for one job.
    """
    out: list[dict[str, str]] = []
    for dep in spec.depends_on:
        if dep.kind == "sequential":
            if size is not None:
                out.append({"type": "SEQUENTIAL"})
            if previous is not None:
                out.append({"jobId": previous})
            continue
        upstream = []
        start = 0
        for job_id, up_size in _parse_ref(dep.ref or ""):
            upstream.append((start, up_size or 1, job_id))
            start += up_size or 1
        if dep.kind == "n_to_n":
            same = [u for u in upstream if u[0] == offset and u[1] == (size or 1)]
            if same:
                entry = {"jobId": same[0][2]}
                if size is not None:
                    entry["type"] = "N_TO_N"
                out.append(entry)
                continue
            # Parts laid out differently: wait for every upstream part this part's children need.
            wanted = range(offset, offset + (size or 1))
            out.extend({"jobId": j} for s, n, j in upstream if s < wanted.stop and wanted.start < s + n)
        elif dep.index is not None:
            out.extend({"jobId": j} for s, n, j in upstream if s <= dep.index < s + n)
        else:
            out.extend({"jobId": j} for _, _, j in upstream)
    unique = list({json.dumps(d, sort_keys=True): d for d in out}.values())
    if len(unique) > MAX_DEPENDENCIES:
        raise SubmissionError(
            f"job {spec.job_id} would depend on {len(unique)} AWS Batch jobs (arrays above the executor's "
            f"max_array_size count once per part), above AWS Batch's limit of {MAX_DEPENDENCIES}. Restructure: "
            "pass fewer futures per call (one ArrayFuture instead of many separate futures), or gather them in "
            f"steps of at most {MAX_DEPENDENCIES} (part = ex.submit(list, futures[:{MAX_DEPENDENCIES}])).",
            job_id=spec.job_id,
        )
    return unique


def _child_locator(ref: str, index: int) -> str | None:
    """The AWS job id of global array child ``index``."""
    offset = 0
    for job_id, size in _parse_ref(ref):
        size = size or 1
        if index < offset + size:
            return job_id if size == 1 else f"{job_id}:{index - offset}"
        offset += size
    return None


def _job_info(job: dict[str, Any]) -> JobInfo:
    """Turn one DescribeJobs entry into a `JobInfo`."""
    container = job.get("container") or {}
    attempts = job.get("attempts") or []
    last = (attempts[-1].get("container") or {}) if attempts else {}
    exit_code = container.get("exitCode", last.get("exitCode"))
    status_reason = job.get("statusReason")
    detail = container.get("reason") or last.get("reason")
    # AWS puts the specific cause (OutOfMemoryError: ...) in container.reason
    # and a generic "Essential container in task exited" in statusReason.
    if detail and (not status_reason or status_reason == _GENERIC_REASON):
        status_reason = detail
    counts = None
    summary = (job.get("arrayProperties") or {}).get("statusSummary")
    if summary:
        counts = {s.value: int(summary.get(s.value, 0)) for s in AWSJobStatus}
    extra: dict[str, Any] = {
        "job_name": job.get("jobName"),
        "job_queue": job.get("jobQueue"),
        "log_stream_name": container.get("logStreamName") or last.get("logStreamName"),
        "created_at": job.get("createdAt"),
        "started_at": job.get("startedAt"),
        "stopped_at": job.get("stoppedAt"),
    }
    index = (job.get("arrayProperties") or {}).get("index")
    if index is not None:
        extra["array_index"] = index
    status = job.get("status")
    return JobInfo(
        status=AWSJobStatus.parse(status) if status else None,
        exit_code=exit_code,
        status_reason=status_reason,
        provider_job_id=job.get("jobId"),
        attempts=len(attempts) if attempts else (0 if status not in ("SUCCEEDED", "FAILED") else None),
        status_counts=counts,
        extra=extra,
    )


def _combine(parts: list[JobInfo | None], sizes: list[int]) -> JobInfo | None:
    """One `JobInfo` for an array submitted as several AWS jobs."""
    if all(p is None for p in parts):
        return None
    counts = {s.value: 0 for s in AWSJobStatus}
    for part, size in zip(parts, sizes):
        if part is None:
            continue
        if part.status_counts:
            for key, value in part.status_counts.items():
                counts[key] = counts.get(key, 0) + value
        elif part.status is not None:
            counts[part.status.value] += size
    statuses = [p.status for p in parts if p is not None and p.status is not None]
    if len(statuses) < len(parts) and not all(s.terminal for s in statuses):
        status = min(statuses, key=_rank) if statuses else None
    elif statuses and all(s.terminal for s in statuses) and len(statuses) == len(parts):
        status = AWSJobStatus.SUCCEEDED if all(s is AWSJobStatus.SUCCEEDED for s in statuses) else AWSJobStatus.FAILED
    else:
        live = [s for s in statuses if not s.terminal]
        status = AWSJobStatus.RUNNING if AWSJobStatus.RUNNING in live else min(live, key=_rank)
    reasons = [p.status_reason for p in parts if p is not None and p.status_reason]
    first = next(p for p in parts if p is not None)
    return JobInfo(
        status=status,
        status_reason="; ".join(dict.fromkeys(reasons)) or None,
        provider_job_id=first.provider_job_id,
        status_counts=counts,
        extra={"provider_job_ids": [p.provider_job_id if p else None for p in parts]},
    )


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AWSBatchProvider(Provider):
    """Talks to AWS Batch and CloudWatch Logs through boto3 clients.

    Args:
        batch: a boto3 ``batch`` client.
        logs: a boto3 ``logs`` client.
        job_queue: job queue name or ARN.
        job_definition: job definition name, ``name:revision`` or ARN.
        max_array_size: children per AWS array job (AWS's limit; smaller in tests).
    """

    name = "aws"
    status_enum = AWSJobStatus
    settings = COMMON_SETTINGS | {"tags"}
    # AWS Batch's fair-share scheduling (SubmitJob's schedulingPriorityOverride, 0..9999, and shareIdentifier).
    provider_settings = {"scheduling_priority": int_in(0, 9999), "share_identifier": non_empty_str}
    poll_interval_s = (1.0, 10.0)
    # SubmitJob's dependsOn: a job ID (whole job), N_TO_N, SEQUENTIAL; "up to 20" per job.
    dependency_kinds = frozenset({"job", "n_to_n", "sequential"})
    max_dependencies = MAX_DEPENDENCIES

    def __init__(
        self,
        batch: Any,
        logs: Any,
        *,
        job_queue: str,
        job_definition: str,
        max_array_size: int = MAX_ARRAY_SIZE,
        submitter: Any = None,
        submit_attempts: int = 10,
    ) -> None:
        self.batch = batch
        self.logs = logs
        self.job_queue = job_queue
        self.job_definition = job_definition
        self.max_array_size = max_array_size
        # SubmitJob has no idempotency token: an SDK that resends it after a lost
        # answer may start the job twice. `submitter` is a client that does not
        # retry, so _submit_one decides, looking the job up first when unsure.
        self.submitter = submitter if submitter is not None else batch
        self.submit_attempts = submit_attempts

    # -- settings ------------------------------------------------------------
    def validate_settings(self, settings: JobSettings) -> None:
        if settings.timeout_s is not None and settings.timeout_s < MIN_TIMEOUT_S:
            raise ValueError(
                f"timeout={settings.timeout_s:g} s is below AWS Batch's minimum attempt duration of "
                f"{MIN_TIMEOUT_S} s; ask for timeout>={MIN_TIMEOUT_S}"
            )
        if settings.memory_mib is not None and settings.memory_mib < 4:
            raise ValueError(f"memory={settings.memory_mib} MiB is below AWS Batch's minimum of 4 MiB")

    def check_environment(self) -> None:
        """Fail at construction when the queue or the job definition is unusable."""
        try:
            queues = self.batch.describe_job_queues(jobQueues=[self.job_queue]).get("jobQueues", [])
        except Exception as exc:
            raise _environment_error(exc, f"job queue {self.job_queue!r}") from exc
        if not queues:
            raise ValueError(
                f"job_queue={self.job_queue!r} does not exist in this account/region; "
                "give the name or ARN of an existing AWS Batch job queue"
            )
        if queues[0].get("state") not in (None, "ENABLED"):
            raise ValueError(f"job_queue={self.job_queue!r} is {queues[0].get('state')}; enable it first")
        try:
            found = self.batch.describe_job_definitions(jobDefinitions=[self.job_definition]).get("jobDefinitions", [])
            if not found and ":" not in self.job_definition:
                found = self.batch.describe_job_definitions(
                    jobDefinitionName=self.job_definition, status="ACTIVE"
                ).get("jobDefinitions", [])
        except Exception as exc:
            raise _environment_error(exc, f"job definition {self.job_definition!r}") from exc
        if not [d for d in found if d.get("status", "ACTIVE") == "ACTIVE"]:
            raise ValueError(
                f"job_definition={self.job_definition!r} is not an active AWS Batch job definition; "
                "register one (see container/README.md) and give its name, name:revision or ARN"
            )

    # -- submit --------------------------------------------------------------
    def command_for(self, job_url: str, *, array: bool) -> tuple[str, ...]:
        """The runner command: array children read their index from ``AWS_BATCH_JOB_ARRAY_INDEX``."""
        command = super().command_for(job_url, array=array)
        return command + ("--index-env", "AWS_BATCH_JOB_ARRAY_INDEX") if array else command

    def _request(
        self,
        spec: JobSpec,
        *,
        size: int | None,
        env: dict[str, str],
        suffix: str = "",
        command: Sequence[str] | None = None,
        depends_on: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        s = spec.settings
        requirements = []
        if s.vcpus is not None:
            requirements.append({"type": "VCPU", "value": str(s.vcpus)})
        if s.memory_mib is not None:
            requirements.append({"type": "MEMORY", "value": str(s.memory_mib)})
        if s.gpus:
            requirements.append({"type": "GPU", "value": str(s.gpus)})
        overrides: dict[str, Any] = {
            "command": list(spec.command if command is None else command),
            "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
        }
        if requirements:
            overrides["resourceRequirements"] = requirements
        request: dict[str, Any] = {
            "jobName": sanitize_job_name(spec.name + suffix),
            "jobQueue": self.job_queue,
            "jobDefinition": self.job_definition,
            "containerOverrides": overrides,
        }
        if size is not None:
            request["arrayProperties"] = {"size": size}
        if depends_on:
            request["dependsOn"] = depends_on
        if s.timeout_s is not None:
            request["timeout"] = {"attemptDurationSeconds": int(math.ceil(s.timeout_s))}
        if s.retries is not None:
            request["retryStrategy"] = {"attempts": s.retries + 1}
        if s.tags:
            request["tags"] = dict(s.tags)
        if s.get("scheduling_priority") is not None:
            request["schedulingPriorityOverride"] = s.get("scheduling_priority")
        if s.get("share_identifier") is not None:
            request["shareIdentifier"] = s.get("share_identifier")
        size_bytes = len(json.dumps(request).encode())
        if size_bytes > MAX_SUBMIT_BYTES:
            raise SubmissionError(
                f"job {spec.job_id}: the SubmitJob request is {size_bytes} bytes, above AWS Batch's 30 KiB "
                "limit; use fewer or shorter tags and job names",
                job_id=spec.job_id,
            )
        return request

    def _submit_one(self, spec: JobSpec, request: dict[str, Any]) -> str:
        """SubmitJob, resent only when it surely did not take effect or was looked up and not found."""
        started = time.time()
        for attempt in range(1, self.submit_attempts + 1):
            try:
                return str(self.submitter.submit_job(**request)["jobId"])
            except Exception as exc:
                outcome = _submit_failure(exc)
                if outcome == "ambiguous":
                    found = self._find_submitted(request, spec.job_id, started)
                    if found is not None:
                        log.info("cloudexec: job %s was created although SubmitJob's answer was lost", spec.job_id)
                        return found
                if outcome == "final" or attempt == self.submit_attempts:
                    raise _refused(spec, exc) from exc
                time.sleep(random.uniform(0, min(_SUBMIT_BACKOFF_S * 2**attempt, 20.0)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _find_submitted(self, request: dict[str, Any], job_id: str, since: float) -> str | None:
        """The AWS job an unanswered SubmitJob of cloudexec job ``job_id`` created, if any.

        ListJobs by name, then DescribeJobs of the recent ones, matching the
        job's own id in its environment and its command (parts of a split
        array differ there). A job just created may be missing from ListJobs
        for a moment, so a few looks are taken before concluding it was not.
        """
        env_name = "CLOUDEXEC_JOB_ID"
        command = request["containerOverrides"]["command"]
        for pause in _LOOKUP_PAUSES_S:
            time.sleep(pause)
            try:
                candidates: list[str] = []
                kwargs: dict[str, Any] = {
                    "jobQueue": request["jobQueue"],
                    "filters": [{"name": "JOB_NAME", "values": [request["jobName"]]}],
                }
                while True:
                    page = self.batch.list_jobs(**kwargs)
                    candidates += [
                        j["jobId"]
                        for j in page.get("jobSummaryList", [])
                        if j.get("createdAt", 0) >= (since - _CLOCK_SKEW_S) * 1000
                    ]
                    if not page.get("nextToken"):
                        break
                    kwargs["nextToken"] = page["nextToken"]
                for job in self._describe_ids(candidates).values():
                    container = job.get("container") or {}
                    env = {e.get("name"): e.get("value") for e in container.get("environment") or []}
                    if env.get(env_name) == job_id and list(container.get("command") or []) == list(command):
                        return str(job["jobId"])
            except Exception as exc:  # noqa: BLE001 - a failed look is no answer
                log.warning("cloudexec: could not look up job %s after SubmitJob's answer was lost: %s", job_id, exc)
        return None

    def submit(self, spec: JobSpec) -> str:
        env = {"CLOUDEXEC_JOB_ID": spec.job_id, **spec.environment}
        if spec.array_size is None:
            deps = _dependencies(spec, 0, None, None)
            return self._submit_one(spec, self._request(spec, size=None, env=env, depends_on=deps))
        parts: list[tuple[str, int]] = []
        try:
            for offset in range(0, spec.array_size, self.max_array_size):
                size = min(self.max_array_size, spec.array_size - offset)
                suffix = f"-part{offset // self.max_array_size}" if spec.array_size > self.max_array_size else ""
                deps = _dependencies(spec, offset, size if size > 1 else None, parts[-1][0] if parts else None)
                if size == 1:
                    # AWS arrays need 2+ children: a lone child runs as a plain job told its index.
                    command = (*spec.command, "--index", str(offset))
                    request = self._request(spec, size=None, env=env, suffix=suffix, command=command, depends_on=deps)
                else:
                    command = (*spec.command, "--index-offset", str(offset)) if offset else spec.command
                    request = self._request(
                        spec, size=size, env=env, suffix=suffix, command=command, depends_on=deps
                    )
                parts.append((self._submit_one(spec, request), size))
        except BaseException:
            # Nothing half-submitted: stop the parts that did go through.
            for job_id, _ in parts:
                try:
                    self.batch.terminate_job(jobId=job_id, reason="Terminated by cloudexec: array submission failed")
                except Exception:  # noqa: BLE001
                    pass
            raise
        return "array:" + ",".join(f"{job_id}/{size}" for job_id, size in parts)

    # -- describe --------------------------------------------------------------
    def _describe_ids(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for batch in _batches(unique, _DESCRIBE_BATCH):
            for job in self.batch.describe_jobs(jobs=list(batch)).get("jobs", []):
                found[job["jobId"]] = job
        return found

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        parsed = {ref: _parse_ref(ref) for ref in refs}
        jobs = self._describe_ids([job_id for parts in parsed.values() for job_id, _ in parts])
        out: dict[str, JobInfo] = {}
        for ref, parts in parsed.items():
            infos = [_job_info(jobs[job_id]) if job_id in jobs else None for job_id, _ in parts]
            if not ref.startswith("array:"):
                if infos[0] is not None:
                    out[ref] = infos[0]
                continue
            combined = _combine(infos, [size or 1 for _, size in parts])
            if combined is not None:
                out[ref] = combined
        return out

    def describe_children(self, ref: str, size: int) -> list[JobInfo | None]:
        locators = [_child_locator(ref, i) for i in range(size)]
        jobs = self._describe_ids([loc for loc in locators if loc])
        return [_job_info(jobs[loc]) if loc and loc in jobs else None for loc in locators]

    def describe_child(self, ref: str, size: int, index: int) -> JobInfo | None:
        locator = _child_locator(ref, index)
        if locator is None:
            return None
        job = self._describe_ids([locator]).get(locator)
        return _job_info(job) if job else None

    # -- cancel and logs ---------------------------------------------------------
    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        ids = [job_id for job_id, _ in _parse_ref(ref)] if index is None else [_child_locator(ref, index) or ""]
        jobs = self._describe_ids([i for i in ids if i])
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None:
                continue
            status = AWSJobStatus.parse(job["status"])
            if status.terminal:
                continue
            # CancelJob only stops jobs that have not reached STARTING; TerminateJob
            # stops running ones (and the children of an array).
            if status in (AWSJobStatus.SUBMITTED, AWSJobStatus.PENDING, AWSJobStatus.RUNNABLE):
                self.batch.cancel_job(jobId=job_id, reason=reason)
            self.batch.terminate_job(jobId=job_id, reason=reason)

    def read_log(self, ref: str, *, index: int | None = None, stream: str = "stdout") -> str | None:
        if stream != "stdout":
            return None  # CloudWatch keeps stdout and stderr in one stream: see job_log
        job_id = _parse_ref(ref)[0][0] if index is None else _child_locator(ref, index)
        if not job_id:
            return None
        job = self._describe_ids([job_id]).get(job_id)
        if job is None:
            return None
        stream_name = _job_info(job).extra.get("log_stream_name")
        if not stream_name:
            return None
        lines: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream_name, "startFromHead": True}
            if token:
                kwargs["nextToken"] = token
            try:
                page = self.logs.get_log_events(**kwargs)
            except Exception as exc:  # noqa: BLE001
                if _client_error_code(exc) == "ResourceNotFoundException":
                    return None
                raise
            lines.extend(event["message"] for event in page.get("events", []))
            next_token = page.get("nextForwardToken")
            if not page.get("events") or next_token == token:
                break
            token = next_token
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)

    def find_job_url(self, provider_job_id: str) -> str | None:
        job = self._describe_ids([provider_job_id.split(":")[0]]).get(provider_job_id.split(":")[0])
        if job is None:
            return None
        command = (job.get("container") or {}).get("command") or []
        for i, arg in enumerate(command):
            if arg == "cloudexec.runner" and i + 1 < len(command):
                return str(command[i + 1])
        return None


def _environment_error(exc: BaseException, what: str) -> CloudExecError:
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return CloudExecError(
            "no AWS credentials found: configure them (aws configure, AWS_PROFILE, an instance role) "
            "or pass session=boto3.Session(profile_name=...)"
        )
    if name == "NoRegionError":
        return CloudExecError("no AWS region configured: set AWS_DEFAULT_REGION or pass a boto3.Session(region_name=...)")
    code = _client_error_code(exc)
    return SubmissionError(f"cannot check the {what} ({code or name}): {exc}", code=code)


class AWSBatchFuture(BatchFuture[Any]):
    """A `BatchFuture` of an AWS Batch job (or array child); adds AWS's own fields."""

    @property
    def log_stream_name(self) -> str | None:
        """The CloudWatch Logs stream of the latest attempt (group ``/aws/batch/job``)."""
        info = self._current_info()
        return info.extra.get("log_stream_name") if info else None


class AWSArrayFuture(ArrayFuture[Any]):
    """An `ArrayFuture` of an AWS Batch array job (possibly split into parts)."""


def _check_io_bucket(io_bucket: object) -> None:
    """Refuses an ``io_bucket`` that S3 would refuse, naming the rule it breaks.

    Raises:
        ValueError: not an ``s3://bucket[/prefix]`` URL, or the bucket name
            breaks S3's naming rules (3-63 characters; lowercase letters,
            digits, dots and hyphens; a letter or digit at each end).
    """
    example = "such as 's3://my-bucket/cloudexec'"
    if not isinstance(io_bucket, str) or not io_bucket.startswith("s3://"):
        raise ValueError(f"io_bucket must be an s3:// URL {example}; got {io_bucket!r}")
    bucket = io_bucket[len("s3://"):].split("/", 1)[0]
    if not 3 <= len(bucket) <= 63:
        raise ValueError(
            f"io_bucket {io_bucket!r}: the bucket name {bucket!r} is {len(bucket)} character"
            f"{'' if len(bucket) == 1 else 's'} long, but S3 bucket names are 3 to 63; use the name of an existing bucket, {example}"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*[a-z0-9]", bucket):
        raise ValueError(
            f"io_bucket {io_bucket!r}: the bucket name {bucket!r} is not a valid S3 bucket name "
            f"(lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit), {example}"
        )


class AWSBatchExecutor(BatchExecutor):
    """Run calls as AWS Batch jobs; results travel through S3.

    Example:
        >>> ex = AWSBatchExecutor(job_queue="q", job_definition="cloudexec:3",   # doctest: +SKIP
        ...                       io_bucket="s3://my-bucket/cloudexec")
        >>> ex.with_settings(vcpus=4, memory="8 GiB").submit(train, cfg)          # doctest: +SKIP

    Args:
        job_queue: AWS Batch job queue name or ARN (required).
        job_definition: job definition name, ``name:revision`` or ARN (required);
            its image must have cloudexec installed (``container/Dockerfile``).
        io_bucket: ``s3://bucket/prefix`` for calls and results (required).
        session: a ``boto3.Session`` (default: boto3's default credential chain);
            its credentials and region are used for S3 too.
        endpoint_url: talk to another endpoint (an emulator) instead of AWS.
        max_workers: jobs in flight (an array job counts once); default 1000.
        poll_interval_s: (first, longest) pause between status polls.
        retry_mode: botocore retry mode for throttling (``"adaptive"`` or ``"standard"``).
        max_api_attempts: botocore's total attempts per API call.
        max_array_size: children per AWS array job (AWS allows 10,000).
        **settings: default job settings: ``vcpus``, ``memory``, ``gpus``,
            ``timeout`` (≥ 60 s), ``retries`` (0..9), ``job_name``, ``tags``,
            and AWS's fair-share ``scheduling_priority`` (0..9999) and
            ``share_identifier``, declared by this provider.

    Raises:
        ValueError: a missing or malformed argument, an unknown queue or definition.
        CloudExecError: no credentials or region.
        StorageError: the bucket cannot be written.
    """

    future_class = AWSBatchFuture
    array_future_class = AWSArrayFuture

    def __init__(
        self,
        job_queue: str,
        job_definition: str,
        io_bucket: str,
        *,
        session: Any = None,
        endpoint_url: str | None = None,
        max_workers: int | None = None,
        poll_interval_s: tuple[float, float] | None = None,
        retry_mode: str = "adaptive",
        max_api_attempts: int = 10,
        max_array_size: int = MAX_ARRAY_SIZE,
        **settings: Any,
    ) -> None:
        for name, value in (("job_queue", job_queue), ("job_definition", job_definition)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be an AWS Batch {name.replace('_', ' ')} name or ARN; got {value!r}")
        _check_io_bucket(io_bucket)
        if not 2 <= max_array_size <= MAX_ARRAY_SIZE:
            raise ValueError(f"max_array_size must be from 2 to {MAX_ARRAY_SIZE}; got {max_array_size!r}")
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise ImportError("AWSBatchExecutor needs boto3 and s3fs: pip install 'cloudexec[aws]'") from exc
        session = session or boto3.Session()
        retries: Any = {"mode": retry_mode, "total_max_attempts": max_api_attempts}
        config = Config(retries=retries)
        batch = session.client("batch", endpoint_url=endpoint_url, config=config)
        logs = session.client("logs", endpoint_url=endpoint_url, config=config)
        submitter = session.client(
            "batch", endpoint_url=endpoint_url, config=Config(retries={"mode": retry_mode, "total_max_attempts": 1})
        )
        provider = AWSBatchProvider(
            batch,
            logs,
            job_queue=job_queue,
            job_definition=job_definition,
            max_array_size=max_array_size,
            submitter=submitter,
            submit_attempts=max_api_attempts,
        )
        provider.check_environment()
        super().__init__(
            provider,
            io_bucket.rstrip("/"),
            storage_options=_s3fs_options(session, endpoint_url, retry_mode, max_api_attempts),
            max_workers=max_workers,
            poll_interval_s=poll_interval_s,
            **settings,
        )


def _s3fs_options(session: Any, endpoint_url: str | None, retry_mode: str, attempts: int) -> dict[str, Any]:
    """s3fs options that follow the boto3 session's credentials, region and endpoint.

    The keys are never copied: temporary credentials (STS, SSO, an instance role)
    rotate while the executor lives, and S3 calls must keep working as the Batch
    calls (made by the session's own clients) do. s3fs gets an aiobotocore session
    whose credentials ask the boto3 session's credential object each time, so
    botocore's own refresh logic serves both.
    """
    # botocore's retry mode handles S3's SlowDown/5xx and dropped connections; s3fs
    # adds its own few retries (S3FileSystem.retries) around reads on top.
    options: dict[str, Any] = {"config_kwargs": {"retries": {"mode": retry_mode, "max_attempts": attempts}}}
    creds = session.get_credentials()
    if creds is not None:
        options["session"] = _follower_session(creds)
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    elif session.region_name:
        client_kwargs["region_name"] = session.region_name
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _follower_session(credentials: Any) -> Any:
    """An aiobotocore session whose credentials are those of a boto3 session, refreshed as it refreshes them."""
    import asyncio

    from aiobotocore.credentials import AioCredentials
    from aiobotocore.session import AioSession
    from botocore.credentials import CredentialProvider, ReadOnlyCredentials

    class _FollowingCredentials(AioCredentials):
        """Asks the boto3 credential object for keys on every signature."""

        def __init__(self, source: Any) -> None:
            frozen = source.get_frozen_credentials()
            super().__init__(frozen.access_key, frozen.secret_key, frozen.token, method=source.method)
            self._source = source

        async def get_frozen_credentials(self) -> ReadOnlyCredentials:
            refresh_needed = getattr(self._source, "refresh_needed", None)
            if refresh_needed is not None and refresh_needed():
                # A refresh may call STS/SSO/IMDS synchronously: off the event loop.
                frozen = await asyncio.to_thread(self._source.get_frozen_credentials)
            else:
                frozen = self._source.get_frozen_credentials()
            # Keep the plain attributes current for the few readers that use them.
            self.access_key, self.secret_key, self.token = frozen.access_key, frozen.secret_key, frozen.token
            return frozen

    class _SessionProvider(CredentialProvider):
        # aiobotocore's resolver awaits load(); botocore's base class gives the rest.
        METHOD = "cloudexec-boto3-session"
        CANONICAL_NAME = "cloudexec-boto3-session"

        async def load(self) -> AioCredentials:
            return _FollowingCredentials(credentials)

    aio = AioSession()
    aio.get_component("credential_provider").insert_before("env", _SessionProvider())
    return aio
