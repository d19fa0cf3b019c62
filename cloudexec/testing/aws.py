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

How a request flows, and which module does what::

    your boto3 / s3fs / the job's own boto3 (AWS_ENDPOINT_URL)
        |  HTTP to 127.0.0.1:<port>
        v
    Gateway (_aws_batch_api) -- pins the emulator's own moto account, counts calls,
        |                       applies the test hooks (faults, credentials), serializes moto
        |
        |-- SubmitJob  DescribeJobs  ListJobs  -->  BatchApi (_aws_batch_api): parses and
        |   CancelJob  TerminateJob                 validates as AWS does
        |   (RegisterJobDefinition is only            |
        |    validated, then passed on)               v
        |                                           JobScheduler (_aws_batch_scheduler): ONE
        |                                             thread; SUBMITTED..RUNNABLE (dwell, deps),
        |                                             vCPU packing -> STARTING -> RUNNING,
        |                                             retries; Job (_aws_batch_model) renders JSON
        |                                             |
        v                                             v
    moto: S3, IAM, CloudWatch Logs,  <-- log lines -- Node (_aws_batch_node): processes
          queues, job definitions     /aws/batch/job/<jobDef>/default/<taskId>
                                      (cloudexec._process: new session, tree memory,
                                       timeout SIGTERM -> SIGKILL; python jobs are
                                       forked by cloudexec._forkserver)

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

Capacity and speed: a SubmitJob of a 10,000-child array creates 10,000 small
records and no thread or process; at most ``max_vcpus`` (one vCPU each)
children run at once, each a process of its own, and the scheduler's work per
pass is bounded by the timers that fire and a 64-job backfill window, so
10,000 children cost no quadratic work. A ``python -m cloudexec.runner`` (or
``python -c``) job is forked by one fork server that already imported the
runner and s3fs, parsed botocore's data files and built what every S3 client
would build again (TLS contexts, botocore's event handlers, compiled
patterns), so a child costs a fork and a client of its own, not an
interpreter start-up (set ``CLOUDEXEC_FORKSERVER=0`` for a fresh interpreter
per job, ~0.5-1 s each). A child of an array of trivial calls then costs
~0.09 CPU-seconds in all: ~75% in its own process (its S3 client, four GETs
and a PUT, the fork and the exit), ~15% in moto answering those requests and
the rest in the scheduler and the client. CPU is the bound: ~15 children per
second on 2 busy cores, a 1,000-child array in about a minute
(``benchmarks/bench_emulators.py``).

Known differences from AWS Batch:

* One pool of ``max_vcpus`` serves every queue and compute environment; queue
  priorities, fair-share policies and ``schedulingPriority`` are ignored (FIFO with
  backfill). GPU requirements are ignored.
* Memory limits count the resident memory of the job's whole process tree (psutil),
  sampled every 20 ms; a page shared by forked processes counts in each of them.
* Only container jobs run; multi-node, EKS and ECS-properties jobs are rejected.
* Jobs run with this interpreter and, by default, this process's import path, as if
  the code under test were baked into the job image. There is no image isolation.
  A forked job shares the fork server's interpreter options (``PYTHON*`` variables
  other than ``PYTHONPATH``) and finds the server's modules already imported.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import boto3

# Imported before any moto internal: it checks that the installed moto is one whose
# internals were verified, so another version fails with a clear message.
from cloudexec.testing._aws_batch_api import BatchApi, Gateway, MotoServer, check_moto_version
from cloudexec.testing._aws_batch_model import LOG_GROUP
from cloudexec.testing._aws_batch_scheduler import JobScheduler
from cloudexec.testing._hooks import EmulatorHooks, Hooks, IssuedCredentials, RealisticProfile, resolve_profile
from cloudexec import _process

check_moto_version()

from moto.backends import get_backend  # noqa: E402
from moto.core.base_backend import BackendDict  # noqa: E402

if TYPE_CHECKING:
    from cloudexec.providers.aws import AWSBatchExecutor

__all__ = ["AWSBatchEmulator", "RealisticProfile", "aws_batch_emulator"]

