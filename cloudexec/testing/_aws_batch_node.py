"""The AWS Batch emulator's container host: runs job attempts as local processes.

The scheduler (:mod:`cloudexec.testing._aws_batch_scheduler`) decides *what*
runs; this module is the ECS agent and the awslogs driver: it starts an
attempt's command (through :mod:`cloudexec._process`, the one place that
starts, measures and kills local processes), enforces its timeout (SIGTERM,
then SIGKILL after a grace period) and memory limit (resident memory of the
whole process tree), forwards its output to CloudWatch Logs, and reports the
attempts whose process ended. Every method is called with the scheduler's
lock held.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import uuid
from typing import IO, Any

from cloudexec import _forkserver, _process
from cloudexec.testing._aws_batch_model import LOG_GROUP, Job, now_ms

__all__ = ["EMULATOR_ENV", "Attempt", "Node"]

# A timed-out container gets SIGTERM, then SIGKILL 30 s later (job_timeouts.html);
# the grace period is scaled like the timeout itself.
_SIGTERM_GRACE_S = 30.0
WATCH_INTERVAL_S = 0.02
_LOG_FLUSH_INTERVAL_S = 0.25

# What the runner needs in an AWS job, imported once by the fork server.
FORKSERVER_PRELOAD = ("cloudexec._storage", "dill", "fsspec", "s3fs")
FORKSERVER_WARMUPS = (
    f"{__name__}:share_botocore_data",
    f"{__name__}:share_tls_contexts",
    f"{__name__}:copy_builtin_handlers",
    f"{__name__}:compile_s3fs_patterns",
)

# Variables pointing a job at the emulator; they override any job definition's.
EMULATOR_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def share_botocore_data() -> None:
    """Fork-server warm-up: parse botocore's data files once, for every job's sessions.

    Creating an S3 client parses about a megabyte of JSON (endpoints, the S3
    model and its rule set): ~0.3 s, more than the rest of a trivial job. The
    server parses it once into one loader, and every botocore session a forked
    job creates uses that loader (a cache of parsed files: no connection,
    thread or event loop), as a process sharing one loader between sessions
    does.
    """
    import botocore.loaders
    import botocore.session

    loader = botocore.loaders.create_loader()
    session = botocore.session.get_session()
    session.register_component("data_loader", loader)
    # Creating a client reads everything an S3 client needs; it opens no connection.
    session.create_client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9", aws_access_key_id="x", aws_secret_access_key="x"
    )
    default = botocore.session.create_loader

    def shared_loader(search_path_string: str | None = None) -> botocore.loaders.Loader:
        return loader if search_path_string is None else default(search_path_string)

    botocore.session.create_loader = shared_loader
    # Each job's first request matches its region against every partition's pattern.
    for partition in loader.load_data("partitions").get("partitions", []):
        if isinstance(partition.get("regionRegex"), str):
            re.compile(partition["regionRegex"])


def share_tls_contexts() -> None:
    """Fork-server warm-up: build aiobotocore's TLS contexts once, for every job's clients.

    Each S3 client a job creates builds a TLS context and loads the CA bundle
    into it (~20 ms, a fifth of a trivial job's CPU), even for the emulator's
    plain-HTTP endpoint. The contexts are built from the client's settings
    alone (its ``verify``: on, off or a CA bundle path; ``SSLKEYLOGFILE``), so
    clients with the same settings get the same context, the default one
    built here before any job forks. A client with a client certificate or a
    proxy builds its own, as before. A context is a configuration, not a
    connection: it survives a fork.
    """
    from aiobotocore.httpsession import AIOHTTPSession

    build = AIOHTTPSession._build_ssl_contexts
    built: dict[tuple[Any, str | None], Any] = {}

    def shared_ssl_contexts(self: AIOHTTPSession, proxy_url: str | None) -> Any:
        if proxy_url is not None or self._cert_file is not None or not isinstance(self._verify, (bool, str)):
            return build(self, proxy_url)
        key = (self._verify, os.environ.get("SSLKEYLOGFILE"))
        contexts = built.get(key)
        if contexts is None:
            contexts = built[key] = build(self, proxy_url)
        return contexts

    AIOHTTPSession._build_ssl_contexts = shared_ssl_contexts
    shared_ssl_contexts(AIOHTTPSession(), None)


def copy_builtin_handlers() -> None:
    """Fork-server warm-up: a job's new aiobotocore sessions copy their built-in event handlers.

    A session registers botocore's ~130 built-in handlers one by one, each
    checked by ``inspect`` (~5 ms a session, and s3fs makes one per job).
    The server registers them once on a template; a new session whose
    emitter is still empty gets a copy of the template's (what botocore does
    itself when a client copies its session's handlers). Any other session
    registers them as before.
    """
    import copy

    from aiobotocore.session import AioSession

    register = AioSession._register_builtin_handlers
    template = AioSession()._original_handler  # registered the usual way, before the patch

    def register_by_copy(self: AioSession, events: Any) -> None:
        emitter = self._original_handler
        if type(emitter) is not type(template) or not _empty_emitter(emitter):
            register(self, events)
            return
        state = copy.copy(template).__dict__
        state["_lookup_cache"] = {}  # the copy's own: emit() fills it
        emitter.__dict__.update(state)

    AioSession._register_builtin_handlers = register_by_copy


def compile_s3fs_patterns() -> None:
    """Fork-server warm-up: compile the patterns s3fs splits every path with (~3 ms a job), into ``re``'s cache."""
    from s3fs.core import S3FileSystem

    S3FileSystem._find_bucket_key(None, "bucket/key")  # it uses no instance state


def _empty_emitter(emitter: Any) -> bool:
    root = emitter._handlers._root
    return not emitter._unique_id_handlers and not root["children"] and not root["values"]


class Attempt:
    """One running container: a local process plus its log bookkeeping."""

    __slots__ = (
        "proc",
        "task_id",
        "stream",
        "task_arn",
        "instance_arn",
        "workdir",
        "reader",
        "tail",
        "started_ms",
        "deadline",
        "memory_limit",
        "next_sample",
        "next_flush",
        "stop_kind",
        "stop_reason",
    )

    def __init__(
        self,
        *,
        proc: _process.Process,
        task_id: str,
        stream: str,
        task_arn: str,
        instance_arn: str,
        workdir: str,
        reader: IO[bytes],
        started_ms: int,
        deadline: float | None,
        memory_limit: int | None,
    ) -> None:
        self.proc = proc
        self.task_id = task_id
        self.stream = stream
        self.task_arn = task_arn
        self.instance_arn = instance_arn
        self.workdir = workdir
        self.reader = reader
        self.tail = b""
        self.started_ms = started_ms
        self.deadline = deadline
        self.memory_limit = memory_limit
        self.next_sample = 0.0
        self.next_flush = 0.0
        # None while running normally; "timeout", "oom" or "terminate" once we kill it.
        self.stop_kind: str | None = None
        self.stop_reason: str | None = None


class Node:
    """Runs, watches and cleans up attempts for the scheduler.

    Args:
        region: The emulated region (for ECS ARNs).
        account_id: The emulated account (for ECS ARNs).
        scratch_dir: Where attempts get their working directories and log files.
        moto_lock: moto's lock, taken to write CloudWatch Logs.
    """

    def __init__(self, *, region: str, account_id: str, scratch_dir: str, moto_lock: threading.RLock) -> None:
        self._region = region
        self._account_id = account_id
        self._scratch = scratch_dir
        self._moto_lock = moto_lock
        self._cluster = f"cloudexec-{secrets.token_hex(4)}"
        self.base_env: dict[str, str] = {}
        self.logs: Any = None
        self.timeout_scale = 1.0
        self.running: dict[str, Job] = {}
        self.forks: _forkserver.ForkServer | None = None
        """Forks the runner's processes once the first job starts (None: switched off)."""

    def launch(self, job: Job, now: float) -> str | None:
        """Start an attempt of ``job`` (already RUNNING); return why it could not start, if so.

        On failure the attempt is recorded in ``job.attempts`` as AWS records a
        ``CannotStartContainerError``.
        """
        spec = job.spec
        task_id = uuid.uuid4().hex
        stream = f"{spec.definition_name}/default/{task_id}"
        ecs = f"arn:aws:ecs:{self._region}:{self._account_id}"
        task_arn = f"{ecs}:task/{self._cluster}/{task_id}"
        instance_arn = f"{ecs}:container-instance/{self._cluster}/{uuid.uuid4().hex}"
        job.log_stream, job.task_arn, job.instance_arn = stream, task_arn, instance_arn
        started_ms = job.started_ms or now_ms()
        with self._moto_lock:
            self.logs.ensure_log_stream(LOG_GROUP, stream)

        env = dict(self.base_env)
        env.update(spec.environment)
        env.update(
            {
                "AWS_BATCH_JOB_ID": job.job_id,
                "AWS_BATCH_JOB_ATTEMPT": str(job.attempts_started),
                "AWS_BATCH_JQ_NAME": spec.queue_name,
                "AWS_BATCH_CE_NAME": spec.ce_name,
            }
        )
        if job.index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(job.index)
        # The emulator's endpoint and credentials win over anything a definition sets:
        # a job must never reach real AWS.
        for key in EMULATOR_ENV:
            if key in self.base_env:
                env[key] = self.base_env[key]

        # Each attempt gets a fresh working directory, like a fresh container.
        workdir = os.path.join(self._scratch, task_id)
        log_path = workdir + ".log"
        try:
            os.mkdir(workdir)
            if not spec.argv:
                raise FileNotFoundError("the job has no command (no override and none in the job definition)")
            if self.forks is None and _forkserver.enabled():
                # Started from the scheduler thread, which lives as long as the emulator.
                self.forks = _forkserver.ForkServer(
                    self.base_env, FORKSERVER_PRELOAD, warmups=FORKSERVER_WARMUPS, name="AWS Batch emulator"
                )
            with open(log_path, "wb") as out:
                proc = _forkserver.start(
                    self.forks, spec.argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
                )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            reason = f"CannotStartContainerError: {exc}"
            job.attempts.append(
                {
                    "container": {
                        "containerInstanceArn": instance_arn,
                        "taskArn": task_arn,
                        "reason": reason,
                        "logStreamName": stream,
                        "networkInterfaces": [],
                    },
                    "startedAt": started_ms,
                    "stoppedAt": now_ms(),
                    "statusReason": reason,
                }
            )
            job.exit_code = None
            job.container_reason = reason
            return reason
        memory_limit = spec.memory_mib * 1024 * 1024 if spec.memory_mib else None
        job.attempt = Attempt(
            proc=proc,
            task_id=task_id,
            stream=stream,
            task_arn=task_arn,
            instance_arn=instance_arn,
            workdir=workdir,
            reader=open(log_path, "rb"),  # noqa: SIM115 - closed when the attempt ends
            started_ms=started_ms,
            deadline=now + spec.attempt_timeout_s if spec.attempt_timeout_s else None,
            memory_limit=memory_limit,
        )
        self.running[job.job_id] = job
        return None

    def poll(self, now: float) -> list[tuple[Job, Attempt, int]]:
        """Enforce timeouts and memory limits, forward logs; return attempts that ended.

        An ended attempt is cleaned up (process group killed and reaped, last log
        lines forwarded, working directory removed) before it is returned with its
        exit code, so a client that sees the job finished also sees its whole log.
        """
        ended: list[tuple[Job, Attempt, int]] = []
        for job in list(self.running.values()):
            attempt = job.attempt
            if attempt is None:
                self.running.pop(job.job_id, None)
                continue
            proc = attempt.proc
            if not proc.exited():
                if attempt.stop_kind is None:
                    if attempt.deadline is not None and now >= attempt.deadline:
                        attempt.stop_kind = "timeout"
                        proc.terminate(_SIGTERM_GRACE_S * self.timeout_scale, now)
                    elif attempt.memory_limit is not None and now >= attempt.next_sample:
                        attempt.next_sample = now + WATCH_INTERVAL_S
                        if proc.rss_bytes() > attempt.memory_limit:
                            attempt.stop_kind = "oom"
                            proc.kill()
                else:
                    proc.escalate(now)
                if now >= attempt.next_flush:
                    attempt.next_flush = now + _LOG_FLUSH_INTERVAL_S
                    self._flush_logs(attempt, final=False)
                continue
            code = proc.reap()
            self._clean_up(job, attempt)
            ended.append((job, attempt, code))
        return ended

    def stop(self, job: Job, kind: str, reason: str) -> bool:
        """Kill a running attempt for ``kind`` (e.g. ``"terminate"``); False if none runs.

        docker stop would send SIGTERM first; AWS reports 137 for a terminated
        job, i.e. the container ends up SIGKILLed, which is what this does.
        """
        attempt = job.attempt
        if attempt is None or attempt.stop_kind is not None:
            return False
        attempt.stop_kind = kind
        attempt.stop_reason = reason
        attempt.proc.kill()
        return True

    def discard(self, job: Job) -> None:
        """Kill and forget a job's attempt without reporting it (metadata expiry)."""
        attempt = job.attempt
        if attempt is None:
            return
        attempt.proc.stop_now()
        self._clean_up(job, attempt, final_logs=False)

    def close(self) -> None:
        """Kill every running attempt and wait for it."""
        running = list(self.running.values())
        for job in running:
            if job.attempt is not None:
                job.attempt.proc.kill()
        for job in running:
            if job.attempt is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.attempt.proc.reap(timeout=5)
                job.attempt.reader.close()
                job.attempt = None
        self.running.clear()
        if self.forks is not None:
            self.forks.close()

    def _clean_up(self, job: Job, attempt: Attempt, *, final_logs: bool = True) -> None:
        if final_logs:
            self._flush_logs(attempt, final=True)
        attempt.reader.close()
        shutil.rmtree(attempt.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(attempt.workdir + ".log")
        self.running.pop(job.job_id, None)
        job.attempt = None

    def _flush_logs(self, attempt: Attempt, *, final: bool) -> None:
        data = attempt.reader.read()
        if not data and not (final and attempt.tail):
            return
        lines = (attempt.tail + data).split(b"\n")
        attempt.tail = lines.pop()
        if final and attempt.tail:
            lines.append(attempt.tail)
            attempt.tail = b""
        stamp = now_ms()
        # The awslogs driver sends one event per line and drops empty ones.
        events = [
            {"timestamp": stamp, "message": line.decode("utf-8", "replace").rstrip("\r")}
            for line in lines
            if line.strip(b"\r")
        ]
        if events:
            with self._moto_lock:
                self.logs.put_log_events(LOG_GROUP, attempt.stream, events)
