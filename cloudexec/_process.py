"""Local processes for jobs: start, watch, measure and kill them — written once.

The local provider and both emulators run each job (or array child, or Azure
task) as a local process. They all need the same few things, and this module
is the only place that does them::

    start(argv, env=job_environment(...))   python -> this interpreter; own session,
        |                                   so the job's whole tree is one group
        v
    Process ---- exited()        has the leader ended? (not reaped: its pid still
        |                        names the group, so stragglers can be killed)
        |------- rss_bytes()     memory of the whole process tree (psutil)
        |------- terminate(grace_s) / escalate(now) / kill()
        |                        SIGTERM the group, SIGKILL it once the grace ends
        v
    reap() -> exit code          kills what is left of the group, waits, and
                                 reports death by signal N as 128 + N (as a
                                 shell and a container runtime do)

    Watcher                      one selector for many processes (pidfds) and
                                 pipes, so 1,000 running children cost one thread

    start(..., die_with_owner=True)     Linux: the job gets SIGKILL if the thread
                                        that started it dies (prctl PDEATHSIG), so
                                        a SIGKILLed emulator leaves no job behind
    remove_when_owner_dies(path)        a `sh` sidecar deletes a scratch folder
                                        once this process is gone, however it died

    running(pid), process_identity(pid), identity_alive([pid, start time])
                                 is a process (named in a state file, perhaps by
                                 another process) still the one that runs?

The environment rule (:func:`job_environment`): a job gets a clean environment
— the :data:`PASSTHROUGH_ENV` names only, as a container would — plus
``PYTHONPATH`` reaching this cloudexec and, optionally, the caller's import
path (as if the code under test were baked into the job image).

POSIX only (process groups, signals); Windows callers get a clear error from
the providers before anything here runs.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

__all__ = [
    "PASSTHROUGH_ENV",
    "PopenProcess",
    "Process",
    "Watcher",
    "exit_code_of",
    "identity_alive",
    "job_environment",
    "kill_group",
    "pid_alive",
    "process_identity",
    "python_path",
    "running",
    "start",
    "tree_rss_bytes",
]

# What a job inherits from the process that starts it. Clouds start containers
# with a clean environment; these keep a local process usable (locale, temp
# folders, the user's home for tool caches) without leaking credentials.
PASSTHROUGH_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "USER",
    "LOGNAME",
    "SYSTEMROOT",
    "SYSTEMDRIVE",
    "WINDIR",
    "COMSPEC",
    "PATHEXT",
)
_PYTHON_NAMES = frozenset({"python", "python3"})
# Where pidfds are missing (macOS, Linux < 5.3) running processes are polled.
_POLL_INTERVAL_S = 0.01


def python_path(*, inherit_sys_path: bool = True) -> str:
    """Return the ``PYTHONPATH`` a job gets: this cloudexec, ``$PYTHONPATH``, then ``sys.path``.

    Interpreter and site directories are left out (the job's interpreter adds
    its own), and duplicates are dropped.

    Args:
        inherit_sys_path: Add this process's ``sys.path`` (the code under test).
    """
    skip = {os.path.normcase(os.path.abspath(p)) for p in sysconfig.get_paths().values()}
    entries = [str(Path(__file__).resolve().parents[1])]
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if inherit_sys_path:
        entries += [p for p in sys.path if p and os.path.isdir(p)]
    seen: set[str] = set()
    kept: list[str] = []
    for entry in entries:
        key = os.path.normcase(os.path.abspath(entry))
        if key in seen or key in skip:
            continue
        seen.add(key)
        kept.append(entry)
    return os.pathsep.join(kept)


def job_environment(
    extra: Mapping[str, str] | None = None,
    *,
    inherit_sys_path: bool = True,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return a job's environment: passthrough names, the PYTHONPATH rule, then ``extra``.

    Args:
        extra: Variables set on top (the job's own environment wins).
        inherit_sys_path: See :func:`python_path`.
        base: Where passthrough names are read from (default ``os.environ``).
    """
    source = os.environ if base is None else base
    env = {name: source[name] for name in PASSTHROUGH_ENV if name in source}
    env["PYTHONPATH"] = python_path(inherit_sys_path=inherit_sys_path)
    env.update(extra or {})
    return env


