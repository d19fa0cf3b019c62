"""Job settings: what a job asks of the provider, validated once at call time.

Settings are given as keyword arguments to an executor's constructor (its
defaults) or to ``executor.with_settings(**overrides)``. They never travel
through ``submit``'s ``**kwargs``, so a function's own keyword arguments can
never collide with them.

=====================  ======================================================
setting                meaning
=====================  ======================================================
``vcpus``              whole vCPUs the job needs (int ≥ 1)
``memory``             memory limit: int MiB, or a string ``"512 MiB"``,
                       ``"4 GiB"``, ``"1.5GB"`` (decimal units are 10**n bytes)
``gpus``               GPUs the job needs (int ≥ 0)
``timeout``            seconds an attempt may run before it is killed
``retries``            extra attempts after a failed one (int 0..9)
``job_name``           a name for the job (providers sanitise it)
``container_image``    container image reference (providers that choose one)
``priority``           scheduling priority from -1 (lowest) to +1 (highest)
``tags``               mapping of str to str, attached to the job
=====================  ======================================================

Each provider declares which of these it understands (`Provider.settings`),
and declares the settings only it honours, with their validators, itself
(`Provider.provider_settings`, e.g. a service's fair-share identifier): the
core merges that table into this one and keeps their values in
`JobSettings.extra`. Asking a provider for a setting it cannot honour raises
at the call, with nothing submitted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "JobSettings",
    "Validator",
    "parse_memory",
    "int_in",
    "non_empty_str",
    "COMMON_SETTINGS",
    "ALL_SETTINGS",
    "SETTINGS",
]

#: Checks one setting: ``validator(name, value)`` returns the value to keep,
#: or raises TypeError/ValueError naming the setting, the bad value and the
#: allowed range.
Validator = Callable[[str, Any], Any]

#: Settings every provider accepts.
COMMON_SETTINGS: frozenset[str] = frozenset({"vcpus", "memory", "gpus", "timeout", "retries", "job_name"})

_MIB = 1024 * 1024
# Binary units count 1024**n bytes, decimal ones 1000**n; single letters
# follow Docker's convention (binary).
_UNITS: dict[str, int] = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": _MIB,
    "mb": 1000**2,
    "mib": _MIB,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_MEMORY_HELP = 'an int number of MiB, or a string such as "512 MiB", "4 GiB" or "1.5GB"'


def parse_memory(value: int | str) -> int:
    """Convert a memory setting to whole MiB, rounding up.

    Args:
        value: an int number of MiB, or a string with a unit (``"512 MiB"``,
            ``"4 GiB"``, ``"1.5GB"``, ``"2g"``). A bare number string is MiB.

    Returns:
        The size in MiB (at least 1).

    Raises:
        TypeError: ``value`` is neither int nor str.
        ValueError: the string is malformed or the size is not positive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"memory must be {_MEMORY_HELP}; got {value!r} ({type(value).__name__})")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory must be a positive number of MiB; got {value!r}")
        return value
    match = _MEMORY_RE.match(value)
    if not match:
        raise ValueError(f"memory must be {_MEMORY_HELP}; got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit and unit not in _UNITS:
        known = ", ".join(sorted({"B", "KB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB"}))
        raise ValueError(f"memory {value!r} has an unknown unit {match.group(2)!r}; use one of {known}")
    size_bytes = number * (_UNITS[unit] if unit else _MIB)
    mib = math.ceil(size_bytes / _MIB)
    if mib <= 0:
        raise ValueError(f"memory must be positive; got {value!r}")
    return mib


def _positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}; got {value!r}")
    return value


def int_in(minimum: int = 1, maximum: int | None = None) -> Validator:
    """A validator of whole numbers from ``minimum`` to ``maximum`` (no upper bound if ``None``)."""

    def check(name: str, value: Any) -> int:
        return _positive_int(name, value, minimum=minimum, maximum=maximum)

    return check


def non_empty_str(name: str, value: Any) -> str:
    """Validator of a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{name} must be a non-empty string; got {value!r}")
    return value


def _memory(name: str, value: Any) -> int:
    return parse_memory(value)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds; got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number of seconds; got {value!r}")
    return float(value)


def _priority(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number from -1 to +1; got {value!r}")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} must be from -1 (lowest) to +1 (highest); got {value!r}")
    return float(value)


def _tags(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"{name} must be a mapping of str to str; got {value!r}")
    return dict(value)


#: The settings cloudexec defines: user-facing name → (`JobSettings` field, validator).
SETTINGS: Mapping[str, tuple[str, Validator]] = {
    "vcpus": ("vcpus", int_in(1)),
    "memory": ("memory_mib", _memory),
    "gpus": ("gpus", int_in(0)),
    "timeout": ("timeout_s", _seconds),
    "retries": ("retries", int_in(0, 9)),
    "job_name": ("job_name", non_empty_str),
    "container_image": ("container_image", non_empty_str),
    "priority": ("priority", _priority),
    "tags": ("tags", _tags),
}
#: Every setting name cloudexec itself defines; providers accept a subset,
#: plus the ones they declare themselves.
ALL_SETTINGS: frozenset[str] = frozenset(SETTINGS)


@dataclass(frozen=True)
class JobSettings:
    """Validated job settings. Fields left ``None`` take the provider's default.

    Build one with `JobSettings.from_kwargs`, which validates every value;
    `merged` layers overrides on top of defaults.
    """

    vcpus: int | None = None
    memory_mib: int | None = None
    gpus: int | None = None
    timeout_s: float | None = None
    retries: int | None = None
    job_name: str | None = None
    container_image: str | None = None
    priority: float | None = None
    tags: Mapping[str, str] | None = field(default=None, hash=False)
    #: Settings a provider declared itself (`Provider.provider_settings`), by name.
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_kwargs(
        cls,
        allowed: frozenset[str] = ALL_SETTINGS,
        provider_settings: Mapping[str, Validator] | None = None,
        **kwargs: Any,
    ) -> JobSettings:
        """Validate user-facing settings (``memory=``, ``timeout=`` …) into a `JobSettings`.

        Args:
            allowed: the names from `SETTINGS` the caller's provider understands.
            provider_settings: the settings the provider declares itself, with
                their validators; their values go to `extra`.
            **kwargs: settings by their user-facing names; ``None`` means
                "provider default".

        Raises:
            TypeError: an unknown setting, or a value of the wrong type.
            ValueError: a value outside its allowed range.
        """
        own = dict(provider_settings or {})
        valid = (allowed & ALL_SETTINGS) | set(own)
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(
                f"unknown job setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid settings are: {', '.join(sorted(valid))}"
            )
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in kwargs.items():
            if value is None:
                continue
            if name in own:
                extra[name] = own[name](name, value)
            else:
                target, validate = SETTINGS[name]
                values[target] = validate(name, value)
        return cls(**values, extra=extra)

    def get(self, name: str, default: Any = None) -> Any:
        """A setting a provider declared itself (see `extra`), ``default`` if not set."""
        return self.extra.get(name, default)

    def merged(self, overrides: JobSettings) -> JobSettings:
        """Return these settings with every non-``None`` field of ``overrides`` on top."""
        changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides) if f.name != "extra"}
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes, extra={**self.extra, **overrides.extra})

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set, as a JSON-friendly dict (for job manifests)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if value is not None:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        # A provider's own settings sit next to the common ones, as users named them.
        out.update({k: dict(v) if isinstance(v, Mapping) else v for k, v in self.extra.items()})
        return out
