"""cloudexec: AWS Batch and Azure Batch as ``concurrent.futures`` executors.

Change one line::

    from cloudexec import LocalBatchExecutor      # or AWSBatchExecutor, AzureBatchExecutor
    with LocalBatchExecutor(max_workers=4) as ex:
        print(list(ex.map(simulate, range(100))))

Names are imported lazily so that the in-container runner
(``python -m cloudexec.runner``), which imports this package, starts fast,
and so that the cloud SDKs load only with their provider.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cloudexec._version import __version__

if TYPE_CHECKING:
    from cloudexec._base import ArrayFuture, BatchExecutor, BatchFuture
    from cloudexec._provider import JobInfo, JobSpec, JobStatus, Phase, Provider
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
    from cloudexec.providers.aws import AWSBatchExecutor, AWSBatchFuture, AWSJobStatus
    from cloudexec.providers.azure import AzureBatchExecutor, AzureBatchFuture, AzureJobStatus
    from cloudexec.providers.local import LocalBatchExecutor, LocalJobStatus
    from cloudexec.settings import JobSettings

_WHERE = {
    "BatchExecutor": "cloudexec._base",
    "BatchFuture": "cloudexec._base",
    "ArrayFuture": "cloudexec._base",
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
    "LocalBatchExecutor": "cloudexec.providers.local",
    "LocalJobStatus": "cloudexec.providers.local",
    "AWSBatchExecutor": "cloudexec.providers.aws",
    "AWSBatchFuture": "cloudexec.providers.aws",
    "AWSJobStatus": "cloudexec.providers.aws",
    "AzureBatchExecutor": "cloudexec.providers.azure",
    "AzureBatchFuture": "cloudexec.providers.azure",
    "AzureJobStatus": "cloudexec.providers.azure",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cloudexec' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
