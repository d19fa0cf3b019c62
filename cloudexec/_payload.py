"""Envelopes for calls and results, and the layout of a job's storage prefix.

Layout of one job, below the executor's storage root (``io_url``)::

    <io_url>/<job_id>/
        job.json          manifest: what the job is (kind, size, function,
                          settings, provider and its job id, versions); written
                          BEFORE the job is handed to the provider (so attach
                          finds every job that may run) and again with the
                          provider's id once it accepted the job; any tool can
                          find out what a prefix holds from its id alone
        call.pkl          envelope: (fn, args, kwargs) for a single job, or
                          (fn, None, None) for an array job
        inputs.bin        array jobs only: every child's arguments in ONE
                          object, with an offset table so that child i reads
                          just its own byte range (see `pack_inputs`)
        result.pkl        single job: envelope of a list with one outcome
        results/<i>.pkl   array child i: envelope of its chunk's outcomes; <i> is
                          zero-padded to 7 digits (0000012.pkl), so that names
                          sort as indices do and a poller lists only the names
                          after the last child it has all results below

A future passed as an argument travels as an `Upstream` placeholder (the
upstream job's id, and which of its results); the runner puts the upstream's
stored result in its place (`replace_in`) before the call runs.

Every envelope is ``MAGIC | format byte | header length | JSON header | body``.
The JSON header records the Python, dill and cloudexec versions and what
the body is, so a runner can refuse a call pickled by another Python minor
version with a clear message before unpickling anything, and new fields
(signatures, dependencies) can be added without breaking old readers.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import struct
import sys
import sysconfig
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import Any

from cloudexec._version import __version__
from cloudexec.errors import IntegrityError, PayloadError, RemoteError, RemoteTraceback, VersionMismatchError

__all__ = [
    "pack",
    "unpack",
    "read_header",
    "pack_inputs",
    "read_input_slice",
    "Outcome",
    "pack_outcomes",
    "raise_or_return",
    "collect_local_modules",
    "install_shipped_modules",
    "MANIFEST",
    "CALL",
    "INPUTS",
    "RESULT",
    "RESULTS_DIR",
    "check_job_id",
    "Upstream",
    "replace_in",
]

MANIFEST = "job.json"
CALL = "call.pkl"
INPUTS = "inputs.bin"
RESULT = "result.pkl"
RESULTS_DIR = "results"

MAGIC = b"CLDX"
FORMAT = 1
_PREFIX = struct.Struct(">4sBI")  # magic, format, header length
_INDEX_MAGIC = b"CLDXIDX1"
_U64 = struct.Struct(">Q")

PY_VERSION = "%d.%d.%d" % sys.version_info[:3]


# A job id becomes a storage key, a URL path segment and a provider name:
# letters, digits, "-" and "_" only, so no "..", separator or scheme gets through.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def check_job_id(job_id: object, *, what: str = "job id") -> str:
    """Return ``job_id`` if it is a valid cloudexec job id.

    Raises:
        ValueError: not 1-128 letters, digits, ``-`` or ``_`` starting with a
            letter or digit (the message shows the value).
    """
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(
            f"{what} {job_id!r} is not a cloudexec job id: expected 1-128 letters, digits, '-' or '_' "
            "(no '.', '/', '\\' or URL scheme), like the job_id of a future"
        )
    return job_id


#: Digits of an array child's result name: arrays hold at most 10,000,000 children.
RESULT_DIGITS = 7


def result_name(index: int) -> str:
    """Name of array child ``index``'s result object in ``results/``: ``0000012.pkl``."""
    return f"{index:0{RESULT_DIGITS}d}.pkl"


def result_key(index: int | None) -> str:
    """Storage key of a job's result: ``result.pkl`` or ``results/<index, 7 digits>.pkl``."""
    return RESULT if index is None else f"{RESULTS_DIR}/{result_name(index)}"


def _dill() -> Any:
    import dill

    return dill


