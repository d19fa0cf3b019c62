"""Where calls and results live: a thin key/value view over a folder URL.

The runner's cold start matters (every job pays it), so local folders
(``file://`` and plain paths) are served with ``os`` alone and fsspec, with
its protocol drivers (s3fs, adlfs), is imported only for other URLs.

Writes are atomic for every reader: locally through a temporary file and
``os.replace``; on object stores a single PUT already publishes an object whole.
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from typing import Any, Protocol
from urllib.parse import urlparse

from cloudexec.errors import StorageError

__all__ = ["Store", "open_store", "is_local_url", "local_path"]


class Store(Protocol):
    """A folder of objects addressed by ``/``-separated keys relative to ``url``."""

    url: str

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Publish ``data`` under ``key`` atomically, replacing any older object."""

    def write_many(self, items: dict[str, bytes | bytearray | memoryview]) -> None:
        """`write` each ``key: data`` (concurrently where the store can); raise if any write failed."""

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Read the object (or the byte range ``[start, end)``); FileNotFoundError if absent."""

    def read_many(self, keys: list[str]) -> dict[str, bytes | None | Exception]:
        """Read many whole objects at once.

        Returns:
            Per key its bytes, ``None`` if it is absent, or the error reading it
            raised (the others are still read: one failed read does not hold
            back the rest).
        """

    def exists(self, key: str) -> bool:
        """Whether an object exists under ``key``."""

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        """Names (not keys) of the objects directly below folder ``prefix``; [] if none.

        With ``start_after``, only the names sorting after it, in name order;
        object stores that can list from a key are asked for those alone.
        """

    def delete(self, prefix: str) -> None:
        """Delete the object or folder ``prefix`` and everything below it; no error if absent."""

    def child(self, key: str) -> Store:
        """A store rooted at the sub-folder ``key``."""


def is_local_url(url: str) -> bool:
    """Whether ``url`` names a folder on this machine (``file://`` or a plain path)."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> str:
    """The filesystem path behind a local URL."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


class LocalStore:
    """`Store` over a local folder using only ``os``."""

    def __init__(self, url: str) -> None:
        self.path = os.path.abspath(local_path(url))
        self.url = "file://" + self.path

    def _p(self, key: str) -> str:
        return os.path.join(self.path, *key.split("/")) if key else self.path

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        target = self._p(key)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        # Same-folder temporary file so that os.replace is an atomic rename.
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)

    def write_many(self, items: dict[str, bytes | bytearray | memoryview]) -> None:
        for key, data in items.items():
            self.write(key, data)

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(self._p(key), "rb") as fh:
            if start is None and end is None:
                return fh.read()
            fh.seek(start or 0)
            return fh.read(-1 if end is None else end - (start or 0))

    def read_many(self, keys: list[str]) -> dict[str, bytes | None | Exception]:
        out: dict[str, bytes | None | Exception] = {}
        for key in keys:
            try:
                out[key] = self.read(key)
            except FileNotFoundError:
                out[key] = None
            except Exception as exc:  # noqa: BLE001 - handed to the caller, per key
                out[key] = exc
        return out

    def exists(self, key: str) -> bool:
        return os.path.exists(self._p(key))

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        try:
            names = [n for n in os.listdir(self._p(prefix)) if not n.startswith(".tmp-")]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return names if start_after is None else sorted(n for n in names if n > start_after)

    def delete(self, prefix: str) -> None:
        import shutil

        target = self._p(prefix)
        if os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)
        elif os.path.exists(target):
            os.remove(target)

    def child(self, key: str) -> LocalStore:
        return LocalStore(self._p(key))


class FsspecStore:
    """`Store` over any fsspec filesystem (s3fs, adlfs, memory, …)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, fs: Any = None) -> None:
        import fsspec.core

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        if fs is None:
            fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        else:
            path = fs._strip_protocol(self.url)
        self.fs = fs
        self.root = path.rstrip("/")
        self._first_part = _protocol(fs) in _READ_FIRST_PART

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        # Not every fsspec backend takes a bytearray or a view (an array's
        # inputs and a call are built in one buffer): those are given bytes.
        self.fs.pipe_file(self._p(key), bytes(data) if not isinstance(data, bytes) else data)

    def write_many(self, items: dict[str, bytes | bytearray | memoryview]) -> None:
        if len(items) == 1:
            key, data = next(iter(items.items()))
            self.write(key, data)
            return
        # fsspec's bulk pipe: s3fs and adlfs send the PUTs concurrently.
        self.fs.pipe({self._p(key): data if isinstance(data, bytes) else bytes(data) for key, data in items.items()})

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._p(key)
        if start is None and end is None and self._first_part:
            data = self._read_first_part(path)
            if data is not None:
                return data
        whole: bytes = self.fs.cat_file(path, start=start, end=end)
        return whole

    def _read_first_part(self, path: str) -> bytes | None:
        """The whole object if it fits in one first ranged read; None if it may be bigger (or is empty)."""
        try:
            data = self.fs.cat_file(path, start=0, end=_FIRST_PART_BYTES)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None  # S3 has no byte range of an empty object
            raise
        return bytes(data) if len(data) < _FIRST_PART_BYTES else None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None | Exception]:
        if len(keys) == 1:
            try:
                return {keys[0]: self.read(keys[0])}
            except FileNotFoundError:
                return {keys[0]: None}
            except Exception as exc:  # noqa: BLE001 - handed to the caller, per key
                return {keys[0]: exc}
        paths = {self._p(key): key for key in keys}
        # fsspec's bulk cat: s3fs and adlfs send the GETs concurrently.
        ranged = {"start": 0, "end": _FIRST_PART_BYTES} if self._first_part else {}
        answers = self.fs.cat(list(paths), on_error="return", **ranged)
        out: dict[str, bytes | None | Exception] = {}
        for path, key in paths.items():
            answer = answers.get(path, answers.get(self.fs._strip_protocol(path)))
            if ranged and _maybe_partial(answer):
                try:
                    answer = self.fs.cat_file(path)
                except Exception as exc:  # noqa: BLE001 - handed to the caller, per key
                    answer = exc
            if isinstance(answer, FileNotFoundError) or answer is None:
                out[key] = None
            elif isinstance(answer, Exception):
                out[key] = answer
            else:
                out[key] = bytes(answer)
        return out

    def exists(self, key: str) -> bool:
        path = self._p(key)
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        path = self._p(prefix)
        # Listings are cached by s3fs/adlfs, and a cached folder listing makes
        # them answer "not found" for newer objects in it: a poller must see them.
        self.fs.invalidate_cache(path)
        if start_after is not None:
            lister = _LIST_AFTER.get(_protocol(self.fs))
            if lister is not None:
                return sorted(n for n in lister(self.fs, path, start_after) if n > start_after)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return names if start_after is None else sorted(n for n in names if n > start_after)

    def delete(self, prefix: str) -> None:
        path = self._p(prefix)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def child(self, key: str) -> FsspecStore:
        return FsspecStore(f"{self.url}/{key}", self.storage_options, fs=self.fs)


