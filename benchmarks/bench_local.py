"""LocalBatchExecutor vs ProcessPoolExecutor, measured in the same run.

Prints, for a map of N trivial calls, the median wall time of each over
several rounds and their ratio (target: LocalBatchExecutor <= 10x
ProcessPoolExecutor), then the runner's cold start over a bare
``python -c pass`` (target <= 0.3 s).

    python benchmarks/bench_local.py [--items 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from cloudexec import LocalBatchExecutor, _keys, _payload
from cloudexec._storage import LocalStore


def trivial(x: int) -> int:
    return x + 1


def time_map(make: object, items: int) -> float:
    start = time.perf_counter()
    with make() as ex:  # type: ignore[operator]
        out = list(ex.map(trivial, range(items)))
    elapsed = time.perf_counter() - start
    assert out == [x + 1 for x in range(items)]
    return elapsed


def cold_start(rounds: int) -> tuple[float, float]:
    """Median seconds of ``python -c pass`` and of the runner running one tiny job."""
    folder = os.path.join(tempfile.mkdtemp(prefix="cloudexec-bench-"), "bench-job")
    store = LocalStore(folder)
    key = _keys.job_key(b"benchmark master key, not secret", "bench-job")
    store.write(_payload.CALL, _keys.seal(key, "call", "bench-job", None, _payload.pack("call", (abs, (-1,), {}))))
    env = dict(os.environ, CLOUDEXEC_JOB_KEY=key.hex())  # as the provider's environment channel gives it
    bare, run = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cloudexec.runner", folder], check=True, env=env)
        run.append(time.perf_counter() - t)
    return statistics.median(bare), statistics.median(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    pool, local = [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine noise
        pool.append(time_map(lambda: ProcessPoolExecutor(max_workers=workers), args.items))
        local.append(time_map(lambda: LocalBatchExecutor(max_workers=workers), args.items))
    p, lo = statistics.median(pool), statistics.median(local)
    print(f"map of {args.items} trivial calls, {workers} workers, median of {args.rounds} rounds")
    print(f"  ProcessPoolExecutor : {p:8.3f} s")
    print(f"  LocalBatchExecutor  : {lo:8.3f} s  ({lo / args.items * 1000:.2f} ms per call)")
    print(f"  ratio               : {lo / p:8.1f}x   (target <= 10x)")
    bare, run = cold_start(max(args.rounds, 5))
    print("runner cold start, median")
    print(f"  python -c pass      : {bare:8.3f} s")
    print(f"  cloudexec.runner    : {run:8.3f} s")
    print(f"  overhead            : {run - bare:8.3f} s   (target <= 0.3 s)")


if __name__ == "__main__":
    main()
