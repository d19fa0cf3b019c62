"""cloudexec's own providers: the registry's fallback, and their exports for type checkers.

At run time only `BUILTIN` is used (by `cloudexec.providers.available`, for a
source checkout that has no entry points). Type checkers cannot follow a
registry, so ``cloudexec/__init__.py`` star-imports this module under
``TYPE_CHECKING`` and sees the built-in providers' exports with their types;
this module itself never imports a provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudexec.providers.aws import AWSBatchExecutor, AWSBatchFuture, AWSJobStatus
    from cloudexec.providers.azure import AzureBatchExecutor, AzureBatchFuture, AzureJobStatus
    from cloudexec.providers.local import LocalBatchExecutor, LocalJobStatus

#: Provider name → module, the same as the entry points in ``pyproject.toml``.
BUILTIN: dict[str, str] = {
    "local": "cloudexec.providers.local",
    "aws": "cloudexec.providers.aws",
    "azure": "cloudexec.providers.azure",
}

# The built-in providers' EXPORTS, for ``from cloudexec.providers._builtin import *``
# under TYPE_CHECKING only (at run time these names come from the registry).
__all__ = [
    "LocalBatchExecutor",
    "LocalJobStatus",
    "AWSBatchExecutor",
    "AWSBatchFuture",
    "AWSJobStatus",
    "AzureBatchExecutor",
    "AzureBatchFuture",
    "AzureJobStatus",
]
