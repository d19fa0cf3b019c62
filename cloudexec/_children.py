"""The children of one array job, kept compactly: one byte of state per child.

A 100,000-item map must not cost a `concurrent.futures.Future` (with its own
``Condition`` and lock, about 1.7 KB) per child. So the manager records each
child's end here — a state byte, and its outcomes until they are taken —
and a child's `BatchFuture` is made only when someone asks for it
(``array.children``, ``attach("<id>[i]")``, a dependency on the child). A
future made after its child ended is made finished. ``map()`` waits on the one
condition of the array and takes each child's outcomes out, so a value is
dropped once it was yielded, as the stdlib's ``map`` drops each future.

Only the manager thread records ends (`Children.finish`, `Children.fail_pending`);
``cancel`` marks what is still pending; everything else reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from cloudexec import _payload
from cloudexec.errors import PayloadError

if TYPE_CHECKING:
    from cloudexec._futures import BatchFuture

__all__ = ["Children", "naming_the_job", "PENDING", "OK", "FAILED", "CANCELLED"]

# A child's state byte.
PENDING = 0
OK = 1  # every outcome a value
FAILED = 2  # an error (in ``errors``, or the shared one); outcomes kept too when it is a user exception
CANCELLED = 3

_CANCEL_PENDING = bytes.maketrans(bytes([PENDING]), bytes([CANCELLED]))
_FAIL_PENDING = bytes.maketrans(bytes([PENDING]), bytes([FAILED]))


def naming_the_job(exc: BaseException, job_id: str) -> BaseException:
    """cloudexec's own payload errors name the job they belong to (user exceptions stay as raised)."""
    if type(exc) is PayloadError and job_id not in str(exc):
        named = PayloadError(f"job {job_id}: {exc}")
        named.__cause__ = exc
        return named
    return exc


