"""Task dependencies in the Azure Batch emulator: what a task may ask for, and when it may run.

As on Azure Batch (REST reference, "Add Task": ``dependsOn``, ``exitConditions``):

- only a job created with ``usesTaskDependencies: true`` takes tasks with
  ``dependsOn`` or a ``dependencyAction`` (else ``409
  TaskDependenciesNotSpecifiedOnJob``); the property cannot be changed later;
- ``dependsOn.taskIds`` (at most 64,000 characters together, else ``400
  TaskDependencyListTooLong``) and ``dependsOn.taskIdRanges`` (inclusive
  ``start``..``end`` over integer task ids) name tasks of the same job;
- a dependent stays ``active`` until every task it names completed and the
  ``dependencyAction`` of how that task ended is ``satisfy``. By default that
  is ``satisfy`` for exit code 0 and ``block`` for any other end: a dependent
  of a failed task is never scheduled (it stays ``active``);
- the ``exitOptions`` that apply to a completed task are those of its exit
  code in ``exitConditions.exitCodes``, else of a matching
  ``exitCodeRanges`` entry, else ``exitConditions.default``;
- ``exitOptions.jobAction`` (``none`` or ``terminate``; ``disable`` is not
  emulated) is allowed only in a job whose ``onTaskFailure`` is
  ``performexitoptionsjobaction`` (else ``400 InvalidPropertyValue``). In such
  a job a task that fails takes its ``jobAction``, by default ``terminate``
  (``none`` for exit code 0): the job is terminated with ``terminateReason``
  ``TaskFailed`` and its queued tasks never run.

A task id that does not exist (yet) keeps its dependents waiting; ids in a
range that no task has are not waited for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudexec.testing._azure_batch_model import BatchServiceError, JobRecord, TaskRecord

__all__ = ["validate", "dependency_action", "job_action", "waiting"]

#: Most characters ``dependsOn.taskIds`` may hold together.
MAX_TASK_IDS_CHARS = 64_000
_ACTIONS = ("satisfy", "block")
_JOB_ACTIONS = ("none", "terminate")
#: The job's ``onTaskFailure`` under which a failed task's ``jobAction`` is carried out.
PERFORM_JOB_ACTION = "performexitoptionsjobaction"
_EXIT_OPTION_GROUPS = ("exitCodes", "exitCodeRanges", "preProcessingError", "fileUploadError", "default")


def _invalid(name: str, value: Any, reason: str) -> BatchServiceError:
    return BatchServiceError(
        400,
        "InvalidPropertyValue",
        "The value provided for one of the properties in the request body is invalid.",
        {"PropertyName": name, "PropertyValue": str(value), "Reason": reason},
    )


def _check_exit_options(name: str, options: Any, job: JobRecord) -> bool:
    """Validate one ``exitOptions``; return whether it sets a ``dependencyAction``."""
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise _invalid(name, options, "must be an object")
    job_action = options.get("jobAction")
    if job_action is not None:
        if str(job_action).lower() not in _JOB_ACTIONS:
            raise BatchServiceError(
                400,
                "UnsupportedProperty",
                "The Azure Batch emulator implements exitOptions.jobAction none and terminate only.",
                {"PropertyName": f"{name}.jobAction"},
            )
        if not performs_job_action(job):
            raise _invalid(
                f"{name}.jobAction", job_action, "allowed only when the job's onTaskFailure is performExitOptionsJobAction"
            )
    action = options.get("dependencyAction")
    if action is not None and str(action).lower() not in _ACTIONS:
        raise _invalid(f"{name}.dependencyAction", action, "must be satisfy or block")
    return action is not None


def _check_range(name: str, entry: Any) -> tuple[int, int]:
    if not isinstance(entry, Mapping):
        raise _invalid(name, entry, "must be an object with start and end")
    start, end = entry.get("start"), entry.get("end")
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        raise _invalid(name, entry, "start and end must be integers")
    if start > end:
        raise _invalid(name, entry, "start must not be above end")
    return start, end


def validate(job: JobRecord, body: Mapping[str, Any]) -> None:
    """Refuse a task body whose ``dependsOn``/``exitConditions`` Azure would refuse."""
    depends = body.get("dependsOn")
    conditions = body.get("exitConditions")
    uses_action = False
    if conditions is not None:
        if not isinstance(conditions, Mapping):
            raise _invalid("exitConditions", conditions, "must be an object")
        for group in conditions:
            if group not in _EXIT_OPTION_GROUPS:
                raise _invalid("exitConditions", group, f"unknown member; known: {', '.join(_EXIT_OPTION_GROUPS)}")
        for i, entry in enumerate(conditions.get("exitCodes") or []):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("code"), int):
                raise _invalid(f"exitConditions.exitCodes[{i}]", entry, "needs an integer code")
            uses_action |= _check_exit_options(f"exitConditions.exitCodes[{i}].exitOptions", entry.get("exitOptions"), job)
        for i, entry in enumerate(conditions.get("exitCodeRanges") or []):
            _check_range(f"exitConditions.exitCodeRanges[{i}]", entry)
            uses_action |= _check_exit_options(
                f"exitConditions.exitCodeRanges[{i}].exitOptions", entry.get("exitOptions"), job
            )
        for group in ("preProcessingError", "fileUploadError", "default"):
            uses_action |= _check_exit_options(f"exitConditions.{group}", conditions.get(group), job)
    if (depends is not None or uses_action) and not job.uses_task_dependencies:
        raise BatchServiceError(
            409,
            "TaskDependenciesNotSpecifiedOnJob",
            "A task was specified as depending on other tasks, but the job did not specify that it would use "
            "task dependencies.",
        )
    if depends is None:
        return
    if not isinstance(depends, Mapping):
        raise _invalid("dependsOn", depends, "must be an object")
    ids = depends.get("taskIds") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise _invalid("dependsOn.taskIds", ids, "must be a list of task ids")
    if sum(len(i) for i in ids) > MAX_TASK_IDS_CHARS:
        raise BatchServiceError(
            400,
            "TaskDependencyListTooLong",
            f"The task's dependsOn.taskIds hold more than {MAX_TASK_IDS_CHARS} characters; use taskIdRanges.",
        )
    ranges = depends.get("taskIdRanges") or []
    if not isinstance(ranges, list):
        raise _invalid("dependsOn.taskIdRanges", ranges, "must be a list")
    for i, entry in enumerate(ranges):
        _check_range(f"dependsOn.taskIdRanges[{i}]", entry)


def performs_job_action(job: JobRecord) -> bool:
    """Whether the job carries out its failed tasks' ``jobAction`` (``onTaskFailure``)."""
    return str(job.spec.get("onTaskFailure") or "noaction").lower() == PERFORM_JOB_ACTION


