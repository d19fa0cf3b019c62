"""The test hooks every emulator offers, written once: call counts, faults, credentials.

Both emulators (``aws_batch_emulator``, ``azure_batch_emulator``) expose the same
interface, :class:`EmulatorHooks`; their wire layers ask one :class:`Hooks` object
what to do with each request before answering it::

    request --> wire layer (Gateway / _Handler / storage proxy)
                  |  hooks.count(operation)
                  |  hooks.check_credentials(key)   -> expired? answer the service's
                  |                                    own "token expired" error
                  |  hooks.draw_fault(target)       -> throttle / 5xx / connection reset
                  v
                the service model (job state), unchanged

A :class:`RealisticProfile` switches on, with one argument (``realistic=True``),
what real clouds do and the plain emulators do not: terminal statuses that lag
behind the result, new jobs missing from lists for a moment, a share of calls
failing transiently (each service's own throttling and 5xx codes, and dropped
connections), and optionally credentials that expire.

Faults are drawn from a seeded generator, so a failing run can be replayed with
the same ``seed``.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import secrets
import socket
import struct
import threading
import time
import socketserver
from typing import Literal

__all__ = [
    "EmulatorHooks",
    "Fault",
    "FaultKind",
    "Hooks",
    "IssuedCredentials",
    "RealisticProfile",
    "ResetConnection",
    "Target",
    "reset_socket",
    "resolve_profile",
]

Target = Literal["batch", "storage"]
"""Which side of an emulator a fault hits: the Batch API or blob/object storage."""

FaultKind = Literal["throttle", "error", "reset", "lost"]
"""``throttle``: the service's own 429/503 throttling code; ``error``: a 500/503
internal error; ``reset``: the TCP connection is dropped without an answer, before
the request is served; ``lost``: the request is served, then the connection is
dropped without its answer (the client cannot tell whether it took effect)."""

_KINDS: tuple[FaultKind, ...] = ("throttle", "error", "reset", "lost")
# What a profile draws from unless told otherwise: a lost answer makes a client
# resend a request that already took effect, which only callers that expect it
# (idempotent resends, a submission looked up by name) handle; ask for it by name.
_DEFAULT_KINDS: tuple[FaultKind, ...] = ("throttle", "error", "reset")
_TARGETS: tuple[Target, ...] = ("batch", "storage")


@dataclasses.dataclass(frozen=True)
class RealisticProfile:
    """What "realistic" means for an emulator; every duration is scaled down for tests.

    Attributes:
        status_lag_s: Seconds between a job's process ending (its result already
            stored) and the job being reported terminal. AWS and Azure take seconds.
        visibility_lag_s: Seconds a just-submitted job is missing from describe and
            list answers (both services are eventually consistent).
        batch_fault_rate: Share of Batch API calls answered with a transient fault.
        storage_fault_rate: Share of storage calls answered with a transient fault.
        fault_kinds: Kinds drawn from, uniformly, for rate-based faults.
        credential_lifetime_s: Lifetime of credentials the emulator issues
            (``issue_credentials``); None leaves credentials unchecked.
        seed: Seed of the fault generator (None: a fresh random seed).
    """

    status_lag_s: float = 0.5
    visibility_lag_s: float = 0.3
    batch_fault_rate: float = 0.1
    storage_fault_rate: float = 0.1
    fault_kinds: tuple[FaultKind, ...] = _DEFAULT_KINDS
    credential_lifetime_s: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("status_lag_s", "visibility_lag_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        for name in ("batch_fault_rate", "storage_fault_rate"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        bad = [k for k in self.fault_kinds if k not in _KINDS]
        if bad or not self.fault_kinds:
            raise ValueError(f"fault_kinds must be a non-empty subset of {_KINDS}, got {self.fault_kinds!r}")
        if self.credential_lifetime_s is not None and not self.credential_lifetime_s > 0:
            raise ValueError(f"credential_lifetime_s must be > 0 or None, got {self.credential_lifetime_s!r}")


QUIET = RealisticProfile(
    status_lag_s=0.0, visibility_lag_s=0.0, batch_fault_rate=0.0, storage_fault_rate=0.0
)
"""The plain emulator: no lag, no faults."""


def resolve_profile(realistic: bool | RealisticProfile) -> RealisticProfile:
    """The profile an emulator's ``realistic=`` argument asks for.

    Args:
        realistic: False (plain), True (the default :class:`RealisticProfile`) or a
            profile.

    Raises:
        TypeError: For anything else.
    """
    if realistic is True:
        return RealisticProfile()
    if realistic is False:
        return QUIET
    if isinstance(realistic, RealisticProfile):
        return realistic
    raise TypeError(f"realistic must be True, False or a RealisticProfile, got {realistic!r}")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault to apply to one request."""

    kind: FaultKind
    target: Target


