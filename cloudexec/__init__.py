"""cloudexec: AWS Batch, Azure Batch and local processes as ``concurrent.futures`` executors.

Every executor is a real ``concurrent.futures.Executor``: ``submit``, ``map``,
``shutdown`` and the ``with`` block behave as in ``ProcessPoolExecutor``, and the
futures work with ``wait``, ``as_completed`` and ``asyncio.wrap_future``. Change
the executor, keep the code::

    import math
    from cloudexec import LocalBatchExecutor      # or AWSBatchExecutor, AzureBatchExecutor

    with LocalBatchExecutor(max_workers=4) as ex:
        print(list(ex.map(math.factorial, range(5))))    # [1, 1, 2, 6, 24]
        future = ex.submit(pow, 2, 10)
        print(future.result(), future.job_id)             # 1024 pow-...

Executors (each a job per call; ``submit_map`` sends a whole list as one array job):

* ``LocalBatchExecutor(io_root=None, max_workers=None, **settings)``: local
  processes, with the clouds' semantics (timeouts, memory limits, retries, logs).
* ``AWSBatchExecutor(job_queue, job_definition, io_bucket="s3://bucket/prefix")``
  (``pip install 'cloudexec[aws]'``).
* ``AzureBatchExecutor(pool_id, batch_url=..., storage="az://container/prefix")``
  (``pip install 'cloudexec[azure]'``).

Job settings, given to the executor or per call with ``ex.with_settings(...)``:
``vcpus``, ``memory`` (``"4 GiB"``), ``gpus``, ``timeout`` (s), ``retries``,
``priority``, ``container_image``, ``job_name``, ``tags``.

Futures (``BatchFuture``) also tell what the provider knows: ``job_id`` (enough
to ``ex.attach(job_id)`` from another process), ``job_status`` (the provider's
own state names), ``job_exit_code``, ``job_status_reason``, ``job_log``.

Errors (``cloudexec.errors``): an exception raised by your function is
re-raised as itself with the remote traceback as ``__cause__``; a job that ended
without a result raises ``JobFailedError`` (id, status, reason, exit code, log
tail); a refused submission ``SubmissionError``.

Logging goes to the ``cloudexec`` logger (``logging.getLogger("cloudexec")``);
identical warnings are folded into one per minute.

Testing without a cloud: ``cloudexec.testing`` has an AWS Batch emulator (moto)
and an Azure Batch emulator (Azurite), both running jobs as local processes, and
an in-process fake provider. The runner images are in ``container/``, the
infrastructure templates in ``infra/`` (see ``docs/``).

Names are imported lazily so that the in-container runner
(``python -m cloudexec.runner``), which imports this package, starts fast,
and so that the cloud SDKs load only with their provider. Providers' names
(their executors, futures and status tables) come from the provider
registry, `cloudexec.providers`: this package names none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cloudexec._version import __version__

if TYPE_CHECKING:
    from cloudexec._base import ArrayFuture, BatchExecutor, BatchFuture
    from cloudexec._provider import Dependency, JobInfo, JobSpec, JobStatus, Phase, Provider
    from cloudexec.errors import (
        CloudExecError,
        JobFailedError,
        JobNotFoundError,
        JobUnreachableError,
        PayloadError,
        StorageError,
        SubmissionError,
        VersionMismatchError,
    )
    from cloudexec.providers._builtin import *  # noqa: F403 - the registry's exports, for type checkers
    from cloudexec.settings import JobSettings

_WHERE = {
    "BatchExecutor": "cloudexec._base",
    "BatchFuture": "cloudexec._base",
    "ArrayFuture": "cloudexec._base",
    "Dependency": "cloudexec._provider",
    "JobInfo": "cloudexec._provider",
    "JobSpec": "cloudexec._provider",
    "JobStatus": "cloudexec._provider",
    "Phase": "cloudexec._provider",
    "Provider": "cloudexec._provider",
    "JobSettings": "cloudexec.settings",
    "CloudExecError": "cloudexec.errors",
    "JobFailedError": "cloudexec.errors",
    "JobNotFoundError": "cloudexec.errors",
    "JobUnreachableError": "cloudexec.errors",
    "PayloadError": "cloudexec.errors",
    "StorageError": "cloudexec.errors",
    "SubmissionError": "cloudexec.errors",
    "VersionMismatchError": "cloudexec.errors",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    if name == "__all__":
        # Listing every public name imports every registered provider: only
        # ``from cloudexec import *`` and dir() ask for it.
        from cloudexec.providers import exported_names

        return ["__version__", *_WHERE, *exported_names()]
    if name[:1].isupper():
        from cloudexec.providers import find_export

        try:
            return find_export(name)
        except AttributeError:
            pass
    raise AttributeError(f"module 'cloudexec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__getattr__("__all__"))
