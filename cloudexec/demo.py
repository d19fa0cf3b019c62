"""The README demo: ``python -m cloudexec.demo [IO_ROOT]``.

Runs on `LocalBatchExecutor` (local processes), so it needs no cloud account.
Swap the executor class for `AWSBatchExecutor` or `AzureBatchExecutor` and the
same code runs in the cloud.

The jobs' storage is a folder that outlives the demo (``IO_ROOT``, default
``$XDG_CACHE_HOME/cloudexec/demo``, i.e. ``~/.cache/cloudexec/demo``), so the
job id it prints can really be attached from another process afterwards.
"""

from __future__ import annotations

import os
import random
import shlex
import sys

from cloudexec import LocalBatchExecutor


def simulate(n: int, seed: int = 0) -> float:
    """A stand-in for real work: a small Monte Carlo estimate of pi."""
    rng = random.Random(seed * 100_003 + n)
    hits = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(20_000))
    print(f"simulate({n}) done")
    return 4.0 * hits / 20_000


def default_io_root() -> str:
    """Where the demo keeps its jobs: a folder in the user's cache directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "cloudexec", "demo")


def main(argv: list[str] | None = None) -> None:
    """Submit one job, map over 100 items, run one array job, and use settings."""
    args = sys.argv[1:] if argv is None else argv
    io_root = os.path.abspath(args[0]) if args else default_io_root()
    os.makedirs(io_root, exist_ok=True)
    with LocalBatchExecutor(io_root=io_root, max_workers=4) as ex:
        fut = ex.submit(simulate, 3, seed=1)
        print("single job:", round(fut.result(), 3), fut.job_status, "exit", fut.job_exit_code)
        print("  its log:", (fut.job_log or "").strip())
        estimates = list(ex.map(simulate, range(100), chunksize=10))
        print(f"map of 100: mean {sum(estimates) / len(estimates):.4f}")
        arr = ex.submit_map(simulate, range(20))
        print("array job:", len(arr.result()), "results; child exit codes", set(arr.child_job_exit_codes))
        print("  child 0 log:", (arr.children[0].job_log or "").strip())
        big = ex.with_settings(vcpus=2, memory="2 GiB", timeout=600, retries=2)
        print("with settings:", round(big.submit(simulate, 99).result(), 3))
    print(f"jobs stored under {io_root}; job id {fut.job_id}")
    print("attach it from another process:")
    attach = f"from cloudexec import LocalBatchExecutor as L; print(L(io_root={io_root!r}).attach({fut.job_id!r}).result())"
    print(f"  python -c {shlex.quote(attach)}")
    print(f"  cloudexec --provider local --set io_root={shlex.quote(io_root)} status {fut.job_id}")
    print(f"  cloudexec --provider local --set io_root={shlex.quote(io_root)} jobs")

if __name__ == "__main__":
    main()
