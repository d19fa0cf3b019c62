"""Fast unit tests of pure logic: settings, envelopes, inputs table, storage, statuses,
and the generic executor driven by an in-process fake provider on ``memory://``."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import cloudexec
import jobs
from cloudexec import BatchExecutor, JobInfo, JobSpec, Phase, Provider
from cloudexec import _payload
from cloudexec._provider import JobStatus
from cloudexec._storage import FsspecStore, LocalStore, open_store
from cloudexec.errors import JobFailedError, PayloadError, RemoteError, VersionMismatchError
from cloudexec.providers.local import LocalJobStatus
from cloudexec.settings import ALL_SETTINGS, SETTINGS, JobSettings, int_in, non_empty_str, parse_memory
from cloudexec.testing.fake import FakeBatchProvider, FakeBatchService, FakeJobStatus

# -- settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, mib",
    [
        (512, 512),
        ("512 MiB", 512),
        ("512MiB", 512),
        ("4 GiB", 4096),
        ("4g", 4096),
        ("1.5GB", 1431),  # 1.5e9 bytes, rounded up to whole MiB
        ("2000 MB", 1908),
        ("1 TiB", 1024 * 1024),
        ("1024 KiB", 1),
        ("300", 300),
        (".5 GiB", 512),
    ],
)
def test_parse_memory(value: Any, mib: int) -> None:
    assert parse_memory(value) == mib


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("lots", ValueError, "memory must be"),
        ("4 GQ", ValueError, "unknown unit 'GQ'"),
        (0, ValueError, "positive"),
        (-5, ValueError, "positive"),
        ("0 MiB", ValueError, "positive"),
        (1.5, TypeError, "memory must be"),
        (True, TypeError, "memory must be"),
    ],
)
def test_parse_memory_rejects(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_memory(value)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"vcpus": 0}, ValueError, "vcpus must be at least 1; got 0"),
        ({"vcpus": "2"}, TypeError, "vcpus must be an int"),
        ({"gpus": -1}, ValueError, "gpus must be at least 0"),
        ({"timeout": 0}, ValueError, "timeout must be a positive"),
        ({"timeout": "1h"}, TypeError, "timeout must be a number"),
        ({"retries": 10}, ValueError, "retries must be from 0 to 9"),
        ({"priority": 2}, ValueError, "priority must be from -1"),
        ({"job_name": ""}, TypeError, "job_name must be a non-empty string"),
        ({"tags": {"a": 1}}, TypeError, "tags must be a mapping of str to str"),
        ({"colour": "red"}, TypeError, "unknown job setting 'colour'"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        JobSettings.from_kwargs(**kwargs)


def test_settings_merge_and_dict() -> None:
    base = JobSettings.from_kwargs(vcpus=2, memory="1 GiB")
    over = JobSettings.from_kwargs(memory=256, retries=1)
    merged = base.merged(over)
    assert (merged.vcpus, merged.memory_mib, merged.retries) == (2, 256, 1)
    assert merged.as_dict() == {"vcpus": 2, "memory_mib": 256, "retries": 1}
    with pytest.raises(TypeError, match="valid settings are: gpus, job_name"):
        JobSettings.from_kwargs(frozenset({"gpus", "job_name"}), vcpus=1)


_OWN = {"share": non_empty_str, "weight": int_in(0, 99)}  # as a provider declares its own settings


def test_provider_declared_settings_are_validated_and_kept_apart() -> None:
    parsed = JobSettings.from_kwargs(frozenset({"vcpus"}), _OWN, vcpus=2, share="blue", weight=None)
    assert parsed.vcpus == 2 and parsed.extra == {"share": "blue"} and parsed.get("share") == "blue"
    assert parsed.get("weight") is None
    merged = parsed.merged(JobSettings.from_kwargs(frozenset(), _OWN, weight=7))
    assert merged.extra == {"share": "blue", "weight": 7}
    assert merged.as_dict() == {"vcpus": 2, "share": "blue", "weight": 7}  # manifests name them as users do
    with pytest.raises(ValueError, match="weight must be from 0 to 99; got 100"):
        JobSettings.from_kwargs(frozenset(), _OWN, weight=100)
    with pytest.raises(TypeError, match="share must be a non-empty string"):
        JobSettings.from_kwargs(frozenset(), _OWN, share="")
    with pytest.raises(TypeError, match="unknown job setting 'share'; valid settings are: vcpus$"):
        JobSettings.from_kwargs(frozenset({"vcpus"}), share="blue")  # another provider's setting


def test_core_settings_table_names_no_provider_only_setting() -> None:
    from cloudexec.providers.aws import AWSBatchProvider

    assert set(SETTINGS) == ALL_SETTINGS
    assert not set(AWSBatchProvider.provider_settings) & ALL_SETTINGS
    assert {"scheduling_priority", "share_identifier"} <= set(AWSBatchProvider.provider_settings)


# -- envelopes ----------------------------------------------------------------------


def test_envelope_roundtrip_records_versions() -> None:
    data = _payload.pack("call", (jobs.double, (2,), {}))
    header, offset = _payload.read_header(data)
    assert header["kind"] == "call" and header["python"] == _payload.PY_VERSION
    assert {"dill", "cloudexec"} <= set(header)
    _, (fn, args, kwargs) = _payload.unpack(data)
    assert fn(*args, **kwargs) == 4


def test_envelope_refuses_another_python_minor_version() -> None:
    data = _payload.pack_raw("call", b"whatever", python="3.2.1")
    with pytest.raises(VersionMismatchError, match=r"Python 3\.2\.1.*runs Python \d+\.\d+") as info:
        _payload.unpack(data, where="runner")
    assert _payload.PY_VERSION in str(info.value)


@pytest.mark.parametrize(
    "data, match",
    [(b"nope", "truncated"), (b"XXXX" + bytes(20), "bad magic"), (b"CLDX\x09\x00\x00\x00\x02{}", "newer")],
)
def test_envelope_rejects_garbage(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        _payload.unpack(data)


def test_inputs_table_reads_one_slice() -> None:
    chunks = [_payload.dumps_chunk([(i, i + 1)]) for i in range(50)]
    blob = _payload.pack_inputs(chunks)
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        reads.append((start, end))
        return blob[start:end]

    raw = _payload.read_input_slice(read, 37)
    assert _payload._dill().loads(raw) == [(37, 38)]
    assert sum(e - s for s, e in reads) < 64 + len(chunks[37])  # only its own bytes
    with pytest.raises(PayloadError, match="outside"):
        _payload.read_input_slice(read, 50)


@pytest.mark.parametrize(
    "chunk, plain",
    [
        ([(1, "a", None, True, 2.5, b"x")], True),
        ([([1, 2], {"k": (3, [4.0])})], True),
        ([(Path("/tmp"),)], False),  # a class by reference: dill, and its module named
        ([(jobs.double,)], False),
        ([([[[[[1]]]]],)], False),  # deeper than the plain check looks: dill
    ],
)
def test_map_chunks_of_plain_data_skip_dill(chunk: list[tuple[Any, ...]], plain: bool) -> None:
    pickled, modules = _payload.dumps_chunk_modules(chunk)
    assert _payload._dill().loads(pickled) == chunk
    if plain:
        assert pickled == pickle.dumps(chunk, protocol=pickle.DEFAULT_PROTOCOL) and modules == set()
    else:
        assert pickled == _payload.dumps_chunk(chunk)
        assert modules == _payload.pickled_module_names(pickled)


def test_outcomes_degrade_what_cannot_be_pickled() -> None:
    class Local(Exception):
        def __reduce__(self) -> Any:
            raise TypeError("no")

    exc = Local("inner")
    outcomes = [("ok", 1), ("err", exc, "x.Local", "inner", "tb"), ("ok", (x for x in []))]
    _, back = _payload.unpack(_payload.pack_outcomes(outcomes))
    assert back[0] == ("ok", 1)
    assert isinstance(back[1][1], RemoteError) and back[1][1].type_name == "x.Local"
    assert isinstance(back[2][1], PayloadError)


def test_client_only_modules_are_shipped_and_served(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shipme_unit.py").write_text("def f(x):\n    return x * 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import shipme_unit  # type: ignore[import-not-found]

    data = _payload.pack("call", (shipme_unit.f, (3,), {}), ship=True)
    header, _ = _payload.read_header(data)
    assert "shipme_unit" in header["modules"]
    assert "jobs" not in header["modules"]  # not referenced
    # Forget the module as if this were another machine, then unpack.
    monkeypatch.delitem(__import__("sys").modules, "shipme_unit")
    monkeypatch.setattr(__import__("sys"), "path", [p for p in __import__("sys").path if p != str(tmp_path)])
    _, (fn, args, _) = _payload.unpack(data, where="runner")
    assert fn(*args) == 21


# -- storage --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_store_basics(kind: str, tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path)) if kind == "local" else FsspecStore(f"memory://unit-{os.getpid()}-{time.time_ns()}")
    store.write("a/b.bin", b"0123456789")
    assert store.read("a/b.bin") == b"0123456789"
    assert store.read("a/b.bin", 2, 5) == b"234"
    assert store.exists("a/b.bin") and not store.exists("a/c.bin")
    assert store.list("a") == ["b.bin"] and store.list("nothing") == []
    assert store.child("a").read("b.bin") == b"0123456789"
    store.delete("a")
    assert not store.exists("a/b.bin")
    with pytest.raises(FileNotFoundError):
        store.read("a/b.bin")


def test_local_writes_are_atomic(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path))
    big = os.urandom(8 * 1024 * 1024)
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(len(store.read("r.bin")))
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(5):
        store.write("r.bin", big)
    stop.set()
    thread.join()
    assert set(seen) <= {len(big)}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_open_store_picks_the_cheap_path(tmp_path: Any) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store("file://" + str(tmp_path)), LocalStore)
    assert isinstance(open_store("memory://x"), FsspecStore)


# -- status tables --------------------------------------------------------------------


@pytest.mark.parametrize(
    "member, name, phase",
    [
        (LocalJobStatus.SUBMITTED, "Submitted", Phase.QUEUED),
        (LocalJobStatus.PENDING, "Pending", Phase.QUEUED),
        (LocalJobStatus.RUNNABLE, "Runnable", Phase.QUEUED),
        (LocalJobStatus.RUNNING, "Running", Phase.RUNNING),
        (LocalJobStatus.SUCCEEDED, "Succeeded", Phase.SUCCEEDED),
        (LocalJobStatus.FAILED, "Failed", Phase.FAILED),
    ],
)
def test_local_status_table(member: JobStatus, name: str, phase: Phase) -> None:
    assert member == name and str(member) == name and member.phase is phase
    assert type(member).parse(name) is member
    assert member.terminal == phase.terminal


# -- the generic executor on an in-process fake provider ----------------------------


class FakeProvider(FakeBatchProvider):
    """The published in-process fake, on a service of its own, counting the ids per describe."""

    def __init__(self) -> None:
        super().__init__(FakeBatchService())
        self.describe_calls: list[int] = []

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        self.describe_calls.append(len(refs))
        return super().describe(refs)


@pytest.mark.timeout(30)
def test_generic_executor_polls_in_bulk_on_memory_storage() -> None:
    provider = FakeProvider()
    with BatchExecutor(provider, f"memory://bulk-{time.time_ns()}", max_workers=50) as ex:
        futures = [ex.submit(jobs.double, i) for i in range(20)]
        assert [f.result(timeout=20) for f in futures] == [2 * i for i in range(20)]
        assert ex.submit_map(jobs.double, range(5)).result(timeout=20) == [0, 2, 4, 6, 8]
    # One describe call covers many jobs at once, never one call per future.
    assert max(provider.describe_calls) > 1
    assert len(provider.describe_calls) < 20 * 5


def test_a_provider_missing_a_verb_fails_at_construction() -> None:
    class Incomplete(Provider):
        name = "incomplete"
        status_enum = FakeJobStatus

        def submit(self, spec: JobSpec) -> str:
            return ""

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]


@pytest.mark.timeout(30)
def test_expired_job_still_returns_its_stored_result(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = FakeProvider()
    ex = BatchExecutor(provider, f"memory://expired-{time.time_ns()}")
    fut = ex.submit(jobs.double, 4)
    assert fut.result(timeout=20) == 8
    assert provider.service.expire_job(fut.provider_job_id or "")  # the service forgot the job (24 h expiry)
    fresh = BatchExecutor(provider, ex.io_url)
    again = fresh.attach(fut.job_id)
    assert again.result(timeout=20) == 8
    assert again.job_status is None and again.job_exit_code is None  # gone means None, never an error
    ex.shutdown()
    fresh.shutdown()


@pytest.mark.timeout(30)
def test_lost_job_without_result_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudexec._poller as poller

    monkeypatch.setattr(poller, "_MISSING_S", 0.0)
    provider = FakeProvider()
    provider.submit = lambda spec: "never-known"  # type: ignore[method-assign]
    with BatchExecutor(provider, f"memory://lost-{time.time_ns()}") as ex:
        fut = ex.submit(jobs.double, 1)
        with pytest.raises(JobFailedError, match="no longer knows this job"):
            fut.result(timeout=20)


@pytest.mark.timeout(30)
def test_polls_go_on_while_many_submissions_go_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudexec._poller as poller

    monkeypatch.setattr(poller, "_DISPATCH_SLICE_S", 0.2)
    provider = FakeProvider()
    events: list[str] = []
    submit = provider.submit
    describe = provider.describe

    def slow_submit(spec: JobSpec) -> str:
        time.sleep(0.05)  # a SubmitJob round trip
        events.append("submit")
        return submit(spec)

    def logged_describe(refs: Sequence[str]) -> dict[str, JobInfo]:
        events.append("describe")
        return describe(refs)

    provider.submit = slow_submit  # type: ignore[method-assign]
    provider.describe = logged_describe  # type: ignore[method-assign]
    with BatchExecutor(provider, f"memory://slices-{time.time_ns()}") as ex:
        futures = [ex.submit(jobs.double, i) for i in range(40)]
        assert [f.result(timeout=25) for f in futures] == [2 * i for i in range(40)]
    last_submit = len(events) - 1 - events[::-1].index("submit")
    assert "describe" in events[:last_submit], "no poll happened until every job was submitted"


# -- the core names no provider ---------------------------------------------------------

_CORE = Path(cloudexec.__file__).parent
# Service names and their environment variables: only providers/ and testing/ may know them.
_PROVIDER_WORDS = re.compile(r"AWS_BATCH|AZ_BATCH|(?i:(?<![a-z])(?:aws|azure))")


def _code_words(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every identifier and string in ``tree``'s code, docstrings left out (comments never reach the AST)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield line, node.value
        elif isinstance(node, ast.Name):
            yield line, node.id
        elif isinstance(node, ast.Attribute):
            yield line, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield line, node.name
        elif isinstance(node, ast.arg):
            yield line, node.arg
        elif isinstance(node, ast.alias):
            yield line, node.name + " " + (node.asname or "")
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None):
            yield line, str(getattr(node, "module"))


@pytest.mark.parametrize(
    "module", sorted([*(p.name for p in _CORE.glob("_*.py")), "runner.py", "settings.py"])
)
def test_core_modules_name_no_provider_in_code(module: str) -> None:
    tree = ast.parse((_CORE / module).read_text(), module)
    found = [f"{module}:{line}: {word!r}" for line, word in _code_words(tree) if _PROVIDER_WORDS.search(word)]
    assert not found, "provider knowledge outside providers/:\n" + "\n".join(found)


def test_the_provider_words_check_can_fail() -> None:
    sample = 'import os\nos.environ.get("AWS_BATCH_JOB_ARRAY_INDEX")\nfrom cloudexec.providers.azure import X\n'
    assert sorted(line for line, word in _code_words(ast.parse(sample)) if _PROVIDER_WORDS.search(word)) == [2, 3]
    assert not [w for _, w in _code_words(ast.parse('"""Docs may say AWS."""\nx = "draws laws"\n'))
                if _PROVIDER_WORDS.search(w)]


# -- the provider registry --------------------------------------------------------------


def test_public_provider_names_come_from_the_registry() -> None:
    from cloudexec import providers

    assert {"local", "aws", "azure"} <= set(providers.available())
    assert cloudexec.LocalBatchExecutor is providers.load("local").LocalBatchExecutor
    assert cloudexec.AWSJobStatus is providers.find_export("AWSJobStatus")
    assert {"AzureBatchExecutor", "AzureBatchFuture", "LocalJobStatus", "BatchExecutor"} <= set(dir(cloudexec))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchExecutor'"):
        cloudexec.NoSuchExecutor  # noqa: B018
    with pytest.raises(ValueError, match="no cloudexec provider is named 'nope'; registered: aws, azure"):
        providers.load("nope")


@pytest.mark.timeout(60)
def test_a_provider_registers_with_an_entry_point(tmp_path: Path) -> None:
    """An installed distribution's entry point adds a provider; its EXPORTS become cloudexec names."""
    dist = tmp_path / "cloudexec_google-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cloudexec-google\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cloudexec.providers]\ngoogle = cloudexec_google\n")
    (tmp_path / "cloudexec_google.py").write_text(
        "from cloudexec.testing.fake import FakeBatchExecutor as GoogleBatchExecutor\n"
        "EXPORTS = ('GoogleBatchExecutor',)\n"
    )
    code = (
        "import sys, cloudexec\n"
        "from cloudexec import providers\n"
        "assert 'cloudexec_google' not in sys.modules\n"
        "assert providers.available()['google'] == 'cloudexec_google', providers.available()\n"
        "assert 'cloudexec_google' not in sys.modules  # registered, not imported\n"
        "from cloudexec import GoogleBatchExecutor\n"
        "from cloudexec.testing.fake import FakeBatchExecutor\n"
        "assert GoogleBatchExecutor is FakeBatchExecutor and 'GoogleBatchExecutor' in dir(cloudexec)\n"
        "assert 'local' in providers.available()  # the built-ins stay\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(_CORE.parent)]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_readme_layout_matches_the_tree() -> None:
    root = _CORE.parent
    block = (root / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"(?<![\w>])[\w.]+\.py\b|\bpy\.typed\b", block))  # not test_<provider>.py
    package = {p.name for p in _CORE.rglob("*") if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts}
    assert package - named == set(), "modules the Layout section leaves out"
    others = {p.name for folder in ("tests", "benchmarks") for p in (root / folder).glob("*.py")}
    assert named - package - others == set(), "the Layout section names files that do not exist"
    for folder in re.findall(r"^(\w+)/", block, re.M):
        assert (root / folder).is_dir(), folder


