"""Looking after stored jobs: list them, tell their status, delete them.

The ``cloudexec`` command is built on these; they work on any executor, so
they name no provider. A job is found from its storage prefix alone
(``<io_url>/<job_id>/job.json``, see `cloudexec._payload`): the manifest says
what the job is, the provider says where it is now, in one bulk
``describe`` per page of jobs.

Job ids end in their UTC submission time (``<name>-YYYYmmdd-HHMMSS-<hex>``,
`cloudexec._base.new_job_id`), so listings are sorted newest first and cut
by age without reading every manifest.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cloudexec import _payload
from cloudexec._base import BatchExecutor, _read_manifest
from cloudexec._provider import JobInfo
from cloudexec._version import __version__
from cloudexec.errors import CloudExecError

__all__ = ["JobEntry", "iter_jobs", "job_created", "delete_job", "runner_versions", "client_versions", "PHASES"]

_STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{8}$")
#: Names `JobEntry.matches` accepts besides a provider's own status names.
PHASES = ("queued", "running", "succeeded", "failed", "unknown")
# Manifests read and described per round trip to the provider.
_PAGE = 100


@dataclass
class JobEntry:
    """One stored job, as a listing shows it.

    Attributes:
        job_id: cloudexec's id of the job.
        created: submission time (UTC) from the id, ``None`` if it has none.
        manifest: the verified manifest, ``None`` if it could not be read.
        info: what the provider says now, ``None`` if it no longer knows the job.
        problem: why the manifest could not be read, if it could not.
    """

    job_id: str
    created: _dt.datetime | None
    manifest: dict[str, Any] | None = None
    info: JobInfo | None = None
    problem: str | None = None

    @property
    def status(self) -> str:
        """The provider's status name, or ``unknown`` when it no longer knows the job."""
        return str(self.info.status) if self.info is not None and self.info.status is not None else "unknown"

    @property
    def phase(self) -> str:
        """``queued``/``running``/``succeeded``/``failed``, or ``unknown``."""
        if self.info is None or self.info.status is None:
            return "unknown"
        return self.info.status.phase.value

    @property
    def ended(self) -> bool:
        """Whether the job is known to have ended (or the provider forgot it: it cannot still run)."""
        return self.phase in ("succeeded", "failed", "unknown")

    @property
    def kind(self) -> str:
        """``single`` or ``array[N]``."""
        if self.manifest is None:
            return "?"
        return "single" if self.manifest["kind"] == "single" else f"array[{self.manifest['size']}]"

    def matches(self, status: str | None) -> bool:
        """Whether the job's status or phase is ``status`` (any case); ``None`` matches all."""
        return status is None or status.lower() in (self.status.lower(), self.phase)


def job_created(job_id: str) -> _dt.datetime | None:
    """The UTC submission time encoded in a cloudexec job id, ``None`` if it has none."""
    match = _STAMP.search(job_id)
    if match is None:
        return None
    return _dt.datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=_dt.timezone.utc)


def iter_jobs(
    ex: BatchExecutor,
    *,
    older_than: _dt.timedelta | None = None,
    newer_than: _dt.timedelta | None = None,
    name: str | None = None,
) -> Iterator[JobEntry]:
    """The jobs stored under ``ex.io_url``, newest first, with their provider status.

    Args:
        ex: the executor whose storage and provider to ask.
        older_than: only jobs submitted at least this long ago.
        newer_than: only jobs submitted less than this long ago.
        name: only jobs whose id or function contains this text.
    """
    core = ex._core
    now = _dt.datetime.now(_dt.timezone.utc)
    ids = []
    for key in core.store.list(""):
        if key.startswith(".") or _payload._JOB_ID.fullmatch(key) is None:
            continue  # probes and temporary objects, not jobs
        created = job_created(key)
        age = now - created if created is not None else None
        if older_than is not None and (age is None or age < older_than):
            continue
        if newer_than is not None and (age is None or age >= newer_than):
            continue
        ids.append((created or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc), key))
    ids.sort(reverse=True)
    for start in range(0, len(ids), _PAGE):
        page = [JobEntry(job_id=key, created=created if created.year > 1 else None) for created, key in ids[start : start + _PAGE]]
        for entry in page:
            try:
                entry.manifest = _read_manifest(core, entry.job_id)
                if entry.manifest is None:
                    entry.problem = "no manifest (submission unfinished, or not a job folder)"
            except CloudExecError as exc:
                entry.problem = str(exc)
        if name is not None:
            needle = name.lower()
            page = [
                e for e in page if needle in e.job_id.lower() or needle in str((e.manifest or {}).get("function", "")).lower()
            ]
        refs = {e.manifest["provider_ref"]: e for e in page if e.manifest and e.manifest.get("provider_ref")}
        infos = core.provider.describe(list(refs)) if refs else {}
        for ref, entry in refs.items():
            entry.info = infos.get(ref)
        yield from page


def delete_job(ex: BatchExecutor, job_id: str) -> None:
    """Delete everything a job stored (call, inputs, results, manifest, local logs)."""
    ex._core.store.delete(_payload.check_job_id(job_id))


def runner_versions() -> dict[str, str]:
    """Versions where this function runs: submitted by ``cloudexec doctor`` to see the runner's."""
    return client_versions()


def client_versions() -> dict[str, str]:
    """The Python, dill and cloudexec versions of this process."""
    try:
        import dill

        dill_version = str(dill.__version__)
    except ImportError:
        dill_version = "missing"
    return {"python": platform.python_version(), "dill": dill_version, "cloudexec": __version__}