def _exit_options(task: TaskRecord) -> Mapping[str, Any]:
    """The ``exitOptions`` that apply to how a completed task ended (empty when none do)."""
    conditions = task.spec.get("exitConditions") or {}
    code = task.exit_code
    options: Any = None
    if code is not None:
        for entry in conditions.get("exitCodes") or []:
            if entry.get("code") == code:
                options = entry.get("exitOptions")
                break
        else:
            for entry in conditions.get("exitCodeRanges") or []:
                if entry["start"] <= code <= entry["end"]:
                    options = entry.get("exitOptions")
                    break
    if options is None:
        options = conditions.get("default")
    return options or {}


def job_action(task: TaskRecord) -> str:
    """``none`` or ``terminate``: what a completed task does to its job.

    Only a failed task in a job that performs exit-option job actions acts;
    its default there is ``terminate`` (Azure: none for exit code 0,
    terminate for every other end).
    """
    if task.result == "success" or not performs_job_action(task.job):
        return "none"
    return str(_exit_options(task).get("jobAction") or "terminate").lower()


def dependency_action(task: TaskRecord) -> str:
    """``satisfy`` or ``block``: what a completed task does to the tasks that depend on it."""
    action = _exit_options(task).get("dependencyAction")
    if action:
        return str(action).lower()
    return "satisfy" if task.result == "success" else "block"


def waiting(task: TaskRecord) -> bool:
    """Whether ``task`` must still wait for (or is blocked by) the tasks it depends on."""
    depends = task.spec.get("dependsOn")
    if not depends:
        return False
    tasks = task.job.tasks
    needed: list[TaskRecord | None] = [tasks.get(i.lower()) for i in depends.get("taskIds") or []]
    for entry in depends.get("taskIdRanges") or []:
        start, end = entry["start"], entry["end"]
        needed.extend(t for t in tasks.values() if t.id.isdigit() and start <= int(t.id) <= end)
    return any(t is None or t.state != "completed" or dependency_action(t) != "satisfy" for t in needed)
