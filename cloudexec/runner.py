"""The in-container entry point: ``python -m cloudexec.runner <job-url> [--array]``.

It reads the job's call from storage, runs it, writes the result (or the
exception with its traceback) atomically, and exits 0 on success, 1 when the
call raised, 2 when the call could not even be loaded (version mismatch,
corrupt payload, unreachable storage), 3 when the stored call or input failed
signature verification.

Storage is untrusted: the call and each input slice are verified with the
job's own key (``CLOUDEXEC_JOB_KEY``, which only the provider's environment
channel delivers) *before* anything is unpickled, and the result is signed
with it (see `cloudexec._keys`). Shipped module source is installed only from
a verified call.

The runner names no provider: the provider's command line (its
`cloudexec.Provider.command_for`) says where an array child's index is and
what to do around a run:

``--index N``             the child's index, given outright
``--index-env NAME``      else read it from environment variable ``NAME``
                          (default ``CLOUDEXEC_ARRAY_INDEX``) ...
``--index-base N``        ... minus ``N`` (services whose ids do not start at 0)
``--index-offset N``      ... plus ``N`` (one part of an array split in parts)
``--capture-output HOOK`` call ``module:callable`` before the run and
                          ``finish()`` on what it returns after it (a
                          provider that keeps logs and output files in its
                          own places tees and uploads them)
``--storage-setup HOOK``  call ``module:callable`` with the job's opened
                          storage before any read (a provider tunes its
                          storage SDK there, e.g. its retry policy)

Cold start matters, every job pays it: this module imports only the standard
library at top level; dill comes in to unpickle, and fsspec (with s3fs or
adlfs) only when the job's storage is not a local folder.

``--serve`` is the local provider's warm worker: it loads the call once and
runs array children one after another on request, so a 1,000-child local
array does not pay 1,000 interpreter start-ups (see
`cloudexec.providers.local`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from cloudexec import _keys, _payload
from cloudexec._storage import Store, open_store
from cloudexec.errors import IntegrityError

__all__ = ["main", "run_job", "warm_up"]

#: Where an array child's index is when the command line names no variable.
DEFAULT_INDEX_ENV = "CLOUDEXEC_ARRAY_INDEX"

EXIT_OK = 0
EXIT_CALL_FAILED = 1
EXIT_INFRA = 2
EXIT_INTEGRITY = 3  # cloudexec._futures.EXIT_INTEGRITY reads the same number


def _storage_options() -> dict[str, Any] | None:
    raw = os.environ.get("CLOUDEXEC_STORAGE_OPTIONS")
    return json.loads(raw) if raw else None


def array_index_from_env(
    name: str = DEFAULT_INDEX_ENV,
    *,
    base: int = 0,
    offset: int = 0,
    environ: Mapping[str, str] | None = None,
) -> int | None:
    """The array child index the provider put in environment variable ``name``, if any.

    Args:
        name: the variable the provider sets on each child.
        base: the variable's value for child 0 (subtracted).
        offset: added to the result: the first global index of this part,
            for a service whose arrays are split into parts.
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: the variable is set but is not a whole number at least ``base``.
    """
    raw = (os.environ if environ is None else environ).get(name)
    if raw in (None, ""):
        return None
    try:
        index = int(raw) - base + offset
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an array index: expected a whole number") from None
    if index < offset:
        raise ValueError(f"{name}={raw!r} is below the first child's value {base}")
    return index


def job_id_of(job_url: str) -> str:
    """The job id: the last segment of the job's storage URL, checked strictly."""
    return _payload.check_job_id(job_url.rstrip("/").rsplit("/", 1)[-1], what="the job folder")