def pack(
    kind: str,
    obj: Any,
    *,
    ship_with: Sequence[bytes] = (),
    ship_names: Iterable[str] = (),
    ship: bool = False,
    **header: Any,
) -> bytes:
    """Serialize ``obj`` with dill into a versioned envelope.

    Args:
        kind: what the body is (``"call"``, ``"result"``).
        obj: the object to pickle.
        ship: add the source of client-only modules the pickle (and the
            ``ship_with`` pickles) refer to; see `collect_local_modules`.
        ship_with: other pickles travelling with this one (array inputs).
        ship_names: the `pickled_module_names` of pickles travelling with
            this one, gathered as they were made (an array's inputs, streamed).
        **header: extra JSON-serialisable header fields.

    Raises:
        PayloadError: ``obj`` cannot be pickled (the message names the cause).
    """
    dill = _dill()
    try:
        # recurse=True: a __main__ function that uses a module global would
        # otherwise fail remotely with NameError (observed with dill 0.4).
        body = dill.dumps(obj, recurse=True)
    except Exception as exc:
        raise PayloadError(f"cannot pickle the {kind} with dill: {type(exc).__name__}: {exc}") from exc
    if ship:
        modules = collect_local_modules([body, *ship_with], ship_names)
        if modules:
            header["modules"] = modules
    return pack_raw(kind, body, **header)


class _Appender:
    """A file for a pickler that appends to one bytearray (a big ``bytes`` argument is copied once, into it)."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer

    def write(self, data: Any) -> int:
        self.buffer += data
        return len(data)


class _ViewReader:
    """A file over a buffer whose reads are views: scanning a pickle copies none of its big arguments."""

    def __init__(self, buffer: bytearray, start: int) -> None:
        self.buffer, self.view, self.pos = buffer, memoryview(buffer), start

    def read(self, n: int = -1) -> bytes | memoryview:
        end = len(self.buffer) if n < 0 else min(self.pos + n, len(self.buffer))
        chunk, self.pos = self.view[self.pos : end], end
        return chunk if len(chunk) > 4096 else bytes(chunk)  # opcodes are decoded as bytes

    def readline(self) -> bytes:
        end = self.buffer.find(b"\n", self.pos)
        end = len(self.buffer) if end < 0 else end + 1
        line, self.pos = bytes(self.view[self.pos : end]), end
        return line

    def tell(self) -> int:
        return self.pos


#: Room left before a pickle made by `pack_with_room` for its envelope header
#: and a signature: when they fit (no shipped module sources), nothing is copied.
_ROOM = 4096


def pack_with_room(
    kind: str, obj: Any, *, room: int, ship: bool = False, **header: Any
) -> tuple[memoryview, int]:
    """`pack`, made in one buffer with ``room`` free bytes before the envelope.

    A large argument is copied once, into the pickle, and never again: the
    envelope header is written in front of the pickle in place, and the caller
    signs it there (`cloudexec._keys.seal_in_place`).

    Returns:
        A view of the buffer and the offset at which the envelope starts;
        at least ``room`` bytes precede it.

    Raises:
        PayloadError: ``obj`` cannot be pickled.
    """
    dill = _dill()
    buffer = bytearray(_ROOM)
    try:
        dill.dump(obj, _Appender(buffer), recurse=True)
    except Exception as exc:
        raise PayloadError(f"cannot pickle the {kind} with dill: {type(exc).__name__}: {exc}") from exc
    if ship:
        modules = collect_local_modules([], pickled_module_names(_ViewReader(buffer, _ROOM)))
        if modules:
            header["modules"] = modules
    prefix = pack_raw(kind, b"", **header)
    start = _ROOM - len(prefix)
    if start < room:
        # A big header (shipped module sources): one copy, behind enough room.
        start = room
        buffer[:_ROOM] = bytes(room) + prefix
    view = memoryview(buffer)
    view[start : start + len(prefix)] = prefix
    return view, start


def pack_raw(kind: str, body: bytes, **header: Any) -> bytes:
    """Wrap an already serialized body in an envelope (see `pack`)."""
    head = {
        "kind": kind,
        "python": PY_VERSION,
        "dill": _dill().__version__,
        "cloudexec": __version__,
        **header,
    }
    raw = json.dumps(head, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT, len(raw)) + raw + body


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Parse an envelope's header; returns it and the offset of the body.

    Raises:
        PayloadError: not a cloudexec envelope, or a newer format.
    """
    if len(data) < _PREFIX.size:
        raise PayloadError("truncated cloudexec envelope")
    magic, fmt, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError("not a cloudexec envelope (bad magic bytes)")
    if fmt > FORMAT:
        raise PayloadError(
            f"envelope format {fmt} is newer than this cloudexec ({__version__}) reads; upgrade cloudexec"
        )
    end = _PREFIX.size + length
    header: dict[str, Any] = json.loads(data[_PREFIX.size : end])
    return header, end


