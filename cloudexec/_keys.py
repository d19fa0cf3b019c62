"""Keys and signed envelopes: the bucket is untrusted, so nothing is unpickled unverified.

Anyone who can write to the job storage could otherwise plant a pickle that
runs code in the runner (a call) or in the client (a result). Every call,
input slice, result and manifest is therefore sealed with HMAC-SHA256 and
verified *before* anything is deserialised::

    master key (client only: key=, CLOUDEXEC_KEY, or the key file)
        │  HKDF-SHA256(master, info = "cloudexec job key v1" + job id)
        ▼
    job key ──► the job's environment only (CLOUDEXEC_JOB_KEY), through the
        │       provider's job definition channel (container / task environment)
        ▼
    seal(job key, kind, job id, index, payload)
        = MAGIC | claim length | claim "kind job_id index" | HMAC tag | payload

The tag covers the claim and the payload, so an object copied from another
job or another array child, truncated, or altered fails; the claim is kept in
clear only to say *why* an object was refused ("copied from job X").

A job key opens one job only: a key read from one job's environment or from
the provider's describe output cannot sign or verify another job's objects.
The master key never enters storage or a job.

Rotation: the client accepts several master keys, newest first. It signs with
the newest and verifies with each in turn, so results of jobs submitted before
a rotation can still be read. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Union

from cloudexec.errors import IntegrityError

__all__ = [
    "KEY_ENV",
    "JOB_KEY_ENV",
    "UPSTREAM_KEYS_ENV",
    "KeyRing",
    "load_keys",
    "key_file_path",
    "job_key",
    "seal",
    "open_sealed",
    "unverified_payload",
    "job_environment",
    "job_keys_from_env",
    "sign_manifest",
    "verify_manifest",
]

#: Environment variable holding the client's master key(s), newest first, comma-separated.
KEY_ENV = "CLOUDEXEC_KEY"
#: Environment variable through which a job receives its own derived key (hex).
JOB_KEY_ENV = "CLOUDEXEC_JOB_KEY"
#: Environment variable with the keys of jobs whose results this job may read
#: (futures passed as arguments): ``<job id>=<hex key>`` pairs, comma-separated.
UPSTREAM_KEYS_ENV = "CLOUDEXEC_UPSTREAM_KEYS"

MIN_KEY_CHARS = 16
_MAGIC = b"CLDXSIG1"
_TAG = 32
_INFO = b"cloudexec job key v1\x00"
_SALT = b"cloudexec"

KeyLike = Union[str, bytes]

_KEY_FILE_HEADER = (
    "# cloudexec master key: signs jobs and verifies their results. Keep it private (chmod 600).\n"
    "# To rotate, put the new key on the first line and keep the old one below it.\n"
)


# -- master keys ---------------------------------------------------------------


def key_file_path() -> str:
    """Where the key file lives: ``$XDG_CONFIG_HOME/cloudexec/key`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cloudexec", "key")


class KeyRing:
    """The client's master keys, newest first; signs with the newest, verifies with any.

    It refuses to be pickled and hides its keys from ``repr``, so that a key
    cannot travel into a payload or a log by accident.
    """

    __slots__ = ("_keys", "source")

    def __init__(self, keys: Sequence[bytes], source: str) -> None:
        if not keys:
            raise ValueError("a KeyRing needs at least one key")
        self._keys = tuple(keys)
        self.source = source

    def job_key(self, job_id: str) -> bytes:
        """The key of job ``job_id`` derived from the newest master key (for signing)."""
        return job_key(self._keys[0], job_id)

    def job_keys(self, job_id: str) -> list[bytes]:
        """The keys of job ``job_id`` derived from every master key, newest first (for verifying)."""
        return [job_key(k, job_id) for k in self._keys]

    def __repr__(self) -> str:
        return f"<KeyRing {len(self._keys)} key(s) from {self.source}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a cloudexec KeyRing holds the master key and cannot be pickled: it must never reach storage "
            "or a job. Pass plain values to your functions instead."
        )


def _as_bytes(key: KeyLike, where: str) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    raw = raw.strip()
    if len(raw) < MIN_KEY_CHARS:
        raise ValueError(
            f"the cloudexec key from {where} is {len(raw)} characters long; use at least {MIN_KEY_CHARS} "
            "random characters, e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\""
        )
    return raw


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def load_keys(key: KeyLike | Sequence[KeyLike] | KeyRing | None = None) -> KeyRing:
    """The master keys, from the first source that has one.

    Sources, in order: ``key`` (one key, or a list newest first); the
    ``CLOUDEXEC_KEY`` environment variable (comma-separated, newest first);
    the key file `key_file_path` (one key per line, newest first, ``#``
    comment lines allowed), which is
    created with a fresh random key and mode 0600 when missing.

    Raises:
        ValueError: a key shorter than 16 characters, or an empty list.
        PermissionError: the key file is readable by group or others.
    """
    if isinstance(key, KeyRing):
        return key
    if key is not None:
        given = [key] if isinstance(key, (str, bytes, bytearray)) else list(key)
        if not given:
            raise ValueError("key=[] gives no key; pass one key or a list of keys, newest first")
        return KeyRing([_as_bytes(k, "key=") for k in given], "key=")
    env = os.environ.get(KEY_ENV)
    if env and env.strip():
        return KeyRing([_as_bytes(k, KEY_ENV) for k in _split(env)], KEY_ENV)
    path = key_file_path()
    lines = [line.strip() for line in _read_or_create_key_file(path).splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise ValueError(f"the cloudexec key file {path} holds no key (only comments or blank lines)")
    return KeyRing([_as_bytes(k, path) for k in found], path)


def _read_or_create_key_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _create_key_file(path)
    with os.fdopen(fd, encoding="utf-8") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(
                f"the cloudexec key file {path} is accessible to group or others (mode {stat.filemode(mode)}); "
                f"run: chmod 600 {path}"
            )
        return fh.read()


def _create_key_file(path: str) -> str:
    """Create the key file with a fresh key, atomically: a racing process reads the same key."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    text = _KEY_FILE_HEADER + secrets.token_urlsafe(32) + "\n"
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile
        except FileExistsError:
            return _read_or_create_key_file(path)
        return text
    finally:
        os.unlink(tmp)


# -- job keys ------------------------------------------------------------------


def job_key(master: bytes, job_id: str) -> bytes:
    """The key of one job: HKDF-SHA256 (RFC 5869) of the master key, bound to the job id."""
    prk = hmac.new(_SALT, master, hashlib.sha256).digest()
    return hmac.new(prk, _INFO + job_id.encode() + b"\x01", hashlib.sha256).digest()


def job_environment(keys: KeyRing, job_id: str, upstream: Sequence[str] = ()) -> dict[str, str]:
    """Environment variables that give job ``job_id`` its key (and its upstream jobs' keys).

    ``upstream`` names jobs whose results this job reads (futures passed as
    arguments); the job gets their keys to verify those results.
    """
    env = {JOB_KEY_ENV: keys.job_key(job_id).hex()}
    if upstream:
        env[UPSTREAM_KEYS_ENV] = ",".join(f"{u}={keys.job_key(u).hex()}" for u in dict.fromkeys(upstream))
    return env


def job_keys_from_env(environ: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """In a job: the keys it received, by job id (``""`` is its own key).

    Raises:
        IntegrityError: no job key in the environment, or a malformed one.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_KEY_ENV, "")
    try:
        keys = {"": bytes.fromhex(raw)}
        for pair in _split(environ.get(UPSTREAM_KEYS_ENV, "")):
            up_id, _, hexkey = pair.partition("=")
            keys[up_id] = bytes.fromhex(hexkey)
    except ValueError:
        raise IntegrityError(f"{JOB_KEY_ENV} or {UPSTREAM_KEYS_ENV} in the job's environment is not hex") from None
    if len(keys[""]) != _TAG:
        raise IntegrityError(
            f"the job has no key: {JOB_KEY_ENV} is missing from its environment, so it cannot verify its call. "
            "Submit it through a cloudexec executor (which sets it), not by hand."
        )
    return keys


# -- sealing -------------------------------------------------------------------


def _claim(kind: str, job_id: str, index: int | None) -> bytes:
    return f"{kind} {job_id} {'-' if index is None else index}".encode()


def _tag(key: bytes, claim: bytes, payload: bytes | memoryview) -> bytes:
    mac = hmac.new(key, _MAGIC, hashlib.sha256)
    mac.update(len(claim).to_bytes(2, "big"))
    mac.update(claim)
    mac.update(payload)
    return mac.digest()


def _what(kind: str, job_id: str, index: int | None) -> str:
    return f"{kind} of job {job_id}" + ("" if index is None else f"[{index}]")


def seal(key: bytes, kind: str, job_id: str, index: int | None, payload: bytes) -> bytes:
    """Sign ``payload`` as the ``kind`` object of job ``job_id`` (array child ``index``).

    Args:
        key: the job's key (`job_key`).
        kind: ``"call"``, ``"input"``, ``"result"`` or ``"manifest"``.
        job_id: the cloudexec job id.
        index: the array child, or ``None`` for the job as a whole.
        payload: the bytes to protect.
    """
    claim = _claim(kind, job_id, index)
    return _MAGIC + len(claim).to_bytes(2, "big") + claim + _tag(key, claim, payload) + payload


def seal_room(kind: str, job_id: str, index: int | None) -> int:
    """Bytes `seal_in_place` writes in front of the payload."""
    return len(_MAGIC) + 2 + len(_claim(kind, job_id, index)) + _TAG


def seal_in_place(
    key: bytes, kind: str, job_id: str, index: int | None, buffer: memoryview, start: int
) -> memoryview:
    """`seal` of ``buffer[start:]``, written into the `seal_room` bytes before ``start``.

    Returns the sealed object as a view of ``buffer``: the payload (a call
    with a 100 MiB argument) is not copied again.
    """
    claim = _claim(kind, job_id, index)
    head = _MAGIC + len(claim).to_bytes(2, "big") + claim
    begin = start - len(head) - _TAG
    if begin < 0:
        raise ValueError(f"seal_in_place needs {len(head) + _TAG} bytes before the payload; got {start}")
    buffer[begin:start] = head + _tag(key, claim, buffer[start:])
    return buffer[begin:]


def open_sealed(
    keys: bytes | Sequence[bytes], kind: str, job_id: str, index: int | None, data: bytes, *, what: str | None = None
) -> bytes:
    """Verify a sealed object and return its payload; nothing is deserialised before.

    Args:
        keys: the job's key, or its keys under every master key (rotation).
        kind, job_id, index: what the object must be (see `seal`).
        data: the stored bytes.
        what: the object's name for messages (e.g. ``"results/0000003.pkl"``).

    Raises:
        IntegrityError: unsigned, truncated, tampered with, copied from
            another job or child, or signed with a key not in ``keys``.
    """
    name = _what(kind, job_id, index) + (f" ({what})" if what else "")
    child = job_id if index is None else f"{job_id}[{index}]"

    def refuse(why: str) -> IntegrityError:
        return IntegrityError(f"refused the {name}: {why}; it was not unpickled.", job_id=child, what=what or kind)

    data = bytes(data)
    if not data.startswith(_MAGIC):
        raise refuse(
            "it is not signed (written by someone without the cloudexec key, or by a cloudexec older than "
            "signing)"
        )
    start = len(_MAGIC) + 2
    if len(data) < start:
        raise refuse("it is truncated")
    length = int.from_bytes(data[len(_MAGIC) : start], "big")
    claim = data[start : start + length]
    body = start + length + _TAG
    if len(data) < body:
        raise refuse("it is truncated")
    expected = _claim(kind, job_id, index)
    if claim != expected:
        raise refuse(
            f"it claims to be the {claim.decode(errors='replace')!r} object, not {expected.decode()!r} "
            "(copied from another job or array child)"
        )
    tag = data[start + length : body]
    payload = data[body:]
    candidates = [keys] if isinstance(keys, (bytes, bytearray)) else list(keys)
    for key in candidates:
        if hmac.compare_digest(tag, _tag(bytes(key), claim, payload)):
            return payload
    raise refuse(
        "its signature does not match (tampered with, truncated, or signed with a key this process does not "
        f"have; to read jobs signed with an older key, give it after the new one in key= or {KEY_ENV})"
    )


def unverified_payload(data: bytes) -> bytes:
    """The payload of a sealed object WITHOUT verifying it: for status hints only, never to unpickle."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 2:
        raise IntegrityError("not a sealed cloudexec object")
    length = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 2], "big")
    return data[len(_MAGIC) + 2 + length + _TAG :]


# -- manifests -------------------------------------------------------------------


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(key: bytes, job_id: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with a ``signature`` field (hex HMAC of its canonical JSON), still plain JSON."""
    claim = _claim("manifest", job_id, None)
    return {**manifest, "signature": _tag(key, claim, _canonical(manifest)).hex()}


def verify_manifest(keys: Sequence[bytes], job_id: str, manifest: Mapping[str, Any]) -> None:
    """Check a manifest's ``signature`` against the job's keys.

    Raises:
        IntegrityError: no signature, or one that does not match.
    """
    claim = _claim("manifest", job_id, None)
    given = manifest.get("signature")
    if not isinstance(given, str):
        raise IntegrityError(
            f"refused the manifest of job {job_id}: it is not signed (not written by a cloudexec client that "
            "has your key)",
            job_id=job_id,
            what="job.json",
        )
    payload = _canonical(manifest)
    for key in keys:
        if hmac.compare_digest(given, _tag(key, claim, payload).hex()):
            return
    raise IntegrityError(
        f"refused the manifest of job {job_id}: its signature does not match (tampered with, or signed with "
        f"a key this process does not have; give older keys after the new one in key= or {KEY_ENV})",
        job_id=job_id,
        what="job.json",
    )