def exit_code_of(returncode: int) -> int:
    """Map ``Popen.returncode`` to what a shell or container runtime reports (-N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``pid`` (or to ``pid`` if it leads none)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def pid_alive(pid: int | None) -> bool:
    """Tell whether a process with this pid exists (a zombie counts as alive)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(pid: int | None) -> bool:
    """Whether process ``pid`` runs: unlike `pid_alive`, a zombie (ended, not yet reaped) does not."""
    if not pid:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def process_identity(pid: int) -> list[float]:
    """``[pid, start time]``: names one process even after its pid is reused (e.g. in a state file)."""
    try:
        return [pid, psutil.Process(pid).create_time()]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return [pid, 0.0]


def identity_alive(identity: Sequence[float]) -> bool:
    """Whether the process `process_identity` named still runs (and is not a zombie)."""
    pid, started = int(identity[0]), float(identity[1])
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not started or abs(proc.create_time() - started) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False  # gone, or another user's process by that pid: not the one named


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 if it is gone).

    A page shared by forked processes counts once per process, so this can
    overestimate forked workers; a container's cgroup would count it once.
    """
    fast = _linux_tree_rss_bytes(pid)
    if fast is not None:
        return fast
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            total += proc.memory_info().rss
    return total


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _linux_tree_rss_bytes(pid: int) -> int | None:
    """:func:`tree_rss_bytes` from ``/proc/<pid>/task/<tid>/children``; None where that is missing.

    psutil finds children by reading the status of every process on the
    machine (~10 ms); an emulator samples each running job every 20 ms, so it
    walks the tree from the job down instead, reading a few small files.
    """
    if not sys.platform.startswith("linux"):
        return None
    pids = [pid]
    total = 0
    for current in pids:
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as fh:
                    pids.extend(int(child) for child in fh.read().split())
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{current}"):
                    continue
                return None  # a kernel without CONFIG_PROC_CHILDREN
            except OSError:
                continue
        try:
            with open(f"/proc/{current}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


class Process:
    """A started job process, leader of its own session and process group.

    Subclasses say how the process is watched, signalled and reaped: a
    :class:`PopenProcess` is this process's child; a
    `cloudexec._forkserver.ForkedProcess` is a fork server's.

    Attributes:
        pid: Its pid, which is also the process group id.
        kill_deadline: When :meth:`escalate` turns a :meth:`terminate` into SIGKILL.
        killed_hard: Whether SIGKILL was sent.
    """

    __slots__ = ("pid", "kill_deadline", "killed_hard", "terminated")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.kill_deadline: float | None = None
        self.killed_hard = False
        self.terminated = False

    def exited(self) -> bool:
        """Tell whether the leader ended (its group may be killed until it is reaped)."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        raise NotImplementedError

    def wait_code(self, timeout: float | None) -> int:
        """Wait for the leader and reap it; return its exit code (128 + N for signal N).

        Raises:
            subprocess.TimeoutExpired: it did not end within ``timeout`` seconds.
        """
        raise NotImplementedError

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree (see :func:`tree_rss_bytes`)."""
        return tree_rss_bytes(self.pid)

    def terminate(self, grace_s: float, now: float | None = None) -> None:
        """Ask the group to stop (SIGTERM); :meth:`escalate` kills it after ``grace_s``."""
        if self.terminated or self.killed_hard:
            return
        self.terminated = True
        self.signal(signal.SIGTERM)
        self.kill_deadline = (time.monotonic() if now is None else now) + grace_s

    def escalate(self, now: float | None = None) -> bool:
        """SIGKILL the group if a :meth:`terminate` grace period is over; return whether it did."""
        if self.killed_hard or self.kill_deadline is None:
            return False
        if (time.monotonic() if now is None else now) < self.kill_deadline:
            return False
        self.kill()
        return True

    def kill(self) -> None:
        """SIGKILL the whole group now."""
        self.killed_hard = True
        self.kill_deadline = None
        self.signal(signal.SIGKILL)

    def reap(self, timeout: float | None = None) -> int:
        """Kill what is left of the group, wait for the leader, return its exit code (128 + N for signal N).

        Like a container's end, the end of a job kills everything it started.
        """
        try:
            return self.wait_code(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait_code(None)

    def stop_now(self, timeout: float = 5.0) -> int:
        """SIGKILL the group and reap it (used when the owner shuts down)."""
        self.kill()
        return self.reap(timeout)


class PopenProcess(Process):
    """A job process this process started (``subprocess.Popen``).

    Attributes:
        popen: The ``subprocess.Popen`` object.
    """

    __slots__ = ("popen",)

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        super().__init__(popen.pid)
        self.popen = popen

    def exited(self) -> bool:
        """Tell whether the leader ended, without reaping it (its pid keeps naming the group)."""
        waitid = getattr(os, "waitid", None)
        if self.popen.returncode is not None or waitid is None:
            return self.popen.poll() is not None
        try:
            return waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return self.popen.poll() is not None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        if self.popen.returncode is None:
            kill_group(self.pid, sig)

    def wait_code(self, timeout: float | None) -> int:
        """Kill what the leader left in its group once it ended, reap it, return its exit code."""
        if self.popen.returncode is None and self.exited():
            # The leader is a zombie, so its pid still names the group.
            kill_group(self.pid, signal.SIGKILL)
        return exit_code_of(self.popen.wait(timeout))


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    pass_fds: Iterable[int] = (),
    die_with_owner: bool = False,
) -> Process:
    """Start a job process in its own session; ``python``/``python3`` mean this interpreter.

    Args:
        argv: The command line.
        env: Its whole environment.
        cwd: Its working directory.
        stdout: Where its stdout goes.
        stderr: Where its stderr goes.
        stdin: Where its stdin comes from.
        pass_fds: File descriptors it inherits.
        die_with_owner: On Linux, SIGKILL the process when the thread that started
            it ends (``prctl(PR_SET_PDEATHSIG)``): for emulators, whose jobs must
            not outlive them even when they are SIGKILLed. Only for processes
            started from a thread that lives as long as they should. Elsewhere
            ignored.

    Raises:
        OSError: The program cannot be started (FileNotFoundError if missing).
        ValueError: ``argv`` is empty.
    """
    args = list(argv)
    if not args:
        raise ValueError("cannot start a process from an empty command line")
    if args[0] in _PYTHON_NAMES:
        # The job's "python" is the interpreter running the caller, so jobs see
        # the same installed packages as the test or client.
        args[0] = sys.executable
    popen = subprocess.Popen(
        args,
        env=dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        start_new_session=True,  # own process group, so a kill reaches the whole tree
        preexec_fn=owner_death_signal() if die_with_owner else None,
    )
    return PopenProcess(popen)


def owner_death_signal() -> Any:
    """A ``preexec_fn`` making the child get SIGKILL when its starting thread dies (Linux), or None.

    Used by every place that starts an emulator's job process with ``Popen``.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    owner = os.getpid()

    def set_death_signal() -> None:
        # Runs in the child between fork and exec: only the already-resolved libc
        # call and os calls, nothing that imports or allocates much (CPython's
        # warning about preexec_fn and threads is about exactly that).
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != owner:
            # The owner died between fork and prctl: the signal will never come.
            os._exit(137)

    return set_death_signal


