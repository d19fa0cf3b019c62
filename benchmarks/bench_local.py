"""LocalBatchExecutor against its baselines, each measured in the same run.

Four measurements, each printed next to its baseline with the ratio:

(c) map time: ``LocalBatchExecutor`` vs ``ProcessPoolExecutor`` on 1,000 and
    100,000 trivial calls, with ``chunksize=1`` and with a chunksize giving 8
    children (8 chunks for the pool too), median of ``--rounds`` interleaved
    rounds. Target: ratio <= 5x in every case.
(d) runner cold start: ``python -m cloudexec.runner`` running one tiny job vs a
    bare ``python -c pass``. Target: overhead <= 0.3 s.
(e) latency from a job's end (the function returns) to its future resolving
    (its done-callback runs), one job at a time. Target: median <= the
    provider's longest poll interval.
(f) client peak memory per item of a map whose results are consumed and
    dropped, at N = 10,000 and 100,000, next to ``ProcessPoolExecutor``
    doing the same map; each measured in a fresh interpreter (tracemalloc
    peak over the map, and the growth of the resident set). Target: <= 250
    bytes per item at N = 100,000.

Prints a table and writes ``benchmarks/results/bench_local.json``.

    python benchmarks/bench_local.py [--quick] [--rounds 3] [--only c,d,e,f]

``--quick`` uses N = 1,000 and 10,000 instead of 1,000 and 100,000 (and
10,000 only for memory), one round: about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from cloudexec import LocalBatchExecutor
from cloudexec.providers.local import LocalProvider

from _common import cold_start, write_report

WORKERS = os.cpu_count() or 1


def trivial(x: int) -> int:
    return x + 1


def ended_at(pause_s: float) -> float:
    """Sleep, then return the wall-clock time at which the job's work ended."""
    time.sleep(pause_s)
    return time.time()


# -- (c) map time ------------------------------------------------------------------
def time_map(kind: str, items: int, chunksize: int) -> float:
    start = time.perf_counter()
    ex: Any = ProcessPoolExecutor(max_workers=WORKERS) if kind == "pool" else LocalBatchExecutor(max_workers=WORKERS)
    with ex:
        total = 0
        for value in ex.map(trivial, range(items), chunksize=chunksize):
            total += value
    elapsed = time.perf_counter() - start
    assert total == items * (items + 1) // 2
    return elapsed


