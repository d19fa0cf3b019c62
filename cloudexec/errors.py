"""The cloudexec exception tree.

Everything cloudexec raises on its own account derives from `CloudExecError`.
User exceptions raised inside a job are re-raised on the client as their own
type, with the remote traceback attached as ``__cause__`` (as
``ProcessPoolExecutor`` does), so ``except ValueError`` keeps working.
Standard exceptions are reused where their meaning fits: ``CancelledError``,
``TimeoutError``, ``BrokenExecutor``, ``ValueError``/``TypeError`` for bad
arguments.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CloudExecError",
    "SubmissionError",
    "JobFailedError",
    "PayloadError",
    "VersionMismatchError",
    "StorageError",
    "JobNotFoundError",
    "JobUnreachableError",
    "IntegrityError",
    "RemoteTraceback",
    "RemoteError",
]


class CloudExecError(Exception):
    """Base class of every error cloudexec raises on its own account."""


class SubmissionError(CloudExecError):
    """The provider refused a job; nothing of it was left running.

    Attributes:
        job_id: the cloudexec job id that was being submitted.
        code: the provider's own error code (for example AWS's
            ``ClientException`` or Azure's ``PoolNotFound``), if it gave one.
    """

    def __init__(self, message: str, *, job_id: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.code = code


class JobFailedError(CloudExecError):
    """A job ended without producing a result (killed, out of memory, timed out, lost).

    The message names the job, its status, the provider's status reason, the
    exit code and how to read the job's log.

    Attributes:
        job_id: cloudexec job id (with ``[index]`` for an array child).
        status: the provider's status name, e.g. ``"FAILED"``.
        status_reason: the provider's reason, e.g.
            ``"OutOfMemoryError: Container killed due to memory usage"``.
        exit_code: the container's exit code, if known.
        log_tail: the last lines of the job's log, if it could be read.
    """

    def __init__(
        self,
        job_id: str,
        *,
        status: str | None,
        status_reason: str | None,
        exit_code: int | None,
        hint: str | None = None,
        log_tail: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.log_tail = log_tail
        self.status = status
        self.status_reason = status_reason
        self.exit_code = exit_code
        self.hint = hint
        parts = [
            f"job {job_id} ended without a result: status {status or 'unknown'}",
            f"reason: {status_reason or 'none given'}",
            f"exit code: {exit_code if exit_code is not None else 'unknown'}",
        ]
        message = "; ".join(parts) + "."
        if hint:
            message += " " + hint
        message += " Read its output with future.job_log and future.job_stderr_log."
        if log_tail:
            message += "\nLast lines of its log:\n" + log_tail
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_job_failed,
            (self.job_id, self.status, self.status_reason, self.exit_code, self.hint, self.log_tail),
        )


def _rebuild_job_failed(
    job_id: str,
    status: str | None,
    reason: str | None,
    exit_code: int | None,
    hint: str | None,
    log_tail: str | None = None,
) -> JobFailedError:
    return JobFailedError(
        job_id, status=status, status_reason=reason, exit_code=exit_code, hint=hint, log_tail=log_tail
    )


class PayloadError(CloudExecError, TypeError):
    """A call or result could not be serialized or deserialized."""


class VersionMismatchError(CloudExecError):
    """The client and the runner run different Python minor versions.

    dill pickles are not portable across Python minor versions, so instead of
    an obscure unpickling failure cloudexec stops with both versions named.
    """


class StorageError(CloudExecError):
    """The job storage (bucket, container or folder) is unreachable or unusable."""


class JobNotFoundError(CloudExecError, LookupError):
    """No job with that id is known to the storage or the provider."""


class JobUnreachableError(CloudExecError):
    """cloudexec gave up learning what became of a job: the provider or the storage kept failing.

    The job itself may still run or have finished: only this client could
    not find out. The message names the job, the last error and what to do.

    Attributes:
        job_id: cloudexec job id (with ``[index]`` for an array child).
        reason: the last error, as text.
        failures: failed attempts in a row.
        waited_s: seconds from the first to the last failed attempt.
    """

    def __init__(self, job_id: str, *, reason: str, failures: int, waited_s: float) -> None:
        self.job_id = job_id
        self.reason = reason
        self.failures = failures
        self.waited_s = waited_s
        base = job_id.split("[", 1)[0]
        super().__init__(
            f"gave up following job {job_id} after {failures} failed attempts in a row over {waited_s:.0f} s to "
            f"learn its state; last error: {reason}. The job may still be running or have finished at the "
            "provider. Fix the cause (credentials, permissions, network, the storage's access rules), then get "
            f"its future back with executor.attach({base!r}); a longer give_up_s= rides out longer outages."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unreachable, (self.job_id, self.reason, self.failures, self.waited_s))


def _rebuild_unreachable(job_id: str, reason: str, failures: int, waited_s: float) -> JobUnreachableError:
    return JobUnreachableError(job_id, reason=reason, failures=failures, waited_s=waited_s)


class IntegrityError(CloudExecError):
    """A stored object failed signature verification and was not unpickled.

    Raised for a call, input slice, result or manifest that is unsigned,
    tampered with, truncated, signed with another key, or copied from another
    job or array child. Nothing of the object was deserialised.

    Attributes:
        job_id: the job the object belongs to (``<id>[<index>]`` for a child).
        what: which object, e.g. ``"result results/0000003.pkl"``.
    """

    def __init__(self, message: str, *, job_id: str | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_integrity, (str(self), self.job_id, self.what))


def _rebuild_integrity(message: str, job_id: str | None, what: str | None) -> IntegrityError:
    return IntegrityError(message, job_id=job_id, what=what)


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised inside a job.

    Attached as ``__cause__`` of the re-raised exception, so that printing it
    shows where in the remote call things went wrong.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(CloudExecError):
    """Stands in for a remote exception that could not be pickled or unpickled.

    Attributes:
        type_name: qualified name of the original exception type.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message))
