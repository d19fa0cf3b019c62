"""Offline emulators of the cloud batch services, for your own test suites.

``aws_batch_emulator()`` starts moto's server on 127.0.0.1 and really runs each
job's command as a local process; ``azure_batch_emulator()`` starts Azurite and a
local Azure Batch REST service. Both yield an object whose ``executor(**kwargs)``
returns a ready executor, so a pipeline can be tested with no cloud account.
``cloudexec.testing.fake`` is a whole provider whose service lives in this
process (jobs run in threads): the fastest executor for unit tests, and the
model of a new provider (``docs/providers.md``).

``realistic=True`` (or a ``RealisticProfile``) makes either emulator lag,
throttle, fail and drop connections as the clouds do; both share one set of
test hooks (``cloudexec.testing._hooks.EmulatorHooks``).

The emulators import their heavy dependencies (moto, azure SDKs) lazily, so
importing this package costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RealisticProfile", "aws_batch_emulator", "azure_batch_emulator"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import cloudexec.testing` does not pull moto or azure in.
    if name == "aws_batch_emulator":
        from cloudexec.testing.aws import aws_batch_emulator

        return aws_batch_emulator
    if name == "RealisticProfile":
        from cloudexec.testing._hooks import RealisticProfile

        return RealisticProfile
    if name == "azure_batch_emulator":
        from cloudexec.testing.azure import azure_batch_emulator

        return azure_batch_emulator
    raise AttributeError(f"module 'cloudexec.testing' has no attribute {name!r}")
