"""An offline AWS Batch for your own test suites: moto's server plus real local processes.

``aws_batch_emulator()`` starts moto's ``ThreadedMotoServer`` on 127.0.0.1, creates a
bucket, an IAM role, a managed compute environment, a job queue and a job definition
in it, and runs every submitted job's container command as a local process (no
Docker is needed). Everything is observable through plain boto3 calls::

    with aws_batch_emulator(timeout_scale=0.02) as emu:
        batch = emu.client("batch")
        job = batch.submit_job(
            jobName="hello",
            jobQueue=emu.job_queue,
            jobDefinition=emu.job_definition,
            containerOverrides={"command": ["python", "-c", "print('hi')"]},
        )

How a request flows::

    your boto3 / s3fs / the job's own boto3 (AWS_ENDPOINT_URL)
        |  HTTP to 127.0.0.1:<port>
        v
    _Gateway (WSGI middleware) -- pins the emulator's own moto account, counts
        |                         Batch calls, injects throttling, serializes moto
        |
        |-- SubmitJob  DescribeJobs  ListJobs  -->  _JobService: job state and ONE
        |   CancelJob  TerminateJob                 scheduler thread
        |   (RegisterJobDefinition is only            | SUBMITTED..RUNNABLE (dwell, deps)
        |    validated, then passed on)               | vCPU packing -> STARTING
        |                                             | Popen(new session) -> RUNNING
        v                                             | timeout / OOM / terminate -> kill
    moto: S3, IAM, CloudWatch Logs,  <-- log lines ---+ retries -> RUNNABLE again
          queues, job definitions        /aws/batch/job/<jobDef>/default/<taskId>

Why the job API is answered here rather than by moto (facts observed on moto 5.2):
moto runs jobs in Docker (none here), or with ``use_docker=False`` marks them
SUCCEEDED without running anything; it starts one thread per job (a 10,000-child
array costs ~9,000 threads and 16 s inside SubmitJob); it omits ``container.exitCode``
and status reasons, ignores ``retryStrategy``, never fails an array parent, skips
RUNNABLE, does not paginate ListJobs, grows the job environment on every describe and
is not thread-safe. moto still stores everything else (definitions, queues, S3,
logs), and the job API reads definitions and queues from it, so the two agree.

The moto internals used here (the server class, backend lookups, the logs backend,
the ``x-moto-account-id`` header) were verified on moto >=5.0,<5.3; another version
fails loudly at import rather than misbehaving quietly.

Known differences from AWS Batch:

* One pool of ``max_vcpus`` serves every queue and compute environment; queue
  priorities, fair-share policies and ``schedulingPriority`` are ignored (FIFO with
  backfill). GPU requirements are ignored.
* Memory limits are enforced on Linux only (RSS of the process group from /proc,
  sampled every 20 ms; a page shared by forked processes counts in each of them).
* Only container jobs run; multi-node, EKS and ECS-properties jobs are rejected.
* Jobs run with this interpreter and, by default, this process's import path, as if
  the code under test were baked into the job image. There is no image isolation.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import heapq
import io
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
import moto
from werkzeug.serving import WSGIRequestHandler, make_server

if TYPE_CHECKING:
    from cloudexec.providers.aws import AWSBatchExecutor

__all__ = ["AWSBatchEmulator", "aws_batch_emulator"]

_log = logging.getLogger(__name__)

# The moto internals this module touches were read and tested on these versions.
_MOTO_MIN = (5, 0)
_MOTO_MAX_EXCLUSIVE = (5, 3)


def _check_moto_version() -> None:
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
_check_moto_version()

from moto.backends import get_backend  # noqa: E402
from moto.core.base_backend import BackendDict  # noqa: E402
from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402

_STATUSES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")
_NOT_STARTED = frozenset({"SUBMITTED", "PENDING", "RUNNABLE"})
_TERMINAL = frozenset({"SUCCEEDED", "FAILED"})

# Status reasons as AWS Batch words them.
_REASON_EXITED = "Essential container in task exited"
_REASON_OOM = "OutOfMemoryError: Container killed due to memory usage"
_REASON_TIMEOUT = "Job attempt duration exceeded timeout"
_REASON_CHILD_FAILED = "Array Child Job failed"
_REASON_DEPENDENCY_FAILED = "Dependent Job failed"
_REASON_OVERRIDES_TOO_LONG = "Container Overrides length must be at most 8192"

_LOG_GROUP = "/aws/batch/job"
_MAX_ARRAY_SIZE = 10_000
_MAX_DESCRIBE_IDS = 100
_MIN_ATTEMPT_DURATION_S = 60
_MAX_ATTEMPTS = 10
# AWS rejects a SubmitJob whose request exceeds 30 KiB ("Job size must be less than
# 30 KiB"), and fails the job when ECS refuses overrides longer than 8192 characters.
_MAX_SUBMIT_BYTES = 30 * 1024
_MAX_OVERRIDES_CHARS = 8192
# ListJobs page caps from the API reference: up to 100 results with `filters`, up to
# 1000 with `jobStatus` or with neither.
_LIST_PAGE_FILTERS = 100
_LIST_PAGE_STATUS = 1000
_LIST_FILTERS = frozenset({"JOB_NAME", "JOB_DEFINITION", "BEFORE_CREATED_AT", "AFTER_CREATED_AT"})
# A timed-out container gets SIGTERM, then SIGKILL 30 s later (job_timeouts.html);
# the grace period is scaled like the timeout itself.
_SIGTERM_GRACE_S = 30.0
_WATCH_INTERVAL_S = 0.02
_LOG_FLUSH_INTERVAL_S = 0.25
# How far past the head of the RUNNABLE queue the scheduler looks for a job that fits
# the free vCPUs; bounded so a 10,000-job queue costs little per scheduling pass.
_BACKFILL_WINDOW = 64

_JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_CREDENTIAL_SCOPE_RE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
_PYTHON_NAMES = frozenset({"python", "python3"})
_ENV_PASSTHROUGH = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "USER",
    "LOGNAME",
    "SYSTEMROOT",
    "SYSTEMDRIVE",
    "WINDIR",
    "COMSPEC",
    "PATHEXT",
)

# Variables pointing a job at the emulator; they override any job definition's.
_EMULATOR_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


# --------------------------------------------------------------------------- public


class AWSBatchEmulator:
    """A running AWS Batch emulator; obtained from :func:`aws_batch_emulator`.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>`` serving every AWS service moto
            knows, with Batch jobs really executed.
        region: The emulated region.
        access_key_id: Fake access key (``"testing"``).
        secret_access_key: Fake secret key (``"testing"``).
        account_id: The moto account holding this emulator's resources; each
            emulator gets its own so several can run in one process.
        bucket: Name of the S3 bucket created for job input/output.
        io_url: ``s3://<bucket>/cloudexec``, the prefix executors should use.
        job_queue: ARN of the job queue.
        job_definition: ARN of the default job definition (command
            ``["python", "-m", "cloudexec.runner"]``, 1 vCPU, 2048 MiB).
        compute_environment: ARN of the managed compute environment.
        max_vcpus: vCPUs the compute environment offers; jobs wait in RUNNABLE
            when they do not fit.
        timeout_scale: Factor applied to ``attemptDurationSeconds`` (and to the
            30 s SIGTERM grace period) to get real seconds.
        state_dwell_s: Minimum time a job spends in each status before the next.
        startup_s: Wall time :func:`aws_batch_emulator` took to become ready.
    """

    def __init__(
        self,
        *,
        endpoint_url: str,
        region: str,
        account_id: str,
        bucket: str,
        job_queue: str,
        job_definition: str,
        compute_environment: str,
        max_vcpus: int,
        timeout_scale: float,
        state_dwell_s: float,
        service: _JobService,
        api: _BatchApi,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.access_key_id = "testing"
        self.secret_access_key = "testing"
        self.account_id = account_id
        self.bucket = bucket
        self.io_url = f"s3://{bucket}/cloudexec"
        self.job_queue = job_queue
        self.job_definition = job_definition
        self.compute_environment = compute_environment
        self.max_vcpus = max_vcpus
        self.timeout_scale = timeout_scale
        self.state_dwell_s = state_dwell_s
        self.startup_s = 0.0
        self._service = service
        self._api = api
        self._client_lock = threading.Lock()
        self._client_session: boto3.Session | None = None

    def __repr__(self) -> str:
        return (
            f"AWSBatchEmulator(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"job_queue={self.job_queue!r}, max_vcpus={self.max_vcpus})"
        )

    def session(self) -> boto3.Session:
        """Returns a new boto3 session with the emulator's fake credentials and region.

        Clients and resources made from it default to ``endpoint_url``, so a client
        created without an endpoint still talks to the emulator, never to AWS.

        Returns:
            A ``boto3.Session`` (subclass) bound to the emulator.
        """
        return _make_session(self.endpoint_url, self.access_key_id, self.secret_access_key, self.region)

    def client(self, service: str, **kwargs: Any) -> Any:
        """Returns a boto3 client for ``service`` bound to the emulator.

        Args:
            service: The AWS service name, e.g. ``"batch"``, ``"s3"``, ``"logs"``.
            **kwargs: Passed to ``boto3.Session.client`` (e.g. ``config=``).

        Returns:
            A botocore client whose endpoint is ``endpoint_url``.
        """
        kwargs.setdefault("endpoint_url", self.endpoint_url)
        # boto3 sessions are not safe to create clients from concurrently.
        with self._client_lock:
            if self._client_session is None:
                self._client_session = self.session()
            # Typed as Any so the call checks the same with or without boto3 stubs
            # installed (their overloads reject a service name known only at run time).
            session: Any = self._client_session
            return session.client(service, **kwargs)

    def s3fs_options(self) -> dict[str, Any]:
        """Returns keyword arguments for ``s3fs.S3FileSystem`` reaching the emulator.

        The region is deliberately left out of ``client_kwargs``: with a region there,
        s3fs sends a location constraint that breaks bucket creation.

        Returns:
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``.
        """
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def env(self) -> dict[str, str]:
        """Returns the environment variables a subprocess needs to reach the emulator.

        Returns:
            ``AWS_ENDPOINT_URL``, the fake credentials and the region variables.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def executor(self, **kwargs: Any) -> AWSBatchExecutor:
        """Returns a ``cloudexec.providers.aws.AWSBatchExecutor`` wired to the emulator.

        Args:
            **kwargs: Extra executor settings, passed through unchanged.

        Returns:
            An executor submitting to this emulator's queue and definition, with its
            payloads under ``io_url``.
        """
        # Imported here: the provider pulls in the whole client library, which users
        # of the bare emulator do not need.
        from cloudexec.providers.aws import AWSBatchExecutor

        options: dict[str, Any] = {
            "job_queue": self.job_queue,
            "job_definition": self.job_definition,
            "io_bucket": self.io_url,
            "session": self.session(),
            "endpoint_url": self.endpoint_url,
        }
        options.update(kwargs)  # the caller's values win, e.g. a wrong queue in a test
        return AWSBatchExecutor(**options)

    @property
    def api_calls(self) -> dict[str, int]:
        """A snapshot of Batch API calls received, per action (e.g. ``"DescribeJobs"``).

        Throttled calls are counted too: they reached the service.
        """
        return self._api.snapshot_calls()

    def reset_api_calls(self) -> None:
        """Sets every count in :attr:`api_calls` back to zero."""
        self._api.reset_calls()

    def inject_throttling(self, n: int) -> None:
        """Makes the next ``n`` Batch API requests fail with HTTP 429.

        The error code is ``TooManyRequestsException``, as AWS Batch answers when its
        request rate limit is exceeded; botocore's retry modes treat it as throttling.

        Args:
            n: Number of requests to reject (added to any still pending).

        Raises:
            ValueError: If ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"inject_throttling(n): n must be >= 0, got {n}")
        self._api.add_throttling(n)

    def expire_job(self, job_id: str) -> bool:
        """Deletes a job's metadata, as AWS does about 24 h after a job ends.

        Later ``DescribeJobs`` calls simply omit the job and ``ListJobs`` no longer
        returns it. Expiring an array parent expires its children too. A job still
        running is killed first (its parent array, if any, then never completes).

        Args:
            job_id: The job ID (``<id>`` or ``<id>:<index>``).

        Returns:
            True if the job existed.
        """
        return self._service.expire(job_id)


@contextlib.contextmanager
def aws_batch_emulator(
    *,
    timeout_scale: float = 1.0,
    max_vcpus: int | None = None,
    state_dwell_s: float = 0.0,
    region: str = "us-east-1",
    bucket: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    inherit_sys_path: bool = True,
) -> Iterator[AWSBatchEmulator]:
    """Runs an offline AWS Batch (moto server + local job processes) for a test.

    Jobs run the job's container command (``containerOverrides.command`` or the job
    definition's) as a local process in its own session, with ``python``/``python3``
    replaced by this interpreter. The process gets a clean environment (PATH, HOME,
    locale...), ``PYTHONPATH`` reaching cloudexec and the test process's import path
    (as if your code were baked into the job image), ``extra_env``, the definition's
    and the override's environment, the ``AWS_BATCH_*`` variables AWS sets, and
    ``AWS_ENDPOINT_URL`` plus fake credentials so boto3/s3fs inside the job reach the
    emulator. stdout and stderr go to CloudWatch Logs group ``/aws/batch/job``.

    Args:
        timeout_scale: Real seconds per second of ``attemptDurationSeconds``; e.g.
            0.02 turns AWS's 60 s minimum into 1.2 s.
        max_vcpus: vCPUs of the compute environment; defaults to ``os.cpu_count()``.
            Jobs that do not fit wait in RUNNABLE.
        state_dwell_s: Minimum seconds a job spends in each status, so pollers can
            observe SUBMITTED, PENDING, RUNNABLE, STARTING and RUNNING.
        region: Region of every resource.
        bucket: Name of the bucket to create; defaults to a unique
            ``cloudexec-test-<hex>`` (moto's bucket names are process-wide).
        extra_env: Variables added to every job's environment.
        inherit_sys_path: Put this process's ``sys.path`` on the jobs' PYTHONPATH.

    Yields:
        The running :class:`AWSBatchEmulator`.

    Raises:
        ValueError: If an argument is out of range.
        RuntimeError: If the server fails to start or moto does not honour the
            emulator's account. (An unverified moto version already fails when this
            module is imported.)
    """
    if not timeout_scale > 0:
        raise ValueError(f"timeout_scale must be > 0, got {timeout_scale!r}")
    if max_vcpus is None:
        max_vcpus = os.cpu_count() or 1
    if isinstance(max_vcpus, bool) or not isinstance(max_vcpus, int) or max_vcpus < 1:
        raise ValueError(f"max_vcpus must be an int >= 1, got {max_vcpus!r}")
    if not state_dwell_s >= 0:
        raise ValueError(f"state_dwell_s must be >= 0, got {state_dwell_s!r}")

    started = time.perf_counter()
    # A unique account per emulator: moto's state is process-global, and this keeps
    # two emulators (or a leftover one) from seeing each other's queues and jobs.
    # A user-set MOTO_ACCOUNT_ID overrides any per-request account in moto, so then
    # only one emulator at a time can run in the process.
    account_id = os.environ.get("MOTO_ACCOUNT_ID") or str(secrets.randbelow(9 * 10**11) + 10**11)
    bucket = bucket or f"cloudexec-test-{secrets.token_hex(4)}"
    scratch = tempfile.mkdtemp(prefix="cloudexec-aws-emulator-")
    moto_lock = threading.RLock()
    service = _JobService(
        region=region,
        account_id=account_id,
        dwell_s=float(state_dwell_s),
        max_vcpus=max_vcpus,
        scratch_dir=scratch,
        moto_lock=moto_lock,
    )
    api = _BatchApi(
        service=service,
        moto_lock=moto_lock,
        account_id=account_id,
        timeout_scale=float(timeout_scale),
    )
    server = _MotoServer(lambda app: _Gateway(app, account_id, api, moto_lock))
    server_started = False
    try:
        server.start()
        server_started = True
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boot = _make_session(endpoint, "testing", "testing", region)
        resources = _create_resources(boot, api, account_id, region, bucket, max_vcpus, moto_lock)
        # Set-up calls are ours, not the user's: api_calls starts at zero.
        api.reset_calls()
        service.start(
            endpoint_url=endpoint,
            base_env=_base_job_env(extra_env, inherit_sys_path, scratch),
            logs_backend=resources["logs_backend"],
            timeout_scale=float(timeout_scale),
        )
        emulator = AWSBatchEmulator(
            endpoint_url=endpoint,
            region=region,
            account_id=account_id,
            bucket=bucket,
            job_queue=resources["job_queue"],
            job_definition=resources["job_definition"],
            compute_environment=resources["compute_environment"],
            max_vcpus=max_vcpus,
            timeout_scale=float(timeout_scale),
            state_dwell_s=float(state_dwell_s),
            service=service,
            api=api,
        )
        emulator.startup_s = time.perf_counter() - started
        yield emulator
    finally:
        try:
            # Jobs first: a job process must not outlive the emulator it talks to.
            service.close()
        finally:
            if server_started:
                with contextlib.suppress(Exception):
                    # In a shared account (MOTO_ACCOUNT_ID) only our bucket is ours to drop.
                    shared = os.environ.get("MOTO_ACCOUNT_ID") == account_id
                    _purge_buckets(server, region, only=bucket if shared else None)
                server.stop()
                _forget_account(account_id, moto_lock)
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ start-up helpers


class _EmulatorSession(boto3.Session):
    """A boto3 session whose clients and resources default to the emulator's endpoint."""

    def __init__(self, *, endpoint_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emulator_endpoint_url = endpoint_url

    def client(self, *args: Any, **kwargs: Any) -> Any:
        # Why: a client made without endpoint_url would otherwise go to real AWS.
        if len(args) < 6:
            kwargs.setdefault("endpoint_url", self.emulator_endpoint_url)
        return super().client(*args, **kwargs)

    def resource(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 6:
            kwargs.setdefault("endpoint_url", self.emulator_endpoint_url)
        return super().resource(*args, **kwargs)


def _make_session(endpoint: str, key: str, secret: str, region: str) -> boto3.Session:
    return _EmulatorSession(
        endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name=region
    )


def _create_resources(
    session: boto3.Session,
    api: _BatchApi,
    account_id: str,
    region: str,
    bucket: str,
    max_vcpus: int,
    moto_lock: threading.RLock,
) -> dict[str, Any]:
    iam: Any = session.client("iam")
    batch: Any = session.client("batch")
    s3: Any = session.client("s3")
    api.set_service_model(batch.meta.service_model)

    role = iam.create_role(
        RoleName="cloudexec-batch-service-role",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "batch.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]
    profile = iam.create_instance_profile(InstanceProfileName="cloudexec-ecs-instance")
    profile_arn = profile["InstanceProfile"]["Arn"]

    # The subnet and security group come straight from moto's EC2 backend: the EC2
    # API's first request costs ~1 s of imports, twice the whole start-up budget.
    # moto loads its default AMI catalogue when the backend is created; it is not
    # needed here, and skipping it saves ~0.15 s. The variable is restored at once.
    with moto_lock, _temporary_env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false"):
        ec2 = get_backend("ec2")[account_id][region]
        subnets = [s.id for s in ec2.describe_subnets()]
        groups = [g.id for g in ec2.describe_security_groups()]
    if not subnets or not groups:
        raise RuntimeError("moto created no default VPC; cannot create a compute environment")

    ce = batch.create_compute_environment(
        computeEnvironmentName="cloudexec-ce",
        type="MANAGED",
        state="ENABLED",
        serviceRole=role,
        computeResources={
            "type": "EC2",
            "minvCpus": 0,
            "desiredvCpus": 0,
            "maxvCpus": max_vcpus,
            "instanceTypes": ["optimal"],
            "subnets": subnets[:1],
            "securityGroupIds": groups[:1],
            "instanceRole": profile_arn,
        },
    )["computeEnvironmentArn"]
    if f":{account_id}:" not in ce:
        # The account pin (x-moto-account-id) did not take: resources would be shared
        # with every other moto user in this process.
        raise RuntimeError(
            f"moto ignored the emulator's account id {account_id} (got {ce}); "
            "is MOTO_ACCOUNT_ID set to something else?"
        )
    queue = batch.create_job_queue(
        jobQueueName="cloudexec-queue",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}],
    )["jobQueueArn"]
    definition = batch.register_job_definition(
        jobDefinitionName="cloudexec-job",
        type="container",
        containerProperties={
            "image": "cloudexec/runner:latest",
            "command": ["python", "-m", "cloudexec.runner"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "1"},
                {"type": "MEMORY", "value": "2048"},
            ],
        },
    )["jobDefinitionArn"]
    s3.create_bucket(Bucket=bucket)

    with moto_lock:
        logs = get_backend("logs")[account_id][region]
        logs.ensure_log_group(_LOG_GROUP)
    return {
        "compute_environment": ce,
        "job_queue": queue,
        "job_definition": definition,
        "logs_backend": logs,
    }