def test_no_module_above_1200_lines() -> None:
    sizes = {str(p.relative_to(_CORE)): len(p.read_text().splitlines()) for p in _CORE.rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > 1200}, "split these by concern, as providers/azure.py was"


# -- the runner's command-line contract with providers -----------------------------------


@pytest.mark.parametrize(
    "name, environ, base, offset, index",
    [
        ("CLOUDEXEC_ARRAY_INDEX", {"CLOUDEXEC_ARRAY_INDEX": "4"}, 0, 0, 4),
        ("JOB_INDEX", {"JOB_INDEX": "2"}, 0, 10_000, 10_002),  # one part of an array split in parts
        ("TASK_ID", {"TASK_ID": "10000003"}, 10_000_001, 0, 2),  # ids that start elsewhere
        ("TASK_ID", {}, 10_000_001, 0, None),
        ("TASK_ID", {"TASK_ID": ""}, 0, 0, None),
    ],
)
def test_array_index_from_env(name: str, environ: dict[str, str], base: int, offset: int, index: int | None) -> None:
    from cloudexec.runner import array_index_from_env

    assert array_index_from_env(name, base=base, offset=offset, environ=environ) == index


@pytest.mark.parametrize(
    "environ, base, match",
    [({"I": "task-1"}, 0, "I='task-1' is not an array index"), ({"I": "5"}, 10, "below the first child's value 10")],
)
def test_array_index_from_env_rejects(environ: dict[str, str], base: int, match: str) -> None:
    from cloudexec.runner import array_index_from_env

    with pytest.raises(ValueError, match=match):
        array_index_from_env("I", base=base, environ=environ)


