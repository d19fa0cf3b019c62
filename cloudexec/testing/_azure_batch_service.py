"""A local Azure Batch REST service that the real ``azure-batch`` SDK can talk to.

It speaks the Batch data-plane API (``api-version=2025-06-01``) over plain HTTP
on 127.0.0.1 (HTTPS with ``tls``), checks shared-key signatures exactly as
``azure.batch._patch.BatchSharedKeyAuthPolicy`` computes them (over HTTPS it
also takes Entra ID bearer tokens, refusing expired ones), and answers in
Azure's JSON shapes (camelCase bodies, ``{"code", "message": {"lang",
"value"}, "values"}`` errors). The work itself is done by a
:class:`~cloudexec.testing._azure_batch_node.ComputeNode`.

Implemented operations (``api_calls`` keys are the SDK method names)::

    GET    /pools                               list_pools
    GET    /pools/{pool}                        get_pool
    HEAD   /pools/{pool}                        pool_exists
    GET    /jobs                                list_jobs
    POST   /jobs                                create_job
    GET    /jobs/{job}                          get_job
    PATCH  /jobs/{job}                          update_job
    DELETE /jobs/{job}                          delete_job          (202, async)
    POST   /jobs/{job}/terminate                terminate_job       (202, async)
    GET    /jobs/{job}/taskcounts               get_job_task_counts
    POST   /jobs/{job}/tasks                    create_task
    GET    /jobs/{job}/tasks                    list_tasks          ($filter $select maxresults paging)
    POST   /jobs/{job}/addtaskcollection        create_task_collection
    GET    /jobs/{job}/tasks/{task}             get_task
    DELETE /jobs/{job}/tasks/{task}             delete_task
    POST   /jobs/{job}/tasks/{task}/terminate   terminate_task      (204)
    GET    /jobs/{job}/tasks/{task}/files       list_task_files
    GET    /jobs/{job}/tasks/{task}/files/{p}   download_task_file  (ocp-range)
    HEAD   /jobs/{job}/tasks/{task}/files/{p}   get_task_file_properties

Anything else answers 501 ``NotImplemented`` naming the call, so a gap in the
emulator shows up as such rather than as a confusing 404.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import os
import re
import ssl
import stat
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import SHUT_RDWR, socket
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from cloudexec.testing._azure_batch_model import (
    DEFAULT_RETENTION,
    UNLIMITED_DURATION,
    BatchServiceError,
    BatchStore,
    JobRecord,
    TaskRecord,
    format_time,
    parse_duration_s,
    utc_now,
    validate_id,
)
from cloudexec.testing._azure_auth import BATCH_AUDIENCE, TlsFiles, expired_token_detail, token_claims
from cloudexec.testing._azure_batch_node import ComputeNode
from cloudexec.testing import _azure_batch_depends as _depends
from cloudexec.testing._hooks import QUIET, Hooks, ResetConnection, reset_socket
from cloudexec.testing._azure_batch_odata import FilterError, compile_filter, select_fields

__all__ = ["AzureBatchService"]

# Header order of the shared-key string to sign (azure-batch 15.x _patch.py).
_SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)
# Azure Batch caps a request body at 1 MiB and an add-collection at 100 tasks.
_MAX_BODY_BYTES = 1024 * 1024
_MAX_TASKS_PER_COLLECTION = 100
# Job states that count against the account's active-job quota: every job
# that is not completed (one that can still become active again), the way the
# service counts them; a job being deleted no longer does.
_QUOTA_STATES = ("active", "disabling", "disabled", "enabling", "terminating")
_MAX_RESULTS = 1000
_JSON_TYPE = "application/json;odata=minimalmetadata"
# Request properties the emulator does not act on. Refusing them (rather than
# silently ignoring them) keeps a test from passing for the wrong reason.
_UNSUPPORTED_TASK_PROPERTIES = (
    "resourceFiles",
    "outputFiles",
    "multiInstanceSettings",
    "applicationPackageReferences",
    "authenticationTokenSettings",
)
_UNSUPPORTED_JOB_PROPERTIES = ("jobManagerTask", "jobPreparationTask", "jobReleaseTask")


@dataclass
class _Request:
    method: str
    segments: list[str]
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """Return the parsed JSON body (``None`` when empty)."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise BatchServiceError(400, "InvalidRequestBody", f"The request body is not valid JSON: {exc}") from exc


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _rfc1123(value: dt.datetime | float) -> str:
    """Format a datetime or POSIX timestamp as an HTTP date."""
    if isinstance(value, (int, float)):
        return email.utils.formatdate(value, usegmt=True)
    return email.utils.format_datetime(value.astimezone(dt.timezone.utc), usegmt=True)


def _from_timestamp(value: float) -> str:
    return format_time(dt.datetime.fromtimestamp(value, dt.timezone.utc))


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    out = {"Content-Type": _JSON_TYPE, "DataServiceVersion": "3.0"}
    out.update(headers or {})
    return _Response(status, json.dumps(payload).encode(), out)


def _empty(status: int, headers: dict[str, str] | None = None) -> _Response:
    out = {"DataServiceVersion": "3.0"}
    out.update(headers or {})
    return _Response(status, b"", out)


