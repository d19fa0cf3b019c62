"""map/submit_map(progress=True): a tqdm bar driven by the array's status counts."""

from __future__ import annotations

import re
import sys
from typing import Any

import jobs as J
import pytest

from cloudexec import LocalBatchExecutor
from cloudexec._progress import ProgressBar


def _final_line(text: str) -> str:
    # tqdm redraws with carriage returns; the last drawing is the final state.
    return [part for part in re.split(r"[\r\n]", text) if part.strip()][-1]


@pytest.fixture
def ex(io_root: str) -> Any:
    with LocalBatchExecutor(io_root=io_root, max_workers=2) as executor:
        yield executor


@pytest.mark.timeout(120)
def test_map_progress_bar_ends_with_every_child_counted(ex: LocalBatchExecutor, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(ex.map(J.double, range(6), progress=True)) == [0, 2, 4, 6, 8, 10]
    _wait_for_bars()
    line = _final_line(capsys.readouterr().err)
    assert "6/6" in line, line
    assert "queued=0" in line and "running=0" in line and "succeeded=6" in line and "failed=0" in line, line


@pytest.mark.timeout(120)
def test_submit_map_progress_counts_failures(ex: LocalBatchExecutor, capsys: pytest.CaptureFixture[str]) -> None:
    arr = ex.submit_map(J.fail_on, range(4), progress=True)
    with pytest.raises(J.Boom):
        arr.result(timeout=60)
    _wait_for_bars()
    line = _final_line(capsys.readouterr().err)
    assert "4/4" in line and "succeeded=3" in line and "failed=1" in line, line


@pytest.mark.timeout(120)
def test_progress_is_off_by_default(ex: LocalBatchExecutor, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(ex.map(J.double, range(3))) == [0, 2, 4]
    assert capsys.readouterr().err == ""


def test_counts_before_the_first_poll_are_all_queued(ex: LocalBatchExecutor) -> None:
    class Silent:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    arr = ex.submit_map(J.double, range(5))
    bar = ProgressBar(arr, ex.provider.status_enum, Silent)
    arr._info = None  # as if no poll had answered yet
    counts = bar.counts()
    assert [counts[p] for p in counts] == [5, 0, 0, 0]
    arr.result(timeout=60)


def test_missing_tqdm_says_how_to_install_it_and_submits_nothing(
    ex: LocalBatchExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"pip install tqdm"):
        ex.submit_map(J.double, range(3), progress=True)
    with pytest.raises(ImportError, match=r"pip install tqdm"):
        ex.map(J.double, range(3), progress=True)
    assert ex._core.store.list("") == [] or all(k.startswith(".") for k in ex._core.store.list(""))


def _wait_for_bars() -> None:
    import threading

    for thread in threading.enumerate():
        if thread.name == "cloudexec-progress":
            thread.join(30)