def test_a_capture_hook_that_cannot_start_costs_the_job_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from cloudexec import runner

    assert runner._call_hook("cloudexec_no_such_module:start", "output capture") is None
    assert "cannot run the output capture hook 'cloudexec_no_such_module:start'" in capsys.readouterr().err
    assert runner._call_hook("cloudexec.settings:JobSettings", "x") == JobSettings()  # module:callable is called


class LaggingProvider(FakeProvider):
    """Reports an ended job as still running for ``lag_s`` (AWS reports a job ended seconds after its result
    exists), and records every cancel."""

    def __init__(self, lag_s: float) -> None:
        super().__init__()
        self.lag_s = lag_s
        self.ended_at: dict[str, float] = {}
        self.cancels: list[tuple[str, int | None]] = []

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        import dataclasses

        infos = super().describe(refs)
        now = time.monotonic()
        for ref, info in infos.items():
            if info.status is not None and info.status.terminal:
                if now - self.ended_at.setdefault(ref, now) < self.lag_s:
                    infos[ref] = dataclasses.replace(info, status=FakeJobStatus.RUNNING, exit_code=None)
        return infos

    def cancel(self, ref: str, reason: str, *, index: int | None = None) -> None:
        self.cancels.append((ref, index))
        super().cancel(ref, reason, index=index)