class _Loaded:
    """A job's call, verified and loaded once (the fork server reuses it for every child).

    Futures passed as arguments arrive as `cloudexec._payload.Upstream`
    placeholders: each is replaced by its upstream job's stored result, read
    from the upstream's folder next to this job's and verified with the key
    the job received for it (``CLOUDEXEC_UPSTREAM_KEYS``).
    """

    def __init__(
        self,
        store: Store,
        array: bool,
        job_id: str,
        key: bytes,
        *,
        job_url: str = "",
        upstream_keys: Mapping[str, bytes] | None = None,
        storage_setup: str | None = None,
    ) -> None:
        self.store = store
        self.array = array
        self.job_id = job_id
        self.key = key
        self.job_url = job_url
        self.upstream_keys = dict(upstream_keys or {})
        self.storage_setup = storage_setup
        self._upstream_root: Store | None = None
        self._upstream_outcomes: dict[tuple[str, int | None], list[Any]] = {}
        call = _keys.open_sealed(key, "call", job_id, None, store.read(_payload.CALL), what=_payload.CALL)
        header, obj = _payload.unpack(call, where="runner")
        if header.get("kind") != "call":
            raise _payload.PayloadError(f"{_payload.CALL} of job {job_id} holds a {header.get('kind')!r}, not a call")
        self.fn, self.args, self.kwargs = obj
        children = header.get("children")
        self.children = children if isinstance(children, int) and not isinstance(children, bool) else None

    def run(self, index: int | None) -> list[Any]:
        if index is None:
            args, kwargs = self._resolve(self.args), self._resolve(self.kwargs)
            return [_payload.capture(self.fn, args, kwargs)]
        sealed = _payload.read_input_slice(
            lambda s, e: self.store.read(_payload.INPUTS, s, e), index, self.children
        )
        raw = _keys.open_sealed(self.key, "input", self.job_id, index, sealed, what=_payload.INPUTS)
        items = self._resolve(_payload._dill().loads(raw))
        return [_payload.capture(self.fn, item, {}) for item in items]

    def _resolve(self, obj: Any) -> Any:
        """``obj`` with every `Upstream` placeholder replaced by the upstream job's result."""

        def swap(item: Any) -> Any:
            return item.value(self._read_upstream) if isinstance(item, _payload.Upstream) else item

        return _payload.replace_in(obj, swap)

    def _read_upstream(self, up_id: str, index: int | None) -> list[Any]:
        """The verified outcomes of upstream job ``up_id`` (or its child ``index``)."""
        cached = self._upstream_outcomes.get((up_id, index))
        if cached is not None:
            return cached
        up_id = _payload.check_job_id(up_id, what="an upstream job id")
        key = self.upstream_keys.get(up_id)
        if key is None:
            raise IntegrityError(
                f"job {self.job_id} reads the result of job {up_id} but did not receive its key in "
                f"{_keys.UPSTREAM_KEYS_ENV}; submit it through the executor that submitted {up_id}"
            )
        if self._upstream_root is None:
            # Every job's folder sits directly below the executor's storage root.
            root = self.job_url.rstrip("/").rsplit("/", 1)[0]
            self._upstream_root = open_store(root, _storage_options())
            if self.storage_setup:
                _call_hook(self.storage_setup, "storage setup", self._upstream_root)
        name = _payload.result_key(index)
        try:
            data = self._upstream_root.child(up_id).read(name)
        except FileNotFoundError:
            which = up_id if index is None else f"{up_id}[{index}]"
            raise _payload.PayloadError(
                f"job {self.job_id} needs the result of job {which}, but it has stored none "
                f"({name} is missing): it ended without success, or its storage was cleaned up"
            ) from None
        outcomes = _payload.open_result([key], up_id, index, data)
        self._upstream_outcomes[(up_id, index)] = outcomes
        return outcomes