def check_python(header: dict[str, Any], *, where: str) -> None:
    """Refuse a dill body pickled by another Python minor version.

    Args:
        header: the envelope header.
        where: who is reading ("runner" or "client"), for the message.

    Raises:
        VersionMismatchError: naming both versions and the fix.
    """
    theirs = str(header.get("python", "?"))
    if theirs.split(".")[:2] != PY_VERSION.split(".")[:2]:
        writer = "client" if where == "runner" else "runner"
        raise VersionMismatchError(
            f"the {writer} pickled this {header.get('kind', 'payload')} with Python {theirs}, but the "
            f"{where} runs Python {PY_VERSION}; dill pickles do not travel across Python minor versions. "
            f"Run the client and the container image on the same Python minor version "
            f"(container/Dockerfile takes PYTHON_VERSION)."
        )


def unpack(data: bytes, *, where: str = "client") -> tuple[dict[str, Any], Any]:
    """Check and unpickle an envelope; returns ``(header, object)``.

    Raises:
        VersionMismatchError: pickled by another Python minor version.
        PayloadError: not an envelope, or unpickling failed.
    """
    header, offset = read_header(data)
    check_python(header, where=where)
    modules = header.get("modules")
    if modules:
        # Module source is code: only a call (verified by the runner before
        # this point) may carry it. A result never legitimately does.
        if where != "runner" or header.get("kind") != "call":
            raise IntegrityError(
                f"refused a {header.get('kind', 'payload')} carrying module source (a 'modules' header): only "
                "calls ship modules; this object was written to run code in the reader. It was not unpickled."
            )
        install_shipped_modules(modules)
    try:
        obj = _dill().loads(data[offset:])
    except Exception as exc:
        raise PayloadError(
            f"cannot unpickle the {header.get('kind', 'payload')} (written by cloudexec "
            f"{header.get('cloudexec')}, dill {header.get('dill')}): {type(exc).__name__}: {exc}"
        ) from exc
    return header, obj


def seal_result(key: bytes, job_id: str, index: int | None, outcomes: list[Outcome]) -> bytes:
    """A job's outcomes as a signed result object (see `cloudexec._keys`)."""
    from cloudexec import _keys

    return _keys.seal(key, "result", job_id, index, pack_outcomes(outcomes))


def open_result(keys: Sequence[bytes], job_id: str, index: int | None, data: bytes) -> list[Outcome]:
    """Verify, then unpickle, a result object; returns its outcomes.

    Raises:
        IntegrityError: the object is unsigned, tampered with, copied from
            another job or child, or carries module source.
        VersionMismatchError, PayloadError: as `unpack`.
    """
    return load_result(job_id, verify_result(keys, job_id, index, data))


def verify_result(keys: Sequence[bytes], job_id: str, index: int | None, data: bytes) -> bytes:
    """Verify a stored result object; returns its envelope, still pickled (see `open_result`).

    Raises:
        IntegrityError: unsigned, truncated, tampered with or copied (a
            half-written object fails here too).
    """
    from cloudexec import _keys

    return _keys.open_sealed(keys, "result", job_id, index, data, what=result_key(index))


def load_result(job_id: str, body: bytes) -> list[Outcome]:
    """Unpickle a verified result envelope (see `open_result`)."""
    header, outcomes = unpack(body, where="client")
    if header.get("kind") != "result" or not isinstance(outcomes, list):
        raise PayloadError(f"the result of job {job_id} is not a list of outcomes (kind {header.get('kind')!r})")
    return outcomes


# -- results of other jobs (futures passed as arguments) ------------------------


