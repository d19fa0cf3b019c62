"""The ``cloudexec`` command, against jobs a real executor left in storage.

Most tests drive the click group in-process (CliRunner) on the local provider
with a persistent io_root; one runs the installed console script as a real
process; the AWS class runs the same commands against the AWS Batch emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dill
import jobs as J
import pytest
from click.testing import CliRunner, Result

from cloudexec import LocalBatchExecutor
import cloudexec.cli as cli_module
from cloudexec.cli import CLIError, cli, load_config


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never read the developer's own ~/.config/cloudexec/config.toml or CLOUDEXEC_* variables.
    for var in list(os.environ):
        if var.startswith("CLOUDEXEC_") and var != "CLOUDEXEC_KEY":
            monkeypatch.delenv(var)
    monkeypatch.setattr(cli_module, "DEFAULT_CONFIG", str(tmp_path / "absent" / "config.toml"))


class Stored:
    """Jobs an earlier client left in a persistent io_root."""

    def __init__(self, root: str) -> None:
        self.root = root
        with LocalBatchExecutor(io_root=root, max_workers=2) as ex:
            self.ok = ex.submit(J.shout, "hi")
            self.bad = ex.submit(J.fail_on, 3)
            self.array = ex.submit_map(J.double, range(4))
            self.ok.exception(60), self.bad.exception(60), self.array.exception(60)
        self.ids = {"ok": self.ok.job_id, "bad": self.bad.job_id, "array": self.array.job_id}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return Stored(str(tmp_path_factory.mktemp("cli") / "io"))


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def local(stored: Stored, *args: str) -> Result:
    return run("--provider", "local", "--set", f"io_root={stored.root}", *args)


def test_jobs_lists_newest_first_with_status(stored: Stored) -> None:
    res = local(stored, "jobs")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("JOB ID")
    listed = [line.split()[0] for line in lines[1:]]
    assert set(listed) == set(stored.ids.values())
    # Submission order: ok, bad, array; ids of the same second tie-break by their random suffix,
    # so only check that every listed time is not older than the next one.
    times = [" ".join(line.split()[3:5]) for line in lines[1:]]
    assert times == sorted(times, reverse=True)
    by_id = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert by_id[stored.ids["ok"]] == "Succeeded"
    assert by_id[stored.ids["bad"]] == "Failed"
    assert "array[4]" in res.output and "jobs.shout" in res.output


@pytest.mark.parametrize(
    ("option", "expected"),
    [(["--status", "failed"], {"bad"}), (["--status", "Succeeded"], {"ok", "array"}), (["--name", "shout"], {"ok"}),
     (["--since", "1h"], {"ok", "bad", "array"}), (["-n", "1"], None)],
)
def test_jobs_filters(stored: Stored, option: list[str], expected: set[str] | None) -> None:
    res = local(stored, "jobs", "--json", *option)
    assert res.exit_code == 0, res.output
    got = {json.loads(line)["job_id"] for line in res.output.splitlines()}
    if expected is None:
        assert len(got) == 1
    else:
        assert got == {stored.ids[k] for k in expected}


def test_status_of_a_single_job_and_an_array_child(stored: Stored) -> None:
    res = local(stored, "status", "--json", stored.ids["bad"])
    assert res.exit_code == 0, res.output
    props = json.loads(res.output)
    assert props["job_status"] == "Failed" and props["job_exit_code"] != 0
    res = local(stored, "status", stored.ids["array"] + "[2]")
    assert res.exit_code == 0, res.output
    assert "Succeeded" in res.output


def test_logs_stdout_stderr_and_array_child(stored: Stored) -> None:
    assert local(stored, "logs", stored.ids["ok"]).output.strip() == "stdout says hi"
    assert local(stored, "logs", "--stderr", stored.ids["ok"]).output.strip() == "stderr says hi"
    res = local(stored, "logs", stored.ids["array"])
    assert res.exit_code == 1 and f"cloudexec logs '{stored.ids['array']}[0]'" in res.output
    res = local(stored, "logs", "--follow", "--interval", "0.1", stored.ids["ok"])
    assert res.exit_code == 0 and res.output.strip() == "stdout says hi"


def test_result_prints_saves_and_reports_the_jobs_error(stored: Stored, tmp_path: Path) -> None:
    assert local(stored, "result", stored.ids["ok"]).output.strip() == "HI"
    assert local(stored, "result", stored.ids["array"]).output.strip() == "[0, 2, 4, 6]"
    out = tmp_path / "r.pkl"
    res = local(stored, "result", stored.ids["array"], "-o", str(out))
    assert res.exit_code == 0 and "saved" in res.output
    assert dill.loads(out.read_bytes()) == [0, 2, 4, 6]
    res = local(stored, "result", stored.ids["bad"])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and "Boom: item 3 is bad" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_cancel_of_an_ended_job_says_so(stored: Stored) -> None:
    res = local(stored, "cancel", stored.ids["ok"])
    assert res.exit_code == 0 and "already ended" in res.output


def test_cleanup_is_a_dry_run_unless_yes(tmp_path: Path) -> None:
    stored = Stored(str(tmp_path / "io"))
    res = local(stored, "cleanup", "--older-than", "0s", "--status", "failed")
    assert res.exit_code == 0, res.output
    assert f"would delete {stored.ids['bad']}" in res.output and "--yes" in res.output
    assert os.path.isdir(os.path.join(stored.root, stored.ids["bad"]))
    assert local(stored, "cleanup").output.startswith("0 job(s)")  # none is 7 days old
    res = local(stored, "cleanup", "--older-than", "0s", "--status", "failed", "--yes")
    assert res.exit_code == 0 and f"deleted {stored.ids['bad']}" in res.output
    assert not os.path.exists(os.path.join(stored.root, stored.ids["bad"]))
    remaining = {json.loads(line)["job_id"] for line in local(stored, "jobs", "--json").output.splitlines()}
    assert remaining == {stored.ids["ok"], stored.ids["array"]}


def test_doctor_checks_everything_including_the_runner(stored: Stored) -> None:
    res = local(stored, "doctor")
    assert res.exit_code == 0, res.output
    for check in ("configuration", "client", "provider, credentials, queue/pool", "storage", "runner"):
        assert f"ok   {check}:" in res.output
    assert "(matches the client)" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs"], "no provider chosen: pass --provider"),
        (["--provider", "nimbus", "jobs"], "unknown provider 'nimbus'; choose one of: local, aws, azure"),
        (["--provider", "local", "jobs"], "the local provider needs io_root, where its jobs are stored"),
        (["--provider", "local", "--set", "io_root=/tmp", "--set", "colour=blue", "jobs"], "colour"),
        (["--provider", "local", "--set", "io_root", "jobs"], "is not ARG=VALUE"),
        (["--profile", "lab", "jobs"], "no profile 'lab'"),
        (["--config", "/nonexistent/c.toml", "jobs"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_the_fix(args: list[str], message: str) -> None:
    res = run(*args)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0]


def test_unknown_job_is_one_line(stored: Stored) -> None:
    res = local(stored, "status", "nojob-20200101-000000-00000000")
    assert res.exit_code == 1 and res.output.startswith("error: no job") and len(res.output.splitlines()) == 1
    res = local(stored, "status", "../etc")
    assert res.exit_code == 1 and res.output.startswith("error: ") and "cloudexec jobs" in res.output


def test_config_file_profiles_env_and_set_in_order(tmp_path: Path, stored: Stored) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'profile = "laptop"\n\n[profiles.laptop]\nprovider = "local"\nio_root = "/nowhere"\nmax_workers = 3\n'
        f'\n[profiles.real]\nprovider = "local"\nio_root = "{stored.root}"\n'
    )
    cfg = load_config(config_path=str(config), environ={})
    assert (cfg.provider, cfg.profile, cfg.options) == ("local", "laptop", {"io_root": "/nowhere", "max_workers": 3})
    cfg = load_config(config_path=str(config), environ={"CLOUDEXEC_IO_ROOT": "/env", "CLOUDEXEC_MAX_WORKERS": "5"})
    assert cfg.options == {"io_root": "/env", "max_workers": 5} and cfg.sources["io_root"] == "CLOUDEXEC_IO_ROOT"
    cfg = load_config(config_path=str(config), environ={"CLOUDEXEC_IO_ROOT": "/env"}, overrides={"io_root": "~/x"})
    assert cfg.options["io_root"] == os.path.expanduser("~/x")
    cfg = load_config(config_path=str(config), environ={"CLOUDEXEC_PROFILE": "real"})
    assert cfg.options == {"io_root": stored.root}
    # Through the command, with the path from the environment.
    res = run("jobs", "--json", env={"CLOUDEXEC_CONFIG": str(config), "CLOUDEXEC_PROFILE": "real"})
    assert res.exit_code == 0, res.output
    assert {json.loads(line)["job_id"] for line in res.output.splitlines()} == set(stored.ids.values())
    config.write_text("profile = [")
    with pytest.raises(CLIError, match="cannot read the config file"):
        load_config(config_path=str(config), environ={})


def test_console_script_runs_as_a_real_process(stored: Stored) -> None:
    script = shutil.which("cloudexec", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the cloudexec console script is not installed here (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDEXEC_") or k == "CLOUDEXEC_KEY"}
    env.update(CLOUDEXEC_PROVIDER="local", CLOUDEXEC_IO_ROOT=stored.root)
    proc = subprocess.run([script, "result", stored.ids["ok"]], capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout.strip()) == (0, "HI"), proc.stderr
    proc = subprocess.run([script, "result", stored.ids["bad"]], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "cloudexec" in proc.stdout


@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    from cloudexec.testing.aws import aws_batch_emulator

    with aws_batch_emulator(max_vcpus=2) as emulator:
        yield emulator


def _jobs_result_logs_cancel_status(ex: Any, word: str, *, succeeded: str, failed: str) -> tuple[Any, Any]:
    """jobs, result, logs, cancel and status on a finished and a running job of ``ex``, through the command.

    ``succeeded``/``failed`` are the provider's own status names; returns (finished job, cancelled job).
    """
    done = ex.submit(J.shout, word)
    assert done.result(timeout=60) == word.upper()
    slow = ex.submit(J.nap, 60)
    res = run("jobs", "--json")
    assert res.exit_code == 0, res.output
    listed = {json.loads(line)["job_id"]: json.loads(line)["status"] for line in res.output.splitlines()}
    assert listed[done.job_id] == succeeded and slow.job_id in listed
    assert run("result", done.job_id).output.strip() == word.upper()
    assert f"stdout says {word}" in run("logs", done.job_id).output
    res = run("cancel", slow.job_id)
    assert res.exit_code == 0 and "cancel requested" in res.output, res.output
    slow.exception(timeout=60)
    status = json.loads(run("status", "--json", slow.job_id).output)
    assert status["job_status"] == failed and "cloudexec" in (status["job_status_reason"] or "")
    return done, slow


@pytest.mark.aws
class TestAgainstAWSEmulator:
    """The same commands through the aws provider, configured from the environment only."""

    @pytest.fixture
    def env(self, emu: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        env = dict(
            emu.env(),
            CLOUDEXEC_PROVIDER="aws",
            CLOUDEXEC_JOB_QUEUE=emu.job_queue,
            CLOUDEXEC_JOB_DEFINITION=emu.job_definition,
            CLOUDEXEC_IO_BUCKET=emu.io_url,
            CLOUDEXEC_ENDPOINT_URL=emu.endpoint_url,
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    def test_jobs_status_logs_result_cancel_cleanup(self, emu: Any, env: dict[str, str]) -> None:
        with emu.executor() as ex:
            done, slow = _jobs_result_logs_cancel_status(ex, "aws", succeeded="SUCCEEDED", failed="FAILED")
            assert slow.cancelled() or str(slow.job_status) == "FAILED"
            res = run("cleanup", "--older-than", "0s", "--yes")
            assert res.exit_code == 0 and f"deleted {done.job_id}" in res.output, res.output
            res = run("doctor", "--no-job")
            assert res.exit_code == 0 and "ok   storage" in res.output and "skip runner" in res.output, res.output


def test_cleanup_leaves_a_fresh_folder_without_manifest(tmp_path: Path) -> None:
    # A submission writes call.pkl first and its manifest last: never delete in between.
    stored = Stored(str(tmp_path / "io"))
    half = time.strftime("half-%Y%m%d-%H%M%S-0123abcd", time.gmtime(time.time() - 60))
    os.makedirs(os.path.join(stored.root, half))
    Path(stored.root, half, "call.pkl").write_bytes(b"x")
    res = local(stored, "cleanup", "--older-than", "0s", "--yes")
    assert res.exit_code == 0, res.output
    assert os.path.exists(os.path.join(stored.root, half, "call.pkl"))
    assert not os.path.exists(os.path.join(stored.root, stored.ids["ok"]))


@pytest.mark.timeout(120)
def test_result_of_a_running_job_says_how_to_wait(tmp_path: Path) -> None:
    root = str(tmp_path / "io")
    with LocalBatchExecutor(io_root=root, max_workers=1) as ex:
        running = ex.submit(J.nap, 60)
        try:
            # The manifest is written once the provider took the job; only then can another client find it.
            for _ in range(600):
                if os.path.exists(os.path.join(root, running.job_id, "job.json")):
                    break
                time.sleep(0.05)
            res = run("--provider", "local", "--set", f"io_root={root}", "result", "--timeout", "0.5", running.job_id)
            assert res.exit_code == 1, res.output
            assert res.output.startswith(f"error: job {running.job_id} has not ended") and "--timeout" in res.output
            assert len(res.output.strip().splitlines()) == 1
        finally:
            running.cancel()


def tick(n: int, pause_s: float) -> int:
    """Prints a line every pause_s seconds: a log that grows while the job runs."""
    for i in range(n):
        print(f"tick {i}", flush=True)
        time.sleep(pause_s)
    return n


@pytest.mark.timeout(120)
def test_logs_follow_prints_a_growing_log_until_the_job_ends(tmp_path: Path) -> None:
    root = str(tmp_path / "io")
    with LocalBatchExecutor(io_root=root, max_workers=1) as ex:
        fut = ex.submit(tick, 6, 0.3)
        for _ in range(600):
            if os.path.exists(os.path.join(root, fut.job_id, "job.json")):
                break
            time.sleep(0.05)
        res = run("--provider", "local", "--set", f"io_root={root}", "logs", "--follow", "--interval", "0.1", fut.job_id)
        assert res.exit_code == 0, res.output
        assert res.output.splitlines() == [f"tick {i}" for i in range(6)]
        assert fut.result(timeout=30) == 6


def test_doctor_fails_on_a_runner_version_mismatch(stored: Stored, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudexec._admin as admin

    real = admin.client_versions()
    monkeypatch.setattr(admin, "client_versions", lambda: dict(real, dill="0.0.1"))
    res = local(stored, "doctor")
    assert res.exit_code == 1, res.output
    assert "FAIL runner:" in res.output and "rebuild the image" in res.output
    res = local(stored, "doctor", "--no-job")
    assert res.exit_code == 0 and "skip runner" in res.output


def test_status_of_a_large_array_summarises_per_child_lists(tmp_path: Path) -> None:
    stored_root = str(tmp_path / "io")
    with LocalBatchExecutor(io_root=stored_root, max_workers=2) as ex:
        arr = ex.submit_map(J.double, range(25))
        arr.result(timeout=60)
    res = run("--provider", "local", "--set", f"io_root={stored_root}", "status", arr.job_id)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("child_job_exit_codes:"))
    assert line.endswith("(25 in all; --json shows every one)")
    res = run("--provider", "local", "--set", f"io_root={stored_root}", "status", "--json", arr.job_id)
    assert json.loads(res.output)["child_job_exit_codes"] == [0] * 25


@pytest.fixture(scope="module")
def azure_emu() -> Iterator[Any]:
    from cloudexec.testing.azure import azure_batch_emulator

    with azure_batch_emulator(slots=2) as emulator:
        yield emulator


@pytest.mark.azure
class TestAgainstAzureEmulator:
    """The same commands through the azure provider, configured from the environment only
    (the Batch account's shared key from the Azure CLI's own variables)."""

    @pytest.fixture
    def env(self, azure_emu: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        key = azure_emu.credential().named_key
        env = dict(
            azure_emu.env(),
            CLOUDEXEC_PROVIDER="azure",
            CLOUDEXEC_POOL_ID=azure_emu.pool_id,
            CLOUDEXEC_STORAGE=azure_emu.storage_url,
            CLOUDEXEC_BATCH_URL=azure_emu.batch_url,
            AZURE_BATCH_ACCOUNT=key.name,
            AZURE_BATCH_ACCESS_KEY=key.key,
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return env

    def test_jobs_status_logs_result_cancel(self, azure_emu: Any, env: dict[str, str]) -> None:
        with azure_emu.executor(poll_interval_s=(0.05, 0.3)) as ex:
            _jobs_result_logs_cancel_status(ex, "azure", succeeded="Succeeded", failed="Failed")
            res = run("doctor", "--no-job")
            assert res.exit_code == 0 and "ok   storage" in res.output, res.output
