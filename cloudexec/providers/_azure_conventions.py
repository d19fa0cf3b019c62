"""Azure Batch File Conventions: where a task's logs and output files go in Blob storage.

Azure's conventions (the ``Microsoft.Azure.Batch.Conventions.Files`` library
and the portal's "saved files" view follow them) keep everything a job leaves
behind in one blob container per job, next to the job's other storage::

    job-<jobId>/                          one container per Azure job
        <taskId>/$TaskLog/stdout.txt      the task's stdout
        <taskId>/$TaskLog/stderr.txt      the task's stderr
        <taskId>/$TaskOutput/<path>       every file the task wrote below ./JobOutput/

Two sides use this module:

* the Azure provider (client) derives the container name, creates the
  container before the job starts, and lists / downloads what landed there;
* the runner (inside the task) starts `TaskOutputCapture` because the Azure
  provider's command line asks for it (``--capture-output`` naming
  `TaskOutputCapture.start`; the task's environment carries
  ``CLOUDEXEC_TASK_OUTPUT``, the container's fsspec URL). The runner imports
  this module only then, so the other providers' cold start does not change.
  It imports only the standard library; adlfs comes in through
  `cloudexec._storage` when the upload happens, and the runner has already
  loaded it for its own storage.

How stdout/stderr are captured: file descriptors 1 and 2 are *teed*. Each is
replaced by a pipe whose reader thread forwards every chunk to the original
descriptor (the node's ``$AZ_BATCH_TASK_DIR/stdout.txt``, so
``future.job_log`` still streams from the node while the task runs) and also
appends it to a private temporary file that is uploaded when the runner ends.
Teeing the descriptors (rather than ``sys.stdout``) catches output of C
extensions and subprocesses too, and it does not depend on how the node
agent writes ``stdout.txt`` (for container tasks it is written by the agent,
possibly late). The alternative, copying ``stdout.txt`` at the end, would
miss the tail the agent had not flushed yet.

What is not uploaded: a task that Azure kills (``maxWallClockTime``, terminate)
never reaches the upload; its logs stay readable from the node's task files
for the task's retention time, and cloudexec reads them from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import subprocess
import tempfile
from typing import Any

__all__ = [
    "ATTEMPTS_ENV_VAR",
    "CAPTURE_HOOK",
    "STORAGE_HOOK",
    "setup_task_storage",
    "tune_blob_retries",
    "ENV_VAR",
    "OUTPUT_DIR",
    "LOG_KIND",
    "OUTPUT_KIND",
    "container_name",
    "log_blob",
    "output_prefix",
    "TaskOutputCapture",
]

#: Set by the Azure provider on every task: fsspec URL of the job's conventions container.
ENV_VAR = "CLOUDEXEC_TASK_OUTPUT"
#: The runner's ``--capture-output`` hook that starts `TaskOutputCapture` in a task.
CAPTURE_HOOK = f"{__name__}:TaskOutputCapture.start"
#: The runner's ``--storage-setup`` hook that gives a task's blob client `tune_blob_retries`.
STORAGE_HOOK = f"{__name__}:setup_task_storage"
#: Set by the Azure provider on every task: attempts per blob call (its ``max_api_attempts``).
ATTEMPTS_ENV_VAR = "CLOUDEXEC_STORAGE_ATTEMPTS"
_DEFAULT_ATTEMPTS = 10
#: Folder (relative to the task's working directory) whose files are uploaded.
OUTPUT_DIR = "JobOutput"
#: Azure's names for the two kinds of saved files (``TaskOutputKind`` in the conventions library).
LOG_KIND = "$TaskLog"
OUTPUT_KIND = "$TaskOutput"

# Blob container names: 3-63 characters, lowercase letters, digits and single
# hyphens, starting and ending with a letter or digit (Azure Storage naming rules).
_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")
_MAX_CONTAINER = 63
_HASH_CHARS = 16
# How long the end of a run waits for a tee to drain: a subprocess the job left
# running may keep the pipe open for ever, and the upload must not wait for it.
_DRAIN_S = 2.0
_CHUNK = 64 * 1024


def container_name(job_id: str) -> str:
    """The conventions container of an Azure job: ``job-<jobId>``, made a valid container name.

    Azure job ids (1-64 of ``[A-Za-z0-9_-]``, case-insensitive) do not always
    make valid container names. As the conventions library does, a name that
    is valid as ``job-`` + the lower-cased id is used unchanged; any other is
    sanitised (runs of characters other than ``a-z0-9`` become one hyphen),
    truncated to leave room, and suffixed with ``-`` and 16 hex digits of the
    id's SHA-1, so that two ids never share a container. cloudexec's own job
    ids (``<name>-<yyyymmdd>-<hhmmss>-<hex8>``, at most 49 characters) always
    take the unchanged form.

    Args:
        job_id: the Azure job id.

    Returns:
        A valid blob container name of at most 63 characters.
    """
    plain = "job-" + job_id.lower()
    if _CONTAINER_RE.match(plain):
        return plain
    digest = hashlib.sha1(job_id.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    stem = re.sub(r"[^a-z0-9]+", "-", plain).strip("-")
    stem = stem[: _MAX_CONTAINER - _HASH_CHARS - 1].rstrip("-")
    return f"{stem}-{digest}"


def log_blob(task_id: str, stream: str) -> str:
    """Blob name (inside the container) of a task's ``stdout`` or ``stderr`` log."""
    return f"{task_id}/{LOG_KIND}/{stream}.txt"


