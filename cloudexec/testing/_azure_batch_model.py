"""State of the local Azure Batch service: jobs, tasks, and the values they carry.

Everything here is plain data plus small pure helpers (ISO 8601 durations, UTC
timestamps, ETags, id validation). The HTTP layer (``_azure_batch_service``) and
the compute node that runs processes (``_azure_batch_node``) share one
:class:`BatchStore` and mutate it only while holding ``BatchStore.lock``.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import IO, Any

from cloudexec._process import Process

__all__ = [
    "BatchServiceError",
    "BatchStore",
    "JobRecord",
    "TaskRecord",
    "format_time",
    "parse_duration_s",
    "utc_now",
    "validate_id",
]

# What the service reports for "no limit" — .NET's TimeSpan.MaxValue, which is
# what real Azure Batch returns for an unset maxWallClockTime.
UNLIMITED_DURATION = "P10675199DT2H48M5.4775807S"
# Azure's default task retention time (7 days).
DEFAULT_RETENTION = "P7D"

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DURATION_RE = re.compile(
    r"^P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


class BatchServiceError(Exception):
    """An error the service answers with, in Azure Batch's JSON error shape.

    Args:
        status: HTTP status code (azure-core maps 401, 404 and 409 to typed errors).
        code: Azure Batch error code, e.g. ``"JobNotFound"``.
        message: Human-readable message (the ``message.value`` field).
        values: Extra ``{"key": ..., "value": ...}`` detail pairs.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        values: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = dict(values or {})

    def to_json(self) -> dict[str, Any]:
        """Return the error body the way Azure Batch serialises it."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": {"lang": "en-US", "value": self.message},
        }
        if self.values:
            body["values"] = [{"key": k, "value": v} for k, v in self.values.items()]
        return body


def utc_now() -> dt.datetime:
    """Return the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.timezone.utc)


def format_time(value: dt.datetime) -> str:
    """Format a datetime as the RFC 3339 string Azure Batch puts in bodies."""
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_duration_s(text: str, *, field_name: str) -> float:
    """Parse an ISO 8601 duration such as ``PT1.5S`` or ``P1DT2H`` into seconds.

    Years and months are refused, as Azure Batch (a .NET TimeSpan) refuses them.

    Args:
        text: The duration string from the request body.
        field_name: Property name used in the error if the value is malformed.

    Returns:
        The duration in seconds.

    Raises:
        BatchServiceError: 400 ``InvalidPropertyValue`` when the text is not a
            day/time ISO 8601 duration.
    """
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise BatchServiceError(
            400,
            "InvalidPropertyValue",
            f"The value provided for {field_name} is invalid.",
            {
                "PropertyName": field_name,
                "PropertyValue": str(text),
                "Reason": "Expected an ISO 8601 duration such as PT30S or P1DT2H",
            },
        )
    factors = {"weeks": 604800.0, "days": 86400.0, "hours": 3600.0, "minutes": 60.0, "seconds": 1.0}
    return sum(float(v) * factors[k] for k, v in match.groupdict().items() if v)


def validate_id(value: Any, *, kind: str) -> str:
    """Check a job or task id against Azure's rule (1-64 of ``[A-Za-z0-9_-]``).

    Args:
        value: The ``id`` property from the request body.
        kind: ``"job"`` or ``"task"``, for the error message.

    Returns:
        The id unchanged.

    Raises:
        BatchServiceError: 400 ``MissingRequiredProperty`` or ``InvalidPropertyValue``.
    """
    if value is None:
        raise BatchServiceError(
            400, "MissingRequiredProperty", "A required property was not specified in the request body.",
            {"PropertyName": "id"},
        )
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BatchServiceError(
            400,
            "InvalidPropertyValue",
            f"The {kind} id is invalid.",
            {
                "PropertyName": "id",
                "PropertyValue": str(value),
                "Reason": "An id contains 1-64 letters, digits, hyphens and underscores",
            },
        )
    return value