class ResetConnection(Exception):
    """Raised inside a wire layer: drop this request's connection without an answer."""


def reset_socket(sock: socket.socket) -> None:
    """Make closing ``sock`` send a TCP reset (linger 0) instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


@dataclasses.dataclass(frozen=True)
class IssuedCredentials:
    """Temporary credentials, shaped like an STS ``Credentials`` answer.

    Attributes:
        access_key_id: ``ASIA…`` key id.
        secret_access_key: Its secret.
        session_token: Its session token.
        expires_at: Wall-clock expiry (``time.time()`` seconds).
    """

    access_key_id: str
    secret_access_key: str
    session_token: str
    expires_at: float


class EmulatorHooks:
    """The test hooks every emulator offers, written once; an emulator subclasses it.

    Counting:
        ``api_calls`` is a snapshot ``Counter`` of Batch API requests per operation
        (faulted requests count: they reached the service); ``reset_api_calls()``
        zeroes it.

    Faults:
        ``inject_faults(count=n, rate=r, kind=..., target=...)`` makes the next ``n``
        requests to ``target`` fail, and/or a share ``r`` of all later ones (until
        set to 0), with the service's own answers (each emulator's docstring lists
        them). ``inject_throttling(n)`` is ``inject_faults(count=n,
        kind="throttle")``. ``faults_injected`` counts what was applied, per
        ``"<target>:<kind>"``.

    Credentials:
        ``issue_credentials()`` returns temporary credentials valid for the
        profile's ``credential_lifetime_s``; requests signed with an expired one are
        answered with the service's own expired-token error. ``credentials_issued``
        counts them.

    Metadata:
        ``expire_job(job_id)`` forgets a job as the service does after its
        retention period; returns whether it existed.

    A subclass sets ``_hooks`` (the :class:`Hooks` its wire layers consult) and
    implements ``api_calls``, ``issue_credentials`` and ``expire_job``.
    """

    _hooks: Hooks

    @property
    def api_calls(self) -> collections.Counter[str]:
        """A snapshot of Batch API requests received, per operation."""
        return self._hooks.snapshot_calls()

    def reset_api_calls(self) -> None:
        """Sets every count in :attr:`api_calls` (and an emulator's ``storage_calls``) back to zero."""
        self._hooks.reset_calls()

    def inject_faults(
        self, *, count: int = 0, rate: float | None = None, kind: FaultKind = "throttle", target: Target = "batch"
    ) -> None:
        """Makes the next ``count`` requests to ``target`` fail, and/or a share ``rate`` of later ones.

        ``kind="throttle"`` answers with the service's throttling error,
        ``"error"`` with its internal error, ``"reset"`` drops the connection with
        no answer (see the emulator's docstring for the codes).

        Args:
            count: Requests to fail (added to any still pending).
            rate: Share of requests to fail from now on, in [0, 1); None keeps the
                current rate.
            kind: ``"throttle"``, ``"error"`` or ``"reset"``.
            target: ``"batch"`` or ``"storage"``.

        Raises:
            ValueError: An argument out of range.
            RuntimeError: The emulator cannot fault ``target`` as it was started.
        """
        self._check_fault_target(target)
        self._hooks.inject(count=count, rate=rate, kind=kind, target=target)

    def _check_fault_target(self, target: Target) -> None:
        """Raise RuntimeError if faults on ``target`` cannot be applied (default: all can)."""

    def inject_throttling(self, n: int) -> None:
        """Makes the next ``n`` Batch API requests fail with the service's throttling error.

        Raises:
            ValueError: If ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"inject_throttling(n): n must be >= 0, got {n}")
        self._hooks.inject(count=n, kind="throttle", target="batch")

    @property
    def faults_injected(self) -> collections.Counter[str]:
        """Faults applied so far, per ``"<target>:<kind>"`` (and ``"credentials:expired"``)."""
        return self._hooks.snapshot_faults()

    def issue_credentials(self) -> IssuedCredentials:
        """New temporary credentials valid for the profile's ``credential_lifetime_s``."""
        return self._hooks.issue_credentials()

    @property
    def credentials_issued(self) -> int:
        """How many temporary credentials :meth:`issue_credentials` handed out."""
        return self._hooks.credentials_issued

    def expire_job(self, job_id: str) -> bool:
        """Forget a job as the service does after its retention period; True if it existed."""
        raise NotImplementedError


class Hooks:
    """The state behind :class:`EmulatorHooks`, shared by an emulator's wire layers.

    Rate-based faults start only when :meth:`start_faults` is called, so that an
    emulator's own set-up calls are never faulted.

    Args:
        profile: The emulator's profile (rates and credential lifetime).
    """

    def __init__(self, profile: RealisticProfile) -> None:
        self.profile = profile
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._storage_calls: collections.Counter[str] = collections.Counter()
        self._faults: collections.Counter[str] = collections.Counter()
        self._pending: dict[Target, collections.deque[FaultKind]] = {t: collections.deque() for t in _TARGETS}
        self._rates: dict[Target, float] = {"batch": 0.0, "storage": 0.0}
        self._rate_kinds: dict[Target, tuple[FaultKind, ...]] = {t: profile.fault_kinds for t in _TARGETS}
        self._random = random.Random(profile.seed if profile.seed is not None else secrets.randbits(64))
        self._keys: dict[str, float] = {}
        self._issued = 0

    # -- counting
    def count(self, operation: str) -> None:
        """Count one Batch API request."""
        with self._lock:
            self._calls[operation] += 1

    def snapshot_calls(self) -> collections.Counter[str]:
        """A copy of the Batch API call counts."""
        with self._lock:
            return collections.Counter(self._calls)

    def count_storage(self, operation: str) -> None:
        """Count one storage request (an emulator whose wire layer sees them)."""
        with self._lock:
            self._storage_calls[operation] += 1

    def snapshot_storage_calls(self) -> collections.Counter[str]:
        """A copy of the storage call counts."""
        with self._lock:
            return collections.Counter(self._storage_calls)

    def reset_calls(self) -> None:
        """Zero the Batch API and storage call counts."""
        with self._lock:
            self._calls.clear()
            self._storage_calls.clear()

    # -- faults
    def inject(
        self, *, count: int = 0, rate: float | None = None, kind: FaultKind = "throttle", target: Target = "batch"
    ) -> None:
        """Queue ``count`` faults of ``kind`` on ``target``, and/or set its fault rate.

        Raises:
            ValueError: A negative count, a rate outside [0, 1), an unknown kind or target.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if rate is not None and not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate!r}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        with self._lock:
            self._pending[target].extend([kind] * count)
            if rate is not None:
                self._rates[target] = rate
                self._rate_kinds[target] = (kind,)

    def start_faults(self) -> None:
        """Apply the profile's fault rates from now on."""
        with self._lock:
            self._rates = {"batch": self.profile.batch_fault_rate, "storage": self.profile.storage_fault_rate}

    def draw_fault(self, target: Target) -> Fault | None:
        """The fault to apply to this request to ``target``, if any (and count it)."""
        with self._lock:
            pending = self._pending[target]
            if pending:
                kind = pending.popleft()
            elif self._rates[target] and self._random.random() < self._rates[target]:
                kind = self._random.choice(self._rate_kinds[target])
            else:
                return None
            self._faults[f"{target}:{kind}"] += 1
        return Fault(kind, target)

    def snapshot_faults(self) -> collections.Counter[str]:
        """A copy of the applied-fault counts, per ``"<target>:<kind>"``."""
        with self._lock:
            return collections.Counter(self._faults)

    # -- credentials
    def issue_credentials(self) -> IssuedCredentials:
        """New temporary credentials valid for the profile's lifetime.

        Raises:
            RuntimeError: The profile has no ``credential_lifetime_s``.
        """
        lifetime = self.profile.credential_lifetime_s
        if lifetime is None:
            raise RuntimeError(
                "this emulator does not expire credentials; start it with "
                "realistic=RealisticProfile(credential_lifetime_s=...)"
            )
        key = "ASIA" + secrets.token_hex(8).upper()
        expires_at = time.time() + lifetime
        with self._lock:
            self._keys[key] = expires_at
            self._issued += 1
        return IssuedCredentials(key, secrets.token_urlsafe(30), secrets.token_urlsafe(60), expires_at)

    @property
    def credentials_issued(self) -> int:
        """How many credentials :meth:`issue_credentials` handed out."""
        with self._lock:
            return self._issued

    def credentials_expired(self, key: str | None) -> bool:
        """Whether a request signed with ``key`` must be refused as expired.

        Only keys this emulator issued expire; the emulator's long-lived keys (the
        ones job processes get) are always accepted.
        """
        if not key:
            return False
        with self._lock:
            expires_at = self._keys.get(key)
        if expires_at is None:
            return False
        if time.time() >= expires_at:
            with self._lock:
                self._faults["credentials:expired"] += 1
            return True
        return False


class ServedInThread:
    """An emulator's small HTTP server (a proxy, a token endpoint) answering on a daemon thread of its own."""

    def __init__(self, server: socketserver.BaseServer, name: str) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name, daemon=True
        )

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and close the listening socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
