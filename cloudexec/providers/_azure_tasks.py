"""How the Azure provider adds an array's tasks: one body copied per child, a few collections in flight.

Every child of an array runs the same command line with the same settings
(it reads its index from its task id), so the SDK builds and serializes the
body of one task (`child_body` template) and each child's body is a copy with
its own ``id`` (and, in a sequential array, ``dependsOn`` the task before):
building, serializing and parsing back a thousand SDK models costs more than
the requests that carry them.

Add-task-collection takes at most 100 tasks and 1 MiB per request. A
collection Azure refuses as ``RequestBodyTooLarge`` "should be retried again
with fewer Tasks": it is halved (down to one task). The collections are built
in index order and sent that way, `MAX_IN_FLIGHT` at once (Azure's guide to
submitting many tasks advises parallel add-collection calls: each one waits a
round trip), so early children are still added first. A sequential array's go
one at a time, so that each task's dependency exists before it is added.

The first collection that fails stops the ones not sent yet; once those in
flight answered, the failure of the lowest collection is raised (the caller
terminates and deletes the job). A task Azure refuses inside a successful
collection is a `SubmissionError` naming the task and Azure's reason; a
``TaskExists`` answer means a resent request had gone through, and counts as
added.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from cloudexec.errors import SubmissionError
from cloudexec.providers._azure_describe import task_id_for

__all__ = ["MAX_IN_FLIGHT", "add_children", "child_body", "error_code"]

#: Add-task-collection requests of one array in flight at once.
MAX_IN_FLIGHT = 6
# The REST API version azure-batch 15.x speaks, should a client not say which it uses.
_API_VERSION = "2025-06-01"


def child_body(template: Mapping[str, Any], index: int, *, sequential: bool) -> dict[str, Any]:
    """The REST body of array child ``index``: ``template`` with the child's id (and its dependency)."""
    body = {**template, "id": task_id_for(index)}
    if sequential and index > 0:
        body["dependsOn"] = {"taskIds": [task_id_for(index - 1)]}
    return body


def add_children(
    client: Any,
    job_id: str,
    template: Mapping[str, Any],
    size: int,
    *,
    per_request: int,
    sequential: bool,
    send: Callable[[Callable[[], Any]], Any],
) -> None:
    """Add tasks 0 .. ``size`` - 1 of an array to Azure job ``job_id``.

    Args:
        client: the ``azure.batch.BatchClient``.
        template: the REST body of one child task (its ``id`` is replaced).
        per_request: tasks per add-task-collection request (at most 100).
        sequential: child i depends on child i - 1; collections go one at a time.
        send: runs one request, resending it when its connection dropped.

    Raises:
        SubmissionError: Azure refused a task of a collection.
        Exception: the SDK's error of the first collection that failed.
    """
    chunks = [(start, min(size, start + per_request)) for start in range(0, size, per_request)]
    in_flight = 1 if sequential else min(MAX_IN_FLIGHT, len(chunks))
    if in_flight <= 1:
        for start, end in chunks:
            _add_range(client, job_id, template, start, end, sequential, send)
        return
    stop = threading.Event()

    def add(start: int, end: int) -> None:
        if stop.is_set():
            return  # an earlier collection failed: the job is discarded
        try:
            _add_range(client, job_id, template, start, end, sequential, send)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(in_flight, thread_name_prefix=f"cloudexec-add-tasks-{job_id[:20]}")
    try:
        futures: list[Future[None]] = [pool.submit(add, start, end) for start, end in chunks]
    finally:
        pool.shutdown(wait=True)
    for future in futures:  # in index order: the lowest collection's failure is raised
        error = future.exception()
        if error is not None:
            raise error


def _add_range(
    client: Any,
    job_id: str,
    template: Mapping[str, Any],
    start: int,
    end: int,
    sequential: bool,
    send: Callable[[Callable[[], Any]], Any],
) -> None:
    """Add children ``start`` .. ``end`` - 1 in one request, halving it while Azure finds it too large."""
    body = {"value": [child_body(template, i, sequential=sequential) for i in range(start, end)]}
    try:
        answer = send(lambda: _post_collection(client, job_id, body))
    except Exception as exc:
        if error_code(exc) != "RequestBodyTooLarge" or end - start == 1:
            raise
        middle = (start + end) // 2
        _add_range(client, job_id, template, start, middle, sequential, send)
        _add_range(client, job_id, template, middle, end, sequential, send)
        return
    for item in answer.get("value") or []:
        _check_added(job_id, item)


def _post_collection(client: Any, job_id: str, body: dict[str, Any]) -> Any:
    """POST one collection through the client's pipeline (auth, retries, Azure's errors); return its JSON answer.

    The SDK's ``create_task_collection`` would parse the answer into a model
    per task; only each task's status and error are read here.
    """
    from azure.core.rest import HttpRequest

    request = HttpRequest(
        "POST",
        f"/jobs/{quote(job_id, safe='')}/addtaskcollection",
        params={"api-version": getattr(getattr(client, "_config", None), "api_version", None) or _API_VERSION},
        headers={"Content-Type": "application/json; odata=minimalmetadata", "Accept": "application/json"},
        content=json.dumps(body),
    )
    # The client's pipeline raises Azure's error (HttpResponseError with its code) for any answer but 2xx.
    response = client.send_request(request)
    response.raise_for_status()
    return response.json()


def _check_added(job_id: str, item: Mapping[str, Any]) -> None:
    """Raise when Azure refused one task of a collection (an add-task result, as JSON)."""
    status = item.get("status")
    if status == "success":
        return
    error = item.get("error") or {}
    code = error.get("code")
    if code == "TaskExists":
        return  # a resent request that had gone through
    message = error.get("message")
    if isinstance(message, Mapping):
        message = message.get("value")
    values = error.get("values") or []
    details = ", ".join(f"{v.get('key')}={v.get('value')}" for v in values if isinstance(v, Mapping))
    raise SubmissionError(
        f"Azure Batch refused task {item.get('taskId')} of job {job_id} ({code or status}): "
        f"{str(message or 'no message').rstrip('.')}{f' ({details})' if details else ''}; the job was terminated "
        "and deleted, nothing of it runs. Check the job's settings (vcpus, timeout, retries, container_image)",
        job_id=job_id,
        code=code,
    )


def error_code(exc: BaseException) -> str | None:
    """The Azure error code of an azure-core ``HttpResponseError`` (``PoolNotFound`` …)."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    if code:
        return str(code)
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code)) if code else None
