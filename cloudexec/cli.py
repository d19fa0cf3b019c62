"""The ``cloudexec`` command: look after batch jobs from a shell.

::

    cloudexec [--config PATH] [--profile NAME] [--provider NAME] [--set ARG=VALUE ...] COMMAND

    jobs       recent jobs with their status, newest first (filter by status, name, age)
    status     one job's status, exit code, reason, provider id, attempts
    logs       a job's log (--stderr, --follow)
    result     print a job's result, or save it (-o FILE)
    cancel     cancel or terminate a job
    cleanup    delete the stored objects of old, ended jobs (a dry run unless --yes)
    doctor     check the configuration, credentials, storage, queue/pool and the runner's versions

The executor the command works through is built from, later winning:

1. the profile's table in the config file (``~/.config/cloudexec/config.toml``;
   ``--config`` or ``CLOUDEXEC_CONFIG`` name another), e.g.::

       profile = "lab"                 # the profile used when none is chosen

       [profiles.lab]
       provider = "aws"
       job_queue = "cloudexec-queue"
       job_definition = "cloudexec:3"
       io_bucket = "s3://my-bucket/cloudexec"

       [profiles.laptop]
       provider = "local"
       io_root = "~/cloudexec-jobs"

2. ``CLOUDEXEC_<ARGUMENT>`` environment variables, one per argument of the
   provider's executor class (``CLOUDEXEC_IO_ROOT``, ``CLOUDEXEC_JOB_QUEUE``…),
   and ``CLOUDEXEC_PROVIDER``/``CLOUDEXEC_PROFILE``;
3. ``--provider`` and ``--set ARGUMENT=VALUE``.

The keys of a profile are the keyword arguments of the provider's executor
class (``help(cloudexec.AWSBatchExecutor)``); this module reaches providers only
through `cloudexec.providers.executor_class`. Cloud credentials come from where
the SDKs look for them (``AWS_PROFILE``, ``az login``…; a Batch account's shared key
from ``AZURE_BATCH_ACCOUNT``/``AZURE_BATCH_ACCESS_KEY``). An error is one line
saying what failed and what to do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import os
import pprint
import re
import sys
import time
import traceback
import uuid
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeoutError  # not the builtin before 3.11
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cloudexec import _admin
from cloudexec._version import __version__
from cloudexec.errors import CloudExecError
from cloudexec.providers import provider_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from cloudexec._base import BatchExecutor, BatchFuture

__all__ = ["main", "cli", "load_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = os.path.join("~", ".config", "cloudexec", "config.toml")
# Items of a per-child list `status` prints before it summarises.
_LIST_SHOWN = 20
# A job folder without a manifest younger than this may be a submission in progress.
_UNFINISHED_GRACE = _dt.timedelta(hours=1)
# Environment variables that are not executor arguments.
_RESERVED_ENV = {"CLOUDEXEC_CONFIG", "CLOUDEXEC_PROFILE", "CLOUDEXEC_PROVIDER", "CLOUDEXEC_KEY"}


class CLIError(click.ClickException):
    """A failure shown as one line: what went wrong, then what to do."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


# -- configuration --------------------------------------------------------------
@dataclass
class Config:
    """Where the command's executor comes from.

    Attributes:
        provider: the provider's name (``local``, ``aws``, ``azure``).
        options: keyword arguments for its executor class.
        profile: the profile used, if any.
        path: the config file read, if any.
        sources: for each option, where its value came from.
    """

    provider: str
    options: dict[str, Any]
    profile: str | None = None
    path: str | None = None
    sources: dict[str, str] = field(default_factory=dict)


