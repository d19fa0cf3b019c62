"""A tqdm bar for an array job: ``map(..., progress=True)``/``submit_map(..., progress=True)``.

The bar is driven by the array's status counts that the executor's manager
thread already fetches on every poll (the last `JobInfo` it stored on the
array's future), so showing progress costs no extra provider call. A small
daemon thread redraws the bar from those counts, grouped by `Phase`
(queued / running / succeeded / failed), until the array's future is done.
``tqdm.auto`` picks the notebook widget inside Jupyter and a text bar
elsewhere.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from cloudexec._provider import JobStatus, Phase

if TYPE_CHECKING:
    from cloudexec._base import ArrayFuture

__all__ = ["load_tqdm", "ProgressBar"]

# Redraws per second at most; the counts change only once per poll anyway.
_REDRAW_S = 0.25


def load_tqdm() -> Any:
    """The tqdm class to draw with.

    Raises:
        ImportError: tqdm is not installed (the message says how to install it).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "progress=True draws a tqdm progress bar, but tqdm is not installed: pip install tqdm "
            "(or pip install 'cloudexec[progress]'), or leave progress off"
        ) from exc
    return tqdm


class ProgressBar:
    """Shows one array job's progress until its future is done.

    Args:
        array: the array job's future.
        status_enum: the provider's status table, to turn status names into phases.
        tqdm_class: what `load_tqdm` returned.
    """

    def __init__(self, array: ArrayFuture[Any], status_enum: type[JobStatus], tqdm_class: Any) -> None:
        self._array = array
        self._status_enum = status_enum
        self._wake = threading.Event()
        self._bar = tqdm_class(total=array.size, desc=array._record.name, unit="job", dynamic_ncols=True)
        self._thread = threading.Thread(target=self._run, name="cloudexec-progress", daemon=True)

    def start(self) -> None:
        """Start redrawing; the bar closes by itself when the array's future is done."""
        self._array.add_done_callback(lambda _: self._wake.set())
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the bar has drawn its last state and closed."""
        self._thread.join(timeout)

    def counts(self) -> dict[Phase, int]:
        """Children per phase, from the last status the manager fetched."""
        counts = {phase: 0 for phase in Phase}
        info = self._array._info
        by_name = info.status_counts if info is not None else None
        if not by_name:
            counts[Phase.QUEUED] = self._array.size
            return counts
        for name, n in by_name.items():
            try:
                phase = self._status_enum.parse(name).phase
            except ValueError:
                continue  # a status this table does not know: not counted rather than guessed
            counts[phase] += n
        return counts

    def _draw(self) -> None:
        counts = self.counts()
        self._bar.n = counts[Phase.SUCCEEDED] + counts[Phase.FAILED]
        self._bar.set_postfix({phase.value: counts[phase] for phase in Phase}, refresh=False)
        self._bar.refresh()

    def _run(self) -> None:
        try:
            while not self._array.done():
                self._draw()
                self._wake.wait(_REDRAW_S)
            self._draw()
        finally:
            self._bar.close()