class Children:
    """Per-child state of an array job; futures made on demand (see the module docstring).

    Args:
        size: number of children.
        job_id: the array's job id (a child's is ``<job_id>[<index>]``).
        make: builds child ``index``'s future (unfinished); called under the lock.
    """

    def __init__(
        self,
        size: int,
        job_id: str,
        make: Callable[[int], BatchFuture[Any]] | None = None,
    ) -> None:
        self.size = size
        self.job_id = job_id
        self.state = bytearray(size)
        self.done_count = 0
        # What each ended child left until it is taken: its outcomes (map and
        # the array's result take them), and the errors of failed children.
        self.outcomes: dict[int, list[Any]] = {}
        self.errors: dict[int, BaseException] = {}
        # Every pending child failed with one error, made per child on demand.
        self.shared_error: Callable[[str], BaseException] | None = None
        # The values of the whole array once its result is built (submit_map):
        # a child future made afterwards takes its slice, no second copy.
        self.values: list[Any] | None = None
        self.chunksize = 1
        self.futures: dict[int, BatchFuture[Any]] = {}
        self.cond = threading.Condition()
        self._make = make

    def __len__(self) -> int:
        return self.size

    # -- reading ----------------------------------------------------------------
    def done(self, index: int) -> bool:
        return self.state[index] != PENDING

    def all_done(self) -> bool:
        return self.done_count >= self.size

    def pending(self) -> Iterator[int]:
        """Indices of the children that have not ended, in order (a C-speed scan of the state bytes)."""
        state, index = self.state, -1
        while True:
            index = state.find(PENDING, index + 1)
            if index < 0:
                return
            yield index

    def first_problem(self) -> tuple[int, int] | None:
        """The first child that failed or was cancelled, with its state; None if none did."""
        found = [(i, code) for code in (FAILED, CANCELLED) if (i := self.state.find(code)) >= 0]
        return min(found) if found else None

    def child_id(self, index: int) -> str:
        return f"{self.job_id}[{index}]"

    def error(self, index: int) -> BaseException:
        """The error of a FAILED child."""
        error = self.errors.get(index)
        if error is None:
            assert self.shared_error is not None
            error = self.shared_error(self.child_id(index))
        return error

    def get(self, index: int) -> BatchFuture[Any]:
        """Child ``index``'s future, made now (finished if the child ended) if nobody asked before."""
        with self.cond:
            future = self.futures.get(index)
            if future is not None:
                return future
            assert self._make is not None
            future = self.futures[index] = self._make(index)
            if self.state[index] == CANCELLED:
                future._cancel_state()
            elif self.state[index] != PENDING:
                self._settle(index, future)
            return future

    def _settle(self, index: int, future: BatchFuture[Any]) -> None:
        if self.state[index] == OK:
            future._finish(result=self._value(index))
        else:
            future._finish(exception=self.error(index))

    def _value(self, index: int) -> Any:
        outcomes = self.outcomes.get(index)
        if outcomes is None:
            if self.values is None:
                return None  # map() took it: like the stdlib, it is not kept
            start = index * self.chunksize
            if self.chunksize == 1:
                return self.values[start]
            return self.values[start : start + self.chunksize]
        values = [_payload.outcome_value(o) for o in outcomes]
        return values[0] if self.chunksize == 1 else values

    # -- the manager's writes ---------------------------------------------------------
    def finish(self, index: int, outcomes: list[Any] | BaseException) -> None:
        """Record child ``index``'s end (its outcomes, or the error naming it), and finish its future if one was made.

        Does nothing to a child that already ended (cancelled meanwhile).
        """
        with self.cond:
            if self.state[index] != PENDING:
                return
            if isinstance(outcomes, BaseException):
                self.errors[index] = outcomes
                code = FAILED
            else:
                self.outcomes[index] = outcomes
                code = OK
                for outcome in outcomes:
                    if outcome[0] != "ok":
                        try:
                            _payload.outcome_value(outcome)
                        except BaseException as exc:  # noqa: BLE001 - the user's exception, raised later
                            self.errors[index] = naming_the_job(exc, self.child_id(index))
                        code = FAILED
                        break
            self.state[index] = code
            self.done_count += 1
            self.cond.notify_all()
            future = self.futures.get(index)
        if future is not None:
            self._settle(index, future)  # outside the lock: its done-callbacks run now

    def keep_values(self, values: list[Any]) -> None:
        """The array's result is ``values``: children's futures made from now on take their slice of it."""
        with self.cond:
            self.values = values
            self.outcomes.clear()

    def fail_pending(self, error: Callable[[str], BaseException]) -> list[BatchFuture[Any]]:
        """End every pending child with ``error(child job id)``; returns their futures that were made."""
        with self.cond:
            self.shared_error = error
            made = [f for i, f in self.futures.items() if self.state[i] == PENDING]
            count = self.size - self.done_count
            self.state[:] = self.state.translate(_FAIL_PENDING)
            self.done_count += count
            self.cond.notify_all()
        return made

    def cancel_pending(self) -> list[BatchFuture[Any]]:
        """Mark every pending child cancelled; returns their futures that were made (to be notified)."""
        with self.cond:
            made = [f for i, f in self.futures.items() if self.state[i] == PENDING]
            count = self.size - self.done_count
            self.state[:] = self.state.translate(_CANCEL_PENDING)
            self.done_count += count
            self.cond.notify_all()
        return made

    # -- map's reading ------------------------------------------------------------------
    def wait(self, index: int, end_time: float | None) -> int:
        """Wait until child ``index`` ended; its state. Raises TimeoutError at ``end_time`` (monotonic)."""
        with self.cond:
            while self.state[index] == PENDING:
                remaining = None if end_time is None else end_time - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError()
                self.cond.wait(remaining)
            return self.state[index]

    def take(self, index: int) -> list[Any] | None:
        """Child ``index``'s outcomes, let go of (``map`` yields each value once)."""
        with self.cond:
            outcomes = self.outcomes.pop(index, None)
            future = self.futures.get(index)
        if outcomes is not None and future is not None:
            with future._condition:
                future._result = None
        return outcomes