# -- map: only an abandoned iterator cancels -------------------------------------------


@pytest.mark.timeout(30)
def test_fully_consumed_map_cancels_nothing_while_the_status_lags() -> None:
    provider = LaggingProvider(lag_s=1.5)
    with BatchExecutor(provider, f"memory://lag-{time.time_ns()}") as ex:
        for _ in range(3):
            assert list(ex.map(jobs.double, range(4))) == [0, 2, 4, 6]
    assert provider.cancels == []


@pytest.mark.timeout(30)
def test_abandoned_map_cancels_what_remains() -> None:
    provider = LaggingProvider(lag_s=0.0)
    with BatchExecutor(provider, f"memory://abandon-{time.time_ns()}") as ex:
        results = ex.map(jobs.nap, [0.0, 20.0])
        next(results)
        results.close()  # the caller left the loop early
        assert len(provider.cancels) == 1


# -- cancel() never raises ---------------------------------------------------------------


def _queued_future(ex: BatchExecutor) -> Any:
    """A future of a job that is never dispatched (no manager involved)."""
    from cloudexec._base import BatchFuture, _JobRecord

    record = _JobRecord(job_id="race-1", store=ex._core.store, name="race", settings=ex.settings, size=None)
    return BatchFuture(ex._core, record)


def test_cancel_does_not_raise_when_the_manager_marks_the_future_running_meanwhile() -> None:
    from concurrent.futures import Future

    with BatchExecutor(FakeProvider(), f"memory://race-{time.time_ns()}") as ex:
        fut = _queued_future(ex)
        real = fut.set_running_or_notify_cancel

        def manager_step() -> None:
            try:
                Future.set_running_or_notify_cancel(fut)
            except RuntimeError:
                pass  # the manager's side may lose; cancel() must not

        def racing() -> bool:
            # The manager thread acts right in the middle of cancel().
            other = threading.Thread(target=manager_step)
            other.start()
            other.join(0.3)
            return bool(real())

        fut.set_running_or_notify_cancel = racing
        assert fut.cancel() is True
        assert fut.cancelled()