def _infra_outcome(exc: BaseException) -> list[Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [("err", exc, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)]


def _infra_code(exc: BaseException) -> int:
    return EXIT_INTEGRITY if isinstance(exc, IntegrityError) else EXIT_INFRA


def _write_result(store: Store, job_id: str, key: bytes, index: int | None, outcomes: list[Any]) -> None:
    """Store this attempt's result, unless an earlier attempt already stored a successful one.

    The first successful result is final: the client may have delivered it
    already, and a later attempt (a retry, or a duplicate a service started)
    must not change what a future said. A failed attempt's result is
    replaced by a later attempt's, as the service retries it.
    """
    name = _payload.result_key(index)
    if _has_successful_result(store, job_id, key, index):
        sys.stderr.write(f"cloudexec: an earlier attempt already stored a successful {name}; it is kept\n")
        return
    # Checked, then written: two attempts finishing in the same instant could
    # both write; object stores offer no portable create-if-absent.
    store.write(name, _payload.seal_result(key, job_id, index, outcomes))


def _has_successful_result(store: Store, job_id: str, key: bytes, index: int | None) -> bool:
    """Whether a verified result whose every outcome succeeded is already stored (nothing is unpickled)."""
    name = _payload.result_key(index)
    try:
        data = store.read(name)
    except FileNotFoundError:
        return False
    try:
        body = _keys.open_sealed(key, "result", job_id, index, data, what=name)
        header, _ = _payload.read_header(body)
    except (IntegrityError, _payload.PayloadError, ValueError):
        return False  # half-written or foreign: replace it
    return header.get("ok") is True


def _report(outcomes: list[Any]) -> int:
    failed = [o for o in outcomes if o[0] != "ok"]
    for outcome in failed:
        # The traceback belongs in the job's own log, where users look first.
        sys.stderr.write(f"cloudexec: the call raised:\n{outcome[4] or outcome[2] + ': ' + outcome[3]}\n")
    sys.stderr.flush()
    return EXIT_CALL_FAILED if failed else EXIT_OK


def _exit_code_of(outcomes: list[Any]) -> int | None:
    """The exit code a call asked for with ``sys.exit``, or ``None`` if no call did."""
    for outcome in outcomes:
        if outcome[0] != "ok" and isinstance(outcome[1], SystemExit):
            code = outcome[1].code
            if code is None:
                return EXIT_OK
            return code if isinstance(code, int) else EXIT_CALL_FAILED
    return None


def run_job(
    job_url: str,
    *,
    index: int | None = None,
    loaded: _Loaded | None = None,
    environ: Mapping[str, str] | None = None,
    storage_setup: str | None = None,
) -> int:
    """Run one job (or array child) and write its signed result; return the exit code.

    ``environ`` stands for the job's environment (default ``os.environ``):
    where its key comes from. ``storage_setup`` is the provider's
    ``module:callable`` called with the opened `Store` before any read.

    A call that raises ``SystemExit`` (``sys.exit(4)``) ends the job as a
    process that exits does: with that exit code and no result. The client
    then gets a `JobFailedError` naming the job and its exit code, rather
    than a ``SystemExit`` that would end the client too.
    """
    try:
        job_id = loaded.job_id if loaded else job_id_of(job_url)
        keys = _keys.job_keys_from_env(environ) if loaded is None else {"": loaded.key}
        key = keys[""]
    except (ValueError, IntegrityError) as exc:
        # Without a valid id and key no result can be signed: the log says why.
        sys.stderr.write(f"cloudexec: refusing to run {job_url}: {exc}\n")
        return EXIT_INTEGRITY
    try:
        store = loaded.store if loaded else open_store(job_url, _storage_options())
    except BaseException as exc:  # noqa: BLE001 - nowhere to write a result to
        sys.stderr.write(f"cloudexec: cannot open the job storage {job_url}: {type(exc).__name__}: {exc}\n")
        return EXIT_INFRA
    if storage_setup and loaded is None:
        _call_hook(storage_setup, "storage setup", store)
    code = EXIT_OK
    try:
        if loaded is None:
            loaded = _Loaded(
                store, index is not None, job_id, key, job_url=job_url, upstream_keys=keys, storage_setup=storage_setup
            )
        outcomes = loaded.run(index)
    except BaseException as exc:  # noqa: BLE001 - report why the call could not run
        outcomes = _infra_outcome(exc)
        code = _infra_code(exc)
        if code == EXIT_INTEGRITY:
            sys.stderr.write(f"cloudexec: {exc}\n")
    sys.stdout.flush()
    exit_code = _exit_code_of(outcomes)
    if exit_code is not None:
        sys.stderr.write(f"cloudexec: the call called sys.exit({exit_code}): the job ends with that exit code\n")
        sys.stderr.flush()
        return exit_code
    try:
        _write_result(store, job_id, key, index, outcomes)
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"cloudexec: cannot write the result to {job_url}: {type(exc).__name__}: {exc}\n")
        return EXIT_INFRA
    reported = _report(outcomes)
    return code or reported


