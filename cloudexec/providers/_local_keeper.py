"""Held local jobs outlive their client: a keeper process adopts them when it dies.

AWS Batch and Azure Batch hold a dependent job in the service, so a pipeline
goes on after its client exited. The local "service" is the client process
itself; this module gives its held jobs the same fate::

    client (LocalProvider)                 keeper (python -m cloudexec.providers._local_keeper)
      first held job --- start ----------> own session, inherits the client's
                                           environment and working folder
      each held job ---- JobSpec --------> kept in memory (never on disk: the
                         over a pipe       spec carries the job's derived key)
      orderly close ---- "quit" ---------> exits, adopting nothing
      dies (any way) --- EOF ------------> adopts every job still ``Pending``:
                                           waits for its upstream jobs (running
                                           on, orphaned, or adopted too), then
                                           runs it on its own scheduler, or
                                           fails it naming the upstream job;
                                           exits once all adopted jobs ended

The keeper records each adopted job's state in the job's ``local.json`` as
its owner, so a new client that attaches by job id follows it as it would
any job of another live process. Only a persistent ``io_root`` gets a keeper
(a temporary one is removed with its client). Jobs that were ``Runnable``
(waiting for a vCPU) or were array children not yet started are not adopted:
their fate is the one `LocalBatchExecutor` documents.

The pipe is private between the client and a process it started, so the
messages are pickles; nothing read from storage is unpickled here.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from cloudexec._log import log
from cloudexec._process import process_identity
from cloudexec._provider import Dependency, JobInfo, JobSpec, Phase

if TYPE_CHECKING:
    from cloudexec.providers.local import LocalProvider

__all__ = ["Keeper", "main"]

_FRAME = struct.Struct(">I")
_POLL_S = 0.2


class Keeper:
    """The client's end: starts the keeper at the first held job and feeds it."""

    def __init__(self, state_dir: str, max_vcpus: int, env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.max_vcpus = max_vcpus
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._broken = False

    def identity(self) -> list[float] | None:
        """The keeper's ``[pid, start time]`` (started now if need be); None if it cannot run."""
        with self._lock:
            if self._broken:
                return None
            try:
                if self._proc is None:
                    self._proc = self._start()
                    self._send(("env", self.env))
            except OSError as exc:
                self._lost(exc)
                return None
            return process_identity(self._proc.pid)

    def hold(self, spec: JobSpec) -> None:
        """Tell the keeper about a job the scheduler holds for its upstream jobs."""
        with self._lock:
            if self._broken or self._proc is None:
                return
            try:
                self._send(("spec", spec))
            except OSError as exc:
                self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        # The jobs still run while this client lives; only their survival of
        # its death is lost, which is worth a warning (once).
        self._broken = True
        log.warning(
            "cloudexec: the local keeper process is gone (%s): jobs held for their upstream jobs will not run "
            "if this process dies before they start",
            exc,
        )

    def close(self) -> None:
        """An orderly end: the keeper exits without adopting anything."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            try:
                self._send_to(proc, ("quit", None))
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _start(self) -> subprocess.Popen[bytes]:
        log_path = os.path.join(self.state_dir, f"keeper-{os.getpid()}.log")
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", __name__, self.state_dir, str(self.max_vcpus)],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                # Its own session: a signal to the client's process group
                # (Ctrl-C, a kill of the group) does not reach the keeper.
                start_new_session=True,
                close_fds=True,
            )

    def _send(self, message: tuple[str, Any]) -> None:
        assert self._proc is not None
        self._send_to(self._proc, message)

    @staticmethod
    def _send_to(proc: subprocess.Popen[bytes], message: tuple[str, Any]) -> None:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        assert proc.stdin is not None
        proc.stdin.write(_FRAME.pack(len(body)) + body)
        proc.stdin.flush()


def _read_messages(stream: IO[bytes]) -> tuple[dict[str, str], list[JobSpec], bool]:
    """Read until EOF: ``(provider env, held specs in order, quit asked)``."""
    env: dict[str, str] = {}
    specs: list[JobSpec] = []
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return env, specs, False
        (size,) = _FRAME.unpack(head)
        body = stream.read(size)
        if len(body) < size:
            return env, specs, False
        kind, value = pickle.loads(body)  # noqa: S301 - written by the process that started this one
        if kind == "quit":
            return env, specs, True
        if kind == "env":
            env = dict(value)
        elif kind == "spec":
            specs.append(value)


def _upstream(provider: LocalProvider, dep: Dependency) -> JobInfo | None:
    """What the job ``dep`` names (or its child) reads now, from what its scheduler left behind."""
    ref = dep.ref or ""
    if dep.index is not None and dep.kind == "job":
        state = provider._read_state(ref) or {}
        size = int(state.get("size") or len(state.get("children") or []) or dep.index + 1)
        return provider.describe_child(ref, size, dep.index)
    return provider.describe([ref]).get(ref)


def _name(dep: Dependency) -> str:
    job_id = dep.job_id or dep.ref or "?"
    return job_id if dep.index is None else f"{job_id}[{dep.index}]"


def adopt(state_dir: str, max_vcpus: int, env: dict[str, str], specs: list[JobSpec]) -> None:
    """Run the held jobs of a client that died, as its scheduler would have."""
    from cloudexec.providers import local

    provider = local.LocalProvider(state_dir=state_dir, max_vcpus=max_vcpus, env=env)
    held = [s for s in specs if (provider._read_state(s.job_id) or {}).get("status") == local.S.PENDING.value]
    waiting = {s.job_id: s for s in held}
    adopted: list[str] = []
    log.info("cloudexec keeper: adopting %d held job(s) of a client that exited", len(waiting))
    while waiting:
        for job_id, spec in list(waiting.items()):
            keep: list[Dependency] = []
            ready, failed = True, None
            for dep in spec.depends_on:
                if dep.kind == "sequential" or dep.ref in adopted:
                    keep.append(dep)  # held by this keeper's own scheduler
                    continue
                if dep.ref in waiting:
                    ready = False  # adopted later, once its own upstream jobs ended
                    break
                info = _upstream(provider, dep)
                if info is not None and not info.terminal:
                    ready = False
                    break
                if info is None or info.status is None or info.status.phase is not Phase.SUCCEEDED:
                    how = "cannot be found" if info is None else f"failed: {info.status_reason or 'no reason given'}"
                    failed = f"Dependency {_name(dep)} {how}"
                    break
            if failed is not None:
                local.fail_unstarted(spec, state_dir, env, failed)
                del waiting[job_id]
            elif ready:
                provider.submit(dataclasses.replace(spec, depends_on=tuple(keep)))
                adopted.append(job_id)
                del waiting[job_id]
        if waiting:
            time.sleep(_POLL_S)
    while True:
        infos = provider.describe(adopted)
        if all(info.terminal for info in infos.values()):
            break
        time.sleep(_POLL_S)
    provider.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m cloudexec.providers._local_keeper <state_dir> <max_vcpus>``; messages on stdin."""
    args = sys.argv[1:] if argv is None else argv
    state_dir, max_vcpus = args[0], int(args[1])
    env, specs, quit_asked = _read_messages(sys.stdin.buffer)
    if quit_asked or not specs:
        return 0
    adopt(state_dir, max_vcpus, env, specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
