"""cloudexec: batch services as ``concurrent.futures`` executors.

Change one line::

    from cloudexec import LocalBatchExecutor      # or a cloud provider's executor
    with LocalBatchExecutor(max_workers=4) as ex:
        print(list(ex.map(simulate, range(100))))

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
    from cloudexec._provider import JobInfo, JobSpec, JobStatus, Phase, Provider
    from cloudexec.errors import (
        CloudExecError,
        JobFailedError,
        JobNotFoundError,
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
    "JobInfo": "cloudexec._provider",
    "JobSpec": "cloudexec._provider",
    "JobStatus": "cloudexec._provider",
    "Phase": "cloudexec._provider",
    "Provider": "cloudexec._provider",
    "JobSettings": "cloudexec.settings",
    "CloudExecError": "cloudexec.errors",
    "JobFailedError": "cloudexec.errors",
    "JobNotFoundError": "cloudexec.errors",
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
