"""An offline Azure Batch: Azurite for blobs plus a local Batch REST service.

``azure_batch_emulator()`` starts two servers on 127.0.0.1 and tears them down
on exit::

    test code / AzureBatchExecutor
        |  azure-batch SDK (shared key, http)      |  azure-storage-blob / adlfs
        v                                          v
    local Batch service  ----------------->   Azurite blob service
    (_azure_batch_service)   task processes   (npm "azurite", in memory)
        |                    reach Azurite
        v                    through env()
    compute node: runs each task's commandLine as a local process
    (_azure_batch_node), <root>/workitems/<job>/job-1/<task>/{stdout.txt,stderr.txt,wd/}

Example::

    from azure.batch import models
    from cloudexec.testing import azure_batch_emulator

    with azure_batch_emulator(slots=2) as emu:
        client = emu.batch_client()
        client.create_job(models.BatchJobCreateOptions(
            id="job-1", pool_info=models.BatchPoolInfo(pool_id=emu.pool_id)))
        client.create_task("job-1", models.BatchTaskCreateOptions(
            id="t1", command_line="python -c \\"print('hi')\\""))

Capacity and speed: 10,000 tasks (100 add-task-collection calls) cost 10,000
records and no thread or process; the node runs ``slots`` tasks at once, each
a process of its own, from one node thread. A ``python -m cloudexec.runner``
(or ``python -c``) task is forked by one fork server that already imported the
runner and adlfs, so a task costs a fork, not an interpreter start-up and
~0.5 s of imports (set ``CLOUDEXEC_FORKSERVER=0`` for a fresh interpreter per
task). A task of an array of trivial calls then costs ~0.1 CPU-seconds in
all: ~75% in its own process (its blob clients, four GETs and three PUTs with
its two logs, the helpers that copy its output, the fork and the exit), ~20%
in Azurite and the rest in the emulator and the client. CPU is the bound:
~11 tasks per second on 2 busy cores (``benchmarks/bench_emulators.py``).

What differs from real Azure Batch:

* There is one pool (``pool_id``) with one node of ``slots`` task slots; pools
  cannot be created. A job on another pool is accepted (as Azure does) but its
  tasks stay ``active`` forever. So does a task needing more slots than the
  node has.
* Command lines run directly on this machine (split with ``shlex``, no shell,
  as on Azure); ``python``/``python3`` become ``sys.executable``. A forked
  task shares the fork server's interpreter options (``PYTHON*`` variables
  other than ``PYTHONPATH``) and finds its modules already imported.
  ``containerSettings`` are recorded but no container is started.
* Tasks get a clean environment (``PATH``, ``HOME``, ``LANG``, ``TMPDIR``,
  ``PYTHONPATH`` with this cloudexec prepended), then ``task_env``, the job's
  ``commonEnvironmentSettings``, the task's ``environmentSettings`` and the
  ``AZ_BATCH_*`` variables Azure sets. ``AZ_BATCH_TASK_RETRY_COUNT`` is an
  emulator extension that real Azure does not set.
* The account's active-job quota (``active_job_quota``) is off unless given;
  add-task-collection takes at most 100 tasks (400 ``InvalidPropertyValue``)
  and any request body at most 1 MiB (413 ``RequestBodyTooLarge``), as Azure.
* Task dependencies (``dependsOn`` task ids and ranges) and exit conditions
  (``dependencyAction``; ``jobAction`` none/terminate under ``onTaskFailure:
  performExitOptionsJobAction``) as Azure: see `_azure_batch_depends`.
* No ``resourceFiles``, ``outputFiles``, job manager/preparation/release
  tasks, ``jobAction: disable`` or auto pools: requests using them get 400
  ``UnsupportedProperty``. ETag conditions are ignored.
* With ``tls`` (on by itself when the realistic profile sets
  ``credential_lifetime_s``) both services speak HTTPS with a throwaway CA
  (``ca_path``) and take Entra ID bearer tokens from :meth:`token_credential`,
  which expire after ``credential_lifetime_s``. Tasks then get no account key:
  they fetch expiring tokens from a managed-identity endpoint of the emulator's
  (``IDENTITY_ENDPOINT``, App Service's protocol, where a real pool's node has
  the instance metadata service), and trust the CA through
  ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudexec import _process
from cloudexec.testing._azure_auth import (
    EmulatorTokenCredential,
    IdentityEndpoint,
    TlsFiles,
    make_tls_files,
    trust_in_process,
)
from cloudexec.testing._azure_batch_service import AzureBatchService
from cloudexec.testing._fault_proxy import FaultProxy
from cloudexec.testing._hooks import (
    QUIET,
    EmulatorHooks,
    Hooks,
    IssuedCredentials,
    RealisticProfile,
    Target,
    resolve_profile,
)
from cloudexec.testing._azurite import (
    AZURITE_ACCOUNT_KEY,
    AZURITE_ACCOUNT_NAME,
    AzuriteBlob,
    AzuriteNotFoundError,
    find_azurite_blob,
)

if TYPE_CHECKING:
    from azure.batch import BatchClient
    from azure.core.credentials import AzureNamedKeyCredential

    from cloudexec.providers.azure import AzureBatchExecutor

__all__ = [
    "AzureBatchEmulator",
    "AzuriteNotFoundError",
    "RealisticProfile",
    "azure_batch_emulator",
]

DEFAULT_POOL_ID = "cloudexec-pool"
DEFAULT_CONTAINER = "cloudexec-io"
DEFAULT_VM_SIZE = "standard_d2s_v3"
DEFAULT_ACCOUNT_NAME = "cloudexecemulator"

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Azure container names: 3-63 chars of lowercase letters, digits and single
# hyphens, starting and ending with a letter or digit.
_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")


class AzureBatchEmulator(EmulatorHooks):
    """A running Azurite plus local Batch service; see :func:`azure_batch_emulator`.

    Prefer the context manager; this class can also be driven with
    :meth:`start` and :meth:`close` (e.g. from a session-scoped fixture).

    Args:
        slots: Task slots of the pool's single node (``taskSlotsPerNode``).
            Defaults to ``os.cpu_count()``.
        pool_id: Id of the pool.
        vm_size: ``vmSize`` the pool reports.
        container: Blob container created in Azurite for cloudexec's I/O.
        task_env: Variables every task process sees, standing in for what a
            real pool provides (managed identity, start task). None means
            :meth:`env`, i.e. tasks can reach Azurite; pass ``{}`` for nothing.
        root_dir: Node root directory for task directories. None means a
            temporary directory removed on close; a given directory is kept.
        kill_grace_s: Seconds between SIGTERM and SIGKILL when a task is
            terminated or times out.
        realistic: True for the default :class:`RealisticProfile` (completed
            states lag, new tasks are briefly missing from lists, ~10% of Batch
            REST and blob calls fail with 503 ``ServerBusy``/500/dropped
            connections), a profile of your own, or False (answers at once,
            never fails). Blob faults go through a proxy in front of Azurite.
        active_job_quota: The Batch account's quota of active jobs (every job
            not completed counts). Creating one more answers 409
            ``ActiveJobAndScheduleQuotaReached``, as Azure does; real accounts
            allow 100-300 by default. None (the default): no quota.
        tls: Serve Batch and blobs over HTTPS with a CA made for this emulator
            (``ca_path``), as Azure does: azure-core sends bearer tokens over
            HTTPS only. None (the default): on exactly when the profile sets
            ``credential_lifetime_s``. While it runs, this process trusts the CA
            (see ``cloudexec.testing._azure_auth.trust_in_process``).

    Expiring credentials (``realistic=RealisticProfile(credential_lifetime_s=...)``):
    :meth:`token_credential` returns an azure-core ``TokenCredential`` whose
    Entra ID tokens expire after that lifetime and are refreshed shortly before,
    as azure-identity's are; :meth:`executor` then authenticates Batch and Blob
    with it (Blob through adlfs with ``account_name``/``account_host``). A request
    with an expired token is refused with Azure's 401: Batch
    ``AuthenticationFailed``, Blob ``InvalidAuthenticationInfo`` with a
    ``WWW-Authenticate`` challenge (counted in
    ``faults_injected["credentials:expired"]``). ``credentials_issued`` counts
    the tokens handed out.

    The test hooks (``api_calls``, ``inject_faults``, ``expire_job``...) are the
    ones every emulator offers; see ``cloudexec.testing._hooks.EmulatorHooks``.
    Its faults: Batch throttling is 503 ``ServerBusy``, an error 500
    ``InternalError``; blob faults (``target="storage"``, only with
    ``realistic=``, through the proxy in front of Azurite) use Azure Storage's
    same codes; ``inject_throttling`` answers 503 ``ServerBusy``.
    """

    def __init__(
        self,
        *,
        slots: int | None = None,
        pool_id: str = DEFAULT_POOL_ID,
        vm_size: str = DEFAULT_VM_SIZE,
        container: str = DEFAULT_CONTAINER,
        task_env: Mapping[str, str] | None = None,
        root_dir: str | os.PathLike[str] | None = None,
        kill_grace_s: float = 2.0,
        realistic: bool | RealisticProfile = False,
        active_job_quota: int | None = None,
        tls: bool | None = None,
    ) -> None:
        if active_job_quota is not None and (
            isinstance(active_job_quota, bool) or not isinstance(active_job_quota, int) or active_job_quota < 1
        ):
            raise ValueError(f"active_job_quota must be a positive integer or None, got {active_job_quota!r}")
        self.active_job_quota: int | None = active_job_quota
        """The account's active-job quota (None: none)."""
        self.profile: RealisticProfile = resolve_profile(realistic)
        """The profile in force (all zeros unless ``realistic`` was given)."""
        self._hooks = Hooks(self.profile)
        expiring = self.profile.credential_lifetime_s is not None
        if tls is not None and not isinstance(tls, bool):
            raise TypeError(f"tls must be True, False or None, got {tls!r}")
        if tls is False and expiring:
            raise ValueError(
                "credential_lifetime_s needs tls: azure-core sends bearer tokens over HTTPS only; "
                "leave tls=None or pass tls=True"
            )
        self.tls: bool = expiring if tls is None else tls
        """Whether Batch and blobs are served over HTTPS (see ``ca_path``)."""
        resolved_slots = (os.cpu_count() or 1) if slots is None else slots
        if isinstance(resolved_slots, bool) or not isinstance(resolved_slots, int) or resolved_slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        if not isinstance(pool_id, str) or not _ID_RE.match(pool_id):
            raise ValueError(f"pool_id must be 1-64 letters, digits, '-' or '_', got {pool_id!r}")
        if not isinstance(container, str) or not _CONTAINER_RE.match(container):
            raise ValueError(
                "container must be 3-63 lowercase letters, digits and single hyphens, "
                f"starting and ending with a letter or digit; got {container!r}"
            )
        if kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {kill_grace_s!r}")
        self.slots: int = resolved_slots
        """Task slots of the pool's node."""
        self.pool_id: str = pool_id
        """Id of the emulated pool."""
        self.vm_size: str = vm_size
        """``vmSize`` the pool reports."""
        self.container: str = container
        """Blob container created in Azurite."""
        self.account_name: str = DEFAULT_ACCOUNT_NAME
        """Batch account name (for shared-key auth)."""
        self.account_key: str = base64.b64encode(secrets.token_bytes(64)).decode()
        """Batch account key, fresh for each emulator."""
        self.storage_account_name: str = AZURITE_ACCOUNT_NAME
        """Azurite's development storage account name."""
        self.storage_account_key: str = AZURITE_ACCOUNT_KEY
        """Azurite's well-known development storage account key."""
        self._task_env = None if task_env is None else dict(task_env)
        self._root_arg = None if root_dir is None else Path(root_dir)
        self._kill_grace_s = kill_grace_s
        self._stack = contextlib.ExitStack()
        self._service: AzureBatchService | None = None
        self._azurite_port: int | None = None
        self._blob_port: int | None = None
        self._root_dir: Path | None = None
        self._tls_files: TlsFiles | None = None
        self._identity: IdentityEndpoint | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> AzureBatchEmulator:
        """Start Azurite and the Batch service; return self.

        Raises:
            AzuriteNotFoundError: Azurite is missing and could not be installed.
            RuntimeError: Azurite did not start.
        """
        if self._service is not None:
            raise RuntimeError("this emulator is already started")
        try:
            executable = find_azurite_blob()
            tls_files = self._tls_files = self._make_tls_files() if self.tls else None
            azurite = AzuriteBlob(
                executable, tls=None if tls_files is None else (tls_files.cert_path, tls_files.key_path)
            )
            # Launch Azurite first: Node's start-up dominates, and the Batch
            # service and the blob SDK import overlap with it.
            azurite.start()
            self._stack.callback(azurite.stop)
            if self._root_arg is None:
                self._root_dir = Path(tempfile.mkdtemp(prefix="cloudexec-azure-batch-"))
                self._stack.callback(shutil.rmtree, self._root_dir, ignore_errors=True)
                # Deleted even if this process is SIGKILLed; tasks die with the node
                # thread that started them.
                self._stack.callback(_process.remove_when_owner_dies(self._root_dir).close)
            else:
                self._root_dir = self._root_arg
                self._root_dir.mkdir(parents=True, exist_ok=True)
            service = AzureBatchService(
                account_name=self.account_name,
                account_key=self.account_key,
                pool_id=self.pool_id,
                slots=self.slots,
                vm_size=self.vm_size,
                root_dir=self._root_dir,
                task_env={},
                kill_grace_s=self._kill_grace_s,
                hooks=self._hooks,
                active_job_quota=self.active_job_quota,
                tls=tls_files,
            )
            service.start()
            self._stack.callback(service.stop)
            self._service = service
            from azure.storage.blob import BlobServiceClient

            self._azurite_port = azurite.wait_ready()
            self._blob_port = self._azurite_port
            if self.profile is not QUIET:
                proxy = FaultProxy(self._hooks, self._azurite_port, tls=tls_files)
                proxy.start()
                self._stack.callback(proxy.stop)
                self._blob_port = proxy.port
            if self.profile.credential_lifetime_s is not None:
                identity = IdentityEndpoint(self._hooks)
                identity.start()
                self._stack.callback(identity.stop)
                self._identity = identity
            service.node.task_env = self.env() if self._task_env is None else dict(self._task_env)
            verify: dict[str, Any] = {}
            if tls_files is not None:
                self._stack.callback(trust_in_process(tls_files))
                verify["connection_verify"] = str(tls_files.ca_path)
            with BlobServiceClient.from_connection_string(self.blob_connection_string, **verify) as blobs:
                blobs.create_container(self.container)
            # Set-up calls are never faulted: the profile's rates apply from here on.
            self._hooks.start_faults()
        except BaseException:
            self.close()
            raise
        return self

    def _make_tls_files(self) -> TlsFiles:
        """A fresh CA and 127.0.0.1 certificate in a folder removed on close (even on SIGKILL)."""
        folder = Path(tempfile.mkdtemp(prefix="cloudexec-azure-tls-"))
        self._stack.callback(shutil.rmtree, folder, ignore_errors=True)
        self._stack.callback(_process.remove_when_owner_dies(folder).close)
        return make_tls_files(folder)

    def close(self) -> None:
        """Kill task processes, stop the Batch service and Azurite. Idempotent."""
        self._stack.close()
        self._service = None
        self._identity = None

    def __enter__(self) -> AzureBatchEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # No keys: a repr ends up in logs and test reports.
        service = self._service
        if service is None:
            where = "not running"
        else:
            where = f"batch_url={service.url!r}, blob_endpoint={self.blob_endpoint!r}"
        return (
            f"AzureBatchEmulator({where}, pool_id={self.pool_id!r}, vm_size={self.vm_size!r}, "
            f"slots={self.slots}, storage_url={self.storage_url!r})"
        )

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of the fork server forking the runner's job processes.

        None before the first such job, and with ``CLOUDEXEC_FORKSERVER=0``
        (every job a fresh interpreter). Each forked job's parent is this pid.
        """
        server = self._running_service().node.forks
        return server.pid if server is not None else None

    @property
    def forked_processes(self) -> int:
        """How many job processes the fork server forked (the rest started fresh interpreters)."""
        server = self._running_service().node.forks
        return server.started_count if server is not None else 0

    def _running_service(self) -> AzureBatchService:
        if self._service is None:
            raise RuntimeError("the emulator is not running; use it inside `with azure_batch_emulator() as emu:`")
        return self._service

    # --------------------------------------------------------------- batch
    @property
    def batch_url(self) -> str:
        """Endpoint of the local Batch service, e.g. ``http://127.0.0.1:41234``."""
        return self._running_service().url

    @property
    def api_calls(self) -> Counter[str]:
        """A snapshot of Batch requests served per operation, keyed by SDK method name.

        Keys include ``create_task_collection``, ``list_tasks``, ``get_task``,
        ``download_task_file``...; rejected signatures count under
        ``authentication_failed``. Faulted requests count too.
        """
        self._running_service()
        return self._hooks.snapshot_calls()

    def _check_fault_target(self, target: Target) -> None:
        if target == "storage" and self.profile is QUIET:
            raise RuntimeError(
                "storage faults need the blob proxy: start the emulator with realistic=True "
                "or realistic=RealisticProfile(storage_fault_rate=0, ...)"
            )

    def issue_credentials(self) -> IssuedCredentials:
        """A new expiring key, valid for ``profile.credential_lifetime_s``.

        :meth:`token_credential` wraps each in an Entra ID token (its ``uti``
        claim); use that to talk to the emulator.

        Raises:
            RuntimeError: The emulator was started without ``credential_lifetime_s``.
        """
        return self._hooks.issue_credentials()

    def token_credential(self) -> EmulatorTokenCredential:
        """An azure-core ``TokenCredential`` for Batch and Blob whose tokens expire and refresh.

        Pass it where a ``DefaultAzureCredential()`` would go. Each token it
        fetches counts in :attr:`credentials_issued`.

        Raises:
            RuntimeError: The emulator was started without ``credential_lifetime_s``.
        """
        self._running_service()
        return EmulatorTokenCredential(self._hooks)

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed the emulator's HTTPS certificate (``tls`` only).

        Raises:
            RuntimeError: The emulator is not running or serves plain HTTP.
        """
        self._running_service()
        if self._tls_files is None:
            raise RuntimeError("this emulator serves plain HTTP; start it with tls=True for a CA")
        return self._tls_files.ca_path

    def expire_job(self, job_id: str) -> bool:
        """Forgets a job and its tasks, as if deleted when its retention ended.

        A job with running tasks has them killed first.

        Returns:
            True if the job existed.
        """
        service = self._running_service()
        with service.store.lock:
            job = service.store.jobs.get(job_id.lower())
            if job is None or job.state == "deleting":
                return False
            service.node.delete_job(job)
            return True

    @property
    def root_dir(self) -> Path:
        """``AZ_BATCH_NODE_ROOT_DIR`` of the emulated node."""
        self._running_service()
        if self._root_dir is None:  # unreachable: set before the service starts
            raise RuntimeError("the emulator has no root directory")
        return self._root_dir

    def task_dir(self, job_id: str, task_id: str) -> Path:
        """Return a task's directory (holds ``stdout.txt``, ``stderr.txt``, ``wd/``).

        Args:
            job_id: Id of the job.
            task_id: Id of the task.
        """
        return self._running_service().node.task_dir(job_id, task_id)

    def credential(self) -> AzureNamedKeyCredential:
        """Return the shared-key credential of the emulated Batch account."""
        from azure.core.credentials import AzureNamedKeyCredential

        return AzureNamedKeyCredential(self.account_name, self.account_key)

    def batch_client(self, **kwargs: Any) -> BatchClient:
        """Return an ``azure.batch.BatchClient`` bound to the emulator.

        Args:
            **kwargs: Passed to ``BatchClient`` (e.g. ``retry_total=0``).
        """
        from azure.batch import BatchClient

        if self.tls:
            kwargs.setdefault("connection_verify", str(self.ca_path))
        return BatchClient(self.batch_url, self.credential(), **kwargs)

    # -------------------------------------------------------------- storage
    @property
    def blob_endpoint(self) -> str:
        """Azurite's blob endpoint, ``http(s)://127.0.0.1:<port>/devstoreaccount1``."""
        self._running_service()
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._blob_port}/{self.storage_account_name}"

    @property
    def blob_connection_string(self) -> str:
        """Connection string for azure-storage-blob and adlfs."""
        return (
            f"DefaultEndpointsProtocol={'https' if self.tls else 'http'};"
            f"AccountName={self.storage_account_name};"
            f"AccountKey={self.storage_account_key};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    @property
    def storage_url(self) -> str:
        """fsspec URL under which executors keep their payloads: ``az://<container>/jobs``."""
        return f"az://{self.container}/jobs"

    def adlfs_options(self) -> dict[str, Any]:
        """Return keyword arguments for ``adlfs.AzureBlobFileSystem`` (storage_options)."""
        return {"connection_string": self.blob_connection_string}

    def env(self) -> dict[str, str]:
        """Return the variables a subprocess needs to reach Azurite.

        ``AZURE_STORAGE_CONNECTION_STRING`` is read by adlfs when no explicit
        credentials are given, and can be passed to
        ``BlobServiceClient.from_connection_string``. With ``tls``,
        ``SSL_CERT_FILE`` (OpenSSL, hence aiohttp) and ``REQUESTS_CA_BUNDLE``
        (requests) name the emulator's CA, read when the process starts.

        With expiring credentials there is no account key: ``IDENTITY_ENDPOINT``
        and ``IDENTITY_HEADER`` let azure-identity's ``ManagedIdentityCredential``
        (which adlfs uses when given an account and no key) fetch expiring
        tokens, as a pool's managed identity does, and ``CLOUDEXEC_STORAGE_OPTIONS``
        gives the runner the account and its emulated host.
        """
        if self._identity is not None:
            env = dict(self._identity.env())
            env["CLOUDEXEC_STORAGE_OPTIONS"] = json.dumps(self._token_storage_options())
        else:
            env = {"AZURE_STORAGE_CONNECTION_STRING": self.blob_connection_string}
        if self.tls:
            env["SSL_CERT_FILE"] = env["REQUESTS_CA_BUNDLE"] = str(self.ca_path)
        return env

    def _token_storage_options(self) -> dict[str, str]:
        """adlfs options naming the account and its emulated host, and no key (token auth)."""
        return {"account_name": self.storage_account_name, "account_host": self.blob_endpoint.split("://", 1)[1]}

    def executor(self, **kwargs: Any) -> AzureBatchExecutor:
        """Return a ``cloudexec.providers.azure.AzureBatchExecutor`` wired to the emulator.

        Args:
            **kwargs: Further executor arguments (job settings, ``poll_interval_s``,
                ``lro_polling_interval_s`` …); they override the defaults
                (``pool_id``, ``batch_url``, ``credential``, ``storage``,
                ``storage_options``).
        """
        from cloudexec.providers.azure import AzureBatchExecutor

        options: dict[str, Any] = {
            "pool_id": self.pool_id,
            "batch_url": self.batch_url,
            "credential": self.credential(),
            "storage": self.storage_url,
            "storage_options": self.adlfs_options(),
        }
        if self.profile.credential_lifetime_s is not None:
            # What a user with DefaultAzureCredential() gives: one token
            # credential, which the executor also uses for Blob (no account key).
            options["credential"] = self.token_credential()
            options["storage_options"] = self._token_storage_options()
        options.update(kwargs)
        return AzureBatchExecutor(**options)


@contextlib.contextmanager
def azure_batch_emulator(
    *,
    slots: int | None = None,
    pool_id: str = DEFAULT_POOL_ID,
    vm_size: str = DEFAULT_VM_SIZE,
    container: str = DEFAULT_CONTAINER,
    task_env: Mapping[str, str] | None = None,
    root_dir: str | os.PathLike[str] | None = None,
    kill_grace_s: float = 2.0,
    realistic: bool | RealisticProfile = False,
    active_job_quota: int | None = None,
    tls: bool | None = None,
) -> Iterator[AzureBatchEmulator]:
    """Run an offline Azure Batch (Azurite + local Batch service) for a test.

    Args:
        slots: Task slots of the pool's single node; defaults to ``os.cpu_count()``.
        pool_id: Id of the emulated pool.
        vm_size: ``vmSize`` the pool reports.
        container: Blob container created in Azurite.
        task_env: Variables every task sees; None gives tasks :meth:`AzureBatchEmulator.env`.
        root_dir: Where task directories go; None means a temporary directory.
        kill_grace_s: Seconds between SIGTERM and SIGKILL when killing a task.
        realistic: True, False or a :class:`RealisticProfile`; see
            :class:`AzureBatchEmulator`.
        active_job_quota: The account's active-job quota; None for none. See
            :class:`AzureBatchEmulator`.
        tls: Serve HTTPS with a throwaway CA; None: when the profile's
            credentials expire. See :class:`AzureBatchEmulator`.

    Yields:
        The running :class:`AzureBatchEmulator`. On exit every task process,
        Azurite and the HTTP server are stopped.

    Raises:
        AzuriteNotFoundError: Azurite is missing and npm could not install it;
            the message says what to run.
        ValueError: An argument is out of range.
    """
    emulator = AzureBatchEmulator(
        slots=slots,
        pool_id=pool_id,
        vm_size=vm_size,
        container=container,
        task_env=task_env,
        root_dir=root_dir,
        kill_grace_s=kill_grace_s,
        realistic=realistic,
        active_job_quota=active_job_quota,
        tls=tls,
    )
    with emulator:
        yield emulator
