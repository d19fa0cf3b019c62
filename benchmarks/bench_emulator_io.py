"""Submit latency and result collection on each emulator, against the storage floor, same run.

For a map of N trivial calls (one array job) on the AWS Batch and the Azure
Batch emulator this measures:

- **submit**: from ``ex.submit_map(f, range(N))`` until the service has the
  job (it returns at once; the manager thread writes the call and its inputs
  and submits). Floor: the same objects (every object under the job's prefix
  but results and logs, same sizes) written again directly with one fsspec
  bulk ``pipe`` — the storage part alone, without the Batch call.
- **collect**: once every child's result is stored, how long a fresh
  executor takes to ``attach`` to the job and return its N results. Floor:
  listing the results and reading them with one fsspec bulk ``cat`` (s3fs /
  adlfs run those reads concurrently).

Target (issue "Scale and economy"): each ≤ 1.5x its floor. Medians of
``--rounds`` rounds. Prints a table and writes
``benchmarks/results/bench_emulator_io.json``.

    python benchmarks/bench_emulator_io.py [--items 100 1000] [--rounds 3] [--only aws|azure]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

from _common import write_report


def plus_one(x: int) -> int:
    return x + 1


@contextlib.contextmanager
def emulator(kind: str) -> Iterator[Any]:
    if kind == "aws":
        from cloudexec.testing import aws_batch_emulator

        with aws_batch_emulator(timeout_scale=0.02) as emu:
            yield emu
    else:
        from cloudexec.testing import azure_batch_emulator

        with azure_batch_emulator() as emu:
            yield emu


def _job_objects(store: Any, job_id: str) -> dict[str, int]:
    """Every object under the job's prefix, with its size."""
    fs, root = store.fs, store.root
    fs.invalidate_cache()
    found: dict[str, Any] = fs.find(f"{root}/{job_id}", detail=True)
    return {path: int(info.get("size") or 0) for path, info in found.items()}


def one_round(emu: Any, items: int) -> dict[str, float]:
    fast = (0.05, 0.5)
    with emu.executor(poll_interval_s=fast) as ex:
        store = ex._core.store  # the executor's own fsspec filesystem and root: the floor uses the same
        start = time.perf_counter()
        arr = ex.submit_map(plus_one, range(items), chunksize=1)
        # submit_map returns at once; the manager thread writes the inputs and
        # hands the job over: submit latency ends when the service has it.
        while arr._record.ref is None:
            time.sleep(0.001)
        submit_s = time.perf_counter() - start
        assert arr.result(timeout=3600) == [x + 1 for x in range(items)]
        job_id = arr.job_id
        written = {
            path: size
            for path, size in _job_objects(store, job_id).items()
            if not path[len(f"{store.root}/{job_id}/") :].startswith(("results/", "logs/"))
        }
    # Floor of the submit: the objects it wrote, written again in one bulk call.
    scratch = f"{store.root}/floor-{uuid.uuid4().hex[:8]}"
    blobs = {f"{scratch}/{i}": os.urandom(size) for i, size in enumerate(written.values())}
    start = time.perf_counter()
    store.fs.pipe(blobs)
    submit_floor_s = time.perf_counter() - start
    with emu.executor(poll_interval_s=fast) as ex:
        start = time.perf_counter()
        got = ex.attach(job_id).result(timeout=3600)
        collect_s = time.perf_counter() - start
    assert got == [x + 1 for x in range(items)]
    # Floor of the collection: list the results, read them all in one bulk call.
    fs = store.fs
    start = time.perf_counter()
    fs.invalidate_cache()
    names = [p for p in fs.find(f"{store.root}/{job_id}/results")]
    data = fs.cat(names)
    collect_floor_s = time.perf_counter() - start
    assert len(data) >= items
    with contextlib.suppress(Exception):
        fs.rm(scratch, recursive=True)
    return {
        "submit_s": submit_s,
        "submit_floor_s": submit_floor_s,
        "collect_s": collect_s,
        "collect_floor_s": collect_floor_s,
        "objects_written_by_submit": float(len(written)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["aws", "azure"])
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for kind in [args.only] if args.only else ["aws", "azure"]:
        with emulator(kind) as emu:
            for items in args.items:
                rounds = [one_round(emu, items) for _ in range(args.rounds)]
                med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                rows.append(
                    {
                        "emulator": kind,
                        "items": items,
                        **{k: round(v, 4) for k, v in med.items()},
                        "submit_ratio": round(med["submit_s"] / max(med["submit_floor_s"], 1e-6), 2),
                        "collect_ratio": round(med["collect_s"] / max(med["collect_floor_s"], 1e-6), 2),
                    }
                )
                row = rows[-1]
                print(
                    f"{kind:<6} N={items:<6} submit {row['submit_s']:.3f} s (floor {row['submit_floor_s']:.3f}, "
                    f"{row['submit_ratio']:.2f}x, {int(row['objects_written_by_submit'])} objects)  "
                    f"collect {row['collect_s']:.3f} s (floor {row['collect_floor_s']:.3f}, "
                    f"{row['collect_ratio']:.2f}x)",
                    flush=True,
                )
    report = {
        "benchmark": "submit latency and result collection vs the storage floor (fsspec bulk pipe/cat), emulators",
        "target": "each <= 1.5x its floor",
        "rounds": args.rounds,
        "rows": rows,
    }
    write_report("bench_emulator_io", report)


if __name__ == "__main__":
    main()