class Upstream:
    """Stands, in a stored call, for the result of another job of the same storage root.

    Attributes:
        job_id: the upstream job's cloudexec id.
        index: the upstream array's child whose result is meant; ``None``
            for a single job or a whole array.
        size: a whole array's number of children (its result is the list of
            every item's result); ``None`` otherwise.
        chunked: the upstream array packs several items per child (a child's
            result is then the list of its items' results).
    """

    __slots__ = ("job_id", "index", "size", "chunked")

    def __init__(self, job_id: str, index: int | None = None, size: int | None = None, chunked: bool = False) -> None:
        self.job_id = job_id
        self.index = index
        self.size = size
        self.chunked = chunked

    def __reduce__(self) -> Any:
        return (Upstream, (self.job_id, self.index, self.size, self.chunked))

    def __repr__(self) -> str:
        which = "" if self.index is None else f"[{self.index}]"
        return f"<result of job {self.job_id}{which}>"

    def value(self, read_outcomes: Any) -> Any:
        """The upstream's result, through ``read_outcomes(job_id, index) -> list of outcomes``.

        Raises:
            Exception: the upstream's own exception, if its stored outcome is one.
        """
        if self.size is not None:
            return [outcome_value(o) for i in range(self.size) for o in read_outcomes(self.job_id, i)]
        outcomes = read_outcomes(self.job_id, self.index)
        if self.chunked:
            return [outcome_value(o) for o in outcomes]
        return outcome_value(outcomes[0])


_ATOMS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def replace_in(obj: Any, swap: Any) -> Any:
    """``obj`` with ``swap(x)`` in place of each item ``x`` for which it returns something else than ``x``.

    Looks inside lists, tuples (named ones too), dicts (keys stay) and sets;
    a container is rebuilt only when something in it changed, so an argument
    without futures reaches the job as it was.
    """
    new = swap(obj)
    if new is not obj:
        return new
    if isinstance(obj, (list, tuple, set, frozenset)):
        # Plain values are by far the most common items (a million-number
        # list argument): they are passed over without a call.
        items = [x if type(x) in _ATOMS else replace_in(x, swap) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        values = {k: replace_in(v, swap) for k, v in obj.items()}
        if all(values[k] is v for k, v in obj.items()):
            return obj
        rebuilt = obj.copy()
        rebuilt.update(values)
        return rebuilt
    return obj


# -- array inputs ------------------------------------------------------------


def pack_inputs(chunks: Sequence[bytes]) -> bytes:
    """Concatenate pickled chunks behind an offset table, as one object.

    Layout: ``b"CLDXIDX1" | n (u64) | offsets[0..n] (u64 each) | data``;
    chunk i is ``data[offsets[i]:offsets[i+1]]``. A child thus needs two
    small range reads, whatever the size of the array.
    """
    buffer = InputsBuffer(len(chunks))
    for chunk in chunks:
        buffer.add(chunk)
    return bytes(buffer.getvalue())


class InputsBuffer:
    """`pack_inputs` built one chunk at a time, in one buffer: the chunks are never all held twice."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._added = 0
        # The table's size is known up front, so each offset is written in place.
        self._buffer = bytearray(_INDEX_MAGIC + _U64.pack(count) + bytes(8 * (count + 1)))
        self._data_start = len(self._buffer)

    def add(self, chunk: bytes) -> None:
        """Append the next chunk (raises ValueError past the count given)."""
        if self._added >= self._count:
            raise ValueError(f"an inputs table for {self._count} chunks got one more")
        self._buffer += chunk
        self._added += 1
        _U64.pack_into(self._buffer, 16 + 8 * self._added, len(self._buffer) - self._data_start)

    def getvalue(self) -> bytearray:
        """The whole object (not a copy); ValueError if fewer chunks than the count were added."""
        if self._added != self._count:
            raise ValueError(f"an inputs table for {self._count} chunks got {self._added}")
        return self._buffer


def read_input_slice(read: Any, index: int, count: int | None = None) -> bytes:
    """Read chunk ``index`` of an inputs object through ``read(start, end)``.

    ``count``, the number of chunks (the ``children`` header of the array's
    call, which the runner verified), spares the read of the table's own
    header: on object stores every read is a request.
    """
    if count is None:
        head = read(0, 16)
        if head[:8] != _INDEX_MAGIC:
            raise PayloadError("inputs object is not a cloudexec inputs table")
        (count,) = _U64.unpack_from(head, 8)
    if not 0 <= index < count:
        raise PayloadError(f"array index {index} is outside the job's {count} children")
    table_start = 16 + 8 * index
    lo, hi = struct.unpack(">QQ", read(table_start, table_start + 16))
    data_start = 16 + 8 * (count + 1)
    return bytes(read(data_start + lo, data_start + hi))


def dumps_chunk(items: Sequence[tuple[Any, ...]]) -> bytes:
    """Pickle one child's argument tuples (raises PayloadError)."""
    try:
        return bytes(_dill().dumps(list(items), recurse=True))
    except Exception as exc:
        raise PayloadError(f"cannot pickle map arguments with dill: {type(exc).__name__}: {exc}") from exc


# Exact types the stdlib pickler writes as dill does, without naming any module
# (no GLOBAL opcode): ints, strings, lists of floats ... the usual map inputs.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})
_PLAIN_DEPTH = 4


def _is_plain(obj: Any, depth: int = 0) -> bool:
    kind = type(obj)
    if kind in _PLAIN_TYPES:
        return True
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is tuple or kind is list:
        return all(_is_plain(item, depth + 1) for item in obj)
    if kind is dict:
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in obj.items())
    return False


