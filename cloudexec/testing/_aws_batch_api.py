"""The AWS Batch emulator's wire: the moto server, the gateway in front of it, the Batch API.

:class:`Gateway` is WSGI middleware around moto's app: it pins the emulator's
own moto account, hands Batch job calls to :class:`BatchApi`, serializes the
rest into moto (moto is not thread-safe) and applies the emulator's test hooks
(call counts, injected faults, expiring credentials; see
:mod:`cloudexec.testing._hooks`). :class:`BatchApi` parses and validates a
request as AWS does and calls the scheduler; it holds no job state.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import math
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import moto
from werkzeug.serving import WSGIRequestHandler, make_server

from cloudexec.testing._aws_batch_model import (
    MAX_ARRAY_SIZE,
    STATUSES,
    ApiError,
    build_spec,
    client_error,
    job_id_from,
)
from cloudexec.testing._aws_batch_scheduler import JobScheduler
from cloudexec.testing._hooks import Fault, Hooks

__all__ = ["BatchApi", "Gateway", "MotoServer", "WSGIApp", "check_moto_version"]

_log = logging.getLogger(__name__)

_MOTO_MIN = (5, 0)
_MOTO_MAX_EXCLUSIVE = (5, 3)


def check_moto_version() -> None:
    version = getattr(moto, "__version__", "0")
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if not _MOTO_MIN <= parts < _MOTO_MAX_EXCLUSIVE:
        raise RuntimeError(
            f"cloudexec.testing.aws relies on moto internals verified for moto>=5.0,<5.3, "
            f"but moto {version} is installed. Install a verified version with "
            f"pip install 'moto[server]>=5.0,<5.3'."
        )


# Checked before any moto internal is imported, so a moto that moved them fails with
# this message rather than an obscure ImportError.
check_moto_version()

from moto.backends import get_backend  # noqa: E402
from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _cache_moto_module_list() -> None:
    """List moto's service folders once instead of on every request.

    moto's server lists and stats its ~200 service folders to route *each*
    request (``backends.list_of_moto_modules``, moto 5.2): about 2 ms, a large
    share of an S3 GET. The folders do not change while the process runs.
    """
    import moto.backends

    listed = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: listed


_cache_moto_module_list()

_MAX_DESCRIBE_IDS = 100
_MIN_ATTEMPT_DURATION_S = 60
_MAX_ATTEMPTS = 10
# AWS rejects a SubmitJob whose request exceeds 30 KiB ("Job size must be less than
# 30 KiB"), and fails the job when ECS refuses overrides longer than 8192 characters.
_MAX_SUBMIT_BYTES = 30 * 1024
# ListJobs page caps from the API reference: up to 100 results with `filters`, up to
# 1000 with `jobStatus` or with neither.
_LIST_PAGE_FILTERS = 100
_LIST_PAGE_STATUS = 1000
_LIST_FILTERS = frozenset({"JOB_NAME", "JOB_DEFINITION", "BEFORE_CREATED_AT", "AFTER_CREATED_AT"})

_JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_CREDENTIAL_SCOPE_RE = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")


class _QuietHandler(WSGIRequestHandler):
    """Does not print a line per request (werkzeug's default) into test output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class MotoServer(ThreadedMotoServer):
    """moto's ThreadedMotoServer with our gateway around its app.

    Overrides ``_server_entry`` (verified on moto 5.0-5.2) to wrap the WSGI app,
    silence the request log, and report a start-up failure instead of leaving
    ``start()`` waiting forever.
    """

    def __init__(self, wrap: Callable[[WSGIApp], WSGIApp]) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._wrap = wrap
        self._startup_error: BaseException | None = None

    def _server_entry(self) -> None:
        try:
            app = self._wrap(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                self._ip_address, self._port, app, threaded=True, request_handler=_QuietHandler
            )
        except BaseException as exc:
            self._startup_error = exc
            self._server_ready_event.set()
            return
        self._server_ready_event.set()
        # A short poll interval: shutdown() waits for the loop to notice.
        self._server.serve_forever(poll_interval=0.05)

    def start(self) -> None:
        super().start()
        if self._startup_error is not None:
            raise RuntimeError(f"moto server failed to start: {self._startup_error}") from self._startup_error

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            # moto's stop() leaves the listening socket open.
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _s3_operation(method: str, environ: dict[str, Any]) -> str:
    """The S3 operation a request is, by S3's REST rules (``ListObjectsV2``, ``PutObject`` …)."""
    query = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "").strip("/")
    is_object = "/" in path  # /bucket/key (path-style, as the emulator's clients address it)
    if method == "GET":
        if not is_object:
            return "ListObjectsV2" if "list-type=2" in query else "ListObjects"
        return "GetObject"
    if method == "PUT":
        return "PutObject" if is_object else "CreateBucket"
    if method == "HEAD":
        return "HeadObject" if is_object else "HeadBucket"
    if method == "DELETE":
        return "DeleteObject" if is_object else "DeleteBucket"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    return f"{method} s3"


