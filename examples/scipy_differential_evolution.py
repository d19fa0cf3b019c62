"""scipy's `differential_evolution(workers=ex.map)`: each generation is one array job.

    python examples/scipy_differential_evolution.py

SciPy evaluates a whole population per generation through ``workers``; any
``map``-like callable works, so the executor's `map` turns each generation
into one array job. ``updating="deferred"`` is what SciPy requires with workers.
A few generations keep the example quick; raise ``maxiter`` for real problems.
The cheap final polish runs locally.
"""

from __future__ import annotations

from scipy.optimize import differential_evolution, minimize

from cloudexec import LocalBatchExecutor


def rosenbrock(x: "list[float]") -> float:
    """The Rosenbrock valley; its minimum is 0 at (1, 1)."""
    return float(sum(100.0 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(len(x) - 1)))


def main() -> None:
    with LocalBatchExecutor(max_workers=4) as ex:
        result = differential_evolution(
            rosenbrock,
            bounds=[(-2.0, 2.0), (-2.0, 2.0)],
            workers=ex.map,
            updating="deferred",
            popsize=6,
            maxiter=6,
            seed=1,
            # SciPy would polish through the same workers too, one small array job per
            # finite-difference gradient: for a cheap function that is slower than
            # polishing right here, as below.
            polish=False,
        )
    print(f"after {result.nit} generations as array jobs: {result.fun:.3g} at ({result.x[0]:.3f}, {result.x[1]:.3f})")
    polished = minimize(rosenbrock, result.x, method="L-BFGS-B", bounds=[(-2.0, 2.0), (-2.0, 2.0)])
    print(f"minimum {polished.fun:.3g} at ({polished.x[0]:.3f}, {polished.x[1]:.3f}) after a local polish")


if __name__ == "__main__":
    main()