def dumps_chunk_modules(items: Sequence[tuple[Any, ...]]) -> tuple[bytes, set[str]]:
    """`dumps_chunk`, and the loaded modules its pickle refers to (`pickled_module_names`).

    Plain data (numbers, strings, bytes, None and lists, tuples and dicts of
    them) is pickled by the stdlib's C pickler and refers to no module: dill's
    pure-Python pickler and the scan of its opcodes cost some 15 µs per child,
    more than the rest of a map's submit. Anything else goes through dill.
    """
    chunk = list(items)
    if _is_plain(chunk):
        return pickle.dumps(chunk, protocol=pickle.DEFAULT_PROTOCOL), set()
    pickled = dumps_chunk(chunk)
    return pickled, pickled_module_names(pickled)


# -- outcomes ----------------------------------------------------------------

#: One call's outcome: ``("ok", value)`` or ``("err", exc_or_None, type_name, message, traceback)``.
Outcome = tuple


def capture(fn: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Outcome:
    """Run ``fn(*args, **kwargs)`` and return its outcome."""
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit inside a job are results too
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return ("err", exc, _type_name(exc), str(exc), tb)


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def pack_outcomes(outcomes: list[Outcome], **header: Any) -> bytes:
    """Envelope a list of outcomes, degrading what dill cannot pickle.

    An unpicklable exception travels as `RemoteError` (type name and message
    kept); an unpicklable return value becomes a `PayloadError` outcome, so a
    result object is always written. What was degraded is replaced in
    ``outcomes`` too, so that the caller reports (and exits with) what was stored.
    """
    ok = all(o[0] == "ok" for o in outcomes)
    try:
        return pack("result", outcomes, ok=ok, **header)
    except PayloadError:
        pass
    dill = _dill()
    safe: list[Outcome] = []
    for outcome in list(outcomes):
        try:
            dill.dumps(outcome, recurse=True)
            safe.append(outcome)
        except Exception as exc:  # noqa: BLE001
            if outcome[0] == "ok":
                err = PayloadError(f"the job's return value cannot be pickled: {type(exc).__name__}: {exc}")
                safe.append(("err", err, _type_name(err), str(err), ""))
                ok = False
            else:
                _, _, type_name, message, tb = outcome
                safe.append(("err", RemoteError(type_name, message), type_name, message, tb))
    outcomes[:] = safe
    return pack("result", safe, ok=ok, **header)


def outcome_value(outcome: Outcome) -> Any:
    """Return an outcome's value, or raise its exception with the remote traceback as ``__cause__``."""
    if outcome[0] == "ok":
        return outcome[1]
    _, exc, type_name, message, tb = outcome
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    raise exc


def raise_or_return(outcomes: list[Outcome]) -> Any:
    """The single outcome's value (single jobs)."""
    return outcome_value(outcomes[0])


# -- shipping modules that the runner cannot import --------------------------

_NOT_LOCAL: tuple[str, ...] = ()


def _not_local_roots() -> tuple[str, ...]:
    global _NOT_LOCAL
    if not _NOT_LOCAL:
        roots = {os.path.dirname(os.__file__)}
        paths = sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                roots.add(paths[key])
        roots.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "cloudexec")
        _NOT_LOCAL = tuple(os.path.realpath(r) for r in roots)
    return _NOT_LOCAL


