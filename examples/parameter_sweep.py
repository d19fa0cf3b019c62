"""A parameter sweep with `map`: one array job over a grid, results in grid order.

    python examples/parameter_sweep.py

The model is a damped oscillator integrated with explicit Euler steps; the
sweep finds the damping and stiffness whose displacement after 10 s is
smallest. `map` with ``chunksize`` packs several grid points per child, which
is how a sweep of thousands of cheap points stays a few hundred jobs.
"""

from __future__ import annotations

import itertools

from cloudexec import LocalBatchExecutor


def final_displacement(damping: float, stiffness: float, steps: int = 10_000) -> float:
    """|x(10 s)| of x'' + damping x' + stiffness x = 0 from x=1, v=0."""
    dt = 10.0 / steps
    x, v = 1.0, 0.0
    for _ in range(steps):
        x, v = x + dt * v, v - dt * (damping * v + stiffness * x)
    return abs(x)


def main() -> None:
    dampings = [0.1, 0.5, 1.0, 2.0]
    stiffnesses = [0.5, 1.0, 4.0]
    grid = list(itertools.product(dampings, stiffnesses))
    with LocalBatchExecutor() as ex:
        results = list(ex.map(final_displacement, *zip(*grid), chunksize=3))
    for (damping, stiffness), x in zip(grid, results):
        print(f"damping={damping:<4} stiffness={stiffness:<4} |x(10)|={x:.2e}")
    best = min(zip(results, grid))
    print(f"best of {len(grid)}: damping={best[1][0]} stiffness={best[1][1]}")


if __name__ == "__main__":
    main()