@contextlib.contextmanager
def _temporary_env(name: str, value: str) -> Iterator[None]:
    if name in os.environ:
        # The user chose a value; theirs wins and stays.
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _base_job_env(extra_env: Mapping[str, str] | None, inherit_sys_path: bool, scratch: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
    # The job "image" contains cloudexec and, with inherit_sys_path, the code under
    # test; interpreter and site directories are left out (the interpreter adds them).
    skip = {os.path.normcase(os.path.abspath(p)) for p in sysconfig.get_paths().values()}
    entries = [str(Path(__file__).resolve().parents[2])]
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if inherit_sys_path:
        entries += [p for p in sys.path if p and os.path.isdir(p)]
    seen: set[str] = set()
    pythonpath = []
    for entry in entries:
        key = os.path.normcase(os.path.abspath(entry))
        if key in seen or key in skip:
            continue
        seen.add(key)
        pythonpath.append(entry)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    # No real AWS configuration may leak into a job: no profile files, no IMDS probes.
    missing = os.path.join(scratch, "no-aws-config")
    env["AWS_CONFIG_FILE"] = missing
    env["AWS_SHARED_CREDENTIALS_FILE"] = missing
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra_env or {})
    return env


def _purge_buckets(server: _MotoServer, region: str, only: str | None) -> None:
    """Deletes this account's buckets (or just ``only``): moto's bucket names are process-wide."""
    host, port = server.get_host_and_port()
    s3 = _make_session(f"http://{host}:{port}", "testing", "testing", region).client("s3")
    names = [only] if only else [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    for name in names:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            doomed = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if doomed:
                s3.delete_objects(Bucket=name, Delete={"Objects": doomed, "Quiet": True})
        s3.delete_bucket(Bucket=name)


def _forget_account(account_id: str, moto_lock: threading.RLock) -> None:
    """Drops this emulator's moto state (job logs, queues...) to free memory."""
    if os.environ.get("MOTO_ACCOUNT_ID") == account_id:
        return  # the account is the user's, not ours
    with moto_lock:
        for backend in list(getattr(BackendDict, "_instances", [])):
            with contextlib.suppress(Exception):
                backend.pop(account_id, None)


# --------------------------------------------------------------------- moto server


class _QuietHandler(WSGIRequestHandler):
    """Does not print a line per request (werkzeug's default) into test output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class _MotoServer(ThreadedMotoServer):
    """moto's ThreadedMotoServer with our gateway around its app.

    Overrides ``_server_entry`` (verified on moto 5.0-5.2) to wrap the WSGI app,
    silence the request log, and report a start-up failure instead of leaving
    ``start()`` waiting forever.
    """

    def __init__(self, wrap: Callable[[_WSGIApp], _WSGIApp]) -> None:
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


class _Gateway:
    """WSGI middleware in front of moto (see the module diagram)."""

    def __init__(self, app: _WSGIApp, account_id: str, api: _BatchApi, moto_lock: threading.RLock) -> None:
        self._app = app
        self._account_id = account_id
        self._api = api
        self._moto_lock = moto_lock

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # The body is read before taking moto's lock, so a slow upload does not stall
        # every other request.
        body = _read_body(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self._account_id
        scope = _CREDENTIAL_SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
        if scope is not None and scope.group(2) == "batch":
            method = environ.get("REQUEST_METHOD", "GET")
            answer = self._api.handle(method, environ.get("PATH_INFO", ""), body, scope.group(1))
            if answer is not None:
                status, headers, payload = answer
                start_response(status, headers)
                return [payload]
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


class _ApiError(Exception):
    """A Batch API error answered to the client."""

    def __init__(self, message: str, code: str = "ClientException", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _client_error(message: str) -> _ApiError:
    # AWS wraps ClientException messages this way ("Error executing request,
    # Exception : Maximum number of jobs supported is 100 ., RequestId: ...").
    return _ApiError(f"Error executing request, Exception : {message}, RequestId: {uuid.uuid4()}")


_Answer = tuple[str, list[tuple[str, str]], bytes]
_HTTP_REASONS = {200: "OK", 400: "Bad Request", 429: "Too Many Requests", 500: "Internal Server Error"}


def _answer(status: int, payload: Mapping[str, Any], error_code: str | None = None) -> _Answer:
    data = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ]
    if error_code is not None:
        headers.append(("x-amzn-ErrorType", error_code))
    return f"{status} {_HTTP_REASONS.get(status, '')}".rstrip(), headers, data


class _BatchApi:
    """Parses and validates Batch job requests; the job state lives in _JobService."""

    def __init__(
        self,
        *,
        service: _JobService,
        moto_lock: threading.RLock,
        account_id: str,
        timeout_scale: float,
    ) -> None:
        self._service = service
        self._moto_lock = moto_lock
        self._account_id = account_id
        self._timeout_scale = timeout_scale
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._throttle_left = 0
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

    def snapshot_calls(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def add_throttling(self, n: int) -> None:
        with self._lock:
            self._throttle_left += n

    def _operation_name(self, method: str, path: str) -> str:
        parts = path.strip("/").split("/")
        key = parts[1].lower() if len(parts) > 1 else parts[0].lower()
        return self._operations.get((method.upper(), key), key)

    # -- dispatch

    def handle(self, method: str, path: str, body: bytes, region: str) -> _Answer | None:
        """Answers a Batch request, or returns None to let moto answer it."""
        operation = self._operation_name(method, path)
        with self._lock:
            self._calls[operation] += 1
            throttled = self._throttle_left > 0
            if throttled:
                self._throttle_left -= 1
        if throttled:
            return _answer(429, {"message": "Too Many Requests"}, "TooManyRequestsException")
        handler = self._handlers.get(operation)
        if handler is None:
            return None
        try:
            try:
                request = json.loads(body or b"{}")
            except ValueError as exc:
                raise _client_error(f"The request body is not valid JSON: {exc}") from None
            if not isinstance(request, dict):
                raise _client_error("The request body must be a JSON object")
            result = handler(body, request, region)
        except _ApiError as exc:
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
            raise _client_error(f"Job size must be less than 30 KiB, got {math.ceil(len(body) / 1024)} KiB")
        name = request.get("jobName")
        if not isinstance(name, str) or not _JOB_NAME_RE.fullmatch(name):
            raise _client_error(
                f"jobName {name!r} is invalid: up to 128 letters, numbers, hyphens and underscores, "
                "starting with a letter or number"
            )
        queue_id = request.get("jobQueue")
        definition_id = request.get("jobDefinition")
        if not queue_id or not definition_id:
            raise _client_error("jobQueue and jobDefinition are required")
        for unsupported in ("nodeOverrides", "eksPropertiesOverride", "ecsPropertiesOverride"):
            if request.get(unsupported):
                raise _client_error(f"{unsupported} is not supported by cloudexec's AWS Batch emulator")
        size = (request.get("arrayProperties") or {}).get("size")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= _MAX_ARRAY_SIZE
        ):
            raise _client_error(f"Array job size must be between 2 and {_MAX_ARRAY_SIZE}, got {size!r}")
        overrides = request.get("containerOverrides") or {}
        _validate_environment(overrides.get("environment"))
        _validate_timeout(request.get("timeout"))
        _validate_retry(request.get("retryStrategy"))
        depends_on = request.get("dependsOn") or []

        definition, queue = self._lookup(definition_id, queue_id, region)
        spec = _build_spec(name, request, overrides, definition, queue, self._timeout_scale)
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
            raise _client_error("jobs must be a list of job IDs")
        if len(ids) > _MAX_DESCRIBE_IDS:
            raise _client_error(f"Maximum number of jobs supported is {_MAX_DESCRIBE_IDS}")
        return {"jobs": self._service.describe([_job_id_from(i) for i in ids])}

    def _list_jobs(self, body: bytes, request: dict[str, Any], region: str) -> dict[str, Any]:
        queue_id = request.get("jobQueue")
        array_id = request.get("arrayJobId")
        if request.get("multiNodeJobId"):
            raise _client_error("multi-node jobs are not supported by cloudexec's AWS Batch emulator")
        if not queue_id and not array_id:
            raise _client_error("Either jobQueue or arrayJobId must be specified")
        status = request.get("jobStatus")
        if status is not None and status not in _STATUSES:
            raise _client_error(f"jobStatus must be one of {' | '.join(_STATUSES)}, got {status!r}")
        filters = request.get("filters") or None
        if filters is not None:
            if not isinstance(filters, list):
                raise _client_error("filters must be a list")
            for f in filters:
                if not isinstance(f, dict) or f.get("name") not in _LIST_FILTERS:
                    raise _client_error(f"Filter name must be one of {sorted(_LIST_FILTERS)}, got {f!r}")
        cap = _LIST_PAGE_FILTERS if filters else _LIST_PAGE_STATUS
        max_results = request.get("maxResults")
        if max_results is not None and (
            isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1
        ):
            raise _client_error(f"maxResults must be an integer >= 1, got {max_results!r}")
        page = min(max_results or cap, cap)
        queue_arn = None
        if queue_id and not array_id:
            with self._moto_lock:
                queue = self._backend(region).get_job_queue(queue_id)
                if queue is None:
                    raise _client_error(f"Job queue {queue_id} does not exist")
                queue_arn = queue.arn
        fingerprint = json.dumps([queue_id, array_id, status, filters], sort_keys=True)
        after = _decode_token(request.get("nextToken"), fingerprint)
        # AWS: with filters, jobStatus is ignored and every status is listed; with
        # neither, only RUNNING jobs are.
        wanted = None if filters else (status or "RUNNING")
        summaries, last_seq = self._service.list_jobs(
            queue_arn=queue_arn,
            array_job_id=_job_id_from(array_id) if array_id else None,
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
                raise _client_error(f"Job definition {definition_id} does not exist")
            queue = backend.get_job_queue(queue_id)
            if queue is None:
                raise _client_error(f"Job queue {queue_id} does not exist")
            if definition.status != "ACTIVE":
                raise _client_error(f"Job definition {definition.arn} is {definition.status}")
            if definition.type != "container" or definition.container_properties is None:
                raise _client_error(
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
        raise _client_error("'jobId' is a required field (cannot be an empty string)")
    if not isinstance(reason, str) or not reason:
        raise _client_error("'reason' is a required field (cannot be an empty string)")
    return _job_id_from(job_id), reason


def _job_id_from(identifier: str) -> str:
    # DescribeJobs and friends also take job ARNs (arn:...:job/<id>).
    return identifier.split(":job/", 1)[1] if ":job/" in identifier else identifier


def _validate_timeout(timeout: Any) -> None:
    if not timeout:
        return
    seconds = timeout.get("attemptDurationSeconds") if isinstance(timeout, dict) else None
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < _MIN_ATTEMPT_DURATION_S:
        raise _client_error(
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
        raise _client_error(f"retryStrategy.attempts must be between 1 and {_MAX_ATTEMPTS}, got {attempts!r}")


def _validate_environment(environment: Any) -> None:
    for item in environment or []:
        name = item.get("name", "") if isinstance(item, dict) else ""
        # "Environment variables cannot start with AWS_BATCH; this naming convention
        # is reserved for variables that AWS Batch sets."
        if name.startswith("AWS_BATCH"):
            raise _client_error(
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
        raise _client_error(f"Invalid nextToken {token!r}") from None


# --------------------------------------------------------------------- job model


@dataclass(frozen=True)
class _JobSpec:
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


def _build_spec(
    name: str,
    request: Mapping[str, Any],
    overrides: Mapping[str, Any],
    definition: Mapping[str, Any],
    queue: Mapping[str, Any],
    timeout_scale: float,
) -> _JobSpec:
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
    return _JobSpec(
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


class _Attempt:
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
        "kill_at",
        "memory_limit",
        "next_sample",
        "next_flush",
        "stop_kind",
        "stop_reason",
    )

    def __init__(
        self,
        *,
        proc: subprocess.Popen[bytes],
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
        self.kill_at: float | None = None
        self.memory_limit = memory_limit
        self.next_sample = 0.0
        self.next_flush = 0.0
        # None while running normally; "timeout", "oom" or "terminate" once we kill it.
        self.stop_kind: str | None = None
        self.stop_reason: str | None = None


class _Job:
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
        spec: _JobSpec,
        created_ms: int,
        status: str,
        parent: _Job | None = None,
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
        self.children: list[_Job] | None = None
        self.summary: dict[str, int] | None = None
        self.done = 0
        self.failed = 0
        self.stop_reason: str | None = None
        self.depends_on: list[dict[str, Any]] = []
        self.waiting = 0
        self.dependents: list[_Job] = []
        self.dependency_failed = False
        self.dwell_done = False
        self.attempt: _Attempt | None = None
        self.holds_vcpus = False
        self.running_since = 0.0
        # (final status or "RETRY", status reason) once an attempt ended but the
        # RUNNING dwell has not elapsed yet.
        self.outcome: tuple[str, str | None] | None = None
        self.is_cancelled = False
        self.is_terminated = False
        self.expired = False


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------- scheduler


class _JobService:
    """All job state, guarded by one condition, driven by one scheduler thread.

    Lock order: ``_cond`` may be held while taking the moto lock (to write logs
    before a status becomes visible), never the other way round.
    """

    def __init__(
        self,
        *,
        region: str,
        account_id: str,
        dwell_s: float,
        max_vcpus: int,
        scratch_dir: str,
        moto_lock: threading.RLock,
    ) -> None:
        self._region = region
        self._account_id = account_id
        self._dwell = dwell_s
        self._max_vcpus = float(max_vcpus)
        self._free_vcpus = float(max_vcpus)
        self._scratch = scratch_dir
        self._moto_lock = moto_lock
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._top: list[_Job] = []
        self._timers: list[tuple[float, int, _Job, int]] = []
        self._runnable: collections.deque[tuple[_Job, int, float]] = collections.deque()
        self._running: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._tiebreak = itertools.count()
        self._closing = False
        # Set when vCPUs are freed or a job joins the RUNNABLE queue: dispatching is
        # due even if no timer or process would wake the scheduler.
        self._dispatch_due = False
        self._thread: threading.Thread | None = None
        self._base_env: dict[str, str] = {}
        self._logs: Any = None
        self._timeout_scale = 1.0
        self._cluster = f"cloudexec-{secrets.token_hex(4)}"
        self._warned_too_big = False
        self._page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    # -- lifecycle

    def start(
        self, *, endpoint_url: str, base_env: dict[str, str], logs_backend: Any, timeout_scale: float
    ) -> None:
        self._base_env = base_env
        self._base_env.update(
            {
                "AWS_ENDPOINT_URL": endpoint_url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": self._region,
                "AWS_REGION": self._region,
            }
        )
        self._logs = logs_backend
        self._timeout_scale = timeout_scale
        self._thread = threading.Thread(target=self._loop, name="cloudexec-aws-batch-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._cond:
            running = list(self._running.values())
            self._running.clear()
            for job in running:
                if job.attempt is not None:
                    _kill_group(job.attempt.proc, signal.SIGKILL)
            for job in running:
                attempt = job.attempt
                if attempt is None:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    attempt.proc.wait(timeout=5)
                attempt.reader.close()
                job.attempt = None

    # -- API entry points (called from request threads)

    def submit(self, spec: _JobSpec, array_size: int | None, depends_on: list[dict[str, Any]]) -> _Job:
        now = time.monotonic()
        now_ms = _now_ms()
        with self._cond:
            deps = self._resolve_dependencies(depends_on, array_size)
            job_id = str(uuid.uuid4())
            job = _Job(
                seq=next(self._seq),
                job_id=job_id,
                arn=self._job_arn(job_id),
                spec=spec,
                created_ms=now_ms,
                status="SUBMITTED",
            )
            job.depends_on = [dict(d) for d in depends_on]
            self._jobs[job_id] = job
            self._top.append(job)
            if array_size:
                # Children are spawned in PENDING (API reference: a child's createdAt
                # is "when the child job was spawned by its parent and entered the
                # PENDING state"); no thread or process exists until one is STARTING.
                job.summary = dict.fromkeys(_STATUSES, 0)
                job.summary["PENDING"] = array_size
                job.children = []
                due = now + self._dwell
                for index in range(array_size):
                    child_id = f"{job_id}:{index}"
                    child = _Job(
                        seq=next(self._seq),
                        job_id=child_id,
                        arn=self._job_arn(child_id),
                        spec=spec,
                        created_ms=now_ms,
                        status="PENDING",
                        parent=job,
                        index=index,
                    )
                    job.children.append(child)
                    self._jobs[child_id] = child
                    self._push_timer(due, child)
                for index, child in enumerate(job.children):
                    for dep, kind in deps:
                        if dep is None:  # SEQUENTIAL: each child waits for the previous one
                            if index:
                                self._link(child, job.children[index - 1])
                        elif kind == "N_TO_N" and dep.children is not None:
                            self._link(child, dep.children[index])
                        else:
                            self._link(child, dep)
            else:
                for dep, _ in deps:
                    if dep is not None:
                        self._link(job, dep)
                self._push_timer(now + self._dwell, job)
            self._cond.notify_all()
            return job

    def describe(self, job_ids: list[str]) -> list[dict[str, Any]]:
        with self._cond:
            seen: set[str] = set()
            out = []
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None or job_id in seen:
                    continue
                seen.add(job_id)
                out.append(self._detail(job))
            return out

    def list_jobs(
        self,
        *,
        queue_arn: str | None,
        array_job_id: str | None,
        status: str | None,
        filters: list[dict[str, Any]],
        page: int,
        after_seq: int,
    ) -> tuple[list[dict[str, Any]], int | None]:
        with self._cond:
            if array_job_id is not None:
                parent = self._jobs.get(array_job_id)
                candidates = (parent.children or []) if parent is not None else []
            else:
                # ListJobs on a queue lists plain jobs and array parents, not children.
                candidates = [j for j in self._top if j.spec.queue_arn == queue_arn]
            matched: list[_Job] = []
            for job in candidates:
                if job.seq <= after_seq or job.expired:
                    continue
                if status is not None and job.status != status:
                    continue
                if filters and not all(_filter_matches(job, f) for f in filters):
                    continue
                matched.append(job)
                if len(matched) > page:
                    break
            more = len(matched) > page
            matched = matched[:page]
            return [self._summary(j) for j in matched], (matched[-1].seq if more else None)

    def _stop_targets(self, job_id: str, reason: str, flag: str) -> list[_Job]:
        """The jobs a CancelJob/TerminateJob on ``job_id`` acts on (an array: its children).

        Marks an unfinished array parent with ``flag`` (``is_cancelled`` or
        ``is_terminated``) and the reason; the caller holds ``self._cond``.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return []
        if job.children is None:
            return [job]
        if job.status not in _TERMINAL:
            setattr(job, flag, True)
            job.stop_reason = reason
        return list(job.children)

    def cancel(self, job_id: str, reason: str) -> None:
        with self._cond:
            # "AWS Batch attempts to cancel all child jobs. The array parent job is
            # canceled when all child jobs are completed."
            for target in self._stop_targets(job_id, reason, "is_cancelled"):
                # STARTING/RUNNING jobs are not cancelled; the call still succeeds.
                if target.status in _NOT_STARTED:
                    target.is_cancelled = True
                    self._finish(target, "FAILED", reason)
            self._cond.notify_all()

    def terminate(self, job_id: str, reason: str) -> None:
        with self._cond:
            for target in self._stop_targets(job_id, reason, "is_terminated"):
                self._terminate_one(target, reason)
            self._cond.notify_all()

    def expire(self, job_id: str) -> bool:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            for victim in [job, *(job.children or [])]:
                if victim.attempt is not None:
                    self._discard_attempt(victim)
                self._release(victim)
                victim.expired = True
                victim.token += 1
                self._jobs.pop(victim.job_id, None)
            if job.parent is None:
                with contextlib.suppress(ValueError):
                    self._top.remove(job)
            self._cond.notify_all()
            return True

    # -- formatting (caller holds the lock)

    def _detail(self, job: _Job) -> dict[str, Any]:
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

    def _summary(self, job: _Job) -> dict[str, Any]:
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

    def _job_arn(self, job_id: str) -> str:
        return f"arn:aws:batch:{self._region}:{self._account_id}:job/{job_id}"

    # -- dependencies (caller holds the lock)

    def _resolve_dependencies(
        self, depends_on: list[dict[str, Any]], array_size: int | None
    ) -> list[tuple[_Job | None, str]]:
        """Checks ``dependsOn``; a SEQUENTIAL entry (no jobId) pairs with None."""
        resolved: list[tuple[_Job | None, str]] = []
        for dependency in depends_on:
            kind = str(dependency.get("type") or "").upper()
            dep_id = dependency.get("jobId")
            if kind == "SEQUENTIAL" and not dep_id:
                if not array_size:
                    raise _client_error("A SEQUENTIAL dependency without jobId needs an array job")
                resolved.append((None, "SEQUENTIAL"))
                continue
            if not isinstance(dep_id, str) or not dep_id:
                raise _client_error(f"dependsOn entries need a jobId, got {dependency!r}")
            dep = self._jobs.get(_job_id_from(dep_id))
            if dep is None:
                raise _client_error(f"Dependent job {dep_id} does not exist")
            if kind == "N_TO_N":
                if not array_size or dep.children is None or len(dep.children) != array_size:
                    raise _client_error("An N_TO_N dependency needs two array jobs of the same size")
            resolved.append((dep, kind))
        return resolved

    def _link(self, waiter: _Job, dep: _Job) -> None:
        if dep.status == "SUCCEEDED":
            return
        if dep.status == "FAILED":
            waiter.dependency_failed = True
            return
        waiter.waiting += 1
        dep.dependents.append(waiter)

    def _release_dependents(self, job: _Job, now: float) -> None:
        dependents, job.dependents = job.dependents, []
        for waiter in dependents:
            if waiter.expired or waiter.status in _TERMINAL:
                continue
            if job.status == "FAILED":
                self._finish(waiter, "FAILED", _REASON_DEPENDENCY_FAILED)
            else:
                waiter.waiting -= 1
                if waiter.status == "PENDING":
                    self._maybe_runnable(waiter, now)

    # -- state machine (caller holds the lock)

    def _set_status(self, job: _Job, status: str) -> None:
        old = job.status
        if old == status:
            return
        job.status = status
        job.token += 1
        parent = job.parent
        if parent is not None and parent.summary is not None:
            parent.summary[old] -= 1
            parent.summary[status] += 1
            # "An array parent job is updated to PENDING when any child job is updated
            # to RUNNABLE"; a parent is only ever SUBMITTED, PENDING, FAILED, SUCCEEDED.
            if status == "RUNNABLE" and parent.status == "SUBMITTED":
                parent.status = "PENDING"
                parent.token += 1

    def _push_timer(self, due: float, job: _Job) -> None:
        heapq.heappush(self._timers, (due, next(self._tiebreak), job, job.token))

    def _maybe_runnable(self, job: _Job, now: float) -> None:
        if job.dependency_failed:
            self._finish(job, "FAILED", _REASON_DEPENDENCY_FAILED)
            return
        if job.waiting > 0 or not job.dwell_done:
            return
        self._enqueue_runnable(job, now)

    def _enqueue_runnable(self, job: _Job, now: float) -> None:
        self._set_status(job, "RUNNABLE")
        self._runnable.append((job, job.token, now + self._dwell))
        self._dispatch_due = True

    def _finish(self, job: _Job, status: str, reason: str | None) -> None:
        if job.status in _TERMINAL or job.expired:
            return
        self._release(job)
        job.status_reason = reason
        job.stopped_ms = _now_ms()
        job.outcome = None
        self._set_status(job, status)
        now = time.monotonic()
        self._release_dependents(job, now)
        parent = job.parent
        if parent is not None and parent.children is not None:
            parent.done += 1
            if status == "FAILED":
                parent.failed += 1
            if parent.done == len(parent.children):
                if parent.failed:
                    self._finish(parent, "FAILED", parent.stop_reason or _REASON_CHILD_FAILED)
                else:
                    self._finish(parent, "SUCCEEDED", None)

    def _release(self, job: _Job) -> None:
        if job.holds_vcpus:
            job.holds_vcpus = False
            self._free_vcpus = min(self._max_vcpus, self._free_vcpus + job.spec.vcpus)
            self._dispatch_due = True

    def _terminate_one(self, job: _Job, reason: str) -> None:
        if job.status in _TERMINAL:
            return
        job.is_terminated = True
        if job.status in _NOT_STARTED or job.status == "STARTING":
            self._finish(job, "FAILED", reason)
            return
        attempt = job.attempt
        if attempt is not None and attempt.stop_kind is None:
            # docker stop would send SIGTERM first; AWS reports 137 for a terminated
            # job, i.e. the container ends up SIGKILLed, which is what we do.
            attempt.stop_kind = "terminate"
            attempt.stop_reason = reason
            _kill_group(attempt.proc, signal.SIGKILL)
        elif job.outcome is not None and job.outcome[0] == "RETRY":
            # The attempt already ended and was due for a retry: terminated jobs are
            # not retried.
            job.outcome = ("FAILED", reason)

    def _loop(self) -> None:
        with self._cond:
            while not self._closing:
                try:
                    now = time.monotonic()
                    self._fire_timers(now)
                    wake = self._dispatch(now)
                    self._fire_timers(now)
                    self._watch(time.monotonic())
                    timeout = self._next_wait(time.monotonic(), wake)
                except Exception:  # keep scheduling other jobs; the bug is logged
                    _log.exception("AWS Batch emulator scheduler error")
                    timeout = _WATCH_INTERVAL_S
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)

    def _next_wait(self, now: float, runnable_wake: float | None) -> float | None:
        if self._dispatch_due:
            return 0.0
        candidates = []
        if self._timers:
            candidates.append(self._timers[0][0] - now)
        if runnable_wake is not None:
            candidates.append(runnable_wake - now)
        if self._running:
            candidates.append(_WATCH_INTERVAL_S)
        if not candidates:
            return None
        return max(0.0, min(candidates))

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, job, token = heapq.heappop(self._timers)
            if token != job.token or job.expired:
                continue
            if job.status == "SUBMITTED":
                self._set_status(job, "PENDING")
                self._push_timer(now + self._dwell, job)
            elif job.status == "PENDING":
                job.dwell_done = True
                self._maybe_runnable(job, now)
            elif job.status == "STARTING":
                self._start_attempt(job, now)
            elif job.status == "RUNNING" and job.outcome is not None:
                self._apply_outcome(job, now)

    def _dispatch(self, now: float) -> float | None:
        """Moves RUNNABLE jobs that fit the free vCPUs to STARTING; FIFO with backfill.

        Returns:
            When the head of the queue finishes its RUNNABLE dwell, if that is what
            blocks dispatching.
        """
        self._dispatch_due = False
        queue = self._runnable
        while queue and (queue[0][0].token != queue[0][1] or queue[0][0].expired):
            queue.popleft()
        if not queue or self._free_vcpus <= 1e-9:
            return None
        chosen: list[_Job] = []
        rejected: list[_Job] = []
        wake: float | None = None
        looked = 0
        for job, token, ready_at in queue:
            if job.token != token or job.expired:
                continue
            if ready_at > now:
                wake = ready_at
                break
            looked += 1
            if job.spec.overrides_chars > _MAX_OVERRIDES_CHARS:
                rejected.append(job)
            elif job.spec.vcpus <= self._free_vcpus + 1e-9:
                self._free_vcpus -= job.spec.vcpus
                job.holds_vcpus = True
                chosen.append(job)
                if self._free_vcpus <= 1e-9:
                    break
            elif job.spec.vcpus > self._max_vcpus and not self._warned_too_big:
                self._warned_too_big = True
                _log.warning(
                    "job %s needs %s vCPUs but the emulated compute environment has %s; "
                    "like on AWS it stays RUNNABLE (raise max_vcpus)",
                    job.job_id, job.spec.vcpus, self._max_vcpus,
                )
            if looked >= _BACKFILL_WINDOW:
                break
        # Transitions happen after the scan: they may append to the queue.
        for job in rejected:
            self._finish(job, "FAILED", _REASON_OVERRIDES_TOO_LONG)
        for job in chosen:
            self._set_status(job, "STARTING")
            self._push_timer(now + self._dwell, job)
        return wake

    # -- attempts (caller holds the lock)

    def _start_attempt(self, job: _Job, now: float) -> None:
        spec = job.spec
        job.attempts_started += 1
        task_id = uuid.uuid4().hex
        stream = f"{spec.definition_name}/default/{task_id}"
        ecs = f"arn:aws:ecs:{self._region}:{self._account_id}"
        task_arn = f"{ecs}:task/{self._cluster}/{task_id}"
        instance_arn = f"{ecs}:container-instance/{self._cluster}/{uuid.uuid4().hex}"
        job.log_stream, job.task_arn, job.instance_arn = stream, task_arn, instance_arn
        started_ms = _now_ms()
        job.started_ms = started_ms
        job.running_since = now
        self._set_status(job, "RUNNING")
        with self._moto_lock:
            self._logs.ensure_log_stream(_LOG_GROUP, stream)

        argv = list(spec.argv)
        if argv and argv[0] in _PYTHON_NAMES:
            argv[0] = sys.executable
        env = dict(self._base_env)
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
        for key in _EMULATOR_ENV:
            env[key] = self._base_env[key]

        # Each attempt gets a fresh working directory, like a fresh container.
        workdir = os.path.join(self._scratch, task_id)
        log_path = workdir + ".log"
        try:
            os.mkdir(workdir)
            if not argv:
                raise FileNotFoundError("the job has no command (no override and none in the job definition)")
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    # Own session = own process group, so the whole tree is killed.
                    start_new_session=os.name != "nt",
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
                    "stoppedAt": _now_ms(),
                    "statusReason": reason,
                }
            )
            job.exit_code = None
            job.container_reason = reason
            self._conclude(job, failed=True, reason=reason, retryable=True, exit_code=None, now=now)
            return
        memory_limit = spec.memory_mib * 1024 * 1024 if spec.memory_mib else None
        job.attempt = _Attempt(
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
        self._running[job.job_id] = job

    def _watch(self, now: float) -> None:
        for job in list(self._running.values()):
            attempt = job.attempt
            if attempt is None:
                self._running.pop(job.job_id, None)
                continue
            if not _has_exited(attempt.proc):
                if attempt.stop_kind is None:
                    if attempt.deadline is not None and now >= attempt.deadline:
                        attempt.stop_kind = "timeout"
                        _kill_group(attempt.proc, signal.SIGTERM)
                        attempt.kill_at = now + _SIGTERM_GRACE_S * self._timeout_scale
                    elif attempt.memory_limit is not None and now >= attempt.next_sample:
                        attempt.next_sample = now + _WATCH_INTERVAL_S
                        if _tree_rss_bytes(attempt.proc.pid, self._page_size) > attempt.memory_limit:
                            attempt.stop_kind = "oom"
                            _kill_group(attempt.proc, signal.SIGKILL)
                elif attempt.kill_at is not None and now >= attempt.kill_at:
                    attempt.kill_at = None
                    _kill_group(attempt.proc, signal.SIGKILL)
                if now >= attempt.next_flush:
                    attempt.next_flush = now + _LOG_FLUSH_INTERVAL_S
                    self._flush_logs(attempt, final=False)
                continue
            # The leader exited but is not reaped yet, so its pid still names the
            # group: kill stragglers, as a container's end kills everything in it.
            _kill_group(attempt.proc, signal.SIGKILL)
            returncode = attempt.proc.wait()
            self._end_attempt(job, attempt, returncode, now)

    def _end_attempt(self, job: _Job, attempt: _Attempt, returncode: int, now: float) -> None:
        # The last lines reach CloudWatch before the status changes, so a client that
        # sees the job finished also sees its whole log.
        self._flush_logs(attempt, final=True)
        attempt.reader.close()
        shutil.rmtree(attempt.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(attempt.workdir + ".log")
        self._running.pop(job.job_id, None)
        job.attempt = None

        # Docker reports death by signal N as exit code 128 + N.
        exit_code = returncode if returncode >= 0 else 128 - returncode
        container_reason: str | None = None
        retryable = True
        if attempt.stop_kind == "oom":
            exit_code = 137
            container_reason = reason = _REASON_OOM
        elif attempt.stop_kind == "timeout":
            # job_timeouts.html: a job that times out is not retried.
            reason, retryable = _REASON_TIMEOUT, False
        elif attempt.stop_kind == "terminate":
            exit_code = 137
            reason, retryable = attempt.stop_reason or "Terminated", False
        else:
            reason = _REASON_EXITED
        container: dict[str, Any] = {
            "containerInstanceArn": attempt.instance_arn,
            "taskArn": attempt.task_arn,
            "exitCode": exit_code,
            "logStreamName": attempt.stream,
            "networkInterfaces": [],
        }
        if container_reason is not None:
            container["reason"] = container_reason
        job.attempts.append(
            {
                "container": container,
                "startedAt": attempt.started_ms,
                "stoppedAt": _now_ms(),
                "statusReason": reason,
            }
        )
        job.exit_code = exit_code
        job.container_reason = container_reason
        failed = exit_code != 0 or attempt.stop_kind is not None
        self._conclude(job, failed=failed, reason=reason, retryable=retryable, exit_code=exit_code, now=now)

    def _conclude(
        self, job: _Job, *, failed: bool, reason: str, retryable: bool, exit_code: int | None, now: float
    ) -> None:
        if not failed:
            outcome: tuple[str, str | None] = ("SUCCEEDED", reason)
        elif retryable and job.attempts_started < job.spec.max_attempts and _should_retry(
            job.spec.evaluate_on_exit, reason, job.container_reason, exit_code
        ):
            outcome = ("RETRY", reason)
        else:
            outcome = ("FAILED", reason)
        job.outcome = outcome
        # The RUNNING status lasts at least the dwell time too, so pollers see it.
        due = job.running_since + self._dwell
        if due > now:
            self._push_timer(due, job)
        else:
            self._apply_outcome(job, now)

    def _apply_outcome(self, job: _Job, now: float) -> None:
        if job.outcome is None:
            return
        status, reason = job.outcome
        job.outcome = None
        if status == "RETRY":
            # A failed attempt with retries left goes back to RUNNABLE.
            self._release(job)
            self._enqueue_runnable(job, now)
        else:
            self._finish(job, status, reason)

    def _discard_attempt(self, job: _Job) -> None:
        attempt = job.attempt
        if attempt is None:
            return
        _kill_group(attempt.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            attempt.proc.wait(timeout=5)
        attempt.reader.close()
        shutil.rmtree(attempt.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(attempt.workdir + ".log")
        self._running.pop(job.job_id, None)
        job.attempt = None

    def _flush_logs(self, attempt: _Attempt, *, final: bool) -> None:
        data = attempt.reader.read()
        if not data and not (final and attempt.tail):
            return
        lines = (attempt.tail + data).split(b"\n")
        attempt.tail = lines.pop()
        if final and attempt.tail:
            lines.append(attempt.tail)
            attempt.tail = b""
        stamp = _now_ms()
        # The awslogs driver sends one event per line and drops empty ones.
        events = [
            {"timestamp": stamp, "message": line.decode("utf-8", "replace").rstrip("\r")}
            for line in lines
            if line.strip(b"\r")
        ]
        if events:
            with self._moto_lock:
                self._logs.put_log_events(_LOG_GROUP, attempt.stream, events)


def _filter_matches(job: _Job, flt: Mapping[str, Any]) -> bool:
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


def _should_retry(
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


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Tells whether the process ended, without reaping it (its pid stays valid)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None or os.name == "nt":
        return proc.poll() is not None
    try:
        return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return proc.poll() is not None


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if os.name == "nt":
        with contextlib.suppress(OSError):
            proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tree_rss_bytes(root_pid: int, page_size: int) -> int:
    """Resident memory of a process and its descendants, from /proc (Linux).

    Pages shared between processes are counted once per process, so this can
    overestimate forked workers; a container's cgroup would count them once.
    """
    total = 0
    stack = [root_pid]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * page_size
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as children:
                    stack.extend(int(c) for c in children.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total
