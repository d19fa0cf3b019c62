"""The AWS Batch emulator's job model: what a job is and how it renders as JSON.

No locking and no threads here: :class:`~cloudexec.testing._aws_batch_scheduler.JobScheduler`
owns every :class:`Job` and holds its lock while it changes or renders one. Like
moto's ``models.py``, each job renders its own wire form (:meth:`Job.describe`,
:meth:`Job.summarize`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudexec.testing._aws_batch_node import Attempt

__all__ = ["ApiError", "Job", "JobSpec", "build_spec", "client_error", "job_id_from", "now_ms"]

STATUSES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
NOT_STARTED = frozenset({"SUBMITTED", "PENDING", "RUNNABLE"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED"})

# Status reasons as AWS Batch words them.
REASON_EXITED = "Essential container in task exited"
REASON_OOM = "OutOfMemoryError: Container killed due to memory usage"
REASON_TIMEOUT = "Job attempt duration exceeded timeout"
REASON_CHILD_FAILED = "Array Child Job failed"
REASON_DEPENDENCY_FAILED = "Dependent Job failed"
REASON_OVERRIDES_TOO_LONG = "Container Overrides length must be at most 8192"

LOG_GROUP = "/aws/batch/job"
MAX_ARRAY_SIZE = 10_000
# ECS refuses container overrides longer than this; AWS then fails the job.
MAX_OVERRIDES_CHARS = 8192


class ApiError(Exception):
    """A Batch API error answered to the client."""

    def __init__(self, message: str, code: str = "ClientException", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def client_error(message: str) -> ApiError:
    """Returns a ``ClientException`` worded as AWS words them."""
    # AWS wraps ClientException messages this way ("Error executing request,
    # Exception : Maximum number of jobs supported is 100 ., RequestId: ...").
    return ApiError(f"Error executing request, Exception : {message}, RequestId: {uuid.uuid4()}")


def job_id_from(identifier: str) -> str:
    """Returns the job id of a job id or job ARN (DescribeJobs and friends take both)."""
    return identifier.split(":job/", 1)[1] if ":job/" in identifier else identifier


@dataclass(frozen=True)
class JobSpec:
    """What every attempt of a job (and every child of an array) runs with; shared."""

    job_name: str
    queue_arn: str
    queue_name: str
    ce_name: str
    definition_arn: str
    definition_name: str
    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    vcpus: float
    memory_mib: int | None
    max_attempts: int
    evaluate_on_exit: tuple[dict[str, str], ...]
    attempt_timeout_s: float | None
    container: dict[str, Any]
    retry_strategy: dict[str, Any] | None
    timeout: dict[str, Any] | None
    parameters: dict[str, str]
    tags: dict[str, str]
    propagate_tags: bool
    platform_capabilities: list[str]
    overrides_chars: int
    scheduling_priority: int | None = None
    share_identifier: str | None = None


def build_spec(
    name: str,
    request: Mapping[str, Any],
    overrides: Mapping[str, Any],
    definition: Mapping[str, Any],
    queue: Mapping[str, Any],
    timeout_scale: float,
) -> JobSpec:
    container = dict(definition["container"])
    parameters = {**definition["parameters"], **(request.get("parameters") or {})}
    command = overrides["command"] if "command" in overrides else container.get("command") or []
    command = _substitute(list(command), parameters)

    environment = {e["name"]: e.get("value", "") for e in container.get("environment") or []}
    environment.update({e["name"]: e.get("value", "") for e in overrides.get("environment") or []})

    requirements = {r["type"]: r for r in container.get("resourceRequirements") or []}
    requirements.update({r["type"]: r for r in overrides.get("resourceRequirements") or []})
    if "VCPU" in requirements:
        vcpus = float(requirements["VCPU"]["value"])
    else:
        vcpus = float(overrides.get("vcpus", container.get("vcpus", 1)))
    if "MEMORY" in requirements:
        memory: int | None = int(requirements["MEMORY"]["value"])
    else:
        legacy = overrides.get("memory", container.get("memory"))
        memory = int(legacy) if legacy is not None else None

    retry = request.get("retryStrategy") or definition["retryStrategy"]
    timeout = request.get("timeout") or definition["timeout"]
    duration = (timeout or {}).get("attemptDurationSeconds")

    container["command"] = command
    container["environment"] = [{"name": k, "value": v} for k, v in environment.items()]
    container["resourceRequirements"] = list(requirements.values())
    for legacy_key in ("vcpus", "memory", "instanceType"):
        if legacy_key in overrides:
            container[legacy_key] = overrides[legacy_key]
    return JobSpec(
        job_name=name,
        queue_arn=queue["arn"],
        queue_name=queue["name"],
        ce_name=queue["ce_name"],
        definition_arn=definition["arn"],
        definition_name=definition["name"],
        argv=tuple(str(a) for a in command),
        environment=tuple(environment.items()),
        vcpus=vcpus,
        memory_mib=memory,
        max_attempts=int((retry or {}).get("attempts", 1)),
        evaluate_on_exit=tuple((retry or {}).get("evaluateOnExit") or ()),
        attempt_timeout_s=duration * timeout_scale if duration else None,
        container=container,
        retry_strategy=retry,
        timeout=timeout,
        parameters=parameters,
        tags=dict(request.get("tags") or {}),
        propagate_tags=bool(request.get("propagateTags", definition["propagateTags"])),
        platform_capabilities=definition["platformCapabilities"],
        overrides_chars=len(json.dumps(dict(overrides), separators=(",", ":"))) if overrides else 0,
        scheduling_priority=request.get("schedulingPriorityOverride"),
        share_identifier=request.get("shareIdentifier"),
    )


def _substitute(command: list[str], parameters: Mapping[str, str]) -> list[str]:
    """Replaces ``Ref::name`` placeholders, as AWS does with job parameters."""
    if not parameters:
        return command
    # Longest names first so Ref::ab is not eaten by Ref::a.
    names = sorted(parameters, key=len, reverse=True)
    out = []
    for arg in command:
        for key in names:
            arg = arg.replace(f"Ref::{key}", str(parameters[key]))
        out.append(arg)
    return out




class Job:
    """Mutable state of one job (a plain job, an array parent or an array child)."""

    __slots__ = (
        "seq",
        "job_id",
        "arn",
        "spec",
        "created_ms",
        "status",
        "token",
        "status_reason",
        "started_ms",
        "stopped_ms",
        "attempts",
        "attempts_started",
        "exit_code",
        "container_reason",
        "log_stream",
        "task_arn",
        "instance_arn",
        "parent",
        "index",
        "children",
        "summary",
        "done",
        "failed",
        "stop_reason",
        "depends_on",
        "waiting",
        "dependents",
        "dependency_failed",
        "dwell_done",
        "attempt",
        "holds_vcpus",
        "running_since",
        "outcome",
        "is_cancelled",
        "is_terminated",
        "expired",
    )

    def __init__(
        self,
        *,
        seq: int,
        job_id: str,
        arn: str,
        spec: JobSpec,
        created_ms: int,
        status: str,
        parent: Job | None = None,
        index: int | None = None,
    ) -> None:
        self.seq = seq
        self.job_id = job_id
        self.arn = arn
        self.spec = spec
        self.created_ms = created_ms
        self.status = status
        # Bumped on every status change; timers and queue entries carry the token they
        # were made with, so stale ones are recognised and dropped.
        self.token = 0
        self.status_reason: str | None = None
        self.started_ms: int | None = None
        self.stopped_ms: int | None = None
        self.attempts: list[dict[str, Any]] = []
        self.attempts_started = 0
        self.exit_code: int | None = None
        self.container_reason: str | None = None
        self.log_stream: str | None = None
        self.task_arn: str | None = None
        self.instance_arn: str | None = None
        self.parent = parent
        self.index = index
        self.children: list[Job] | None = None
        self.summary: dict[str, int] | None = None
        self.done = 0
        self.failed = 0
        self.stop_reason: str | None = None
        self.depends_on: list[dict[str, Any]] = []
        self.waiting = 0
        self.dependents: list[Job] = []
        self.dependency_failed = False
        self.dwell_done = False
        self.attempt: Attempt | None = None
        self.holds_vcpus = False
        self.running_since = 0.0
        # (final status or "RETRY", status reason) once an attempt ended but the
        # RUNNING dwell has not elapsed yet.
        self.outcome: tuple[str, str | None] | None = None
        self.is_cancelled = False
        self.is_terminated = False
        self.expired = False

    def describe(self) -> dict[str, Any]:
        """Renders this job as one DescribeJobs entry."""
        job = self
        spec = job.spec
        detail: dict[str, Any] = {
            "jobArn": job.arn,
            "jobName": spec.job_name,
            "jobId": job.job_id,
            "jobQueue": spec.queue_arn,
            "status": job.status,
            "attempts": list(job.attempts),
            "createdAt": job.created_ms,
            "dependsOn": job.depends_on,
            "jobDefinition": spec.definition_arn,
            "parameters": spec.parameters,
            "propagateTags": spec.propagate_tags,
            "platformCapabilities": spec.platform_capabilities,
            "isCancelled": job.is_cancelled,
            "isTerminated": job.is_terminated,
        }
        if spec.retry_strategy:
            detail["retryStrategy"] = spec.retry_strategy
        if spec.timeout:
            detail["timeout"] = spec.timeout
        if spec.tags and job.parent is None:
            detail["tags"] = spec.tags
        if spec.scheduling_priority is not None:
            detail["schedulingPriority"] = spec.scheduling_priority
        if spec.share_identifier is not None:
            detail["shareIdentifier"] = spec.share_identifier
        if job.status_reason is not None:
            detail["statusReason"] = job.status_reason
        if job.started_ms is not None:
            detail["startedAt"] = job.started_ms
        if job.stopped_ms is not None:
            detail["stoppedAt"] = job.stopped_ms
        container = dict(spec.container)
        if job.exit_code is not None:
            container["exitCode"] = job.exit_code
        if job.container_reason is not None:
            container["reason"] = job.container_reason
        if job.log_stream is not None:
            container["logStreamName"] = job.log_stream
            container["taskArn"] = job.task_arn
            container["containerInstanceArn"] = job.instance_arn
            container["networkInterfaces"] = []
        detail["container"] = container
        if job.children is not None:
            assert job.summary is not None
            detail["arrayProperties"] = {"statusSummary": dict(job.summary), "size": len(job.children)}
        elif job.index is not None:
            detail["arrayProperties"] = {"index": job.index}
        return detail

    def summarize(self) -> dict[str, Any]:
        """Renders this job as one ListJobs ``jobSummaryList`` entry."""
        job = self
        summary: dict[str, Any] = {
            "jobArn": job.arn,
            "jobId": job.job_id,
            "jobName": job.spec.job_name,
            "createdAt": job.created_ms,
            "status": job.status,
            "jobDefinition": job.spec.definition_arn,
            "isCancelled": job.is_cancelled,
            "isTerminated": job.is_terminated,
        }
        if job.status_reason is not None:
            summary["statusReason"] = job.status_reason
        if job.started_ms is not None:
            summary["startedAt"] = job.started_ms
        if job.stopped_ms is not None:
            summary["stoppedAt"] = job.stopped_ms
        container: dict[str, Any] = {}
        if job.exit_code is not None:
            container["exitCode"] = job.exit_code
        if job.container_reason is not None:
            container["reason"] = job.container_reason
        if container:
            summary["container"] = container
        if job.children is not None:
            summary["arrayProperties"] = {"size": len(job.children)}
        elif job.index is not None:
            summary["arrayProperties"] = {"index": job.index}
        return summary


def now_ms() -> int:
    return int(time.time() * 1000)

def filter_matches(job: Job, flt: Mapping[str, Any]) -> bool:
    name = flt.get("name")
    values = [str(v) for v in flt.get("values") or []]
    if name == "JOB_NAME":
        # Case-insensitive; a trailing * matches a prefix.
        return any(_prefix_match(job.spec.job_name.lower(), v.lower()) for v in values)
    if name == "JOB_DEFINITION":
        arn = job.spec.definition_arn
        names = {arn, job.spec.definition_name, arn.split("/", 1)[-1]}
        return any(_prefix_match(n, v) for v in values for n in names)
    if name in ("BEFORE_CREATED_AT", "AFTER_CREATED_AT"):
        try:
            bound = int(values[0])
        except (IndexError, ValueError):
            return False
        return job.created_ms < bound if name == "BEFORE_CREATED_AT" else job.created_ms > bound
    return True


def _prefix_match(text: str, pattern: str) -> bool:
    return text.startswith(pattern[:-1]) if pattern.endswith("*") else text == pattern


def should_retry(
    conditions: Iterable[Mapping[str, str]], status_reason: str, reason: str | None, exit_code: int | None
) -> bool:
    """Applies ``retryStrategy.evaluateOnExit``: the first matching entry decides.

    AWS: "If none of the EvaluateOnExit conditions in a RetryStrategy match, then the
    job is retried."
    """
    for condition in conditions:
        checks = (
            ("onStatusReason", status_reason),
            ("onReason", reason or ""),
            ("onExitCode", "" if exit_code is None else str(exit_code)),
        )
        if all(_prefix_match(value, condition[key]) for key, value in checks if key in condition):
            return str(condition.get("action", "RETRY")).upper() == "RETRY"
    return True