def _run_interleaved(targets: list[Any]) -> None:
    """Run each target in its own thread, switching threads as often as CPython allows."""
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old)


def test_cancel_and_mark_running_race_many_times() -> None:
    with BatchExecutor(FakeProvider(), f"memory://races-{time.time_ns()}") as ex:
        futures = [_queued_future(ex) for _ in range(3000)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def run(step: Any) -> None:
            barrier.wait()
            for fut in futures:
                try:
                    step(fut)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

        _run_interleaved([lambda: run(lambda f: f._mark_running()), lambda: run(lambda f: f.cancel())])
        assert errors == []
        assert all(f.cancelled() or f.running() for f in futures)


# -- constructor arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"poll_interval_s": 5}, TypeError, r"poll_interval_s must be a pair .*got 5"),
        ({"poll_interval_s": (1, 2, 3)}, TypeError, r"got \(1, 2, 3\)"),
        ({"poll_interval_s": (0, 0)}, ValueError, r"above 0 and at most 3600 seconds; got \(0, 0\)"),
        ({"poll_interval_s": (-1, 5)}, ValueError, r"got \(-1, 5\)"),
        ({"poll_interval_s": (5, 1)}, ValueError, r"first pause \(5 s\) must not exceed the longest \(1 s\)"),
        ({"poll_interval_s": (1, float("nan"))}, ValueError, r"at most 3600 seconds; got \(1, nan\)"),
        ({"poll_interval_s": ("1", 2)}, TypeError, r"number of seconds; got \('1', 2\)"),
        ({"max_workers": 0}, ValueError, r"max_workers must be greater than 0 .*got 0"),
        ({"max_workers": 2.5}, TypeError, r"max_workers must be an int .*got 2.5"),
        ({"give_up_s": 0}, ValueError, r"give_up_s must be above 0 .*got 0"),
        ({"give_up_s": float("inf")}, ValueError, r"give_up_s .*got inf"),
        ({"give_up_s": "1m"}, TypeError, r"give_up_s must be a number of seconds; got '1m'"),
    ],
)
def test_constructor_arguments_are_validated_showing_the_value(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        BatchExecutor(FakeProvider(), f"memory://args-{time.time_ns()}", **kwargs)


# -- nothing waits forever -------------------------------------------------------------------


class FailingProvider(FakeProvider):
    """``describe`` raises for its next ``fail_next`` calls (-1: for good)."""

    def __init__(self, service: FakeBatchService | None = None) -> None:
        super().__init__()
        if service is not None:
            self.service = service
        self.fail_next = 0
        self.failed = 0

    def describe(self, refs: Sequence[str]) -> dict[str, JobInfo]:
        if self.fail_next:
            self.fail_next -= 1 if self.fail_next > 0 else 0
            self.failed += 1
            raise ConnectionError("connection reset by peer")
        return super().describe(refs)


def _no_result_service() -> FakeBatchService:
    """A service whose jobs end (exit 3) without writing any result."""
    return FakeBatchService(runner=lambda job_url, index, environ: 3)


@pytest.mark.timeout(30)
def test_describe_failing_for_good_ends_the_futures_with_a_clear_error() -> None:
    from cloudexec.errors import JobUnreachableError

    provider = FailingProvider(_no_result_service())
    provider.fail_next = -1
    ex = BatchExecutor(provider, f"memory://unreachable-{time.time_ns()}", give_up_s=0.3)
    fut = ex.submit(jobs.double, 1)
    arr = ex.submit_map(jobs.double, [1, 2])
    with pytest.raises(JobUnreachableError) as info:
        fut.result(timeout=20)
    err = info.value
    assert err.job_id == fut.job_id and "ConnectionError: connection reset by peer" in str(err)
    assert f"executor.attach({fut.job_id!r})" in str(err) and err.failures >= 3
    with pytest.raises(JobUnreachableError, match=arr.job_id):
        arr.result(timeout=20)
    assert all(isinstance(c.exception(0), JobUnreachableError) for c in arr.children)
    started = time.monotonic()
    ex.shutdown(wait=True)
    print(f"shutdown took {time.monotonic() - started:.2f} s; {provider.failed} failed describes")


@pytest.mark.timeout(30)
def test_a_few_failed_describes_in_a_row_fail_nothing() -> None:
    provider = FailingProvider(_no_result_service())
    with BatchExecutor(provider, f"memory://transient-{time.time_ns()}", give_up_s=0.2,
                       poll_interval_s=(0.01, 0.02)) as ex:
        provider.fail_next = 2  # fewer than the failures needed to give up, whatever the time
        fut = ex.submit(jobs.double, 1)
        with pytest.raises(JobFailedError, match="exit code: 3"):  # the job's own outcome, not a give-up
            fut.result(timeout=20)
    assert provider.failed == 2


@pytest.mark.timeout(30)
def test_result_read_failing_for_good_ends_the_future(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudexec.errors import JobUnreachableError

    real_read = FsspecStore.read

    def denied(self: FsspecStore, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if key.endswith(_payload.RESULT) or key.startswith(_payload.RESULTS_DIR):
            raise PermissionError("403 Forbidden: the credentials expired")
        return real_read(self, key, start, end)

    monkeypatch.setattr(FsspecStore, "read", denied)
    with BatchExecutor(FakeProvider(), f"memory://denied-{time.time_ns()}", give_up_s=0.3) as ex:
        fut = ex.submit(jobs.double, 1)
        with pytest.raises(JobUnreachableError, match="PermissionError: 403 Forbidden") as info:
            fut.result(timeout=20)
        assert info.value.job_id == fut.job_id


def _write_result_then(restore_after_s: float | None) -> Any:
    """A runner that writes the real result, leaves a truncated copy in its place, and puts the whole one
    back ``restore_after_s`` later (``None``: never): a write that is not atomic, seen half-way."""
    from cloudexec import runner

    def run(job_url: str, index: int | None, environ: dict[str, str]) -> int:
        code = runner.run_job(job_url, index=index, environ=environ)
        store = open_store(job_url)
        whole = store.read(_payload.RESULT)
        store.write(_payload.RESULT, whole[: len(whole) // 2])
        if restore_after_s is not None:
            threading.Timer(restore_after_s, store.write, (_payload.RESULT, whole)).start()
        return code

    return run


class _EnvRunnerService(FakeBatchService):
    """Passes each job's environment (its key) to ``runner``."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner=runner)


@pytest.mark.timeout(30)
def test_a_half_written_result_is_read_again_until_whole() -> None:
    service = _EnvRunnerService(_write_result_then(0.5))
    with BatchExecutor(FakeProvider(), f"memory://half-{time.time_ns()}") as ex:
        ex._core.provider.service = service  # type: ignore[attr-defined]
        assert ex.submit(jobs.double, 21).result(timeout=20) == 42


@pytest.mark.timeout(30)
def test_a_result_that_stays_truncated_is_refused_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudexec._poller as poller
    from cloudexec.errors import IntegrityError

    monkeypatch.setattr(poller, "_SETTLE_S", 0.3)
    service = _EnvRunnerService(_write_result_then(None))  # the rest never comes
    with BatchExecutor(FakeProvider(), f"memory://trunc-{time.time_ns()}") as ex:
        ex._core.provider.service = service  # type: ignore[attr-defined]
        fut = ex.submit(jobs.double, 21)
        with pytest.raises(IntegrityError, match="truncated|signature does not match"):
            fut.result(timeout=20)


# -- attach of a tracked job ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_attach_of_a_job_the_executor_follows_returns_its_future() -> None:
    with BatchExecutor(FakeProvider(), f"memory://same-{time.time_ns()}", max_workers=1) as ex:
        running = ex.submit(jobs.nap, 0.5)
        queued = ex.submit(jobs.double, 2)  # not handed to the provider yet: no manifest
        arr = ex.submit_map(jobs.double, [1, 2])
        assert ex.attach(running.job_id) is running
        assert ex.attach(queued.job_id) is queued
        assert ex.attach(arr.job_id) is arr and ex.attach(f"{arr.job_id}[1]") is arr.children[1]
        assert queued.result(timeout=20) == 4 and arr.result(timeout=20) == [2, 4]
        assert ex.attach(running.provider_job_id or "") is running


@pytest.mark.timeout(30)
def test_two_threads_attaching_at_once_get_one_future() -> None:
    provider = FakeProvider()
    io_url = f"memory://twice-{time.time_ns()}"
    with BatchExecutor(provider, io_url) as ex:
        job_id = ex.submit(jobs.nap, 0.3).job_id
        deadline = time.monotonic() + 10
        while not ex._core.store.exists(f"{job_id}/{_payload.MANIFEST}") and time.monotonic() < deadline:
            time.sleep(0.01)
        with BatchExecutor(provider, io_url) as other:
            barrier = threading.Barrier(8)
            got: list[Any] = []

            def attach() -> None:
                barrier.wait()
                got.append(other.attach(job_id))

            _run_interleaved([attach] * 8)
            assert len(got) == 8 and all(f is got[0] for f in got)
            assert got[0].result(timeout=20)[1] > 0


# -- attach finds every job that may run --------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_job_is_attachable_before_the_provider_can_start_it() -> None:
    io_url = f"memory://early-{time.time_ns()}"
    provider = FakeProvider()
    attached: list[Any] = []
    with BatchExecutor(provider, io_url) as other:
        submit = provider.submit

        def submit_and_attach(spec: JobSpec) -> str:
            # The job may start as soon as the provider has it: another client attaches right then.
            attached.append(other.attach(spec.job_id))
            return submit(spec)

        provider.submit = submit_and_attach  # type: ignore[method-assign]
        with BatchExecutor(provider, io_url) as ex:
            fut = ex.submit(jobs.double, 21)
            assert fut.result(timeout=20) == 42
        assert len(attached) == 1 and attached[0].result(timeout=20) == 42


@pytest.mark.timeout(30)
def test_a_failed_manifest_update_after_submission_does_not_fail_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = FakeProvider()
    real_write = FsspecStore.write
    submitted: list[str] = []
    submit = provider.submit

    def recording_submit(spec: JobSpec) -> str:
        submitted.append(spec.job_id)
        return submit(spec)

    def flaky_write(self: FsspecStore, key: str, data: bytes) -> None:
        if key == _payload.MANIFEST and submitted and len(submitted) < 3:
            submitted.append("write failed")
            raise ConnectionError("storage write timed out")
        real_write(self, key, data)

    provider.submit = recording_submit  # type: ignore[method-assign]
    monkeypatch.setattr(FsspecStore, "write", flaky_write)
    with BatchExecutor(provider, f"memory://mfail-{time.time_ns()}") as ex:
        fut = ex.submit(jobs.double, 21)
        assert fut.result(timeout=20) == 42  # it ran: never "nothing submitted"
        assert "write failed" in submitted
        with BatchExecutor(provider, ex.io_url) as other:
            assert other.attach(fut.job_id).result(timeout=20) == 42


# -- a dead manager breaks the executor --------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_dead_manager_thread_breaks_pending_futures_and_later_submits() -> None:
    import sys
    from concurrent.futures import BrokenExecutor

    ex = BatchExecutor(FakeProvider(), f"memory://broken-{time.time_ns()}", max_workers=1)
    blocker = ex.submit(jobs.nap, 0.5)
    first = ex.submit(jobs.double, 1)  # queued behind the blocker: its callback runs in the manager thread
    first.add_done_callback(lambda f: sys.exit(3))
    pending = ex.submit(jobs.double, 2)
    assert blocker.result(timeout=20)[1] > 0
    with pytest.raises(BrokenExecutor, match=f"job {pending.job_id}: the cloudexec manager thread died"):
        pending.result(timeout=20)
    with pytest.raises(BrokenExecutor, match="SystemExit"):
        ex.submit(jobs.double, 3)
    with pytest.raises(BrokenExecutor):
        ex.submit_map(jobs.double, [1])
    started = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - started < 5


# -- jobs are handed over before the interpreter exits; a dropped executor stops its thread -------


@pytest.mark.timeout(60)
def test_jobs_submitted_by_a_script_that_exits_without_shutdown_reach_the_provider(tmp_path: Any) -> None:
    from contract import run_script

    io_url = "file://" + str(tmp_path / "io")
    log_path = tmp_path / "submitted.txt"
    out = run_script(
        f"""
        import operator, time
        from cloudexec.testing.fake import FakeBatchExecutor, FakeBatchProvider

        def slow_submit(self, spec, _real=FakeBatchProvider.submit):
            time.sleep(0.3)  # a SubmitJob round trip
            ref = _real(self, spec)
            with open({str(log_path)!r}, "a") as fh:
                fh.write(spec.job_id + "\\n")
            return ref

        FakeBatchProvider.submit = slow_submit
        ex = FakeBatchExecutor({io_url!r}, max_workers=10)
        for i in range(3):
            print(ex.submit(operator.neg, i).job_id)
        # no shutdown(): the script just ends
        """,
        env={"PYTHONPATH": os.getcwd(), "CLOUDEXEC_KEY": "k" * 40},
    )
    job_ids = out.split()
    assert len(job_ids) == 3
    assert log_path.read_text().split() == job_ids
    with BatchExecutor(FakeProvider(), io_url, key="k" * 40) as ex:
        for job_id in job_ids:
            again = ex.attach(job_id)  # its jobs died with that process's in-process service: just found
            assert again.job_id == job_id
            again.cancel()


@pytest.mark.timeout(30)
def test_an_executor_dropped_without_shutdown_stops_its_thread() -> None:
    import gc

    ex = BatchExecutor(FakeProvider(), f"memory://dropped-{time.time_ns()}")
    view = ex.with_settings(retries=1)
    fut = view.submit(jobs.double, 2)
    assert fut.result(timeout=20) == 4
    thread = ex._core.manager.thread
    assert thread is not None and thread.is_alive()
    del ex
    gc.collect()
    time.sleep(0.3)
    assert thread.is_alive()  # the view still uses it
    del view
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
    assert fut.result() == 4


# -- the first successful result is final and delivered at once -------------------------------------


@pytest.mark.timeout(30)
def test_a_second_attempt_does_not_replace_a_successful_result(tmp_path: Any) -> None:
    from cloudexec import runner

    def twice(job_url: str, index: int | None, environ: dict[str, str]) -> int:
        # The service ran the job twice (a retry after a lost heartbeat, a duplicate delivery).
        runner.run_job(job_url, index=index, environ=environ)
        return runner.run_job(job_url, index=index, environ=environ)

    service = _EnvRunnerService(twice)
    with BatchExecutor(FakeProvider(), f"memory://twice-{time.time_ns()}") as ex:
        ex._core.provider.service = service  # type: ignore[attr-defined]
        fut = ex.submit(jobs.flaky, str(tmp_path / "count"), 0)  # returns its attempt number
        assert fut.result(timeout=20) == 1
        assert (tmp_path / "count").read_text() == "2"  # the second attempt did run
        again = BatchExecutor(FakeProvider(), ex.io_url)
        assert again.attach(fut.job_id).result(timeout=20) == 1
        again.shutdown()


@pytest.mark.timeout(30)
def test_a_child_whose_retry_succeeded_is_delivered_before_the_array_ends(tmp_path: Any) -> None:
    with BatchExecutor(FakeProvider(), f"memory://retry-{time.time_ns()}", retries=1) as ex:
        arr = ex.submit_map(jobs.flaky_after, [str(tmp_path / "a"), str(tmp_path / "b")], [1, 0], [0.0, 6.0])
        assert arr.children[0].result(timeout=4) == 2  # its second attempt succeeded
        assert not arr.done()  # child 1 still naps
        assert arr.result(timeout=20) == [2, 1]


def test_the_storage_setup_hook_reaches_run_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudexec import runner

    seen: list[tuple[str, Any]] = []
    monkeypatch.setattr(runner, "run_job", lambda url, **kw: seen.append((url, kw)) or 0)
    assert runner.main(["file:///tmp/x/jobs/j-1", "--storage-setup", "m:f"]) == 0
    assert seen == [("file:///tmp/x/jobs/j-1", {"index": None, "storage_setup": "m:f"})]


def test_run_job_calls_the_storage_setup_hook_with_the_opened_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job whose storage cannot be set up still runs (the hook's failure goes to stderr)."""
    from cloudexec import runner

    from cloudexec._keys import JOB_KEY_ENV

    code = runner.run_job(
        tmp_path.as_uri() + "/jobs/j-1", environ={JOB_KEY_ENV: "ab" * 32}, storage_setup="cloudexec_no_such_module:f"
    )
    err = capsys.readouterr().err
    assert "cannot run the storage setup hook 'cloudexec_no_such_module:f'" in err
    assert code != 0  # no call was stored there: the runner went on and reported that


def test_orphaned_workers_share_the_children_nobody_started(tmp_path: Path) -> None:
    """A local array's workers that outlive their client split the unstarted children, once each."""
    from cloudexec.runner import _Orphans

    a = _Orphans(str(tmp_path / "claims"), 5, str(tmp_path / "logs"))
    b = _Orphans(str(tmp_path / "claims"), 5, str(tmp_path / "logs"))
    assert a.claim_ordered(0) and a.claim_ordered(2)  # the client had sent 0 and 2
    assert [b.claim_next(), a.claim_next()] == [1, 3]
    assert not a.claim_ordered(3)  # still in a pipe, but an orphaned worker has it
    (tmp_path / "claims" / "ordered-4").touch()  # child 4 was cancelled
    assert b.claim_next() is None
    assert a.log_paths(1) == (str(tmp_path / "logs" / "1.out"), str(tmp_path / "logs" / "1.err"))
    c = _Orphans(str(tmp_path / "other"), 3, str(tmp_path / "logs"))
    (tmp_path / "other" / "closed").touch()  # the whole array was cancelled
    assert c.claim_next() is None


# -- futures as arguments: placeholders --------------------------------------------------


def test_replace_in_rebuilds_only_containers_that_changed() -> None:
    from collections import namedtuple

    from cloudexec._payload import replace_in

    Pair = namedtuple("Pair", "a b")
    untouched = [1, "x", (2.0, None), {"k": [3]}]
    assert replace_in(untouched, lambda x: x) is untouched
    marker = object()
    value = [1, (marker, Pair(marker, 2)), {"k": {marker}}, frozenset({4})]
    swapped = replace_in(value, lambda x: "V" if x is marker else x)
    assert swapped == [1, ("V", Pair("V", 2)), {"k": {"V"}}, frozenset({4})]
    assert type(swapped[1][1]) is Pair and swapped[3] is value[3]


def test_upstream_placeholder_reads_single_child_chunked_and_whole_results() -> None:
    import dill

    from cloudexec._payload import Upstream

    stored = {("j", None): [("ok", 5)], ("a", 0): [("ok", 1), ("ok", 2)], ("a", 1): [("ok", 3)]}

    def read(job_id: str, index: int | None) -> list[Any]:
        return stored[(job_id, index)]

    assert Upstream("j").value(read) == 5
    assert Upstream("a", index=0, chunked=True).value(read) == [1, 2]
    assert Upstream("a", size=2, chunked=True).value(read) == [1, 2, 3]
    copy = dill.loads(dill.dumps(Upstream("a", index=1)))
    assert (copy.job_id, copy.index, copy.size, copy.chunked) == ("a", 1, None, False)
    assert "a[1]" in repr(copy)


@pytest.mark.timeout(30)
def test_a_single_jobs_successful_result_is_delivered_while_the_status_still_says_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudexec import _futures

    monkeypatch.setattr(_futures, "_ENDED_WAIT_S", 0.5)
    provider = LaggingProvider(lag_s=3600.0)  # the service would report the end an hour late
    with BatchExecutor(provider, f"memory://early-{time.time_ns()}", poll_interval_s=(0.02, 0.1)) as ex:
        fut = ex.submit(jobs.double, 21)
        assert fut.result(timeout=20) == 42
        # The result did not wait for the end; a property waits for it, boundedly.
        assert fut.job_status is not None and not fut.job_status.terminal
        failing = ex.submit(jobs.fail_on, 3)
        time.sleep(1.0)
        assert not failing.done()  # a stored error waits for the job's end: a retry may still succeed
        failing.cancel()


def test_the_core_modules_import_each_other_without_a_cycle() -> None:
    """The executor, its manager thread and the futures form layers: no module imports
    one that imports it back, not even lazily inside a function (type-only imports aside)."""
    import ast
    import pathlib

    root = pathlib.Path(cloudexec.__file__).parent
    core = {p.stem for p in root.glob("_*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {name: set() for name in core}

    def imported(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "cloudexec":
                return [alias.name for alias in node.names]
            return [node.module.removeprefix("cloudexec.")]
        if isinstance(node, ast.Import):
            return [alias.name.removeprefix("cloudexec.") for alias in node.names]
        return []

    for name in core:
        tree = ast.parse((root / f"{name}.py").read_text())
        type_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if id(node) not in type_only:
                edges[name].update(m for m in imported(node) if m in core and m != name)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return [*path, nxt]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(core)) if c]
    assert not cycles, f"import cycles among cloudexec's core modules: {cycles}"



@pytest.mark.timeout(30)
def test_properties_read_right_after_an_early_result_wait_for_the_jobs_end() -> None:
    provider = LaggingProvider(lag_s=4.0)  # longer than the 2 s the result waits for the end
    with BatchExecutor(provider, f"memory://early-end-{time.time_ns()}", poll_interval_s=(0.02, 0.1)) as ex:
        fut = ex.submit(jobs.double, 21)
        assert fut.result(timeout=20) == 42
        assert fut.job_status is not None and fut.job_status.terminal  # final, as for a job that ended first
        assert fut.job_exit_code == 0