class AWSBatchEmulator(EmulatorHooks):
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
        profile: The :class:`RealisticProfile` in force (all zeros unless
            ``realistic=`` was given).
        startup_s: Wall time :func:`aws_batch_emulator` took to become ready.

    The test hooks (``api_calls``, ``inject_faults``, ``issue_credentials``,
    ``expire_job``...) are the ones every emulator offers; see
    ``cloudexec.testing._hooks.EmulatorHooks``. Its faults: Batch throttling is
    HTTP 429 ``TooManyRequestsException`` (also what ``inject_throttling``
    sends), an error 500 ``ServerException``; S3 throttling 503 ``SlowDown``,
    an error 500 ``InternalError``.
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
        service: JobScheduler,
        api: BatchApi,
        hooks: Hooks,
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
        self._hooks = hooks
        self.profile = hooks.profile
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

    def refreshing_session(self) -> boto3.Session:
        """Returns a boto3 session whose credentials expire and refresh, as STS/SSO ones do.

        Its botocore credentials are ``RefreshableCredentials`` fed by
        :meth:`issue_credentials`, with botocore's refresh windows (15 and 10 minutes
        before expiry on AWS) scaled to the profile's ``credential_lifetime_s``.
        Code that copies the keys once fails when they expire; code that follows
        the session keeps working.

        Raises:
            RuntimeError: The emulator was started without ``credential_lifetime_s``.
        """
        lifetime = self.profile.credential_lifetime_s
        if lifetime is None:
            raise RuntimeError(
                "refreshing_session() needs expiring credentials: start the emulator with "
                "realistic=RealisticProfile(credential_lifetime_s=...)"
            )
        import botocore.session
        from botocore.credentials import CredentialProvider, RefreshableCredentials

        hooks = self._hooks
        # Real windows are 15/10 minutes of a 1 h lifetime; keep those shares.
        advisory_s = max(1, int(lifetime / 4))
        mandatory_s = max(1, int(lifetime / 6))

        def fetch() -> dict[str, str]:
            issued = hooks.issue_credentials()
            expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.expires_at))
            return {
                "access_key": issued.access_key_id,
                "secret_key": issued.secret_access_key,
                "token": issued.session_token,
                "expiry_time": expiry,
            }

        class _ScaledRefreshableCredentials(RefreshableCredentials):
            _advisory_refresh_timeout = advisory_s
            _mandatory_refresh_timeout = mandatory_s

        class _EmulatorStsProvider(CredentialProvider):
            METHOD = "assume-role"
            CANONICAL_NAME = "cloudexec-emulator-sts"

            def load(self) -> RefreshableCredentials:
                return _ScaledRefreshableCredentials.create_from_metadata(fetch(), fetch, self.METHOD)

        core = botocore.session.get_session()
        core.get_component("credential_provider").insert_before("env", _EmulatorStsProvider())
        return _EmulatorSession(endpoint_url=self.endpoint_url, botocore_session=core, region_name=self.region)

    def issue_credentials(self) -> IssuedCredentials:
        """Returns new temporary credentials valid for ``profile.credential_lifetime_s``.

        Requests signed with them after that are refused (Batch: 403
        ``ExpiredTokenException``; S3: 400 ``ExpiredToken``).
        """
        return self._hooks.issue_credentials()

    @property
    def api_calls(self) -> collections.Counter[str]:
        """A snapshot of Batch API calls received, per action (e.g. ``"DescribeJobs"``).

        Faulted calls are counted too: they reached the service.
        """
        return self._hooks.snapshot_calls()

    @property
    def storage_calls(self) -> collections.Counter[str]:
        """A snapshot of S3 requests received, per operation (``ListObjectsV2``, ``PutObject``,
        ``GetObject``, ``HeadObject``, ``DeleteObjects`` …), from every client and job;
        :meth:`reset_api_calls` zeroes them too."""
        return self._hooks.snapshot_storage_calls()

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of the fork server forking the runner's job processes.

        None before the first such job, and with ``CLOUDEXEC_FORKSERVER=0``
        (every job a fresh interpreter). Each forked job's parent is this pid.
        """
        server = self._service.fork_server
        return server.pid if server is not None else None

    @property
    def forked_processes(self) -> int:
        """How many job processes the fork server forked (the rest started fresh interpreters)."""
        server = self._service.fork_server
        return server.started_count if server is not None else 0

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
    realistic: bool | RealisticProfile = False,
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
        realistic: True for the default :class:`RealisticProfile` (terminal
            statuses lag, new jobs are briefly invisible, ~10% of Batch and S3
            calls fail transiently), or a profile of your own (e.g. with
            ``credential_lifetime_s``). False: answers at once, never fails.

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

    profile = resolve_profile(realistic)
    hooks = Hooks(profile)
    started = time.perf_counter()
    # A unique account per emulator: moto's state is process-global, and this keeps
    # two emulators (or a leftover one) from seeing each other's queues and jobs.
    # A user-set MOTO_ACCOUNT_ID overrides any per-request account in moto, so then
    # only one emulator at a time can run in the process.
    account_id = os.environ.get("MOTO_ACCOUNT_ID") or str(secrets.randbelow(9 * 10**11) + 10**11)
    bucket = bucket or f"cloudexec-test-{secrets.token_hex(4)}"
    scratch = tempfile.mkdtemp(prefix="cloudexec-aws-emulator-")
    # Deletes the scratch folder even if this process is SIGKILLed (jobs die with
    # the scheduler thread that started them: see _process.start(die_with_owner)).
    remover = _process.remove_when_owner_dies(scratch)
    moto_lock = threading.RLock()
    service = JobScheduler(
        region=region,
        account_id=account_id,
        dwell_s=float(state_dwell_s),
        max_vcpus=max_vcpus,
        scratch_dir=scratch,
        moto_lock=moto_lock,
        status_lag_s=profile.status_lag_s,
        visibility_lag_s=profile.visibility_lag_s,
    )
    api = BatchApi(
        service=service,
        moto_lock=moto_lock,
        account_id=account_id,
        timeout_scale=float(timeout_scale),
    )
    server = MotoServer(lambda app: Gateway(app, account_id, api, moto_lock, hooks))
    server_started = False
    try:
        server.start()
        server_started = True
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boot = _make_session(endpoint, "testing", "testing", region)
        resources = _create_resources(boot, api, account_id, region, bucket, max_vcpus, moto_lock)
        # Set-up calls are ours, not the user's: api_calls starts at zero.
        hooks.reset_calls()
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
            hooks=hooks,
        )
        # Set-up calls are never faulted: the profile's rates apply from here on.
        hooks.start_faults()
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
            remover.close()


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
    api: BatchApi,
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
        logs.ensure_log_group(LOG_GROUP)
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
    env = _process.job_environment(inherit_sys_path=inherit_sys_path)
    # No real AWS configuration may leak into a job: no profile files, no IMDS probes.
    missing = os.path.join(scratch, "no-aws-config")
    env["AWS_CONFIG_FILE"] = missing
    env["AWS_SHARED_CREDENTIALS_FILE"] = missing
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra_env or {})
    return env


def _purge_buckets(server: MotoServer, region: str, only: str | None) -> None:
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

