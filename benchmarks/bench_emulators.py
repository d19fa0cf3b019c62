"""Emulator throughput: array children per second on each emulator, fork server vs fresh interpreters.

Each emulator runs ``ex.map(plus_one, range(N), chunksize=1)`` (one array of
N children, each a trivial call) through cloudexec's own executor. The
baseline, measured in the same run, is the old way: every child a fresh
``python -m cloudexec.runner`` interpreter that imports the storage stack
(``CLOUDEXEC_FORKSERVER=0``); the new way forks every child from one warm
fork server (`cloudexec._forkserver`). Times run from the first submit to the
last result; each emulator is started (and its fork server warmed) before the
clock starts.

Prints a table and writes ``benchmarks/results/bench_emulators.json``.

    python benchmarks/bench_emulators.py [--sizes 100 1000] [--with-10000] [--slots 8]
        [--baseline-max 100] [--only aws|azure]

The baseline takes ~0.5-1.5 s per child, so by default it is measured at
N = 100 only (``--baseline-max``) and the run stays within a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import time
from collections.abc import Iterator
from typing import Any

from cloudexec import _forkserver

from _common import write_report


def plus_one(x: int) -> int:
    return x + 1


@contextlib.contextmanager
def _switch(fork_server: bool) -> Iterator[None]:
    """Set the emulators' fork-server switch for emulators started inside."""
    old = os.environ.get(_forkserver.ENV_SWITCH)
    os.environ[_forkserver.ENV_SWITCH] = "1" if fork_server else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_forkserver.ENV_SWITCH, None)
        else:
            os.environ[_forkserver.ENV_SWITCH] = old


def _emulator(name: str, slots: int) -> Any:
    if name == "aws":
        from cloudexec.testing import aws_batch_emulator

        return aws_batch_emulator(timeout_scale=0.02, max_vcpus=slots)
    from cloudexec.testing import azure_batch_emulator

    return azure_batch_emulator(slots=slots)


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(name: str, n: int, *, fork_server: bool, slots: int) -> dict[str, Any]:
    """Run an N-child map on a fresh emulator; return seconds, children per second and CPU."""
    with _switch(fork_server), _emulator(name, slots) as emu, emu.executor(poll_interval_s=(0.05, 0.5)) as ex:
        # Warm-up (not timed): the fork server starts and imports once per emulator.
        assert list(ex.map(plus_one, range(2), chunksize=1)) == [1, 2]
        cpu = _cpu_s()
        start = time.perf_counter()
        out = list(ex.map(plus_one, range(n), chunksize=1))
        seconds = time.perf_counter() - start
        # Children's CPU is counted once they are reaped: the fork server's only
        # when it stops, so CPU is read after the emulator closed.
    cpu_s = _cpu_s() - cpu
    assert out == [x + 1 for x in range(n)]
    return {
        "emulator": name,
        "children": n,
        "way": "fork server" if fork_server else "fresh interpreter",
        "seconds": round(seconds, 2),
        "children_per_s": round(n / seconds, 2),
        "cpu_s_per_child": round(cpu_s / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--with-10000", action="store_true", help="also N = 10,000 (fork server only)")
    parser.add_argument("--slots", type=int, default=8, help="max_vcpus (AWS) / task slots (Azure)")
    parser.add_argument("--baseline-max", type=int, default=100, help="largest N measured the old way")
    parser.add_argument("--only", choices=["aws", "azure"], default=None)
    args = parser.parse_args()
    sizes = sorted(set(args.sizes + ([10_000] if args.with_10000 else [])))
    rows: list[dict[str, Any]] = []
    for name in ["aws", "azure"] if args.only is None else [args.only]:
        for n in sizes:
            if n <= args.baseline_max:
                rows.append(measure(name, n, fork_server=False, slots=args.slots))
                print(f"  measured {rows[-1]}", flush=True)
            rows.append(measure(name, n, fork_server=True, slots=args.slots))
            print(f"  measured {rows[-1]}", flush=True)
    print(f"Array children per second, trivial calls, chunksize=1, {args.slots} slots, {os.cpu_count()} CPUs")
    print(f"  {'emulator':<8} {'N':>6} {'way':<18} {'seconds':>8} {'children/s':>10} {'CPU s/child':>11} {'speed-up':>8}")
    for row in rows:
        base = next(
            (r for r in rows if r["emulator"] == row["emulator"] and r["children"] == row["children"]
             and r["way"] == "fresh interpreter"),
            None,
        )
        row["speedup"] = round(row["children_per_s"] / base["children_per_s"], 1) if base else None
        speedup = f"{row['speedup']:.1f}x" if row["speedup"] else "-"
        print(
            f"  {row['emulator']:<8} {row['children']:6d} {row['way']:<18} {row['seconds']:8.2f} "
            f"{row['children_per_s']:10.2f} {row['cpu_s_per_child']:11.4f} {speedup:>8}"
        )
    report = {
        "benchmark": "emulator throughput: array children per second, fork server vs fresh interpreter per child",
        "slots": args.slots,
        "rows": rows,
    }
    write_report("bench_emulators", report)


if __name__ == "__main__":
    main()