def _is_local_module(module: types.ModuleType) -> bool:
    """Whether ``module`` is the user's own source (not stdlib, not installed, not cloudexec)."""
    filename = getattr(module, "__file__", None)
    if not filename or not filename.endswith(".py") or module.__name__ == "__main__":
        return False
    return _is_local_file(filename)


@functools.lru_cache(maxsize=4096)
def _is_local_file(filename: str) -> bool:
    # Cached: realpath costs a few lstat calls per path component, and every
    # submit asks again about the same handful of modules.
    real = os.path.realpath(filename)
    if "site-packages" in real or "dist-packages" in real:
        return False
    return not any(real.startswith(root + os.sep) for root in _not_local_roots())


def pickled_module_names(body: bytes | _ViewReader) -> set[str]:
    """Names of loaded modules that a pickle refers to (by-reference globals)."""
    import pickletools

    names: set[str] = set()
    for opcode, arg, _ in pickletools.genops(body):  # type: ignore[arg-type]  # _ViewReader reads like a file
        if not isinstance(arg, str):
            continue
        if opcode.name == "GLOBAL":
            arg = arg.split(" ", 1)[0]
        elif "UNICODE" not in opcode.name:
            continue
        if arg in sys.modules:
            names.add(arg)
    return names


@functools.lru_cache(maxsize=256)
def _imports_at_load(source: str, name: str, is_pkg: bool) -> frozenset[str]:
    """Modules that running ``source`` (module ``name``) imports at load time.

    Function bodies are skipped: their imports run only when called, and are
    found through the pickle if the call needs them.
    """
    import ast

    # Cached by source text: parsing a module costs milliseconds, and a
    # source edited between submits is a new key.
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return frozenset()
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1]) if node.level <= len(parts) else ""
                base = f"{anchor}.{base}".strip(".") if base else anchor
            if base:
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return frozenset(found)


def collect_local_modules(bodies: Iterable[bytes], names: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Source of the user modules a call needs: those its pickles refer to, and what they import.

    dill pickles functions and classes of importable modules by reference, so
    a job would fail with ModuleNotFoundError when the module exists only on
    the client (a script's helper file, a notebook's folder). Their source is
    shipped in the call's header and served to the runner by an import hook
    that comes *after* the installed modules, so an installed copy wins.
    Reading the module names out of the pickle itself also finds functions
    wrapped by other libraries (scipy's ``workers=ex.map`` wraps the objective).

    Only modules needed to load those are added (their parent packages and
    the modules their top-level code imports), never every module reachable
    from their globals: a ``config.py`` the call does not import stays home.
    """
    pending: list[str] = list(names)  # already read out of pickles made earlier
    for body in bodies:
        pending.extend(pickled_module_names(body))
    shipped: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is None or not _is_local_module(module):
            continue
        assert module.__file__ is not None
        try:
            with open(module.__file__, encoding="utf-8") as fh:
                source = fh.read()
        except OSError:
            continue
        is_pkg = os.path.basename(module.__file__) == "__init__.py"
        shipped[name] = {"source": source, "package": is_pkg, "file": module.__file__}
        if "." in name:
            pending.append(name.rsplit(".", 1)[0])
        pending.extend(m for m in _imports_at_load(source, name, is_pkg) if m not in seen)
    return shipped


class _ShippedModules:
    """Import hook serving shipped module sources (a meta path finder + loader)."""

    def __init__(self) -> None:
        self.sources: dict[str, dict[str, Any]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        entry = self.sources.get(fullname)
        if entry is None:
            return None
        import importlib.util

        loader: Any = self
        return importlib.util.spec_from_loader(fullname, loader, origin=entry["file"], is_package=entry["package"])

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        entry = self.sources[module.__name__]
        module.__file__ = entry["file"]
        code = compile(entry["source"], entry["file"], "exec")
        exec(code, module.__dict__)  # noqa: S102 - this is the user's own shipped code


_HOOK = _ShippedModules()


def install_shipped_modules(modules: dict[str, dict[str, Any]]) -> None:
    """Make shipped sources importable, behind anything installed."""
    if not modules:
        return
    _HOOK.sources.update(modules)
    if _HOOK not in sys.meta_path:
        sys.meta_path.append(_HOOK)