def _serve(job_url: str, control_fd: int, orphans: _Orphans | None = None) -> int:
    """Warm worker for the local provider: runs array children one after another.

    Protocol, one line each: stdin gets ``run <index> <stdout-path> <stderr-path>``;
    the control fd gets ``start <index>`` and ``exit <index> <exit-code>``. Each
    child's stdout and stderr (file descriptors 1 and 2, so output of C code
    and subprocesses too) go to its own files. EOF on stdin ends the worker.

    With ``orphans``, a worker whose client died (EOF on stdin and a new
    parent) goes on to run the array's children that no worker started, so
    the array still completes and a new process can attach to it.
    """
    control = _Control(os.fdopen(control_fd, "w", buffering=1))
    parent = os.getppid()
    try:
        job_id, keys = job_id_of(job_url), _keys.job_keys_from_env()
        key = keys[""]
    except (ValueError, IntegrityError) as exc:
        sys.stderr.write(f"cloudexec: refusing to run {job_url}: {exc}\n")
        for line in sys.stdin:  # every child ends at once: nothing can be signed
            parts = line.split(" ", 2)
            if parts[0] == "run" and len(parts) == 3:
                control.write(f"start {parts[1]}\nexit {parts[1]} {EXIT_INTEGRITY}\n")
        return EXIT_INTEGRITY
    store = open_store(job_url, _storage_options())
    try:
        loaded: _Loaded | None = _Loaded(store, True, job_id, key, job_url=job_url, upstream_keys=keys)
        load_error: BaseException | None = None
    except BaseException as exc:  # noqa: BLE001 - every child reports it
        loaded, load_error = None, exc
        if isinstance(exc, IntegrityError):
            sys.stderr.write(f"cloudexec: {exc}\n")
    saved_out, saved_err = os.dup(1), os.dup(2)

    def run_child(index: int, out_path: str, err_path: str) -> None:
        control.write(f"start {index}\n")
        _redirect(out_path, err_path)
        try:
            if load_error is not None:
                outcomes = _infra_outcome(load_error)
                _write_result(store, job_id, key, index, outcomes)
                _report(outcomes)
                code = _infra_code(load_error)
            else:
                code = run_job(job_url, index=index, loaded=loaded)
        except BaseException:  # noqa: BLE001 - keep serving the other children
            traceback.print_exc()
            code = EXIT_INFRA
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
        control.write(f"exit {index} {code}\n")

    for line in sys.stdin:
        parts = line.rstrip("\n").split(" ", 3)
        if parts[0] != "run" or len(parts) != 4:
            continue
        index = int(parts[1])
        if orphans is not None and not orphans.claim_ordered(index):
            continue  # an orphaned worker took it after the client died
        run_child(index, parts[2], parts[3])
    if orphans is not None and os.getppid() != parent:
        # The client died (EOF without a retirement): finish its array.
        while (orphan := orphans.claim_next()) is not None:
            run_child(orphan, *orphans.log_paths(orphan))
    return EXIT_OK


class _Control:
    """The control pipe to the client; writes after the client died are dropped."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.fh.write(text)
        except (BrokenPipeError, ValueError, OSError):
            self.closed = True


class _Orphans:
    """Which children of a local array were started, shared by its workers through files.

    ``claims`` (a local folder) holds ``ordered-<i>`` for each child the client
    sent to a worker (or cancelled) and ``orphan-<i>`` for each a worker took on
    its own after the client died (``closed``: the array was cancelled); they
    are made under an exclusive ``flock``, so a child is never run by an
    orphaned worker and by a worker the client ordered it from.
    """

    def __init__(self, claims: str, size: int, log_dir: str) -> None:
        self.claims, self.size, self.log_dir = claims, size, log_dir
        os.makedirs(claims, exist_ok=True)

    def _locked(self) -> Any:
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def lock() -> Iterator[None]:
            fd = os.open(os.path.join(self.claims, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

        return lock()

    def _mark(self, name: str) -> None:
        os.close(os.open(os.path.join(self.claims, name), os.O_WRONLY | os.O_CREAT, 0o600))

    def claim_ordered(self, index: int) -> bool:
        """Record that the client ordered child ``index``; False if an orphaned worker has it."""
        with self._locked():
            if os.path.exists(os.path.join(self.claims, f"orphan-{index}")):
                return False
            self._mark(f"ordered-{index}")
            return True

    def claim_next(self) -> int | None:
        """Take the first child nobody started; None when there is none."""
        with self._locked():
            taken = set(os.listdir(self.claims))
            if "closed" in taken:  # the whole array was cancelled
                return None
            for index in range(self.size):
                if f"ordered-{index}" not in taken and f"orphan-{index}" not in taken:
                    self._mark(f"orphan-{index}")
                    return index
        return None

    def log_paths(self, index: int) -> tuple[str, str]:
        """Where the local provider reads child ``index``'s stdout and stderr."""
        return os.path.join(self.log_dir, f"{index}.out"), os.path.join(self.log_dir, f"{index}.err")