def _invalid_value(name: str, value: Any, reason: str) -> BatchServiceError:
    return BatchServiceError(
        400,
        "InvalidPropertyValue",
        f"The value provided for one of the properties in the request body is invalid: {name}.",
        {"PropertyName": name, "PropertyValue": str(value), "Reason": reason},
    )


def _int_property(body: Mapping[str, Any], name: str, default: int, low: int, high: int | None) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise _invalid_value(name, value, f"must be an integer in {bounds}")
    return value


def _check_unsupported(body: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name):
            raise BatchServiceError(
                400,
                "UnsupportedProperty",
                f"The Azure Batch emulator does not implement the {name!r} property.",
                {"PropertyName": name},
            )


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on close (no daemon threads left behind); open
    # keep-alive sockets are shut down first so those joins return at once.
    daemon_threads = False
    block_on_close = True

    def __init__(self, service: AzureBatchService, tls: TlsFiles | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.service = service
        self.open_sockets: set[socket] = set()
        self.sockets_lock = threading.Lock()
        self.tls_context = None if tls is None else tls.server_context()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs on the connection's own thread; the TLS socket takes
        # the plain one's place in open_sockets so that close_connections reaches it.
        try:
            wrapped = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.sockets_lock:
            self.open_sockets.discard(request)
            self.open_sockets.add(wrapped)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            with self.sockets_lock:
                self.open_sockets.discard(wrapped)
            wrapped.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping its connection is routine; anything else is a bug
        # worth the stdlib's traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut every open client connection so idle handler threads exit."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    # The headers and the body of an answer are two writes: with Nagle's
    # algorithm the body waits for the client's delayed ACK of the headers
    # (40 ms on Linux), a stall no Azure endpoint has.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # The stdlib writes one line per request to stderr; test output stays clean.
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items()}
        try:
            response = self.server.service.handle(self.command, self.path, headers, body)
        except ResetConnection:
            reset_socket(self.connection)
            self.close_connection = True
            return
        except BatchServiceError as exc:
            response = _json_response(exc.status, exc.to_json())
        except Exception as exc:  # a bug in the emulator: answer 500 with the traceback
            detail = "".join(traceback.format_exception(exc))
            response = _json_response(500, BatchServiceError(500, "InternalError", detail).to_json())
        response.headers.setdefault("request-id", str(uuid.uuid4()))
        client_request_id = self.headers.get("client-request-id")
        if client_request_id:
            response.headers["client-request-id"] = client_request_id
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)


