"""Find, install if need be, start and stop Azurite's blob service.

Azurite is an npm package. The repository's ``package.json`` pins it
(``npm install`` at the repo root provides ``node_modules/.bin/azurite-blob``);
users of the installed library get it from PATH, ``CLOUDEXEC_AZURITE_BLOB``,
or a one-off ``npm install`` into the user cache directory.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from cloudexec import _process

__all__ = [
    "AZURITE_ACCOUNT_KEY",
    "AZURITE_ACCOUNT_NAME",
    "AZURITE_VERSION",
    "AzuriteBlob",
    "AzuriteNotFoundError",
    "find_azurite_blob",
]

# 3.36+ needs Node >= 22; 3.35 still runs on Node 18/20.
AZURITE_VERSION = "~3.35.0"
# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ENV_VAR = "CLOUDEXEC_AZURITE_BLOB"

_BIN = Path("node_modules") / ".bin" / "azurite-blob"
_LISTENING_RE = re.compile(r"successfully listens on https?://[^\s:]+:(\d+)")


class AzuriteNotFoundError(RuntimeError):
    """Azurite's blob service could not be found or installed."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cloudexec" / "azurite"


def _walk_up(start: Path) -> list[Path]:
    start = start.resolve()
    return [directory / _BIN for directory in (start, *start.parents)]


def find_azurite_blob(*, install: bool = True) -> Path:
    """Locate the ``azurite-blob`` executable, installing it with npm if allowed.

    Looks, in order, at ``$CLOUDEXEC_AZURITE_BLOB``; ``node_modules/.bin`` in the
    current directory or any parent; the same next to this cloudexec checkout;
    ``azurite-blob`` on PATH; and the user cache
    (``~/.cache/cloudexec/azurite``). If none exists and ``install`` is true
    and npm is available, runs
    ``npm install --prefix ~/.cache/cloudexec/azurite azurite@~3.35.0``.

    Args:
        install: Whether a missing Azurite may be installed into the cache.

    Returns:
        Path of the ``azurite-blob`` executable.

    Raises:
        AzuriteNotFoundError: Azurite is absent and could not be installed; the
            message says what to run.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise AzuriteNotFoundError(f"${ENV_VAR} is set to {override!r}, which is not a file.")
        return path
    candidates = _walk_up(Path.cwd()) + _walk_up(Path(__file__).parent)
    on_path = shutil.which("azurite-blob")
    if on_path:
        candidates.append(Path(on_path))
    cached = _cache_dir() / _BIN
    candidates.append(cached)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    npm = shutil.which("npm")
    if install and npm:
        return _install(npm, cached)
    raise AzuriteNotFoundError(
        "Azurite (the Azure Storage emulator) was not found. In a cloudexec checkout run `npm install` "
        f"at the repository root (package.json pins azurite {AZURITE_VERSION}); elsewhere run "
        f"`npm install -g azurite@{AZURITE_VERSION}` or set ${ENV_VAR} to an azurite-blob executable. "
        "Azurite needs Node.js 18 or newer" + ("" if npm else " (npm was not found on PATH)") + "."
    )


def _install(npm: str, target: Path) -> Path:
    prefix = _cache_dir()
    prefix.mkdir(parents=True, exist_ok=True)
    lock_path = prefix / ".install.lock"
    with open(lock_path, "w") as lock:
        # Parallel test workers may all find Azurite missing; install once.
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"azurite@{AZURITE_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not target.is_file():
            raise AzuriteNotFoundError(
                f"Installing Azurite failed: `{' '.join(cmd)}` exited with {proc.returncode}.\n"
                f"{proc.stderr.strip()[-2000:]}\nRun it yourself to see why, or set ${ENV_VAR}."
            )
    return target


class AzuriteBlob:
    """An ``azurite-blob`` process on 127.0.0.1 with in-memory storage.

    Args:
        executable: Path of ``azurite-blob``.
        startup_timeout_s: How long :meth:`wait_ready` waits for the port.
        tls: ``(certificate, key)`` PEM paths: serve HTTPS and accept Entra ID
            bearer tokens (``--oauth basic``: Azurite checks their audience,
            issuer and lifetime, not their signature). None: plain HTTP.
    """

    def __init__(
        self, executable: Path, *, startup_timeout_s: float = 30.0, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.executable = executable
        self.tls = tls
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._remover: _process.FolderRemover | None = None

    def start(self) -> None:
        """Launch Azurite; returns at once (see :meth:`wait_ready`)."""
        self._workdir = tempfile.TemporaryDirectory(prefix="cloudexec-azurite-")
        cmd = [
            str(self.executable),
            "--blobHost", "127.0.0.1",
            "--blobPort", "0",
            # --inMemoryPersistence cannot be combined with --location, so the
            # temp dir is the working directory instead (nothing is written).
            "--inMemoryPersistence",
            "--silent",
            # Without it, Azurite rejects the API version current SDKs send.
            "--skipApiVersionCheck",
            # Azurite 3.35 otherwise tries to send telemetry over the network.
            "--disableTelemetry",
        ]
        if self.tls is not None:
            cmd += ["--cert", str(self.tls[0]), "--key", str(self.tls[1]), "--oauth", "basic"]
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._workdir.name,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        # Azurite and its folder must not outlive this process, even a SIGKILLed one.
        self._remover = _process.remove_when_owner_dies(self._workdir.name, kill_groups=[self._proc.pid])
        self._reader = threading.Thread(target=self._read_output, name="azurite-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        # Keep draining after start-up so a full pipe never blocks Azurite.
        stream = self._proc.stdout if self._proc is not None else None
        if stream is None:
            return
        for line in stream:
            self._output.append(line.rstrip())
            match = _LISTENING_RE.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> int:
        """Wait until Azurite listens and return its port.

        Raises:
            RuntimeError: Azurite exited or did not listen within the timeout;
                the message carries its last output lines.
        """
        self._ready.wait(self.startup_timeout_s)
        if self.port is None:
            tail = "\n".join(self._output) or "(no output)"
            node = shutil.which("node")
            raise RuntimeError(
                f"Azurite ({self.executable}) did not start listening within {self.startup_timeout_s:.0f} s. "
                f"Node.js: {node or 'not on PATH'}. Its output:\n{tail}"
            )
        return self.port

    def stop(self) -> None:
        """Terminate Azurite (its whole process group) and clean up."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for signum, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signum)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if self._reader is not None:
                self._reader.join(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        if self._remover is not None:
            self._remover.close()
            self._remover = None