def _parse_value(text: str) -> Any:
    """A value from the environment or ``--set``: JSON if it parses (numbers, lists, tables), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _executor_arguments(provider: str) -> list[str]:
    from cloudexec.providers import executor_class

    params = inspect.signature(executor_class(provider).__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def load_config(
    *,
    config_path: str | None = None,
    profile: str | None = None,
    provider: str | None = None,
    overrides: dict[str, str] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Resolve the provider and the executor's arguments (see the module docstring).

    Raises:
        CLIError: an unreadable config file, an unknown profile or provider, or no provider at all.
    """
    env = dict(os.environ if environ is None else environ)
    explicit = config_path or env.get("CLOUDEXEC_CONFIG")
    path = os.path.expanduser(explicit or DEFAULT_CONFIG)
    data: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CLIError(f"cannot read the config file {path}: {exc}. Fix the file, or point --config elsewhere") from None
    elif explicit:
        raise CLIError(f"config file {path} does not exist; create it or drop --config/CLOUDEXEC_CONFIG")
    else:
        path = ""
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise CLIError(f"{path}: 'profiles' must be a table of tables ([profiles.NAME])")
    chosen = profile or env.get("CLOUDEXEC_PROFILE") or data.get("profile")
    if chosen is None and "default" in profiles:
        chosen = "default"
    options: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if chosen is not None:
        if chosen not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            where = path or f"{os.path.expanduser(DEFAULT_CONFIG)} (missing)"
            raise CLIError(f"no profile {chosen!r} in {where} (profiles: {known}); add [profiles.{chosen}] or choose another")
        table = profiles[chosen]
        if not isinstance(table, dict):
            raise CLIError(f"{path}: [profiles.{chosen}] must be a table")
        options.update(table)
        sources.update({key: f"profile {chosen}" for key in table})
    name = provider or env.get("CLOUDEXEC_PROVIDER") or options.pop("provider", None)
    options.pop("provider", None)
    sources.pop("provider", None)
    if name is None:
        raise CLIError(
            f"no provider chosen: pass --provider ({'|'.join(provider_names())}), set CLOUDEXEC_PROVIDER, "
            f"or add a profile with provider = \"...\" to {path or os.path.expanduser(DEFAULT_CONFIG)}"
        )
    if name not in provider_names():
        raise CLIError(f"unknown provider {name!r}; choose one of: {', '.join(provider_names())}")
    for arg in _executor_arguments(name):
        var = f"CLOUDEXEC_{arg.upper()}"
        if var in env and var not in _RESERVED_ENV:
            options[arg] = _parse_value(env[var])
            sources[arg] = var
    for key, value in (overrides or {}).items():
        options[key] = _parse_value(value)
        sources[key] = "--set"
    for key, value in options.items():
        if isinstance(value, str) and value.startswith("~"):
            options[key] = os.path.expanduser(value)
    return Config(provider=name, options=options, profile=chosen, path=path or None, sources=sources)


def build_executor(config: Config) -> BatchExecutor:
    """The executor ``config`` describes.

    Raises:
        CLIError: the provider refused the arguments (the message names the source of each).
    """
    from cloudexec.providers import executor_class, stored_job_arguments

    cls = executor_class(config.provider)
    for arg in stored_job_arguments(config.provider):
        if arg not in config.options:
            raise CLIError(
                f"the {config.provider} provider needs {arg}, where its jobs are stored: set {arg} in a profile, "
                f"CLOUDEXEC_{arg.upper()}, or --set {arg}=..."
            )
    try:
        return cls(**config.options)
    except TypeError as exc:
        raise CLIError(
            f"{cls.__name__}: {exc}. Its arguments: {', '.join(_executor_arguments(config.provider))} "
            f"(plus job settings); set them in a profile, as CLOUDEXEC_<ARGUMENT>, or with --set ARGUMENT=VALUE"
        ) from None
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    except (ValueError, CloudExecError, PermissionError) as exc:
        raise CLIError(f"{cls.__name__}: {exc}") from None


# -- shared plumbing -------------------------------------------------------------
@dataclass
class _State:
    config_path: str | None
    profile: str | None
    provider: str | None
    overrides: dict[str, str]
    debug: bool
    _config: Config | None = None
    _executor: BatchExecutor | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(
                config_path=self.config_path, profile=self.profile, provider=self.provider, overrides=self.overrides
            )
        return self._config

    def executor(self) -> BatchExecutor:
        if self._executor is None:
            self._executor = build_executor(self.config())
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            # Never wait: a job shown by `status` may run for hours; it lives on at the provider.
            self._executor.shutdown(wait=False)


def _state() -> _State:
    state = click.get_current_context().find_object(_State)
    if state is None:  # only when a command is invoked without the group
        raise CLIError("run the command through `cloudexec`")
    return state


def _attach(job_id: str) -> BatchFuture[Any]:
    ex = _state().executor()
    try:
        return ex.attach(job_id)
    except ValueError as exc:
        raise CLIError(f"{exc}; `cloudexec jobs` lists the job ids") from None
    except CloudExecError as exc:
        raise CLIError(f"{exc}") from None


