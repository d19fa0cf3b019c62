"""Estimate pi by Monte Carlo: one array job of independent, seeded samples.

    python examples/monte_carlo.py [--jobs 20] [--samples 200000]

Each child draws its own points with its own seed, so the estimate is the same
on every run and on every provider. Swap `LocalBatchExecutor` for
`AWSBatchExecutor(...)` or `AzureBatchExecutor(...)` to run it in the cloud.
"""

from __future__ import annotations

import argparse
import random

from cloudexec import LocalBatchExecutor


def hits_in_circle(seed: int, samples: int) -> int:
    """How many of ``samples`` random points of the unit square fall in the quarter circle."""
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="array children (seeds)")
    parser.add_argument("--samples", type=int, default=200_000, help="points per child")
    args = parser.parse_args()
    with LocalBatchExecutor() as ex:
        array = ex.submit_map(hits_in_circle, range(args.jobs), [args.samples] * args.jobs)
        hits = array.result()
        print(f"{args.jobs} jobs, exit codes {sorted(set(array.child_job_exit_codes))}")
    estimate = 4.0 * sum(hits) / (args.jobs * args.samples)
    print(f"pi ~ {estimate:.5f} from {args.jobs * args.samples:,} points")


if __name__ == "__main__":
    main()