class Gateway:
    """WSGI middleware in front of moto (see the module diagram)."""

    def __init__(
        self, app: WSGIApp, account_id: str, api: BatchApi, moto_lock: threading.RLock, hooks: Hooks
    ) -> None:
        self._app = app
        self._account_id = account_id
        self._api = api
        self._moto_lock = moto_lock
        self._hooks = hooks

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # The body is read before taking moto's lock, so a slow upload does not stall
        # every other request.
        body = _read_body(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self._account_id
        scope = _CREDENTIAL_SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
        key, region, service = scope.groups() if scope is not None else (None, "", "")
        method = environ.get("REQUEST_METHOD", "GET")
        fault: Fault | None = None
        if service == "batch":
            self._hooks.count(self._api.operation_name(method, environ.get("PATH_INFO", "")))
            fault = self._hooks.draw_fault("batch")
        elif service == "s3":
            self._hooks.count_storage(_s3_operation(method, environ))
            fault = self._hooks.draw_fault("storage")
        if self._hooks.credentials_expired(key):
            return _respond(start_response, _expired_answer(service))
        if fault is not None and fault.kind != "lost":
            if fault.kind == "reset":
                return _reset_connection(environ)
            return _respond(start_response, _fault_answer(service, fault))
        if service == "batch":
            answer = self._api.handle(method, environ.get("PATH_INFO", ""), body, region)
            if answer is not None:
                return _reset_connection(environ) if fault is not None else _respond(start_response, answer)
        if fault is not None:  # served by moto, answer lost
            self._call_moto(environ, lambda *args: (lambda data: None))
            return _reset_connection(environ)
        return self._call_moto(environ, start_response)

    def _call_moto(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        captured: list[Any] = []

        def capture(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            captured[:] = [status, headers, exc_info]
            return lambda data: None

        # moto is not thread-safe (500s under concurrent requests), so one request at
        # a time; the response is drained inside the lock for the same reason.
        with self._moto_lock:
            result = self._app(environ, capture)
            try:
                chunks = [bytes(c) for c in result]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        status, headers, exc_info = captured
        if exc_info:
            start_response(status, headers, exc_info)
        else:
            start_response(status, headers)
        return chunks


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            return bytes(stream.read(int(length)))
        except ValueError:
            return b""
    if environ.get("wsgi.input_terminated"):
        return bytes(stream.read())
    return b""


# --------------------------------------------------------------------- Batch API


Answer = tuple[str, list[tuple[str, str]], bytes]
_HTTP_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _answer(status: int, payload: Mapping[str, Any], error_code: str | None = None) -> Answer:
    data = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ]
    if error_code is not None:
        headers.append(("x-amzn-ErrorType", error_code))
    return f"{status} {_HTTP_REASONS.get(status, '')}".rstrip(), headers, data


def _respond(start_response: Callable[..., Any], answer: Answer) -> Iterable[bytes]:
    status, headers, payload = answer
    start_response(status, headers)
    return [payload]


def _xml_error(status: int, code: str, message: str) -> Answer:
    data = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>"
    ).encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(data)))]
    return f"{status} {_HTTP_REASONS.get(status, '')}".rstrip(), headers, data


