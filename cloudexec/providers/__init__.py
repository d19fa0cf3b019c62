"""Batch service providers: one module each (``local``, ``aws``, ``azure``).

A provider is a small `cloudexec.Provider` subclass plus its status table and
a thin `BatchExecutor` subclass that builds it from user-facing arguments.

`executor_class` is the one registry of them: code outside this package (the
``cloudexec`` command) reaches a provider only through it, so a new provider
is one module here plus one line in ``_EXECUTORS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudexec._base import BatchExecutor

__all__ = ["executor_class", "provider_names", "stored_job_arguments"]

# name -> (module, executor class); a module imports its SDKs only when an
# executor is built, and says which pip extra installs them if they are missing.
_EXECUTORS: dict[str, tuple[str, str]] = {
    "local": ("cloudexec.providers.local", "LocalBatchExecutor"),
    "aws": ("cloudexec.providers.aws", "AWSBatchExecutor"),
    "azure": ("cloudexec.providers.azure", "AzureBatchExecutor"),
}


# Arguments a tool that looks after earlier jobs (the `cloudexec` command) must be
# given even where the executor has a default: the local default storage is a new
# temporary folder, which never holds an earlier job.
_STORED_JOB_ARGUMENTS: dict[str, tuple[str, ...]] = {"local": ("io_root",)}


def stored_job_arguments(name: str) -> tuple[str, ...]:
    """Arguments of provider ``name``'s executor that locate earlier jobs and have no usable default."""
    return _STORED_JOB_ARGUMENTS.get(name, ())


def provider_names() -> list[str]:
    """The names `executor_class` knows, e.g. ``["local", "aws", "azure"]``."""
    return list(_EXECUTORS)


def executor_class(name: str) -> type[BatchExecutor]:
    """The executor class of the provider called ``name``.

    Raises:
        ValueError: no provider has that name (the message lists the known ones).
    """
    try:
        module, cls = _EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known providers: {', '.join(_EXECUTORS)}") from None
    found: type[BatchExecutor] = getattr(importlib.import_module(module), cls)
    return found

