"""The README demo: ``python -m cloudexec.demo``.

Runs on `LocalBatchExecutor` (local processes, a temporary folder for
storage), so it needs no cloud account. Swap the executor class for
`AWSBatchExecutor` or `AzureBatchExecutor` and the same code runs in the cloud.
"""

from __future__ import annotations

import random

from cloudexec import LocalBatchExecutor


def simulate(n: int, seed: int = 0) -> float:
    """A stand-in for real work: a small Monte Carlo estimate of pi."""
    rng = random.Random(seed * 100_003 + n)
    hits = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(20_000))
    print(f"simulate({n}) done")
    return 4.0 * hits / 20_000


def main() -> None:
    """Submit one job, map over 100 items, run one array job, and use settings."""
    with LocalBatchExecutor(max_workers=4) as ex:
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
        print("job id (attachable):", fut.job_id)


if __name__ == "__main__":
    main()
