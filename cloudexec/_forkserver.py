"""A fork server: one warm interpreter that forks one process per job.

Starting ``python -m cloudexec.runner`` costs about half a second, nearly all
of it interpreter start-up and imports (the storage stack: s3fs and botocore,
or adlfs and the Azure SDK). An emulator running a 1,000-child array paid that
1,000 times. The fork server pays it once and still gives every job a process
of its own, so isolation, memory limits, crashes, signals and exit codes
behave as before::

    emulator (threads)                          fork server (one thread, exec'd fresh)
    ------------------                          --------------------------------------
    ForkServer.start_process(argv, env, ...)    imported: cloudexec.runner + `preload`
        |  request + stdio fds (SCM_RIGHTS) -->     fork() -> child:
        |                                               setsid (own process group)
        |  <-- {"id", "pid"} ------------------          PDEATHSIG: dies with the server
        v                                               signals back to their defaults
    ForkedProcess  (same interface as                   environment, cwd, stdio, sys.path
        _process.Process)                               run `-m module` / `-c code`
        |-- rss_bytes()   psutil tree of pid             os._exit(code)
        |-- signal(sig) --- {"kill"} ------------>  killpg, only while not reaped, so a
        |                                           reused pid is never hit
        |  <-- {"id", "exit"} ----------------  SIGCHLD: the leader ended -> killpg
        v                                           (what it left behind), reap, report
    exit code (128 + N for signal N)                128 + N for signal N

Why a separate, freshly exec'd process: forking a multi-threaded process (an
emulator runs HTTP, scheduler and node threads) copies locks that other
threads held, so the server is single-threaded by construction; it imports
modules but creates no storage client or event loop, so no child inherits an
instance cache or a loop from it (each child builds its own, as a fresh
interpreter would).

If the emulator dies, however (even SIGKILL), the server sees its socket close
and kills every child's process group before it exits; a server that is
itself SIGKILLed takes its children with it (their PDEATHSIG). Only command
lines of the form ``python -m <module> ...`` (``module`` imported by the
server) and ``python -c <code> ...`` run here; anything else is started as a
fresh process by :func:`cloudexec._process.start`. Setting
``CLOUDEXEC_FORKSERVER=0`` turns the server off (every job a fresh
interpreter, as before), e.g. to measure the difference.

Differences from a fresh interpreter, by design: interpreter options read at
start-up (``PYTHON*`` variables other than ``PYTHONPATH``, ``-X`` options,
the hash seed) are the server's; modules the server imported stay imported.

Linux only (it relies on ``prctl`` and ``waitid``); elsewhere :func:`enabled`
is false and jobs start as fresh processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from cloudexec import _process

__all__ = ["ENV_SWITCH", "ForkServer", "ForkedProcess", "enabled", "start"]

#: Set to ``0`` to start every job as a fresh interpreter (the old way).
ENV_SWITCH = "CLOUDEXEC_FORKSERVER"
_HEADER = struct.Struct("!II")  # payload length, number of file descriptors
_PYTHON_NAMES = frozenset({"python", "python3"})
# stdio slots in a request: what each of fds 0, 1, 2 becomes in the child.
_NULL, _AS_STDOUT = "null", "stdout"


def enabled() -> bool:
    """Tell whether jobs may run in a fork server here (Linux, not switched off)."""
    return sys.platform.startswith("linux") and os.environ.get(ENV_SWITCH, "1") != "0"


def start(
    server: ForkServer | None,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
) -> _process.Process:
    """Start an emulated job's process: forked by ``server`` if it can run ``argv``, else a fresh one.

    A fresh process gets ``die_with_owner`` (see `cloudexec._process.start`),
    so call this from the emulator thread that lives as long as its jobs.

    Raises:
        OSError: the process cannot be started (FileNotFoundError: no such
            program or working directory).
    """
    if server is not None and server.can_run(argv):
        return server.start_process(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
    return _process.start(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, die_with_owner=True)


class ForkedProcess(_process.Process):
    """A job process forked by a :class:`ForkServer`; the interface of `cloudexec._process.Process`.

    The server is the process's parent: it reaps it and reports its exit
    code, and it sends the signals (so none reaches a reused pid).
    """

    __slots__ = ("server", "request_id", "code")

    def __init__(self, server: ForkServer, request_id: int, pid: int) -> None:
        super().__init__(pid)
        self.server = server
        self.request_id = request_id
        self.code: int | None = None

    def exited(self) -> bool:
        """Tell whether the server reported the process's end (reading what it sent so far)."""
        if self.code is None:
            self.server.poll()
        return self.code is not None

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree (0 once it ended)."""
        return 0 if self.code is not None else _process.tree_rss_bytes(self.pid)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (through the server)."""
        if self.code is None:
            self.server.send_signal(self, sig)

    def wait_code(self, timeout: float | None) -> int:
        """Wait for the exit code (128 + N for signal N); raise ``subprocess.TimeoutExpired``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.code is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            self.server.poll(left)
        return self.code


class ServerDied(OSError):
    """The fork server is gone; the jobs it ran are gone with it."""


class ForkServer:
    """Client side of one fork server; started on first use, thread-safe.

    Args:
        env: The server's environment (its ``PYTHONPATH`` decides where it
            imports from; each job brings its own environment).
        preload: Modules to import in the server besides ``cloudexec.runner``
            (a module that fails to import is left to the job).
        warmups: ``module:callable`` names called once in the server after the
            imports, e.g. to parse data files every job would parse again. One
            must not start a thread, open a connection or an event loop; one
            that fails is skipped.
        name: Shown in errors.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        preload: Sequence[str] = (),
        *,
        warmups: Sequence[str] = (),
        name: str = "emulator",
    ) -> None:
        self._env = dict(env)
        # The runner's own lazy imports (its command line, fsspec's URL parsing) too.
        self._preload = ["cloudexec.runner", "argparse", "fsspec.implementations.chained", *preload]
        self._warmups = ["cloudexec.runner:warm_up", *warmups]
        self._name = name
        self._lock = threading.RLock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self._live: dict[int, ForkedProcess] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        self._early_exits: dict[int, int] = {}  # ended before start_process saw its pid
        self._modules: frozenset[str] = frozenset()
        self.started_count = 0
        """How many processes this server forked (tests count them)."""

    @property
    def pid(self) -> int | None:
        """The server's pid, once started."""
        return self._popen.pid if self._popen is not None else None

    def fileno(self) -> int | None:
        """A descriptor that turns readable when a process ended (for a selector), once started."""
        return self._sock.fileno() if self._sock is not None else None

    def can_run(self, argv: Sequence[str]) -> bool:
        """Tell whether ``argv`` is ``python -m <preloaded module> ...`` or ``python -c <code> ...``."""
        if len(argv) < 3 or os.path.basename(argv[0]) not in _PYTHON_NAMES and argv[0] != sys.executable:
            return False
        return argv[1] == "-c" or (argv[1] == "-m" and argv[2] in self._preload)

    def start_process(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> ForkedProcess:
        """Fork a process running ``argv`` (see :meth:`can_run`) in its own session.

        ``stdout``/``stderr`` take what :func:`cloudexec._process.start` takes
        (a file, a descriptor, ``DEVNULL``, and ``STDOUT`` for stderr); stdin
        is ``/dev/null``.

        Raises:
            FileNotFoundError: ``cwd`` does not exist.
            OSError: the server cannot be started or died.
            ValueError: :meth:`can_run` is false for ``argv``.
        """
        if not self.can_run(argv):
            raise ValueError(f"the fork server runs only 'python -m <module>' or 'python -c <code>', not {argv!r}")
        fds: list[int] = []
        stdio: list[Any] = [_NULL]
        for stream in (stdout, stderr):
            if stream is None or stream == subprocess.DEVNULL:
                stdio.append(_NULL)
            elif stream == subprocess.STDOUT:
                stdio.append(_AS_STDOUT)
            else:
                fds.append(stream if isinstance(stream, int) else stream.fileno())
                stdio.append(len(fds) - 1)
        with self._lock:
            sock = self._ensure_started()
            self._next_id += 1
            request_id = self._next_id
            payload = json.dumps(
                {
                    "id": request_id,
                    "argv": list(argv[1:]),
                    "env": dict(env),
                    "cwd": os.fspath(cwd) if cwd is not None else None,
                    "stdio": stdio,
                }
            ).encode()
            try:
                if fds:
                    socket.send_fds(sock, [_HEADER.pack(len(payload), len(fds))], fds)
                    sock.sendall(payload)
                else:
                    sock.sendall(_HEADER.pack(len(payload), 0) + payload)
            except OSError as exc:
                raise self._died(exc) from exc
            while request_id not in self._replies:
                if self._sock is None:
                    raise ServerDied(f"the {self._name} fork server died before it started the job")
                self.poll(None)
            reply = self._replies.pop(request_id)
            if "error" in reply:
                kind = FileNotFoundError if reply.get("kind") == "FileNotFoundError" else OSError
                raise kind(reply["error"])
            proc = ForkedProcess(self, request_id, int(reply["pid"]))
            self._live[request_id] = proc
            if request_id in self._early_exits:
                proc.code = self._early_exits.pop(request_id)
                self._live.pop(request_id, None)
            self.started_count += 1
            return proc

    def send_signal(self, proc: ForkedProcess, sig: int) -> None:
        """Ask the server to signal ``proc``'s process group (nothing if it already ended)."""
        with self._lock:
            if proc.code is not None or self._sock is None:
                return
            message = json.dumps({"kill": proc.request_id, "sig": int(sig)}).encode()
            with contextlib.suppress(OSError):
                self._sock.sendall(_HEADER.pack(len(message), 0) + message)

    def poll(self, timeout: float | None = 0.0) -> None:
        """Read what the server reported, waiting up to ``timeout`` s (None: until something comes)."""
        with self._lock:
            sock = self._sock
            if sock is None:
                return
            if b"\n" not in self._buffer:
                ready, _, _ = _select([sock], timeout)
                if ready:
                    try:
                        chunk = sock.recv(1 << 16)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        self._lost()
                        return
                    self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                request_id = int(message["id"])
                if "exit" not in message:
                    self._replies[request_id] = message
                elif (proc := self._live.pop(request_id, None)) is not None:
                    proc.code = int(message["exit"])
                else:
                    self._early_exits[request_id] = int(message["exit"])

    def close(self, timeout: float = 10.0) -> None:
        """Stop the server: it SIGKILLs every process group it started, reaps them and exits."""
        with self._lock:
            sock, popen = self._sock, self._popen
            self._sock = None
            if sock is not None:
                sock.close()
            if popen is not None:
                try:
                    popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            for proc in self._live.values():
                proc.code = 128 + signal.SIGKILL
            self._live.clear()

    # -- internals (lock held)

    def _ensure_started(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if self._popen is not None:
            # The last server died (someone killed it): its jobs ended; start another.
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._popen.kill()
                self._popen.wait(5)
            self._modules = frozenset()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._popen = subprocess.Popen(
                [
                    sys.executable, "-m", "cloudexec._forkserver", str(theirs.fileno()),
                    *self._preload, *(f"--warmup={hook}" for hook in self._warmups),
                ],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                # Its own session: a Ctrl-C aimed at the emulator's terminal group must
                # reach the emulator, which then closes the server, not the server first.
                start_new_session=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        # The server says which modules it imported once it is ready.
        while 0 not in self._replies:
            if self._sock is None:
                raise ServerDied(f"the {self._name} fork server did not start")
            self.poll(None)
        self._modules = frozenset(self._replies.pop(0)["modules"])
        self._preload = [m for m in self._preload if m in self._modules]
        return ours

    def _lost(self) -> None:
        """The server closed its end: every job it ran ended with it (SIGKILL)."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        for proc in self._live.values():
            proc.code = 128 + signal.SIGKILL
        self._live.clear()

    def _died(self, exc: BaseException) -> ServerDied:
        self._lost()
        return ServerDied(f"the {self._name} fork server is gone ({exc}); its jobs ended with it")


def _select(socks: list[socket.socket], timeout: float | None) -> tuple[list[Any], list[Any], list[Any]]:
    return select.select(socks, [], [], timeout)


# ---------------------------------------------------------------- server side


def _serve(sock: socket.socket, preload: Sequence[str], warmups: Sequence[str]) -> None:
    """The server's loop: fork on request, signal on request, reap and report; ends at EOF."""
    import importlib

    modules = []
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job will report it when it imports it
            continue
        modules.append(name)
    for hook in warmups:
        module, _, attr = hook.partition(":")
        try:
            getattr(importlib.import_module(module), attr)()
        except Exception as exc:  # noqa: BLE001 - jobs only lose the head start
            sys.stderr.write(f"cloudexec fork server: warm-up {hook!r} failed: {type(exc).__name__}: {exc}\n")
    if threading.active_count() != 1:
        # Forking with other threads alive could copy a held lock into a child.
        raise SystemExit(f"fork server: an import started a thread ({threading.enumerate()}); refusing to fork")
    # What the server built is every child's, copy-on-write: frozen, it is left out of the
    # children's garbage collections, which would otherwise visit (and so copy) every page of it.
    gc.collect()
    gc.freeze()
    set_death_signal = _death_signal_setter()
    children: dict[int, int] = {}  # pid -> request id
    by_id: dict[int, int] = {}  # request id -> pid
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the emulator ends us by closing the socket
    server_path = list(sys.path)
    server_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "sock")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    out = sock.makefile("wb", buffering=0)

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")

    send({"id": 0, "modules": modules})
    pending = b""
    received_fds: list[int] = []
    open_ = True
    while open_:
        for key, _ in selector.select():
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 64)
            except OSError:  # reset by a client that closed with our reports unread
                data, fds = b"", []
            received_fds += fds
            if not data:
                open_ = False
                break
            pending += data
            while len(pending) >= _HEADER.size:
                length, nfds = _HEADER.unpack_from(pending)
                if len(pending) < _HEADER.size + length:
                    break
                request = json.loads(pending[_HEADER.size : _HEADER.size + length])
                pending = pending[_HEADER.size + length :]
                mine, received_fds = received_fds[:nfds], received_fds[nfds:]
                if "kill" in request:
                    pid = by_id.get(int(request["kill"]))
                    if pid is not None:
                        _process.kill_group(pid, int(request["sig"]))
                    continue
                try:
                    if request["cwd"] is not None and not os.path.isdir(request["cwd"]):
                        raise FileNotFoundError(f"no such working directory: {request['cwd']!r}")
                    ready_r, ready_w = os.pipe()
                    pid = os.fork()
                except OSError as exc:
                    send({"id": request["id"], "error": str(exc), "kind": type(exc).__name__})
                else:
                    if pid == 0:
                        os.close(ready_r)
                        _child(request, mine, ready_w, set_death_signal, server_path, server_pythonpath)
                    os.close(ready_w)
                    # Reply once the child leads its own group and dies with us, so the
                    # caller's first kill already reaches the whole group.
                    with contextlib.suppress(OSError):
                        os.read(ready_r, 1)
                    os.close(ready_r)
                    children[pid] = request["id"]
                    by_id[request["id"]] = pid
                    send({"id": request["id"], "pid": pid})
                finally:
                    for fd in mine:
                        os.close(fd)
        _reap(children, by_id, send)
    # The emulator is gone or done: nothing it started may outlive it.
    for pid in list(children):
        _process.kill_group(pid, signal.SIGKILL)
    while children:
        pid, _ = os.waitpid(-1, 0)
        children.pop(pid, None)


def _reap(children: dict[int, int], by_id: dict[int, int], send: Any) -> None:
    """Report every child that ended: kill what its group left behind, then reap it."""
    while children:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        pid = info.si_pid
        # The leader is a zombie, so its pid still names the group: like a
        # container's end, the end of a job kills everything it started.
        _process.kill_group(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        request_id = children.pop(pid, None)
        if request_id is None:
            continue
        by_id.pop(request_id, None)
        with contextlib.suppress(OSError):
            send({"id": request_id, "exit": _process.exit_code_of(os.waitstatus_to_exitcode(status))})


def _death_signal_setter() -> Any:
    """Return a function making this (forked) process get SIGKILL when the server dies."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    server = os.getpid()

    def set_death_signal() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != server:
            os._exit(137)  # the server died before prctl: the signal will never come

    return set_death_signal


def _child(
    request: dict[str, Any],
    fds: list[int],
    ready: int,
    set_death_signal: Any,
    server_path: list[str],
    server_pythonpath: list[str],
) -> None:
    """In the forked child: become the job's process, run it, never return."""
    code = 1
    try:
        os.setsid()
        set_death_signal()
        os.close(ready)  # the server may now report this process as started
        signal.set_wakeup_fd(-1)
        # A fresh interpreter's dispositions: SIGINT raises KeyboardInterrupt, SIGPIPE
        # and SIGXFSZ are ignored (CPython's start-up), everything else defaults.
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        slots = request["stdio"]
        os.dup2(null, 0)
        for target, slot in ((1, slots[1]), (2, slots[2])):
            if slot == _NULL:
                os.dup2(null, target)
            elif slot == _AS_STDOUT:
                os.dup2(1, target)
            else:
                os.dup2(fds[slot], target)
        # Nothing else of the server's (its socket, other jobs' log files) stays open.
        os.closerange(3, _max_fd())
        os.environ.clear()
        os.environ.update(request["env"])
        if request["cwd"] is not None:
            os.chdir(request["cwd"])
        import tempfile

        tempfile.tempdir = None  # TMPDIR is the job's
        argv = request["argv"]
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        rest = [p for p in server_path[1:] if p not in server_pythonpath and p not in pythonpath]
        first = os.getcwd() if argv[0] == "-m" else ""
        sys.path[:] = [first, *pythonpath, *rest]
        code = _run(argv)
    except BaseException:  # noqa: BLE001 - a fresh interpreter would print it too
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (OSError, ValueError):
        return 65536


def _run(argv: list[str]) -> int:
    """Run ``-m module args`` or ``-c code args`` as ``python`` would; return the exit code."""
    import runpy

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *argv[2:]]
            import types

            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)  # noqa: S102 - it is the job's command
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        # CPython ends by SIGINT itself after an uncaught KeyboardInterrupt.
        _print_exception()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001
        _print_exception()
        return 1
    return 0


def _print_exception() -> None:
    """Print the exception being handled as ``python`` would: without this module's frames."""
    import traceback

    kind, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    traceback.print_exception(kind, value, tb)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    # As python does for sys.exit("message"): the message goes to the job's own stderr (its log).
    sys.stderr.write(f"{code}\n")
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit(code: int) -> None:
    """End the child as an interpreter ends: join threads, run atexit, flush, exit."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        import atexit

        atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def main(argv: list[str]) -> None:
    """``python -m cloudexec._forkserver <socket-fd> <module>...``: serve until the socket closes."""
    sock = socket.socket(fileno=int(argv[0]))
    warmup = "--warmup="
    _serve(
        sock,
        [a for a in argv[1:] if not a.startswith(warmup)],
        [a[len(warmup) :] for a in argv[1:] if a.startswith(warmup)],
    )


if __name__ == "__main__":
    # Run the server from the module under its own name, not from __main__: a
    # job's ``-c`` code gets a fresh __main__ of its own.
    from cloudexec._forkserver import main as _main

    _main(sys.argv[1:])
