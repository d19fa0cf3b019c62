"""What signing costs: runner cold start, and a 1,000-item local map with vs without signing.

Both measured in the same run, interleaved, medians over several rounds:

- the runner's cold start running one tiny signed job, over a bare
  ``python -c pass`` (target: at most 0.3 s more);
- ``LocalBatchExecutor.map`` over N trivial items with signing, and with
  signing replaced by a pass-through (target: within 10%). The unsigned
  baseline exists only here: a ``sitecustomize`` on the job processes' path
  (and the same patch in this process) turns `seal`/`open_sealed` into
  identity functions, so both sides run the same code otherwise.

    python benchmarks/bench_signing.py [--items 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from typing import Any

from cloudexec import LocalBatchExecutor, _keys, _payload

from _common import cold_start

_PATCH = '''
def _unsigned():
    from cloudexec import _keys
    _keys.seal = lambda key, kind, job_id, index, payload: payload
    _keys.open_sealed = lambda keys, kind, job_id, index, data, what=None: bytes(data)
    _keys.unverified_payload = lambda data: data
'''
_SITE = _PATCH + '''
import os
if os.environ.get("CLOUDEXEC_BENCH_UNSIGNED"):
    _unsigned()
'''


def trivial(x: int) -> int:
    return x + 1


def _cpu_s() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def time_map(items: int, workers: int, unsigned: bool, site_dir: str) -> tuple[float, float]:
    """Wall and CPU seconds (this process and its job processes) of one ``map`` of ``items`` calls."""
    saved = {name: getattr(_keys, name) for name in ("seal", "open_sealed", "unverified_payload")}
    saved_env = {k: os.environ.get(k) for k in ("CLOUDEXEC_BENCH_UNSIGNED", "PYTHONPATH")}
    try:
        if unsigned:
            namespace: dict[str, Any] = {}
            exec(_PATCH, namespace)  # noqa: S102 - our own patch, applied to this process too
            namespace["_unsigned"]()
            os.environ["CLOUDEXEC_BENCH_UNSIGNED"] = "1"
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site_dir, saved_env["PYTHONPATH"]]))
        start, cpu = time.perf_counter(), _cpu_s()
        with LocalBatchExecutor(max_workers=workers) as ex:
            out = list(ex.map(trivial, range(items)))
        elapsed = time.perf_counter() - start
        assert out == [x + 1 for x in range(items)]
        return elapsed, _cpu_s() - cpu
    finally:
        for name, value in saved.items():
            setattr(_keys, name, value)
        for name, old in saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def crypto_work(items: int, rounds: int) -> float:
    """Median seconds of the signing work a map of ``items`` adds, done in one process.

    Per item: seal its input slice, verify it (runner), seal its result
    (runner), derive the job's keys and verify the result (client).
    """
    ring = _keys.load_keys("benchmark master key, not secret")
    inputs = [_payload.dumps_chunk([(i,)]) for i in range(items)]
    results = [_payload.pack_outcomes([("ok", i + 1)]) for i in range(items)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        key = ring.job_key("bench-map")
        for i in range(items):
            _keys.open_sealed(key, "input", "bench-map", i, _keys.seal(key, "input", "bench-map", i, inputs[i]))
            sealed = _keys.seal(key, "result", "bench-map", i, results[i])
            _keys.open_sealed(ring.job_keys("bench-map"), "result", "bench-map", i, sealed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    site_dir = tempfile.mkdtemp(prefix="cloudexec-bench-site-")
    with open(os.path.join(site_dir, "sitecustomize.py"), "w", encoding="utf-8") as fh:
        fh.write(_SITE)
    signed, unsigned = [], []
    time_map(args.items, workers, False, site_dir)  # warm-up: page cache, first import of dill
    for i in range(args.rounds):  # interleaved, alternating who goes first, so both see the same noise
        for unsigned_first in ([True, False] if i % 2 else [False, True]):
            (unsigned if unsigned_first else signed).append(time_map(args.items, workers, unsigned_first, site_dir))
    s, u = statistics.median(w for w, _ in signed), statistics.median(w for w, _ in unsigned)
    s_min, u_min = min(w for w, _ in signed), min(w for w, _ in unsigned)
    s_cpu, u_cpu = statistics.median(c for _, c in signed), statistics.median(c for _, c in unsigned)
    bare, run = cold_start(max(args.rounds, 7))
    work = crypto_work(args.items, max(args.rounds, 7))
    rows = [
        ("python -c pass", bare, "baseline"),
        ("runner, one signed job", run, f"+{run - bare:.3f} s (target <= +0.3 s)"),
        (f"map of {args.items}, unsigned", u, "baseline (wall, median)"),
        (f"map of {args.items}, signed", s, f"{s / u:.3f}x (target <= 1.10x)"),
        (f"map of {args.items}, unsigned", u_min, "baseline (wall, best round)"),
        (f"map of {args.items}, signed", s_min, f"{s_min / u_min:.3f}x"),
        (f"map of {args.items}, unsigned", u_cpu, "baseline (CPU of client + jobs, median)"),
        (f"map of {args.items}, signed", s_cpu, f"{s_cpu / u_cpu:.3f}x"),
        (f"signing work of {args.items} items", work, f"{work / u_min:.1%} of the best unsigned map"),
    ]
    # On a shared machine the wall medians swing with other load; the best
    # round and the CPU time show what signing itself costs.
    print(f"signing cost, {workers} workers, medians of {args.rounds} map rounds / {max(args.rounds, 7)} starts")
    print(f"  {'measurement':<28} {'median':>9}   ratio / difference")
    for name, value, note in rows:
        print(f"  {name:<28} {value:8.3f}s   {note}")


if __name__ == "__main__":
    main()
