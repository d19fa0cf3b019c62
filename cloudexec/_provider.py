"""The seam where a batch service plugs into `BatchExecutor`.

A provider is a small object that speaks one service's API. The generic
executor (`cloudexec._base`) knows nothing of AWS or Azure: it writes a
job's call to storage, hands the provider a `JobSpec` to submit, asks it about
many jobs per call with `Provider.describe`, and turns the answers
(`JobInfo`) into future states. A provider implements:

====================  ======================================================
``submit``            start one job (single, or array of ``spec.array_size``)
``describe``          status of many jobs in one go (bulk API calls)
``describe_children`` status of every child of one array job
``cancel``            cancel/terminate a job or one array child
``read_log``          a job's stdout or stderr
``status_enum``       its `JobStatus` table: native state names → `Phase`
====================  ======================================================

A provider whose service can hold a job until others succeeded (futures passed
as arguments) lists the `Dependency` kinds it honours in ``dependency_kinds``
and finds them in ``spec.depends_on``; the core refuses a dependent call on a
provider that lists none, rather than wait for the upstream in the client.

A provider that sees its jobs change as it happens (its own local processes)
may say so through ``watch``: the executor then polls at once rather than at
its next pause. A cloud service is polled; the default does nothing.

Missing verbs fail at construction (``abc``), never at first call.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from cloudexec.settings import COMMON_SETTINGS, JobSettings, Validator

_T = TypeVar("_T")

__all__ = ["Phase", "JobStatus", "Dependency", "JobSpec", "JobInfo", "Provider", "CannotHold", "CapacityReached"]


class Phase(enum.Enum):
    """Where a job is in its life, whatever the provider calls it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended."""
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class JobStatus(str, enum.Enum):
    """Base of each provider's status enum.

    Members keep the provider's own state names as their values (so
    ``AWSJobStatus.RUNNABLE == "RUNNABLE"``) and carry the generic `Phase`.
    Declare members as ``NAME = ("ProviderName", Phase.X)``.
    """

    phase: Phase

    def __new__(cls, value: str, phase: Phase) -> JobStatus:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.phase = phase
        return obj

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, value: str) -> Any:
        """The member whose provider state name is ``value`` (ValueError if none)."""
        member = cls._value2member_map_.get(value)
        if member is None:
            raise ValueError(f"{value!r} is not a {cls.__name__}; known: {', '.join(m.value for m in cls)}")
        return member

    @property
    def terminal(self) -> bool:
        """Whether this status ends the job."""
        return self.phase.terminal


@dataclass(frozen=True)
class Dependency:
    """One job that must succeed before a submitted job may start.

    Attributes:
        kind: ``"job"``: wait for the job ``ref`` (or its child ``index``) to
            succeed; ``"n_to_n"``: array child i waits for child i of the
            array ``ref`` (same size); ``"sequential"``: array child i waits
            for child i-1 of the same array (``ref`` is ``None``).
        ref: the provider's reference of the upstream job (what its
            ``submit`` returned), ``None`` for ``"sequential"``.
        job_id: cloudexec's id of the upstream job (for messages).
        index: ``"job"`` only: the upstream array's child to wait for;
            ``None`` waits for the whole job (every child of an array).
    """

    kind: str
    ref: str | None = None
    job_id: str | None = None
    index: int | None = None

    def waits(self, own: Sequence[_T], upstream: Sequence[_T]) -> list[list[_T]]:
        """For a service that runs dependencies itself: what each of ``own`` (the job's
        tasks, in index order) waits for among ``upstream`` (the upstream job's tasks;
        ignored for ``"sequential"``, whose tasks wait for their own predecessor)."""
        if self.kind == "sequential":
            return [[]] + [[before] for before in own[:-1]]
        if self.kind == "n_to_n":
            return [[upstream[k]] for k in range(len(own))]
        if self.index is not None:
            return [[upstream[self.index]] for _ in own]
        return [list(upstream) for _ in own]


class CannotHold(Exception):
    """Raised by `Provider.submit`: the service cannot hold this job for its dependencies (now).

    Nothing of the job may be left at the provider. The executor then keeps
    the job in the client until its upstream jobs ended, and submits it
    again without dependencies (or fails it, naming the upstream job).
    """


#: Every `Dependency.kind`.
DEPENDENCY_KINDS = frozenset({"job", "n_to_n", "sequential"})


@dataclass(frozen=True)
class JobSpec:
    """Everything a provider needs to submit one job.

    Attributes:
        job_id: cloudexec's id of the job, unique, usable as a name by every
            provider (letters, digits, ``-``).
        job_url: storage URL of the job's prefix; the runner gets it as its
            argument.
        name: human-readable name derived from the function (providers
            sanitise it further to their rules).
        settings: validated, merged job settings.
        array_size: number of children for an array job, ``None`` for a
            single job.
        command: the runner's argv inside the container (``python -m
            cloudexec.runner <job_url>`` plus ``--array`` for arrays).
        environment: extra environment variables for the runner.
        depends_on: jobs that must succeed before this one starts; the
            provider makes its service hold the job (and fail it, naming the
            upstream job, when one of them fails). Only kinds the provider
            lists in ``dependency_kinds`` are ever given.
    """

    job_id: str
    job_url: str
    name: str
    settings: JobSettings
    array_size: int | None
    command: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[Dependency, ...] = ()


@dataclass
class JobInfo:
    """What a provider knows about a job (or an array child) right now.

    Any field the provider no longer knows (metadata expired) is ``None``.

    Attributes:
        status: the provider's status (a member of its `JobStatus` enum).
        exit_code: the container's exit code, once known.
        status_reason: the provider's explanation of the current status.
        provider_job_id: the provider's id for this job or child.
        attempts: attempts made so far.
        status_counts: arrays only: children per status name.
        extra: provider-specific properties (``provider_task_id``, log
            stream names, …), merged into ``future.properties()``.
    """

    status: JobStatus | None = None
    exit_code: int | None = None
    status_reason: str | None = None
    provider_job_id: str | None = None
    attempts: int | None = None
    status_counts: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """Whether the status ends the job."""
        return self.status is not None and self.status.terminal


class CapacityReached(Exception):
    """Raised by `Provider.submit`: the service takes no more jobs *now* (a quota of active jobs).

    Not an error of the job: the executor keeps it queued, its future reads
    ``status_reason`` as the ``reason`` given here, and it is submitted again
    once one of the executor's jobs ended, or after ``retry_after_s``
    (other clients' jobs may free the quota too). Nothing of the job may be
    left at the provider when this is raised.

    Args:
        reason: what the job waits for, as a future's status reason
            (``"waiting for … quota (12 active)"``).
        retry_after_s: longest pause before submitting again.
    """

    def __init__(self, reason: str, *, retry_after_s: float = 15.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Provider(ABC):
    """One batch service. Subclass it and implement the abstract verbs.

    Class attributes:
        name: short name used in manifests (``"local"``, a cloud service's short name).
        status_enum: the provider's `JobStatus` subclass.
        settings: job settings it honours, of those `cloudexec.settings` defines
            (a superset of the common ones).
        provider_settings: settings only this provider honours, by name, with
            their validators (``{"share_identifier": non_empty_str}``); the
            core merges them into the settings users may give, and their
            values reach `submit` in ``spec.settings.extra``.
        max_array_size: the largest array one ``submit`` takes (``None``: no limit).
        poll_interval_s: (first, longest) pause between polls; the poller backs
            off from the first to the longest while nothing changes.
        default_max_workers: jobs in flight when ``max_workers`` is not given.
        dependency_kinds: the `Dependency` kinds its service enforces (empty:
            futures cannot be passed as arguments of this provider's jobs).
        max_dependencies: most dependencies one job may have (``None``: no limit).
    """

    name: ClassVar[str]
    status_enum: ClassVar[type[JobStatus]]
    settings: ClassVar[frozenset[str]] = COMMON_SETTINGS
    provider_settings: ClassVar[Mapping[str, Validator]] = {}
    poll_interval_s: ClassVar[tuple[float, float]] = (1.0, 15.0)
    default_max_workers: ClassVar[int] = 1000
    dependency_kinds: ClassVar[frozenset[str]] = frozenset()
    max_dependencies: ClassVar[int | None] = None

    def validate_settings(self, settings: JobSettings) -> None:
        """Reject settings this provider cannot honour (ValueError/TypeError).

        Called once per `with_settings`/construction, before anything is
        submitted. The default accepts everything `settings` lists.
        """

    def command_for(self, job_url: str, *, array: bool) -> tuple[str, ...]:
        """The runner command line to run inside the provider's container.

        The runner knows no service: a provider whose array children find
        their index in a variable of its own adds ``--index-env NAME`` (and
        ``--index-base N`` when child 0 is not ``0``); one that keeps logs in
        places of its own adds ``--capture-output module:callable``. See
        `cloudexec.runner`.
        """
        cmd = ("python", "-m", "cloudexec.runner", job_url)
        return cmd + ("--array",) if array else cmd

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change()`` (from any thread, holding no lock) when a job's state changed.

        For a provider that learns of changes as they happen (its own
        processes ending): the executor then polls at once instead of at its
        next pause, so a result is delivered without waiting for a poll.
        Optional: a cloud service is polled. Default: nothing.
        """

    def at_exit(self) -> None:
        """The interpreter exits without ``shutdown()``; the jobs handed over go on.

        Release what would otherwise outlive them for nothing (Azure: let the
        executor's shared job complete after its last task). Called once,
        after the queued jobs were handed over. Default: nothing.
        """

    @abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Submit a job; return an opaque reference to it (stored in the manifest).

        Raises:
            CannotHold: ``spec.depends_on`` asks for a hold the service cannot
                give this job (the executor holds it in the client instead).
            SubmissionError: the provider refused the job, with its code; nothing
                of it is left queued or running.
            CapacityReached: the service takes no more jobs until some end (a
                quota); the executor holds the job and submits it again later.
        """

    @abstractmethod
    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        """Describe many jobs with as few API calls as the service allows.

        A job whose metadata the provider no longer has is left out of the
        result (never an exception).
        """

    @abstractmethod
    def describe_children(self, ref: str, size: int) -> list[JobInfo | None]:
        """Describe every child of an array job, in index order (``None`` if unknown)."""

    def describe_child(self, ref: str, size: int, index: int) -> JobInfo | None:
        """Describe one child of an array job (default: via `describe_children`)."""
        children = self.describe_children(ref, size)
        return children[index] if index < len(children) else None

    @abstractmethod
    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        """Cancel or terminate a job (or one array child when ``index`` is given).

        Must not raise for a job that already ended.
        """

    @abstractmethod
    def read_log(self, ref: str, *, index: int | None = None, stream: str = "stdout") -> str | None:
        """Return a job's (or array child's) console log, ``None`` if unavailable.

        Args:
            stream: ``"stdout"`` or ``"stderr"``. Providers that keep both in one
                log (AWS CloudWatch) return it for ``"stdout"`` and ``None``
                for ``"stderr"``.
        """

    def find_job_url(self, provider_job_id: str) -> str | None:
        """Map a provider job id to the job's storage URL, for re-attach (``None`` if unknown)."""
        return None

    def failure_hint(self, info: JobInfo) -> str | None:
        """Advice for a `JobFailedError` about a job that ended like ``info``."""
        reason = (info.status_reason or "").lower()
        if "outofmemory" in reason or "out of memory" in reason or "memory usage" in reason:
            return "The job ran out of memory: ask for more with executor.with_settings(memory='8 GiB')."
        if "timeout" in reason or "wall clock" in reason or "duration exceeded" in reason:
            return "The job ran past its time limit: raise it with executor.with_settings(timeout=...)."
        return None

    def close(self) -> None:
        """Release clients, threads and processes. Called once, at shutdown."""

    def __reduce__(self) -> Any:
        # A provider holds SDK clients and credentials (Azure's named-key
        # credential carries the account key): it must never reach a payload.
        raise TypeError(
            f"the {self.name} provider holds service clients and credentials and cannot be pickled: a call "
            "that refers to an executor, its provider or a future would carry them into storage. Pass plain "
            "values (the data a job needs) instead."
        )
