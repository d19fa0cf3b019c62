"""Unit tests of the key handling and sealed envelopes (pure logic, no provider)."""

from __future__ import annotations

import os
import pickle
import stat

import pytest

from cloudexec import _keys
from cloudexec._payload import check_job_id
from cloudexec.errors import IntegrityError

MASTER = b"m" * 32
OTHER = b"o" * 32


def test_job_keys_differ_per_job_and_per_master() -> None:
    assert _keys.job_key(MASTER, "a") != _keys.job_key(MASTER, "b")
    assert _keys.job_key(MASTER, "a") != _keys.job_key(OTHER, "a")
    assert len(_keys.job_key(MASTER, "a")) == 32


def test_seal_round_trip() -> None:
    key = _keys.job_key(MASTER, "job-1")
    sealed = _keys.seal(key, "result", "job-1", 3, b"payload")
    assert _keys.open_sealed(key, "result", "job-1", 3, sealed) == b"payload"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "does not match"),
        (lambda d: d[:-3], "does not match"),
        (lambda d: d[:12], "truncated"),
        (lambda d: b"\x80\x04N.", "not signed"),
        (lambda d: b"", "not signed"),
    ],
)
def test_tampered_truncated_or_unsigned_objects_are_refused(change: object, why: str) -> None:
    key = _keys.job_key(MASTER, "job-1")
    sealed = _keys.seal(key, "call", "job-1", None, b"payload-bytes")
    with pytest.raises(IntegrityError, match=why) as info:
        _keys.open_sealed(key, "call", "job-1", None, change(sealed))  # type: ignore[operator]
    assert "call of job job-1" in str(info.value) and info.value.job_id == "job-1"


@pytest.mark.parametrize(
    ("kind", "job_id", "index"),
    [("result", "job-2", 3), ("result", "job-1", 4), ("call", "job-1", 3), ("result", "job-1", None)],
)
def test_object_copied_from_another_job_child_or_kind_is_refused(kind: str, job_id: str, index: int | None) -> None:
    key = _keys.job_key(MASTER, "job-1")
    sealed = _keys.seal(key, "result", "job-1", 3, b"x")
    with pytest.raises(IntegrityError, match="copied from another job"):
        _keys.open_sealed(_keys.job_key(MASTER, job_id), kind, job_id, index, sealed)


def test_forged_claim_with_own_key_does_not_verify() -> None:
    # Code in job-2 knows job-2's key only: it cannot produce job-1's objects.
    forged = _keys.seal(_keys.job_key(MASTER, "job-2"), "result", "job-1", None, b"x")
    with pytest.raises(IntegrityError, match="does not match"):
        _keys.open_sealed(_keys.job_key(MASTER, "job-1"), "result", "job-1", None, forged)


def test_rotation_signs_with_newest_and_verifies_with_any() -> None:
    old = _keys.load_keys("old-key-0123456789abcdef")
    sealed = _keys.seal(old.job_key("j"), "result", "j", None, b"x")
    rotated = _keys.load_keys(["new-key-0123456789abcdef", "old-key-0123456789abcdef"])
    assert rotated.job_key("j") != old.job_key("j")
    assert _keys.open_sealed(rotated.job_keys("j"), "result", "j", None, sealed) == b"x"
    with pytest.raises(IntegrityError):
        _keys.open_sealed(_keys.load_keys("new-key-0123456789abcdef").job_keys("j"), "result", "j", None, sealed)


def test_manifest_signature() -> None:
    key = _keys.job_key(MASTER, "j")
    signed = _keys.sign_manifest(key, "j", {"job_id": "j", "size": 3})
    _keys.verify_manifest([key], "j", signed)
    with pytest.raises(IntegrityError, match="does not match"):
        _keys.verify_manifest([key], "j", {**signed, "size": 4})
    with pytest.raises(IntegrityError, match="not signed"):
        _keys.verify_manifest([key], "j", {"job_id": "j", "size": 3})


def test_key_sources_parameter_then_env_then_file(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv(_keys.KEY_ENV, "env-key-0123456789abcdef,older-key-0123456789abc")
    assert _keys.load_keys("param-key-0123456789abcdef").source == "key="
    ring = _keys.load_keys()
    assert ring.source == _keys.KEY_ENV and len(ring.job_keys("j")) == 2
    monkeypatch.delenv(_keys.KEY_ENV)
    ring = _keys.load_keys()
    path = _keys.key_file_path()
    assert ring.source == path == os.path.join(str(tmp_path), "cloudexec", "key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _keys.load_keys().job_key("j") == ring.job_key("j")  # the same key on the next read
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        _keys.load_keys()


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        _keys.load_keys("short")


def test_keyring_is_never_pickled_or_shown() -> None:
    ring = _keys.load_keys("param-key-0123456789abcdef")
    assert "param-key" not in repr(ring)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ring)


def test_job_environment_round_trip() -> None:
    ring = _keys.load_keys("param-key-0123456789abcdef")
    env = _keys.job_environment(ring, "down", upstream=["up-1", "up-2"])
    keys = _keys.job_keys_from_env(env)
    assert keys[""] == ring.job_key("down") and keys["up-1"] == ring.job_key("up-1")
    with pytest.raises(IntegrityError, match="CLOUDEXEC_JOB_KEY is missing"):
        _keys.job_keys_from_env({})


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "a\\b", "s3://b/k", "", ".hidden", "a..b", "x" * 129, 7])
def test_job_ids_that_could_escape_a_prefix_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="not a cloudexec job id"):
        check_job_id(bad)


def test_generated_ids_pass() -> None:
    from cloudexec._base import new_job_id

    assert check_job_id(new_job_id("my func!"))