class AzureBatchService:
    """The local Batch account: an HTTP server plus one compute node.

    Args:
        account_name: Batch account name used in shared-key signatures.
        account_key: Base64 account key used to check signatures.
        pool_id: Id of the single pool the account has.
        slots: ``taskSlotsPerNode`` of that pool's single node.
        vm_size: ``vmSize`` reported for the pool.
        root_dir: Node root directory (task directories live below it).
        task_env: Variables every task process sees, besides its own settings.
        kill_grace_s: Seconds between SIGTERM and SIGKILL when killing a task.
        hooks: The emulator's test hooks (call counts, faults); a quiet set by default.
        active_job_quota: The account's quota of active jobs (Azure's
            ``activeJobAndJobScheduleQuota``; 100-300 by default on real
            accounts). Creating a job beyond it answers 409
            ``ActiveJobAndScheduleQuotaReached``. None: no quota.
        tls: Serve HTTPS with these certificate files and accept bearer tokens
            for ``https://batch.core.windows.net/`` besides shared keys. None:
            plain HTTP, shared keys only.
    """

    def __init__(
        self,
        *,
        account_name: str,
        account_key: str,
        pool_id: str,
        slots: int,
        vm_size: str,
        root_dir: Path,
        task_env: Mapping[str, str],
        kill_grace_s: float,
        hooks: Hooks | None = None,
        active_job_quota: int | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.hooks = hooks if hooks is not None else Hooks(QUIET)
        self.tls = tls
        self.active_job_quota = active_job_quota
        self.account_name = account_name
        self._key = base64.b64decode(account_key)
        self.pool_id = pool_id
        self.slots = slots
        self.vm_size = vm_size
        self.store = BatchStore()
        self._server = _Server(self, tls)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._server.server_address[1]}"
        self._created = utc_now()
        self._pool_etag = self.store.new_etag()
        try:
            self.node = ComputeNode(
                self.store,
                pool_id=pool_id,
                slots=slots,
                root_dir=root_dir,
                account_name=account_name,
                account_url=self.url,
                task_env=task_env,
                kill_grace_s=kill_grace_s,
                status_lag_s=self.hooks.profile.status_lag_s,
            )
        except BaseException:
            self._server.server_close()
            raise
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="azure-batch-emulator-http",
            daemon=True,
        )
        self._routes: list[tuple[str, tuple[str, ...], str, Callable[..., _Response]]] = [
            ("GET", ("pools",), "list_pools", self._list_pools),
            ("GET", ("pools", "*"), "get_pool", self._get_pool),
            ("HEAD", ("pools", "*"), "pool_exists", self._get_pool),
            ("GET", ("jobs",), "list_jobs", self._list_jobs),
            ("POST", ("jobs",), "create_job", self._create_job),
            ("GET", ("jobs", "*"), "get_job", self._get_job),
            ("PATCH", ("jobs", "*"), "update_job", self._update_job),
            ("DELETE", ("jobs", "*"), "delete_job", self._delete_job),
            ("POST", ("jobs", "*", "terminate"), "terminate_job", self._terminate_job),
            ("GET", ("jobs", "*", "taskcounts"), "get_job_task_counts", self._task_counts),
            ("POST", ("jobs", "*", "tasks"), "create_task", self._create_task),
            ("GET", ("jobs", "*", "tasks"), "list_tasks", self._list_tasks),
            ("POST", ("jobs", "*", "addtaskcollection"), "create_task_collection", self._create_task_collection),
            ("GET", ("jobs", "*", "tasks", "*"), "get_task", self._get_task),
            ("DELETE", ("jobs", "*", "tasks", "*"), "delete_task", self._delete_task),
            ("POST", ("jobs", "*", "tasks", "*", "terminate"), "terminate_task", self._terminate_task),
            ("GET", ("jobs", "*", "tasks", "*", "files"), "list_task_files", self._list_task_files),
            ("GET", ("jobs", "*", "tasks", "*", "files", "**"), "download_task_file", self._task_file),
            ("HEAD", ("jobs", "*", "tasks", "*", "files", "**"), "get_task_file_properties", self._task_file),
        ]

    @property
    def api_calls(self) -> collections.Counter[str]:
        """A snapshot of the requests served, per SDK method name."""
        return self.hooks.snapshot_calls()

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start serving requests and running tasks."""
        self.node.start()
        self._serve_thread.start()

    def stop(self) -> None:
        """Stop the server (joining its threads) and kill every task process."""
        if self._serve_thread.is_alive():
            self._server.shutdown()  # would wait for ever if serve_forever never ran
        self._server.close_connections()
        self._server.server_close()
        if self._serve_thread.ident is not None:
            self._serve_thread.join(timeout=10)
        self.node.stop()

    # ---------------------------------------------------------------- requests
    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Response:
        """Authenticate, route and run one request.

        Args:
            method: HTTP method.
            target: Request target as sent (raw path and query).
            headers: Request headers as sent.
            body: Request body.

        Returns:
            The response to send.

        Raises:
            BatchServiceError: Any error the service answers with.
        """
        raw_path, _, raw_query = target.partition("?")
        self._authenticate(method, raw_path, raw_query, headers)
        if self.node.failure is not None:
            raise BatchServiceError(
                500, "InternalError", f"The emulator's compute node crashed; no task can run:\n{self.node.failure}"
            )
        query = {k: v[0] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
        segments = [unquote(s) for s in raw_path.strip("/").split("/") if s]
        name, func, args = self._route(method, segments)
        self.hooks.count(name)
        fault = self.hooks.draw_fault("batch")
        if fault is not None and fault.kind != "lost":
            if fault.kind == "reset":
                raise ResetConnection()
            if fault.kind == "throttle":
                # Azure Batch answers overload with 503 ServerBusy (and sometimes 429).
                raise BatchServiceError(
                    503, "ServerBusy", "The server is currently unable to receive requests. Please retry your request."
                )
            raise BatchServiceError(500, "InternalError", "The server encountered an internal error. Please retry the request.")
        if not query.get("api-version"):
            raise BatchServiceError(
                400,
                "MissingRequiredQueryParameter",
                "A query parameter that's mandatory for this request is not specified.",
                {"QueryParameterName": "api-version"},
            )
        if len(body) > _MAX_BODY_BYTES:
            raise BatchServiceError(
                413,
                "RequestBodyTooLarge",
                "The request body is too large and exceeds the maximum permissible limit.",
                {"MaxLimit": str(_MAX_BODY_BYTES)},
            )
        request = _Request(method, segments, query, headers, body)
        with self.store.lock:
            response = func(request, *args)
        if fault is not None:  # "lost": served, but the answer never reaches the client
            raise ResetConnection()
        return response

    def _route(self, method: str, segments: list[str]) -> tuple[str, Callable[..., _Response], list[str]]:
        path_known = False
        for route_method, pattern, name, func in self._routes:
            args = self._match(pattern, segments)
            if args is None:
                continue
            path_known = True
            if route_method == method:
                return name, func, args
        if path_known:
            raise BatchServiceError(405, "UnsupportedHttpVerb", f"The resource doesn't support the {method} verb.")
        raise BatchServiceError(
            501,
            "NotImplemented",
            f"The Azure Batch emulator does not implement {method} /{'/'.join(segments)}.",
        )

    @staticmethod
    def _match(pattern: tuple[str, ...], segments: list[str]) -> list[str] | None:
        args: list[str] = []
        for i, part in enumerate(pattern):
            if part == "**":
                rest = segments[i:]
                return args + ["/".join(rest)] if rest else None
            if i >= len(segments):
                return None
            if part == "*":
                args.append(segments[i])
            elif part != segments[i]:
                return None
        return args if len(segments) == len(pattern) else None

    def _authenticate(self, method: str, raw_path: str, raw_query: str, headers: Mapping[str, str]) -> None:
        """Check the SharedKey signature (or, over HTTPS, the bearer token) the way the Batch service does."""
        bearer = headers.get("Authorization") or headers.get("authorization") or ""
        if self.tls is not None and bearer.startswith("Bearer "):
            self._authenticate_token(bearer)
            return
        lower = {k.lower(): v for k, v in headers.items() if v}
        if method not in ("GET", "HEAD"):
            lower.setdefault("content-length", "0")
        to_sign = method + "\n" + "\n".join(lower.get(h, "") for h in _SIGNED_HEADERS) + "\n"
        # The SDK signs every header whose name contains "ocp-", sorted by name.
        for name, value in sorted((k.lower(), v) for k, v in headers.items() if "ocp-" in k and v):
            to_sign += f"{name}:{value}\n"
        to_sign += f"/{self.account_name}{raw_path}"
        query = parse_qs(raw_query)
        for name in sorted(query):
            if query[name][0]:
                to_sign += f"\n{name}:{query[name][0]}"
        expected = base64.b64encode(hmac.new(self._key, to_sign.encode(), hashlib.sha256).digest()).decode()
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        match = re.fullmatch(r"SharedKey ([^:]+):(.+)", auth.strip())
        if match is None or match.group(1) != self.account_name or not hmac.compare_digest(match.group(2), expected):
            if match is None:
                detail = "The Authorization header is missing or is not 'SharedKey <account>:<signature>'."
            elif match.group(1) != self.account_name:
                detail = f"The request names account {match.group(1)!r}; this account is {self.account_name!r}."
            else:
                detail = f"The MAC signature is not the same as the computed one. String to sign: {to_sign!r}"
            self.hooks.count("authentication_failed")
            raise BatchServiceError(
                401,
                "AuthenticationFailed",
                "Server failed to authenticate the request. Make sure the value of Authorization header is "
                "formed correctly including the signature.",
                {"AuthenticationErrorDetail": detail},
            )

    def _authenticate_token(self, authorization: str) -> None:
        """Refuse a malformed, foreign-audience or expired Entra ID token with 401, as Azure Batch does."""
        claims = token_claims(authorization)
        if claims is None or str(claims.get("aud", "")).rstrip("/") != BATCH_AUDIENCE.rstrip("/"):
            detail: str | None = "The token is not an Entra ID access token for https://batch.core.windows.net/."
        else:
            detail = expired_token_detail(self.hooks, authorization)
        if detail is None:
            return
        self.hooks.count("authentication_failed")
        # Azure Batch's answer to a token it refuses (e.g. Azure/azure-sdk-for-net#8026).
        raise BatchServiceError(
            401,
            "AuthenticationFailed",
            "Server failed to authenticate the request. Make sure the value of Authorization header is formed "
            "correctly.",
            {"AuthenticationErrorDetail": detail},
        )

    # ------------------------------------------------------------------ pools
    def _pool_json(self) -> dict[str, Any]:
        created = format_time(self._created)
        return {
            "id": self.pool_id,
            "url": f"{self.url}/pools/{quote(self.pool_id, safe='')}",
            "eTag": self._pool_etag,
            "lastModified": created,
            "creationTime": created,
            "state": "active",
            "stateTransitionTime": created,
            "allocationState": "steady",
            "allocationStateTransitionTime": created,
            "vmSize": self.vm_size,
            "virtualMachineConfiguration": {
                "imageReference": {
                    "publisher": "canonical",
                    "offer": "0001-com-ubuntu-server-jammy",
                    "sku": "22_04-lts",
                    "version": "latest",
                },
                "nodeAgentSKUId": "batch.node.ubuntu 22.04",
                "containerConfiguration": {"type": "dockerCompatible"},
            },
            "resizeTimeout": "PT15M",
            "currentDedicatedNodes": 1,
            "currentLowPriorityNodes": 0,
            "targetDedicatedNodes": 1,
            "targetLowPriorityNodes": 0,
            "enableAutoScale": False,
            "enableInterNodeCommunication": False,
            "taskSlotsPerNode": self.slots,
            "taskSchedulingPolicy": {"nodeFillType": "pack"},
        }

    def _list_pools(self, request: _Request) -> _Response:
        return _json_response(200, {"odata.metadata": f"{self.url}/$metadata#pools", "value": [self._pool_json()]})

    def _get_pool(self, request: _Request, pool_id: str) -> _Response:
        if pool_id.lower() != self.pool_id.lower():
            raise BatchServiceError(404, "PoolNotFound", "The specified pool does not exist.")
        headers = {"ETag": self._pool_etag, "Last-Modified": _rfc1123(self._created)}
        if request.method == "HEAD":
            return _empty(200, headers)
        return _json_response(200, select_fields(self._pool_json(), request.query.get("$select")), headers)

    # ------------------------------------------------------------------- jobs
    def _job_url(self, job: JobRecord) -> str:
        return f"{self.url}/jobs/{quote(job.id, safe='')}"

    def _job_json(self, job: JobRecord) -> dict[str, Any]:
        spec = job.spec
        out: dict[str, Any] = {
            "id": job.id,
            "url": self._job_url(job),
            "eTag": job.etag,
            "lastModified": format_time(job.last_modified),
            "creationTime": format_time(job.creation_time),
            "state": job.state,
            "stateTransitionTime": format_time(job.state_transition_time),
        }
        out.update(_previous_state(job))
        for name in ("displayName", "commonEnvironmentSettings", "metadata", "networkConfiguration"):
            if spec.get(name) is not None:
                out[name] = spec[name]
        constraints = spec.get("constraints") or {}
        out.update(
            {
                "priority": job.priority,
                "allowTaskPreemption": bool(spec.get("allowTaskPreemption", False)),
                "maxParallelTasks": job.max_parallel_tasks,
                "usesTaskDependencies": job.uses_task_dependencies,
                "constraints": {
                    "maxWallClockTime": constraints.get("maxWallClockTime") or UNLIMITED_DURATION,
                    "maxTaskRetryCount": job.max_task_retry_count,
                },
                "poolInfo": spec.get("poolInfo"),
                "onAllTasksComplete": job.on_all_tasks_complete,
                "onTaskFailure": spec.get("onTaskFailure") or "noaction",
            }
        )
        info: dict[str, Any] = {"startTime": format_time(job.creation_time), "poolId": job.pool_id}
        if job.end_time is not None:
            info["endTime"] = format_time(job.end_time)
        if job.terminate_reason is not None and job.state == "completed":
            info["terminateReason"] = job.terminate_reason
        out["executionInfo"] = info
        return out

    def _entity_headers(self, url: str, etag: str, last_modified: dt.datetime) -> dict[str, str]:
        return {"ETag": etag, "Last-Modified": _rfc1123(last_modified), "DataServiceId": url}

    def _apply_job_settings(self, job: JobRecord, body: Mapping[str, Any], *, creating: bool) -> None:
        """Validate and apply the job properties a create or update may set."""
        if "priority" in body or creating:
            job.priority = _int_property(body, "priority", 0, -1000, 1000)
        if "maxParallelTasks" in body or creating:
            parallel = _int_property(body, "maxParallelTasks", -1, -1, None)
            if parallel == 0:
                raise _invalid_value("maxParallelTasks", parallel, "must be -1 (no limit) or at least 1")
            job.max_parallel_tasks = parallel
        if "constraints" in body or creating:
            constraints = body.get("constraints") or {}
            if not isinstance(constraints, dict):
                raise _invalid_value("constraints", constraints, "must be an object")
            job.max_task_retry_count = _int_property(constraints, "maxTaskRetryCount", 0, -1, None)
            wall = constraints.get("maxWallClockTime")
            job.max_wall_clock_s = (
                parse_duration_s(wall, field_name="constraints.maxWallClockTime") if wall else None
            )
            elapsed = time.time() - job.creation_time.timestamp()
            job.deadline_mono = (
                time.monotonic() - elapsed + job.max_wall_clock_s if job.max_wall_clock_s is not None else None
            )
        if "onAllTasksComplete" in body or creating:
            value = body.get("onAllTasksComplete") or "noaction"
            if str(value).lower() not in ("noaction", "terminatejob"):
                raise _invalid_value("onAllTasksComplete", value, "must be noaction or terminatejob")
            job.on_all_tasks_complete = str(value).lower()
        if "onTaskFailure" in body:
            value = body.get("onTaskFailure") or "noaction"
            if str(value).lower() not in ("noaction", "performexitoptionsjobaction"):
                raise _invalid_value("onTaskFailure", value, "must be noaction or performexitoptionsjobaction")
        for name, value in body.items():
            if name != "id":
                job.spec[name] = value

    def _create_job(self, request: _Request) -> _Response:
        body = request.json()
        if not isinstance(body, dict):
            raise BatchServiceError(400, "InvalidRequestBody", "The request body must be a JSON object.")
        job_id = validate_id(body.get("id"), kind="job")
        _check_unsupported(body, _UNSUPPORTED_JOB_PROPERTIES)
        pool_info = body.get("poolInfo")
        if not isinstance(pool_info, dict):
            raise BatchServiceError(
                400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                {"PropertyName": "poolInfo"},
            )
        _check_unsupported(pool_info, ("autoPoolSpecification",))
        if not pool_info.get("poolId"):
            raise BatchServiceError(
                400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                {"PropertyName": "poolInfo.poolId"},
            )
        if job_id.lower() in self.store.jobs:
            raise BatchServiceError(409, "JobExists", "The specified job already exists.")
        self._check_job_quota()
        now = utc_now()
        job = JobRecord(
            id=job_id,
            seq=self.store.next_seq(),
            spec={},
            # Azure accepts a job on a pool that does not exist; its tasks just
            # never run until such a pool appears (and here none ever will).
            pool_id=str(pool_info["poolId"]),
            creation_time=now,
            etag=self.store.new_etag(),
            priority=0,
            max_task_retry_count=0,
            max_wall_clock_s=None,
            deadline_mono=None,
            on_all_tasks_complete="noaction",
            max_parallel_tasks=-1,
            state_transition_time=now,
            last_modified=now,
        )
        job.uses_task_dependencies = bool(body.get("usesTaskDependencies"))
        self._apply_job_settings(job, body, creating=True)
        self.store.jobs[job_id.lower()] = job
        self.node.recheck_job(job)
        url = self._job_url(job)
        return _empty(201, {**self._entity_headers(url, job.etag, now), "Location": url})

    def active_jobs(self) -> int:
        """Jobs that count against the active-job quota now (call under ``store.lock``)."""
        return sum(1 for job in self.store.jobs.values() if job.state in _QUOTA_STATES)

    def _check_job_quota(self) -> None:
        quota = self.active_job_quota
        if quota is not None and self.active_jobs() >= quota:
            raise BatchServiceError(
                409,
                "ActiveJobAndScheduleQuotaReached",
                "The account has reached its quota of active jobs and job schedules.",
            )

    def _get_job(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        body = select_fields(self._job_json(job), request.query.get("$select"))
        return _json_response(200, body, self._entity_headers(self._job_url(job), job.etag, job.last_modified))

    def _update_job(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        body = request.json() or {}
        if not isinstance(body, dict):
            raise BatchServiceError(400, "InvalidRequestBody", "The request body must be a JSON object.")
        self._require_mutable(job)
        _check_unsupported(body, ("poolInfo", "networkConfiguration"))
        if "usesTaskDependencies" in body:
            # Only Add Job sets it: a job's tasks cannot start depending on each other later.
            raise _invalid_value(
                "usesTaskDependencies", body["usesTaskDependencies"], "can be set only when the job is added"
            )
        self._apply_job_settings(job, body, creating=False)
        job.last_modified = utc_now()
        job.etag = self.store.new_etag()
        self.node.recheck_job(job)
        return _empty(200, self._entity_headers(self._job_url(job), job.etag, job.last_modified))

    def _list_jobs(self, request: _Request) -> _Response:
        jobs = sorted(self.store.jobs.values(), key=lambda job: job.seq)
        return self._page(request, "jobs", [(job.seq, self._job_json(job)) for job in jobs], "/jobs")

    @staticmethod
    def _require_mutable(job: JobRecord) -> None:
        if job.state == "completed":
            raise BatchServiceError(409, "JobCompleted", "The specified job is already in a completed state.")
        if job.state == "deleting":
            raise BatchServiceError(409, "JobBeingDeleted", "The specified job has been marked for deletion.")
        if job.state == "terminating":
            raise BatchServiceError(409, "JobBeingTerminated", "The specified job is being terminated.")

    def _terminate_job(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        body = request.json() or {}
        if job.state == "terminating":
            return _empty(202, self._entity_headers(self._job_url(job), job.etag, job.last_modified))
        self._require_mutable(job)
        reason = body.get("terminateReason") if isinstance(body, dict) else None
        self.node.terminate_job(job, str(reason) if reason else "UserTerminate")
        return _empty(202, self._entity_headers(self._job_url(job), job.etag, job.last_modified))

    def _delete_job(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        if job.state != "deleting":
            self.node.delete_job(job)
        return _empty(202)

    def _task_counts(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        counts = dict.fromkeys(("active", "running", "completed", "succeeded", "failed"), 0)
        slots = dict(counts)
        for task in job.tasks.values():
            keys = ["active" if task.state in ("active", "preparing") else task.state]
            if task.state == "completed":
                keys.append("succeeded" if task.result == "success" else "failed")
            for key in keys:
                counts[key] += 1
                slots[key] += task.required_slots
        return _json_response(200, {"taskCounts": counts, "taskSlotCounts": slots})

    # ------------------------------------------------------------------ tasks
    def _task_url(self, task: TaskRecord) -> str:
        return f"{self._job_url(task.job)}/tasks/{quote(task.id, safe='')}"

    def _task_json(self, task: TaskRecord) -> dict[str, Any]:
        spec = task.spec
        out: dict[str, Any] = {
            "id": task.id,
            "url": self._task_url(task),
            "eTag": task.etag,
            "creationTime": format_time(task.creation_time),
            "lastModified": format_time(task.last_modified),
            "state": task.state,
            "stateTransitionTime": format_time(task.state_transition_time),
        }
        out.update(_previous_state(task))
        out["commandLine"] = spec.get("commandLine")
        for name in (
            "displayName", "environmentSettings", "containerSettings", "userIdentity", "affinityInfo", "dependsOn",
            "exitConditions",
        ):
            if spec.get(name) is not None:
                out[name] = spec[name]
        constraints = spec.get("constraints") or {}
        out["constraints"] = {
            "maxWallClockTime": constraints.get("maxWallClockTime") or UNLIMITED_DURATION,
            "retentionTime": constraints.get("retentionTime") or DEFAULT_RETENTION,
            "maxTaskRetryCount": task.max_task_retry_count,
        }
        out["requiredSlots"] = task.required_slots
        info: dict[str, Any] = {"retryCount": task.retry_count, "requeueCount": 0}
        optional = {
            "startTime": task.start_time and format_time(task.start_time),
            "endTime": task.end_time and format_time(task.end_time),
            "lastRetryTime": task.last_retry_time and format_time(task.last_retry_time),
            "exitCode": task.exit_code,
            "failureInfo": task.failure_info,
            "result": task.result,
        }
        info.update({k: v for k, v in optional.items() if v is not None})
        out["executionInfo"] = info
        if task.ran_on_node:
            node = self.node
            root = f"workitems/{task.job.id}/job-1/{task.id}"
            node_url = f"{self.url}/pools/{quote(self.pool_id, safe='')}/nodes/{node.node_id}"
            out["nodeInfo"] = {
                "affinityId": f"TVM:{node.node_id}",
                "nodeUrl": node_url,
                "poolId": self.pool_id,
                "nodeId": node.node_id,
                "taskRootDirectory": root,
                "taskRootDirectoryUrl": f"{node_url}/files/{root}",
            }
        return out

    def _new_task(self, job: JobRecord, body: Any, now: dt.datetime | None = None) -> TaskRecord:
        """Validate a task body and build its record (not yet added to the job).

        ``now``: its creation time (the tasks of one collection share the request's).
        """
        if not isinstance(body, dict):
            raise BatchServiceError(400, "InvalidRequestBody", "Each task must be a JSON object.")
        task_id = validate_id(body.get("id"), kind="task")
        command = body.get("commandLine")
        if not isinstance(command, str) or not command.strip():
            raise BatchServiceError(
                400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                {"PropertyName": "commandLine"},
            )
        _check_unsupported(body, _UNSUPPORTED_TASK_PROPERTIES)
        _depends.validate(job, body)
        constraints = body.get("constraints") or {}
        if not isinstance(constraints, dict):
            raise _invalid_value("constraints", constraints, "must be an object")
        wall = constraints.get("maxWallClockTime")
        wall_s = parse_duration_s(wall, field_name="constraints.maxWallClockTime") if wall else None
        if constraints.get("retentionTime"):
            parse_duration_s(constraints["retentionTime"], field_name="constraints.retentionTime")
        # A task without its own retry limit inherits the job's.
        retries = _int_property(constraints, "maxTaskRetryCount", job.max_task_retry_count, -1, None)
        required_slots = _int_property(body, "requiredSlots", 1, 1, None)
        if task_id.lower() in job.tasks:
            raise BatchServiceError(409, "TaskExists", "The specified task already exists.")
        now = now or utc_now()
        return TaskRecord(
            job=job,
            id=task_id,
            seq=self.store.next_seq(),
            spec={k: v for k, v in body.items() if k != "id"},
            creation_time=now,
            etag=self.store.new_etag(),
            required_slots=required_slots,
            max_task_retry_count=retries,
            max_wall_clock_s=wall_s,
            state_transition_time=now,
            last_modified=now,
        )

    def _add_task(self, job: JobRecord, task: TaskRecord) -> None:
        job.tasks[task.id.lower()] = task
        self.node.submit(task)

    def _create_task(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        self._require_mutable(job)
        task = self._new_task(job, request.json())
        self._add_task(job, task)
        url = self._task_url(task)
        return _empty(201, {**self._entity_headers(url, task.etag, task.last_modified), "Location": url})

    def _create_task_collection(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        self._require_mutable(job)
        body = request.json()
        values = body.get("value") if isinstance(body, dict) else None
        if not isinstance(values, list):
            raise BatchServiceError(
                400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                {"PropertyName": "value"},
            )
        if len(values) > _MAX_TASKS_PER_COLLECTION:
            raise _invalid_value(
                "value", f"{len(values)} tasks", f"at most {_MAX_TASKS_PER_COLLECTION} tasks per request"
            )
        results: list[dict[str, Any]] = []
        # One request, one instant: its tasks share the creation time, and a
        # task id (validated: letters, digits, '-', '_') needs no quoting in its URL.
        now = utc_now()
        modified = format_time(now)
        tasks_url = f"{self._job_url(job)}/tasks/"
        for item in values:
            raw_id = item.get("id") if isinstance(item, dict) else None
            try:
                task = self._new_task(job, item, now)
            except BatchServiceError as exc:
                results.append({"status": "clienterror", "taskId": str(raw_id), "error": exc.to_json()})
                continue
            self._add_task(job, task)
            results.append(
                {
                    "status": "success",
                    "taskId": task.id,
                    "eTag": task.etag,
                    "lastModified": modified,
                    "location": tasks_url + task.id,
                }
            )
        return _json_response(200, {"value": results})

    def _list_tasks(self, request: _Request, job_id: str) -> _Response:
        job = self.store.get_job(job_id)
        tasks = sorted(job.tasks.values(), key=lambda task: task.seq)
        lag = self.hooks.profile.visibility_lag_s
        if lag:
            # Azure's lists are eventually consistent: a just-added task may be missing.
            newest = utc_now() - dt.timedelta(seconds=lag)
            tasks = [task for task in tasks if task.creation_time <= newest]
        path = f"/jobs/{quote(job.id, safe='')}/tasks"
        return self._page(request, "tasks", [(task.seq, self._task_json(task)) for task in tasks], path)

    def _page(self, request: _Request, kind: str, items: list[tuple[int, dict[str, Any]]], path: str) -> _Response:
        """Filter, select and page a list; the skip token is the last seq returned.

        A sequence number rather than an offset keeps paging stable while tasks
        change state under a filter between two page requests.
        """
        query = request.query
        predicate = None
        if query.get("$filter"):
            try:
                predicate = compile_filter(query["$filter"])
            except FilterError as exc:
                raise BatchServiceError(
                    400,
                    "InvalidQueryParameterValue",
                    "Value for one of the query parameters specified in the request URI is invalid.",
                    {"QueryParameterName": "$filter", "QueryParameterValue": query["$filter"], "Reason": str(exc)},
                ) from exc
        max_results = self._query_int(query, "maxresults", _MAX_RESULTS, 1)
        skip = self._query_int(query, "$skiptoken", 0, 0)
        page: list[dict[str, Any]] = []
        last_seq = None
        more = False
        for seq, item in items:
            if seq <= skip or (predicate is not None and not predicate(item)):
                continue
            if len(page) == min(max_results, _MAX_RESULTS):
                more = True
                break
            page.append(select_fields(item, query.get("$select")))
            last_seq = seq
        payload: dict[str, Any] = {"odata.metadata": f"{self.url}/$metadata#{kind}", "value": page}
        if more:
            kept = ("$filter", "$select", "$expand", "maxresults", "recursive")
            params = {k: v for k, v in query.items() if k in kept}
            params.update({"api-version": query["api-version"], "$skiptoken": str(last_seq)})
            payload["odata.nextLink"] = f"{self.url}{path}?{urlencode(params, quote_via=quote)}"
        return _json_response(200, payload)

    @staticmethod
    def _query_int(query: Mapping[str, str], name: str, default: int, low: int) -> int:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if value < low:
            raise BatchServiceError(
                400,
                "InvalidQueryParameterValue",
                "Value for one of the query parameters specified in the request URI is invalid.",
                {"QueryParameterName": name, "QueryParameterValue": raw},
            )
        return value

    def _get_task(self, request: _Request, job_id: str, task_id: str) -> _Response:
        task = self.store.get_task(job_id, task_id)
        body = select_fields(self._task_json(task), request.query.get("$select"))
        return _json_response(200, body, self._entity_headers(self._task_url(task), task.etag, task.last_modified))

    def _delete_task(self, request: _Request, job_id: str, task_id: str) -> _Response:
        task = self.store.get_task(job_id, task_id)
        self.node.delete_task(task)
        return _empty(200)

    def _terminate_task(self, request: _Request, job_id: str, task_id: str) -> _Response:
        task = self.store.get_task(job_id, task_id)
        if task.state == "completed":
            raise BatchServiceError(409, "TaskCompleted", "The specified task is already in a completed state.")
        self.node.terminate_task(task)
        return _empty(204, self._entity_headers(self._task_url(task), task.etag, task.last_modified))

    # ------------------------------------------------------------------ files
    def _resolve_file(self, task: TaskRecord, rel: str) -> Path:
        task_dir = self.node.task_dir(task.job.id, task.id).resolve()
        target = (task_dir / rel).resolve()
        if rel.startswith("/") or not target.is_relative_to(task_dir) or not target.exists():
            raise BatchServiceError(404, "FileNotFound", "The specified file does not exist.", {"FilePath": rel})
        return target

    def _file_url(self, task: TaskRecord, rel: str) -> str:
        return f"{self._task_url(task)}/files/{quote(rel, safe='')}"

    def _file_properties(self, path: Path) -> tuple[os.stat_result, str]:
        info = path.stat()
        created = getattr(info, "st_birthtime", info.st_ctime)
        return info, _rfc1123(created)

    def _task_file(self, request: _Request, job_id: str, task_id: str, rel: str) -> _Response:
        task = self.store.get_task(job_id, task_id)
        path = self._resolve_file(task, rel)
        info, created = self._file_properties(path)
        is_dir = stat.S_ISDIR(info.st_mode)
        headers = {
            "ocp-creation-time": created,
            "Last-Modified": _rfc1123(info.st_mtime),
            "ocp-batch-file-isdirectory": "true" if is_dir else "false",
            "ocp-batch-file-url": self._file_url(task, rel),
            "ocp-batch-file-mode": format(info.st_mode, "o"),
            "Content-Type": "application/octet-stream",
        }
        if request.method == "HEAD" or is_dir:
            headers["Content-Length"] = "0" if is_dir else str(info.st_size)
            return _Response(200, b"", headers)
        data = path.read_bytes()
        byte_range = request.headers.get("ocp-range") or request.headers.get("Ocp-Range")
        if byte_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())
            if match is None:
                raise BatchServiceError(400, "InvalidRange", "The specified byte range is invalid.")
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            data = data[start:end]
        return _Response(200, data, headers)

    def _list_task_files(self, request: _Request, job_id: str, task_id: str) -> _Response:
        task = self.store.get_task(job_id, task_id)
        task_dir = self.node.task_dir(task.job.id, task.id)
        recursive = request.query.get("recursive", "false").lower() == "true"
        paths: list[Path] = []
        if task_dir.is_dir():
            paths = sorted(task_dir.rglob("*") if recursive else task_dir.iterdir())
        items: list[tuple[int, dict[str, Any]]] = []
        for index, path in enumerate(paths, start=1):
            rel = path.relative_to(task_dir).as_posix()
            info, _ = self._file_properties(path)
            is_dir = stat.S_ISDIR(info.st_mode)
            entry: dict[str, Any] = {"name": rel, "url": self._file_url(task, rel), "isDirectory": is_dir}
            if not is_dir:
                created = getattr(info, "st_birthtime", info.st_ctime)
                entry["properties"] = {
                    "creationTime": _from_timestamp(created),
                    "lastModified": _from_timestamp(info.st_mtime),
                    # int64 travels as a string in this API (format "str" in the SDK model).
                    "contentLength": str(info.st_size),
                    "contentType": "application/octet-stream",
                    "fileMode": format(info.st_mode, "o"),
                }
            items.append((index, entry))
        list_path = f"/jobs/{quote(task.job.id, safe='')}/tasks/{quote(task.id, safe='')}/files"
        return self._page(request, "files", items, list_path)


def _previous_state(record: Any) -> dict[str, Any]:
    """Azure's ``previousState`` fields of a job or task, once it has left its first state."""
    if record.previous_state is None or record.previous_state_transition_time is None:
        return {}
    return {
        "previousState": record.previous_state,
        "previousStateTransitionTime": format_time(record.previous_state_transition_time),
    }
