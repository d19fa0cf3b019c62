"""What the benchmark scripts share: the runner's cold start, and the JSON report each writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from cloudexec import _keys, _payload
from cloudexec._storage import LocalStore

#: Where each script writes its JSON.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cold_start(rounds: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Median seconds of ``python -c pass`` and of the runner running one tiny signed job, interleaved.

    Args:
        env: extra environment for the runner (e.g. a switch a benchmark compares).
    """
    folder = os.path.join(tempfile.mkdtemp(prefix="cloudexec-bench-"), "bench-job")
    key = _keys.job_key(b"benchmark master key, not secret", "bench-job")
    LocalStore(folder).write(
        _payload.CALL, _keys.seal(key, "call", "bench-job", None, _payload.pack("call", (abs, (-1,), {})))
    )
    # The job's key as the provider's environment channel gives it.
    run_env = dict(os.environ, CLOUDEXEC_JOB_KEY=key.hex(), **(env or {}))
    bare, run = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cloudexec.runner", folder], check=True, env=run_env, stderr=subprocess.DEVNULL
        )
        run.append(time.perf_counter() - t)
    return statistics.median(bare), statistics.median(run)


def write_report(name: str, report: dict[str, Any]) -> str:
    """Write ``report`` (plus the machine and the time) to ``benchmarks/results/<name>.json``; return the path."""
    report = {
        **report,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            # Other work on the machine skews every timing: say how much there was.
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/" + os.path.basename(sys.argv[0]) + " " + " ".join(sys.argv[1:]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"written to {os.path.relpath(path)}")
    return path
