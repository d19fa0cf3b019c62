"""Functions the tests run as jobs.

This module is NOT importable by the runner processes (the tests folder is
not on their path), so every job here also exercises cloudexec's shipping of
client-only module sources.
"""

from __future__ import annotations

import os
import sys
import time

OFFSET = 10  # a module global the jobs read remotely


def double(x: int) -> int:
    return 2 * x


def add(a: int, b: int = 0, *, memory: str = "", timeout: int = 0) -> tuple[int, str, int]:
    """Takes keyword arguments named like job settings: they must reach the function."""
    return a + b, memory, timeout


def offset(x: int) -> int:
    return x + OFFSET


def shout(text: str) -> str:
    print(f"stdout says {text}")
    print(f"stderr says {text}", file=sys.stderr)
    return text.upper()


class Boom(ValueError):
    """A user exception type that must come back as itself."""


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise Boom(f"item {x} is bad")
    return x


def nap(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def exit_hard(code: int) -> None:
    sys.stdout.flush()
    os._exit(code)


def hog(mib: int, hold_s: float = 3.0) -> int:
    block = b"x" * (mib * 1024 * 1024)
    time.sleep(hold_s)
    return len(block)


def flaky(counter_path: str, fail_times: int) -> int:
    """Fails (exit code 1) the first ``fail_times`` attempts, counted in a file."""
    try:
        with open(counter_path) as fh:
            count = int(fh.read() or 0)
    except FileNotFoundError:
        count = 0
    with open(counter_path, "w") as fh:
        fh.write(str(count + 1))
    if count < fail_times:
        raise RuntimeError(f"attempt {count + 1} fails on purpose")
    return count + 1


def env(name: str) -> str | None:
    return os.environ.get(name)


def unpicklable_result() -> object:
    return (x for x in range(3))  # generators cannot be pickled


def sphere(x: "list[float]") -> float:
    return float(sum(v * v for v in x))


# -- the crash matrix ------------------------------------------------------------------


def segfault() -> None:
    import ctypes

    print("about to segfault", flush=True)
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exit_hard_after_output(code: int) -> None:
    print("about to os._exit", flush=True)
    os._exit(code)


def exit_soft(code: int) -> None:
    print("about to sys.exit", flush=True)
    sys.exit(code)


def _refuse_to_load(where: str) -> None:
    raise RuntimeError(f"this object cannot be unpickled ({where})")


class LoadsNowhere:
    """Pickles fine; unpickling it always fails (in the job for an argument, on the client for a result)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _refuse_to_load, ("LoadsNowhere",)


def identity(x: object) -> object:
    return x


def unloadable_result() -> LoadsNowhere:
    return LoadsNowhere()


def flaky_after(counter_path: str, fail_times: int, nap_s: float) -> int:
    """Sleeps ``nap_s``, then behaves like `flaky`."""
    time.sleep(nap_s)
    return flaky(counter_path, fail_times)


class Dummy:
    """A plain object to hold a weak reference to."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def double(self) -> int:
        return 2 * self.value


def make_dummy(value: int) -> Dummy:
    return Dummy(value)


def slow_double(x: int, seconds: float = 0.3) -> int:
    time.sleep(seconds)
    return 2 * x


def wait_for_file(path: str, value: object, timeout_s: float = 120.0) -> object:
    """Return ``value`` once ``path`` exists (a gate the test opens)."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)
    return value


def echo(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


def total(values: "list[int]") -> int:
    return sum(values)


def touch(path: str, *_: object) -> str:
    """Create ``path`` (proves the job ran)."""
    with open(path, "a", encoding="utf-8"):
        pass
    return path


def append_line_unless(path: str, line: object, bad: object) -> int:
    """`append_line`, then raise `Boom` when ``line == bad``."""
    count = append_line(path, line)
    if line == bad:
        raise Boom(f"line {line} is bad")
    return count


def append_line(path: str, line: object) -> int:
    """Append ``line`` to ``path``; return how many lines it holds now."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{line}\n")
    with open(path, encoding="utf-8") as fh:
        return len(fh.read().splitlines())