def output_prefix(task_id: str) -> str:
    """Blob folder (inside the container) of a task's output files."""
    return f"{task_id}/{OUTPUT_KIND}"


class _Tee:
    """Duplicate everything written to file descriptor ``fd`` into a temporary file.

    The copying is done by a helper process of its own session, not a thread:
    when the task ends hard (``os._exit``, a signal) a thread dies with it and
    the last lines still in the pipe — the ones that say why — would be lost,
    from the node's file too. The helper drains the pipe to its end whatever
    happens to the task.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.original = os.dup(fd)
        handle, self.copy_path = tempfile.mkstemp(prefix=f"cloudexec-tee-{fd}-")
        os.close(handle)
        read_end, write_end = os.pipe()
        try:
            self.proc: subprocess.Popen[bytes] | _ForkedPump = (
                _ForkedPump(read_end, self.original, self.copy_path, write_end)
                if _can_fork()
                else subprocess.Popen(
                    [sys.executable, "-c", f"from {__name__} import _pump; _pump()",
                     str(read_end), str(self.original), self.copy_path],
                    stdin=subprocess.DEVNULL,
                    # Not the task's fds 1 and 2: the stderr helper would hold the stdout
                    # pipe open, and the stdout tee would wait its whole drain time for EOF.
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(read_end, self.original),
                    start_new_session=True,  # a kill of the task's process group must not lose the tail
                )
            )
        finally:
            os.close(read_end)
        os.dup2(write_end, fd)
        os.close(write_end)

    def stop(self) -> bytes:
        """Put the original descriptor back and return everything captured so far."""
        # dup2 closes the pipe's write end held at ``fd``; the helper sees EOF
        # once no subprocess of the task holds a copy of it.
        os.dup2(self.original, self.fd)
        os.close(self.original)
        try:
            self.proc.wait(_DRAIN_S)
        except subprocess.TimeoutExpired:
            pass  # a subprocess of the task still holds the pipe: keep what arrived
        try:
            with open(self.copy_path, "rb") as fh:
                return fh.read()
        finally:
            if self.proc.poll() is not None:
                os.unlink(self.copy_path)


def _can_fork() -> bool:
    """Whether the tee helper can be a fork of this process (POSIX, no other Python thread)."""
    import threading

    return hasattr(os, "fork") and threading.active_count() == 1


class _ForkedPump:
    """The tee helper as a fork of the task (no interpreter start-up): the part of ``Popen`` `_Tee` uses.

    Forked while the task is still single-threaded (the runner starts the
    capture before anything else), so the child inherits no lock held by
    another thread; it only copies bytes and leaves with ``os._exit``.
    """

    def __init__(self, read_end: int, original: int, copy_path: str, write_end: int) -> None:
        self.returncode: int | None = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                os.setsid()  # a kill of the task's process group must not lose the tail
                os.close(write_end)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)  # nor hold the task's other pipe open
                keep = {read_end, original}
                for fd in range(3, max(keep) + 1):
                    if fd not in keep:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                os.closerange(max(keep) + 1, 1 << 16)
                _copy(read_end, original, copy_path)
            except BaseException:  # noqa: BLE001 - nowhere to report it
                code = 1
            os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        """The helper's exit status once it ended, else None (reaps it)."""
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0
            else:
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the helper; raise ``subprocess.TimeoutExpired``."""
        import time

        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("tee helper", timeout)
            time.sleep(0.002)
        return code


def _pump() -> None:
    """Body of the tee helper process: ``<read fd> <node fd> <copy path>`` on its command line."""
    _copy(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


def _copy(read_end: int, original: int, copy_path: str) -> None:
    """Copy the pipe at ``read_end`` to ``original`` and append it to ``copy_path``, until EOF."""
    with open(copy_path, "ab", buffering=0) as copy:
        while True:
            try:
                chunk = os.read(read_end, _CHUNK)
            except OSError:
                return
            if not chunk:
                return
            view = memoryview(chunk)
            while view:
                try:
                    written = os.write(original, view)
                except OSError:
                    break  # the node's file is gone; still keep our copy
                view = view[written:]
            copy.write(chunk)


class TaskOutputCapture:
    """Inside an Azure task: capture stdout/stderr, then upload them and ./JobOutput/.

    Use `start` at the beginning of the runner and `finish` at its end. It
    never raises: a failed upload is reported on the task's stderr (which the
    node keeps) and does not change the task's exit code.

    Args:
        url: fsspec URL of the job's conventions container (``az://job-<id>``).
        task_id: the Azure task id (``AZ_BATCH_TASK_ID``).
        storage_options: fsspec options for ``url``.
    """

    def __init__(self, url: str, task_id: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.task_id = task_id
        self.storage_options = storage_options
        # The job may chdir; ./JobOutput/ means the task's working directory.
        self.output_dir = os.path.join(os.getcwd(), OUTPUT_DIR)
        self._tees: dict[str, _Tee] = {}

    @classmethod
    def start(cls) -> TaskOutputCapture | None:
        """Start capturing if the provider asked for it (``CLOUDEXEC_TASK_OUTPUT``); else ``None``."""
        url = os.environ.get(ENV_VAR)
        if not url:
            return None
        task_id = os.environ.get("AZ_BATCH_TASK_ID") or "task"
        raw = os.environ.get("CLOUDEXEC_STORAGE_OPTIONS")
        capture = cls(url, task_id, json.loads(raw) if raw else None)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for stream, fd in (("stdout", 1), ("stderr", 2)):
                capture._tees[stream] = _Tee(fd)
        except OSError as exc:
            sys.stderr.write(f"cloudexec: cannot capture the task's output for {url}: {exc}\n")
        return capture

    def finish(self) -> None:
        """Stop capturing and upload the logs and the output files."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        logs = {stream: tee.stop() for stream, tee in self._tees.items()}
        self._tees.clear()
        try:
            from cloudexec._storage import open_store

            store = open_store(self.url, self.storage_options)
            for stream, data in logs.items():
                store.write(log_blob(self.task_id, stream), data)
            for rel, path in _output_files(self.output_dir):
                with open(path, "rb") as fh:
                    store.write(f"{output_prefix(self.task_id)}/{rel}", fh.read())
        except Exception as exc:  # noqa: BLE001 - the job's own outcome must stand
            sys.stderr.write(
                f"cloudexec: could not upload task {self.task_id}'s logs and ./{OUTPUT_DIR}/ to {self.url}: "
                f"{type(exc).__name__}: {exc}. They stay in the task's directory on the node.\n"
            )
            sys.stderr.flush()


