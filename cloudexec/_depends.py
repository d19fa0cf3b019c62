"""Futures passed as arguments: pipelines whose order the batch service enforces.

How a dependent call travels::

    down = ex.submit(g, [up, 3])          up: an unfinished future of ex
      │  swap_futures: up → Upstream placeholder in the pickled call;
      │  record.depends = [("job", up)]; submit returns at once
      ▼
    manager, at dispatch: depends_on(record)
      │  up succeeded meanwhile   → no provider dependency (its result is stored)
      │  up failed / cancelled    → down fails here, never submitted
      │  else                     → JobSpec.depends_on = (Dependency("job", up's provider ref),)
      ▼
    the service holds down until up succeeded (or fails it when up fails)
      ▼
    runner: Upstream → up's stored result (verified with up's key)

Where the service cannot hold a job (a kind the provider does not list in
``dependency_kinds``, a provider `submit` raising `CannotHold` for this job,
or an upstream job itself kept in the client) the manager keeps the
dependent in the client until its upstream jobs ended (`waits_in_client`),
then submits it without a dependency, or fails it. That does not outlive the
client, and cannot run array children one after another (``sequential``),
which is refused at submit.

A finished, successful future is simply replaced by its value. Only futures
of the same executor (or one of its `with_settings` views) can be waited for:
their jobs live in the same storage root, under the same key. Cycles cannot
arise: a job can only wait for futures that existed before it was submitted.
"""

from __future__ import annotations

import weakref
from typing import Any

from cloudexec import _payload
from cloudexec._provider import Dependency
from cloudexec.errors import JobFailedError

from cloudexec._futures import ArrayFuture, BatchFuture, _Core, _JobRecord, how_it_ended, succeeded

__all__ = [
    "swap_futures",
    "expand_arrays",
    "plan_single",
    "plan_array",
    "depends_on",
    "submitted",
    "hold_in_client",
    "waits_in_client",
]


def swap_futures(core: _Core, obj: Any, found: dict[int, BatchFuture[Any]]) -> Any:
    """``obj`` with each future of this executor replaced by its value or an `Upstream` placeholder.

    Futures are looked for in lists, tuples, dicts and sets, at any depth;
    those not finished successfully are added to ``found`` (by ``id``).

    Raises:
        ValueError: a future of another executor (another provider, storage
            or key): its job's result could not be read by this executor's jobs.
    """

    def swap(item: Any) -> Any:
        if not isinstance(item, BatchFuture):
            return item
        future: BatchFuture[Any] = item
        if future._core is not core:
            other = future._core
            raise ValueError(
                f"the future of job {future.job_id} belongs to another executor ({other.provider.name} provider, "
                f"storage {other.store.url}); a job can wait only for jobs of its own executor ({core.provider.name}, "
                f"{core.store.url}). Pass its value instead (future.result()), or submit both calls through one "
                "executor (its with_settings views share it)."
            )
        record = future._record
        if succeeded(future) and not record.streaming:
            return future.result()
        found[id(future)] = future
        if isinstance(future, ArrayFuture):
            return _payload.Upstream(record.job_id, size=record.size, chunked=record.chunksize > 1)
        return _payload.Upstream(record.job_id, index=future._index, chunked=record.chunksize > 1)

    return _payload.replace_in(obj, swap)


def expand_arrays(iterables: tuple[Any, ...]) -> tuple[Any, ...]:
    """``submit_map``'s iterables with each `ArrayFuture` replaced by its children (item i ← child i).

    Raises:
        ValueError: the array packs several items per child (``chunksize > 1``).
    """
    out = []
    for iterable in iterables:
        if isinstance(iterable, ArrayFuture):
            if iterable._record.chunksize != 1:
                raise ValueError(
                    f"array job {iterable.job_id} has chunksize={iterable._record.chunksize}: its children do not "
                    "stand for single items. Pass it as one argument (ex.submit(f, array)) to get the list of "
                    "its results, or submit it with chunksize=1."
                )
            iterable = iterable.children
        out.append(iterable)
    return tuple(out)