def _fail(message: str) -> NoReturn:
    raise CLIError(message)


def _parse_age(text: str | None, option: str) -> _dt.timedelta | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None:
        _fail(f"{option} {text!r} is not an age; write a number and a unit: 30m, 12h, 7d, 2w")
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return _dt.timedelta(seconds=float(match.group(1)) * seconds)


def _when(created: _dt.datetime | None) -> str:
    return created.strftime("%Y-%m-%d %H:%M:%S") if created else "-"


def _wait_for_info(fut: BatchFuture[Any], timeout_s: float = 10.0) -> None:
    """Give a just-attached future a moment to hear from the provider (its first poll)."""
    end = time.monotonic() + timeout_s
    while fut.job_status is None and not fut.done() and time.monotonic() < end:
        time.sleep(0.1)


# -- the commands ----------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", help=f"Config file (default {DEFAULT_CONFIG}, or $CLOUDEXEC_CONFIG).")
@click.option("--profile", metavar="NAME", help="Profile of the config file to use (default: its `profile` key, or $CLOUDEXEC_PROFILE).")
@click.option(
    "--provider",
    metavar="NAME",
    help=f"Provider: {', '.join(provider_names())} (default: the profile's, or $CLOUDEXEC_PROVIDER).",
)
@click.option(
    "--set", "sets", metavar="ARG=VALUE", multiple=True, help="An executor argument, e.g. --set io_root=/data/jobs (repeatable)."
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(version=__version__, prog_name="cloudexec")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, profile: str | None, provider: str | None, sets: tuple[str, ...], debug: bool) -> None:
    """Look after cloudexec batch jobs: list, inspect, read logs and results, cancel, clean up, diagnose.

    The executor's arguments come from a profile of the config file, then
    CLOUDEXEC_<ARGUMENT> environment variables (CLOUDEXEC_IO_ROOT,
    CLOUDEXEC_JOB_QUEUE...), then --set ARGUMENT=VALUE; a profile is a
    [profiles.NAME] table with provider = "..." and the executor's arguments.
    """
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r} is not ARG=VALUE; e.g. --set io_root=/data/jobs")
        overrides[key.strip()] = value
    state = _State(config_path, profile, provider, overrides, debug)
    ctx.obj = state
    ctx.call_on_close(state.close)