def bench_map(sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for items in sizes:
        for chunksize in (1, -(-items // 8)):
            pool, local = [], []
            for _ in range(rounds):  # interleaved, so both see the same machine noise
                pool.append(time_map("pool", items, chunksize))
                local.append(time_map("local", items, chunksize))
            p, lo = statistics.median(pool), statistics.median(local)
            rows.append(
                {
                    "items": items,
                    "chunksize": chunksize,
                    "children": -(-items // chunksize),
                    "pool_s": round(p, 3),
                    "local_s": round(lo, 3),
                    "ratio": round(lo / p, 2),
                }
            )
            print(
                f"  (c) {items:>7} calls chunksize {chunksize:>6}: ProcessPool {p:8.3f} s  "
                f"Local {lo:8.3f} s  ratio {lo / p:5.1f}x  (target <= 5x)",
                flush=True,
            )
    return rows


# -- (d) runner cold start ---------------------------------------------------------
def bench_cold_start(rounds: int) -> dict[str, Any]:
    b, r = cold_start(rounds)
    print(f"  (d) cold start: python -c pass {b:.3f} s  runner {r:.3f} s  overhead {r - b:.3f} s  (target <= 0.3 s)")
    return {"python_s": round(b, 3), "runner_s": round(r, 3), "overhead_s": round(r - b, 3)}


# -- (e) end-to-resolve latency ----------------------------------------------------
def bench_latency(jobs: int) -> dict[str, Any]:
    interval = LocalProvider.poll_interval_s
    lags = []
    with LocalBatchExecutor(max_workers=1) as ex:
        for i in range(jobs):
            resolved = threading.Event()
            seen: list[float] = []
            future = ex.submit(ended_at, 0.05 + (i % 7) * 0.07)  # varied, so the ends fall at any poll phase
            future.add_done_callback(lambda _f: (seen.append(time.time()), resolved.set()))
            resolved.wait(60)
            lags.append(seen[0] - future.result())
    median = statistics.median(lags)
    print(
        f"  (e) job end -> future resolved: median {median * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms over {jobs} "
        f"jobs; poll interval {interval[0]:g}..{interval[1]:g} s  ratio {median / interval[1]:.2f}  (target <= 1)"
    )
    return {
        "jobs": jobs,
        "median_s": round(median, 4),
        "max_s": round(max(lags), 4),
        "poll_interval_s": list(interval),
        "ratio_to_longest_poll": round(median / interval[1], 3),
    }


# -- (f) client memory -------------------------------------------------------------
def _peak_rss() -> int:
    """The process's peak resident set (VmHWM) in bytes; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> int:
    """Start the peak resident set anew from now (Linux: clear_refs 5); returns it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # then the growth is measured from the peak so far (imports included)
    return _peak_rss()


def measure_memory(kind: str, items: int, chunksize: int | None, traced: bool) -> dict[str, Any]:
    """Run in a fresh interpreter: the client's peak memory over one map whose results are dropped.

    ``traced``: the tracemalloc peak (Python allocations); else the growth of
    the peak resident set (everything, but tracemalloc's own records would inflate it).
    """
    import gc
    import tracemalloc

    ex: Any = ProcessPoolExecutor(max_workers=WORKERS) if kind == "pool" else LocalBatchExecutor(max_workers=WORKERS)
    with ex:
        list(ex.map(trivial, range(8)))  # workers started and modules imported before measuring
        gc.collect()
        rss0 = _reset_peak_rss()
        if traced:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        total = 0
        kwargs = {} if chunksize is None else {"chunksize": chunksize}
        for value in ex.map(trivial, range(items), **kwargs):
            total += value
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        rss = _peak_rss() - rss0
    assert total == items * (items + 1) // 2
    if traced:
        return {"peak_b_per_item": round(peak / items), "seconds": round(elapsed, 2)}
    return {"rss_b_per_item": round(rss / items)}


def bench_memory(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for items in sizes:
        for kind, chunksize in (("pool", None), ("local", None), ("local", 1)):
            label = "ProcessPool" if kind == "pool" else f"Local (chunksize {chunksize or 'default'})"
            row: dict[str, Any] = {"items": items, "kind": kind, "chunksize": chunksize}
            for traced in ("1", "0"):
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(items), str(chunksize or 0)]
                    + [traced],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                row.update(json.loads(out.splitlines()[-1]))
            rows.append(row)
            print(
                f"  (f) {items:>7} items {label:<28}: peak {row['peak_b_per_item']:>6} B/item (tracemalloc), "
                f"rss +{row['rss_b_per_item']:>6} B/item, {row['seconds']} s",
                flush=True,
            )
        pool = next(r for r in rows if r["items"] == items and r["kind"] == "pool")
        for row in rows:
            if row["items"] == items and row["kind"] == "local":
                row["ratio_to_pool"] = round(row["peak_b_per_item"] / max(pool["peak_b_per_item"], 1), 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and one round (about a minute)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="c,d,e,f", help="which measurements, e.g. 'c,f'")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, items, chunksize, traced = args.memory_child
        print(json.dumps(measure_memory(kind, int(items), int(chunksize) or None, traced == "1")))
        return
    only = set(args.only.split(","))
    rounds = 1 if args.quick else args.rounds
    sizes = [1_000, 10_000] if args.quick else [1_000, 100_000]
    print(f"LocalBatchExecutor vs baselines, {WORKERS} CPUs, python {sys.version.split()[0]}")
    report: dict[str, Any] = {
        "benchmark": "LocalBatchExecutor vs ProcessPoolExecutor, runner cold start, resolve latency, client memory",
        "quick": args.quick,
        "rounds": rounds,
    }
    if "c" in only:
        report["map_time"] = bench_map(sizes, rounds)
    if "d" in only:
        report["cold_start"] = bench_cold_start(max(rounds, 5))
    if "e" in only:
        report["resolve_latency"] = bench_latency(10 if args.quick else 30)
    if "f" in only:
        report["memory"] = bench_memory([10_000] if args.quick else [10_000, 100_000])
    write_report("bench_local.quick" if args.quick else "bench_local", report)


if __name__ == "__main__":
    main()