_PR_SET_PDEATHSIG = 1

# Waits on its stdin: the owner writes "done" on a normal close; EOF without it
# means the owner died (its end of the pipe closes however it was killed), and
# then the process groups it named are killed too. The folder goes either way.
_REMOVER_SCRIPT = """
read -r verdict
folder=$1; shift
if [ "$verdict" != done ]; then
    for group in "$@"; do kill -9 "-$group" 2>/dev/null; done
fi
exec rm -rf -- "$folder"
"""


class FolderRemover:
    """Deletes a folder once its owner process is gone; see :func:`remove_when_owner_dies`."""

    def __init__(self, path: str | os.PathLike[str], kill_groups: Iterable[int] = ()) -> None:
        self.path = os.fspath(path)
        groups = [str(int(g)) for g in kill_groups]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["/bin/sh", "-c", _REMOVER_SCRIPT, "cloudexec-remover", self.path, *groups],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C or kill aimed at the owner's group must not
            # stop the one process that cleans up after it.
            start_new_session=True,
        )

    def close(self, timeout: float = 5.0) -> None:
        """Delete the folder now (through the sidecar) and wait for it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            # "done": the owner stopped its processes itself; their ids may be reused.
            with contextlib.suppress(OSError):
                proc.stdin.write(b"done\n")
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def remove_when_owner_dies(path: str | os.PathLike[str], kill_groups: Iterable[int] = ()) -> FolderRemover:
    """Make sure ``path`` is deleted when this process ends, even by SIGKILL.

    A ``/bin/sh`` sidecar holds the read end of a pipe whose write end only this
    process has; when this process dies the pipe closes and the sidecar deletes
    the folder (after SIGKILLing ``kill_groups``). Call ``close()`` on a normal
    shutdown.

    Args:
        path: The folder to delete.
        kill_groups: Process groups (e.g. a server started in its own session)
            to SIGKILL if the owner dies without closing the handle.

    Returns:
        The handle whose ``close()`` deletes the folder now.
    """
    return FolderRemover(path, kill_groups)


class Watcher:
    """Waits for many processes and pipes with one selector (pidfds on Linux).

    Nothing here starts a thread: the owner calls :meth:`wait` from its own
    loop and handles the events. :meth:`wake` (any thread) ends a :meth:`wait`.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._use_pidfd = hasattr(os, "pidfd_open")
        self._polled: dict[Process, Any] = {}  # processes without a pidfd
        self._pidfds: dict[Process, int] = {}

    def add_process(self, proc: Process, data: Any) -> None:
        """Report ``("exit", data, proc)`` from every :meth:`wait` once ``proc`` ended, until removed.

        The process is not reaped: the owner calls :meth:`remove_process`, then
        :meth:`Process.reap`.
        """
        if self._use_pidfd:
            try:
                fd = os.pidfd_open(proc.pid)
            except OSError:
                self._use_pidfd = False
            else:
                self._pidfds[proc] = fd
                self._selector.register(fd, selectors.EVENT_READ, ("exit", proc, data))
                return
        self._polled[proc] = data

    def remove_process(self, proc: Process) -> None:
        """Stop watching ``proc``."""
        self._polled.pop(proc, None)
        fd = self._pidfds.pop(proc, None)
        if fd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)
            os.close(fd)

    def add_reader(self, fd: int, data: Any) -> None:
        """Report ``("read", data, bytes)`` for input on ``fd``; ``b""`` means EOF (then unwatched)."""
        self._selector.register(fd, selectors.EVENT_READ, ("read", fd, data))

    def wake(self) -> None:
        """End a :meth:`wait` in progress (or the next one) early; safe from any thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def wait(self, timeout: float | None) -> list[tuple[str, Any, Any]]:
        """Wait up to ``timeout`` seconds (None: until something happens); return the events.

        Events are ``("exit", data, process)`` and ``("read", data, chunk)``.
        """
        if self._polled:
            timeout = _POLL_INTERVAL_S if timeout is None else min(timeout, _POLL_INTERVAL_S)
        events: list[tuple[str, Any, Any]] = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
                continue
            kind, target, data = key.data
            if kind == "exit":
                events.append(("exit", data, target))
            else:
                try:
                    chunk = os.read(target, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(target)
                events.append(("read", data, chunk))
        for proc, data in list(self._polled.items()):
            if proc.exited():
                events.append(("exit", data, proc))
        return events

    def close(self) -> None:
        """Release the selector, the wake pipe and every pidfd."""
        for proc in list(self._pidfds):
            self.remove_process(proc)
        self._polled.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
