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
``scheduling_priority``  fair-share scheduling priority (AWS, 0..9999)
``share_identifier``   fair-share identifier (AWS)
=====================  ======================================================

Each provider declares which settings it understands; asking one for a
setting it cannot honour raises at the call, with nothing submitted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobSettings", "parse_memory", "COMMON_SETTINGS", "ALL_SETTINGS"]

#: Settings every provider accepts.
COMMON_SETTINGS: frozenset[str] = frozenset({"vcpus", "memory", "gpus", "timeout", "retries", "job_name"})
#: Every setting name cloudexec knows of; providers accept a subset.
ALL_SETTINGS: frozenset[str] = COMMON_SETTINGS | {
    "container_image",
    "priority",
    "tags",
    "scheduling_priority",
    "share_identifier",
}

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
    scheduling_priority: int | None = None
    share_identifier: str | None = None

    @classmethod
    def from_kwargs(cls, allowed: frozenset[str] = ALL_SETTINGS, **kwargs: Any) -> JobSettings:
        """Validate user-facing settings (``memory=``, ``timeout=`` …) into a `JobSettings`.

        Args:
            allowed: the setting names the caller's provider understands.
            **kwargs: settings by their user-facing names; ``None`` means
                "provider default".

        Raises:
            TypeError: an unknown setting, or a value of the wrong type.
            ValueError: a value outside its allowed range.
        """
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"unknown job setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid settings are: {', '.join(sorted(allowed))}"
            )
        values: dict[str, Any] = {}
        for name, value in kwargs.items():
            if value is None:
                continue
            if name == "vcpus":
                values["vcpus"] = _positive_int("vcpus", value)
            elif name == "memory":
                values["memory_mib"] = parse_memory(value)
            elif name == "gpus":
                values["gpus"] = _positive_int("gpus", value, minimum=0)
            elif name == "timeout":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"timeout must be a number of seconds; got {value!r}")
                if not value > 0 or not math.isfinite(value):
                    raise ValueError(f"timeout must be a positive number of seconds; got {value!r}")
                values["timeout_s"] = float(value)
            elif name == "retries":
                values["retries"] = _positive_int("retries", value, minimum=0, maximum=9)
            elif name in ("job_name", "container_image", "share_identifier"):
                if not isinstance(value, str) or not value.strip():
                    raise TypeError(f"{name} must be a non-empty string; got {value!r}")
                values[name] = value
            elif name == "priority":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"priority must be a number from -1 to +1; got {value!r}")
                if not -1.0 <= value <= 1.0:
                    raise ValueError(f"priority must be from -1 (lowest) to +1 (highest); got {value!r}")
                values["priority"] = float(value)
            elif name == "scheduling_priority":
                values["scheduling_priority"] = _positive_int(name, value, minimum=0, maximum=9999)
            elif name == "tags":
                if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise TypeError(f"tags must be a mapping of str to str; got {value!r}")
                values["tags"] = dict(value)
        return cls(**values)

    def merged(self, overrides: JobSettings) -> JobSettings:
        """Return these settings with every non-``None`` field of ``overrides`` on top."""
        changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set, as a JSON-friendly dict (for job manifests)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out