def _fault_answer(service: str, fault: Fault) -> Answer:
    """The error each service really answers when it throttles or fails inside."""
    if service == "s3":
        # S3 throttles with 503 SlowDown (S3 error responses reference).
        if fault.kind == "throttle":
            return _xml_error(503, "SlowDown", "Please reduce your request rate.")
        return _xml_error(500, "InternalError", "We encountered an internal error. Please try again.")
    if fault.kind == "throttle":
        return _answer(429, {"message": "Too Many Requests"}, "TooManyRequestsException")
    return _answer(500, {"__type": "ServerException", "message": "Internal server error"}, "ServerException")


def _expired_answer(service: str) -> Answer:
    """What AWS answers a request signed with expired temporary credentials."""
    if service == "s3":
        return _xml_error(400, "ExpiredToken", "The provided token has expired.")
    return _answer(
        403,
        {"__type": "ExpiredTokenException", "message": "The security token included in the request is expired"},
        "ExpiredTokenException",
    )


def _reset_connection(environ: dict[str, Any]) -> Iterable[bytes]:
    """Drop the connection with a TCP reset and no answer, as a failing load balancer does."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        # Linger 0: closing the socket sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # werkzeug keeps an HTTP/1.1 connection open after a dropped answer and
        # waits for the next request on it, while the client waits for this
        # answer until its read timeout: end the connection here.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def body() -> Iterator[bytes]:
        # Raised before any byte is written: werkzeug treats it as a dropped
        # connection and closes the socket quietly.
        raise ConnectionResetError("connection reset by the emulator (injected fault)")
        yield b""  # pragma: no cover - makes this a generator

    return body()


class BatchApi:
    """Parses and validates Batch job requests; the job state lives in JobScheduler."""

    def __init__(
        self,
        *,
        service: JobScheduler,
        moto_lock: threading.RLock,
        account_id: str,
        timeout_scale: float,
    ) -> None:
        self._service = service
        self._moto_lock = moto_lock
        self._account_id = account_id
        self._timeout_scale = timeout_scale
        self._operations: dict[tuple[str, str], str] = {}
        self._handlers: dict[str, Callable[[bytes, dict[str, Any], str], dict[str, Any] | None]] = {
            "SubmitJob": self._submit_job,
            "DescribeJobs": self._describe_jobs,
            "ListJobs": self._list_jobs,
            "CancelJob": self._cancel_job,
            "TerminateJob": self._terminate_job,
            "RegisterJobDefinition": self._register_job_definition,
        }

    # -- bookkeeping

    def set_service_model(self, model: Any) -> None:
        """Learns (method, path) -> operation names from botocore's Batch model."""
        operations = {}
        for name in model.operation_names:
            http = model.operation_model(name).http
            segment = http["requestUri"].split("?")[0].strip("/").split("/")
            key = segment[1].split("{")[0] if len(segment) > 1 else segment[0]
            operations[(http["method"].upper(), key.lower())] = name
        self._operations = operations

    def operation_name(self, method: str, path: str) -> str:
        """The Batch operation a request is, e.g. ``"DescribeJobs"``."""
        parts = path.strip("/").split("/")
        key = parts[1].lower() if len(parts) > 1 else parts[0].lower()
        return self._operations.get((method.upper(), key), key)

    # -- dispatch

    def handle(self, method: str, path: str, body: bytes, region: str) -> Answer | None:
        """Answers a Batch request, or returns None to let moto answer it."""
        operation = self.operation_name(method, path)
        handler = self._handlers.get(operation)
        if handler is None:
            return None
        try:
            try:
                request = json.loads(body or b"{}")
            except ValueError as exc:
                raise client_error(f"The request body is not valid JSON: {exc}") from None
            if not isinstance(request, dict):
                raise client_error("The request body must be a JSON object")
            result = handler(body, request, region)
        except ApiError as exc:
            return _answer(exc.status, {"__type": exc.code, "message": str(exc)}, exc.code)
        except Exception as exc:  # a bug here must reach the test as a 500, not hang it
            _log.exception("AWS Batch emulator failed on %s", operation)
            return _answer(500, {"__type": "ServerException", "message": repr(exc)}, "ServerException")
        if result is None:
            return None
        return _answer(200, result)

    # -- handlers

    def _register_job_definition(self, body: bytes, request: dict[str, Any], region: str) -> None:
        # Only validated here, where moto accepts what AWS rejects; moto stores it.
        _validate_timeout(request.get("timeout"))
        _validate_retry(request.get("retryStrategy"))
        _validate_environment((request.get("containerProperties") or {}).get("environment"))
        return None

    def _submit_job(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        if len(body) > _MAX_SUBMIT_BYTES:
            raise client_error(f"Job size must be less than 30 KiB, got {math.ceil(len(body) / 1024)} KiB")
        name = request.get("jobName")
        if not isinstance(name, str) or not _JOB_NAME_RE.fullmatch(name):
            raise client_error(
                f"jobName {name!r} is invalid: up to 128 letters, numbers, hyphens and underscores, "
                "starting with a letter or number"
            )
        queue_id = request.get("jobQueue")
        definition_id = request.get("jobDefinition")
        if not queue_id or not definition_id:
            raise client_error("jobQueue and jobDefinition are required")
        for unsupported in ("nodeOverrides", "eksPropertiesOverride", "ecsPropertiesOverride"):
            if request.get(unsupported):
                raise client_error(f"{unsupported} is not supported by cloudexec's AWS Batch emulator")
        size = (request.get("arrayProperties") or {}).get("size")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= MAX_ARRAY_SIZE
        ):
            raise client_error(f"Array job size must be between 2 and {MAX_ARRAY_SIZE}, got {size!r}")
        overrides = request.get("containerOverrides") or {}
        _validate_environment(overrides.get("environment"))
        _validate_timeout(request.get("timeout"))
        _validate_retry(request.get("retryStrategy"))
        depends_on = request.get("dependsOn") or []

        definition, queue = self._lookup(definition_id, queue_id, region)
        spec = build_spec(name, request, overrides, definition, queue, self._timeout_scale)
        job = self._service.submit(spec, size, depends_on)
        tags = request.get("tags")
        if tags:
            # Stored with moto's tagger too, so ListTagsForResource agrees.
            with self._moto_lock:
                self._backend(region).tag_resource(job.arn, tags)
        return {"jobArn": job.arn, "jobName": name, "jobId": job.job_id}

    def _describe_jobs(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        ids = request.get("jobs")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise client_error("jobs must be a list of job IDs")
        if len(ids) > _MAX_DESCRIBE_IDS:
            raise client_error(f"Maximum number of jobs supported is {_MAX_DESCRIBE_IDS}")
        return {"jobs": self._service.describe([job_id_from(i) for i in ids])}

    def _list_jobs(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        queue_id = request.get("jobQueue")
        array_id = request.get("arrayJobId")
        if request.get("multiNodeJobId"):
            raise client_error("multi-node jobs are not supported by cloudexec's AWS Batch emulator")
        if not queue_id and not array_id:
            raise client_error("Either jobQueue or arrayJobId must be specified")
        status = request.get("jobStatus")
        if status is not None and status not in STATUSES:
            raise client_error(f"jobStatus must be one of {' | '.join(STATUSES)}, got {status!r}")
        filters = request.get("filters") or None
        if filters is not None:
            if not isinstance(filters, list):
                raise client_error("filters must be a list")
            for f in filters:
                if not isinstance(f, dict) or f.get("name") not in _LIST_FILTERS:
                    raise client_error(f"Filter name must be one of {sorted(_LIST_FILTERS)}, got {f!r}")
        cap = _LIST_PAGE_FILTERS if filters else _LIST_PAGE_STATUS
        max_results = request.get("maxResults")
        if max_results is not None and (
            isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1
        ):
            raise client_error(f"maxResults must be an integer >= 1, got {max_results!r}")
        page = min(max_results or cap, cap)
        queue_arn = None
        if queue_id and not array_id:
            with self._moto_lock:
                queue = self._backend(region).get_job_queue(queue_id)
                if queue is None:
                    raise client_error(f"Job queue {queue_id} does not exist")
                queue_arn = queue.arn
        fingerprint = json.dumps([queue_id, array_id, status, filters], sort_keys=True)
        after = _decode_token(request.get("nextToken"), fingerprint)
        # AWS: with filters, jobStatus is ignored and every status is listed; with
        # neither, only RUNNING jobs are.
        wanted = None if filters else (status or "RUNNING")
        summaries, last_seq = self._service.list_jobs(
            queue_arn=queue_arn,
            array_job_id=job_id_from(array_id) if array_id else None,
            status=wanted,
            filters=filters or [],
            page=page,
            after_seq=after,
        )
        result: dict[str, Any] = {"jobSummaryList": summaries}
        if last_seq is not None:
            result["nextToken"] = _encode_token(last_seq, fingerprint)
        return result

    def _cancel_job(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        job_id, reason = _id_and_reason(request)
        self._service.cancel(job_id, reason)
        return {}

    def _terminate_job(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        job_id, reason = _id_and_reason(request)
        self._service.terminate(job_id, reason)
        return {}

    # -- moto lookups

    def _backend(self, region: str) -> Any:
        return get_backend("batch")[self._account_id][region]

    def _lookup(
        self, definition_id: str, queue_id: str, region: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads a job definition and queue out of moto as plain data."""
        with self._moto_lock:
            backend = self._backend(region)
            definition = backend.get_job_definition(definition_id)
            if definition is None:
                raise client_error(f"Job definition {definition_id} does not exist")
            queue = backend.get_job_queue(queue_id)
            if queue is None:
                raise client_error(f"Job queue {queue_id} does not exist")
            if definition.status != "ACTIVE":
                raise client_error(f"Job definition {definition.arn} is {definition.status}")
            if definition.type != "container" or definition.container_properties is None:
                raise client_error(
                    f"Job definition {definition.arn} is not a container job definition; "
                    "cloudexec's AWS Batch emulator runs container jobs only"
                )
            definition_data = {
                "arn": definition.arn,
                "name": definition.name,
                "container": copy.deepcopy(definition.container_properties),
                "parameters": dict(definition.parameters or {}),
                "retryStrategy": copy.deepcopy(definition.retry_strategy) or None,
                "timeout": copy.deepcopy(definition.timeout) or None,
                "platformCapabilities": list(definition.platform_capabilities or ["EC2"]),
                "propagateTags": bool(definition.propagate_tags),
            }
            queue_data = {
                "arn": queue.arn,
                "name": queue.name,
                "ce_name": queue.environments[0].name if queue.environments else "",
            }
        return definition_data, queue_data


def _id_and_reason(request: Mapping[str, Any]) -> tuple[str, str]:
    job_id = request.get("jobId")
    reason = request.get("reason")
    if not isinstance(job_id, str) or not job_id:
        raise client_error("'jobId' is a required field (cannot be an empty string)")
    if not isinstance(reason, str) or not reason:
        raise client_error("'reason' is a required field (cannot be an empty string)")
    return job_id_from(job_id), reason


def _validate_timeout(timeout: Any) -> None:
    if not timeout:
        return
    seconds = timeout.get("attemptDurationSeconds") if isinstance(timeout, dict) else None
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < _MIN_ATTEMPT_DURATION_S:
        raise client_error(
            f"timeout.attemptDurationSeconds must be at least {_MIN_ATTEMPT_DURATION_S} seconds, "
            f"got {seconds!r}"
        )


def _validate_retry(retry: Any) -> None:
    if not retry:
        return
    attempts = retry.get("attempts") if isinstance(retry, dict) else None
    if attempts is None:
        return
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= _MAX_ATTEMPTS:
        raise client_error(f"retryStrategy.attempts must be between 1 and {_MAX_ATTEMPTS}, got {attempts!r}")


def _validate_environment(environment: Any) -> None:
    for item in environment or []:
        name = item.get("name", "") if isinstance(item, dict) else ""
        # "Environment variables cannot start with AWS_BATCH; this naming convention
        # is reserved for variables that AWS Batch sets."
        if name.startswith("AWS_BATCH"):
            raise client_error(
                f"Environment variable {name} is invalid: names starting with AWS_BATCH are reserved"
            )


def _encode_token(seq: int, fingerprint: str) -> str:
    raw = json.dumps({"after": seq, "q": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: Any, fingerprint: str) -> int:
    if not token:
        return -1
    try:
        data = json.loads(base64.urlsafe_b64decode(str(token).encode()))
        if data["q"] != fingerprint:
            raise ValueError("token belongs to another query")
        return int(data["after"])
    except (ValueError, KeyError, TypeError):
        raise client_error(f"Invalid nextToken {token!r}") from None


# --------------------------------------------------------------------- job model