def _check(core: _Core, job: str, depends: list[tuple[str, BatchFuture[Any] | None]]) -> None:
    """Refuse dependencies the provider cannot enforce, before anything is submitted."""
    provider = core.provider
    kinds = {kind for kind, _ in depends}
    if "sequential" in kinds and "sequential" not in provider.dependency_kinds:
        raise TypeError(
            f"{job}: the {provider.name} provider cannot run array children one after another (sequential=True). "
            "Chain single jobs instead (each submit given the previous future), or use a provider whose service can."
        )
    if not kinds <= provider.dependency_kinds:
        return  # held in the client: no provider limit applies
    upstream = {f._record.job_id for _, f in depends if f is not None}
    count = len(upstream) + ("sequential" in kinds)
    limit = provider.max_dependencies
    if limit is not None and count > limit:
        raise ValueError(
            f"{job} would wait for {count} jobs, but the {provider.name} provider allows at most {limit} "
            "dependencies per job. Restructure: pass one ArrayFuture (a submit_map) instead of many separate "
            f"futures, or gather them in steps of at most {limit} (e.g. part = ex.submit(list, futures[:{limit}]))."
        )


def plan_single(core: _Core, record: _JobRecord, found: dict[int, BatchFuture[Any]]) -> None:
    """Record what a single job waits for (``found`` by `swap_futures`)."""
    if not found:
        return
    depends: list[tuple[str, BatchFuture[Any] | None]] = [("job", f) for f in found.values()]
    _check(core, f"job {record.job_id}", depends)
    record.depends = depends


def plan_array(
    core: _Core, record: _JobRecord, size: int, per_child: dict[int, dict[int, BatchFuture[Any]]], sequential: bool
) -> None:
    """Record what an array job waits for.

    ``per_child`` holds, for each child of the ``size`` whose items hold
    futures, those futures (by ``id``). Child i of an upstream array of the
    same size, found only in child i's items, becomes one ``n_to_n``
    dependency (child waits for child); every other future one ``job``
    dependency of the whole array.
    """
    by_array: dict[str, list[tuple[int, BatchFuture[Any]]]] = {}
    singles: dict[int, BatchFuture[Any]] = {}
    for k, found in per_child.items():
        for future in found.values():
            if future._index is not None and record.chunksize == 1:
                by_array.setdefault(future._record.job_id, []).append((k, future))
            else:
                singles[id(future)] = future
    depends: list[tuple[str, BatchFuture[Any] | None]] = []
    for pairs in by_array.values():
        upstream = pairs[0][1]._record
        parent = upstream.future
        if parent is not None and upstream.size == size and all(k == f._index for k, f in pairs):
            depends.append(("n_to_n", parent))
        else:
            for _, future in pairs:
                singles[id(future)] = future
    depends.extend(("job", f) for f in singles.values())
    if sequential:
        depends.append(("sequential", None))
    if depends:
        _check(core, f"array job {record.job_id}", depends)
        record.depends = depends


def waits_in_client(record: _JobRecord, kinds: frozenset[str]) -> bool:
    """Whether the manager must keep ``record`` until an upstream job ends.

    So it is when the service cannot hold it, and when an unfinished upstream
    job has no provider reference to name (itself kept in the client).
    """
    return any(
        f is not None
        and not f.done()
        and (record.client_hold or kind not in kinds or f._record.ref is None)
        for kind, f in record.depends
    )


def depends_on(record: _JobRecord) -> tuple[Dependency, ...] | JobFailedError:
    """The provider dependencies of a job about to be submitted, or the error ending it unsubmitted.

    An upstream that already succeeded needs no dependency (its result is
    stored); one that failed or was cancelled means the job can never run.
    """
    deps: list[Dependency] = []
    for kind, future in record.depends:
        if future is None:
            deps.append(Dependency("sequential"))
            continue
        upstream = future._record
        if future.done():
            if succeeded(future):
                continue
            return _never_ran(record, future.job_id, how_it_ended(future))
        if upstream.ref is None:
            return _never_ran(
                record,
                future.job_id,
                "has no provider id yet (its submitting client had not recorded it), so no dependency on it can "
                "be given to the service",
            )
        deps.append(Dependency(kind, ref=upstream.ref, job_id=upstream.job_id, index=future._index))
    record.upstream_ids = [(f.job_id, weakref.ref(f)) for _, f in record.depends if f is not None]
    record.held = any(d.kind != "sequential" for d in deps)
    return tuple(deps)


def submitted(record: _JobRecord) -> None:
    """The provider has the job: keep its upstream jobs only for messages, not their futures (and results)."""
    record.depends = []


def hold_in_client(record: _JobRecord) -> None:
    """The provider cannot hold the job: the manager keeps it until its upstream jobs ended."""
    record.client_hold = True
    record.held = False


def _never_ran(record: _JobRecord, upstream_id: str, how: str) -> JobFailedError:
    return JobFailedError(
        record.job_id,
        status=None,
        status_reason=f"upstream job {upstream_id} {how}",
        exit_code=None,
        hint="It was never submitted: a job runs only once every job whose future it was given succeeded.",
    )
