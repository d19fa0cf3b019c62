"""The job storage is untrusted: what an attacker with write access to it can no longer do.

One mixin of tests written against "an executor", run by a small class per
provider (local processes, the AWS Batch emulator, the Azure Batch emulator),
like the contract suite. Every malicious object here is a pickle that would
create a marker file when unpickled: each test checks the marker does not
exist, i.e. nothing was unpickled, besides checking the error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobs
from cloudexec import _keys, _payload
from cloudexec._storage import Store
from cloudexec.errors import IntegrityError, JobNotFoundError, PayloadError
from contract import MakeExecutor, executor_factory

TIMEOUT_S = 90


class _Evil:
    """Unpickling this creates ``path``: proof that a payload was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def evil_pickle(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(_Evil(marker))


def resign(sealed: bytes, payload: bytes) -> bytes:
    """Keep a sealed object's claim and tag, swap its payload (what a bucket writer can do)."""
    original = _keys.unverified_payload(sealed)
    return sealed[: len(sealed) - len(original)] + payload


def tamper_before_submit(ex: Any, tamper: Any) -> None:
    """Make ``tamper(job_store)`` run after the call is stored and before the provider gets the job."""
    provider = ex._core.provider
    submit = provider.submit

    def tampering_submit(spec: Any) -> str:
        tamper(ex._core.store.child(spec.job_id))
        return str(submit(spec))

    provider.submit = tampering_submit


def stored_objects(store: Store, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """Every object below ``prefix``, recursively, with its bytes."""
    for name in store.list(prefix):
        key = f"{prefix}/{name}" if prefix else name
        try:
            data = store.read(key)
        except (FileNotFoundError, IsADirectoryError, PermissionError, OSError):
            yield from stored_objects(store, key)
            continue
        if data == b"" and store.list(key):
            yield from stored_objects(store, key)
            continue
        yield key, data


def log_text(fut: Any) -> str:
    return (fut.job_log or "") + (fut.job_stderr_log or "")


class SecurityContract:
    """Attacks through the storage, and secrets that must never reach it. See the module docstring."""

    # -- hooks of a provider's class ---------------------------------------------
    def secret_executor(self, make_executor: MakeExecutor, secret: str) -> tuple[Any, list[str]]:
        """An executor whose storage options or credentials hold secrets; returns it and them."""
        raise NotImplementedError

    def provider_records(self, ex: Any, futures: list[Any]) -> str:
        """Everything the provider stores about these jobs (job definitions, tasks), as text."""
        raise NotImplementedError

    # -- a tampered call or input never runs ------------------------------------------
    @pytest.mark.timeout(TIMEOUT_S)
    def test_tampered_call_is_refused_by_the_runner(self, make_executor: MakeExecutor, tmp_path: Path) -> None:
        marker = tmp_path / "pwned-by-call"
        ex = make_executor()

        def tamper(store: Store) -> None:
            store.write(_payload.CALL, resign(store.read(_payload.CALL), _payload.pack_raw("call", evil_pickle(marker))))

        tamper_before_submit(ex, tamper)
        fut = ex.submit(jobs.double, 2)
        exc = fut.exception(timeout=TIMEOUT_S - 10)
        assert isinstance(exc, IntegrityError), exc
        assert f"call of job {fut.job_id}" in str(exc) and "signature does not match" in str(exc)
        assert fut.job_exit_code == 3
        assert "refused the call" in log_text(fut)
        assert not marker.exists()

    @pytest.mark.timeout(TIMEOUT_S)
    def test_tampered_or_swapped_input_slice_is_refused(self, make_executor: MakeExecutor, tmp_path: Path) -> None:
        marker = tmp_path / "pwned-by-input"
        ex = make_executor()

        def tamper(store: Store) -> None:
            blob = store.read(_payload.INPUTS)
            slices = [_payload.read_input_slice(lambda s, e: blob[s:e], i) for i in range(3)]
            slices[1] = resign(slices[1], evil_pickle(marker))
            slices[2] = slices[0]  # a genuine slice, but child 0's
            store.write(_payload.INPUTS, _payload.pack_inputs(slices))

        tamper_before_submit(ex, tamper)
        arr = ex.submit_map(jobs.double, [1, 2, 3])
        assert arr.children[0].result(timeout=TIMEOUT_S - 10) == 2
        tampered, swapped = arr.children[1].exception(timeout=30), arr.children[2].exception(timeout=30)
        assert isinstance(tampered, IntegrityError) and f"input of job {arr.job_id}[1]" in str(tampered)
        assert isinstance(swapped, IntegrityError) and "copied from another job or array child" in str(swapped)
        assert arr.child_job_exit_codes[1:] == [3, 3]
        assert not marker.exists()

    # -- a tampered, foreign or module-carrying result is never unpickled -------------
    def _finished(self, make_executor: MakeExecutor) -> tuple[Any, Any, Store]:
        ex = make_executor()
        fut = ex.submit(jobs.double, 2)
        assert fut.result(timeout=TIMEOUT_S - 20) == 4
        return ex, fut, ex._core.store.child(fut.job_id)

    @pytest.mark.timeout(TIMEOUT_S)
    def test_tampered_or_unsigned_result_is_refused_on_attach(self, make_executor: MakeExecutor, tmp_path: Path) -> None:
        marker = tmp_path / "pwned-by-result"
        _, fut, store = self._finished(make_executor)
        store.write(_payload.RESULT, resign(store.read(_payload.RESULT), _payload.pack_raw("result", evil_pickle(marker))))
        with pytest.raises(IntegrityError, match=f"result of job {fut.job_id}.*signature does not match"):
            make_executor().attach(fut.job_id).result(timeout=30)
        store.write(_payload.RESULT, _payload.pack_raw("result", evil_pickle(marker)))
        with pytest.raises(IntegrityError, match="not signed"):
            make_executor().attach(fut.job_id).result(timeout=30)
        assert not marker.exists()

    @pytest.mark.timeout(TIMEOUT_S)
    def test_result_carrying_modules_is_refused_even_when_signed(
        self, make_executor: MakeExecutor, tmp_path: Path
    ) -> None:
        # What code running inside the job could write: signed with its own key.
        marker = tmp_path / "pwned-by-module"
        ex, fut, store = self._finished(make_executor)
        modules = {"cloudexec_evil_mod": {"source": f"open({str(marker)!r}, 'w')", "package": False, "file": "e.py"}}
        body = _payload._dill().dumps([("ok", 1)])
        envelope = _payload.pack_raw("result", body, ok=True, modules=modules)
        store.write(_payload.RESULT, _keys.seal(ex._core.keys.job_key(fut.job_id), "result", fut.job_id, None, envelope))
        with pytest.raises(IntegrityError, match="module source"):
            make_executor().attach(fut.job_id).result(timeout=30)
        with pytest.raises(ImportError):
            __import__("cloudexec_evil_mod")
        assert not marker.exists()

    @pytest.mark.timeout(TIMEOUT_S)
    def test_result_copied_from_another_job_or_child_is_refused(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        first, second = ex.submit(jobs.double, 1), ex.submit(jobs.double, 2)
        arr = ex.submit_map(jobs.double, [1, 2])
        assert (first.result(timeout=60), second.result(timeout=60), arr.result(timeout=60)) == (2, 4, [2, 4])
        root = ex._core.store
        root.write(f"{second.job_id}/{_payload.RESULT}", root.read(f"{first.job_id}/{_payload.RESULT}"))
        root.write(f"{arr.job_id}/{_payload.result_key(1)}", root.read(f"{arr.job_id}/{_payload.result_key(0)}"))
        again = make_executor()
        with pytest.raises(IntegrityError, match=f"copied from another job.*|{first.job_id}"):
            again.attach(second.job_id).result(timeout=30)
        with pytest.raises(IntegrityError, match="copied from another job or array child"):
            again.attach(f"{arr.job_id}[1]").result(timeout=30)
        assert again.attach(f"{arr.job_id}[0]").result(timeout=30) == 2

    # -- ids and manifests are untrusted data ------------------------------------------
    @pytest.mark.parametrize(
        "bad_id", ["..", "../x", "a/../../b", "a/b", "s3://other-bucket/job", "x\\y", "..[0]", ".", "a b", ""]
    )
    def test_path_traversal_ids_are_refused(self, make_executor: MakeExecutor, bad_id: str) -> None:
        with pytest.raises(ValueError, match="not a cloudexec job id"):
            make_executor().attach(bad_id)

    def test_attach_of_something_that_is_not_a_cloudexec_job_says_so(self, make_executor: MakeExecutor) -> None:
        ex = make_executor()
        root = ex._core.store
        root.write("not-a-job/job.json", b"<html>hello</html>")
        with pytest.raises(JobNotFoundError, match="not-a-job.*is not a cloudexec job"):
            ex.attach("not-a-job")
        fields = {"job_id": "planted", "kind": "single", "size": None, "chunksize": 1, "n_items": 1, "name": "x",
                  "function": "x.y", "provider_ref": "whatever"}
        root.write("planted/job.json", json.dumps(fields).encode())
        with pytest.raises(IntegrityError, match="manifest of job planted: it is not signed"):
            ex.attach("planted")
        root.write("elsewhere/job.json", json.dumps({**fields, "job_id": "../../etc"}).encode())
        with pytest.raises(IntegrityError, match="names job '../../etc'"):
            ex.attach("elsewhere")
        root.write("badtype/job.json", json.dumps({**fields, "job_id": "badtype", "size": "3"}).encode())
        with pytest.raises(JobNotFoundError, match="'size'"):
            ex.attach("badtype")

    # -- no secret reaches anything stored -----------------------------------------------
    @pytest.mark.timeout(3 * TIMEOUT_S)
    def test_no_secret_reaches_storage_provider_records_or_logs(
        self, make_executor: MakeExecutor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        env_secret = "env-secret-5f1d3c2a9b7e"
        monkeypatch.setenv("MY_APP_PASSWORD", env_secret)
        ex, secrets = self.secret_executor(make_executor, "opt-secret-8c4e2b6a0d1f")
        secrets = [env_secret, *secrets, ex._core.keys._keys[0].decode()]  # the master key never leaves either
        futures = [ex.submit(jobs.double, 4)]
        arr = ex.submit_map(jobs.double, [1, 2, 3])
        futures += [arr, *arr.children]
        assert futures[0].result(timeout=TIMEOUT_S) == 8 and arr.result(timeout=TIMEOUT_S) == [2, 4, 6]
        messages: list[str] = []

        def closure(x: int) -> str:
            return f"{x} {ex.io_url}"  # drags the executor along

        with pytest.raises(PayloadError, match="cannot be pickled") as refused:
            ex.submit(closure, 1)
        messages.append(str(refused.value))
        try:
            # A future passed as an argument: a small reference to the job, or refused.
            downstream = ex.submit(jobs.double, futures[0])
            futures.append(downstream)
            downstream.exception(timeout=TIMEOUT_S)
        except PayloadError as exc:
            messages.append(str(exc))
        try:
            messages.append(repr(_payload._dill().dumps(futures[0], recurse=True)))
        except Exception as exc:  # noqa: BLE001 - refused is fine; its message is searched too
            messages.append(str(exc))
        for fut in futures:
            messages.append(log_text(fut))
            if fut.done() and fut.exception(0) is not None:
                messages.append(str(fut.exception(0)))
        stored = list(stored_objects(ex._core.store))
        assert any(key.endswith(_payload.MANIFEST) for key, _ in stored)
        records = self.provider_records(ex, futures)
        assert records
        for secret in secrets:
            hits = [key for key, data in stored if secret.encode() in data]
            assert not hits, f"a secret is stored in {hits}"
            assert secret not in records, "a secret is in the provider's job records"
            assert not [m for m in messages if secret in m], "a secret is in a log or an error message"


def test_module_shipping_sends_only_what_the_call_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shipsec_config.py").write_text("PASSWORD = 'hunter2-in-config'\n")
    (tmp_path / "shipsec_helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "shipsec_app.py").write_text(
        "import shipsec_helpers\n"
        "def compute(x):\n    return shipsec_helpers.triple(x)\n"
        "def login():\n    import shipsec_config\n    return shipsec_config.PASSWORD\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import shipsec_app  # type: ignore[import-not-found]
    import shipsec_config  # type: ignore[import-not-found]  # noqa: F401 - loaded on the client, as in an app

    shipsec_app.shipsec_config = shipsec_config  # reachable from the function's module, unused by the call
    envelope = _payload.pack("call", (shipsec_app.compute, (1,), {}), ship=True)
    header, _ = _payload.read_header(envelope)
    assert sorted(header["modules"]) == ["shipsec_app", "shipsec_helpers"]
    assert b"hunter2-in-config" not in envelope


# -- one small class per provider ----------------------------------------------------------


class TestLocalSecurity(SecurityContract):
    """On local processes."""

    @pytest.fixture
    def make_executor(self, io_root: str) -> Iterator[Any]:
        from cloudexec import LocalBatchExecutor

        def build(**kwargs: Any) -> Any:
            kwargs.setdefault("max_workers", 2)
            return LocalBatchExecutor(io_root, **kwargs)

        yield from executor_factory(build, shutdown_limit_s=30)

    def secret_executor(self, make_executor: MakeExecutor, secret: str) -> tuple[Any, list[str]]:
        return make_executor(storage_options={"auto_mkdir": True, "secret_option": secret}), [secret]

    def provider_records(self, ex: Any, futures: list[Any]) -> str:
        provider = ex._core.provider
        texts = []
        for fut in futures:
            path = os.path.join(provider.state_dir, fut.job_id.split("[")[0], "local.json")
            if os.path.exists(path):
                texts.append(Path(path).read_text())
        return "\n".join(texts)


@pytest.fixture(scope="module")
def aws_emu() -> Iterator[Any]:
    from cloudexec.testing import aws_batch_emulator

    with aws_batch_emulator(timeout_scale=0.02, inherit_sys_path=False) as emulator:
        yield emulator


@pytest.mark.aws
class TestAWSSecurity(SecurityContract):
    """On the AWS Batch emulator."""

    @pytest.fixture
    def make_executor(self, aws_emu: Any) -> Iterator[Any]:
        def build(**kwargs: Any) -> Any:
            kwargs.setdefault("poll_interval_s", (0.05, 0.5))
            return aws_emu.executor(**kwargs)

        self.emu = aws_emu
        yield from executor_factory(build)

    def secret_executor(self, make_executor: MakeExecutor, secret: str) -> tuple[Any, list[str]]:
        return make_executor(), [self.emu.secret_access_key]

    def provider_records(self, ex: Any, futures: list[Any]) -> str:
        ids = sorted({f.provider_job_id for f in futures if f.provider_job_id})
        described = self.emu.client("batch").describe_jobs(jobs=ids)["jobs"]
        return json.dumps(described, default=str)


@pytest.fixture(scope="module")
def azure_emu() -> Iterator[Any]:
    pytest.importorskip("azure.batch")
    from cloudexec.testing.azure import azure_batch_emulator

    with azure_batch_emulator(slots=4, kill_grace_s=1.0) as emulator:
        yield emulator


def _as_text(obj: Any) -> str:
    for convert in (lambda o: o.as_dict(), dict, vars):
        try:
            return json.dumps(convert(obj), default=str)
        except Exception:  # noqa: BLE001 - try the next way to render an SDK model
            continue
    return repr(obj)


@pytest.mark.azure
class TestAzureSecurity(SecurityContract):
    """On the Azure Batch emulator."""

    @pytest.fixture
    def make_executor(self, azure_emu: Any) -> Iterator[Any]:
        def build(**kwargs: Any) -> Any:
            return azure_emu.executor(**{"poll_interval_s": (0.05, 0.5), "lro_polling_interval_s": 0.1, **kwargs})

        self.emu = azure_emu
        yield from executor_factory(build, shutdown_limit_s=30)

    def secret_executor(self, make_executor: MakeExecutor, secret: str) -> tuple[Any, list[str]]:
        return make_executor(), [self.emu.account_key]

    def provider_records(self, ex: Any, futures: list[Any]) -> str:
        texts = []
        with self.emu.batch_client() as client:
            for job_id in sorted({f.job_id.split("[")[0] for f in futures}):
                try:
                    texts.append(_as_text(client.get_job(job_id)))
                    texts.extend(_as_text(t) for t in client.list_tasks(job_id))
                except Exception as exc:  # noqa: BLE001 - a job the service does not know has no record
                    texts.append(str(exc))
        return "\n".join(texts)