def tune_blob_retries(fs: Any, attempts: int) -> None:
    """Give adlfs's blob client ``attempts`` tries with a short first backoff.

    adlfs takes no retry options; azure-storage-blob's default (3 retries, the
    first after 15 s, then 15 s + 3**n) would stall every read behind one
    throttled request, in the client and in every task alike. The policy
    object is the service client's own, shared by the container and blob
    clients adlfs derives from it.
    """
    policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
    if policy is None:
        return
    for name in ("total_retries", "connect_retries", "read_retries", "status_retries"):
        if hasattr(policy, name):
            setattr(policy, name, attempts - 1)
    if hasattr(policy, "initial_backoff"):
        policy.initial_backoff = 0.5
        policy.increment_base = 2


def setup_task_storage(store: Any) -> None:
    """The runner's ``--storage-setup`` hook inside a task: `tune_blob_retries` on the job's storage.

    A local folder (no fsspec filesystem) is left as it is.
    """
    fs = getattr(store, "fs", None)
    if fs is None:
        return
    try:
        attempts = max(1, int(os.environ.get(ATTEMPTS_ENV_VAR) or _DEFAULT_ATTEMPTS))
    except ValueError:
        attempts = _DEFAULT_ATTEMPTS
    tune_blob_retries(fs, attempts)


def _output_files(folder: str) -> list[tuple[str, str]]:
    """``(relative name with '/', path)`` of every file below ``folder``, sorted."""
    found: list[tuple[str, str]] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            found.append((rel, path))
    return sorted(found)