@cli.command()
@click.option("--status", "status", metavar="STATUS", help="Only jobs in this status or phase (queued, running, succeeded, failed, unknown, or a provider's status name).")
@click.option("--name", metavar="TEXT", help="Only jobs whose id or function contains TEXT.")
@click.option("--since", metavar="AGE", help="Only jobs submitted within AGE (e.g. 2h, 7d).")
@click.option("-n", "--limit", default=20, show_default=True, help="At most this many jobs (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job instead of a table.")
def jobs(status: str | None, name: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Recent jobs with their status, newest first."""
    newer_than = _parse_age(since, "--since")
    ex = _state().executor()
    shown = 0
    if not as_json:
        click.echo(f"{'JOB ID':<48} {'STATUS':<10} {'KIND':<11} {'SUBMITTED (UTC)':<19}  FUNCTION")
    for entry in _admin.iter_jobs(ex, newer_than=newer_than, name=name):
        if not entry.matches(status):
            continue
        function = (entry.manifest or {}).get("function", "") if entry.problem is None else f"({entry.problem})"
        if as_json:
            record = {
                "job_id": entry.job_id,
                "status": entry.status,
                "phase": entry.phase,
                "kind": entry.kind,
                "submitted": entry.created.isoformat() if entry.created else None,
                "function": (entry.manifest or {}).get("function"),
                "exit_code": entry.info.exit_code if entry.info else None,
                "problem": entry.problem,
            }
            click.echo(json.dumps(record))
        else:
            click.echo(f"{entry.job_id:<48} {entry.status:<10} {entry.kind:<11} {_when(entry.created):<19}  {function}")
        shown += 1
        if limit and shown >= limit:
            break
    if not shown and not as_json:
        click.echo(f"(no jobs{' matching' if status or name or since else ''} under {ex.io_url})")


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the properties as JSON.")
def status(job_id: str, as_json: bool) -> None:
    """One job's status, exit code, reason, provider id and attempts (JOB_ID or JOB_ID[INDEX])."""
    fut = _attach(job_id)
    _wait_for_info(fut)
    props = {k: v for k, v in fut.properties().items() if k not in ("job_log", "job_stderr_log")}
    props["job_status"] = str(props["job_status"]) if props.get("job_status") is not None else None
    if props["job_status"] is None:
        props["job_status"] = "unknown (the provider no longer knows the job)"
    if as_json:
        click.echo(json.dumps(props, default=str))
        return
    for key, value in props.items():
        if isinstance(value, list) and len(value) > _LIST_SHOWN:
            # An array of thousands of children: the counts tell more than the whole list.
            value = f"{value[:_LIST_SHOWN]} ... ({len(value)} in all; --json shows every one)"
        click.echo(f"{key + ':':<26} {value}")


@cli.command()
@click.argument("job_id")
@click.option("--stderr", is_flag=True, help="The stderr log (where the provider keeps it apart).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job ends.")
@click.option("--interval", default=2.0, show_default=True, metavar="S", help="Seconds between reads with --follow.")
def logs(job_id: str, stderr: bool, follow: bool, interval: float) -> None:
    """A job's log (JOB_ID, or JOB_ID[INDEX] for one child of an array job)."""
    fut = _attach(job_id)
    _wait_for_info(fut)
    stream = "job_stderr_log" if stderr else "job_log"
    if fut.index is None and fut._record.is_array:
        _fail(f"{job_id} is an array job; its children have the logs: cloudexec logs '{job_id}[0]'")
    printed = ""
    while True:
        ended = fut.done() or (fut.job_status is not None and fut.job_status.terminal)
        text = getattr(fut, stream) or ""
        new = text[len(printed) :] if text.startswith(printed) else text
        if new:
            click.echo(new, nl=False)
            printed = text
        if not follow or ended:
            break
        time.sleep(interval)
    if not printed and not follow:
        which = "stderr" if stderr else "output"
        hint = " (this provider keeps stderr in the main log: drop --stderr)" if stderr else ""
        click.echo(f"(no {which} for {job_id} yet{hint})", err=True)


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", metavar="FILE", help="Save the result to FILE (str as text, bytes as is, else pickled with dill).")
@click.option("--timeout", default=10.0, show_default=True, metavar="S", help="Seconds to wait for a job that has not ended.")
def result(job_id: str, output: str | None, timeout: float) -> None:
    """Print a job's result, or save it with -o."""
    fut = _attach(job_id)
    try:
        value = fut.result(timeout=timeout)
    except FutureTimeoutError:
        _fail(
            f"job {job_id} has not ended ({fut.job_status or 'status unknown'}); wait longer with --timeout 3600, "
            f"or watch it with cloudexec logs --follow {job_id}"
        )
    except CancelledError:
        _fail(f"job {job_id} was cancelled; it has no result")
    except CloudExecError as exc:
        _fail(str(exc).splitlines()[0] + f" (full log: cloudexec logs {job_id})")
    except Exception as exc:  # noqa: BLE001 - the job's own exception, re-raised on the client
        _fail(f"job {job_id} raised {type(exc).__name__}: {exc} (its traceback: cloudexec logs --stderr {job_id}; --debug prints it here)")
    if output is None:
        click.echo(value if isinstance(value, str) else pprint.pformat(value))
        return
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        import dill

        data = dill.dumps(value)
    with open(output, "wb") as fh:
        fh.write(data)
    click.echo(f"saved the result of {job_id} ({type(value).__name__}, {len(data)} bytes) to {output}")


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: dequeue it, or terminate it if it runs."""
    fut = _attach(job_id)
    _wait_for_info(fut)
    status = fut.job_status
    if fut.done() or (status is not None and status.terminal):
        click.echo(f"job {job_id} already ended ({status or 'result stored'}); nothing to cancel")
        return
    fut.cancel()
    click.echo(f"cancel requested for {job_id} (was {status or 'status unknown'}); see: cloudexec status {job_id}")


@cli.command()
@click.option("--older-than", default="7d", show_default=True, metavar="AGE", help="Only jobs submitted at least AGE ago (e.g. 12h, 30d; 0s: any age).")
@click.option("--status", "status", metavar="STATUS", help="Only ended jobs in this status or phase (succeeded, failed, unknown, or a provider's name).")
@click.option("--yes", "delete", is_flag=True, help="Really delete (without it, only list what would be deleted).")
def cleanup(older_than: str, status: str | None, delete: bool) -> None:
    """Delete the stored objects of old jobs that ended (a dry run unless --yes).

    Jobs that are queued or running are never touched.
    """
    age = _parse_age(older_than, "--older-than")
    now = _dt.datetime.now(_dt.timezone.utc)
    ex = _state().executor()
    count = 0
    for entry in _admin.iter_jobs(ex, older_than=age):
        if not entry.ended or not entry.matches(status):
            continue
        if entry.manifest is None and (entry.created is None or now - entry.created < _UNFINISHED_GRACE):
            continue  # a submission may be writing it right now: its manifest comes last
        count += 1
        if delete:
            _admin.delete_job(ex, entry.job_id)
        click.echo(f"{'deleted' if delete else 'would delete'} {entry.job_id} ({entry.status}, submitted {_when(entry.created)})")
    if delete:
        click.echo(f"deleted {count} job(s) under {ex.io_url}")
    else:
        click.echo(f"{count} job(s) under {ex.io_url} would be deleted; run again with --yes to delete them")


@cli.command()
@click.option("--no-job", is_flag=True, help="Skip the probe job (it checks the runner's Python and dill versions).")
@click.option("--timeout", default=600.0, show_default=True, metavar="S", help="Seconds to wait for the probe job.")
def doctor(no_job: bool, timeout: float) -> None:
    """Check the configuration, credentials, storage, queue/pool, and the runner's versions."""
    state = _state()
    problems = 0

    def report(ok: bool | None, what: str, detail: str) -> None:
        nonlocal problems
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
        problems += ok is False
        click.echo(f"{mark} {what}: {detail}")

    config = state.config()
    where = f"profile {config.profile} of {config.path}" if config.profile else "environment and options"
    report(True, "configuration", f"provider {config.provider} from {where}; arguments: {', '.join(sorted(config.options)) or 'none'}")
    client = _admin.client_versions()
    report(True, "client", ", ".join(f"{k} {v}" for k, v in client.items()))
    try:
        ex = state.executor()
    except CLIError as exc:
        # The executor checks credentials, the queue/pool and storage when it is built.
        report(False, "provider, credentials, queue/pool and storage", exc.format_message())
        raise SystemExit(1) from None
    report(True, "provider, credentials, queue/pool", f"the {config.provider} provider accepted them")
    key = f".cloudexec-doctor-{uuid.uuid4().hex[:8]}"
    store = ex._core.store
    try:
        store.write(key, b"doctor")
        back = store.read(key)
        store.delete(key)
        report(back == b"doctor", "storage", f"wrote, read and deleted an object under {ex.io_url}")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report(False, "storage", f"{type(exc).__name__}: {exc}; check the io location and that these credentials may write it")
    if no_job:
        report(None, "runner", "probe job skipped (--no-job)")
    else:
        fut = ex.with_settings(job_name="cloudexec-doctor").submit(_admin.runner_versions)
        try:
            remote = fut.result(timeout=timeout)
        except FutureTimeoutError:
            fut.cancel()
            report(False, "runner", f"probe job {fut.job_id} did not end within {timeout:g} s ({fut.job_status}); "
                   "check that the queue/pool has capacity, or raise --timeout")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            report(False, "runner", f"probe job {fut.job_id} failed: {str(exc).splitlines()[0]}")
        else:
            same_minor = remote["python"].rsplit(".", 1)[0] == client["python"].rsplit(".", 1)[0]
            same_dill = remote["dill"] == client["dill"]
            detail = ", ".join(f"{k} {v}" for k, v in remote.items())
            if same_minor and same_dill:
                report(True, "runner", f"{detail} (matches the client)")
            else:
                report(False, "runner", f"{detail} but the client has python {client['python']}, dill {client['dill']}: "
                       "rebuild the image with the client's Python minor version and dill version (container/)")
        if fut.done():
            _admin.delete_job(ex, fut.job_id)  # the probe is not the user's job: leave no trace of it
    if problems:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cloudexec`` console script."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="cloudexec", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as exc:
        if debug and not isinstance(exc, click.UsageError):
            traceback.print_exc()
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the command's promise: one line, not a traceback
        if debug:
            traceback.print_exc()
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        click.echo("(run again with --debug for the traceback)", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
