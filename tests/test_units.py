"""Fast unit tests of pure logic: settings, envelopes, inputs table, storage, statuses,
and the generic executor driven by an in-process fake provider on ``memory://``."""

from __future__ import annotations

import ast
import os
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

    assert runner._start_capture("cloudexec_no_such_module:start") is None
    assert "cannot start the output capture 'cloudexec_no_such_module:start'" in capsys.readouterr().err
    assert runner._start_capture("cloudexec.settings:JobSettings") == JobSettings()  # module:callable is called