def _redirect(out_path: str, err_path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cloudexec.runner`` and the ``cloudexec-runner`` script."""
    args = _parser().parse_args(argv)
    if args.serve:
        orphans = _Orphans(args.claims, args.size, args.log_dir) if args.claims and args.size else None
        return _serve(args.job_url, args.control_fd, orphans)
    # Only a provider that asks for a capture pays its import, so the others'
    # cold start does not change.
    capture = _call_hook(args.capture_output, "output capture") if args.capture_output else None
    try:
        return _run_parsed(args)
    finally:
        if capture is not None:
            capture.finish()


def warm_up() -> None:
    """Fork-server warm-up: build the parser and parse a command line once, so ``re`` has compiled
    argparse's patterns before any job forks."""
    _parser().parse_args(["job-url", "--array", "--index-env", "NAME", "--index-base", "0"])


def _parser() -> Any:
    """The command line's parser."""
    import argparse

    parser = argparse.ArgumentParser(prog="cloudexec-runner", description="Run one cloudexec job.")
    parser.add_argument("job_url", help="storage URL of the job's prefix")
    parser.add_argument("--array", action="store_true", help="run one child of an array job")
    parser.add_argument("--index", type=int, default=None, help="array child index (else from the environment)")
    parser.add_argument(
        "--index-env", default=DEFAULT_INDEX_ENV, metavar="NAME", help="environment variable holding the index"
    )
    parser.add_argument("--index-base", type=int, default=0, metavar="N", help="that variable's value for child 0")
    parser.add_argument("--index-offset", type=int, default=0, metavar="N", help="added to the index from NAME")
    parser.add_argument(
        "--capture-output",
        default=None,
        metavar="MODULE:CALLABLE",
        help="called before the run; finish() is called on what it returns after the run",
    )
    parser.add_argument(
        "--storage-setup",
        default=None,
        metavar="MODULE:CALLABLE",
        help="called with the job's opened storage before any read",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--claims", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _call_hook(hook: str, what: str, *args: Any) -> Any:
    """Call the provider's ``module:callable`` hook with ``args``; ``None`` if it fails.

    The hook comes from the command line, which the provider wrote: it is
    trusted as the runner itself is (stored payloads are not). A hook that
    fails must not cost the job its run: the reason goes to stderr.
    """
    import importlib

    module, _, name = hook.partition(":")
    try:
        target: Any = importlib.import_module(module)
        for attr in (name or "start").split("."):
            target = getattr(target, attr)
        return target(*args)
    except Exception as exc:  # noqa: BLE001 - the job runs without the hook
        sys.stderr.write(f"cloudexec: cannot run the {what} hook {hook!r}: {type(exc).__name__}: {exc}\n")
        return None


def _run_parsed(args: Any) -> int:
    """Run the job the parsed command line names (the body of `main`)."""
    index = args.index
    if args.array and index is None:
        try:
            index = array_index_from_env(args.index_env, base=args.index_base, offset=args.index_offset)
        except ValueError as exc:
            sys.stderr.write(f"cloudexec: --array given but {exc}\n")
            return EXIT_INFRA
        if index is None:
            sys.stderr.write(f"cloudexec: --array given but no index: expected {args.index_env} in the environment\n")
            return EXIT_INFRA
    return run_job(args.job_url, index=index, storage_setup=args.storage_setup)


if __name__ == "__main__":
    sys.exit(main())