# s3fs reads a whole object with a HEAD (to choose a concurrent download) and then a GET,
# and finds a key missing with a HEAD and a LIST. Every job reads its call and looks for
# an earlier result that way, so whole objects are first asked for as one ranged GET of
# their first part, which answers both in one request; only a bigger object (or an empty
# one, which has no byte range) is then read s3fs's own way.
_READ_FIRST_PART = frozenset({"s3", "s3a"})
_FIRST_PART_BYTES = 1 << 20


def _maybe_partial(answer: Any) -> bool:
    """Whether a first-part answer may not be the whole object (as big as the part, or empty)."""
    if isinstance(answer, (bytes, bytearray)):
        return len(answer) >= _FIRST_PART_BYTES
    return isinstance(answer, OSError) and not isinstance(answer, FileNotFoundError) and answer.errno == errno.EINVAL


def _protocol(fs: Any) -> str:
    protocol = getattr(fs, "protocol", "")
    return str(protocol[0] if isinstance(protocol, (tuple, list)) else protocol)


def _list_after_s3(fs: Any, path: str, start_after: str) -> list[str]:
    """Names below ``path`` after ``start_after``: ListObjectsV2 with ``StartAfter`` (1,000 per page)."""
    bucket, key, _ = fs.split_path(path)
    prefix = f"{key}/" if key else ""
    names: list[str] = []
    token: str | None = None
    while True:
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1000}
        if token is not None:
            request["ContinuationToken"] = token
        else:
            request["StartAfter"] = prefix + start_after
        page = fs.call_s3("list_objects_v2", **request)
        names += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return names


def _list_after_blob(fs: Any, path: str, start_after: str) -> list[str]:
    """Names below ``path`` from ``start_after`` on: List Blobs with ``startFrom`` (a service that
    ignores it answers every name, which the caller filters)."""
    from fsspec.asyn import sync

    container, key, _ = fs.split_path(path)
    prefix = f"{key}/" if key else ""

    async def names() -> list[str]:
        async with fs.service_client.get_container_client(container) as client:
            blobs = client.list_blobs(name_starts_with=prefix, start_from=prefix + start_after)
            return [blob.name[len(prefix) :] async for blob in blobs if "/" not in blob.name[len(prefix) :]]

    try:
        return list(sync(fs.loop, names))
    except Exception as exc:
        if type(exc).__name__ == "ResourceNotFoundError":
            return []
        raise


# Object stores that list from a key, by fsspec protocol: a poller then lists
# only results that are new instead of every result at each poll.
_LIST_AFTER = {"s3": _list_after_s3, "s3a": _list_after_s3, "abfs": _list_after_blob, "abfss": _list_after_blob, "az": _list_after_blob}


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open the folder ``url`` as a `Store`.

    Args:
        url: ``file://``/plain path, or any fsspec URL (``s3://``, ``az://``,
            ``memory://``).
        storage_options: keyword arguments for the fsspec filesystem.

    Raises:
        StorageError: no fsspec driver can open the URL (its message says
            which package to install).
    """
    if is_local_url(url) and not storage_options:
        return LocalStore(url)
    try:
        return FsspecStore(url, storage_options)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        raise StorageError(
            f"cannot open storage {url!r}: {exc}. Install the fsspec driver for {protocol}:// "
            "(the extra of the provider that stores there: pip install 'cloudexec[<provider>]')."
        ) from exc


def new_token() -> str:
    """A short random token for unique names."""
    return uuid.uuid4().hex[:10]


def make_temp_root(*, remove_at_exit: bool = True) -> str:
    """A fresh private temporary folder, as a ``file://`` URL.

    Removed when the interpreter exits normally (like the files of a
    ``ProcessPoolExecutor``, nothing is left behind); pass an ``io_root`` of
    your own to keep jobs for re-attaching from another process.
    """
    path = tempfile.mkdtemp(prefix="cloudexec-")
    if remove_at_exit:
        import atexit
        import shutil

        atexit.register(shutil.rmtree, path, True)
    return "file://" + path
