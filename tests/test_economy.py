"""Control-plane economy, counted on the AWS Batch emulator: service calls per map and per poll.

The counts are deterministic (the emulator counts every Batch and S3 request it
receives); timings live in benchmarks/. Polls are counted by wrapping the
provider's bulk ``describe`` (the manager calls it once per poll).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

import jobs
from cloudexec import _payload
from cloudexec._base import DEFAULT_MAX_CHILDREN, default_chunksize
from cloudexec._storage import FsspecStore, LocalStore
from cloudexec.testing import aws_batch_emulator
from contract import count_polls

pytestmark = pytest.mark.aws

FAST_POLL = (0.05, 0.2)


@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    with aws_batch_emulator(timeout_scale=0.02, inherit_sys_path=False) as emulator:
        yield emulator


@pytest.mark.timeout(120)
def test_a_map_costs_one_submit_per_array_part_and_one_describe_per_poll(emu: Any) -> None:
    with emu.executor(poll_interval_s=FAST_POLL, max_array_size=4) as ex:
        polls = count_polls(ex)
        emu.reset_api_calls()
        assert list(ex.map(jobs.double, range(10))) == [2 * i for i in range(10)]
    calls = emu.api_calls  # after shutdown: the polls until the array's status ended count too
    assert calls["SubmitJob"] == math.ceil(10 / 4)  # three array parts: 4 + 4 + 2 children
    # At most one DescribeJobs per poll covers all three parts (up to 100 ids a
    # call); no per-child describes or lists while results arrive through storage.
    assert 0 < calls["DescribeJobs"] <= polls[0], (calls, polls)
    assert calls["ListJobs"] == 0


@pytest.mark.timeout(120)
def test_a_map_writes_its_inputs_once_whatever_its_size(emu: Any) -> None:
    puts = []
    for n in (4, 16):
        with emu.executor(poll_interval_s=FAST_POLL) as ex:
            emu.reset_api_calls()
            assert ex.submit_map(jobs.double, range(n)).result(timeout=90) == [2 * i for i in range(n)]
            puts.append(emu.storage_calls["PutObject"])
    # The client writes call.pkl, inputs.bin and the manifest (twice) for any n;
    # the rest are the children's results, one each.
    assert puts[1] - puts[0] == 16 - 4, puts
    assert puts[0] - 4 == 4, puts


@pytest.mark.timeout(120)
def test_an_array_child_reads_with_four_gets_and_no_head(emu: Any) -> None:
    for n in (4, 16):
        with emu.executor(poll_interval_s=FAST_POLL) as ex:
            emu.reset_api_calls()
            assert ex.submit_map(jobs.double, range(n), chunksize=1).result(timeout=90) == [2 * i for i in range(n)]
        calls = emu.storage_calls
        # Each child GETs its call, its slice's table entry, its slice, and an earlier
        # result (there is none); the client GETs each result once. Whole objects are
        # read without a HEAD first, and a missing one is not looked for with a listing.
        assert calls["GetObject"] == 5 * n, calls
        assert calls["HeadObject"] == 0, calls


@pytest.mark.timeout(120)
def test_results_are_listed_from_the_last_child_done(emu: Any) -> None:
    with emu.executor(poll_interval_s=FAST_POLL) as ex:
        store = ex._core.store
        assert isinstance(store, FsspecStore)
        fs = store.fs
        folder = store.child("listing-probe")
        n = 1200
        fs.pipe({f"{folder.root}/{_payload.result_key(i)}": b"" for i in range(n)})
        emu.reset_api_calls()
        everything = folder.list(_payload.RESULTS_DIR)
        assert len(everything) == n and emu.storage_calls["ListObjectsV2"] == 2  # 1,000 a page
        emu.reset_api_calls()
        tail = folder.list(_payload.RESULTS_DIR, start_after=_payload.result_name(1099))
        assert tail == [_payload.result_name(i) for i in range(1100, n)]
        assert emu.storage_calls["ListObjectsV2"] == 1  # only what comes after
        folder.delete("")

        # The poller lists from the first child without a result.
        seen: list[str | None] = []
        plain = FsspecStore.list

        def spy(self: Any, prefix: str, start_after: str | None = None) -> list[str]:
            seen.append(start_after)
            return plain(self, prefix, start_after)

        FsspecStore.list = spy  # type: ignore[method-assign]
        try:
            assert list(ex.map(jobs.double, range(6))) == [2 * i for i in range(6)]
        finally:
            FsspecStore.list = plain  # type: ignore[method-assign]
    assert seen and seen[0] is None
    assert any(after is not None for after in seen), seen  # the start moved as children finished


def test_result_names_sort_as_their_indices() -> None:
    names = [_payload.result_name(i) for i in (0, 2, 10, 100, 9_999_999)]
    assert names == sorted(names) and names[2] == "0000010.pkl"


def test_local_store_lists_after_a_name(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path))
    for i in (0, 1, 5, 12):
        store.write(_payload.result_key(i), b"")
    assert store.list(_payload.RESULTS_DIR, start_after=_payload.result_name(1)) == [
        _payload.result_name(5),
        _payload.result_name(12),
    ]


@pytest.mark.parametrize(
    "n_items, chunksize",
    [(0, 1), (1, 1), (DEFAULT_MAX_CHILDREN, 1), (DEFAULT_MAX_CHILDREN + 1, 2), (100_000, 10), (1_000_000, 100)],
)
def test_default_chunksize_keeps_a_map_to_one_array_job(n_items: int, chunksize: int) -> None:
    assert default_chunksize(n_items) == chunksize
    assert math.ceil(n_items / chunksize) <= DEFAULT_MAX_CHILDREN


def test_fsspec_store_reads_many_objects_in_one_go() -> None:
    # Absent objects read None; an object that cannot be read now reads its error.
    store = FsspecStore(f"memory://economy-{id(object())}")
    store.write("a", b"1")
    store.write("b", b"2")
    assert store.read_many(["a", "b", "missing"]) == {"a": b"1", "b": b"2", "missing": None}
    assert store.read_many(["missing"]) == {"missing": None}