class _StateMachine:
    """Azure's state bookkeeping shared by jobs and tasks (the fields live in the dataclasses)."""

    state: str
    state_transition_time: dt.datetime
    previous_state: str | None
    previous_state_transition_time: dt.datetime | None

    def set_state(self, state: str, when: dt.datetime) -> None:
        """Move to ``state``, keeping Azure's previous-state fields up to date."""
        if state == self.state:
            return
        self.previous_state = self.state
        self.previous_state_transition_time = self.state_transition_time
        self.state = state
        self.state_transition_time = when


@dataclass(eq=False)
class TaskRecord(_StateMachine):
    """One task as the service and the node see it.

    Fields up to ``result`` are what the REST API reports; the rest is the
    node's bookkeeping for the running process.
    """

    job: JobRecord
    id: str
    seq: int
    spec: dict[str, Any]
    creation_time: dt.datetime
    etag: str
    required_slots: int
    max_task_retry_count: int
    max_wall_clock_s: float | None
    state: str = "active"
    state_transition_time: dt.datetime = field(default_factory=utc_now)
    previous_state: str | None = None
    previous_state_transition_time: dt.datetime | None = None
    last_modified: dt.datetime = field(default_factory=utc_now)
    retry_count: int = 0
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    last_retry_time: dt.datetime | None = None
    exit_code: int | None = None
    failure_info: dict[str, Any] | None = None
    result: str | None = None
    ran_on_node: bool = False
    # Node bookkeeping, never serialised.
    queued: bool = False
    proc: Process | None = None
    pidfd: int | None = None
    log_files: list[IO[bytes]] = field(default_factory=list)
    deadline_mono: float | None = None
    kill_reason: str | None = None
    kill_sent_mono: float | None = None
    killed_hard: bool = False


@dataclass(eq=False)
class JobRecord(_StateMachine):
    """One job: its settings, its state and its tasks (keyed by lower-cased id)."""

    id: str
    seq: int
    spec: dict[str, Any]
    pool_id: str | None
    creation_time: dt.datetime
    etag: str
    priority: int
    max_task_retry_count: int
    max_wall_clock_s: float | None
    deadline_mono: float | None
    on_all_tasks_complete: str
    max_parallel_tasks: int
    uses_task_dependencies: bool = False
    state: str = "active"
    state_transition_time: dt.datetime = field(default_factory=utc_now)
    previous_state: str | None = None
    previous_state_transition_time: dt.datetime | None = None
    last_modified: dt.datetime = field(default_factory=utc_now)
    end_time: dt.datetime | None = None
    terminate_reason: str | None = None
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    queue: collections.deque[TaskRecord] = field(default_factory=collections.deque)
    running: int = 0


class BatchStore:
    """All jobs of the emulated account, guarded by one re-entrant lock.

    A single lock keeps the model simple: requests and the node's scheduling
    pass are short, and nothing slow (process start aside) happens under it.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.jobs: dict[str, JobRecord] = {}
        self._seq = itertools.count(1)
        self._etag = itertools.count(1)

    def next_seq(self) -> int:
        """Return a fresh, increasing sequence number (creation order)."""
        return next(self._seq)

    def new_etag(self) -> str:
        """Return a fresh ETag in Azure's ``0x8D...`` style."""
        return f"0x8DC{next(self._etag):013X}"

    def get_job(self, job_id: str) -> JobRecord:
        """Return a job by id (case-insensitive, as in Azure).

        Raises:
            BatchServiceError: 404 ``JobNotFound``.
        """
        job = self.jobs.get(job_id.lower())
        if job is None:
            raise BatchServiceError(404, "JobNotFound", "The specified job does not exist.")
        return job

    def get_task(self, job_id: str, task_id: str) -> TaskRecord:
        """Return a task by job and task id (both case-insensitive).

        Raises:
            BatchServiceError: 404 ``JobNotFound`` or ``TaskNotFound``.
        """
        task = self.get_job(job_id).tasks.get(task_id.lower())
        if task is None:
            raise BatchServiceError(404, "TaskNotFound", "The specified task does not exist.")
        return task
