"""Batch service providers, and the one registry that finds them.

A provider is one module (or package): a small `cloudexec.Provider` subclass,
its status table and a thin `BatchExecutor` subclass that builds it from
user-facing arguments. It is registered, as fsspec implementations and
submitit plugins are, by an entry point in its distribution's metadata::

    [project.entry-points."cloudexec.providers"]
    google = "cloudexec_google"          # name = the provider's module

The module's ``EXPORTS`` (a tuple of names) become public names of
``cloudexec`` itself, loaded on first use: ``from cloudexec import
GoogleBatchExecutor`` imports ``cloudexec_google`` then, and nothing before.

cloudexec's own providers are registered the same way in its
``pyproject.toml``; `BUILTIN` (in ``_builtin.py``) lists them again so that
a source checkout that was never (re)installed, which has no entry points,
still finds them.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cloudexec.providers._builtin import BUILTIN

if TYPE_CHECKING:
    from cloudexec._base import BatchExecutor

__all__ = [
    "GROUP",
    "BUILTIN",
    "available",
    "load",
    "exported_names",
    "find_export",
    "executor_class",
    "provider_names",
    "stored_job_arguments",
]

#: The entry-point group providers register under.
GROUP = "cloudexec.providers"
_lock = threading.Lock()
_found: dict[str, str] | None = None


def available() -> dict[str, str]:
    """Every registered provider: name → module, the built-ins first.

    Read once per process from the installed entry points (a registered name
    that is also built in keeps the entry point's module).
    """
    global _found
    with _lock:
        if _found is None:
            from importlib.metadata import entry_points

            found = dict(BUILTIN)
            for entry in entry_points(group=GROUP):
                found[entry.name] = entry.value.partition(":")[0].strip()
            _found = found
        return dict(_found)


def load(name: str) -> ModuleType:
    """Import the module of provider ``name``.

    Raises:
        ValueError: no provider has that name; the message lists those that do.
    """
    modules = available()
    if name not in modules:
        raise ValueError(
            f"no cloudexec provider is named {name!r}; registered: {', '.join(sorted(modules))}. "
            f"A provider registers with an entry point in the {GROUP!r} group (see docs/providers.md)."
        )
    return importlib.import_module(modules[name])


def exported_names() -> list[str]:
    """The public names every provider exports into ``cloudexec`` (imports every provider)."""
    names: list[str] = []
    for name in available():
        names += [n for n in getattr(load(name), "EXPORTS", ()) if n not in names]
    return names


def find_export(name: str) -> Any:
    """The object a provider exports as ``cloudexec.<name>``.

    Providers are imported in registry order until one exports ``name``.

    Raises:
        AttributeError: no provider exports it.
    """
    for provider in available():
        module = load(provider)
        if name in getattr(module, "EXPORTS", ()):
            return getattr(module, name)
    raise AttributeError(f"no cloudexec provider exports {name!r}")


def __getattr__(name: str) -> Any:
    # Submodules (lower-case, or private) are never exports: ``from
    # cloudexec.providers import _x`` asks here before importing ``_x``, and
    # must not import every provider on the way.
    if not name[:1].isupper():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return find_export(name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def provider_names() -> list[str]:
    """The registered providers' names, e.g. ``["local", "aws", "azure"]``."""
    return list(available())


def executor_class(name: str) -> type[BatchExecutor]:
    """The executor class of the provider called ``name`` (the `BatchExecutor` it exports).

    Raises:
        ValueError: no provider has that name, or it exports no executor.
    """
    from cloudexec._base import BatchExecutor

    module = load(name)
    for export in getattr(module, "EXPORTS", ()):
        found = getattr(module, export, None)
        if isinstance(found, type) and issubclass(found, BatchExecutor):
            return found
    raise ValueError(f"the cloudexec provider {name!r} ({module.__name__}) exports no BatchExecutor in EXPORTS")


def stored_job_arguments(name: str) -> tuple[str, ...]:
    """Arguments of provider ``name``'s executor that locate earlier jobs and have no usable default.

    A tool that looks after earlier jobs (the ``cloudexec`` command) must be
    given them: e.g. the local provider's default storage is a new temporary
    folder, which never holds an earlier job. A provider lists them in its
    module's ``STORED_JOB_ARGUMENTS``.
    """
    return tuple(getattr(load(name), "STORED_JOB_ARGUMENTS", ()))
